"""Key parking: the per-handoff key that opens a sealed token, kept out of the token.

The acceptor seals each exported context with a fresh 32-byte key and parks
that key where only the target worker can take it, once.  The token on the
handoff socket carries a *reference* (``key_ref``), never the key.

Keyring mode (the default where ``keyctl`` works) - designed from what this
kernel (6.18) measurably does, see ``docs/KEYRING.md``:

* A non-root user has 200 keys / 20,000 bytes of quota; destroyed keys give
  it back only asynchronously (~16-50 ms); ``KEYCTL_INVALIDATE`` or expiry in a
  long-lived keyring leaks link quota.  So *nothing is created per handoff*:
  each worker gets one keyring with ``slots_per_worker`` user keys of a fixed
  payload size, created once.  A handoff is three ``KEYCTL_UPDATE`` calls
  (arm in ``park``, burn in ``claim``, burn again in ``release``) and one read;
  since the payload size never changes, the quota charge never moves.
* Slot payload (41 bytes): ``state (1: 0 burned, 1 armed) | generation (u64) |
  key (32, zeros when burned)``.  ``key_ref`` = ``b"K" | slot serial (u32) |
  generation (u64)``.  A replayed token finds the slot burned (or re-armed
  with a newer generation) and fails with ``PARKING_KEY_CLAIMED``; a reference that
  is malformed or names no slot of this worker is ``PARKING_BAD_REFERENCE``.
* Possession, not uid, grants access.  All keys are possessor-only
  (``KEY_POS_ALL``, no user/group/other bits).  The acceptor joins a fresh
  session keyring ``S`` and links each new worker keyring ``W`` into it; the
  worker, spawned by fork+exec, inherits ``S`` and so possesses ``W``.  At start
  (``WorkerParking.adopt``) the worker links ``W`` into its *process* keyring
  (not inherited by anything it spawns) and joins a *fresh* session keyring:
  from then on it possesses ``W`` and nothing else of the acceptor's.  When the
  worker reports it has adopted, the acceptor *moves* ``W`` from ``S`` into its
  own process keyring, so workers spawned later never possess ``W``.
* A dead worker's slots and keyring are revoked and unlinked (``revoke`` +
  ``unlink`` returns the quota; ``invalidate`` would leak link quota).

Fallback mode (``keyctl`` refused: EPERM under Docker's default seccomp
profile, ENOSYS under some LXC profiles): the acceptor hands each worker a
32-byte secret through an inherited pipe at spawn (never argv, env or the
handoff socket); the per-handoff key is HKDF-SHA256(secret, worker id, slot,
generation); the worker remembers the highest generation claimed per slot so
a replay fails.  Weaker, and logged as such: see ``FALLBACK_WEAKNESSES``.

Slots per worker bound the handoffs in flight per worker: that is the
daemon's backpressure, and ``park`` answers ``PARKING_SLOTS_EXHAUSTED`` beyond it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from handoffd.kernel import keyring
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_CALL_BAD_STRUCTURE,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSS_S_NO_CRED,
    GSS_S_UNAVAILABLE,
    GSSError,
)

__all__ = [
    "ENV_FD",
    "ENV_KEYRING",
    "ENV_MODE",
    "ENV_SLOTS",
    "ENV_WORKER",
    "EXTERNAL_WORKERS_REASON",
    "FALLBACK",
    "FALLBACK_WEAKNESSES",
    "KEY_SIZE",
    "REQUESTED_REASON",
    "AcceptorParking",
    "WorkerGrant",
    "WorkerParking",
    "check_quota",
    "join_fresh_session_keyring",
    "quota_needed",
]

log = logging.getLogger("handoffd.keyring")

KEY_SIZE: Final = 32
WORKER_ID_SIZE: Final = 16
MAX_SLOTS: Final = 1024

ENV_MODE: Final = "HANDOFFD_PARKING_MODE"
ENV_KEYRING: Final = "HANDOFFD_PARKING_KEYRING"
ENV_FD: Final = "HANDOFFD_PARKING_FD"
ENV_SLOTS: Final = "HANDOFFD_PARKING_SLOTS"
ENV_WORKER: Final = "HANDOFFD_PARKING_WORKER"

KEYRING: Final = "keyring"
FALLBACK: Final = "fallback"

FALLBACK_WEAKNESSES: Final = (
    "the per-worker secret lives in process memory for the worker's lifetime "
    "(swappable, in core dumps, readable by same-uid ptrace or /proc/PID/mem) and derives "
    "every handoff key of that worker, past and future"
)

# --- slot payloads and references -----------------------------------------------------------

_PAYLOAD: Final = struct.Struct(">BQ32s")  # state | generation | key
_BURNED: Final = 0
_ARMED: Final = 1
_REF: Final = struct.Struct(">cIQ")  # mode tag | slot serial or index | generation
_REF_KEYRING: Final = b"K"
_REF_FALLBACK: Final = b"F"
_ZERO_KEY: Final = bytes(KEY_SIZE)
_PERMISSIONS: Final = keyring.KEY_POS_ALL  # possessor only: no user/group/other bits
_HKDF_INFO: Final = b"handoffd parking v1"


REQUESTED_REASON: Final = ('mode "fallback" requested: [workers] keyring = "fallback", or the '
                           "parking for external workers, which is always fallback")
"""The fallback WARNING's reason when the caller of :meth:`AcceptorParking.open` gave none."""

