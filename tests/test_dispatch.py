"""The acceptor's dispatch bookkeeping in-process (``handoffd.runtime.dispatch``): no
worker process, no keyring; fake channels, parking and connections record what the
Dispatcher does with them (docs/HANDOFF.md: which worker, one message or a batch, the
ACK, a refused send, a worker's death)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import trio
import trio.testing

from handoffd.config import WorkersConfig
from handoffd.core.handoff import Ack, Kind, decode_handoff_batch
from handoffd.logs import ThrottledLog
from handoffd.minor import Minor
from handoffd.runtime.acceptor_stats import Stats
from handoffd.runtime.dispatch import Dispatcher, Pending
from handoffd.runtime.pool import Worker, WorkerState, transition
from handoffd.status import GSS_S_CONTEXT_EXPIRED, GSS_S_FAILURE, GSSError, status_name


class FakeParking:
    def __init__(self) -> None:
        self.parked: list[bytes] = []
        self.released: list[bytes] = []
        self.claims: dict[bytes, bool | None] = {}

    def park(self, worker_id: bytes) -> tuple[bytes, bytes]:
        key_ref = f"key{len(self.parked)}".encode()
        self.parked.append(key_ref)
        return key_ref, b"\x11" * 32

    def release(self, worker_id: bytes, key_ref: bytes) -> None:
        self.released.append(key_ref)

    def claimed(self, worker_id: bytes, key_ref: bytes) -> bool | None:
        return self.claims.get(key_ref, False)


class FakeChannel:
    """Records each message; ``gate`` (if set) holds a send until it is set; ``refuse``
    makes the next sends fail with that error."""

    max_payload = 65536

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, tuple[int, ...]]] = []
        self.gate: trio.Event | None = None
        self.refuse: list[GSSError] = []

    async def send(self, kind: int, payload: bytes, fd: int | None = None,
                   fds: tuple[int, ...] = ()) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if self.refuse:
            raise self.refuse.pop(0)
        self.sent.append((kind, payload, (fd,) if fd is not None else fds))


class FakeSocket:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.closed = True


class FakeStream:
    def __init__(self, fd: int) -> None:
        self.socket = FakeSocket(fd)


def _pending(handoff_id: int) -> Pending:
    stream: Any = FakeStream(100 + handoff_id)
    return Pending(handoff_id, stream, b"exported context %d" % handoff_id, 0.0,
                   f"client {handoff_id}")


def _worker(index: int, *, ready: bool = True) -> Worker:
    parking: Any = FakeParking()
    channel: Any = FakeChannel()
    w = Worker(index=index, worker_id=bytes([index]) * 16, parking=parking, channel=channel)
    if ready:
        transition(w, WorkerState.READY)
    return w


class Pool:
    """What the daemon gives the Dispatcher: its workers and its [workers] section."""

    def __init__(self, *workers: Worker, max_unacked: int = 8,
                 wait_timeout: float = 10.0) -> None:
        self.workers = list(workers)
        self.settings = dataclasses.replace(WorkersConfig(), max_unacked=max_unacked,
                                            wait_timeout=wait_timeout)
        self.stats = Stats()
        self.dispatcher = Dispatcher(
            workers=lambda: self.workers, settings=lambda: self.settings, stats=self.stats,
            throttled=ThrottledLog(logging.getLogger("test")), clock=lambda: 1_000_000.0)


def _channel(w: Worker) -> FakeChannel:
    channel: Any = w.channel
    assert isinstance(channel, FakeChannel)
    return channel


def _parking(w: Worker) -> FakeParking:
    parking: Any = w.parking
    assert isinstance(parking, FakeParking)
    return parking


async def test_a_handoff_goes_to_the_least_loaded_ready_worker_until_its_ack() -> None:
    starting, busy, idle = _worker(0, ready=False), _worker(1), _worker(2)
    busy.in_flight[99] = _pending(99)
    pool = Pool(starting, busy, idle)
    pending = _pending(1)
    await pool.dispatcher.dispatch(pending)
    assert idle.in_flight == {1: pending} and pending.sent and pending.deliveries == 1
    [(kind, payload, fds)] = _channel(idle).sent
    assert kind == Kind.HANDOFF and fds == (101,)
    assert pending.key_ref == _parking(idle).parked[0] and pending.key_ref in payload
    assert not _channel(starting).sent and not _channel(busy).sent
    assert pool.stats.handoffs == 1 and not pending.stream.socket.closed
    # The ACK: the slot is free, the acceptor's copy closes, the worker counts it.
    pool.dispatcher.on_ack(idle, Ack(1, 0, 0))
    assert idle.in_flight == {} and idle.handled == 1 and pool.stats.acked == 1
    assert _parking(idle).released == [pending.key_ref]
    assert pending.stream.socket.closed and pending.inner == b""
    assert len(pool.stats.latencies) == 1


async def test_a_refusing_ack_is_counted_and_closes_the_copy() -> None:
    w = _worker(0)
    pool = Pool(w)
    pending = _pending(5)
    await pool.dispatcher.dispatch(pending)
    pool.dispatcher.on_ack(w, Ack(5, GSS_S_CONTEXT_EXPIRED, 1))
    assert w.handled == 0 and pool.stats.acked == 0
    assert dict(pool.stats.refused_by_worker) == {status_name(GSS_S_CONTEXT_EXPIRED): 1}
    assert pending.stream.socket.closed and w.in_flight == {}
    pool.dispatcher.on_ack(w, Ack(5, 0, 0))  # again, or unknown: logged, nothing counted
    assert pool.stats.acked == 0


async def test_handoffs_ready_while_a_send_is_under_way_share_one_batch() -> None:
    w = _worker(0)
    pool = Pool(w)
    gate = trio.Event()
    _channel(w).gate = gate
    pendings = [_pending(i) for i in range(1, 5)]
    async with trio.open_nursery() as nursery:
        for pending in pendings:
            nursery.start_soon(pool.dispatcher.dispatch, pending)
        await trio.testing.wait_all_tasks_blocked()
        assert set(w.in_flight) == {1, 2, 3, 4} and w.flushing
        gate.set()
    first, second = _channel(w).sent
    assert first[0] == Kind.HANDOFF and len(first[2]) == 1  # the lone first one
    assert second[0] == Kind.HANDOFF_BATCH and len(second[2]) == 3
    assert sorted((*first[2], *second[2])) == [101, 102, 103, 104]
    # The i-th fd goes with the i-th entry.
    assert [100 + h.handoff_id for h in decode_handoff_batch(second[1], 3)] == list(second[2])
    assert all(p.sent for p in pendings) and not w.flushing and w.outbox == []
    assert (pool.stats.handoffs, pool.stats.handoff_batches,
            pool.stats.batched_handoffs) == (4, 1, 3)


async def test_a_full_window_waits_for_an_ack() -> None:
    w = _worker(0)
    pool = Pool(w, max_unacked=1)
    await pool.dispatcher.dispatch(_pending(1))
    assert pool.dispatcher.all_full() and pool.dispatcher.pick() is None
    second = _pending(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.dispatcher.dispatch, second)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.dispatcher.waiting == 1 and 2 not in w.in_flight
        pool.dispatcher.on_ack(w, Ack(1, 0, 0))
    assert w.in_flight == {2: second} and pool.dispatcher.waiting == 0


async def test_no_worker_within_wait_timeout_is_unavailable(
        autojump_clock: trio.testing.MockClock) -> None:
    pool = Pool(_worker(0, ready=False), wait_timeout=3.0)
    pending = _pending(1)
    sent: list[bytes] = []

    async def send_all(data: bytes) -> None:
        sent.append(data)

    pending.stream.send_all = send_all  # type: ignore[attr-defined]
    start = trio.current_time()
    await pool.dispatcher.dispatch(pending)
    assert trio.current_time() - start == pytest.approx(3.0)
    assert pool.stats.unavailable == 1 and pending.stream.socket.closed and sent


async def test_a_send_the_kernel_refused_is_taken_back_and_retried(
        autojump_clock: trio.testing.MockClock) -> None:
    w = _worker(0)
    pool = Pool(w)
    refused = GSSError(GSS_S_FAILURE, Minor.CHANNEL_SEND_FAILED, "ENOBUFS")
    _channel(w).refuse = [refused, refused]
    pending = _pending(1)
    await pool.dispatcher.dispatch(pending)
    assert pending.sent and pending.deliveries == 3 and w.in_flight == {1: pending}
    assert _parking(w).released == _parking(w).parked[:2]  # the two refused keys
    assert len(_channel(w).sent) == 1 and pool.stats.lost == 0


async def test_five_refusals_drop_the_connection(
        autojump_clock: trio.testing.MockClock) -> None:
    w = _worker(0)
    pool = Pool(w)
    _channel(w).refuse = [GSSError(GSS_S_FAILURE, Minor.CHANNEL_SEND_FAILED, "ENOBUFS")] * 5
    pending = _pending(1)
    await pool.dispatcher.dispatch(pending)
    assert pool.stats.lost == 1 and w.in_flight == {} and pending.stream.socket.closed


async def test_a_dead_worker_takes_what_it_was_sent_and_never_saw_is_redelivered() -> None:
    dead, other = _worker(0), _worker(1)
    pool = Pool(dead, other)
    sent_claimed, sent_unclaimed, never_sent = _pending(1), _pending(2), _pending(3)
    for pending in (sent_claimed, sent_unclaimed):
        pending.sent = True
        pending.key_ref = b"ref%d" % pending.handoff_id
        dead.in_flight[pending.handoff_id] = pending
    dead.in_flight[3] = never_sent
    _parking(dead).claims[b"ref1"] = True
    transition(dead, WorkerState.DEAD)
    pool.workers.remove(dead)
    async with trio.open_nursery() as nursery:
        pool.dispatcher.nursery = nursery
        again = pool.dispatcher.take_back(dead)
        assert again == [never_sent] and dead.in_flight == {}
        assert sent_claimed.stream.socket.closed and sent_unclaimed.stream.socket.closed
        assert not never_sent.stream.socket.closed
        pool.dispatcher.redeliver(dead, again)
    assert (pool.stats.died_after_claim, pool.stats.died_unclaimed,
            pool.stats.redelivered) == (1, 1, 1)
    assert other.in_flight == {3: never_sent} and never_sent.sent  # never a sent one
    assert [fds for _, _, fds in _channel(other).sent] == [(103,)]
