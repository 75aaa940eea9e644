"""The handoff path alone, against real worker processes: rate and latency.

``python -m bench.handoff_path [--workers 2] [--contexts 1000] [--rounds 3]`` prints JSON.

This process plays the acceptor with the daemon's own building blocks
(``spawn_worker``, ``prepare_handoff``, the key parking, the channel), like
``tests/test_worker_library.py``.  The handshakes are done *before* the clock
starts (in memory, one established ``AcceptorContext`` per connection, each
with its own loopback TCP connection), so what is timed is exactly the handoff
path: export, seal, park, send (fd + token), and in the worker receive, verify
the sender, claim, open, import, ack; back here the ack releases the key slot
and closes the acceptor's copy of the connection.

* ``handoffs_per_s``: contexts handed off as fast as the per-worker window
  (``max_unacked`` = 8, as the daemon's default) allows, first send to last ack.
* ``handoff_latency_us``: at moderate load (handoffs paced at ``--latency-rate``
  per second, or by default at a fraction of the measured rate, 50%; several
  ``--latency-rate`` give one figure each, the first is the headline), from the
  moment the acceptor would have
  finished the handshake (just before export) to the moment the worker's
  application holds the imported context.  The worker app
  (``bench.apps:stamp``) writes ``perf_counter_ns()`` on the connection;
  ``CLOCK_MONOTONIC`` is one clock for every process on the machine, so the
  two timestamps compare directly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.common import cpu_seconds, established_pair, quantile
from handoffd.core.context import AcceptorContext
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.handoff import Ack, Hello, Kind, decode_ack_batch, encode_handoff_batch
from handoffd.kernel.channel import Channel
from handoffd.kernel.parking import AcceptorParking
from handoffd.runtime.daemon import prepare_handoff, spawn_worker
from handoffd.runtime.process import ChildProcess

REPO = Path(__file__).resolve().parents[1]
WINDOW = 8
STAMP = struct.Struct("<Q")
ACK_GRACE = 30.0
"""Seconds past the deadline the last acks may take before the run fails (a stuck worker)."""


@dataclass
class BenchWorker:
    """One spawned worker and its window of unacknowledged handoffs."""

    worker_id: bytes
    process: ChildProcess
    channel: Channel
    window: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(WINDOW))


@dataclass
class Connection:
    """A pre-established context with its loopback TCP connection."""

    context: AcceptorContext
    server: socket.socket
    client: socket.socket
    t0_ns: int = 0
    key_ref: bytes = b""


class Driver:
    """The acceptor's side of the handoff path."""

    def __init__(self, parking: AcceptorParking, workers: list[BenchWorker]) -> None:
        self.parking = parking
        self.workers = workers
        self.pending: dict[int, tuple[BenchWorker, Connection]] = {}
        self.ids = itertools.count(1)
        self.acked = 0
        self.all_acked = trio.Event()
        self.expected = 0

    async def read_acks(self, w: BenchWorker) -> None:
        while True:
            message = await w.channel.receive()
            if message.kind == Kind.ACK:
                self._on_ack(w, Ack.decode(message.payload))
            elif message.kind == Kind.ACK_BATCH:
                for ack in decode_ack_batch(message.payload):
                    self._on_ack(w, ack)

    def _on_ack(self, w: BenchWorker, ack: Ack) -> None:
        _, conn = self.pending.pop(ack.handoff_id)
        if ack.major != 0:
            raise SystemExit(f"worker refused handoff {ack.handoff_id}: {ack}")
        self.parking.release(w.worker_id, conn.key_ref)
        conn.server.close()  # our copy; the worker holds its own
        w.window.release()
        self.acked += 1
        if self.acked == self.expected:
            self.all_acked.set()

    async def hand_off(self, w: BenchWorker, conn: Connection) -> None:
        await w.window.acquire()
        await w.channel.send(Kind.HANDOFF, self._prepare(w, conn), fd=conn.server.fileno())

    async def hand_off_batch(self, w: BenchWorker, conns: list[Connection]) -> None:
        """As the daemon does when several handoffs are ready for one worker at once: the
        window slots already taken, one HANDOFF_BATCH (a single HANDOFF for one)."""
        if len(conns) == 1:
            await w.channel.send(Kind.HANDOFF, self._prepare(w, conns[0]),
                                 fd=conns[0].server.fileno())
            return
        messages = [self._prepare(w, conn) for conn in conns]
        await w.channel.send(Kind.HANDOFF_BATCH, encode_handoff_batch(messages),
                             fds=tuple(conn.server.fileno() for conn in conns))

    def _prepare(self, w: BenchWorker, conn: Connection) -> bytes:
        handoff_id = next(self.ids)
        conn.t0_ns = time.perf_counter_ns()  # "the handshake has just finished"
        inner = conn.context.export()
        conn.key_ref, message = prepare_handoff(self.parking, w.worker_id, handoff_id, inner,
                                                time.time())
        self.pending[handoff_id] = (w, conn)
        return message


