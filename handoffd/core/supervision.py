"""Messages between the supervisor and the acceptor (docs/PRIVSEP.md has the table).

The acceptor holds the key and creates each worker's channel (so a worker's
``SO_PEERCRED`` names the acceptor), but it has no privilege: it asks the
supervisor to start, signal and reap workers under their own uids.  The
supervisor trusts the acceptor with nothing more than that: it builds the worker's
command line from the configuration itself, takes only the key-parking grant
variables from the request, picks the worker's uid, and signals only workers it
spawned, with SIGTERM or SIGKILL.

One SEQPACKET datagram per message: ``kind (u8) | payload``, integers big-endian.

===========  =======  ================================================================
kind         dir      payload
===========  =======  ================================================================
SPAWN        A -> S   worker_id (16) | grant (JSON object of HANDOFFD_PARKING_* strings)
                      + fds: the worker's channel end, then the grant pipe (fallback mode)
SPAWNED      S -> A   worker_id (16) | pid (u32) | uid (u32)
SPAWN_FAILED S -> A   worker_id (16) | major (u32) | minor (u32) | detail (UTF-8)
EXITED       S -> A   worker_id (16) | status (i32): the worker and all it spawned are gone
SIGNAL       A -> S   worker_id (16) | signal (u8): 15 (TERM: drain) or 9 (KILL: with all
                      it spawned)
NOTIFY       A -> S   systemd notification lines (UTF-8), forwarded by the supervisor
PEER         S -> A   index (u16) + fd: to acceptor 0 of a set of ``[server] acceptors``,
                      its end of the status socketpair the supervisor made for acceptor
                      ``index`` (status and metrics are answered for all by acceptor 0)
ATTACH       S -> A   worker_id (16): another acceptor of the set asked for this worker;
                      give it a guest channel and key grant (the shared pool)
GUEST        A -> S   worker_id (16) | grant (as SPAWN's) + fds: the guest channel end,
                      then the grant pipe (fallback mode); no fds and an empty grant:
                      declined.  The supervisor then answers SPAWNED or SPAWN_FAILED
                      for the worker to this acceptor too, and EXITED when it is gone
===========  =======  ================================================================

A guest acceptor may SIGNAL 9 a worker it was attached to (its ACK watchdog), never 15:
draining is the spawning acceptor's decision.
"""

from __future__ import annotations

import json
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from handoffd import environment
from handoffd.minor import Minor
from handoffd.status import GSS_S_FAILURE, GSSError

__all__ = [
    "ALLOWED_GRANT",
    "ALLOWED_NOTIFY",
    "ALLOWED_SIGNALS",
    "MAX_MESSAGE",
    "Attach",
    "Exited",
    "Guest",
    "Notify",
    "Peer",
    "SigKind",
    "Signal",
    "Spawn",
    "SpawnFailed",
    "Spawned",
    "decode",
]

MAX_MESSAGE: Final = 8192
WORKER_ID_SIZE: Final = 16
ALLOWED_GRANT: Final = frozenset({
    environment.PARKING_MODE, environment.PARKING_KEYRING, environment.PARKING_SLOTS,
    environment.PARKING_WORKER,
})
"""The only variables a SPAWN may set in the worker's environment (the grant pipe's fd
number is the supervisor's to set)."""
ALLOWED_SIGNALS: Final = frozenset({int(signal.SIGTERM), int(signal.SIGKILL)})
ALLOWED_NOTIFY: Final = frozenset({"READY", "STATUS", "WATCHDOG", "STOPPING", "RELOADING",
                                   "MONOTONIC_USEC"})
"""systemd notification keys the acceptor may send (never MAINPID, FDSTORE, ...)."""


class SigKind(IntEnum):
    """Message kinds of the supervisor link."""

    SPAWN = 1
    SPAWNED = 2
    SPAWN_FAILED = 3
    EXITED = 4
    SIGNAL = 5
    NOTIFY = 6
    PEER = 7
    ATTACH = 8
    GUEST = 9


_ID = struct.Struct(">16s")
_SPAWNED = struct.Struct(">16sII")
_FAILED = struct.Struct(">16sII")
_EXITED = struct.Struct(">16si")
_SIGNAL = struct.Struct(">16sB")
_PEER = struct.Struct(">H")


def _bad(what: str) -> GSSError:
    return GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK, what)


def _encode_grant(kind: SigKind, worker_id: bytes, grant: dict[str, str]) -> bytes:
    """``kind | worker_id (16) | grant JSON``: SPAWN's and GUEST's payload."""
    return bytes([kind]) + worker_id + json.dumps(grant, sort_keys=True).encode()


