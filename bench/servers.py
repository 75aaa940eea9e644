"""The alternatives to handoffd: one pre-forked worker process that accepts on a shared port.

``python -m bench.servers --kind noise|tls --port P ...`` is ONE worker; the
benchmark starts N of them on the same port.  Each binds its own listening
socket with ``SO_REUSEPORT`` (the kernel spreads connections over the N
sockets) and runs trio, like a handoffd worker does:

* ``noise``: the very mechanism handoffd uses (``AcceptorContext`` +
  ``handoffd.runtime.wire.accept_handshake`` + ``SecureStream``), run inside
  the worker, no handoff, the server key in every worker;
* ``tls``: Python's ``ssl`` (OpenSSL), TLS 1.3 only, X25519 only, an ECDSA
  P-256 certificate, no session tickets (the clients never resume), through
  ``trio.SSLStream``.

Both then echo (``examples.echo.app`` for noise, the same loop for TLS) until
the client closes.  The process prints ``ready`` once it listens.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable

import trio

from bench.tlsgroups import set_groups
from examples.echo.app import handler as echo
from handoffd import keyfiles
from handoffd.core.context import AcceptorContext
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.framing import FrameDecoder
from handoffd.runtime.stream import SecureStream
from handoffd.runtime.wire import accept_handshake
from handoffd.status import GSSError

HANDSHAKE_TIMEOUT = 10.0


def tls_server_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.3 only, X25519 only, no session tickets."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    set_groups(context, "X25519")
    context.num_tickets = 0
    return context


def noise_session(server_key: StaticKeyPair) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """Handshake in this process, then echo over the secure stream."""

    async def session(stream: trio.SocketStream) -> None:
        context = AcceptorContext(static_key=server_key, allow_list=None, allow_anonymous=True,
                                  clock=time.time, random=os.urandom)
        decoder = FrameDecoder()
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await accept_handshake(stream, context, decoder)
        async with SecureStream(stream, context, decoder=decoder) as secure:
            await echo(secure)

    return session


def tls_session(context: ssl.SSLContext) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """TLS handshake in this process, then echo."""

    async def session(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
        async with tls:
            while data := await tls.receive_some(65536):
                await tls.send_all(data)

    return session


async def serve(port: int, session: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
    """Accept on 127.0.0.1:port (SO_REUSEPORT) and run ``session`` per connection."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    await sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    listener = trio.SocketListener(sock)
    print("ready", flush=True)

    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await session(stream)
        except (GSSError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError, OSError):
            pass  # the client went away or misbehaved: this session only
        finally:
            await stream.aclose()

    await trio.serve_listeners(guarded, [listener])


def main(argv: list[str] | None = None) -> None:
    """One pre-forked worker of the chosen kind; runs until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("noise", "tls"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True, help="server key (noise) or PEM key (tls)")
    parser.add_argument("--cert", help="PEM certificate (tls)")
    args = parser.parse_args(argv)
    if args.kind == "noise":
        session = noise_session(keyfiles.load_private_key(args.key))
    else:
        session = tls_session(tls_server_context(args.cert, args.key))
    try:
        trio.run(serve, args.port, session)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
