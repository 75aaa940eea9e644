"""The acceptor's worker pool: what one worker incarnation is, the states it goes
through, the ACK watchdog, and the :class:`Pool` that keeps the workers.

A worker's state moves only through :func:`transition`, along :data:`TRANSITIONS`:
``STARTING`` to ``READY`` (its HELLO), ``READY`` to ``DRAINING`` (its DRAINING, or
DRAINED sent to an external one), and from any of those to ``DEAD`` (it exited, failed
to spawn, or its channel ended); ``STARTING`` to ``DRAINING`` too (DRAINING before
HELLO).  Nothing leaves ``DEAD``.

Only a ``READY`` worker is given handoffs.  A move the table does not list is a bug in
the acceptor (a worker's own out-of-order messages are refused before they get here):
:func:`transition` raises :class:`InvalidTransition`.  The state's value is what
``status`` and the metrics show.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from handoffd.config import Config
from handoffd.core.handoff import (
    Ack,
    Hello,
    Kind,
    Outcome,
    SessionEnd,
    decode_ack_batch,
    expect_empty,
)
from handoffd.kernel.channel import Channel
from handoffd.kernel.parking import AcceptorParking
from handoffd.logs import ThrottledLog
from handoffd.minor import Minor
from handoffd.runtime.acceptor_stats import Stats
from handoffd.runtime.changes import Changes
from handoffd.runtime.spawner import Spawner, SupervisedSpawner, WorkerProcess
from handoffd.status import GSS_S_FAILURE, GSSError

if TYPE_CHECKING:
    from handoffd.runtime.dispatch import Dispatcher, Outgoing, Pending

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
    guest: bool = False  # spawned by another acceptor of the set, fed by us too (ATTACH)
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


FIRST_GUEST_INDEX = 2000
"""Guest workers' ``index`` in this acceptor's ``status`` counts from here (acceptor 0's
merged status shows each worker once, under the acceptor that spawned it)."""

READ_AFTER_EXIT = 1.0
"""Seconds to go on reading a worker's channel after it exited: what it sent last (the
SESSION_END of each session its drain cut) may still be queued."""


class Pool:
    """The acceptor's workers: one slot per index up to :attr:`target_count`, each kept
    alive (spawned, watched, respawned with backoff), plus the retiring (draining)
    ones and the external ones that registered; their channels read, their deaths
    accounted for; rolled at SIGHUP, resized at TTIN/TTOU.  With several acceptors
    (the shared pool) it also feeds the **guests**: the other acceptors' workers, each
    with a channel and key slots of this acceptor's (:meth:`attach_guest`), watched like
    its own but neither drained nor respawned by it.

    ``config()``: the current configuration; ``spawner`` starts workers (through the
    supervisor, or forked here); ``dispatcher`` hears of ACKs, of workers becoming
    ready and of deaths; ``fail(error)``: stop the daemon (workers keep failing at
    boot); ``failing()``: it is stopping for that; ``notify``/``status_line``: systemd
    notifications.  The daemon sets :attr:`parking` and :attr:`nursery` once running,
    and :attr:`stopping` / :attr:`handing_over` when it drains or hands over.
    """

    def __init__(self, *, config: Callable[[], Config], spawner: Spawner,
                 dispatcher: Dispatcher, stats: Stats, throttled: ThrottledLog,
                 target_count: int, fail: Callable[[GSSError], None],
                 failing: Callable[[], bool], notify: Callable[..., None],
                 status_line: Callable[[], str]) -> None:
        self._config = config
        self._spawner = spawner
        self._dispatcher = dispatcher
        self._stats = stats
        self._throttled = throttled
        self._fail = fail
        self._failing = failing
        self._notify = notify
        self._status_line = status_line
        self.workers: dict[int, Worker] = {}
        self.retiring: list[Worker] = []
        self.external: dict[bytes, Worker] = {}
        self.guests: dict[bytes, Worker] = {}
        self._guest_index = itertools.count(FIRST_GUEST_INDEX)
        self.target_count = target_count
        self.restarts: Counter[int] = Counter()
        self.changed = Changes()
        """A slot got a new worker or lost its own, a worker became ready, the target
        count changed, or the daemon is failing (what :meth:`ready` reads)."""
        self.parking: AcceptorParking | None = None
        self.nursery: trio.Nursery | None = None
        self.stopping = False
        self.handing_over = False
        self._boot_failures = 0

    async def serve_external(self, w: Worker) -> None:
        """A registered external worker: a worker like the others until it leaves."""
        self.external[w.worker_id] = w
        try:
            await self._read_channel(w)
        finally:
            await self._worker_gone(w)

    def attach_guest(self, spawner: SupervisedSpawner, worker_id: bytes) -> None:
        """ATTACH: another acceptor of the set spawns ``worker_id``; give it a guest
        channel and key slots and feed it like our own (declined while stopping)."""
        if self.stopping or self.parking is None or self.nursery is None:
            spawner.decline(worker_id)
            return
        self.nursery.start_soon(self._run_guest, spawner, worker_id)

    async def _run_guest(self, spawner: SupervisedSpawner, worker_id: bytes) -> None:
        assert self.parking is not None
        w = Worker(index=next(self._guest_index), worker_id=worker_id, parking=self.parking,
                   guest=True)
        try:
            w.process, w.channel = await spawner.attach(self.parking, worker_id)
        except (GSSError, OSError) as error:
            log.warning("no guest channel to worker %s: %s", worker_id.hex()[:8], error)
            return
        self.guests[worker_id] = w
        await self._watch(w)

    def ready(self, rolled: set[bytes] | frozenset[bytes] = frozenset()) -> bool:
        """Every slot has a ready worker, none of them one of ``rolled``."""
        return len(self.workers) >= self.target_count and all(
            w.ready.is_set() and w.worker_id not in rolled for w in self.workers.values())

    async def wait_ready(self) -> None:
        """Until :meth:`ready` (at start: every slot's first worker said HELLO)."""
        await self.changed.wait_until(lambda: self._failing() or self.ready())
        if self._failing():
            await trio.sleep_forever()  # the nursery is being cancelled

    async def manage_slot(self, index: int) -> None:
        """Keep one worker alive at ``index``: spawn, watch, respawn with backoff."""
        backoff = 0.05
        while not self.stopping and index < self.target_count:
            assert self.parking is not None
            w = Worker(index=index, worker_id=os.urandom(16), parking=self.parking)
            self.workers[index] = w
            self.changed.notify()
            await self._run_worker(w)
            if self.workers.get(index) is not w:
                return  # retired (roll, resize): whoever retired it refilled the slot
            if self.stopping or index >= self.target_count:
                del self.workers[index]
                self.changed.notify()
                return
            lived = time.monotonic() - w.started
            backoff = 0.05 if lived > 10 else min(backoff * 2,
                                                  self._config().workers.restart_backoff_max)
            self.restarts[index] += 1
            self._stats.worker_restarts += 1
            await trio.sleep(backoff)

    async def _run_worker(self, w: Worker) -> None:
        assert self.parking is not None
        try:
            w.process, w.channel = await self._spawner.spawn(self.parking, w.worker_id)
        except (GSSError, OSError) as error:
            # Out of keyring quota (EDQUOT), fds or processes: not the application's
            # fault, so not a boot failure; the slot retries with backoff.
            log.error("cannot spawn worker %d: %s", w.index, error)
            transition(w, WorkerState.DEAD)
            w.gone.set()
            return
        await self._watch(w)

    async def _watch(self, w: Worker) -> None:
        """Read a running worker's channel, watch its ACKs, account for its exit."""
        assert w.process is not None
        read_all = trio.Event()

        async def read_channel() -> None:
            try:
                await self._read_channel(w)
            finally:
                read_all.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_channel)
                nursery.start_soon(ack_watchdog, w, self._config().workers.ack_timeout)
                await w.process.wait()
                # Its last reports are still queued: read them (its end is closed, so the
                # channel ends), taking it out of the dispatch meanwhile.
                transition(w, WorkerState.DEAD)
                with trio.move_on_after(READ_AFTER_EXIT):
                    await read_all.wait()
                nursery.cancel_scope.cancel()
        finally:
            await self._worker_gone(w)

    async def _read_channel(self, w: Worker) -> None:
        assert w.channel is not None
        while True:
            try:
                message = await w.channel.receive()
            except GSSError as error:
                if error.minor == Minor.CHANNEL_CLOSED:
                    return
                log.warning("worker %s sent a bad message: %s", w.pid, error)
                continue
            if message.fd is not None:  # pragma: no cover - workers never send fds
                os.close(message.fd)
            try:
                await self._on_worker_message(w, message.kind, message.payload)
            except GSSError as error:
                log.warning("worker %s sent a bad %s message: %s", w.pid, message.kind, error)

    async def _on_worker_message(self, w: Worker, kind: int, payload: bytes) -> None:
        if w.state is WorkerState.DEAD and kind in (Kind.HELLO, Kind.DRAINING):
            return  # read after it exited: it takes nothing any more
        if kind == Kind.HELLO:
            hello = Hello.decode(payload)
            if hello.worker_id != w.worker_id or hello.pid != w.pid:
                raise GSSError(GSS_S_FAILURE, Minor.PEER_PID_MISMATCH, "HELLO does not match")
            if w.state is not WorkerState.STARTING:
                # Said once already, or said DRAINING: a worker is never ready twice.
                raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_BAD_HEADER,
                               f"HELLO from a {w.state.value} worker")
            w.parking.worker_adopted(w.worker_id)
            transition(w, WorkerState.READY)
            self.changed.notify()
            self._boot_failures = 0
            self._dispatcher.wake()
            log.info("%s %d ready (pid %s)", "guest worker" if w.guest else "worker", w.index,
                     w.pid)
        elif kind == Kind.ACK:
            self._dispatcher.on_ack(w, Ack.decode(payload))
        elif kind == Kind.ACK_BATCH:
            acks = decode_ack_batch(payload)
            self._stats.ack_batches += 1
            for ack in acks:
                self._dispatcher.on_ack(w, ack)
        elif kind == Kind.SESSION_END:
            self._on_session_end(w, payload)
        elif kind == Kind.DRAINING:
            expect_empty(Kind.DRAINING, payload)
            self._retire(w)
            assert w.channel is not None
            await w.channel.send(Kind.DRAINED, b"")
        else:
            raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_BAD_HEADER, f"unexpected kind {kind}")

    def _on_session_end(self, w: Worker, payload: bytes) -> None:
        """Count a session's end.  A worker can misreport its own sessions only; a report
        that is malformed or beyond what it was handed is refused (counted, logged
        rate-limited)."""
        try:
            report = SessionEnd.decode(payload)
        except GSSError as error:
            self._stats.session_reports_refused += 1
            self._throttled.log(logging.WARNING, "session-report",
                                "worker %s sent a malformed session report: %s", w.pid, error)
            return
        if w.ended >= w.handled:
            self._stats.session_reports_refused += 1
            self._throttled.log(logging.WARNING, "session-report",
                                "worker %s reported more sessions ended than it imported", w.pid)
            return
        w.ended += 1
        if report.outcome == Outcome.CUT_AT_DRAIN:
            w.cut_at_drain += 1
        self._stats.sessions_ended[report.outcome.name.lower()] += 1

    async def _worker_gone(self, w: Worker) -> None:
        if w.state is not WorkerState.DEAD:
            transition(w, WorkerState.DEAD)
        if self.handing_over:
            # Not gone: this acceptor is; the worker finishes its sessions on its own.
            if w.channel is not None:
                w.channel.close()
            return
        if w.active:
            # Sessions it never reported ended died with it (killed, crashed).
            self._stats.sessions_ended["lost_with_worker"] += w.active
            log.warning("worker %s exited with %d sessions open: they are cut", w.pid,
                        w.active)
            w.ended = w.handled
        if w.channel is not None:
            w.channel.close()
        redeliver = self._dispatcher.take_back(w)
        w.parking.remove_worker(w.worker_id)
        if w.external:
            self.external.pop(w.worker_id, None)
            log.info("external worker %s left", w.pid)
        elif w.guest:
            self.guests.pop(w.worker_id, None)
            log.debug("guest worker %s left", w.pid)
        elif not w.ready.is_set():
            self._boot_failures += 1
            log.warning("worker %d (pid %s) exited with %s before it was ready",
                        w.index, w.pid, w.process.returncode if w.process else None)
            if self._boot_failures >= self._config().workers.boot_failures_max:
                self._fail(GSSError(GSS_S_FAILURE, Minor.WORKER_BOOT_FAILED,
                                    f"{self._boot_failures} workers in a row exited before "
                                    f"they were ready; last exit status "
                                    f"{w.process.returncode if w.process else None}"))
        elif not self.stopping and w not in self.retiring:
            log.warning("worker %d (pid %s) died with exit status %s", w.index, w.pid,
                        w.process.returncode if w.process else None)
        if w in self.retiring:
            self.retiring.remove(w)
        w.gone.set()
        self._dispatcher.redeliver(w, redeliver)

    def terminate(self, w: Worker) -> None:
        if w.process is not None and w.process.returncode is None:
            w.process.send_signal(signal.SIGTERM)

    def _retire(self, w: Worker) -> None:
        """The worker drains: no new handoffs; its slot is refilled at once."""
        if w.state is WorkerState.DRAINING:
            return
        transition(w, WorkerState.DRAINING)
        if self.workers.get(w.index) is w:
            self.retiring.append(w)
            del self.workers[w.index]
            self.changed.notify()
            if not self.stopping and w.index < self.target_count and self.nursery:
                self.nursery.start_soon(self.manage_slot, w.index)

    def roll(self) -> None:
        """SIGHUP: every current worker drains; fresh ones take its place."""
        self._notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        rolled = {w.worker_id for w in self.workers.values()}
        for w in list(self.workers.values()):
            self.terminate(w)
        assert self.nursery is not None
        self.nursery.start_soon(self._ready_after_roll, rolled)

    async def _ready_after_roll(self, rolled: set[bytes]) -> None:
        """READY=1 once every slot has a fresh, ready worker (or the drain time passed)."""
        with trio.move_on_after(self._config().workers.drain_timeout + 10):
            await self.changed.wait_until(lambda: self.ready(rolled))
        self._notify("READY=1", f"STATUS={self._status_line()}")

    def resize(self, count: int) -> None:
        count = max(1, count)
        old = self.target_count
        self.target_count = count
        self.changed.notify()
        log.info("resizing pool from %d to %d workers", old, count)
        assert self.nursery is not None
        for index in range(old, count):
            self.nursery.start_soon(self.manage_slot, index)
        for index in range(count, old):
            w = self.workers.get(index)
            if w is not None:
                self.terminate(w)