def _decode_grant(what: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    """``worker_id (16) | grant JSON``, the grant holding only :data:`ALLOWED_GRANT`."""
    if len(body) < WORKER_ID_SIZE:
        raise _bad(f"{what} too short")
    try:
        grant = json.loads(body[WORKER_ID_SIZE:])
    except (ValueError, UnicodeDecodeError):
        raise _bad(f"{what} grant is not JSON") from None
    if not isinstance(grant, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k in ALLOWED_GRANT
            and v.isprintable() and len(v) <= 128 for k, v in grant.items()):
        raise _bad(f"{what} grant holds other than HANDOFFD_PARKING_* strings")
    return body[:WORKER_ID_SIZE], grant


@dataclass(frozen=True)
class Spawn:
    """Start a worker with this id and key-parking grant."""

    worker_id: bytes
    grant: dict[str, str]

    def encode(self) -> bytes:
        return _encode_grant(SigKind.SPAWN, self.worker_id, self.grant)

    @classmethod
    def decode(cls, body: bytes) -> Spawn:
        return cls(*_decode_grant("SPAWN", body))


@dataclass(frozen=True)
class Attach:
    """Another acceptor of the set spawns this worker: answer with a :class:`Guest`."""

    worker_id: bytes

    def encode(self) -> bytes:
        return bytes([SigKind.ATTACH]) + _ID.pack(self.worker_id)

    @classmethod
    def decode(cls, body: bytes) -> Attach:
        try:
            (worker_id,) = _ID.unpack(body)
        except struct.error:
            raise _bad("ATTACH malformed") from None
        return cls(worker_id)


@dataclass(frozen=True)
class Guest:
    """This acceptor's guest channel (the fds) and key grant for an ATTACH's worker;
    an empty grant (and no fds) declines."""

    worker_id: bytes
    grant: dict[str, str]

    @property
    def declined(self) -> bool:
        return not self.grant

    def encode(self) -> bytes:
        return _encode_grant(SigKind.GUEST, self.worker_id, self.grant)

    @classmethod
    def decode(cls, body: bytes) -> Guest:
        return cls(*_decode_grant("GUEST", body))


@dataclass(frozen=True)
class Spawned:
    """The worker runs as ``pid`` under ``uid``."""

    worker_id: bytes
    pid: int
    uid: int

    def encode(self) -> bytes:
        return bytes([SigKind.SPAWNED]) + _SPAWNED.pack(self.worker_id, self.pid, self.uid)

    @classmethod
    def decode(cls, body: bytes) -> Spawned:
        try:
            return cls(*_SPAWNED.unpack(body))
        except struct.error:
            raise _bad("SPAWNED malformed") from None


@dataclass(frozen=True)
class SpawnFailed:
    """The worker could not be started; the status says why."""

    worker_id: bytes
    major: int
    minor: int
    detail: str

    def encode(self) -> bytes:
        return bytes([SigKind.SPAWN_FAILED]) + _FAILED.pack(
            self.worker_id, self.major, self.minor) + self.detail.encode()[:1024]

    @classmethod
    def decode(cls, body: bytes) -> SpawnFailed:
        try:
            worker_id, major, minor = _FAILED.unpack_from(body)
        except struct.error:
            raise _bad("SPAWN_FAILED malformed") from None
        return cls(worker_id, major, minor, body[_FAILED.size:].decode(errors="replace"))

    def error(self) -> GSSError:
        return GSSError(self.major, self.minor, self.detail)


@dataclass(frozen=True)
class Exited:
    """The worker exited with ``status`` (``-N``: killed by signal N)."""

    worker_id: bytes
    status: int

    def encode(self) -> bytes:
        return bytes([SigKind.EXITED]) + _EXITED.pack(self.worker_id, self.status)

    @classmethod
    def decode(cls, body: bytes) -> Exited:
        try:
            return cls(*_EXITED.unpack(body))
        except struct.error:
            raise _bad("EXITED malformed") from None


@dataclass(frozen=True)
class Signal:
    """Send ``signum`` (TERM or KILL) to the worker."""

    worker_id: bytes
    signum: int

    def encode(self) -> bytes:
        return bytes([SigKind.SIGNAL]) + _SIGNAL.pack(self.worker_id, self.signum)

    @classmethod
    def decode(cls, body: bytes) -> Signal:
        try:
            message = cls(*_SIGNAL.unpack(body))
        except struct.error:
            raise _bad("SIGNAL malformed") from None
        if message.signum not in ALLOWED_SIGNALS:
            raise _bad(f"SIGNAL {message.signum} is not TERM or KILL")
        return message


@dataclass(frozen=True)
class Notify:
    """systemd notification fields to forward (``KEY=VALUE`` each)."""

    fields: tuple[str, ...]

    def encode(self) -> bytes:
        return bytes([SigKind.NOTIFY]) + "\n".join(self.fields).encode()

    @classmethod
    def decode(cls, body: bytes) -> Notify:
        try:
            fields = tuple(body.decode().split("\n"))
        except UnicodeDecodeError:
            raise _bad("NOTIFY is not UTF-8") from None
        for field in fields:
            key, sep, _ = field.partition("=")
            if not sep or key not in ALLOWED_NOTIFY:
                raise _bad(f"NOTIFY field {key[:40]!r} not allowed")
        return cls(fields)


@dataclass(frozen=True)
class Peer:
    """The fd that comes with it reaches acceptor ``index`` of the same set (status)."""

    index: int

    def encode(self) -> bytes:
        return bytes([SigKind.PEER]) + _PEER.pack(self.index)

    @classmethod
    def decode(cls, body: bytes) -> Peer:
        try:
            (index,) = _PEER.unpack(body)
        except struct.error:
            raise _bad("PEER malformed") from None
        if index == 0:
            raise _bad("PEER for acceptor 0")
        return cls(index)


Message = Spawn | Spawned | SpawnFailed | Exited | Signal | Notify | Peer | Attach | Guest

_DECODERS: Final[dict[SigKind, Callable[[bytes], Message]]] = {
    SigKind.SPAWN: Spawn.decode,
    SigKind.SPAWNED: Spawned.decode,
    SigKind.SPAWN_FAILED: SpawnFailed.decode,
    SigKind.EXITED: Exited.decode,
    SigKind.SIGNAL: Signal.decode,
    SigKind.NOTIFY: Notify.decode,
    SigKind.PEER: Peer.decode,
    SigKind.ATTACH: Attach.decode,
    SigKind.GUEST: Guest.decode,
}


def decode(data: bytes) -> Message:
    """One datagram to its message; anything malformed is ``SUPERVISOR_LINK``."""
    if not data:
        raise _bad("empty message")
    try:
        kind = SigKind(data[0])
    except ValueError:
        raise _bad(f"unknown kind {data[0]}") from None
    return _DECODERS[kind](data[1:])
