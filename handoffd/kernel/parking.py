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
profile, ENOSYS under some LXC profiles; and always for external workers), in
:mod:`handoffd.kernel.parking_fallback`: the acceptor hands each worker a
32-byte secret through an inherited pipe at spawn (never argv, env or the
handoff socket); the per-handoff key is HKDF-SHA256(secret, worker id, slot,
generation); the worker remembers the highest generation claimed per slot so
a replay fails.  Weaker, and logged as such: see ``FALLBACK_WEAKNESSES``.

Slots per worker bound the handoffs in flight per worker: that is the
daemon's backpressure, and ``park`` answers ``PARKING_SLOTS_EXHAUSTED`` beyond it.

Each mode is a strategy (the interfaces are in
:mod:`handoffd.kernel.parking_strategy`), chosen once: :meth:`AcceptorParking.open`
picks an ``AcceptorStrategy``, which makes each worker's ``WorkerSlots``, and
:meth:`WorkerParking.adopt` a ``ClaimStrategy``; no method branches on the mode.
The slot bookkeeping both modes share (generations, free slots, slots in flight)
is :class:`AcceptorParking`'s.  This module is the public API (the shared names
are re-exported from here) and the keyring strategy.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Final

from handoffd.kernel import keyring
from handoffd.kernel.parking_fallback import (
    FALLBACK_WEAKNESSES,
    FallbackAcceptor,
    FallbackClaims,
    warn_fallback,
)
from handoffd.kernel.parking_strategy import (
    ENV_FD,
    ENV_KEYRING,
    ENV_MODE,
    ENV_SLOTS,
    ENV_WORKER,
    FALLBACK,
    KEY_SIZE,
    KEYRING,
    REF,
    REF_KEYRING,
    AcceptorStrategy,
    ClaimStrategy,
    WorkerGrant,
    WorkerSlots,
    bad_ref,
    claimed_error,
    not_in_flight,
)
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_CALL_BAD_STRUCTURE,
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
    "KEYRING",
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

WORKER_ID_SIZE: Final = 16
MAX_SLOTS: Final = 1024

# --- keyring slot payloads --------------------------------------------------------------------

_PAYLOAD: Final = struct.Struct(">BQ32s")  # state | generation | key
_BURNED: Final = 0
_ARMED: Final = 1
_ZERO_KEY: Final = bytes(KEY_SIZE)
_PERMISSIONS: Final = keyring.KEY_POS_ALL  # possessor only: no user/group/other bits


REQUESTED_REASON: Final = ('mode "fallback" requested: [workers] keyring = "fallback", or the '
                           "parking for external workers, which is always fallback")
"""The fallback WARNING's reason when the caller of :meth:`AcceptorParking.open` gave none."""

EXTERNAL_WORKERS_REASON: Final = ("external workers ([workers] register_socket) cannot inherit "
                                  "a keyring, so their keys are always derived in fallback "
                                  "mode, whatever [workers] keyring says")
"""The reason to pass for the parking of external workers."""


def _check_worker_id(worker_id: bytes) -> None:
    if len(worker_id) != WORKER_ID_SIZE:
        raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.KEYRING_BAD_ARGUMENT,
                       "worker id must be 16 bytes")


def _quietly(operation: Callable[[], None]) -> None:
    """Run a clean-up step; a key that is already gone or revoked is fine."""
    try:
        operation()
    except GSSError as error:
        _cleanup_failed(error)


def _cleanup_failed(error: GSSError) -> None:
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


# --- keyring mode ------------------------------------------------------------------------------


class _KeyringSlots(WorkerSlots):
    """A worker keyring ``W`` holding one user key per slot, payloads replaced."""

    __slots__ = ("keyring", "parent", "process", "random", "serials", "session")

    def __init__(self, serials: list[int], ring: int, session: int, process: int,
                 random: Callable[[int], bytes]) -> None:
        super().__init__(len(serials))
        self.serials = serials
        self.keyring = ring
        self.parent = session  # the keyring W is linked in: the session, then the process's
        self.session = session
        self.process = process
        self.random = random

    def arm(self, index: int, generation: int) -> tuple[bytes, bytes]:
        key = self.random(KEY_SIZE)
        if len(key) != KEY_SIZE:
            raise GSSError(GSS_S_FAILURE, Minor.KEYRING_FAILED, "random source short")
        serial = self.serials[index]
        keyring.update(serial, _PAYLOAD.pack(_ARMED, generation, key))
        return REF.pack(REF_KEYRING, serial, generation), key

    def slot_of(self, key_ref: bytes) -> int:
        try:
            tag, serial, generation = REF.unpack(key_ref)
        except struct.error:
            raise bad_ref() from None
        if tag != REF_KEYRING:
            raise bad_ref()
        try:
            index = self.serials.index(serial)
        except ValueError:
            raise bad_ref() from None
        if self.in_flight.get(index) != generation:
            raise not_in_flight()
        return index

    def release(self, key_ref: bytes) -> int:
        index = self.slot_of(key_ref)
        # Burn even if the worker already did: a token never acked stays useless.
        try:
            keyring.update(self.serials[index],
                           _PAYLOAD.pack(_BURNED, self.generations[index], _ZERO_KEY))
        except GSSError as error:
            _cleanup_failed(error)
        return index

    def adopted(self) -> None:
        if self.parent == self.session:
            keyring.move(self.keyring, self.session, self.process)
            self.parent = self.process

    def claimed(self, key_ref: bytes) -> bool | None:
        try:
            index = self.slot_of(key_ref)
            payload = keyring.read(self.serials[index], size_hint=_PAYLOAD.size)
            state, generation, _ = _PAYLOAD.unpack(payload)
        except (GSSError, struct.error):
            return None
        return bool(state == _BURNED and generation == self.generations[index])

    def destroy(self) -> None:
        for serial in self.serials:
            _quietly(partial(keyring.revoke, serial))
            _quietly(partial(keyring.unlink, serial, self.keyring))
        _destroy_keyring(self.keyring, self.parent)


