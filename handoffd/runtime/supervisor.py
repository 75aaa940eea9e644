"""The supervisor: the one privileged process, which takes no network input and uses no key.

``handoffd serve`` started as root (or with CAP_SETUID, CAP_SETGID and CAP_KILL)
becomes this process, on OpenSSH's privilege-separation pattern:

1. it binds every listening socket (or takes systemd's) and joins a fresh session
   keyring that the acceptor and the workers inherit (key parking, docs/KEYRING.md);
2. it starts the **acceptor** under ``[server] user``: that process holds the key,
   runs the handshakes, has no capabilities and makes itself undumpable;
3. on the acceptor's request (:mod:`handoffd.core.supervision`) it starts each
   **worker** under a uid of its own from ``[workers] uid_range`` (or the shared
   ``[workers] user``), with the channel end and key grant the acceptor made, and a
   command line it builds from the configuration itself;
4. it reaps workers, and before it reports a worker's exit it kills everything that
   worker left behind: with one uid per worker, every process of that uid
   (``kill(-1, SIGKILL)`` run as that uid, which no ``setsid`` or double fork
   escapes); with a shared worker uid, the worker's process group;
   with ``[server] acceptors`` above 1 it first asks every other acceptor of the set
   for a guest channel and key grant (ATTACH, GUEST), so that every acceptor hands
   off to every worker (the shared pool);
5. it forwards SIGTERM/SIGINT (drain), SIGHUP, SIGTTIN and SIGTTOU to the acceptor,
   forwards the acceptor's systemd notifications, and restarts an acceptor that dies
   after it was ready (the workers finish their sessions on their own);
6. on SIGUSR2 (the zero-downtime restart) it re-reads the configuration in full and
   starts a new acceptor *generation* on the same listening sockets; once that one is
   ready the old acceptor gets SIGUSR2 and hands over: it stops accepting, lets its
   handshakes in progress reach its own workers and exits, and those workers finish
   their sessions on their own.  A generation that fails to get ready within
   ``[workers] drain_timeout`` is stopped and the old one keeps serving.  The
   supervisor itself is not re-executed: its pid, the listening sockets and the
   children it reaps stay as they are (docs/PRIVSEP.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from handoffd import environment
from handoffd.config import (
    BOUND_SOCKETS,
    Config,
    acceptor_credentials,
    group_id,
    load_config,
    merge_reloaded,
    worker_credentials,
)
from handoffd.core import supervision
from handoffd.kernel import keyring
from handoffd.kernel.parking import ENV_FD, FALLBACK, join_fresh_session_keyring
from handoffd.kernel.privileges import can_switch_users
from handoffd.kernel.systemd import Notifier, watchdog_interval
from handoffd.minor import Minor
from handoffd.runtime.binding import ENV_BOUND, BoundSockets, bind_all
from handoffd.runtime.changes import Changes
from handoffd.runtime.process import ChildProcess
from handoffd.runtime.spawner import child_environment, worker_command
from handoffd.runtime.supervisor_link import SupervisorLink
from handoffd.runtime.worker import ENV_ACCEPTOR_PID, ENV_CHANNEL_FD, ENV_WORKER_ID
from handoffd.status import GSS_S_FAILURE, GSS_S_UNAVAILABLE, GSSError

log = logging.getLogger("handoffd.supervisor")

ENV_SUPERVISOR_FD = environment.SUPERVISOR_FD
ENV_SUPERVISOR_PID = environment.SUPERVISOR_PID
ENV_WATCHDOG_USEC = environment.WATCHDOG_USEC
ENV_SUPERVISOR_ACCEPTOR = environment.SUPERVISOR_ACCEPTOR
"""``index/count``: which of the ``[server] acceptors`` this acceptor is."""
ENV_SUPERVISOR_PEER_FD = environment.SUPERVISOR_PEER_FD
"""For acceptor ``index`` > 0: its end of the status socketpair with acceptor 0."""
_KILL_ALL = "import os\ntry:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\n"
_FORWARDED = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


@dataclass(frozen=True)
class ProcessPlan:
    """Which uid runs what; ``separated`` False only with ``insecure_same_uid``."""

    separated: bool
    acceptor: tuple[int, int]
    worker_shared: tuple[int, int] | None = None
    """One uid/gid for every worker (``[workers] user``); None with a uid range."""
    worker_range: tuple[int, int] | None = None
    worker_group: int | None = None

    def describe(self) -> dict[str, Any]:
        """For ``status`` and ``doctor``."""
        if self.worker_range is not None:
            workers = f"one uid per worker from {self.worker_range[0]}-{self.worker_range[1]}"
        elif self.worker_shared is not None:
            workers = f"uid {self.worker_shared[0]} (shared by every worker)"
        else:
            workers = f"uid {self.acceptor[0]} (the acceptor's: INSECURE)"
        return {"separated": self.separated, "acceptor_uid": self.acceptor[0],
                "workers": workers, "insecure_same_uid": not self.separated or (
                    self.worker_shared is not None and self.worker_shared[0] == self.acceptor[0])}


def _privsep_error(minor: Minor, detail: str) -> GSSError:
    return GSSError(GSS_S_FAILURE, minor, detail)


def process_plan(config: Config, *, privileged: bool | None = None) -> ProcessPlan:
    """Decide the uids from the config and this process's privilege, or refuse.

    Refused (``PRIVSEP_SAME_UID``) whenever a worker would share the acceptor's uid
    and ``[workers] insecure_same_uid`` is not set; ``PRIVSEP_NOT_PERMITTED`` when the
    config asks for uids this process cannot switch to.
    """
    workers = config.workers
    privileged = can_switch_users() if privileged is None else privileged
    acceptor = acceptor_credentials(config.server)
    if not privileged:
        if acceptor is not None or workers.user is not None or workers.uid_range:
            raise _privsep_error(Minor.PRIVSEP_NOT_PERMITTED,
                                 "[server] user, [workers] user and uid_range need serve to "
                                 "start as root (it then keeps only a small supervisor)")
        if config.server.acceptors > 1:
            raise _privsep_error(Minor.PRIVSEP_NOT_PERMITTED,
                                 "[server] acceptors > 1 needs the supervisor: start serve as "
                                 "root with [server] user")
        if not workers.insecure_same_uid:
            raise _privsep_error(
                Minor.PRIVSEP_SAME_UID,
                f"started as uid {os.getuid()} without the privilege to switch users: start "
                "serve as root with [server] user and [workers] uid_range, or set [workers] "
                "insecure_same_uid = true")
        return ProcessPlan(False, (os.getuid(), os.getgid()))
    if acceptor is None:
        raise _privsep_error(Minor.PRIVSEP_NOT_PERMITTED,
                             "serve started as root needs [server] user: the acceptor, which "
                             "holds the key, never runs as root")
    shared = worker_credentials(workers, check_switch=False)
    if workers.uid_range:
        first, last = workers.uid_range
        if first <= acceptor[0] <= last:
            raise _privsep_error(Minor.PRIVSEP_SAME_UID,
                                 f"[workers] uid_range includes the acceptor's uid {acceptor[0]}")
        group = None if workers.group is None else group_id("[workers] group", workers.group)
        return ProcessPlan(True, acceptor, worker_range=(first, last), worker_group=group)
    if shared is None:
        if not workers.insecure_same_uid:
            raise _privsep_error(Minor.PRIVSEP_SAME_UID,
                                 "no [workers] uid_range or user: the workers would run under "
                                 "the acceptor's uid")
        shared = acceptor
    if shared[0] == acceptor[0] and not workers.insecure_same_uid:
        raise _privsep_error(Minor.PRIVSEP_SAME_UID,
                             f"[workers] user is the acceptor's uid {acceptor[0]}")
    if shared[0] == 0:
        raise _privsep_error(Minor.PRIVSEP_NOT_PERMITTED, "workers never run as root")
    return ProcessPlan(True, acceptor, worker_shared=shared)


def _uids_with_processes() -> set[int]:
    """The uids owning a process this process can see in /proc (one scan)."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found.add(entry.stat().st_uid)
    return found


