"""A gunicorn worker class whose workers take their connections from a running handoffd.

    HANDOFFD_REGISTER_SOCKET=/run/handoffd/register.sock HANDOFFD_ACCEPTOR_UID=$(id -u handoffd) \\
        gunicorn -k handoffd.gunicorn.HandoffWorker -w 4 -b 127.0.0.1:8000 app:app

gunicorn's arbiter forks its workers as usual; each worker, instead of accepting on
gunicorn's listener (which gunicorn still binds: point ``-b`` at an unused loopback
port), registers with handoffd over ``[workers] register_socket`` as an external worker
(``HandoffReceiver.register``; ``[policy]`` must name gunicorn's uid) and serves the WSGI
app with hypercorn on every connection handoffd hands it, over Noise, krb5 or TLS
(:mod:`handoffd.runtime.web`: the peer's identity in ``environ["handoffd.peer"]``).

What gunicorn users expect holds: the worker heartbeats the arbiter (``timeout``);
SIGTERM (a HUP reload, TTOU, a stop) drains: no more handoffs, requests in progress
finish within ``graceful_timeout``; ``max_requests`` (with its jitter) ends a worker
after that many requests, drained the same way, and the arbiter starts another, which
registers anew; TTIN adds one.  ``pip install 'handoffd[gunicorn]'``.
"""

from __future__ import annotations

import os
import sys

import trio
from gunicorn.workers.base import Worker

from handoffd import environment
from handoffd.minor import Minor
from handoffd.runtime.web import serve_web
from handoffd.runtime.worker import HandoffReceiver
from handoffd.status import GSS_S_FAILURE, GSSError

__all__ = ["ENV_ACCEPTOR_UID", "ENV_REGISTER_SOCKET", "HandoffWorker"]

ENV_REGISTER_SOCKET = environment.REGISTER_SOCKET
"""The running handoffd's ``[workers] register_socket``."""
ENV_ACCEPTOR_UID = environment.ACCEPTOR_UID
"""The acceptor's uid (``[server] user``): only a listener of that uid is trusted."""


class HandoffWorker(Worker):  # type: ignore[misc]  # gunicorn ships no type hints
    """A gunicorn worker that serves connections handed off by handoffd (module docstring)."""

    def run(self) -> None:
        try:
            trio.run(self._serve)
        except GSSError as error:
            self.log.error("handoffd worker: %s", error)
            sys.exit(1)

    async def _serve(self) -> None:
        path = os.environ.get(ENV_REGISTER_SOCKET)
        if not path:
            raise GSSError(GSS_S_FAILURE, Minor.USAGE_INVALID,
                           f"set {ENV_REGISTER_SOCKET} to handoffd's [workers] register_socket")
        uid = os.environ.get(ENV_ACCEPTOR_UID)
        receiver = await HandoffReceiver.register(
            path, acceptor_uids=frozenset({int(uid)}) if uid else None)
        max_requests = self.cfg.max_requests and self.max_requests  # 0: no limit
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat)
                await serve_web(receiver, self.wsgi, kind="wsgi",
                                drain_timeout=float(self.cfg.graceful_timeout),
                                max_requests=max_requests or None)
                nursery.cancel_scope.cancel()
        finally:
            receiver.close()

    async def _heartbeat(self) -> None:
        """gunicorn's arbiter kills a worker that stops notifying within ``timeout``."""
        period = max(0.5, float(self.timeout) / 4) if self.timeout else 1.0
        while True:
            self.notify()
            await trio.sleep(period)