EXTERNAL_WORKERS_REASON: Final = ("external workers ([workers] register_socket) cannot inherit "
                                  "a keyring, so their keys are always derived in fallback "
                                  "mode, whatever [workers] keyring says")
"""The reason to pass for the parking of external workers."""


def _bad_ref() -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.PARKING_BAD_REFERENCE, "malformed key reference")


def _claimed() -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.PARKING_KEY_CLAIMED)


def _derive(secret: bytes, worker_id: bytes, slot: int, generation: int) -> bytes:
    info = _HKDF_INFO + worker_id + struct.pack(">IQ", slot, generation)
    return HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=info).derive(secret)


def _check_worker_id(worker_id: bytes) -> None:
    if len(worker_id) != WORKER_ID_SIZE:
        raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.KEYRING_BAD_ARGUMENT,
                       "worker id must be 16 bytes")


def _quietly(operation: Callable[[], None]) -> None:
    """Run a clean-up step; a key that is already gone or revoked is fine."""
    try:
        operation()
    except GSSError as error:
        if error.minor not in (Minor.KEYRING_KEY_NOT_FOUND, Minor.KEYRING_KEY_REVOKED,
                               Minor.KEYRING_KEY_EXPIRED):
            log.warning("key parking clean-up step failed: %s", error)


# The session keyring this process joined for the acceptor.  Session keyrings
# live in each thread's credentials: a thread started before the join keeps
# the old one, and a worker forked from such a thread would not inherit the
# worker keyrings.  Joining once per process (not once per AcceptorParking)
# keeps threads started after the first open on the right keyring.
_acceptor_session: int | None = None


def _acceptor_session_keyring(join: bool) -> int:
    global _acceptor_session
    current = keyring.get_keyring_id(keyring.KEY_SPEC_SESSION_KEYRING, create=True)
    if not join:
        # Privilege-separated: the supervisor joined a fresh session keyring and spawns
        # the workers; they inherit it, so worker keyrings must be linked into it.
        _acceptor_session = current
    elif _acceptor_session is None or current != _acceptor_session:
        _acceptor_session = join_fresh_session_keyring()
    return _acceptor_session


def join_fresh_session_keyring() -> int:
    """Join a new anonymous session keyring, possessor-only: what the processes this
    thread spawns from now on inherit (the supervisor's, or the lone acceptor's)."""
    session = keyring.join_session_keyring(None)
    keyring.setperm(session, _PERMISSIONS)
    return session


# --- the acceptor side ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerGrant:
    """What the supervisor gives a worker it spawns: extra environment and fds to pass.

    The supervisor closes ``pass_fds`` in its own process once the worker is spawned.
    """

    env: dict[str, str]
    pass_fds: tuple[int, ...]