class UidPool:
    """One uid per live worker from ``[first, last]``; a uid with processes is skipped."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.used: set[int] = set()

    def take(self) -> int:
        busy = self.used | _uids_with_processes()
        for uid in range(self.first, self.last + 1):
            if uid not in busy:
                self.used.add(uid)
                return uid
        raise GSSError(GSS_S_UNAVAILABLE, Minor.SUPERVISOR_UIDS_EXHAUSTED,
                       f"{len(self.used)} workers hold uids {self.first}-{self.last}")

    def give_back(self, uid: int) -> None:
        self.used.discard(uid)


@dataclass
class Supervised:
    """A worker this supervisor started."""

    worker_id: bytes
    child: ChildProcess
    uid: int
    own_uid: bool
    acceptor: int
    """The serial of the acceptor process that asked for it: only that one may drain it
    (SIGTERM)."""
    pool: UidPool | None = None
    guests: tuple[int, ...] = ()
    """The serials of the other acceptors that feed it (the shared pool): they hear of
    its exit too, and may SIGKILL it (their ACK watchdog)."""


@dataclass
class _Acceptor:
    """One acceptor process: acceptor ``index`` of its generation (``[server] acceptors``
    of them accept on the same sockets), with the plan and worker command its workers
    get."""

    child: ChildProcess
    link: SupervisorLink
    serial: int
    """Unique per acceptor process started by this supervisor."""
    plan: ProcessPlan
    argv: list[str]
    pool: UidPool | None
    index: int = 0
    generation: int = 0
    """The set it was started in: at start, or by a SIGUSR2 restart (a replacement for a
    dead acceptor joins the serving set's generation)."""
    peer_end: socket.socket | None = None
    """For ``index`` > 0: the supervisor's copy of acceptor 0's end of the status
    socketpair between the two (handed to each acceptor 0 of the generation)."""
    started: float = 0.0
    ready: bool = False
    became_ready: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    status: int = 0


GUEST_TIMEOUT = 5.0
"""Seconds a spawn waits for the other acceptors' GUEST answers (they start together)."""


def _check_grant_fds(what: str, grant: dict[str, str], fds: list[int]) -> None:
    """A SPAWN's or GUEST's fds: a SEQPACKET channel end, then (fallback mode) a pipe."""
    fallback = grant.get(environment.PARKING_MODE) == FALLBACK
    if len(fds) != (2 if fallback else 1):
        raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK, f"{what} with the wrong fds")
    channel = socket.socket(fileno=os.dup(fds[0]))
    try:
        if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_SEQPACKET:
            raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK, "channel is not SEQPACKET")
    finally:
        channel.close()
    if fallback and not stat.S_ISFIFO(os.fstat(fds[1]).st_mode):
        raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK, "grant is not a pipe")


