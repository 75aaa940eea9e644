"""Key parking's fallback mode, for where ``keyctl`` is refused: keys derived from a secret.

EPERM under Docker's default seccomp profile, ENOSYS under some LXC profiles, and
always for external workers (they cannot inherit a keyring).  The acceptor hands
each worker a 32-byte secret through an inherited pipe at spawn (never argv, env
or the handoff socket: the environment carries only the pipe's fd number,
``ENV_FD``); the per-handoff key is HKDF-SHA256(secret, info = ``"handoffd
parking v1" | worker id | slot (u32) | generation (u64)``) and ``key_ref`` =
``b"F" | slot | generation``.  The worker remembers the highest generation
claimed per slot, so a replay or an older reference fails with
``PARKING_KEY_CLAIMED``; a token for another worker derives a different key.

Weaker than the keyring, and logged as such (one WARNING on ``handoffd.keyring``
in the acceptor at open and in each worker at adopt): see
:data:`FALLBACK_WEAKNESSES`.  The acceptor cannot see a claim in this mode.
The strategy interfaces are :mod:`handoffd.kernel.parking_strategy`'s; the
keyring mode and the public API are :mod:`handoffd.kernel.parking`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Callable, Mapping
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from handoffd.kernel.parking_strategy import (
    ENV_FD,
    FALLBACK,
    KEY_SIZE,
    REF,
    REF_FALLBACK,
    AcceptorStrategy,
    ClaimStrategy,
    WorkerGrant,
    WorkerSlots,
    bad_ref,
    claimed_error,
    not_in_flight,
)
from handoffd.minor import Minor
from handoffd.status import GSS_S_FAILURE, GSS_S_NO_CRED, GSS_S_UNAVAILABLE, GSSError

log = logging.getLogger("handoffd.keyring")

FALLBACK_WEAKNESSES: Final = (
    "the per-worker secret lives in process memory for the worker's lifetime "
    "(swappable, in core dumps, readable by same-uid ptrace or /proc/PID/mem) and derives "
    "every handoff key of that worker, past and future"
)

_HKDF_INFO: Final = b"handoffd parking v1"


def warn_fallback(side: str, reason: str) -> None:
    """The one WARNING a side (``acceptor`` or ``worker``) logs when it parks in fallback."""
    log.warning("key parking in fallback mode (%s, %s, minor %d %s): %s", side, reason,
                Minor.PARKING_FALLBACK_MODE, Minor.PARKING_FALLBACK_MODE.name,
                FALLBACK_WEAKNESSES)


def _derive(secret: bytes, worker_id: bytes, slot: int, generation: int) -> bytes:
    info = _HKDF_INFO + worker_id + struct.pack(">IQ", slot, generation)
    return HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=info).derive(secret)


class FallbackSlots(WorkerSlots):
    """Slot numbers only: each key is derived from the worker's secret, nothing is kept."""

    __slots__ = ("secret", "worker_id")

    def __init__(self, worker_id: bytes, n: int, secret: bytes) -> None:
        super().__init__(n)
        self.worker_id = worker_id
        self.secret = secret

    def arm(self, index: int, generation: int) -> tuple[bytes, bytes]:
        return (REF.pack(REF_FALLBACK, index, generation),
                _derive(self.secret, self.worker_id, index, generation))

    def slot_of(self, key_ref: bytes) -> int:
        try:
            tag, where, generation = REF.unpack(key_ref)
        except struct.error:
            raise bad_ref() from None
        if tag != REF_FALLBACK:
            raise bad_ref()
        index = int(where)
        if self.in_flight.get(index) != generation:
            raise not_in_flight()
        return index

    release = slot_of  # nothing to burn: the key exists only where it was derived

    def adopted(self) -> None:
        pass  # nothing of the acceptor's is inherited

    def claimed(self, key_ref: bytes) -> bool | None:
        return None  # a claim leaves no trace here

    def destroy(self) -> None:
        pass  # nothing in the kernel; the secret goes with this object


class FallbackAcceptor(AcceptorStrategy):
    """The acceptor's side: a fresh secret per worker, handed over through a pipe."""

    mode = FALLBACK

    def __init__(self, random: Callable[[int], bytes]) -> None:
        self._random = random

    def add_worker(self, worker_id: bytes, n: int,
                   env: dict[str, str]) -> tuple[WorkerSlots, WorkerGrant]:
        secret = self._random(KEY_SIZE)
        if len(secret) != KEY_SIZE:
            raise GSSError(GSS_S_FAILURE, Minor.KEYRING_FAILED, "random source short")
        try:
            read_end, write_end = os.pipe()  # both O_CLOEXEC; pass_fds clears it in the child
        except OSError as error:  # EMFILE/ENFILE: the caller refuses this worker, stays up
            raise GSSError(GSS_S_UNAVAILABLE, Minor.KEYRING_FAILED,
                           f"grant pipe: {error.strerror}") from None
        try:
            os.write(write_end, secret)  # 32 bytes < PIPE_BUF: one atomic write
        except OSError as error:
            os.close(read_end)
            raise GSSError(GSS_S_FAILURE, Minor.KEYRING_FAILED,
                           f"grant pipe: {error.strerror}") from None
        finally:
            os.close(write_end)
        env[ENV_FD] = str(read_end)
        return FallbackSlots(worker_id, n, secret), WorkerGrant(env, (read_end,))


class FallbackClaims(ClaimStrategy):
    """The worker's side: derive each key, at most once per slot and generation."""

    __slots__ = ("_claimed_generation", "_secret", "_worker_id")

    @classmethod
    def take_grant(cls, environ: Mapping[str, str], n: int) -> tuple[list[int], bytes]:
        return list(range(n)), _read_grant_fd(environ)

    def __init__(self, worker_id: bytes, slots: list[int], secret: bytes) -> None:
        self._worker_id = worker_id
        self._secret = secret
        self._claimed_generation = [0] * len(slots)  # per slot index

    def claim(self, key_ref: bytes) -> bytes:
        try:
            tag, where, generation = REF.unpack(key_ref)
        except struct.error:
            raise bad_ref() from None
        if tag != REF_FALLBACK or not 0 <= where < len(self._claimed_generation):
            raise bad_ref()
        if generation <= self._claimed_generation[where]:
            raise claimed_error()
        self._claimed_generation[where] = generation
        return _derive(self._secret, self._worker_id, where, generation)


def _read_grant_fd(environ: Mapping[str, str]) -> bytes:
    try:
        fd = int(environ[ENV_FD])
    except (KeyError, ValueError):
        raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_BAD_ARGUMENT,
                       "key parking fd missing from the environment") from None
    secret = b""
    try:
        while len(secret) < KEY_SIZE:
            chunk = os.read(fd, KEY_SIZE - len(secret))
            if not chunk:
                break
            secret += chunk
    except OSError as error:
        raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_FAILED,
                       f"key parking fd: {error.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if len(secret) != KEY_SIZE:
        raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_FAILED, "key parking fd: short secret")
    warn_fallback("worker", "granted by the acceptor")
    return secret
