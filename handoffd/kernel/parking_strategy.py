"""What a key parking mode implements, and what the modes share.

Key parking (:mod:`handoffd.kernel.parking`) has two modes: the kernel keyring
(``KEYRING``, in :mod:`~handoffd.kernel.parking`) and the weaker fallback
(``FALLBACK``, in :mod:`handoffd.kernel.parking_fallback`).  Each is a strategy,
chosen once by ``AcceptorParking.open`` and ``WorkerParking.adopt``; this module is
the contract between them and the parking that uses them:

* :class:`AcceptorStrategy`: the acceptor's side of a mode, which makes each
  worker's :class:`WorkerSlots` and its :class:`WorkerGrant`;
* :class:`WorkerSlots`: one worker's slots as the acceptor keeps them (arm, find,
  burn, destroy), with the bookkeeping both modes share;
* :class:`ClaimStrategy`: the worker's side (adopt the grant, claim keys).

and what both modes put on the wire or in the worker's environment: the
``key_ref`` format and its errors, the grant's environment names.  Each hot-path
call (park, claim, release) is one method call on a strategy.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

from handoffd import environment
from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE, GSSError

KEY_SIZE: Final = 32

KEYRING: Final = "keyring"
FALLBACK: Final = "fallback"

# The grant's environment (never argv; the fallback secret itself goes through a pipe).
ENV_MODE: Final = environment.PARKING_MODE
ENV_KEYRING: Final = environment.PARKING_KEYRING
ENV_FD: Final = environment.PARKING_FD
ENV_SLOTS: Final = environment.PARKING_SLOTS
ENV_WORKER: Final = environment.PARKING_WORKER

# --- key references -------------------------------------------------------------------------

REF: Final = struct.Struct(">cIQ")  # mode tag | slot serial or index | generation
REF_KEYRING: Final = b"K"  # slot: the slot key's serial
REF_FALLBACK: Final = b"F"  # slot: its index


def bad_ref() -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.PARKING_BAD_REFERENCE, "malformed key reference")


def claimed_error() -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.PARKING_KEY_CLAIMED)


def not_in_flight() -> GSSError:
    return GSSError(GSS_S_FAILURE, Minor.PARKING_KEY_CLAIMED,
                    "key parking: release of a slot not in flight")


# --- the strategies -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerGrant:
    """What the supervisor gives a worker it spawns: extra environment and fds to pass.

    The supervisor closes ``pass_fds`` in its own process once the worker is spawned.
    """

    env: dict[str, str]
    pass_fds: tuple[int, ...]


class WorkerSlots(ABC):
    """One worker's key slots, as the acceptor keeps them.

    The bookkeeping is the same in every mode: a generation per slot, the free slots
    (indexes, used as a stack) and the slots in flight (index -> generation);
    ``AcceptorParking`` keeps it.  What a slot *is* - a key in the kernel, or a
    number a key is derived from - is the subclass's.
    """

    __slots__ = ("free", "generations", "in_flight")

    def __init__(self, n: int) -> None:
        self.generations = [0] * n
        self.free = list(range(n - 1, -1, -1))
        self.in_flight: dict[int, int] = {}

    @abstractmethod
    def arm(self, index: int, generation: int) -> tuple[bytes, bytes]:
        """Park a fresh key in slot ``index`` as ``generation``: ``(key_ref, key)``."""

    @abstractmethod
    def slot_of(self, key_ref: bytes) -> int:
        """The index of the slot in flight that ``key_ref`` names.

        ``PARKING_BAD_REFERENCE`` for a malformed reference or one naming no slot of
        this worker; ``GSS_S_FAILURE`` / ``PARKING_KEY_CLAIMED`` for a slot not in flight.
        """

    @abstractmethod
    def release(self, key_ref: bytes) -> int:
        """:meth:`slot_of`, burning the slot where the mode keeps one."""

    @abstractmethod
    def adopted(self) -> None:
        """The worker has adopted its grant (see ``AcceptorParking.worker_adopted``)."""

    @abstractmethod
    def claimed(self, key_ref: bytes) -> bool | None:
        """See ``AcceptorParking.claimed``."""

    @abstractmethod
    def destroy(self) -> None:
        """The worker is gone: give back what its slots hold (called once)."""


class AcceptorStrategy(ABC):
    """The acceptor's side of one mode: make a worker's slots and its grant."""

    mode: ClassVar[str]

    @abstractmethod
    def add_worker(self, worker_id: bytes, n: int,
                   env: dict[str, str]) -> tuple[WorkerSlots, WorkerGrant]:
        """Create ``n`` slots for the worker; the grant is ``env`` plus what this mode adds."""


class ClaimStrategy(ABC):
    """The worker's side of one mode: take the grant at start, then claim keys."""

    __slots__ = ()

    @classmethod
    @abstractmethod
    def take_grant(cls, environ: Mapping[str, str], n: int) -> tuple[list[int], bytes]:
        """Adopt the grant of ``n`` slots in ``environ``: ``(slots, secret)`` to construct with."""

    @abstractmethod
    def __init__(self, worker_id: bytes, slots: list[int], secret: bytes) -> None:
        """``slots``: slot key serials (keyring) or indexes (fallback); ``secret``: fallback's."""

    @abstractmethod
    def claim(self, key_ref: bytes) -> bytes:
        """See ``WorkerParking.claim``."""
