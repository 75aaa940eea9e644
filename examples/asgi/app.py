"""A Starlette application that handoffd's workers serve with hypercorn
(``[workers] asgi``): a page naming the serving worker and the client's authenticated
identity, the same as JSON, a WebSocket echo, and a route that fails (to see it counted).

The identity comes from ``scope["extensions"]["handoffd.peer"]``: the mechanism (noise,
krb5, tls) and what it authenticated (the client's key fingerprint, Kerberos principal
or certificate), never a header a client could set.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

log = logging.getLogger("examples.asgi")


def peer_of(scope: dict[str, object]) -> dict[str, object]:
    extensions = scope.get("extensions") or {}
    assert isinstance(extensions, dict)
    return dict(extensions.get("handoffd.peer") or {})


async def homepage(request: Request) -> HTMLResponse:
    peer = peer_of(request.scope)
    facts = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>"
                    for k, v in sorted(peer.items()))
    return HTMLResponse(
        f"<!doctype html><title>handoffd ASGI</title>"
        f'<body style="background:#{os.getpid() % 0xFFFFFF:06x}">'
        f"<h1>served by worker {os.getpid()}</h1>"
        f"<p>scheme {html.escape(request.url.scheme)}, HTTP "
        f"{html.escape(request.scope.get('http_version', '?'))}</p><ul>{facts}</ul></body>"
    )


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"worker_pid": os.getpid(), "scheme": request.url.scheme,
                         "http_version": request.scope.get("http_version"),
                         "peer": peer_of(request.scope)})


async def fail(request: Request) -> JSONResponse:
    raise RuntimeError("the example's failing route")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    log.info("lifespan startup in worker %d", os.getpid())
    yield
    log.info("lifespan shutdown in worker %d", os.getpid())


app = Starlette(routes=[Route("/", homepage), Route("/whoami", whoami), Route("/fail", fail),
                        WebSocketRoute("/ws", echo)], lifespan=lifespan)
