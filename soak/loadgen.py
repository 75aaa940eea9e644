"""One soak load-generator process: paced new connections, short and long sessions.

``python -m soak.loadgen --port P --fingerprint F --rate R --until T ...`` prints one
JSON object on stdout when done.  ``soak.run`` starts several of these processes, so
the clients never share a process (or a GIL) with the daemon or with each other.

Connection starts are paced open loop: the n-th starts at ``start + n / rate``
(at most ``--max-open`` at once; a start that has to wait for a free slot is
counted in ``late_starts``), until ``--until`` (a ``time.monotonic()`` value,
CLOCK_MONOTONIC, which every process on the machine shares).  Each connection:

* **short** (most): TCP connect, Noise handshake pinning the server key, read the
  worker's pid greeting, one echo of a random payload, close;
* **long** (``--long-fraction``): the same, then many echoes with pauses between
  them, so the session spans seconds (and worker kills and the SIGHUP roll).

Every connection is either completed (every echo verified) or a failure record:
``[kind, t_start, t_handshake, worker_pid, t_fail, stage, reason]`` with
monotonic times; ``soak.run`` classifies failures against its kill events.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import trio

from handoffd.minor import Minor
from handoffd.runtime.client import open_secure_stream
from handoffd.runtime.stream import SecureStream
from handoffd.status import GSSError, status_name

STEP_TIMEOUT = 30.0
"""Seconds any one step may take before the client gives up (generous: the machine is
shared, and a slow step is not a lost connection unless it never finishes)."""


@dataclass
class Tally:
    """What one load-generator process saw."""

    attempted: int = 0
    completed: dict[str, int] = field(default_factory=lambda: {"short": 0, "long": 0})
    echoes: int = 0
    late_starts: int = 0
    close_errors: int = 0
    workers_seen: Counter[int] = field(default_factory=Counter)
    failures: list[list[object]] = field(default_factory=list)


class SessionFailed(Exception):
    """A connection that did not complete, with the step it reached."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


def reason_of(error: BaseException) -> str:
    """A short, groupable reason: the GSS status names, or the OS error text."""
    if isinstance(error, GSSError):
        try:
            minor = Minor(error.minor).name
        except ValueError:
            minor = str(error.minor)
        return f"GSS {status_name(error.major)}/{minor}"
    if isinstance(error, trio.TooSlowError):
        return f"client timeout ({STEP_TIMEOUT:g}s)"
    cause = error if isinstance(error, OSError) else error.__cause__ or error.__context__
    if isinstance(cause, OSError) and cause.errno is not None:
        name = errno.errorcode.get(cause.errno, str(cause.errno))
        return f"OSError {name}: {os.strerror(cause.errno)}"
    return f"{type(error).__name__}: {error}"