class _KeyringAcceptor(AcceptorStrategy):
    """The acceptor's side: a worker keyring with its slot keys, linked into ``S``."""

    mode = KEYRING

    def __init__(self, session: int, process: int, random: Callable[[int], bytes]) -> None:
        self._session = session
        self._process = process
        self._random = random

    def add_worker(self, worker_id: bytes, n: int,
                   env: dict[str, str]) -> tuple[WorkerSlots, WorkerGrant]:
        # The acceptor's pid in the name: with several acceptors each makes a keyring for
        # every worker in the one session keyring, and add_key with a name already linked
        # there would displace the other acceptor's keyring from it.
        ring = keyring.add_keyring(f"hd:{worker_id.hex()}:{os.getpid()}", self._session)
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
        env[ENV_KEYRING] = str(ring)
        return (_KeyringSlots(slots, ring, self._session, self._process, self._random),
                WorkerGrant(env, ()))


class _KeyringClaims(ClaimStrategy):
    """The worker's side: read a slot and burn it before the key is returned."""

    __slots__ = ("_slots",)

    @classmethod
    def take_grant(cls, environ: Mapping[str, str], n: int) -> tuple[list[int], bytes]:
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
        members = keyring.keyring_members(ring)
        if len(members) != n:
            raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_FAILED,
                           "worker keyring does not hold the granted slots")
        return members, b""

    def __init__(self, worker_id: bytes, slots: list[int], secret: bytes) -> None:
        self._slots = slots  # slot key serials

    def claim(self, key_ref: bytes) -> bytes:
        try:
            tag, where, generation = REF.unpack(key_ref)
        except struct.error:
            raise bad_ref() from None
        if tag != REF_KEYRING or where not in self._slots:
            raise bad_ref()
        try:
            payload = keyring.read(where, size_hint=_PAYLOAD.size)  # one keyctl, not two
            state, parked_generation, key = _PAYLOAD.unpack(payload)
        except struct.error:
            raise GSSError(GSS_S_FAILURE, Minor.KEYRING_FAILED, "slot payload malformed") from None
        if state != _ARMED or parked_generation != generation:
            raise claimed_error()
        # Burn before handing the key out: if burning fails, the key is not used.
        keyring.update(where, _PAYLOAD.pack(_BURNED, generation, _ZERO_KEY))
        return bytes(key)


_CLAIMS: Final[Mapping[str, type[ClaimStrategy]]] = {KEYRING: _KeyringClaims,
                                                     FALLBACK: FallbackClaims}


# --- the acceptor side ------------------------------------------------------------------------


