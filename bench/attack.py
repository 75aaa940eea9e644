"""Hostile clients against a handoffd listener: slowloris, message-1 replay, oversized frames.

Reusable by the benchmarks (``bench/under_attack.py``) and by tests; pure trio and
sockets, no handoffd internals beyond the client's own framing.  Every attack is
bounded in connections and in time, and returns a report (a dataclass; ``asdict``
gives JSON) instead of raising when the server refuses, resets or times it out.

* :func:`slowloris`: idle TCP connections from several loopback source addresses
  (Linux routes all of 127/8 to ``lo``; each socket is bound to its source before
  ``connect``), re-opened whenever the server closes one, until ``hold`` elapses.
* :func:`capture_first_message` and :func:`replay_flood`: the client's first
  HANDSHAKE frame, made by the real client code, sent again and again on new
  connections; every reply (message 2: the server's key generation and DHs) counted.
* :func:`oversized`: a HANDSHAKE frame header announcing ``size`` bytes, then the
  body: how much of it the server reads before it refuses.

``python -m bench.attack slowloris|replay|oversized ...`` runs one and prints its
report as JSON on the last line of stdout (``--ready`` prints ``ready`` first, once
the attack is under way); SIGTERM or SIGINT ends it early, still with a report.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import trio

from handoffd.core.framing import FrameDecoder, FrameType, decode_error
from handoffd.minor import Minor
from handoffd.runtime.client import open_secure_stream
from handoffd.status import GSSError, status_name

MAX_CONNECTIONS = 4096
"""No attack here opens more connections at once than this."""
MAX_SECONDS = 600.0
"""No attack here runs longer than this."""
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
"""Linux: pick the source port at ``connect`` (by the whole 4-tuple), not at ``bind``."""
_LINGER_RESET = struct.pack("ii", 1, 0)
TRICKLE_BODY = 60_000
"""Body size a trickling slowloris connection announces (under any mechanism's cap)."""


def _check_bounds(connections: int, seconds: float) -> None:
    if not 0 < connections <= MAX_CONNECTIONS:
        raise ValueError(f"connections must be in 1..{MAX_CONNECTIONS}, not {connections}")
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"duration must be in (0, {MAX_SECONDS}] s, not {seconds}")


def parse_sources(text: str) -> list[str]:
    """Source addresses from ``"127.0.0.2,127.0.0.3"`` or a range ``"127.0.0.2-127.0.0.9"``."""
    sources: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            first_text, last_text = part.split("-", 1)
            first, last = ipaddress.ip_address(first_text), ipaddress.ip_address(last_text)
            if type(first) is not type(last) or int(last) < int(first):
                raise ValueError(f"bad address range {part!r}")
            if int(last) - int(first) >= MAX_CONNECTIONS:
                raise ValueError(f"address range {part!r} is too long")
            sources += [str(ipaddress.ip_address(n)) for n in range(int(first), int(last) + 1)]
        else:
            sources.append(str(ipaddress.ip_address(part)))
    if not sources:
        raise ValueError("no source address")
    return sources


def loopback_sources(first: int, count: int) -> list[str]:
    """``count`` loopback addresses from ``127.0.0.<first>`` on (all routed to ``lo``)."""
    start = int(ipaddress.ip_address("127.0.0.0")) + first
    return [str(ipaddress.ip_address(start + i)) for i in range(count)]


