"""External workers: processes another program started (gunicorn, a prefork server)
that register with the acceptor over ``[workers] register_socket`` (``docs/HANDOFF.md``,
"Registration of an external worker").

:class:`Registrations` checks who connects against ``[policy]``, answers REFUSED or
REGISTERED (the worker's id, its grant and the pipe holding its key secret: external
workers use the fallback key derivation, since they cannot inherit the acceptor's
session keyring), and hands the registered worker to the daemon, for which it is then a
worker like any other, except that nobody restarts it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from handoffd.config import Config
from handoffd.core.handoff import BATCH_KINDS, FD_KINDS, Kind, Refused, Registered
from handoffd.kernel.channel import Channel
from handoffd.kernel.fdreserve import CAPACITY_ERRNOS
from handoffd.kernel.parking import AcceptorParking
from handoffd.kernel.peer import PeerPolicy
from handoffd.logs import ThrottledLog
from handoffd.runtime.pool import Worker
from handoffd.status import GSSError

log = logging.getLogger("handoffd.acceptor")

FIRST_EXTERNAL_INDEX = 1000
"""External workers' ``index`` in ``status`` counts from here (spawned ones from 0)."""


class Registrations:
    """The registration socket's accept loop and each registration.

    ``config()``: the current configuration (``[policy]`` is read at each
    registration); ``serve(w)``: run a registered worker until it leaves;
    ``out_of_fds(what, bound, error)``: the daemon's answer to an accept() out of
    resources.  :attr:`refused` counts refused registrations (``status``);
    :attr:`parking` is the fallback-mode parking shared by every external worker,
    opened at the first registration (the daemon closes it).
    """

    def __init__(self, *, config: Callable[[], Config],
                 serve: Callable[[Worker], Awaitable[None]],
                 out_of_fds: Callable[[str, socket.socket, OSError], Awaitable[None]],
                 throttled: ThrottledLog) -> None:
        self._config = config
        self._serve = serve
        self._out_of_fds = out_of_fds
        self._throttled = throttled
        self.refused = 0
        self.parking: AcceptorParking | None = None
        self._index = itertools.count(FIRST_EXTERNAL_INDEX)

    async def serve(
        self, bound: socket.socket, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept external workers on the bound Unix socket (mode 0660, ``[workers]
        register_group``); the ``[policy]`` section decides who may register."""
        # listen() again from this process: a registering worker's SO_PEERCRED names
        # whoever called listen() last, and it must name the acceptor that will send it
        # handoffs, not the supervisor that bound the socket.
        bound.listen(64)
        sock = trio.socket.from_stdlib_socket(bound)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as error:
                        if error.errno not in CAPACITY_ERRNOS:
                            raise
                        # Out of fds: shed or wait like the client accept loop, never die.
                        await self._out_of_fds("registration accept", bound, error)
                        continue
                    nursery.start_soon(self.register, conn)
        finally:
            sock.close()

    def policy(self) -> PeerPolicy:
        """Only what ``[policy]`` names (config refuses a register_socket naming nobody);
        never the acceptor's own uid unless listed there explicitly."""
        p = self._config().policy
        return PeerPolicy(
            uids=frozenset(p.worker_uids) if p.worker_uids else None,
            gids=frozenset(p.worker_gids) if p.worker_gids else None,
            labels=frozenset(label.encode() for label in p.worker_labels)
            if p.worker_labels else None,
            require_label=p.require_label,
        )

    async def register(self, conn: trio.socket.SocketType) -> None:
        """One registration: refused, or registered and served until the worker leaves."""
        channel = Channel(conn, fd_kinds=FD_KINDS, batch_kinds=BATCH_KINDS, validate_fd=None)
        try:
            identity = channel.peer_identity()
            self.policy().check(identity)
        except GSSError as error:
            self.refused += 1
            self._throttled.log(logging.WARNING, "registration-refused",
                                "external worker registration refused: %s", error)
            with contextlib.suppress(GSSError):
                await channel.send(Kind.REFUSED, Refused(error.major, error.minor).encode())
            channel.close()
            return
        try:
            if self.parking is None:
                # External workers cannot inherit a keyring: their keys are derived from a
                # secret handed over as a pipe fd (docs/KEYRING.md, fallback mode).
                self.parking = AcceptorParking.open(
                    slots_per_worker=self._config().workers.max_unacked, mode="fallback")
            w = Worker(index=next(self._index), worker_id=os.urandom(16),
                       parking=self.parking, external_pid=identity.pid,
                       channel=channel)
            grant = w.parking.add_worker(w.worker_id)
        except GSSError as error:
            # Out of fds or keys: refuse this worker, never take the daemon down with it.
            log.warning("external worker %s not registered: %s", identity.pid, error)
            with contextlib.suppress(GSSError):
                await channel.send(Kind.REFUSED, Refused(error.major, error.minor).encode())
            channel.close()
            return
        try:
            await channel.send(Kind.REGISTERED, Registered(w.worker_id, grant.env).encode(),
                               fd=grant.pass_fds[0])
        except GSSError as error:
            log.warning("external worker %s vanished while registering: %s", w.pid, error)
            channel.close()
            w.parking.remove_worker(w.worker_id)
            return
        finally:
            for fd in grant.pass_fds:
                os.close(fd)
        log.info("external worker pid %s uid %s registered", identity.pid, identity.uid)
        await self._serve(w)
