"""The acceptor: the worker pool's manager and the only holder of the server's key.

It accepts TCP connections on the sockets the supervisor bound, runs the handshake
with each client, exports the context, seals it with a key parked in the target
worker's keyring and hands fd + sealed token to the worker with the fewest handoffs in
flight.  Workers are started through a :mod:`~handoffd.runtime.spawner`: by the
supervisor under uids of their own (the default), or forked here (only with
``[workers] insecure_same_uid``).

Never a second copy: the acceptor keeps its copy of a connection until the worker
acknowledges the import, but a handoff it has *sent* is never given to another
worker, even if that worker dies before acknowledging: a compromised worker can read
its parked key without burning the slot, so nothing here can prove it did not import
the context, and a second import would reuse the first one's nonces.  Such a session
dies with its worker and is counted (``died_after_claim`` when the slot shows the
claim, ``died_unclaimed`` otherwise).  Only a handoff the kernel refused to queue is
redelivered.  ``max_unacked`` bounds handoffs in flight per worker (and is its number
of key slots).

Signals: TERM/INT drain and stop, HUP rolls the workers, TTIN/TTOU grow and
shrink the pool, USR2 (from the supervisor, once a new acceptor generation is ready on
the same sockets) hands over: stop accepting and answering the control, metrics and
registration sockets, let the handshakes in progress reach a worker, exit.

This module is the acceptor's lifecycle (wiring, run, signals, reload, drain,
hand-over); each part it wires has a module of its own:

- :mod:`~handoffd.runtime.intake`: accept, handshake slots, handshakes, export;
- :mod:`~handoffd.runtime.dispatch`: which worker, the HANDOFF or batch, the ACK,
  the handoffs in flight and what a worker's death does to them;
- :mod:`~handoffd.runtime.pool`: the workers, their states and channels, respawn,
  roll, resize, the ACK watchdog;
- :mod:`~handoffd.runtime.registration`: external workers;
- :mod:`~handoffd.runtime.operations`, :mod:`~handoffd.runtime.peers`,
  :mod:`~handoffd.runtime.acceptor_stats`: status, metrics, systemd, the figures of an
  acceptor set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

from handoffd.config import Config, load_config, merge_reloaded, worker_share
from handoffd.core.admission import Admission
from handoffd.core.handoff import (
    Kind,
    Outcome,
)
from handoffd.kernel.channel import Channel
from handoffd.kernel.fdreserve import (
    FdReserve,
    nofile_needed,
    raise_nofile,
)
from handoffd.kernel.parking import KEYRING, AcceptorParking, check_quota
from handoffd.kernel.systemd import Notifier, watchdog_interval
from handoffd.logs import ThrottledLog
from handoffd.mech import acceptor_factories
from handoffd.mech.tls import TlsAcceptorFactory
from handoffd.minor import Minor
from handoffd.runtime import operations
from handoffd.runtime.acceptor_stats import Stats
from handoffd.runtime.acceptor_stats import merge_snapshots as merge_snapshots  # re-exported
from handoffd.runtime.binding import BoundSockets, bind_all, show_address
from handoffd.runtime.control import EndpointStats
from handoffd.runtime.dispatch import Dispatcher
from handoffd.runtime.dispatch import prepare_handoff as prepare_handoff  # re-exported
from handoffd.runtime.intake import Handshakes
from handoffd.runtime.peers import AcceptorPeers
from handoffd.runtime.pool import Pool, Worker, WorkerState, transition
from handoffd.runtime.registration import Registrations
from handoffd.runtime.spawner import (
    LocalChild,
    LocalSpawner,
    Spawner,
    SupervisedSpawner,
    spawn_local,
)
from handoffd.runtime.supervisor import ProcessPlan
from handoffd.status import GSS_S_FAILURE, GSSError

log = logging.getLogger("handoffd.acceptor")


class Daemon:
    """The acceptor + supervisor.  Run with ``await daemon.run(task_status=...)``."""

    pool: Pool
    """The workers: spawned slots, retiring and external ones (:mod:`.pool`)."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 bound: BoundSockets | None = None, spawner: Spawner | None = None,
                 notifier: Any = None, join_session: bool = True,
                 watchdog_period: float | None = None,
                 privsep: dict[str, Any] | None = None, acceptor_index: int = 0,
                 acceptors: int = 1, peer: int | None = None) -> None:
        self.config = config
        self.acceptor_index = acceptor_index
        """Which of the ``[server] acceptors`` this is (0 answers control and metrics for
        all, and takes external workers' registrations)."""
        self.acceptors = acceptors
        self.peer_fd = peer
        self.peers = AcceptorPeers(acceptors)
        if acceptor_index == 0 and isinstance(spawner, SupervisedSpawner):
            spawner.on_peer = self.peers.add
        if isinstance(spawner, SupervisedSpawner):
            # The shared pool: the other acceptors' workers take our handoffs too.
            attaching = spawner
            spawner.on_attach = lambda worker_id: self.pool.attach_guest(attaching, worker_id)
        self.bound = bound
        self.spawner: Spawner = spawner if spawner is not None else LocalSpawner(config)
        self.privsep = privsep if privsep is not None else ProcessPlan(
            False, (os.getuid(), os.getgid())).describe()
        self._join_session = join_session
        self.clock = clock
        self.stats = Stats()
        self.listeners: list[trio.SocketListener] = []
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: list[tuple[str, int]] = []
        # The enabled mechanisms by the DER OID a client's first token names: Noise loads
        # [server] key and allowed_clients, krb5 acquires its keytab's credentials.
        self.mechanisms = acceptor_factories(config, clock=clock)
        # [tls] listeners: OpenSSL loads the certificate and key (the acceptor's to read).
        self.tls = TlsAcceptorFactory.from_config(config) if config.tls.listen else None
        self.tls_listeners: list[trio.SocketListener] = []
        self.parking: AcceptorParking | None = None
        self.notifier = notifier if notifier is not None else Notifier.from_environ()
        if watchdog_period is None and notifier is None:
            interval = watchdog_interval()
            watchdog_period = interval / 2 if interval else None
        self._watchdog_period = watchdog_period
        server = config.server
        self.admission = Admission(server.max_handshakes, server.max_handshakes_per_source)
        self._throttled = ThrottledLog(log)
        self.dispatcher = Dispatcher(
            workers=lambda: (*self.pool.workers.values(), *self.pool.external.values(),
                             *self.pool.guests.values()),
            settings=lambda: self.config.workers, stats=self.stats,
            throttled=self._throttled, clock=clock,
            failing=lambda: self._fatal is not None,
            no_worker_left=lambda: self.pool.stopping and not self.pool.workers)
        self.pool = Pool(
            config=lambda: self.config, spawner=self.spawner, dispatcher=self.dispatcher,
            stats=self.stats, throttled=self._throttled,
            target_count=worker_share(config.workers.count, acceptor_index, acceptors),
            fail=self._fail, failing=lambda: self._fatal is not None,
            notify=self._notify, status_line=self._status_line)
        self.handshakes = Handshakes(
            admission=self.admission, config=lambda: self.config,
            mechanisms=lambda: self.mechanisms, tls=lambda: self.tls,
            dispatcher=self.dispatcher, stats=self.stats, throttled=self._throttled,
            acceptors=acceptors)
        self.registrations = Registrations(
            config=lambda: self.config, serve=self.pool.serve_external,
            out_of_fds=self.handshakes.out_of_fds, throttled=self._throttled)
        self._fd_reserve: FdReserve | None = None
        self.control_stats = EndpointStats()
        self.metrics_stats = EndpointStats()
        self._fatal: GSSError | None = None
        self._nursery: trio.Nursery | None = None
        self._roll_generation = 0
        self.operations_scope = trio.CancelScope()
        """Control, metrics and registrations: cancelled at a hand-over, since the new
        acceptor serves those sockets from then on."""

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Start workers, then listeners; serve until SIGTERM/SIGINT or :meth:`stop`."""
        if self.bound is None:
            self.bound = bind_all(self.config)
        self.parking = AcceptorParking.open(
            slots_per_worker=self.config.workers.max_unacked,
            mode=self.config.workers.keyring, join_session=self._join_session,
        )
        self.pool.parking = self.parking
        log.info("key parking mode: %s", self.parking.mode)
        self._log_fingerprint()
        self._fd_reserve = FdReserve(1)
        self.handshakes.fd_reserve = self._fd_reserve
        nofile_warning = raise_nofile(nofile_needed(self.config))
        if nofile_warning:
            log.warning("fd limit: %s", nofile_warning)
        if self.parking.mode == KEYRING:
            # Every acceptor's keys count on the one acceptor uid.
            warning = check_quota(max(self.pool.target_count, self.config.workers.count),
                                  self.config.workers.max_unacked, os.getuid(),
                                  self.acceptors)
            if warning:
                log.warning("key quota: %s", warning)
        if self.privsep["insecure_same_uid"]:
            log.warning("INSECURE: workers run under the acceptor's uid %d ([workers] "
                        "insecure_same_uid): a compromised worker can read the server key "
                        "from the acceptor's memory (%s)", os.getuid(),
                        Minor.PRIVSEP_SAME_UID.name)
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                           signal.SIGTTIN, signal.SIGTTOU,
                                           signal.SIGUSR2) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.pool.nursery = nursery
                    self.handshakes.nursery = nursery
                    self.dispatcher.nursery = nursery
                    nursery.start_soon(self._serve_spawner)
                    for index in range(self.pool.target_count):
                        nursery.start_soon(self.pool.manage_slot, index)
                    if not await self._ready_or_stopped(signals):
                        # SIGTERM before the pool was ever ready (spawns keep failing,
                        # e.g. for key quota): stop instead of waiting for it forever.
                        await self._shutdown()
                        nursery.cancel_scope.cancel()
                        return
                    await self._open_listeners()
                    for listener, bound in zip(self.listeners, self.bound.listeners,
                                               strict=True):
                        nursery.start_soon(self.handshakes.accept_loop, listener, bound)
                    for listener, bound in zip(self.tls_listeners, self.bound.tls_listeners,
                                               strict=True):
                        nursery.start_soon(self.handshakes.accept_loop, listener, bound, True)
                    await self._start_operations(nursery)
                    self._notify("READY=1", f"STATUS={self._status_line()}")
                    log.info("ready: %d workers, listening on %s", len(self.pool.workers),
                             ", ".join([*(show_address(h, p) for h, p in self.addresses),
                                        *(f"{show_address(h, p)} (TLS)"
                                          for h, p in self.tls_addresses)]))
                    task_status.started(self)
                    await self._handle_signals(signals)
                    if self.pool.handing_over:
                        await self._hand_over()
                    else:
                        await self._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            for listener in (*self.listeners, *self.tls_listeners):
                await listener.aclose()
            self.bound.close(unlink=not self.spawner.separated)
            for parking in (self.parking, self.registrations.parking):
                if parking is not None:
                    parking.close()
            if self.notifier is not None:
                self.notifier.close()
            self._throttled.flush()
            if self._fd_reserve is not None:
                self._fd_reserve.close()
        if self._fatal is not None:
            raise self._fatal

    def _log_fingerprint(self) -> None:
        for factory in self.mechanisms.values():
            static_key = getattr(factory, "static_key", None)
            if static_key is not None:  # Noise: what clients pin, at every (re)start
                log.info("server key %s, fingerprint %s", self.config.server.key,
                         static_key.fingerprint)

    async def _serve_spawner(self) -> None:
        try:
            await self.spawner.serve()
        except GSSError as error:
            self._fail(error)

    def stop(self) -> None:
        """Ask the daemon to drain and stop (as SIGTERM does)."""
        os.kill(os.getpid(), signal.SIGTERM)

    async def _handle_signals(self, signals: Any) -> None:
        stop = trio.Event()
        self._stop_event = stop

        async def watch() -> None:
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("received %s: draining", signal.Signals(signum).name)
                    stop.set()
                    return
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP: reloading the configuration, rolling workers")
                    self._reload()
                elif signum == signal.SIGUSR2:
                    if not self.spawner.separated:
                        log.warning("SIGUSR2 (restart without dropping connections) needs the "
                                    "supervisor: start serve as root; ignored")
                        continue
                    log.info("received SIGUSR2: handing the listeners over to a new acceptor")
                    self.pool.handing_over = True
                    self.operations_scope.cancel()
                    stop.set()
                    return
                elif signum == signal.SIGTTIN:
                    self.pool.resize(self.pool.target_count + 1)
                elif signum == signal.SIGTTOU:
                    self.pool.resize(self.pool.target_count - 1)

        assert self._nursery is not None
        self._nursery.start_soon(watch)
        await stop.wait()

    def _fail(self, error: GSSError) -> None:
        """A fatal condition (workers keep failing at boot): stop with this error."""
        if self._fatal is None:
            self._fatal = error
            log.error("fatal: %s", error)
            getattr(self, "_stop_event", trio.Event()).set()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            self.pool.changed.notify()

    async def _ready_or_stopped(self, signals: Any) -> bool:
        """True once every worker is ready; False if SIGTERM/SIGINT came first (other
        signals before then are logged and ignored: there is no pool to roll yet)."""
        ready = False

        async def wait_ready(scope: trio.CancelScope) -> None:
            nonlocal ready
            await self.pool.wait_ready()
            ready = True
            scope.cancel()

        async with trio.open_nursery() as race:
            race.start_soon(wait_ready, race.cancel_scope)
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("received %s before the workers were ready: stopping",
                             signal.Signals(signum).name)
                    race.cancel_scope.cancel()
                    break
                log.info("%s ignored: the workers are not ready yet",
                         signal.Signals(signum).name)
        return ready

    async def _hand_over(self) -> None:
        """SIGUSR2 (via the supervisor): stop accepting, let the handshakes in progress reach
        a worker and every handoff be acknowledged, then exit and leave the workers
        running: each sees its channel close and finishes its sessions (within
        ``drain_timeout``) while the supervisor's next acceptor takes new connections on
        the same listening sockets.  Nothing is refused: connections that arrive in
        between wait in the listen backlog."""
        self.pool.stopping = True
        self._notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}",
                     "STATUS=handing over to a new acceptor")
        for listener in (*self.listeners, *self.tls_listeners):
            await listener.aclose()
        with trio.move_on_after(self.config.server.handshake_timeout):
            while len(self.admission):
                await self.handshakes.slot_freed.wait()
        with trio.move_on_after(self.config.workers.ack_timeout):
            while any(w.in_flight for w in (*self.pool.workers.values(),
                                             *self.pool.guests.values())):
                await self.dispatcher.capacity.wait()
        log.info("handed over: %d workers finish their %d sessions on their own",
                 len(self.pool.workers) + len(self.pool.retiring),
                 sum(w.active for w in (*self.pool.workers.values(), *self.pool.retiring)))

    async def _shutdown(self) -> None:
        self.pool.stopping = True
        self._notify("STOPPING=1", "STATUS=draining")
        for listener in (*self.listeners, *self.tls_listeners):
            await listener.aclose()
        # Connections already handshaking get their chance to reach a worker.
        with trio.move_on_after(self.config.server.handshake_timeout):
            while len(self.admission):
                await self.handshakes.slot_freed.wait()
        everyone = [*self.pool.workers.values(), *self.pool.retiring]
        for w in everyone:
            self.pool.terminate(w)
        for w in [*self.pool.external.values(), *self.pool.guests.values()]:
            if w.state is WorkerState.READY and w.channel is not None:
                # We will send nothing more; an external worker finishes and leaves, a
                # guest takes no more from us (its own acceptor drains it).
                transition(w, WorkerState.DRAINING)
                with contextlib.suppress(GSSError):
                    await w.channel.send(Kind.DRAINED, b"")
        with trio.move_on_after(self.config.workers.drain_timeout + 2) as scope:
            for w in everyone:
                await w.gone.wait()
        if scope.cancelled_caught:
            for w in everyone:
                if w.process is not None and w.process.returncode is None:
                    log.warning("worker %s did not drain in time: SIGKILL", w.pid)
                    w.process.kill()
            with trio.move_on_after(2):  # their open sessions count as lost_with_worker
                for w in everyone:
                    await w.gone.wait()
        self._log_stopped(everyone)

    def _log_stopped(self, drained: list[Worker]) -> None:
        """The last line: how many sessions the drain cut, by worker and in total, and
        how every session of the daemon's life ended."""
        cut = [w for w in drained if w.cut_at_drain]
        log.info("stopped: %d sessions cut at drain%s; sessions ended: %s",
                 sum(w.cut_at_drain for w in cut),
                 " (" + ", ".join(f"worker {w.index} pid {w.pid}: {w.cut_at_drain}"
                                  for w in cut) + ")" if cut else "",
                 ", ".join(f"{outcome} {self.stats.sessions_ended[outcome]}" for outcome
                           in (*(o.name.lower() for o in Outcome), "lost_with_worker")))

    # ------------------------------------------------------------------ workers

    def _reload(self) -> None:
        """SIGHUP: re-read the config file and what it names (server key, allow-list,
        keytab); apply it to new connections and roll the workers.  Connections in
        progress and sessions keep what they started with.  A config that does not load
        changes nothing (logged); settings that need a restart are logged and kept."""
        if self.config.path is not None:
            try:
                new = load_config(self.config.path)
                config, changed, need_restart = merge_reloaded(self.config, new)
                mechanisms = acceptor_factories(config, clock=self.clock)
                tls = TlsAcceptorFactory.from_config(config) if config.tls.listen else None
            except GSSError as error:
                log.error("reload failed, nothing changed: %s", error)
                return
            if need_restart:
                log.warning("reload: %s changed but take effect at the next restart",
                            ", ".join(need_restart))
            log.info("reloaded %s: %s", self.config.path,
                     ", ".join(changed) if changed else "no setting changed")
            self.config = config
            self.mechanisms = mechanisms
            self.tls = tls
            self.admission.capacity = config.server.max_handshakes
            self.admission.per_source = config.server.max_handshakes_per_source
            self.spawner.reconfigure(config)
            self._log_fingerprint()
            share = worker_share(config.workers.count, self.acceptor_index, self.acceptors)
            if share != self.pool.target_count:
                self.pool.resize(share)
        self.pool.roll()

    # ------------------------------------------------------------------ acceptor

    async def _open_listeners(self) -> None:
        assert self.bound is not None
        for sock in self.bound.listeners:
            self.listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            self.addresses.append(sock.getsockname()[:2])
        if self.bound.tls_listeners and self.tls is None:
            raise GSSError(GSS_S_FAILURE, Minor.CONFIG_INVALID,
                           "[tls] listen: sockets for TLS were passed, but [tls] is not configured")
        for sock in self.bound.tls_listeners:
            self.tls_listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            self.tls_addresses.append(sock.getsockname()[:2])
        if self.bound.activated:
            log.info("using %d socket(s) from systemd activation", len(self.listeners))

    # ------------------------------------------------------------------ operations

    async def _start_operations(self, nursery: trio.Nursery) -> None:
        await nursery.start(operations.serve_operations, self)
        if self.notifier is not None and self._watchdog_period:
            nursery.start_soon(operations.systemd_watchdog, self, self._watchdog_period)

    def _notify(self, *fields: str) -> None:
        if self.notifier is not None:
            self.notifier.notify(*fields)

    def _status_line(self) -> str:
        return operations.status_line(self)

    async def gathered_snapshot(self) -> dict[str, Any]:
        """What ``handoffd status`` and the metrics show (:mod:`.operations`)."""
        return await operations.gathered_snapshot(self)

    def snapshot(self) -> dict[str, Any]:
        """This acceptor's part of what ``handoffd status`` shows (:mod:`.operations`)."""
        return operations.snapshot(self)


def spawn_worker(parking: AcceptorParking, worker_id: bytes, app: str,
                 args: list[str] | None = None, *,
                 credentials: tuple[int, int] | None = None) -> tuple[LocalChild, Channel]:
    """Fork+exec one worker running ``app`` from this process (in-process tests and
    benchmarks; the daemon goes through its spawner).  See :func:`spawn_local`."""
    argv = [sys.executable, "-m", "handoffd.runtime.worker_process", "--app", app, *(args or [])]
    return spawn_local(parking, worker_id, argv, credentials=credentials)
