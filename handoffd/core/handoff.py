"""Messages of the acceptor-worker handoff protocol (payloads of channel messages).

The channel (``handoffd.kernel.channel``) frames each message and carries the
fd; this module defines what the payload of each message kind holds, byte for
byte (see ``docs/HANDOFF.md``).  All integers are big-endian.

=========  =========  ====================================================
kind       direction  payload
=========  =========  ====================================================
HELLO      W -> A     worker_id (16) | pid (u32)
HANDOFF    A -> W     handoff_id (u64) | ref_len (u8) | key_ref | sealed   + 1 fd
ACK        W -> A     handoff_id (u64) | major (u32) | minor (u32)
DRAINING   W -> A     (empty)  the worker takes no more handoffs
DRAINED    A -> W     (empty)  no more handoffs will be sent
REGISTERED A -> W     worker_id (16) | grant (JSON object of strings)    + 1 fd
REFUSED    A -> W     major (u32) | minor (u32)
SESSION_END W -> A    handoff_id (u64) | outcome (u8) | major (u32) | minor (u32)
HANDOFF_BATCH A -> W  count (u8) | count x (length (u32) | HANDOFF payload)  + count fds
ACK_BATCH  W -> A     count (u8) | count x ACK payload (16)
=========  =========  ====================================================

A batch is what the acceptor sends when more than one handoff is ready for one worker at
the same moment (under load): one datagram, one wake-up and one sender check for all,
the i-th fd belonging to the i-th HANDOFF; the worker answers a batch with one ACK_BATCH
(the verdict on each, in the same order) before it touches any of the connections.

REGISTERED and REFUSED answer an external worker that connected to the
registration socket; the fd of REGISTERED is the read end of a pipe holding
the worker's key-derivation secret (never the secret itself on the socket).

An ACK with major 0 means "imported; the acceptor may forget its copy".  A
non-zero major means the worker refused the handoff (it closed its fd); the
acceptor closes the connection and logs the status.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE, GSSError

WORKER_ID_SIZE: Final = 16
MAX_KEY_REF: Final = 255


class Kind(IntEnum):
    """Channel message kinds of the handoff protocol."""

    HELLO = 1
    HANDOFF = 2
    ACK = 3
    DRAINING = 4
    DRAINED = 5
    REGISTERED = 6
    REFUSED = 7
    SESSION_END = 8
    HANDOFF_BATCH = 9
    ACK_BATCH = 10


class Outcome(IntEnum):
    """How a session a worker served ended (SESSION_END)."""

    CLOSED = 0  # the app returned; CLOSE sent
    APP_ERROR = 1  # the app raised; the client got ERROR APP_FAILED
    PEER_ERROR = 2  # the client's bytes, a GSS failure or a lost connection ended it
    CUT_AT_DRAIN = 3  # still open at [workers] drain_timeout; the client got ERROR


FD_KINDS: Final = frozenset({Kind.HANDOFF, Kind.REGISTERED})
"""Kinds whose messages carry exactly one fd (the client connection, the grant pipe)."""

BATCH_KINDS: Final = frozenset({Kind.HANDOFF_BATCH})
"""Kinds whose messages carry one fd per entry (the channel's ``batch_kinds``)."""

MAX_BATCH: Final = 64
"""Handoffs in one batch at most (the channel's ``MAX_BATCH_FDS``)."""

_HELLO = struct.Struct(">16sI")
_HANDOFF_HEAD = struct.Struct(">QB")
_ACK = struct.Struct(">QII")
_SESSION_END = struct.Struct(">QBII")
_COUNT = struct.Struct(">B")
_ENTRY = struct.Struct(">I")


def _defective(what: str) -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.CHANNEL_BAD_PAYLOAD, what)