def make_connections(server_key: StaticKeyPair, count: int) -> list[Connection]:
    """``count`` established contexts, each with a fresh loopback TCP connection."""
    connections = []
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as listener:
        address = listener.getsockname()
        for _ in range(count):
            client = socket.create_connection(address)
            server, _ = listener.accept()
            _, acceptor = established_pair(server_key)
            connections.append(Connection(acceptor, server, client))
    return connections


def read_stamps(connections: list[Connection]) -> list[float]:
    """Latencies in µs: the worker's stamp minus our t0, for each connection."""
    latencies = []
    for conn in connections:
        conn.client.settimeout(10)
        data = b""
        while len(data) < STAMP.size:
            chunk = conn.client.recv(STAMP.size - len(data))
            if not chunk:
                raise SystemExit("a worker closed a connection without its stamp")
            data += chunk
        conn.client.close()
        latencies.append((STAMP.unpack(data)[0] - conn.t0_ns) / 1e3)
    return latencies


async def saturate(driver: Driver, spawned: list[BenchWorker], batch: list[Connection],
                   batch_handoffs: bool = True) -> None:
    """Hand ``batch`` off with every worker's window kept full (batched as the daemon does
    unless ``batch_handoffs`` is False), until the last ACK."""
    feed = iter(batch)

    async def sender(w: BenchWorker) -> None:
        if not batch_handoffs:
            for conn in feed:
                await driver.hand_off(w, conn)
            return
        while True:
            await w.window.acquire()
            taken = 1
            while w.window.value and taken < WINDOW:
                w.window.acquire_nowait()
                taken += 1
            conns = list(itertools.islice(feed, taken))
            for _ in range(taken - len(conns)):
                w.window.release()
            if not conns:
                return
            await driver.hand_off_batch(w, conns)

    async with trio.open_nursery() as senders:
        for w in spawned:
            senders.start_soon(sender, w)
    await driver.all_acked.wait()


async def paced_latencies(driver: Driver, spawned: list[BenchWorker], server_key: StaticKeyPair,
                          count: int, rate: float, deadline: float) -> list[float]:
    """``count`` handoffs paced at ``rate`` per second, round robin: sorted latencies (µs)."""
    batch = make_connections(server_key, count)
    driver.acked, driver.expected = 0, len(batch)
    driver.all_acked = trio.Event()
    interval = 1.0 / rate
    next_at = trio.current_time()
    for conn, w in zip(batch, itertools.cycle(spawned), strict=False):
        if time.monotonic() > deadline:
            driver.expected = driver.acked + len(driver.pending)
            break
        await trio.sleep_until(next_at)
        next_at += interval
        await driver.hand_off(w, conn)
    if driver.expected > driver.acked:
        with trio.fail_after(ACK_GRACE):
            await driver.all_acked.wait()
    sent = [conn for conn in batch if conn.t0_ns]
    latencies = sorted(read_stamps(sent))
    for conn in batch[len(sent):]:
        conn.server.close()
        conn.client.close()
    if not latencies:
        raise SystemExit("no handoff finished before the deadline")
    return latencies


