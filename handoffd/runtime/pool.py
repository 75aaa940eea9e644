"""The acceptor's worker pool: what one worker incarnation is, and the states it goes
through.

A worker's state moves only through :func:`transition`, along :data:`TRANSITIONS`::

    STARTING --HELLO--> READY --DRAINING--> DRAINING --exit--> DEAD
        |                 |                                     ^
        +---DRAINING------|-------------------------------------+
        +---exit/spawn failed---------------------------------->+
                          +---exit----------------------------->+

Only a ``READY`` worker is given handoffs.  A move the table does not list is a bug in
the acceptor (a worker's own out-of-order messages are refused before they get here):
:func:`transition` raises :class:`InvalidTransition`.  The state's value is what
``status`` and the metrics show.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from handoffd.kernel.channel import Channel
from handoffd.kernel.parking import AcceptorParking
from handoffd.runtime.spawner import WorkerProcess

if TYPE_CHECKING:
    from handoffd.runtime.dispatch import Outgoing, Pending

log = logging.getLogger("handoffd.acceptor")


class WorkerState(enum.StrEnum):
    """A worker's state; the value is what ``status`` and the metrics show."""

    STARTING = "starting"
    """Spawned (or registered), not yet said HELLO: given no handoff."""
    READY = "ready"
    """Said HELLO: takes handoffs."""
    DRAINING = "draining"
    """Said DRAINING (or told DRAINED): takes no new handoff, finishes its sessions."""
    DEAD = "dead"
    """Exited, failed to spawn, or its channel ended."""


TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.DRAINING,
                                     WorkerState.DEAD}),
    WorkerState.READY: frozenset({WorkerState.DRAINING, WorkerState.DEAD}),
    WorkerState.DRAINING: frozenset({WorkerState.DEAD}),
    WorkerState.DEAD: frozenset(),
}
"""The moves allowed from each state."""


class InvalidTransition(RuntimeError):
    """A worker state move :data:`TRANSITIONS` does not allow: a bug in the acceptor."""


@dataclass
class Worker:
    """One worker process incarnation."""

    index: int
    worker_id: bytes
    parking: AcceptorParking
    process: WorkerProcess | None = None
    external_pid: int | None = None  # registered over the socket, not spawned by us
    channel: Channel | None = None
    state: WorkerState = WorkerState.STARTING  # only through transition()
    in_flight: dict[int, Pending] = field(default_factory=dict)
    outbox: list[Outgoing] = field(default_factory=list)  # handoffs ready, not yet sent
    flushing: bool = False  # a dispatcher is sending the outbox (see _send_handoff)
    handled: int = 0
    ended: int = 0  # sessions the worker reported ended (SESSION_END)
    cut_at_drain: int = 0  # of those, cut at drain_timeout (for the drain's last line)
    started: float = field(default_factory=time.monotonic)
    ready: trio.Event = field(default_factory=trio.Event)
    gone: trio.Event = field(default_factory=trio.Event)

    @property
    def pid(self) -> int | None:
        """The worker's pid (spawned or registered), if it has one yet."""
        return self.process.pid if self.process else self.external_pid

    @property
    def external(self) -> bool:
        """True for a worker that registered over the socket."""
        return self.external_pid is not None

    @property
    def active(self) -> int:
        """Sessions imported and not yet reported ended."""
        return max(0, self.handled - self.ended)


def transition(w: Worker, new: WorkerState) -> None:
    """Move ``w`` to ``new``; raise :class:`InvalidTransition` if the table forbids it.

    Entering ``READY`` sets ``w.ready``.  (``w.gone`` is set by whoever finished the
    dead worker's bookkeeping, later than the move to ``DEAD``.)
    """
    if new not in TRANSITIONS[w.state]:
        raise InvalidTransition(f"worker {w.index} (pid {w.pid}): {w.state.value} -> "
                                f"{new.value} is not a valid move")
    w.state = new
    if new is WorkerState.READY:
        w.ready.set()


async def ack_watchdog(w: Worker, timeout: float) -> None:
    """A spawned worker holding a handoff past ``timeout`` seconds is stuck: kill it.

    Killed with everything it spawned (the supervisor sees to that), and what it was
    sent is not redelivered: it may have imported it (``docs/HANDOFF.md``).  Checks
    every ``timeout / 4`` seconds on trio's clock (``Pending.sent_at`` is
    :func:`trio.current_time`), so a :class:`trio.testing.MockClock` drives it.
    """
    assert w.process is not None
    while True:
        await trio.sleep(timeout / 4)
        now = trio.current_time()
        late = [p.handoff_id for p in w.in_flight.values() if now - p.sent_at > timeout]
        if late:
            log.error("worker %s did not acknowledge handoff %d within %gs: killing it",
                      w.pid, late[0], timeout)
            w.process.kill()
            return