@dataclass
class _Worker:
    worker_id: bytes
    slots: list[int]  # keyring mode: slot key serials; fallback: slot indexes
    generations: list[int]
    free: list[int]  # indexes into slots, used as a stack
    in_flight: dict[int, int] = field(default_factory=dict)  # slot index -> generation
    keyring: int = 0  # keyring mode: the worker keyring
    parent: int = 0  # keyring mode: the keyring W is linked in (session, then process)
    secret: bytes = b""  # fallback mode


class AcceptorParking:
    """The acceptor's side of key parking: per-worker slots, park and release.

    Not thread-safe; call it from one thread (the trio thread).  In keyring mode
    the worker keyrings are reachable only from keyrings of the thread that
    called :meth:`open` (session) and of this process (process keyring).
    """

    def __init__(self, mode: str, slots_per_worker: int, random: Callable[[int], bytes],
                 session: int, process: int) -> None:
        self.mode = mode
        self._slots_per_worker = slots_per_worker
        self._random = random
        self._session = session
        self._process = process
        self._workers: dict[bytes, _Worker] = {}
        self._closed = False

    @classmethod
    def open(cls, *, slots_per_worker: int, mode: str = "auto",
             random: Callable[[int], bytes] = os.urandom,
             join_session: bool = True, reason: str | None = None) -> AcceptorParking:
        """Choose the mode (``auto``, ``keyring`` or ``fallback``) and set up.

        ``auto`` uses the keyring when :func:`keyring.probe` finds it available and
        falls back (with a WARNING) when keyctl is refused (EPERM/ENOSYS); an
        exhausted quota is an error in every mode.  ``keyring`` fails rather than
        fall back.  In keyring mode the calling thread joins a fresh session keyring,
        unless ``join_session`` is False (the supervisor joined one for it).

        ``reason`` says, in the fallback WARNING, why the caller asked for
        ``fallback`` (e.g. :data:`EXTERNAL_WORKERS_REASON`); without it the warning
        says only that fallback was requested, which is true whoever asked: the
        config's ``[workers] keyring`` or the parking for external workers, which is
        fallback whatever the config says.
        """
        if not 1 <= slots_per_worker <= MAX_SLOTS:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.KEYRING_BAD_ARGUMENT,
                           f"slots_per_worker must be 1..{MAX_SLOTS}")
        if mode not in ("auto", KEYRING, FALLBACK):
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.KEYRING_BAD_ARGUMENT,
                           f"unknown key parking mode {mode!r}")
        if mode == FALLBACK:
            _warn_fallback("acceptor", reason or REQUESTED_REASON)
            return cls(FALLBACK, slots_per_worker, random, 0, 0)
        status = keyring.probe()
        if status is keyring.KeyringStatus.QUOTA:
            raise GSSError(GSS_S_UNAVAILABLE, Minor.KEYRING_QUOTA,
                           "key parking: the key quota is exhausted")
        if status is not keyring.KeyringStatus.AVAILABLE:
            if mode == KEYRING:
                minor = (Minor.KEYRING_DENIED if status is keyring.KeyringStatus.DENIED
                         else Minor.KEYRING_UNAVAILABLE)
                raise GSSError(GSS_S_UNAVAILABLE, minor, f"key parking: keyring {status.value}")
            _warn_fallback("acceptor", f"keyctl {status.value}")
            return cls(FALLBACK, slots_per_worker, random, 0, 0)
        session = _acceptor_session_keyring(join_session)
        process = keyring.get_keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING, create=True)
        return cls(KEYRING, slots_per_worker, random, session, process)

    def _worker(self, worker_id: bytes) -> _Worker:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise GSSError(GSS_S_NO_CRED, Minor.WORKER_NOT_REGISTERED,
                           "key parking: unknown worker") from None

    def add_worker(self, worker_id: bytes) -> WorkerGrant:
        """Create the slots of a worker about to be spawned; what to spawn it with."""
        _check_worker_id(worker_id)
        if self._closed:
            raise GSSError(GSS_S_UNAVAILABLE, Minor.SHUTTING_DOWN, "key parking closed")
        if worker_id in self._workers:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.KEYRING_BAD_ARGUMENT,
                           "key parking: worker id already added")
        n = self._slots_per_worker
        env = {ENV_MODE: self.mode, ENV_SLOTS: str(n), ENV_WORKER: worker_id.hex()}
        if self.mode == FALLBACK:
            return self._add_fallback_worker(worker_id, env)
        ring = keyring.add_keyring(f"hd:{worker_id.hex()}", self._session)
        try:
            keyring.setperm(ring, _PERMISSIONS)
            slots: list[int] = []
            for index in range(n):
                burned = _PAYLOAD.pack(_BURNED, 0, _ZERO_KEY)
                serial = keyring.add_key(f"hd:{index}", burned, ring)
                slots.append(serial)
                keyring.setperm(serial, _PERMISSIONS)
        except GSSError:
            _destroy_keyring(ring, self._session)
            raise
        self._workers[worker_id] = _Worker(worker_id, slots, [0] * n,
                                           list(range(n - 1, -1, -1)), keyring=ring,
                                           parent=self._session)
        env[ENV_KEYRING] = str(ring)
        return WorkerGrant(env, ())

    def _add_fallback_worker(self, worker_id: bytes, env: dict[str, str]) -> WorkerGrant:
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
        n = self._slots_per_worker
        self._workers[worker_id] = _Worker(worker_id, list(range(n)), [0] * n,
                                           list(range(n - 1, -1, -1)), secret=secret)
        env[ENV_FD] = str(read_end)
        return WorkerGrant(env, (read_end,))

    def worker_adopted(self, worker_id: bytes) -> None:
        """The worker has adopted its grant: take its keyring out of the session keyring.

        Workers spawned from now on inherit the session keyring without it.
        """
        w = self._worker(worker_id)
        if self.mode == KEYRING and w.parent == self._session:
            keyring.move(w.keyring, self._session, self._process)
            w.parent = self._process

    def park(self, worker_id: bytes) -> tuple[bytes, bytes]:
        """Arm a free slot of the worker with a fresh key: ``(key_ref, key)``.

        Raises ``GSSError(GSS_S_UNAVAILABLE, PARKING_SLOTS_EXHAUSTED)`` when every
        slot is in flight.
        """
        w = self._worker(worker_id)
        if not w.free:
            raise GSSError(GSS_S_UNAVAILABLE, Minor.PARKING_SLOTS_EXHAUSTED)
        index = w.free[-1]
        generation = w.generations[index] + 1
        if self.mode == FALLBACK:
            key = _derive(w.secret, worker_id, index, generation)
            ref = _REF.pack(_REF_FALLBACK, index, generation)
        else:
            key = self._random(KEY_SIZE)
            if len(key) != KEY_SIZE:
                raise GSSError(GSS_S_FAILURE, Minor.KEYRING_FAILED, "random source short")
            keyring.update(w.slots[index], _PAYLOAD.pack(_ARMED, generation, key))
            ref = _REF.pack(_REF_KEYRING, w.slots[index], generation)
        w.free.pop()
        w.generations[index] = generation
        w.in_flight[index] = generation
        return ref, key

    def release(self, worker_id: bytes, key_ref: bytes) -> None:
        """Make the slot behind ``key_ref`` reusable, burning it (acked or redelivered).

        A worker that was already removed is a no-op (its slots are gone).
        """
        w = self._workers.get(worker_id)
        if w is None:
            return
        index = self._slot_of(w, key_ref)
        if self.mode == KEYRING:
            # Burn even if the worker already did: a token never acked stays useless.
            _quietly(lambda: keyring.update(
                w.slots[index], _PAYLOAD.pack(_BURNED, w.generations[index], _ZERO_KEY)))
        del w.in_flight[index]
        w.free.append(index)

    def _slot_of(self, w: _Worker, key_ref: bytes) -> int:
        try:
            tag, where, generation = _REF.unpack(key_ref)
        except struct.error:
            raise _bad_ref() from None
        expected = _REF_FALLBACK if self.mode == FALLBACK else _REF_KEYRING
        if tag != expected:
            raise _bad_ref()
        if self.mode == FALLBACK:
            index = int(where)
        else:
            try:
                index = w.slots.index(where)
            except ValueError:
                raise _bad_ref() from None
        if w.in_flight.get(index) != generation:
            raise GSSError(GSS_S_FAILURE, Minor.PARKING_KEY_CLAIMED,
                           "key parking: release of a slot not in flight")
        return index

    def claimed(self, worker_id: bytes, key_ref: bytes) -> bool | None:
        """Whether the worker burned the slot behind ``key_ref`` (its claim), as the
        slot reads now; None in fallback mode, where a claim leaves no trace here.

        Only an honest worker burns what it claims: a compromised one can read the key
        and leave the slot armed, so False does not prove the token was never opened.
        """
        w = self._workers.get(worker_id)
        if w is None or self.mode == FALLBACK:
            return None
        try:
            index = self._slot_of(w, key_ref)
            payload = keyring.read(w.slots[index], size_hint=_PAYLOAD.size)
            state, generation, _ = _PAYLOAD.unpack(payload)
        except (GSSError, struct.error):
            return None
        return bool(state == _BURNED and generation == w.generations[index])

    def remove_worker(self, worker_id: bytes) -> None:
        """The worker is gone: revoke and unlink its slots and keyring (idempotent)."""
        w = self._workers.pop(worker_id, None)
        if w is None or self.mode == FALLBACK:
            return
        for serial in w.slots:
            _quietly(partial(keyring.revoke, serial))
            _quietly(partial(keyring.unlink, serial, w.keyring))
        _destroy_keyring(w.keyring, w.parent)

    def close(self) -> None:
        """Remove every worker's keys; the parking takes no new workers afterwards."""
        self._closed = True
        for worker_id in list(self._workers):
            self.remove_worker(worker_id)

    def slots_in_flight(self, worker_id: bytes) -> int:
        """How many of the worker's slots are parked and not yet released."""
        return len(self._worker(worker_id).in_flight)