async def run(workers: int = 2, contexts: int = 1000, rounds: int = 3,
              latency_count: int = 1000, load_fraction: float = 0.5,
              max_seconds: float = 60.0, latency_rates: Sequence[float] = (),
              batch_handoffs: bool = True) -> dict[str, Any]:
    """Measure rate and latency of the handoff path; returns plain data."""
    deadline = time.monotonic() + max_seconds
    server_key = StaticKeyPair.generate(os.urandom)
    parking = AcceptorParking.open(slots_per_worker=WINDOW)
    spawned: list[BenchWorker] = []
    try:
        for _ in range(workers):
            worker_id = os.urandom(16)
            process, channel = spawn_worker(
                parking, worker_id, "bench.apps:stamp",
                ["--pythonpath", str(REPO), "--log-level", "warning"])
            spawned.append(BenchWorker(worker_id, process, channel))
        for w in spawned:
            with trio.fail_after(30):
                message = await w.channel.receive()
            assert message.kind == Kind.HELLO and Hello.decode(message.payload).pid == w.process.pid
            parking.worker_adopted(w.worker_id)
        driver = Driver(parking, spawned)
        rates: list[float] = []
        acceptor_cpu = worker_cpu = 0.0
        handed = 0
        async with trio.open_nursery() as nursery:
            for w in spawned:
                nursery.start_soon(driver.read_acks, w)
            # Throughput: every worker's window kept full.
            for _ in range(rounds):
                if time.monotonic() > deadline:
                    break
                batch = make_connections(server_key, contexts)
                driver.acked, driver.expected = 0, len(batch)
                driver.all_acked = trio.Event()
                cpu_before = resource.getrusage(resource.RUSAGE_SELF)
                workers_before = sum(cpu_seconds(w.process.pid) for w in spawned)
                started = time.perf_counter()
                with trio.fail_after(max(1.0, deadline - time.monotonic()) + ACK_GRACE):
                    await saturate(driver, spawned, batch, batch_handoffs)
                elapsed = time.perf_counter() - started
                cpu_after = resource.getrusage(resource.RUSAGE_SELF)
                worker_cpu += sum(cpu_seconds(w.process.pid) for w in spawned) - workers_before
                acceptor_cpu += (cpu_after.ru_utime + cpu_after.ru_stime
                                 - cpu_before.ru_utime - cpu_before.ru_stime)
                handed += len(batch)
                rates.append(len(batch) / elapsed)
                read_stamps(batch)
            rate = sorted(rates)[len(rates) // 2]
            # Latency at moderate load: paced, round robin over the workers.
            by_rate = []
            for latency_rate in [*latency_rates, rate * load_fraction]:
                latencies = await paced_latencies(driver, spawned, server_key, latency_count,
                                                  latency_rate, deadline)
                by_rate.append({"load_per_s": latency_rate, "samples": len(latencies),
                                "p50": quantile(latencies, 0.5),
                                "p99": quantile(latencies, 0.99)})
            nursery.cancel_scope.cancel()
        return {
            "handoffs_per_s": rate,
            "handoffs_per_s_rounds": rates,
            "handoff_latency_us": {"p50": by_rate[0]["p50"], "p99": by_rate[0]["p99"]},
            "handoff_latency_load_per_s": by_rate[0]["load_per_s"],
            "handoff_latency_samples": by_rate[0]["samples"],
            "handoff_latency_by_load": by_rate,
            "handoff_cpu_us": {"acceptor": acceptor_cpu / handed * 1e6,
                               "worker": worker_cpu / handed * 1e6},
            "key_parking": parking.mode,
            "workers": workers,
            "batching": batch_handoffs,
        }
    finally:
        for w in spawned:
            w.process.kill()
            await w.process.wait()
            w.channel.close()
        parking.close()


def main(argv: list[str] | None = None) -> None:
    """Run and print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--contexts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-count", type=int, default=1000)
    parser.add_argument("--load-fraction", type=float, default=0.5)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--latency-rate", type=float, action="append", default=[],
                        help="handoffs/s for a latency figure (repeatable; default: "
                             "--load-fraction of the measured rate)")
    parser.add_argument("--no-batch", action="store_true",
                        help="one HANDOFF per message even when the window has room for "
                             "several (the path before batching, for an A/B)")
    args = parser.parse_args(argv)
    result = trio.run(lambda: run(args.workers, args.contexts, args.rounds, args.latency_count,
                                  args.load_fraction, args.max_seconds, args.latency_rate,
                                  batch_handoffs=not args.no_batch))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
