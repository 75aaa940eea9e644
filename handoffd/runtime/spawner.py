"""How the acceptor gets a worker process: through the supervisor, or by itself.

Either way the acceptor creates the worker's channel (a socketpair, so the worker's
``SO_PEERCRED`` names the acceptor) and its key-parking grant; what differs is who
forks:

* :class:`SupervisedSpawner` (the default, privilege-separated): the acceptor sends
  the channel end and grant to the supervisor, which runs the worker under its own
  uid, reports its pid, signals it on request and reports its exit once the worker
  and everything it spawned are gone.
* :class:`LocalSpawner` (``[workers] insecure_same_uid``, an unprivileged ``serve``):
  the acceptor forks the worker itself, in its own process group, under its own uid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Protocol

import trio

from handoffd import environment
from handoffd.config import Config
from handoffd.core import supervision
from handoffd.core.handoff import BATCH_KINDS, FD_KINDS
from handoffd.kernel.channel import Channel
from handoffd.kernel.parking import ENV_FD, AcceptorParking, WorkerGrant
from handoffd.minor import Minor
from handoffd.runtime.process import ChildProcess
from handoffd.runtime.supervisor_link import SupervisorLink
from handoffd.runtime.worker import ENV_ACCEPTOR_PID, ENV_CHANNEL_FD, ENV_WORKER_ID
from handoffd.status import GSS_S_FAILURE, GSSError

log = logging.getLogger("handoffd.acceptor")

_SCRUBBED_PREFIXES = ("LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET", "HANDOFFD_PARKING_",
                      environment.BOUND, "HANDOFFD_SUPERVISOR", environment.WATCHDOG_USEC,
                      environment.CHANNEL_FD, environment.WORKER_ID, environment.ACCEPTOR_PID,
                      environment.GUESTS)


def worker_command(config: Config) -> list[str]:
    """The worker's argv, built from the configuration (never from a request)."""
    workers = config.workers
    app = (["--asgi", workers.asgi] if workers.asgi is not None
           else ["--wsgi", workers.wsgi] if workers.wsgi is not None
           else ["--app", workers.app])
    argv = [sys.executable, "-m", "handoffd.runtime.worker_process", *app,
            "--drain-timeout", str(config.workers.drain_timeout),
            "--log-level", config.log.level, "--log-format", config.log.format]
    for path in config.workers.pythonpath:
        argv += ["--pythonpath", path]
    for label in config.policy.acceptor_labels:
        argv += ["--acceptor-label", label]
    if config.tls.listen:
        argv += ["--ktls", config.tls.ktls]
    return argv


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without systemd's and handoffd's own per-process variables."""
    return {k: v for k, v in environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}


class WorkerProcess(Protocol):
    """What the acceptor knows of a worker process."""

    pid: int
    uid: int
    returncode: int | None

    async def wait(self) -> int: ...

    def send_signal(self, signum: int) -> None: ...

    def kill(self) -> None: ...


class Spawner(Protocol):
    """Starts workers for the acceptor."""

    separated: bool

    async def serve(self) -> None:
        """Background work (the supervisor link's reader); runs until cancelled."""

    async def spawn(self, parking: AcceptorParking, worker_id: bytes) -> tuple[
            WorkerProcess, Channel]:
        """Start one worker with its channel end and key grant."""

    def reconfigure(self, config: Config) -> None:
        """A reload: workers spawned from now on run ``config``'s worker command."""


def _open_channel(parking: AcceptorParking, worker_id: bytes
                  ) -> tuple[WorkerGrant, socket.socket, socket.socket]:
    grant = parking.add_worker(worker_id)
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError:  # EMFILE: give the grant back (keys and its pipe) before raising
        for fd in grant.pass_fds:
            os.close(fd)
        parking.remove_worker(worker_id)
        raise
    return grant, ours, theirs


def _channel(ours: socket.socket) -> Channel:
    return Channel(trio.socket.from_stdlib_socket(ours), fd_kinds=FD_KINDS,
                   batch_kinds=BATCH_KINDS, validate_fd=None)


class LocalChild(ChildProcess):
    """A worker forked by the acceptor itself; KILL takes its whole process group."""

    uid = os.getuid()

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        super().kill()


class LocalSpawner:
    """Fork+exec workers from the acceptor's trio thread (keyrings are per thread)."""

    separated = False

    def __init__(self, config: Config) -> None:
        self._argv = worker_command(config)

    def reconfigure(self, config: Config) -> None:
        """Spawn from ``config``'s worker command from now on."""
        self._argv = worker_command(config)

    async def serve(self) -> None:
        await trio.sleep_forever()

    async def spawn(self, parking: AcceptorParking, worker_id: bytes
                    ) -> tuple[WorkerProcess, Channel]:
        return spawn_local(parking, worker_id, self._argv)


def spawn_local(parking: AcceptorParking, worker_id: bytes, argv: list[str], *,
                credentials: tuple[int, int] | None = None) -> tuple[LocalChild, Channel]:
    """Fork+exec one worker from this process, with its channel end and key grant.

    This process creates the socketpair, so the worker's ``SO_PEERCRED`` on its end
    names us: that is how the worker knows its acceptor.
    """
    grant, ours, theirs = _open_channel(parking, worker_id)
    env = child_environment(os.environ)
    env.update(grant.env)
    env[ENV_CHANNEL_FD] = str(theirs.fileno())
    env[ENV_WORKER_ID] = worker_id.hex()
    env[ENV_ACCEPTOR_PID] = str(os.getpid())
    try:
        process = LocalChild.spawn(argv, env=env, pass_fds=(theirs.fileno(), *grant.pass_fds),
                                   credentials=credentials, new_session=True)
    except BaseException:
        ours.close()
        parking.remove_worker(worker_id)
        raise
    finally:
        theirs.close()
        for fd in grant.pass_fds:
            os.close(fd)
    return process, _channel(ours)


class SupervisedChild:
    """A worker the supervisor started; exits and signals travel over the link."""

    def __init__(self, link: SupervisorLink, worker_id: bytes, pid: int, uid: int) -> None:
        self._link = link
        self.worker_id = worker_id
        self.pid = pid
        self.uid = uid
        self.returncode: int | None = None
        self._exited = trio.Event()

    def exited(self, status: int) -> None:
        self.returncode = status
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            sent = self._link.send_nowait(supervision.Signal(self.worker_id, signum))
            if not sent:
                log.error("could not ask the supervisor to signal worker %s", self.pid)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class SupervisedSpawner:
    """The acceptor's side of the supervisor link."""

    separated = True

    def __init__(self, link: SupervisorLink) -> None:
        self.link = link
        self.on_peer: Callable[[int, int], None] | None = None
        """Called with (index, fd) for each PEER (acceptor 0 of several); owns the fd."""
        self.on_attach: Callable[[bytes], None] | None = None
        """Called with the worker id of each ATTACH (another acceptor of the set spawns
        that worker): it must answer, with :meth:`attach` or :meth:`decline`.  None:
        every ATTACH is declined."""
        self._children: dict[bytes, SupervisedChild] = {}
        self._waiting: dict[bytes, trio.MemorySendChannel[
            supervision.Spawned | supervision.SpawnFailed]] = {}

    def reconfigure(self, config: Config) -> None:
        """Nothing here: the supervisor builds the worker command, and re-reads the
        configuration itself on the SIGHUP it forwards."""

    async def serve(self) -> None:
        """Dispatch the supervisor's answers; the link ending is fatal to the acceptor."""
        while True:
            try:
                incoming = await self.link.receive()
            except GSSError as error:
                if error.detail == "closed":
                    raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK,
                                   "the supervisor is gone") from None
                log.error("supervisor link: %s", error)
                continue
            message = incoming.message
            if isinstance(message, supervision.Spawned | supervision.SpawnFailed):
                waiter = self._waiting.pop(message.worker_id, None)
                if waiter is not None:
                    waiter.send_nowait(message)
            elif isinstance(message, supervision.Exited):
                child = self._children.pop(message.worker_id, None)
                if child is not None:
                    child.exited(message.status)
            elif isinstance(message, supervision.Attach):
                if self.on_attach is not None:
                    self.on_attach(message.worker_id)
                else:
                    self.decline(message.worker_id)
            elif isinstance(message, supervision.Peer):
                if self.on_peer is not None:
                    self.on_peer(message.index, incoming.fds[0])
                else:
                    os.close(incoming.fds[0])
            else:
                log.error("supervisor link: unexpected %s", type(message).__name__)

    async def spawn(self, parking: AcceptorParking, worker_id: bytes
                    ) -> tuple[WorkerProcess, Channel]:
        return await self._request(parking, worker_id, supervision.Spawn)

    async def attach(self, parking: AcceptorParking, worker_id: bytes
                     ) -> tuple[WorkerProcess, Channel]:
        """Answer an ATTACH: a guest channel and key grant for a worker another acceptor
        of the set spawns; returns it once the supervisor has started it (raises its
        SPAWN_FAILED otherwise).  Only a SIGKILL of it is ours to ask for."""
        return await self._request(parking, worker_id, supervision.Guest)

    def decline(self, worker_id: bytes) -> None:
        """Answer an ATTACH with no guest channel."""
        self.link.send_nowait(supervision.Guest(worker_id, {}))

    async def _request(self, parking: AcceptorParking, worker_id: bytes,
                       message: type[supervision.Spawn | supervision.Guest]
                       ) -> tuple[WorkerProcess, Channel]:
        """Make the worker's channel and key grant here, send them to the supervisor in
        ``message``, wait for the worker to run."""
        try:
            grant, ours, theirs = _open_channel(parking, worker_id)
        except (GSSError, OSError):
            if message is supervision.Guest:
                self.decline(worker_id)  # out of keys or fds: the spawn goes on without us
            raise
        send, receive = trio.open_memory_channel[
            supervision.Spawned | supervision.SpawnFailed](1)
        self._waiting[worker_id] = send
        try:
            try:
                # The grant pipe's fd number is the supervisor's to set (ALLOWED_GRANT).
                grant_env = {k: v for k, v in grant.env.items() if k != ENV_FD}
                await self.link.send(message(worker_id, grant_env),
                                     (theirs.fileno(), *grant.pass_fds))
            finally:
                theirs.close()
                for fd in grant.pass_fds:
                    os.close(fd)
            answer = await receive.receive()
        except BaseException:
            self._waiting.pop(worker_id, None)
            ours.close()
            parking.remove_worker(worker_id)
            raise
        if isinstance(answer, supervision.SpawnFailed):
            ours.close()
            parking.remove_worker(worker_id)
            raise answer.error()
        child = SupervisedChild(self.link, worker_id, answer.pid, answer.uid)
        self._children[worker_id] = child
        return child, _channel(ours)


class LinkNotifier:
    """systemd notifications from the acceptor, forwarded by the supervisor (the unit's
    main process, the only one ``NotifyAccess=main`` listens to)."""

    def __init__(self, link: SupervisorLink) -> None:
        self._link = link

    def notify(self, *fields: str) -> None:
        self._link.send_nowait(supervision.Notify(tuple(fields)))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.notify("STATUS=" + " ".join(text.split()))

    def close(self) -> None:
        """The link is closed with the acceptor."""