def quota_needed(workers: int, slots: int, acceptors: int = 1) -> tuple[int, int]:
    """Keys and bytes of key quota ``workers`` workers with ``slots`` slots each hold.

    Measured on 6.18 (docs/PRIVSEP.md): one key for each acceptor's process keyring, per
    worker a keyring (~40 bytes with its description) and per slot a 41-byte payload,
    its description and a link (~51 bytes); rounded up.
    """
    return acceptors + workers * (slots + 1), 5 * acceptors + workers * (40 + 51 * slots)


def check_quota(workers: int, slots: int, uid: int, acceptors: int = 1) -> str | None:
    """Refuse a pool the key quota of ``uid`` cannot hold (``KEYRING_QUOTA``); return a
    warning when it cannot hold two pools at once, as a SIGHUP roll briefly needs."""
    if uid == 0:
        return None  # root's quota: 1e6 keys, 25 MB
    usage = keyring.read_key_users(uid)
    keys, nbytes = quota_needed(workers, slots, acceptors)
    advice = ("lower [workers] count or max_unacked, or raise the sysctls "
              "kernel.keys.maxkeys and kernel.keys.maxbytes")
    if usage.maxkeys and (keys > usage.maxkeys or nbytes > usage.maxbytes):
        raise GSSError(GSS_S_UNAVAILABLE, Minor.KEYRING_QUOTA,
                       f"{workers} workers with {slots} key slots need {keys} keys and "
                       f"{nbytes} bytes of uid {uid}'s key quota ({usage.maxkeys} keys, "
                       f"{usage.maxbytes} bytes): {advice}")
    rolled_keys, rolled_bytes = quota_needed(2 * workers, slots, acceptors)
    if usage.maxkeys and (rolled_keys > usage.maxkeys or rolled_bytes > usage.maxbytes):
        return (f"a SIGHUP roll holds the keys of old and new workers at once "
                f"({rolled_keys} keys, {rolled_bytes} bytes), more than uid {uid}'s quota "
                f"({usage.maxkeys}, {usage.maxbytes}): new workers may wait for "
                f"quota; {advice}")
    return None