@dataclass(frozen=True)
class Hello:
    """A worker announces itself: its id (from its grant) and its pid."""

    worker_id: bytes
    pid: int

    def encode(self) -> bytes:
        """The payload bytes (layout in the module docstring)."""
        return _HELLO.pack(self.worker_id, self.pid)

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        """Parse a payload strictly; a malformed one is ``GSS_S_DEFECTIVE_TOKEN``."""
        if len(payload) != _HELLO.size:
            raise _defective("HELLO payload has the wrong length")
        worker_id, pid = _HELLO.unpack(payload)
        return cls(worker_id, pid)


@dataclass(frozen=True)
class Handoff:
    """One connection for a worker: which parked key opens the sealed export."""

    handoff_id: int
    key_ref: bytes
    sealed: bytes

    def encode(self) -> bytes:
        """The payload bytes (layout in the module docstring)."""
        if len(self.key_ref) > MAX_KEY_REF:
            raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_MESSAGE_TOO_LARGE,
                           f"key_ref of {len(self.key_ref)} bytes (at most {MAX_KEY_REF})")
        return _HANDOFF_HEAD.pack(self.handoff_id, len(self.key_ref)) + self.key_ref + self.sealed

    @classmethod
    def decode(cls, payload: bytes) -> Handoff:
        """Parse a payload strictly; a malformed one is ``GSS_S_DEFECTIVE_TOKEN``."""
        if len(payload) < _HANDOFF_HEAD.size:
            raise _defective("HANDOFF payload is truncated")
        handoff_id, ref_len = _HANDOFF_HEAD.unpack_from(payload)
        end = _HANDOFF_HEAD.size + ref_len
        if len(payload) <= end:
            raise _defective("HANDOFF payload is truncated")
        return cls(handoff_id, payload[_HANDOFF_HEAD.size:end], payload[end:])


@dataclass(frozen=True)
class Ack:
    """The worker's verdict on a handoff: major 0 imported, else why it refused."""

    handoff_id: int
    major: int = 0
    minor: int = 0

    def encode(self) -> bytes:
        """The payload bytes (layout in the module docstring)."""
        return _ACK.pack(self.handoff_id, self.major, self.minor)

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        """Parse a payload strictly; a malformed one is ``GSS_S_DEFECTIVE_TOKEN``."""
        if len(payload) != _ACK.size:
            raise _defective("ACK payload has the wrong length")
        return cls(*_ACK.unpack(payload))


def encode_handoff_batch(handoffs: list[bytes]) -> bytes:
    """A HANDOFF_BATCH payload from encoded HANDOFF payloads (1 to ``MAX_BATCH``)."""
    if not 1 <= len(handoffs) <= MAX_BATCH:
        raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_MESSAGE_TOO_LARGE,
                       f"a batch of {len(handoffs)} handoffs (1 to {MAX_BATCH})")
    parts = [_COUNT.pack(len(handoffs))]
    for handoff in handoffs:
        parts += (_ENTRY.pack(len(handoff)), handoff)
    return b"".join(parts)


def batch_entry_size(handoff: bytes) -> int:
    """Bytes one encoded HANDOFF adds to a HANDOFF_BATCH payload."""
    return _ENTRY.size + len(handoff)


def decode_handoff_batch(payload: bytes, fds: int) -> list[Handoff]:
    """Parse a HANDOFF_BATCH strictly: exactly ``fds`` entries, each a good HANDOFF, and
    nothing left over; a malformed one is ``GSS_S_DEFECTIVE_TOKEN``."""
    if len(payload) < _COUNT.size:
        raise _defective("HANDOFF_BATCH payload is truncated")
    (count,) = _COUNT.unpack_from(payload)
    if count != fds:
        raise _defective(f"HANDOFF_BATCH of {count} entries carried {fds} fds")
    handoffs: list[Handoff] = []
    offset = _COUNT.size
    for _ in range(count):
        if len(payload) < offset + _ENTRY.size:
            raise _defective("HANDOFF_BATCH payload is truncated")
        (length,) = _ENTRY.unpack_from(payload, offset)
        offset += _ENTRY.size
        if len(payload) < offset + length:
            raise _defective("HANDOFF_BATCH entry is truncated")
        handoffs.append(Handoff.decode(payload[offset:offset + length]))
        offset += length
    if offset != len(payload):
        raise _defective("HANDOFF_BATCH payload has bytes after its last entry")
    return handoffs


