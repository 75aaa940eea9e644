"""``handoffd connect --listen ADDR HOST:PORT``: a local forwarder, as stunnel's or
ghostunnel's client mode.

Clients that cannot speak handoffd's mechanisms (curl, a browser, any TCP program)
connect to ``ADDR`` in plain TCP on this host; each connection gets a handoffd
connection of its own to ``HOST:PORT`` (Noise with the pinned server key, or krb5 with the
user's ticket), and bytes are copied both ways.  The local side's end of data is sent as
an authenticated CLOSE; the server's CLOSE becomes the local side's end of data
(``shutdown(SHUT_WR)``); a failure on the secure side is one line on stderr with its GSS
status and the local connection is closed, so a cut never looks like a clean end.

Listen on loopback: the plain side has no protection of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

import trio

from handoffd.config import parse_address
from handoffd.runtime.binding import show_address
from handoffd.runtime.stream import SecureStream
from handoffd.status import GSSError

Opener = Callable[[], Awaitable[SecureStream]]


def _say(text: str) -> None:
    print(f"handoffd: {text}", file=sys.stderr, flush=True)


async def forward(local: trio.SocketStream, open_remote: Opener, *, server: str) -> None:
    """One local connection: open its secure connection, copy both ways, close both."""
    peer = show_address(*local.socket.getpeername()[:2])
    try:
        remote = await open_remote()
    except (GSSError, OSError) as error:
        _say(f"{peer}: cannot reach {server}: {error}")
        await local.aclose()
        return

    async def upstream() -> None:
        try:
            async for data in local:
                await remote.send_all(data)
            await remote.send_close()  # the local client is done: CLOSE, keep reading
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async with local, remote, trio.open_nursery() as nursery:

        async def downstream() -> None:
            try:
                async for data in remote:
                    await local.send_all(data)
                # The server's CLOSE: end of data for the local client.
                with trio.move_on_after(1):
                    await local.send_eof()
            except GSSError as error:
                _say(f"{peer}: {server}: {error}")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                nursery.cancel_scope.cancel()

        nursery.start_soon(upstream)
        nursery.start_soon(downstream)


async def run_forwarder(listen: str, server: str, open_remote: Opener, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> int:
    """Accept on ``listen`` until interrupted, one secure connection per local one."""
    host, port = parse_address(listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = show_address(*listeners[0].socket.getsockname()[:2])
    _say(f"forwarding {bound} to {server}")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(local: trio.SocketStream) -> None:
        await forward(local, open_remote, server=server)

    await trio.serve_listeners(handler, listeners)
    return 0  # pragma: no cover - serve_listeners returns only by cancellation
