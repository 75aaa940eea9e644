"""ASGI and WSGI applications in handoffd's workers, served by hypercorn on each
handed-off stream (``[workers] asgi`` / ``[workers] wsgi``; ``pip install
'handoffd[asgi]'`` or ``'handoffd[wsgi]'``).

No HTTP is written here: hypercorn's trio ``TCPServer`` speaks HTTP/1.1, h2 (when TLS
chose it by ALPN) and WebSockets over any trio stream shaped like ``trio.SSLStream``;
:class:`HandedOffStream` gives a :class:`~handoffd.runtime.stream.SecureStream` or
:class:`~handoffd.runtime.tls_stream.TlsStream` that shape, honestly: ``do_handshake``
does nothing because the acceptor already ran the handshake, ``selected_alpn_protocol``
is what the TLS handshake chose (``http/1.1`` for Noise and krb5), and
``transport_stream.socket`` is the client's TCP socket (its addresses for the scope).

``scope["scheme"]`` is ``https`` (``wss``) for every mechanism: hypercorn calls a stream
with a handshake secure, and each of them is (confidential, integrity-protected,
authenticated server).  The authenticated peer is in ``scope["extensions"]
["handoffd.peer"]`` (ASGI) or ``environ["handoffd.peer"]`` (WSGI): the stream's
``info`` (mechanism, peer name, and the mechanism's own: fingerprint, ALPN, SNI, the
client certificate).

Lifespan (ASGI): startup once per worker before the first connection, shutdown after the
last session ended.  SIGTERM (the acceptor's drain, a SIGHUP roll): no more handoffs, idle
keep-alive connections closed, requests in progress finish within ``drain_timeout``.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

from handoffd.core.handoff import Outcome
from handoffd.minor import Minor
from handoffd.runtime.stream import SecureStream
from handoffd.runtime.tls_stream import TlsStream
from handoffd.runtime.worker import (
    HandoffReceiver,
    abort_at_drain,
    log_drained,
    receive_streams,
    report_session_end,
)
from handoffd.status import GSS_S_FAILURE, GSS_S_UNAVAILABLE, GSSError

log = logging.getLogger("handoffd.worker")

PEER_KEY = "handoffd.peer"


class HandedOffStream(trio.abc.HalfCloseableStream):
    """A handed-off session in the shape hypercorn's ``TCPServer`` expects of an SSLStream.

    A GSS failure on receive (the client's bytes, a cut without CLOSE) is recorded in
    :attr:`failure` and reported to hypercorn as a broken stream, which ends the
    connection; the session's ERROR frame or alert is sent by :meth:`aclose`.
    """

    def __init__(self, stream: SecureStream | TlsStream) -> None:
        self.stream = stream
        self.transport_stream = stream.transport
        self.failure: GSSError | None = None

    async def do_handshake(self) -> None:
        """Done: the acceptor ran the handshake before the handoff."""

    def selected_alpn_protocol(self) -> str:
        return str(self.stream.info.get("alpn") or "http/1.1")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except GSSError as error:
            self.failure = self.failure or error
            raise trio.BrokenResourceError(str(error)) from None

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self.stream.receive_some(max_bytes)
        except GSSError as error:
            self.failure = self.failure or error
            raise trio.BrokenResourceError(str(error)) from None

    async def send_eof(self) -> None:
        """The authenticated end of this side's data (CLOSE, close_notify)."""
        try:
            await self.stream.send_close()
        except GSSError as error:
            raise trio.BrokenResourceError(str(error)) from None

    async def aclose(self) -> None:
        if self.failure is not None:
            await self.stream.abort(self.failure)
        else:
            await self.stream.aclose()


def load_web_app(spec: str, *, pythonpath: Sequence[str] = ()) -> Any:
    """Import ``module:attribute`` (an ASGI or WSGI callable); failures are APP_LOAD_FAILED."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise GSSError(GSS_S_FAILURE, Minor.APP_LOAD_FAILED, f"{spec!r}: expected module:app")
    for path in reversed(pythonpath):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as error:
        raise GSSError(GSS_S_FAILURE, Minor.APP_LOAD_FAILED,
                       f"{spec!r}: {type(error).__name__}: {error}") from None
    if not callable(target):
        raise GSSError(GSS_S_FAILURE, Minor.APP_LOAD_FAILED, f"{spec!r}: not callable")
    return target


def _hypercorn() -> Any:
    try:
        return importlib.import_module("hypercorn")
    except ImportError:
        raise GSSError(GSS_S_UNAVAILABLE, Minor.APP_LOAD_FAILED,
                       "[workers] asgi/wsgi need hypercorn: pip install 'handoffd[asgi]'"
                       ) from None


class _PeerApp:
    """The app for one connection: the peer's identity put into each scope (or environ)."""

    def __init__(self, app: Any, kind: str, peer: dict[str, object], errors: list[str],
                 max_body_size: int) -> None:
        from hypercorn.app_wrappers import ASGIWrapper, WSGIWrapper

        self.errors = errors
        if kind == "wsgi":
            def with_peer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
                environ[PEER_KEY] = peer
                return app(environ, start_response)

            self.inner: Any = WSGIWrapper(with_peer, max_body_size)
        else:
            self.inner = ASGIWrapper(app)
        self.peer = peer

    async def __call__(self, scope: Any, receive: Any, send: Any, sync_spawn: Any,
                       call_soon: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}),
                                             PEER_KEY: self.peer}}
        try:
            await self.inner(scope, receive, send, sync_spawn, call_soon)
        except Exception as error:
            # hypercorn answers 500 (or closes the WebSocket) and logs; this session is an
            # application error in status and metrics, not a success.
            self.errors.append(f"{type(error).__name__}: {error}")
            raise


