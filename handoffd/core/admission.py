"""Who gets a handshake slot: per-source caps and eviction of stalled handshakes (pure).

The acceptor has ``max_handshakes`` slots; a connection holds one from ``accept()``
until a worker takes it.  Without more rules one address can take them all and keep
them (slowloris).  So:

* a **source** is an address truncated to a prefix (IPv4 /32, IPv6 /64 by default:
  what one host usually has);
* while slots are free, anyone gets one: a busy client behind one address (a NAT, a
  load test) is not limited while nobody else needs the room;
* when every slot is taken, a source already holding ``per_source`` slots is refused
  at once; anyone else **evicts** a holder: first one of a source over its share,
  then whoever has gone longest without progress: first any that never sent a whole
  first token (oldest first), else the handshake waiting longest for its client's
  next token.  Finished handshakes waiting for a worker are never evicted (their
  client did everything right; ``[workers] wait_timeout`` bounds them);
* only when every slot holds a finished handshake is there nothing to evict: then
  :meth:`Admission.full` is true and the acceptor stops accepting (the kernel's listen
  backlog holds newcomers) until a slot frees.

This module keeps the table only; the acceptor closes what it refuses and cancels
what it evicts.  Time comes from the caller, so tests drive it.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Admission", "Slot", "SourceFull", "Stage", "source_of"]


class Stage(enum.IntEnum):
    """How far a connection got; the lower, the sooner it is evicted."""

    FIRST_TOKEN = 0
    """Accepted; the client's whole first token has not arrived."""
    HANDSHAKE = 1
    """Mid-handshake, waiting for the client's next token."""
    WAITING_FOR_WORKER = 2
    """Handshake finished; waiting for a worker to take it.  Never evicted."""


@dataclass(eq=False)
class Slot:
    """One connection's slot.  ``evicted`` is set when a newcomer took it."""

    source: str
    admitted: float
    progressed: float
    stage: Stage = Stage.FIRST_TOKEN
    evicted: bool = False


@dataclass(frozen=True)
class SourceFull:
    """Every slot is taken and the source already holds ``limit`` of them."""

    source: str
    limit: int


def source_of(host: str, *, prefix_v4: int = 32, prefix_v6: int = 64) -> str:
    """The source an address counts against, as a network (``203.0.113.7/32``).

    IPv4-mapped IPv6 addresses count as their IPv4 address; anything that does not
    parse (a Unix socket path) is its own source.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = prefix_v4 if address.version == 4 else prefix_v6
    return str(ipaddress.ip_network((address, prefix), strict=False))


@dataclass
class Admission:
    """The slot table."""

    capacity: int
    per_source: int = 0
    """Slots a source may hold once every slot is taken; 0: no per-source limit."""
    _slots: list[Slot] = field(default_factory=list)
    _by_source: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self._slots)

    def held_by(self, source: str) -> int:
        """Slots ``source`` holds now."""
        return self._by_source[source]

    def count(self, stage: Stage) -> int:
        """Slots at ``stage``."""
        return sum(1 for slot in self._slots if slot.stage == stage)

    @property
    def full(self) -> bool:
        """Every slot is taken and none can be evicted: stop accepting."""
        return len(self._slots) >= self.capacity and self._victim() is None

    def admit(self, source: str, now: float) -> tuple[Slot | SourceFull, Slot | None]:
        """Give ``source`` a slot: ``(slot, evicted)``, or ``(SourceFull, None)``.

        ``evicted`` is the slot taken away to make room (already out of the table:
        the caller cancels its connection).  Calling this while :attr:`full` is a bug.
        """
        victim = None
        if len(self._slots) >= self.capacity:
            if self.per_source and self._by_source[source] >= self.per_source:
                return SourceFull(source, self.per_source), None
            victim = self._victim()
            if victim is None:
                raise RuntimeError("admit() while every slot waits for a worker")
            victim.evicted = True
            self.release(victim)
        slot = Slot(source, now, now)
        self._slots.append(slot)
        self._by_source[source] += 1
        return slot, victim

    def progress(self, slot: Slot, stage: Stage, now: float) -> None:
        """The connection moved on (a whole token arrived, or the handshake finished)."""
        slot.stage = max(slot.stage, stage)
        slot.progressed = now

    def release(self, slot: Slot) -> None:
        """The connection left (handed to a worker, failed, closed); idempotent."""
        try:
            self._slots.remove(slot)
        except ValueError:
            return
        self._by_source[slot.source] -= 1
        if not self._by_source[slot.source]:
            del self._by_source[slot.source]

    def _victim(self) -> Slot | None:
        candidates = [s for s in self._slots if s.stage != Stage.WAITING_FOR_WORKER]
        if not candidates:
            return None
        return min(candidates, key=lambda s: (not self._over_share(s.source), s.stage,
                                              s.progressed))

    def _over_share(self, source: str) -> bool:
        return bool(self.per_source) and self._by_source[source] > self.per_source