class AcceptorParking:
    """The acceptor's side of key parking: per-worker slots, park and release.

    Not thread-safe; call it from one thread (the trio thread).  In keyring mode
    the worker keyrings are reachable only from keyrings of the thread that
    called :meth:`open` (session) and of this process (process keyring).
    """

    def __init__(self, strategy: AcceptorStrategy, slots_per_worker: int) -> None:
        self.mode = strategy.mode
        self._strategy = strategy
        self._slots_per_worker = slots_per_worker
        self._workers: dict[bytes, WorkerSlots] = {}
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
            warn_fallback("acceptor", reason or REQUESTED_REASON)
            return cls(FallbackAcceptor(random), slots_per_worker)
        status = keyring.probe()
        if status is keyring.KeyringStatus.QUOTA:
            raise GSSError(GSS_S_UNAVAILABLE, Minor.KEYRING_QUOTA,
                           "key parking: the key quota is exhausted")
        if status is not keyring.KeyringStatus.AVAILABLE:
            if mode == KEYRING:
                minor = (Minor.KEYRING_DENIED if status is keyring.KeyringStatus.DENIED
                         else Minor.KEYRING_UNAVAILABLE)
                raise GSSError(GSS_S_UNAVAILABLE, minor, f"key parking: keyring {status.value}")
            warn_fallback("acceptor", f"keyctl {status.value}")
            return cls(FallbackAcceptor(random), slots_per_worker)
        session = _acceptor_session_keyring(join_session)
        process = keyring.get_keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING, create=True)
        return cls(_KeyringAcceptor(session, process, random), slots_per_worker)

    def _worker(self, worker_id: bytes) -> WorkerSlots:
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
        slots, grant = self._strategy.add_worker(worker_id, n, env)
        self._workers[worker_id] = slots
        return grant

    def worker_adopted(self, worker_id: bytes) -> None:
        """The worker has adopted its grant: take its keyring out of the session keyring.

        Workers spawned from now on inherit the session keyring without it.
        """
        self._worker(worker_id).adopted()

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
        parked = w.arm(index, generation)
        w.free.pop()
        w.generations[index] = generation
        w.in_flight[index] = generation
        return parked

    def release(self, worker_id: bytes, key_ref: bytes) -> None:
        """Make the slot behind ``key_ref`` reusable, burning it (acked or redelivered).

        A worker that was already removed is a no-op (its slots are gone).
        """
        w = self._workers.get(worker_id)
        if w is None:
            return
        index = w.release(key_ref)
        del w.in_flight[index]
        w.free.append(index)

    def claimed(self, worker_id: bytes, key_ref: bytes) -> bool | None:
        """Whether the worker burned the slot behind ``key_ref`` (its claim), as the
        slot reads now; None in fallback mode, where a claim leaves no trace here.

        Only an honest worker burns what it claims: a compromised one can read the key
        and leave the slot armed, so False does not prove the token was never opened.
        """
        w = self._workers.get(worker_id)
        return None if w is None else w.claimed(key_ref)

    def remove_worker(self, worker_id: bytes) -> None:
        """The worker is gone: revoke and unlink its slots and keyring (idempotent)."""
        w = self._workers.pop(worker_id, None)
        if w is not None:
            w.destroy()

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

    Every acceptor of a set parks keys for every worker (the shared pool), all on the
    one acceptor uid.  Measured on 6.18 (docs/PRIVSEP.md): per acceptor one key for its
    process keyring, per worker a keyring (~48 bytes with its description, which names
    the worker and the acceptor's pid) and per slot a 41-byte payload, its description
    and a link (~51 bytes); rounded up.
    """
    return (acceptors * (1 + workers * (slots + 1)),
            acceptors * (5 + workers * (48 + 51 * slots)))


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


# --- the worker side ---------------------------------------------------------------------------


class WorkerParking:
    """The worker's side: claim the key behind a ``key_ref``, exactly once."""

    def __init__(self, mode: str, worker_id: bytes, slots: list[int], secret: bytes) -> None:
        self.mode = mode
        self._claim = _CLAIMS[mode](worker_id, slots, secret).claim

    @classmethod
    def adopt(cls, environ: Mapping[str, str], *, leave_session: bool = True) -> WorkerParking:
        """Take over the grant at worker start, before any untrusted code runs.

        Keyring mode: link the worker keyring into this process's keyring, then
        join a fresh session keyring (dropping the acceptor's and the siblings'
        keys; not with ``leave_session=False``: :meth:`adopt_all` does it after the
        last grant).  Fallback mode: read the secret from the inherited pipe, close it.
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
        strategy = _CLAIMS.get(mode)
        if strategy is None:
            raise GSSError(GSS_S_NO_CRED, Minor.KEYRING_BAD_ARGUMENT, "bad key parking mode")
        parking = cls(mode, worker_id, *strategy.take_grant(environ, slots))
        if leave_session and mode == KEYRING:
            keyring.join_session_keyring(None)
        return parking

    @classmethod
    def adopt_all(cls, environs: Sequence[Mapping[str, str]]) -> list[WorkerParking]:
        """:meth:`adopt` each grant of a worker in the shared pool (one per acceptor that
        feeds it), leaving the acceptors' session keyring only after the last: each
        worker keyring must be linked in while it is still possessed through it."""
        adopted = [cls.adopt(environ, leave_session=False) for environ in environs]
        if any(parking.mode == KEYRING for parking in adopted):
            keyring.join_session_keyring(None)
        return adopted

    def claim(self, key_ref: bytes) -> bytes:
        """The key behind ``key_ref``, burned as it is read: a second claim fails.

        Raises ``GSSError(GSS_S_DEFECTIVE_TOKEN, PARKING_KEY_CLAIMED)`` for a
        replayed or stale reference, ``PARKING_BAD_REFERENCE`` for a malformed one or
        one naming no slot of this worker (foreign); keyring errors as they come.
        """
        return self._claim(key_ref)