async def open_from(source: str, host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host:port`` whose local address is ``source`` (bound first)."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _reset_on_close(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0): no TIME_WAIT left on the attacker's ports."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _error_text(error: BaseException) -> str:
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return type(error).__name__


def _error_frame_text(body: bytes) -> str:
    major, minor = decode_error(body)
    try:
        minor_name = Minor(minor).name
    except ValueError:
        minor_name = str(minor)
    return f"{status_name(major)}/{minor_name}"


def _bump(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


async def _watch(stop: trio.Event | None, scope: trio.CancelScope) -> None:
    if stop is not None:
        await stop.wait()
        scope.cancel()


# ---------------------------------------------------------------------------- slowloris


@dataclass
class SlowlorisReport:
    """What :func:`slowloris` did: counts over the whole hold."""

    connections: int
    """Connections the attack keeps open (the target; one task each)."""
    sources: list[str]
    hold_s: float
    """Seconds the attack actually ran (``hold``, or less when stopped)."""
    opened: int = 0
    """Connections established (the kernel's accept queue counts: not necessarily accepted)."""
    closed_by_server: int = 0
    """Connections the server ended (EOF, reset, or an ERROR frame then EOF)."""
    server_errors: dict[str, int] = field(default_factory=dict)
    """ERROR frames the server sent before closing, by ``major/minor`` name."""
    refused: int = 0
    """Connection attempts that failed (refused, timed out, out of ports ...)."""
    refused_reasons: dict[str, int] = field(default_factory=dict)
    max_open: int = 0
    """Most connections open at once."""
    open_at_end: int = 0
    mean_held_s: float | None = None
    """Mean lifetime of the connections the server closed."""


async def slowloris(host: str, port: int, connections: int, sources: list[str], hold: float,
                    *, reopen_delay: float = 0.05, max_reopen_delay: float = 1.0,
                    connect_timeout: float = 5.0, trickle: float | None = None,
                    on_ramped: Callable[[], None] | None = None,
                    stop: trio.Event | None = None) -> SlowlorisReport:
    """Keep ``connections`` idle TCP connections open to ``host:port`` for ``hold`` seconds.

    Connection ``i`` comes from ``sources[i % len(sources)]``.  Each one sends nothing
    (or, with ``trickle``, a HANDSHAKE frame header announcing ``TRICKLE_BODY`` bytes and
    then one body byte every ``trickle`` seconds: progress, never a whole frame) and
    waits; when the server closes it, it is opened again after ``reopen_delay`` seconds,
    doubled after each connection the server ended within a second, up to
    ``max_reopen_delay`` (so an attack the server refuses at once costs it a bounded
    connection rate, not a busy loop).  A failed
    connect is retried the same way.  ``on_ramped`` is called once every connection has
    been tried once; ``stop`` ends the attack early.  All sockets are closed (with RST)
    on return.
    """
    _check_bounds(connections, hold)
    if not sources:
        raise ValueError("no source address")
    report = SlowlorisReport(connections=connections, sources=list(sources), hold_s=0.0)
    state = {"open": 0, "tried": 0}
    held: list[float] = []
    trickle_header = struct.pack(">BI", FrameType.HANDSHAKE, TRICKLE_BODY)

    def opened() -> None:
        report.opened += 1
        state["open"] += 1
        report.max_open = max(report.max_open, state["open"])

    def tried() -> None:
        state["tried"] += 1
        if state["tried"] == connections and on_ramped is not None:
            on_ramped()

    async def one(source: str) -> None:
        delay = reopen_delay
        first = True
        while True:
            stream: trio.SocketStream | None = None
            try:
                with trio.fail_after(connect_timeout):
                    stream = await open_from(source, host, port)
            except (OSError, trio.TooSlowError) as error:
                report.refused += 1
                _bump(report.refused_reasons, _error_text(error))
            if first:
                first = False
                tried()
            if stream is None:
                await trio.sleep(delay)
                delay = min(delay * 2, max_reopen_delay)
                continue
            opened()
            since = time.monotonic()
            try:
                decoder = FrameDecoder()
                sent = 0
                if trickle is not None:
                    await stream.send_all(trickle_header)
                while True:
                    if trickle is not None and sent < TRICKLE_BODY:
                        with trio.move_on_after(trickle):
                            data = await stream.receive_some(4096)
                            if not data:
                                break
                            decoder.feed(data)
                            continue
                        await stream.send_all(b"\0")
                        sent += 1
                        continue
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    decoder.feed(data)
                try:
                    frame = decoder.next_frame()
                except GSSError:
                    frame = None
                if frame is not None and frame.type == FrameType.ERROR:
                    _bump(report.server_errors, _error_frame_text(frame.body))
            except (OSError, trio.BrokenResourceError):
                pass
            finally:
                state["open"] -= 1
                _reset_on_close(stream)
                await trio.aclose_forcefully(stream)
            lived = time.monotonic() - since
            report.closed_by_server += 1
            held.append(lived)
            delay = reopen_delay if lived >= 1.0 else min(delay * 2, max_reopen_delay)
            await trio.sleep(delay)

    started = time.monotonic()
    with trio.move_on_after(hold) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, stop, scope)
            for i in range(connections):
                nursery.start_soon(one, sources[i % len(sources)])
    report.hold_s = round(time.monotonic() - started, 3)
    report.open_at_end = state["open"]
    report.mean_held_s = round(sum(held) / len(held), 3) if held else None
    return report


# ---------------------------------------------------------------------------- replay


class _Recorder(trio.abc.Stream):
    """A transport that records what the client sends and ends the handshake at its first
    read (what the real client would send over TCP, with no server)."""

    def __init__(self) -> None:
        self.sent = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise _Captured

    async def send_eof(self) -> None:
        return

    async def aclose(self) -> None:
        return


class _Captured(Exception):
    pass


async def capture_first_message(server_fingerprint: str | None = None) -> bytes:
    """The client's first HANDSHAKE frame (header and body), made by the real client.

    Runs :func:`handoffd.runtime.client.open_secure_stream` (an anonymous client, the
    default flags, ``initiate_handshake``: ``wrap_first_token`` then
    ``encode_frame(FrameType.HANDSHAKE, ...)``) over a transport that records what it
    sends and stops it at its first read: byte for byte what a client sends first over
    TCP, i.e. what an eavesdropper captures.  Noise XX message 1 (the client's ephemeral
    key and its hello) is not tied to the server, so ``server_fingerprint`` does not
    change it.
    """
    recorder = _Recorder()
    with contextlib.suppress(_Captured):
        await open_secure_stream(recorder, server_fingerprint=server_fingerprint)
    frame = bytes(recorder.sent)
    decoder = FrameDecoder()
    decoder.feed(frame)
    parsed = decoder.next_frame()
    if parsed is None or parsed.type != FrameType.HANDSHAKE or decoder.unread():
        raise RuntimeError("the client did not send exactly one HANDSHAKE frame first")
    return frame


@dataclass
class ReplayReport:
    """What :func:`replay_flood` did."""

    concurrency: int
    sources: list[str]
    frame_bytes: int
    duration_s: float
    attempts: int = 0
    """Connections made and the frame sent."""
    replies: int = 0
    """HANDSHAKE frames received back (message 2: the server did the work)."""
    replies_per_s: float = 0.0
    server_errors: dict[str, int] = field(default_factory=dict)
    """ERROR frames received instead, by ``major/minor`` name."""
    closed_without_reply: int = 0
    timeouts: int = 0
    """Attempts that got nothing within ``reply_timeout``."""
    failed: int = 0
    """Connects or sends that failed."""
    failed_reasons: dict[str, int] = field(default_factory=dict)


async def replay_flood(host: str, port: int, frame: bytes, concurrency: int, duration: float,
                       sources: list[str], *, reply_timeout: float = 5.0,
                       on_started: Callable[[], None] | None = None,
                       stop: trio.Event | None = None) -> ReplayReport:
    """Replay a captured first message on new connections as fast as ``concurrency`` allows.

    Each of ``concurrency`` tasks (task ``i`` from ``sources[i % len(sources)]``) loops
    for ``duration`` seconds: connect, send ``frame``, read until one whole frame (the
    server's message 2, or an ERROR) or EOF or ``reply_timeout``, close with RST,
    repeat.  A failed connect waits 0.1 s before the next.  ``stop`` ends it early.
    """
    _check_bounds(concurrency, duration)
    if not sources:
        raise ValueError("no source address")
    report = ReplayReport(concurrency=concurrency, sources=list(sources),
                          frame_bytes=len(frame), duration_s=0.0)

    async def one(source: str) -> None:
        while True:
            try:
                stream = await open_from(source, host, port)
            except OSError as error:
                report.failed += 1
                _bump(report.failed_reasons, _error_text(error))
                await trio.sleep(0.1)
                continue
            try:
                report.attempts += 1
                await stream.send_all(frame)
                decoder = FrameDecoder()
                with trio.move_on_after(reply_timeout) as waited:
                    reply = None
                    while reply is None:
                        data = await stream.receive_some(65536)
                        if not data:
                            break
                        decoder.feed(data)
                        reply = decoder.next_frame()
                if waited.cancelled_caught:
                    report.timeouts += 1
                elif reply is None:
                    report.closed_without_reply += 1
                elif reply.type == FrameType.HANDSHAKE:
                    report.replies += 1
                elif reply.type == FrameType.ERROR:
                    _bump(report.server_errors, _error_frame_text(reply.body))
                else:
                    report.closed_without_reply += 1
            except (OSError, trio.BrokenResourceError, GSSError) as error:
                report.failed += 1
                _bump(report.failed_reasons, _error_text(error))
            finally:
                _reset_on_close(stream)
                await trio.aclose_forcefully(stream)

    started = time.monotonic()
    with trio.move_on_after(duration) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, stop, scope)
            for i in range(concurrency):
                nursery.start_soon(one, sources[i % len(sources)])
            if on_started is not None:
                on_started()
    elapsed = time.monotonic() - started
    report.duration_s = round(elapsed, 3)
    report.replies_per_s = round(report.replies / elapsed, 1) if elapsed > 0 else 0.0
    return report


