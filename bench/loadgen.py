"""One client load-generator process: new connections, each a handshake and one 64-byte echo.

``python -m bench.loadgen --kind noise|tls --port P --concurrency C ...`` prints JSON.
The benchmark runs several of these processes at once against every server
(handoffd, the in-process Noise pre-fork, the TLS pre-fork): same generator,
same counts.  Every loop is bounded by a connection count and a deadline.

Each of ``concurrency`` trio tasks loops: connect over loopback, handshake
(Noise XX as an anonymous client pinning the server key, or TLS 1.3 verifying
the server's certificate), send 64 bytes, read the 64 echoed bytes back,
close.  Only connections completed inside the measurement window (after
``--warmup`` seconds from ``--start-at``, for ``--duration`` seconds) count.
``--rate`` paces the process to that many connection starts per second (open
loop) instead of as fast as it can go.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable

import trio

from bench.tlsgroups import set_groups
from handoffd.runtime.client import open_secure_stream
from handoffd.status import GSSError

PAYLOAD = os.urandom(64)
TIMEOUT = 10.0


async def read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """``size`` bytes or an error."""
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise trio.BrokenResourceError("closed before the echo")
        data += chunk
    return data


def noise_client(fingerprint: str) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """Noise XX as an anonymous client that pins the server key, then one echo."""

    async def once(transport: trio.SocketStream) -> None:
        stream = await open_secure_stream(transport, server_fingerprint=fingerprint)
        async with stream:
            await stream.send_all(PAYLOAD)
            if await read_exactly(stream, len(PAYLOAD)) != PAYLOAD:
                raise ValueError("echo mismatch")

    return once


def tls_client_context(cafile: str, group: str = "X25519") -> ssl.SSLContext:
    """TLS 1.3 only, offering the one key-exchange ``group``, verifying ``localhost``."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    set_groups(context, group)  # OpenSSL 3: the only group offered (supported_groups)
    return context


def tls_client(cafile: str) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """TLS 1.3 with X25519 verifying the server certificate (``localhost``), then one echo.

    Each connection checks that TLS 1.3 was negotiated; the group (X25519, the only one
    either side allows) and the ECDSA P-256 certificate are asserted once per run by
    ``bench.run``'s probe."""
    context = tls_client_context(cafile)

    async def once(transport: trio.SocketStream) -> None:
        stream = trio.SSLStream(transport, context, server_hostname="localhost")
        async with stream:
            await stream.do_handshake()
            if stream.version() != "TLSv1.3":
                raise ValueError(f"negotiated {stream.version()}, not TLSv1.3")
            await stream.send_all(PAYLOAD)
            if await read_exactly(stream, len(PAYLOAD)) != PAYLOAD:
                raise ValueError("echo mismatch")

    return once


REQUESTS_PER_CONNECTION = 10


def https_client(cafile: str, requests: int = REQUESTS_PER_CONNECTION
                 ) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """TLS 1.3 (X25519) then ``requests`` keep-alive ``GET /whoami`` (HTTP/1.1, h11),
    each answer read whole and checked for status 200."""
    import h11

    context = tls_client_context(cafile)
    context.set_alpn_protocols(["http/1.1"])

    async def once(transport: trio.SocketStream) -> None:
        stream = trio.SSLStream(transport, context, server_hostname="localhost")
        async with stream:
            await stream.do_handshake()
            connection = h11.Connection(h11.CLIENT)
            for _ in range(requests):
                request = h11.Request(method="GET", target="/whoami",
                                      headers=[("Host", "localhost")])
                await stream.send_all(connection.send(request)
                                      + connection.send(h11.EndOfMessage()))
                status = 0
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        connection.receive_data(await stream.receive_some(65536))
                        continue
                    if isinstance(event, h11.Response):
                        status = event.status_code
                    if isinstance(event, h11.EndOfMessage):
                        break
                    if isinstance(event, h11.ConnectionClosed):
                        raise ValueError("server closed the connection")
                if status != 200:
                    raise ValueError(f"status {status}")
                connection.start_next_cycle()

    return once


async def run(once: Callable[[trio.SocketStream], Awaitable[None]], port: int, concurrency: int,
              max_connections: int, start_at: float, warmup: float, duration: float,
              rate: float | None) -> dict[str, object]:
    """Drive connections until the window ends or ``max_connections`` were started."""
    window_start = start_at + warmup
    window_end = window_start + duration
    counted: list[float] = []  # per-connection seconds, completed inside the window
    errors: list[str] = []
    started = 0
    slots = 0

    async def worker() -> None:
        nonlocal started, slots
        while started < max_connections:
            if rate is not None:
                at = start_at + slots / rate
                slots += 1
                await trio.sleep_until(at - time.monotonic() + trio.current_time())
            now = time.monotonic()
            if now >= window_end:
                return
            started += 1
            try:
                with trio.fail_after(TIMEOUT):
                    transport = await trio.open_tcp_stream("127.0.0.1", port)
                    try:
                        await once(transport)
                    finally:
                        await transport.aclose()
            except (GSSError, OSError, ValueError, trio.TooSlowError,
                    trio.BrokenResourceError, ssl.SSLError) as error:
                if len(errors) < 20:
                    errors.append(f"{type(error).__name__}: {error}")
                continue
            done = time.monotonic()
            if window_start <= done < window_end:
                counted.append(done - now)

    await trio.sleep(max(0.0, start_at - time.monotonic()))
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    counted.sort()
    return {
        "completed": len(counted),
        "window_s": duration,
        "started": started,
        "errors": len(errors),
        "error_samples": errors[:5],
        "conn_ms_p50": counted[len(counted) // 2] * 1e3 if counted else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("noise", "tls", "https"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fingerprint", help="server key fingerprint (noise)")
    parser.add_argument("--cafile", help="server certificate (tls)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-connections", type=int, default=100_000)
    parser.add_argument("--start-at", type=float, help="time.monotonic() to begin at")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rate", type=float, help="connection starts per second (open loop)")
    args = parser.parse_args(argv)
    once = (noise_client(args.fingerprint) if args.kind == "noise"
            else https_client(args.cafile) if args.kind == "https" else tls_client(args.cafile))
    start_at = args.start_at if args.start_at is not None else time.monotonic()
    result = trio.run(run, once, args.port, args.concurrency, args.max_connections, start_at,
                      args.warmup, args.duration, args.rate)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