async def read_exactly(stream: SecureStream, size: int) -> bytes:
    """``size`` plaintext bytes, or :class:`EOFError` if the server's CLOSE comes first
    (a connection cut without CLOSE raises ``GSSError`` ``STREAM_TRUNCATED``)."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError("server sent CLOSE before the whole echo")
        data += chunk
    return bytes(data)


async def read_greeting(stream: SecureStream) -> int:
    """The worker pid line the soak app sends first."""
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise EOFError("server sent CLOSE before the greeting")
        line += chunk
        if len(line) > 16:
            raise ValueError(f"bad greeting {bytes(line)!r}")
    return int(line)


class Session:
    """One client connection and the steps it went through."""

    def __init__(self, kind: str, rng: random.Random, long_max_pause: float = 0.4) -> None:
        self.kind = kind
        self.echoes = 1 if kind == "short" else rng.randint(10, 40)
        self.sizes = [rng.choice((16, 64, 512, 4096, 20000)) for _ in range(self.echoes)]
        self.pauses = [0.0 if kind == "short" else rng.uniform(0.0, long_max_pause)
                       for _ in range(self.echoes)]
        self.t_start = time.monotonic()
        self.t_handshake: float | None = None
        self.pid: int | None = None
        self.stage = "connect"

    async def run(self, port: int, fingerprint: str, tally: Tally) -> None:
        """Connect, handshake, greeting, echoes, close; raises :class:`SessionFailed`."""
        try:
            with trio.fail_after(STEP_TIMEOUT):
                transport = await trio.open_tcp_stream("127.0.0.1", port)
            closer: trio.abc.AsyncResource = transport
            try:
                self.stage = "handshake"
                with trio.fail_after(STEP_TIMEOUT):
                    stream = await open_secure_stream(transport, server_fingerprint=fingerprint)
                closer = stream  # its aclose sends CLOSE first: the worker's session ends
                self.t_handshake = time.monotonic()
                self.stage = "greeting"
                with trio.fail_after(STEP_TIMEOUT):
                    self.pid = await read_greeting(stream)
                self.stage = "echo"
                for size, pause in zip(self.sizes, self.pauses, strict=True):
                    if pause:
                        await trio.sleep(pause)
                    payload = os.urandom(size)
                    with trio.fail_after(STEP_TIMEOUT):
                        await stream.send_all(payload)
                        if await read_exactly(stream, size) != payload:
                            raise ValueError("echo mismatch")
                    tally.echoes += 1
            finally:
                # Every echo already verified (or the session already failed): a close
                # that errs changes nothing, it is only counted.
                try:
                    with trio.move_on_after(STEP_TIMEOUT):
                        await closer.aclose()
                except (GSSError, OSError, trio.BrokenResourceError):
                    tally.close_errors += 1
        except (GSSError, OSError, EOFError, ValueError, trio.TooSlowError,
                trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise SessionFailed(self.stage, reason_of(error)) from error


async def generate(port: int, fingerprint: str, rate: float, until: float, max_open: int,
                   long_fraction: float, long_max_pause: float, seed: int) -> Tally:
    """Start connections at ``rate`` per second until ``until``; wait for all to end."""
    rng = random.Random(seed)
    tally = Tally()
    slots = trio.CapacityLimiter(max_open)
    start = time.monotonic()

    async def one(session: Session) -> None:
        try:
            await session.run(port, fingerprint, tally)
        except SessionFailed as failed:
            tally.failures.append([session.kind, session.t_start, session.t_handshake,
                                   session.pid, time.monotonic(), failed.stage, failed.reason])
        else:
            tally.completed[session.kind] += 1
        finally:
            if session.pid is not None:
                tally.workers_seen[session.pid] += 1
            slots.release_on_behalf_of(session)

    async with trio.open_nursery() as nursery:
        n = 0
        while True:
            due = start + n / rate
            now = time.monotonic()
            if due >= until:
                break
            if due > now:
                await trio.sleep(due - now)
            kind = "long" if rng.random() < long_fraction else "short"
            session = Session(kind, rng, long_max_pause)
            if slots.available_tokens == 0:
                tally.late_starts += 1
            await slots.acquire_on_behalf_of(session)
            session.t_start = time.monotonic()
            tally.attempted += 1
            nursery.start_soon(one, session)
            n += 1
    return tally


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, generate load, print the tally as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--rate", type=float, required=True, help="connection starts per second")
    parser.add_argument("--until", type=float, required=True, help="time.monotonic() to stop at")
    parser.add_argument("--max-open", type=int, default=400)
    parser.add_argument("--long-fraction", type=float, default=0.05)
    parser.add_argument("--long-max-pause", type=float, default=0.4,
                        help="seconds, upper bound of the pause before each long-session echo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tally = trio.run(generate, args.port, args.fingerprint, args.rate, args.until,
                     args.max_open, args.long_fraction, args.long_max_pause, args.seed)
    json.dump({
        "attempted": tally.attempted,
        "completed": tally.completed,
        "echoes": tally.echoes,
        "late_starts": tally.late_starts,
        "close_errors": tally.close_errors,
        "workers_seen": {str(pid): n for pid, n in tally.workers_seen.items()},
        "failures": tally.failures,
    }, sys.stdout)
    print()


if __name__ == "__main__":
    main()
