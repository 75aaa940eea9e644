"""The acceptor's Pool in-process (``handoffd.runtime.pool``): what a worker's channel
messages do to its state and to the books, and what its death leaves, with fake
parking and channels and no process."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from handoffd.config import Config
from handoffd.core.handoff import Ack, Hello, Kind, Outcome, SessionEnd
from handoffd.logs import ThrottledLog
from handoffd.runtime.acceptor_stats import Stats
from handoffd.runtime.dispatch import Dispatcher, Pending
from handoffd.runtime.pool import Pool, Worker, WorkerState
from handoffd.status import GSSError


class FakeParking:
    def __init__(self) -> None:
        self.adopted: list[bytes] = []
        self.removed: list[bytes] = []
        self.released: list[bytes] = []

    def worker_adopted(self, worker_id: bytes) -> None:
        self.adopted.append(worker_id)

    def release(self, worker_id: bytes, key_ref: bytes) -> None:
        self.released.append(key_ref)

    def claimed(self, worker_id: bytes, key_ref: bytes) -> bool | None:
        return None  # fallback mode: a claim leaves no trace

    def remove_worker(self, worker_id: bytes) -> None:
        self.removed.append(worker_id)


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[int] = []
        self.closed = False

    async def send(self, kind: int, payload: bytes, fd: int | None = None,
                   fds: tuple[int, ...] = ()) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(kind)

    def close(self) -> None:
        self.closed = True


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.uid = pid
        self.returncode: int | None = None


class FakeSocket:
    closed = False

    def close(self) -> None:
        self.closed = True


class FakeStream:
    def __init__(self) -> None:
        self.socket = FakeSocket()


def _pool() -> Pool:
    stats = Stats()
    throttled = ThrottledLog(logging.getLogger("test"))
    pools: list[Pool] = []
    dispatcher = Dispatcher(  # every worker the pool knows, retiring ones included
        workers=lambda: (*pools[0].workers.values(), *pools[0].retiring),
        settings=lambda: Config().workers, stats=stats, throttled=throttled)
    failures: list[GSSError] = []
    spawner: Any = None  # nothing here spawns
    pool = Pool(config=Config, spawner=spawner, dispatcher=dispatcher, stats=stats,
                throttled=throttled, target_count=1, fail=failures.append,
                failing=lambda: bool(failures), notify=lambda *fields: None,
                status_line=lambda: "")
    pool.stopping = True  # a retired slot is not refilled (no spawner here)
    pools.append(pool)
    return pool


def _slot(pool: Pool, index: int = 0) -> Worker:
    parking: Any = FakeParking()
    channel: Any = FakeChannel()
    w = Worker(index=index, worker_id=bytes([index + 1]) * 16, parking=parking,
               process=FakeProcess(1000 + index), channel=channel)
    pool.workers[index] = w
    return w


async def _say(pool: Pool, w: Worker, kind: Kind, payload: bytes = b"") -> None:
    await pool._on_worker_message(w, kind, payload)


def _hello(w: Worker) -> bytes:
    assert w.pid is not None
    return Hello(w.worker_id, w.pid).encode()


async def test_hello_makes_a_worker_ready_once() -> None:
    pool = _pool()
    w = _slot(pool)
    assert not pool.ready()
    await _say(pool, w, Kind.HELLO, _hello(w))
    assert w.state is WorkerState.READY and w.ready.is_set() and pool.ready()
    assert w.parking.adopted == [w.worker_id]  # type: ignore[attr-defined]
    with pytest.raises(GSSError, match="HELLO from a ready worker"):
        await _say(pool, w, Kind.HELLO, _hello(w))
    assert w.state is WorkerState.READY


async def test_a_hello_that_names_someone_else_is_refused() -> None:
    pool = _pool()
    w = _slot(pool)
    with pytest.raises(GSSError, match="HELLO does not match"):
        await _say(pool, w, Kind.HELLO, Hello(b"\x09" * 16, 1000).encode())
    assert w.state is WorkerState.STARTING


async def test_draining_retires_and_a_later_hello_does_not_make_it_ready_again() -> None:
    pool = _pool()
    w = _slot(pool)
    await _say(pool, w, Kind.HELLO, _hello(w))
    await _say(pool, w, Kind.DRAINING)
    assert w.state is WorkerState.DRAINING
    assert pool.retiring == [w] and 0 not in pool.workers
    assert w.channel.sent == [Kind.DRAINED]  # type: ignore[union-attr]
    with pytest.raises(GSSError):
        await _say(pool, w, Kind.HELLO, _hello(w))
    assert w.state is WorkerState.DRAINING
    assert pool._dispatcher.pick() is None  # given nothing more


async def test_session_reports_count_only_what_the_worker_imported() -> None:
    pool = _pool()
    w = _slot(pool)
    await _say(pool, w, Kind.HELLO, _hello(w))
    w.in_flight[7] = Pending(7, FakeStream(), b"", 0.0, "client")  # type: ignore[arg-type]
    await _say(pool, w, Kind.ACK, Ack(7, 0, 0).encode())
    assert w.handled == 1 and w.active == 1
    end = SessionEnd(7, Outcome.CUT_AT_DRAIN, 0, 0).encode()
    await _say(pool, w, Kind.SESSION_END, end)
    await _say(pool, w, Kind.SESSION_END, end)  # one more than it imported
    stats = pool._stats
    assert stats.sessions_ended["cut_at_drain"] == 1 and stats.session_reports_refused == 1
    assert w.cut_at_drain == 1 and w.active == 0


async def test_a_dead_worker_leaves_its_open_sessions_counted_lost() -> None:
    pool = _pool()
    w = _slot(pool)
    await _say(pool, w, Kind.HELLO, _hello(w))
    w.handled = 3
    sent = Pending(9, FakeStream(), b"x", 0.0, "client")  # type: ignore[arg-type]
    sent.sent = True
    w.in_flight[9] = sent
    async with trio.open_nursery() as nursery:
        pool._dispatcher.nursery = nursery
        await pool._worker_gone(w)
    stats = pool._stats
    assert w.state is WorkerState.DEAD and w.gone.is_set() and w.channel.closed  # type: ignore[union-attr]
    assert stats.sessions_ended["lost_with_worker"] == 3
    assert stats.died_unclaimed == 1 and stats.redelivered == 0 and sent.stream.socket.closed
    assert w.parking.removed == [w.worker_id]  # type: ignore[attr-defined]