def _destroy_keyring(ring: int, parent: int) -> None:
    _quietly(lambda: keyring.revoke(ring))
    _quietly(lambda: keyring.unlink(ring, parent))


def _warn_fallback(side: str, reason: str) -> None:
    log.warning("key parking in fallback mode (%s, %s, minor %d %s): %s", side, reason,
                Minor.PARKING_FALLBACK_MODE, Minor.PARKING_FALLBACK_MODE.name,
                FALLBACK_WEAKNESSES)


# --- the worker side ---------------------------------------------------------------------------


class WorkerParking:
    """The worker's side: claim the key behind a ``key_ref``, exactly once."""

    def __init__(self, mode: str, worker_id: bytes, slots: list[int], secret: bytes) -> None:
        self.mode = mode
        self._worker_id = worker_id
        self._slots = slots  # keyring: slot serials; fallback: slot count in a list of indexes
        self._secret = secret
        self._claimed_generation = [0] * len(slots)

    @classmethod
    def adopt(cls, environ: Mapping[str, str]) -> WorkerParking:
        """Take over the grant at worker start, before any untrusted code runs.

        Keyring mode: link the worker keyring into this process's keyring, then
        join a fresh session keyring (dropping the acceptor's and the siblings'
        keys).  Fallback mode: read the secret from the inherited pipe, close it.
        """
        try:
            mode = environ[ENV_MODE]
            slots = int(environ[ENV_SLOTS])
            worker_id = bytes.fromhex(environ[ENV_WORKER])
        except (KeyError, ValueError):
            raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_BAD_ARGUMENT,
                           "key parking grant missing from the environment") from None
        if not 1 <= slots <= MAX_SLOTS or len(worker_id) != WORKER_ID_SIZE:
            raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_BAD_ARGUMENT, "bad key parking grant")
        if mode == FALLBACK:
            return cls(FALLBACK, worker_id, list(range(slots)), _read_grant_fd(environ))
        if mode != KEYRING:
            raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_BAD_ARGUMENT, "bad key parking mode")
        try:
            ring = int(environ[ENV_KEYRING])
        except (KeyError, ValueError):
            raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_BAD_ARGUMENT,
                           "key parking keyring missing from the environment") from None
        try:
            keyring.link(ring, keyring.KEY_SPEC_PROCESS_KEYRING)
        except GSSError as error:
            raise GSSError(error.major, error.minor,
                           f"{error.detail} (is the worker keyring possessed? the worker must "
                           "be spawned by a thread that shares the acceptor's session "
                           "keyring)") from None
        keyring.join_session_keyring(None)
        members = keyring.keyring_members(ring)
        if len(members) != slots:
            raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_FAILED,
                           "worker keyring does not hold the granted slots")
        return cls(KEYRING, worker_id, members, b"")

    def claim(self, key_ref: bytes) -> bytes:
        """The key behind ``key_ref``, burned as it is read: a second claim fails.

        Raises ``GSSError(GSS_S_DEFECTIVE_TOKEN, PARKING_KEY_CLAIMED)`` for a
        replayed or stale reference, ``PARKING_BAD_REFERENCE`` for a malformed one or
        one naming no slot of this worker (foreign); keyring errors as they come.
        """
        try:
            tag, where, generation = _REF.unpack(key_ref)
        except struct.error:
            raise _bad_ref() from None
        if self.mode == FALLBACK:
            if tag != _REF_FALLBACK or not 0 <= where < len(self._slots):
                raise _bad_ref()
            if generation <= self._claimed_generation[where]:
                raise _claimed()
            self._claimed_generation[where] = generation
            return _derive(self._secret, self._worker_id, where, generation)
        if tag != _REF_KEYRING or where not in self._slots:
            raise _bad_ref()
        try:
            payload = keyring.read(where, size_hint=_PAYLOAD.size)  # one keyctl, not two
            state, parked_generation, key = _PAYLOAD.unpack(payload)
        except struct.error:
            raise GSSError(GSS_S_FAILURE, Minor.KEYRING_FAILED, "slot payload malformed") from None
        if state != _ARMED or parked_generation != generation:
            raise _claimed()
        # Burn before handing the key out: if burning fails, the key is not used.
        keyring.update(where, _PAYLOAD.pack(_BURNED, generation, _ZERO_KEY))
        return bytes(key)


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
    _warn_fallback("worker", "granted by the acceptor")
    return secret