def _peer_of(stream: SecureStream | TlsStream) -> dict[str, object]:
    keep = ("mechanism", "peer_name", "peer_fingerprint", "anonymous", "alpn", "sni", "peer",
            "context_id")
    return {k: v for k, v in stream.info.items() if k in keep}


async def serve_web(receiver: HandoffReceiver, app: Any, *, kind: str,
                    drain_timeout: float = 30.0, max_body_size: int = 16 * 1024 * 1024,
                    max_requests: int | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` (``kind``: ``asgi`` or ``wsgi``) on every handed-off connection until
    drained (SIGTERM, or ``max_requests`` requests served); see the module docstring."""
    _hypercorn()
    from hypercorn.app_wrappers import ASGIWrapper, WSGIWrapper
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio.lifespan import Lifespan
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import ConnectionState

    config = HypercornConfig()
    config.graceful_timeout = drain_timeout
    config.wsgi_max_body_size = max_body_size
    base = WSGIWrapper(app, max_body_size) if kind == "wsgi" else ASGIWrapper(app)
    state: dict[str, Any] = {}
    lifespan = Lifespan(base, config, state)
    context = WorkerContext(max_requests)

    async def run_session(source: HandoffReceiver, stream: SecureStream | TlsStream) -> None:
        handoff_id = int(stream.info.get("handoff_id", 0))  # type: ignore[call-overload]
        errors: list[str] = []
        adapted = HandedOffStream(stream)
        outcome, status = Outcome.CLOSED, None
        try:
            peer_app = _PeerApp(app, kind, _peer_of(stream), errors, max_body_size)
            # adapted has the SSLStream surface TCPServer uses (the class docstring)
            await TCPServer(peer_app, config, context, ConnectionState(state.copy()),
                            adapted)  # type: ignore[arg-type]
        except trio.Cancelled:
            outcome, status = Outcome.CUT_AT_DRAIN, await abort_at_drain(stream)
            raise
        finally:
            if outcome is Outcome.CLOSED and errors:
                outcome = Outcome.APP_ERROR
                status = GSSError(GSS_S_FAILURE, Minor.APP_FAILED, errors[0])
                log.error("session %d (%s): the application raised %s", handoff_id,
                          stream.info.get("peer_name"), errors[0])
            elif outcome is Outcome.CLOSED and adapted.failure is not None:
                outcome, status = Outcome.PEER_ERROR, adapted.failure
                log.info("session %d (%s) ended: %s", handoff_id, stream.info.get("peer_name"),
                         adapted.failure)
            await report_session_end(source, handoff_id, outcome, status)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as lifespan_nursery:
            if kind == "asgi":  # WSGI has no lifespan
                await lifespan_nursery.start(lifespan.handle_lifespan)
                await lifespan.wait_for_startup()
            async with trio.open_nursery() as sessions:

                async def drain() -> None:
                    await receiver.drain()
                    await context.terminated.set()  # keep-alive connections close
                    sessions.cancel_scope.deadline = trio.current_time() + drain_timeout

                async def on_signal() -> None:
                    async for _ in signals:
                        await drain()
                        return

                async def on_max_requests() -> None:
                    await context.terminate.wait()  # hypercorn counts the requests
                    log.info("served max_requests (%s): draining", max_requests)
                    await drain()

                async with trio.open_nursery() as control:
                    control.start_soon(on_signal)
                    control.start_soon(on_max_requests)
                    await receiver.hello()
                    task_status.started()
                    await receive_streams(receiver, lambda source, stream: sessions.start_soon(
                        run_session, source, stream))
                    control.cancel_scope.cancel()
                if not receiver._draining:
                    await context.terminated.set()
                    sessions.cancel_scope.deadline = trio.current_time() + drain_timeout
            if kind == "asgi":
                await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()
    log_drained(receiver, drain_timeout)