def encode_ack_batch(acks: list[Ack]) -> bytes:
    """An ACK_BATCH payload: the verdicts on one batch, in its order."""
    if not 1 <= len(acks) <= MAX_BATCH:
        raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_MESSAGE_TOO_LARGE,
                       f"a batch of {len(acks)} ACKs (1 to {MAX_BATCH})")
    return _COUNT.pack(len(acks)) + b"".join(ack.encode() for ack in acks)


def decode_ack_batch(payload: bytes) -> list[Ack]:
    """Parse an ACK_BATCH strictly; a malformed one is ``GSS_S_DEFECTIVE_TOKEN``."""
    if len(payload) < _COUNT.size:
        raise _defective("ACK_BATCH payload is truncated")
    (count,) = _COUNT.unpack_from(payload)
    if not 1 <= count <= MAX_BATCH or len(payload) != _COUNT.size + count * _ACK.size:
        raise _defective("ACK_BATCH payload has the wrong length")
    return [Ack(*_ACK.unpack_from(payload, _COUNT.size + i * _ACK.size)) for i in range(count)]


@dataclass(frozen=True)
class SessionEnd:
    """A worker's report that one of its sessions ended, and how (for status and metrics)."""

    handoff_id: int
    outcome: Outcome
    major: int = 0
    minor: int = 0

    def encode(self) -> bytes:
        """The payload bytes (layout in the module docstring)."""
        return _SESSION_END.pack(self.handoff_id, self.outcome, self.major, self.minor)

    @classmethod
    def decode(cls, payload: bytes) -> SessionEnd:
        """Parse a payload strictly; a malformed one is ``GSS_S_DEFECTIVE_TOKEN``."""
        if len(payload) != _SESSION_END.size:
            raise _defective("SESSION_END payload has the wrong length")
        handoff_id, outcome, major, minor = _SESSION_END.unpack(payload)
        try:
            return cls(handoff_id, Outcome(outcome), major, minor)
        except ValueError:
            raise _defective(f"SESSION_END outcome {outcome}") from None


@dataclass(frozen=True)
class Registered:
    """The acceptor admits an external worker: its id and key grant."""

    worker_id: bytes
    grant: dict[str, str]

    def encode(self) -> bytes:
        """The payload bytes (layout in the module docstring)."""
        return self.worker_id + json.dumps(self.grant, sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Registered:
        """Parse a payload strictly; a malformed one is ``GSS_S_DEFECTIVE_TOKEN``."""
        if len(payload) <= WORKER_ID_SIZE:
            raise _defective("REGISTERED payload is truncated")
        try:
            grant = json.loads(payload[WORKER_ID_SIZE:])
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
            raise _defective("REGISTERED grant is not JSON") from None
        if not isinstance(grant, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in grant.items()
        ):
            raise _defective("REGISTERED grant is not an object of strings")
        return cls(payload[:WORKER_ID_SIZE], grant)


_REFUSED = struct.Struct(">II")


@dataclass(frozen=True)
class Refused:
    """The acceptor turns an external worker away, with the status why."""

    major: int
    minor: int

    def encode(self) -> bytes:
        """The payload bytes (layout in the module docstring)."""
        return _REFUSED.pack(self.major, self.minor)

    @classmethod
    def decode(cls, payload: bytes) -> Refused:
        """Parse a payload strictly; a malformed one is ``GSS_S_DEFECTIVE_TOKEN``."""
        if len(payload) != _REFUSED.size:
            raise _defective("REFUSED payload has the wrong length")
        return cls(*_REFUSED.unpack(payload))


def expect_empty(kind: Kind, payload: bytes) -> None:
    """DRAINING and DRAINED carry nothing; anything else is a malformed message."""
    if payload:
        raise _defective(f"{kind.name} payload must be empty")