def _granted(grant: dict[str, str], fds: list[int]) -> dict[str, str]:
    """A grant as the worker adopts it: in fallback mode with the number of the grant
    pipe (``fds[1]``), which is the supervisor's to set, never the acceptor's."""
    if grant.get(environment.PARKING_MODE) != FALLBACK:
        return dict(grant)
    return {**grant, ENV_FD: str(fds[1])}


async def kill_everything_of(uid: int) -> None:
    """SIGKILL every process of ``uid``: ``kill(-1)`` run as that uid reaches them all,
    whatever process group or session they moved to.  A failure is logged, not raised:
    the caller is reaping or killing and must go on."""
    try:
        helper = ChildProcess.spawn([sys.executable, "-I", "-S", "-c", _KILL_ALL],
                                    credentials=(uid, uid), cwd="/")
    except OSError as error:
        log.error("cannot kill the processes of uid %d: %s", uid, error.strerror)
        return
    await helper.wait()


def _final_status(statuses: list[int]) -> int:
    """The supervisor's exit status from its serving acceptors' at a stop: 0 when every
    one drained (0, or SIGTERM's), else the first other one (a signal counts as 1)."""
    bad = [status for status in statuses if status not in (0, -signal.SIGTERM)]
    if not bad:
        return 0
    return bad[0] if bad[0] > 0 else 1


