"""The machine's own floor for a cross-process hop: one-way wake-up latency, paced.

``python -m bench.wakeup [--rate 600] [--count 3000]`` prints JSON ``{"p50": µs, "p99": µs}``.

A parent process sends a ``perf_counter_ns()`` stamp over an ``AF_UNIX``
``SOCK_SEQPACKET`` socketpair at ``--rate`` messages per second; a forked
child blocked in ``recv`` (plain blocking socket, no event loop, no Python
work to speak of) stamps its wake-up.  Every handoff needs at least this hop
(acceptor to worker), so its p99 bounds what any handoff latency can reach
on this machine: on a small VM shared with other load it is often tens to
hundreds of µs.  Bounded: ``--count`` messages, a 10 s receive timeout.

``--trio-pingpong`` instead prints the CPU one message costs between two *trio*
processes (wake-up, epoll, task scheduling on both sides; ``{"cpu_us_per_message": …}``):
the handoff sends two (HANDOFF, ACK) per connection.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time

STAMP = struct.Struct("<Q")
RESULT = struct.Struct("<dd")
TIMEOUT = 10.0


def _receiver(sock: socket.socket, count: int) -> None:
    latencies = []
    sock.settimeout(TIMEOUT)
    try:
        for _ in range(count):
            (sent,) = STAMP.unpack(sock.recv(STAMP.size))
            latencies.append((time.perf_counter_ns() - sent) / 1e3)
        latencies.sort()
        sock.send(RESULT.pack(latencies[len(latencies) // 2],
                              latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]))
    finally:
        os._exit(0)


def measure(rate: float = 600.0, count: int = 3000) -> dict[str, float]:
    """p50 and p99 one-way wake-up latency (µs) at ``rate`` messages per second."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()  # no event loop runs in this process: a plain fork is fine here
    if pid == 0:
        ours.close()
        _receiver(theirs, count)
    theirs.close()
    try:
        next_at = time.perf_counter()
        for _ in range(count):
            next_at += 1.0 / rate
            # Sleep most of the gap, spin the last bit: the send leaves on time.
            while (gap := next_at - time.perf_counter()) > 0.0005:
                time.sleep(gap - 0.0005)
            while time.perf_counter() < next_at:
                pass
            ours.send(STAMP.pack(time.perf_counter_ns()))
        ours.settimeout(TIMEOUT)
        p50, p99 = RESULT.unpack(ours.recv(RESULT.size))
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return {"p50": p50, "p99": p99, "rate_per_s": rate}


def trio_pingpong(count: int = 20000) -> dict[str, float]:
    """CPU (both processes) per one-way message bouncing between two trio processes."""
    import resource

    import trio

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(TIMEOUT)
    theirs.settimeout(TIMEOUT)

    async def bounce(sock: socket.socket, first: bool) -> None:
        with trio.fail_after(TIMEOUT + count * 0.01):
            s = trio.socket.from_stdlib_socket(sock)
            if first:
                await s.send(bytes(64))
            for _ in range(count - 1 if first else count):
                await s.recv(65536)
                await s.send(bytes(64))
            if first:
                await s.recv(65536)

    pid = os.fork()  # before any trio.run in this process
    if pid == 0:
        ours.close()
        try:
            trio.run(bounce, theirs, False)
        finally:
            os._exit(0)
    theirs.close()
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        trio.run(bounce, ours, True)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    own = resource.getrusage(resource.RUSAGE_SELF)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes its import of trio
    cpu = (own.ru_utime + own.ru_stime - before.ru_utime - before.ru_stime
           + child.ru_utime + child.ru_stime)
    return {"cpu_us_per_message": cpu / (2 * count) * 1e6, "messages": 2 * count}


def main(argv: list[str] | None = None) -> None:
    """Measure and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=600.0)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--trio-pingpong", action="store_true")
    args = parser.parse_args(argv)
    result = trio_pingpong() if args.trio_pingpong else measure(args.rate, args.count)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