# ---------------------------------------------------------------------------- oversized


@dataclass
class OversizedConnection:
    """One connection of :func:`oversized`."""

    body_bytes_sent: int
    """Body bytes the socket took before the server closed or answered (or all of them)."""
    outcome: str
    """``refused_at_header`` (the server answered within 0.2 s of the header, before any
    body byte was sent),
    ``refused_in_body``, ``read_whole_body`` (the server took it all, then answered or
    closed), ``no_answer`` (all sent, nothing back within the timeout)."""
    server_error: str | None
    """The ERROR frame's ``major/minor`` name, if the server sent one."""
    seconds: float


@dataclass
class OversizedReport:
    """What :func:`oversized` did."""

    size: int
    connections: int
    source: str
    results: list[OversizedConnection]
    outcomes: dict[str, int]


async def oversized(host: str, port: int, size: int, connections: int, *,
                    source: str = "127.0.0.1", chunk: int = 64 * 1024,
                    interval: float = 0.0, timeout: float = 15.0) -> OversizedReport:
    """Announce a HANDSHAKE frame of ``size`` bytes and send its body, on ``connections``
    connections at once.

    Each connection sends the 5-byte header, waits 0.2 s for an early answer, then
    sends the body (zeros, which parse as no valid token) in ``chunk``-byte pieces,
    ``interval`` seconds apart (a trickle; 0: as fast as the socket takes them), while
    reading whatever the server answers; it stops at the first answer, EOF or reset, or
    after ``timeout`` seconds.  Reports per connection how far it got.
    """
    _check_bounds(connections, timeout)
    if not 0 <= size < 2**32:
        raise ValueError("size must fit the frame header's u32")
    header = struct.pack(">BI", FrameType.HANDSHAKE, size)
    body_piece = bytes(min(chunk, max(size, 1)))

    async def one() -> OversizedConnection:
        started = time.monotonic()
        sent = 0
        answer: dict[str, str | None] = {"error": None}
        answered = trio.Event()

        async def reader(stream: trio.SocketStream) -> None:
            decoder = FrameDecoder(max_frame=2**32)
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    decoder.feed(data)
                    frame = decoder.next_frame()
                    if frame is not None:
                        if frame.type == FrameType.ERROR:
                            answer["error"] = _error_frame_text(frame.body)
                        break
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, GSSError):
                pass
            answered.set()

        try:
            stream = await open_from(source, host, port)
        except OSError as error:
            return OversizedConnection(0, f"connect_failed:{_error_text(error)}", None, 0.0)
        outcome = "no_answer"
        at_header = False
        try:
            with trio.move_on_after(timeout):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader, stream)
                    try:
                        await stream.send_all(header)
                        with trio.move_on_after(0.2):
                            await answered.wait()
                        at_header = answered.is_set()
                        while sent < size and not answered.is_set():
                            piece = body_piece[:size - sent]
                            await stream.send_all(piece)
                            sent += len(piece)
                            if interval:
                                await trio.sleep(interval)
                    except (OSError, trio.BrokenResourceError):
                        pass
                    await answered.wait()
                    nursery.cancel_scope.cancel()
            if answered.is_set():
                outcome = ("refused_at_header" if at_header else
                           "read_whole_body" if sent >= size else "refused_in_body")
        finally:
            _reset_on_close(stream)
            await trio.aclose_forcefully(stream)
        return OversizedConnection(sent, outcome, answer["error"],
                                   round(time.monotonic() - started, 3))

    results: list[OversizedConnection] = []

    async def collect() -> None:
        results.append(await one())

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(collect)
    outcomes: dict[str, int] = {}
    for r in results:
        _bump(outcomes, r.outcome)
    return OversizedReport(size=size, connections=connections, source=source,
                           results=results, outcomes=outcomes)