@dataclass
class Supervisor:
    """Runs the acceptors and the workers under their own uids; see the module docstring."""

    config: Config
    plan: ProcessPlan
    bound: BoundSockets | None = None
    workers: dict[bytes, Supervised] = field(default_factory=dict)
    _serving: list[_Acceptor | None] = field(default_factory=list)
    """The serving generation, by index (None: a dead one waiting for its replacement):
    they get HUP/TTIN/TTOU, their notifications reach systemd."""
    _acceptors: dict[int, _Acceptor] = field(default_factory=dict)
    """Every running acceptor by serial: the serving ones, those starting, old ones
    handing over."""
    _incoming: list[_Acceptor] | None = None
    _serial: int = 0
    _generation: int = 0
    """The serving generation's number."""
    _generations: int = 0
    _stopping: bool = False
    _status: int = 0
    _stop_statuses: list[int] = field(default_factory=list)
    _backoff: dict[int, float] = field(default_factory=dict)
    _resize_turn: int = 0
    _changed: Changes = field(default_factory=Changes)
    """A worker or an acceptor came or went (what :meth:`_orphans` reads)."""
    _guest_waiters: dict[tuple[int, bytes], trio.MemorySendChannel[
        tuple[supervision.Guest, list[int]]]] = field(default_factory=dict)
    """ATTACHes awaiting their GUEST, by (acceptor serial, worker id)."""

    def __post_init__(self) -> None:
        self._pool = (UidPool(*self.plan.worker_range) if self.plan.worker_range else None)
        self._argv = worker_command(self.config)
        self._notifier = Notifier.from_environ()
        self._watchdog = watchdog_interval()
        self._serving_exits, self._exits = trio.open_memory_channel[_Acceptor | None](
            math.inf)

    async def run(self) -> int:
        """Bind, start the acceptors, supervise until they have drained after SIGTERM."""
        if self.bound is None:
            self.bound = bind_all(self.config, register_group=self._register_group())
        if keyring.probe() is keyring.KeyringStatus.AVAILABLE:
            join_fresh_session_keyring()
        elif self.config.workers.keyring != FALLBACK:
            log.info("kernel keyring not available to the supervisor: the acceptor decides")
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2,
                                           *_FORWARDED) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals, nursery)
                    await self._run_acceptors(nursery)
                    nursery.cancel_scope.cancel()
        finally:
            await self._kill_leftovers()
            for acceptor in self._acceptors.values():
                if acceptor.peer_end is not None:
                    acceptor.peer_end.close()
            self.bound.close(unlink=True)
            if self._notifier is not None:
                self._notifier.close()
        return self._status

    def _register_group(self) -> int | None:
        group = self.config.workers.register_group
        return None if group is None else group_id("[workers] register_group", group)

    # ------------------------------------------------------------------ the acceptors

    def _is_serving(self, acceptor: _Acceptor) -> bool:
        return (acceptor.index < len(self._serving)
                and self._serving[acceptor.index] is acceptor)

    async def _run_acceptors(self, nursery: trio.Nursery) -> None:
        self._generations += 1
        self._generation = self._generations
        self._serving = [None] * self.config.server.acceptors
        for index in range(len(self._serving)):
            self._serving[index] = self._launch(nursery, self.plan, self._argv, self._pool,
                                                index, self._generation, len(self._serving))
        while True:
            exited = await self._exits.receive()
            if exited is not None:
                if not self._is_serving(exited):
                    continue  # replaced meanwhile (a restart swapped the generation)
                self._serving[exited.index] = None
                if self._stopping:
                    self._stop_statuses.append(exited.status)
                elif not exited.ready:
                    # A start-up failure the acceptor reported itself: restarting would
                    # only repeat it.  Its siblings stop too.
                    log.error("acceptor %d exited with status %d before it was ready",
                              exited.index, exited.status)
                    self._status = exited.status if exited.status > 0 else 1
                    await self._stop_other_generations()
                    return
                else:
                    log.error("acceptor %d (pid %d) died with status %d: %s; its workers "
                              "finish their sessions and leave, a new acceptor %d starts",
                              exited.index, exited.child.pid, exited.status,
                              Minor.ACCEPTOR_DIED.name, exited.index)
                    nursery.start_soon(self._replace, exited, nursery)
                    continue
            if self._stopping and all(a is None for a in self._serving):
                # Drained on request (or SIGTERM while no acceptor ran).
                self._status = _final_status(self._stop_statuses)
                await self._stop_other_generations()
                return

    async def _replace(self, dead: _Acceptor, nursery: trio.Nursery) -> None:
        """Start a new acceptor in a dead one's place, after 0.1 s if it had run more than
        10 s, otherwise after a wait that doubles with each quick death, up to 5 s."""
        index = dead.index
        backoff = 0.1 if time.monotonic() - dead.started > 10 else min(
            self._backoff.get(index, 0.1) * 2, 5.0)
        self._backoff[index] = backoff
        await trio.sleep(backoff)
        if self._stopping:  # SIGTERM meanwhile: nothing to start; let the loop see it
            self._serving_exits.send_nowait(None)
            return
        if dead.generation != self._generation or self._serving[index] is not None:
            return  # a restart put a new generation in place meanwhile
        self._serving[index] = self._launch(nursery, self.plan, self._argv, self._pool,
                                            index, self._generation, len(self._serving))

    async def _stop_other_generations(self) -> None:
        """The supervisor is about to exit: a starting or handing-over generation stops
        now (SIGTERM; a second one changes nothing) and is waited for, and so are the
        workers an old generation left (told to drain at SIGTERM), up to
        ``drain_timeout``; what is left then is killed on the way out."""
        for acceptor in list(self._acceptors.values()):
            acceptor.child.send_signal(signal.SIGTERM)
            await acceptor.exited.wait()
        with trio.move_on_after(self.config.workers.drain_timeout + 2):
            await self._changed.wait_until(lambda: not self._orphans())

    def _orphans(self) -> list[Supervised]:
        """Workers whose acceptor handed over (or died): they serve their sessions alone."""
        return [w for w in self.workers.values() if w.acceptor not in self._acceptors]

    def _launch(self, nursery: trio.Nursery, plan: ProcessPlan, argv: list[str],
                pool: UidPool | None, index: int, generation: int, count: int) -> _Acceptor:
        """Start one acceptor and the task that serves its link and reaps it; give acceptor
        0 of its generation the status sockets of the others (or, for acceptor 0 itself,
        those of the others already running)."""
        self._serial += 1
        acceptor = self._start_acceptor(plan, argv, pool, index, generation, count)
        log.info("acceptor started (pid %d, uid %d%s)", acceptor.child.pid, plan.acceptor[0],
                 f", acceptor {index} of {count}" if count > 1 else "")
        self._acceptors[acceptor.serial] = acceptor
        self._changed.notify()
        nursery.start_soon(self._run_acceptor, acceptor, nursery)
        siblings = [a for a in self._acceptors.values()
                    if a.generation == generation and not a.exited.is_set()]
        if index == 0:
            for sibling in siblings:
                if sibling.peer_end is not None:
                    nursery.start_soon(self._send_peer, acceptor, sibling)
        elif acceptor.peer_end is not None:
            for first in siblings:
                if first.index == 0:
                    nursery.start_soon(self._send_peer, first, acceptor)
        return acceptor

    async def _send_peer(self, first: _Acceptor, other: _Acceptor) -> None:
        """Acceptor 0 gets a copy of its end of ``other``'s status socketpair."""
        if other.peer_end is None:
            return
        with contextlib.suppress(GSSError, OSError):
            await first.link.send(supervision.Peer(other.index), (other.peer_end.fileno(),))

    async def _run_acceptor(self, acceptor: _Acceptor, nursery: trio.Nursery) -> None:
        async with trio.open_nursery() as link_nursery:
            link_nursery.start_soon(self._serve_link, acceptor, nursery)
            acceptor.status = await acceptor.child.wait()
            link_nursery.cancel_scope.cancel()
        acceptor.link.close()
        for key in [key for key in self._guest_waiters if key[0] == acceptor.serial]:
            self._guest_waiters.pop(key).close()  # no GUEST will come: the spawn goes on
        if acceptor.peer_end is not None:
            acceptor.peer_end.close()
            acceptor.peer_end = None
        del self._acceptors[acceptor.serial]
        self._changed.notify()
        acceptor.exited.set()
        if self._is_serving(acceptor):
            self._serving_exits.send_nowait(acceptor)

    def _start_acceptor(self, plan: ProcessPlan, worker_argv: list[str],
                        pool: UidPool | None, index: int, generation: int,
                        count: int) -> _Acceptor:
        assert self.bound is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer_first: socket.socket | None = None
        peer_theirs: socket.socket | None = None
        if index > 0:
            # Acceptor 0 answers status and metrics for the whole set: it asks this one
            # over a socketpair made here, not by either acceptor.
            peer_first, peer_theirs = socket.socketpair(socket.AF_UNIX,
                                                        socket.SOCK_SEQPACKET)
        env = child_environment(os.environ)
        env[ENV_BOUND] = self.bound.environ_value()
        env[ENV_SUPERVISOR_FD] = str(theirs.fileno())
        env[ENV_SUPERVISOR_PID] = str(os.getpid())
        env[ENV_SUPERVISOR_ACCEPTOR] = f"{index}/{count}"
        pass_fds = [*self.bound.fds(), theirs.fileno()]
        if peer_theirs is not None:
            env[ENV_SUPERVISOR_PEER_FD] = str(peer_theirs.fileno())
            pass_fds.append(peer_theirs.fileno())
        if self._watchdog:
            env[ENV_WATCHDOG_USEC] = str(int(self._watchdog * 1e6))
        argv = [sys.executable, "-m", "handoffd.runtime.acceptor_process"]
        if self.config.path is not None:
            argv += ["--config", str(self.config.path.resolve())]
        try:
            child = ChildProcess.spawn(argv, env=env, pass_fds=tuple(pass_fds),
                                       credentials=plan.acceptor, new_session=True,
                                       cwd="/")
        except OSError as error:
            ours.close()
            if peer_first is not None:
                peer_first.close()
            raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_SPAWN_FAILED,
                           f"acceptor: {error.strerror}") from None
        finally:
            theirs.close()
            if peer_theirs is not None:
                peer_theirs.close()
        return _Acceptor(child, SupervisorLink(ours), self._serial, plan, worker_argv,
                         pool, index=index, generation=generation, peer_end=peer_first,
                         started=time.monotonic())

    async def _serve_link(self, acceptor: _Acceptor, nursery: trio.Nursery) -> None:
        while True:
            try:
                incoming = await acceptor.link.receive()
            except GSSError as error:
                if error.detail == "closed":
                    return
                log.error("acceptor sent a bad message: %s", error)
                continue
            message = incoming.message
            if isinstance(message, supervision.Spawn):
                # In a task of its own: it may wait for the other acceptors' GUEST
                # answers, which their links' readers deliver.
                nursery.start_soon(self._spawn, acceptor, message, incoming.fds, nursery)
            elif isinstance(message, supervision.Guest):
                await self._on_guest(acceptor, message, incoming.fds)
            elif isinstance(message, supervision.Signal):
                self._signal(acceptor, message)
            elif isinstance(message, supervision.Notify):
                self._on_notify(acceptor, message.fields)
            else:
                for fd in incoming.fds:  # a PEER is ours to send, never to receive
                    with contextlib.suppress(OSError):
                        os.close(fd)
                log.error("acceptor sent an unexpected %s", type(message).__name__)

    def _on_notify(self, acceptor: _Acceptor, fields: tuple[str, ...]) -> None:
        """Only the serving generation speaks for the service (a starting one is not
        ready yet as far as systemd knows, a draining one is not stopping), and of it
        acceptor 0; READY=1 goes out once every acceptor of it is ready."""
        ready = "READY=1" in fields
        if ready:
            acceptor.ready = True
            acceptor.became_ready.set()
        if self._notifier is None or not self._is_serving(acceptor):
            return
        forwarded = [f for f in fields if f != "READY=1"] if acceptor.index == 0 else []
        if ready and all(a is not None and a.ready for a in self._serving):
            forwarded.insert(0, "READY=1")
        if forwarded:
            self._notifier.notify(*forwarded)

    # ------------------------------------------------------------------ workers

    async def _spawn(self, acceptor: _Acceptor, request: supervision.Spawn, fds: list[int],
                     nursery: trio.Nursery) -> None:
        guests: list[tuple[_Acceptor, supervision.Guest, list[int]]] = []
        try:
            try:
                _check_grant_fds("SPAWN", request.grant, fds)
                if request.worker_id in self.workers:
                    raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK,
                                   "SPAWN of a worker id in use")
                guests = await self._gather_guests(acceptor, request.worker_id)
                answer: supervision.Message = self._start_worker(acceptor, request, fds,
                                                                 guests, nursery)
            except GSSError as error:
                log.error("cannot start a worker: %s", error)
                answer = supervision.SpawnFailed(request.worker_id, error.major, error.minor,
                                                 error.detail or "")
        finally:
            for fd in (*fds, *(fd for _, _, guest_fds in guests for fd in guest_fds)):
                with contextlib.suppress(OSError):
                    os.close(fd)
        for told in (acceptor, *(other for other, _, _ in guests)):
            with contextlib.suppress(GSSError):
                await told.link.send(answer)

    async def _gather_guests(self, home: _Acceptor, worker_id: bytes
                             ) -> list[tuple[_Acceptor, supervision.Guest, list[int]]]:
        """The shared pool: every other running acceptor of ``home``'s set is asked for a
        guest channel and key grant for the worker (ATTACH), each answer awaited up to
        :data:`GUEST_TIMEOUT`; one that declines, fails or is too late is left out."""
        others = [a for a in self._acceptors.values() if a.generation == home.generation
                  and a is not home and not a.exited.is_set()]
        answers: list[tuple[_Acceptor, supervision.Guest, list[int]]] = []

        async def ask(other: _Acceptor) -> None:
            send, receive = trio.open_memory_channel[tuple[supervision.Guest, list[int]]](1)
            key = (other.serial, worker_id)
            self._guest_waiters[key] = send
            try:
                with trio.move_on_after(GUEST_TIMEOUT):
                    await other.link.send(supervision.Attach(worker_id))
                    guest, fds = await receive.receive()
                    try:
                        if guest.declined:
                            raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK, "declined")
                        _check_grant_fds("GUEST", guest.grant, fds)
                    except GSSError as error:
                        log.info("acceptor %d gives worker %s no guest channel: %s",
                                 other.index, worker_id.hex()[:8], error.detail)
                        for fd in fds:
                            os.close(fd)
                        return
                    answers.append((other, guest, fds))
            except (GSSError, trio.EndOfChannel):
                pass  # that acceptor is gone
            finally:
                self._guest_waiters.pop(key, None)
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    # Its GUEST came just as the wait timed out: refuse it as a late one.
                    late, late_fds = receive.receive_nowait()
                    for fd in late_fds:
                        os.close(fd)
                    if not late.declined:
                        other.link.send_nowait(supervision.SpawnFailed(
                            worker_id, GSS_S_FAILURE, Minor.SUPERVISOR_LINK, "GUEST too late"))

        async with trio.open_nursery() as asking:
            for other in others:
                asking.start_soon(ask, other)
        return sorted(answers, key=lambda answer: answer[0].index)

    async def _on_guest(self, acceptor: _Acceptor, guest: supervision.Guest,
                        fds: list[int]) -> None:
        waiter = self._guest_waiters.pop((acceptor.serial, guest.worker_id), None)
        if waiter is not None:
            waiter.send_nowait((guest, fds))
            return
        for fd in fds:  # too late, or never asked: the acceptor must not wait for a worker
            os.close(fd)
        if not guest.declined:
            with contextlib.suppress(GSSError):
                await acceptor.link.send(supervision.SpawnFailed(
                    guest.worker_id, GSS_S_FAILURE, Minor.SUPERVISOR_LINK,
                    "GUEST for no worker being spawned"))

    def _start_worker(self, acceptor: _Acceptor, request: supervision.Spawn, fds: list[int],
                      guests: list[tuple[_Acceptor, supervision.Guest, list[int]]],
                      nursery: trio.Nursery) -> supervision.Spawned:
        if request.worker_id in self.workers:  # again: another SPAWN may have won the wait
            raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK, "SPAWN of a worker id in use")
        env = child_environment(os.environ)
        env.update(_granted(request.grant, fds))
        env[ENV_CHANNEL_FD] = str(fds[0])
        env[ENV_WORKER_ID] = request.worker_id.hex()
        env[ENV_ACCEPTOR_PID] = str(acceptor.child.pid)
        if guests:
            env[environment.GUESTS] = json.dumps([
                {"channel_fd": guest_fds[0], "acceptor_pid": other.child.pid,
                 "grant": _granted(guest.grant, guest_fds)}
                for other, guest, guest_fds in guests])
        pool, plan = acceptor.pool, acceptor.plan
        if pool is not None:
            uid = pool.take()
            credentials = (uid, plan.worker_group if plan.worker_group is not None else uid)
        else:
            assert plan.worker_shared is not None
            credentials = plan.worker_shared
        pass_fds = (*fds, *(fd for _, _, guest_fds in guests for fd in guest_fds))
        try:
            child = ChildProcess.spawn(acceptor.argv, env=env, pass_fds=pass_fds,
                                       credentials=credentials, new_session=True, cwd="/")
        except OSError as error:
            if pool is not None:
                pool.give_back(credentials[0])
            raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_SPAWN_FAILED,
                           f"worker: {error.strerror}") from None
        worker = Supervised(request.worker_id, child, credentials[0], pool is not None,
                            acceptor.serial, pool,
                            tuple(other.serial for other, _, _ in guests))
        self.workers[request.worker_id] = worker
        self._changed.notify()
        nursery.start_soon(self._reap, worker)
        return supervision.Spawned(request.worker_id, child.pid, credentials[0])

    async def _reap(self, worker: Supervised) -> None:
        status = await worker.child.wait()
        await self._kill_remains(worker)
        self.workers.pop(worker.worker_id, None)
        self._changed.notify()
        if worker.pool is not None:
            worker.pool.give_back(worker.uid)
        for serial in (worker.acceptor, *worker.guests):
            acceptor = self._acceptors.get(serial)
            if acceptor is not None:
                with contextlib.suppress(GSSError):
                    await acceptor.link.send(supervision.Exited(worker.worker_id, status))

    async def _kill_remains(self, worker: Supervised) -> None:
        """Whatever the worker started dies with it (see the module docstring)."""
        if worker.own_uid:
            await kill_everything_of(worker.uid)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.child.pid, signal.SIGKILL)

    def _signal(self, acceptor: _Acceptor, request: supervision.Signal) -> None:
        worker = self.workers.get(request.worker_id)
        if worker is None or not (worker.acceptor == acceptor.serial or (
                request.signum == signal.SIGKILL and acceptor.serial in worker.guests)):
            return
        if request.signum == signal.SIGKILL:
            if worker.own_uid:
                # Everything of its uid, not only the worker: a child it detached
                # must not keep the sessions of a worker declared dead.
                trio.lowlevel.spawn_system_task(kill_everything_of, worker.uid)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.child.pid, signal.SIGKILL)
        worker.child.send_signal(request.signum)

    async def _kill_leftovers(self) -> None:
        for worker in list(self.workers.values()):
            worker.child.kill()
            await self._kill_remains(worker)

    # ------------------------------------------------------------------ signals

    async def _watch_signals(self, signals: Any, nursery: trio.Nursery) -> None:
        async for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT):
                # One line as before for the one acceptor of the default (operators and
                # make test-docker read it), the count when there are several.
                count = self.config.server.acceptors
                log.info("received %s: %s", signal.Signals(signum).name,
                         "the acceptor drains" if count == 1 else f"the {count} acceptors drain")
                self._stopping = True
                if self._notifier is not None:
                    self._notifier.notify("STOPPING=1")
                # Kept until now for a restarted acceptor; once the acceptors close their
                # copies too, new connections are refused instead of queued.
                assert self.bound is not None
                for listener in (*self.bound.listeners, *self.bound.tls_listeners):
                    listener.close()
                # Every generation: a starting one stops, a draining one goes on draining;
                # workers an old one left drain their sessions as the others do.
                for running in list(self._acceptors.values()):
                    running.child.send_signal(signal.SIGTERM)
                for orphan in self._orphans():
                    orphan.child.send_signal(signal.SIGTERM)
                self._serving_exits.send_nowait(None)  # none running: nothing to wait for
            elif signum == signal.SIGUSR2:
                if self._incoming is not None or self._stopping:
                    log.warning("SIGUSR2 ignored: %s", "a restart is under way"
                                if not self._stopping else "stopping")
                else:
                    nursery.start_soon(self._restart, nursery)
            elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                # One worker more or fewer: from the acceptors in turn, so that their
                # shares stay within one of each other.
                serving = len(self._serving)
                if signum == signal.SIGTTOU:
                    self._resize_turn -= 1
                acceptor = self._serving[self._resize_turn % serving] if serving else None
                if signum == signal.SIGTTIN:
                    self._resize_turn += 1
                if acceptor is not None:
                    acceptor.child.send_signal(signum)
            else:
                if signum == signal.SIGHUP:
                    self._reload()
                for acceptor in self._serving:
                    if acceptor is not None:
                        acceptor.child.send_signal(signum)

    async def _restart(self, nursery: trio.Nursery) -> None:
        """SIGUSR2: a new acceptor generation (new code, the configuration re-read in
        full but for the bound sockets) takes over the listeners without a connection
        lost; the old generation hands over.  Any failure leaves the old one serving."""
        log.info("received SIGUSR2: starting a new acceptor generation")
        try:
            config, plan, kept = self._reread_in_full()
        except GSSError as error:
            log.error("restart failed, the running generation keeps serving: %s", error)
            return
        if kept:
            log.warning("restart: %s changed but the listening sockets are kept: stop and "
                        "start the service to apply", ", ".join(kept))
        self._notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}",
                     "STATUS=restarting: a new acceptor generation starts")
        pool = self._pool_for(plan)
        argv = worker_command(config)
        self._generations += 1
        generation, count = self._generations, config.server.acceptors
        incoming: list[_Acceptor] = []
        self._incoming = incoming
        try:
            try:
                for index in range(count):
                    incoming.append(self._launch(nursery, plan, argv, pool, index,
                                                 generation, count))
            except GSSError as error:
                for started in incoming:
                    started.child.send_signal(signal.SIGTERM)
                log.error("restart failed, the running generation keeps serving: %s", error)
                self._notify("READY=1",
                             "STATUS=restart failed: the running generation serves")
                return
            failure = await self._until_ready(incoming, config.workers.drain_timeout)
        finally:
            self._incoming = None
        if self._stopping:  # SIGTERM meanwhile reached every generation, this one too
            log.info("restart abandoned: stopping")
            return
        if failure is not None:
            for started in incoming:
                started.child.send_signal(signal.SIGTERM)
            log.error("restart failed: the new %s; the running generation keeps serving",
                      failure)
            self._notify("READY=1", "STATUS=restart failed: the running generation serves")
            return
        old, self._serving = self._serving, list[_Acceptor | None](incoming)
        self._generation = generation
        self._backoff.clear()
        self.config, self.plan, self._argv, self._pool = config, plan, argv, pool
        for retired in old:
            if retired is not None:
                # A ready acceptor hands over (stops accepting, exits; its workers finish
                # their sessions); one still starting after a crash has no client: it
                # stops.
                retired.child.send_signal(signal.SIGUSR2 if retired.ready
                                          else signal.SIGTERM)
        for started in incoming:
            if started.exited.is_set():  # died between ready and now: replace it
                self._serving_exits.send_nowait(started)
        pids = ", ".join(str(a.child.pid) for a in incoming)
        handing = ", ".join(str(a.child.pid) for a in old if a is not None)
        log.info("restarted: acceptor pid %s serves%s", pids,
                 f"; the old one (pid {handing}) hands over" if handing else "")
        self._notify("READY=1", "STATUS=restarted")

    def _reread_in_full(self) -> tuple[Config, ProcessPlan, list[str]]:
        """The configuration for a new generation, restart-only settings included, and
        the bound-socket settings that changed but are kept."""
        if self.config.path is None:
            return self.config, self.plan, []
        config, _, kept = merge_reloaded(self.config, load_config(self.config.path),
                                         kept_settings=BOUND_SOCKETS)
        return config, process_plan(config), kept

    def _pool_for(self, plan: ProcessPlan) -> UidPool | None:
        """The uid pool for a new generation: the same while the range is; otherwise a
        new one sharing the set of taken uids, so two live workers never share a uid."""
        if plan.worker_range is None:
            return None
        if self._pool is not None and (self._pool.first, self._pool.last) == plan.worker_range:
            return self._pool
        pool = UidPool(*plan.worker_range)
        if self._pool is not None:
            pool.used = self._pool.used
        return pool

    @staticmethod
    async def _until_ready(acceptors: list[_Acceptor], timeout: float) -> str | None:
        """None once every one of ``acceptors`` is ready; else why not (the first that
        exited, or that was not ready in time)."""
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as race:
                async def all_ready() -> None:
                    for acceptor in acceptors:
                        await acceptor.became_ready.wait()
                    race.cancel_scope.cancel()

                async def one_exited(event: trio.Event) -> None:
                    await event.wait()
                    race.cancel_scope.cancel()

                race.start_soon(all_ready)
                for acceptor in acceptors:
                    race.start_soon(one_exited, acceptor.exited)
        for acceptor in acceptors:
            if acceptor.exited.is_set() and not acceptor.ready:
                return (f"acceptor (pid {acceptor.child.pid}) exited with status "
                        f"{acceptor.status} before it was ready")
        for acceptor in acceptors:
            if not acceptor.ready:
                return (f"acceptor (pid {acceptor.child.pid}) was not ready within "
                        f"{timeout:g}s ([workers] drain_timeout)")
        return None

    def _notify(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(*fields)

    def _reload(self) -> None:
        """SIGHUP: workers spawned from now on run the re-read config's worker command
        (app, pythonpath, drain and log settings); the acceptor re-reads the rest."""
        if self.config.path is None:
            return
        try:
            config = load_config(self.config.path)
        except GSSError as error:
            log.error("reload: %s; workers keep the running configuration", error)
            return
        self.config, _, _ = merge_reloaded(self.config, config)
        self._argv = worker_command(self.config)
        for acceptor in self._serving:
            if acceptor is not None:
                acceptor.argv = self._argv
