"""The acceptor's dispatch: which worker takes a connection, the HANDOFF (or
HANDOFF_BATCH) that carries it, and the bookkeeping of handoffs in flight until the ACK.

A connection handed to a worker and not yet acknowledged is a :class:`Pending` in that
worker's ``in_flight``; one waiting in the worker's outbox to be sent is an
:class:`Outgoing`.  :class:`Dispatcher` owns the rules ``docs/HANDOFF.md`` gives them:
the least-loaded ready worker with room in its ``max_unacked`` window; several handoffs
ready for one worker share one message; a handoff the kernel refused to queue is taken
back and tried again; on an ACK the acceptor's copy is closed; a worker's death ends
what it was sent (never given to another worker) and redelivers only what it never saw.

It touches no process: it is given the workers to choose from and reads each one's
channel, parking and ``in_flight``, so it runs in-process with fakes of those
(``tests/test_dispatch.py``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from handoffd.config import WorkersConfig
from handoffd.core.handoff import (
    MAX_BATCH,
    Ack,
    Handoff,
    Kind,
    batch_entry_size,
    encode_handoff_batch,
)
from handoffd.core.seal import seal
from handoffd.kernel.parking import AcceptorParking
from handoffd.logs import ThrottledLog
from handoffd.mech import NOISE
from handoffd.minor import Minor
from handoffd.runtime.acceptor_stats import Stats
from handoffd.runtime.changes import Changes
from handoffd.runtime.pool import Worker, WorkerState
from handoffd.runtime.wire import send_error
from handoffd.status import GSS_S_FAILURE, GSS_S_UNAVAILABLE, GSSError, status_name

log = logging.getLogger("handoffd.acceptor")

MECH_NOISE = NOISE.seal_id
SEAL_LIFETIME = 30.0
"""Seconds a sealed handoff token stays valid: it only has to cross one socketpair."""

SEND_ATTEMPTS = 5
SEND_RETRY_DELAY = 0.05
"""A HANDOFF the kernel refused to queue is tried again after 0.05, 0.1, ... s (to any
worker); after ``SEND_ATTEMPTS`` refusals the connection is dropped and logged."""


@dataclass
class Pending:
    """A connection handed to a worker and not yet acknowledged."""

    handoff_id: int
    stream: trio.SocketStream
    inner: bytes
    handshake_done: float
    peer: str
    mech: int = MECH_NOISE  # seal id of the exported context's mechanism (handoffd.mech)
    key_ref: bytes = b""
    deliveries: int = 0
    sent_at: float = 0.0  # trio.current_time() of the last delivery (the ACK watchdog's clock)
    sent: bool = False  # the kernel queued the HANDOFF: it never goes to another worker


@dataclass
class Outgoing:
    """A HANDOFF waiting in a worker's outbox; ``done`` once sent, or not (``error``)."""

    pending: Pending
    message: bytes
    done: trio.Event = field(default_factory=trio.Event)
    error: GSSError | None = None


def prepare_handoff(parking: AcceptorParking, worker_id: bytes, handoff_id: int, inner: bytes,
                    now: float, *, mech: int = MECH_NOISE) -> tuple[bytes, bytes]:
    """Park a fresh key for ``worker_id``, seal the exported context with it.

    Returns ``(key_ref, HANDOFF payload)``.  The key itself goes only into the
    worker's keyring; the payload carries its reference and the sealed state.
    ``mech`` is the seal id of the context's mechanism (:mod:`handoffd.mech`),
    authenticated in the sealed token's header; the worker imports by it.
    """
    key_ref, key = parking.park(worker_id)
    sealed = seal(key, plaintext=inner, mech=mech, worker_id=worker_id,
                  expires_at=int(now + SEAL_LIFETIME), nonce=os.urandom(12))
    return key_ref, Handoff(handoff_id, key_ref, sealed).encode()