# ---------------------------------------------------------------------------- CLI


def _ready(flag: bool) -> Callable[[], None] | None:
    if not flag:
        return None

    def say() -> None:
        print("ready", flush=True)

    return say


async def _main(args: argparse.Namespace) -> SlowlorisReport | ReplayReport | OversizedReport:
    stop = trio.Event()

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        sources = parse_sources(args.sources)
        report: SlowlorisReport | ReplayReport | OversizedReport
        if args.attack == "slowloris":
            report = await slowloris(args.host, args.port, args.connections, sources,
                                     args.hold, trickle=args.trickle,
                                     on_ramped=_ready(args.ready), stop=stop)
        elif args.attack == "replay":
            frame = await capture_first_message()
            report = await replay_flood(args.host, args.port, frame, args.concurrency,
                                        args.duration, sources,
                                        reply_timeout=args.reply_timeout,
                                        on_started=_ready(args.ready), stop=stop)
        else:
            report = await oversized(args.host, args.port, args.size, args.connections,
                                     source=sources[0], interval=args.interval,
                                     timeout=args.timeout)
        nursery.cancel_scope.cancel()
    return report


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run one attack, print its report as JSON (last line of stdout)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="attack", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--port", type=int, required=True)
    common.add_argument("--ready", action="store_true",
                        help="print 'ready' once the attack is under way")
    p = sub.add_parser("slowloris", parents=[common], help="idle connections held open")
    p.add_argument("--connections", type=int, default=600)
    p.add_argument("--sources", default="127.0.0.2-127.0.0.9")
    p.add_argument("--hold", type=float, default=30.0, help="seconds (upper bound)")
    p.add_argument("--trickle", type=float, default=None,
                   help="send one header byte every this many seconds (default: nothing)")
    p = sub.add_parser("replay", parents=[common], help="captured first message replayed")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--sources", default="127.0.0.10")
    p.add_argument("--duration", type=float, default=30.0, help="seconds (upper bound)")
    p.add_argument("--reply-timeout", type=float, default=5.0)
    p = sub.add_parser("oversized", parents=[common], help="a huge HANDSHAKE frame")
    p.add_argument("--size", type=int, default=1024 * 1024)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--sources", default="127.0.0.1")
    p.add_argument("--interval", type=float, default=0.0,
                   help="seconds between 64 KiB body chunks (0: as fast as possible)")
    p.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args(argv)
    report = trio.run(_main, args)
    json.dump(asdict(report), sys.stdout)
    print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