def close_copy(pending: Pending) -> None:
    """Close the acceptor's copy of the connection; the worker's is not touched."""
    pending.stream.socket.close()


class Dispatcher:
    """Hands connections to workers and keeps the books of what is in flight.

    ``workers()``: the workers it may choose from (spawned and external; only ``READY``
    ones are given anything); ``settings()``: the current ``[workers]`` section (it
    changes at a reload); ``failing()``: the daemon is failing, drop what comes;
    ``no_worker_left()``: stopping with no worker, drop rather than wait.
    :attr:`nursery` runs redeliveries; the daemon sets it once running.
    """

    def __init__(self, *, workers: Callable[[], Iterable[Worker]],
                 settings: Callable[[], WorkersConfig], stats: Stats,
                 throttled: ThrottledLog, clock: Callable[[], float] = time.time,
                 failing: Callable[[], bool] = lambda: False,
                 no_worker_left: Callable[[], bool] = lambda: False) -> None:
        self._workers = workers
        self._settings = settings
        self.stats = stats
        self._throttled = throttled
        self.clock = clock
        self._failing = failing
        self._no_worker_left = no_worker_left
        self.capacity = Changes()
        """A worker may have room: an ACK came, a worker became ready or died."""
        self.waiting = 0
        """Connections whose handshake finished, waiting for a worker with room."""
        self.nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ choosing

    def pick(self) -> Worker | None:
        """The ready worker with the fewest handoffs in flight (then the fewest handled)
        that has room for one more, if any."""
        limit = self._settings().max_unacked
        candidates = [w for w in self._workers()
                      if w.state is WorkerState.READY and len(w.in_flight) < limit]
        if not candidates:
            return None
        return min(candidates, key=lambda w: (len(w.in_flight), w.handled))

    def all_full(self) -> bool:
        """Some worker is ready and none of those has room for another handoff."""
        ready = [w for w in self._workers() if w.state is WorkerState.READY]
        limit = self._settings().max_unacked
        return bool(ready) and all(len(w.in_flight) >= limit for w in ready)

    def any_ready(self) -> bool:
        return any(w.state is WorkerState.READY for w in self._workers())

    def wake(self) -> None:
        """Dispatchers waiting for room look again."""
        self.capacity.notify()

    # ------------------------------------------------------------------ sending

    async def dispatch(self, pending: Pending) -> None:
        """Send a connection to the least-loaded worker; wait while all are full."""
        send_failures = 0
        give_up_at = trio.current_time() + self._settings().wait_timeout
        while True:
            if self._failing():
                self.drop(pending, "the daemon is failing")
                return
            w = self.pick()
            if w is None:
                if self._no_worker_left():
                    self.drop(pending, "no worker left while stopping")
                    return
                if not await self._wait_for_worker(give_up_at):
                    await self._unavailable(pending)
                    return
                continue
            try:
                pending.key_ref, message = prepare_handoff(
                    w.parking, w.worker_id, pending.handoff_id, pending.inner, self.clock(),
                    mech=pending.mech)
            except GSSError as error:
                self._throttled.log(logging.WARNING, f"park:{error.minor}",
                                    "cannot park a key for worker %s: %s", w.pid, error)
                # An ack frees keys, but the quota may be held by someone else: retry
                # soon, as long as the client's wait for a worker lasts.
                if trio.current_time() >= give_up_at:
                    await self._unavailable(pending)
                    return
                with trio.move_on_after(0.2):
                    await self.capacity.wait()
                continue
            w.in_flight[pending.handoff_id] = pending
            pending.deliveries += 1
            pending.sent_at = trio.current_time()
            try:
                await self._send_handoff(w, pending, message)
            except GSSError as error:
                if (error.minor == Minor.CHANNEL_CLOSED
                        or w.in_flight.pop(pending.handoff_id, None) is None):
                    # Not queued: the worker is going away, and its death redelivers
                    # what it never received (pending.sent is still False).
                    log.warning("handoff %d to worker %s failed: %s", pending.handoff_id,
                                w.pid, error)
                    return
                # A SEQPACKET datagram goes whole or not at all (ENOBUFS, ETOOMANYREFS...):
                # the worker never saw this one.  Take it back and send it again, rather
                # than leave it to the ACK watchdog, which would kill a healthy worker.
                w.parking.release(w.worker_id, pending.key_ref)
                send_failures += 1
                if send_failures >= SEND_ATTEMPTS:
                    self.drop(pending, f"handoff not sent after {send_failures} tries: {error}")
                    return
                log.warning("handoff %d to worker %s not sent (%s): retrying",
                            pending.handoff_id, w.pid, error)
                self.wake()
                await trio.sleep(SEND_RETRY_DELAY * send_failures)
                continue
            return

    async def _send_handoff(self, w: Worker, pending: Pending, message: bytes) -> None:
        """Send one HANDOFF; when more handoffs for ``w`` are ready at the same moment,
        one HANDOFF_BATCH carries them all (one wake-up, one sender check, one ACK_BATCH
        in the worker).  The first dispatcher to find no send under way sends for the
        others, which wait; each raises what its own send raised."""
        item = Outgoing(pending, message)
        w.outbox.append(item)
        if w.flushing:
            await item.done.wait()
        else:
            w.flushing = True
            try:
                if self.waiting:
                    # Dispatchers woken with this one (ACKs freed the window) and not run
                    # yet: let them add their handoffs first.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                while w.outbox:
                    await self._flush(w, self._next_batch(w))
            finally:
                w.flushing = False
                for left in w.outbox:  # only when cancelled: never sent
                    left.error = GSSError(GSS_S_FAILURE, Minor.CHANNEL_SEND_FAILED,
                                          "not sent: the sender was cancelled")
                    left.done.set()
                w.outbox.clear()
        if item.error is not None:
            raise item.error

    def _next_batch(self, w: Worker) -> list[Outgoing]:
        """The outbox's first handoffs, as many as one message holds."""
        assert w.channel is not None
        room = w.channel.max_payload - 1  # the count byte
        taken = 0
        while taken < min(len(w.outbox), MAX_BATCH):
            size = batch_entry_size(w.outbox[taken].message)
            if taken and size > room:
                break
            room -= size
            taken += 1
        batch, w.outbox[:taken] = w.outbox[:taken], []
        return batch

    async def _flush(self, w: Worker, batch: list[Outgoing]) -> None:
        assert w.channel is not None
        try:
            if len(batch) == 1:
                await w.channel.send(Kind.HANDOFF, batch[0].message,
                                     fd=batch[0].pending.stream.socket.fileno())
            else:
                await w.channel.send(
                    Kind.HANDOFF_BATCH, encode_handoff_batch([i.message for i in batch]),
                    fds=tuple(i.pending.stream.socket.fileno() for i in batch))
                self.stats.handoff_batches += 1
                self.stats.batched_handoffs += len(batch)
        except GSSError as error:
            for item in batch:
                item.error = error
        else:
            for item in batch:
                item.pending.sent = True
            self.stats.handoffs += len(batch)
        finally:
            for item in batch:
                if item.error is None and not item.pending.sent:
                    item.error = GSSError(GSS_S_FAILURE, Minor.CHANNEL_SEND_FAILED,
                                          "not sent: the sender was cancelled")
                item.done.set()

    async def _wait_for_worker(self, give_up_at: float) -> bool:
        """Wait until a worker may have room; False once ``give_up_at`` passed."""
        if not self.any_ready():
            self._throttled.log(logging.WARNING, "no-worker",
                                "no worker is ready: %d connections waiting for one",
                                self.waiting + 1)
        self.waiting += 1
        try:
            with trio.move_on_at(give_up_at):
                await self.capacity.wait()
                return True
            return False
        finally:
            self.waiting -= 1

    async def _unavailable(self, pending: Pending) -> None:
        """``[workers] wait_timeout`` passed with no worker taking the connection."""
        self.stats.unavailable += 1
        self._throttled.log(logging.WARNING, "unavailable",
                            "connection %s closed: no worker took it within %gs "
                            "([workers] wait_timeout, %s)", pending.peer,
                            self._settings().wait_timeout, Minor.NO_WORKER_AVAILABLE.name)
        pending.inner = b""
        await send_error(pending.stream, GSSError(GSS_S_UNAVAILABLE, Minor.NO_WORKER_AVAILABLE))
        close_copy(pending)

    def drop(self, pending: Pending, why: str) -> None:
        """Give up on a connection (counted ``lost``, an error line)."""
        self.stats.lost += 1
        log.error("connection %s dropped: %s", pending.peer, why)
        pending.inner = b""
        close_copy(pending)

    # ------------------------------------------------------------------ answers

    def on_ack(self, w: Worker, ack: Ack) -> None:
        """The worker answered a handoff: it took it (major 0) or refused it.  Either
        way its key slot is free and the acceptor's copy of the connection closes."""
        pending = w.in_flight.pop(ack.handoff_id, None)
        if pending is None:
            log.warning("worker %s acknowledged unknown handoff %d", w.pid, ack.handoff_id)
            return
        w.parking.release(w.worker_id, pending.key_ref)
        pending.inner = b""
        close_copy(pending)
        if ack.major == 0:
            w.handled += 1
            self.stats.acked += 1
            latency = time.perf_counter() - pending.handshake_done
            self.stats.latencies.append(latency)
            log.debug("handoff %d of %s imported by worker %s in %.0f us", ack.handoff_id,
                      pending.peer, w.pid, latency * 1e6)
        else:
            name = status_name(ack.major)
            self.stats.refused_by_worker[name] += 1
            log.warning("worker %s refused handoff %d from %s: %s", w.pid, ack.handoff_id,
                        pending.peer, GSSError(ack.major, ack.minor))
        self.wake()

    # ------------------------------------------------------------------ a worker's death

    def take_back(self, w: Worker) -> list[Pending]:
        """``w`` died: end what it was sent and return what it never saw.

        A handoff the kernel queued may have been imported, so it never goes to another
        worker: its connection closes, counted ``died_after_claim`` (the slot shows the
        claim) or ``died_unclaimed``.  The others (``sent`` still False) are returned
        for :meth:`redeliver`, once the pool has finished with the dead worker."""
        unacked = list(w.in_flight.values())
        w.in_flight.clear()
        redeliver = []
        for pending in unacked:
            if not pending.sent:
                redeliver.append(pending)
                continue
            # Sent: it may have been imported, so it never goes to another worker.
            claimed = w.parking.claimed(w.worker_id, pending.key_ref)
            if claimed:
                self.stats.died_after_claim += 1
            else:
                self.stats.died_unclaimed += 1
            log.warning("connection %s ends with worker %s, which died before it acknowledged "
                        "handoff %d (%s): not redelivered, a second import would reuse its "
                        "keys", pending.peer, w.pid, pending.handoff_id,
                        "claimed" if claimed else "key slot not burned" if claimed is False
                        else "claim not visible in fallback mode")
            pending.inner = b""
            close_copy(pending)
        return redeliver

    def redeliver(self, w: Worker, never_sent: list[Pending]) -> None:
        """Dispatch again what dead ``w`` never received (:meth:`take_back`), and wake
        the dispatchers (its death changed who has room)."""
        for pending in never_sent:
            # Never queued to the dead worker: it never saw the token.  Send it elsewhere.
            self.stats.redelivered += 1
            log.info("redelivering handoff %d from %s (worker %s died)", pending.handoff_id,
                     pending.peer, w.pid)
            assert self.nursery is not None
            self.nursery.start_soon(self.dispatch, pending)
        self.wake()
