"""The daemon: supervisor of the worker pool and acceptor of client connections.

One process holds the server's long-term key.  It spawns N workers (never
forking inside ``trio.run``: :mod:`handoffd.runtime.process` fork+execs them in C),
accepts TCP connections, runs the handshake with each client, exports the
context, seals it with a key parked in the target worker's keyring and hands
fd + sealed token to the worker with the fewest handoffs in flight.

Nothing is lost: the acceptor keeps its copy of a connection (and the
exported state) until the worker acknowledges the import.  If the worker dies
first, the connection is redelivered to another worker; the worker never
touched it, because it acknowledges before its first I/O.  ``max_unacked``
bounds handoffs in flight per worker (and is its number of key slots).

Signals: TERM/INT drain and stop, HUP rolls the workers, TTIN/TTOU grow and
shrink the pool.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from handoffd.config import Config, parse_address, worker_credentials
from handoffd.core.framing import FrameDecoder
from handoffd.core.handoff import (
    FD_KINDS,
    Ack,
    Handoff,
    Hello,
    Kind,
    Refused,
    Registered,
    expect_empty,
)
from handoffd.core.seal import seal
from handoffd.kernel.channel import Channel
from handoffd.kernel.parking import AcceptorParking
from handoffd.kernel.peer import PeerPolicy
from handoffd.kernel.systemd import Notifier, listen_fds, watchdog_interval
from handoffd.mech import NOISE, acceptor_factories
from handoffd.minor import Minor
from handoffd.runtime import worker as worker_lib
from handoffd.runtime.process import ChildProcess
from handoffd.runtime.wire import accept_any_handshake, send_error
from handoffd.status import GSS_S_FAILURE, GSSError, status_name

log = logging.getLogger("handoffd.acceptor")

MECH_NOISE = NOISE.seal_id
SEAL_LIFETIME = 30.0
"""Seconds a sealed handoff token stays valid: it only has to cross one socketpair."""

_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_SEND_ATTEMPTS = 5
_SEND_RETRY_DELAY = 0.05
"""A HANDOFF the kernel refused to queue is tried again after 0.05, 0.1, ... s (to any
worker); after ``_SEND_ATTEMPTS`` refusals the connection is dropped and logged."""


@dataclass
class Pending:
    """A connection handed to a worker and not yet acknowledged."""

    handoff_id: int
    stream: trio.SocketStream
    inner: bytes
    handshake_done: float
    peer: str
    mech: int = MECH_NOISE  # seal id of the exported context's mechanism (handoffd.mech)
    key_ref: bytes = b""
    deliveries: int = 0
    sent_at: float = 0.0  # time.monotonic() of the last delivery


@dataclass
class Worker:
    """One worker process incarnation."""

    index: int
    worker_id: bytes
    parking: AcceptorParking
    process: ChildProcess | None = None
    external_pid: int | None = None  # registered over the socket, not spawned by us
    channel: Channel | None = None
    state: str = "starting"  # starting -> ready -> draining -> dead
    in_flight: dict[int, Pending] = field(default_factory=dict)
    handled: int = 0
    started: float = field(default_factory=time.monotonic)
    ready: trio.Event = field(default_factory=trio.Event)
    gone: trio.Event = field(default_factory=trio.Event)

    @property
    def pid(self) -> int | None:
        """The worker's pid (spawned or registered), if it has one yet."""
        return self.process.pid if self.process else self.external_pid

    @property
    def external(self) -> bool:
        """True for a worker that registered over the socket."""
        return self.external_pid is not None


class Stats:
    """Counters and a latency sample for status and metrics."""

    def __init__(self) -> None:
        self.started = time.time()
        self.accepted = 0
        self.handshakes_ok = 0
        self.handshake_failures: Counter[str] = Counter()
        self.handoffs = 0
        self.acked = 0
        self.refused_by_worker: Counter[str] = Counter()
        self.redelivered = 0
        self.lost = 0
        self.worker_restarts = 0
        self.accept_errors = 0
        self.latencies: deque[float] = deque(maxlen=4096)

    def latency_quantiles(self) -> dict[str, float | None]:
        """p50 and p99 of the recent handoff latencies, in microseconds."""
        sample = sorted(self.latencies)
        if not sample:
            return {"p50": None, "p99": None}

        def q(p: float) -> float:
            return sample[min(len(sample) - 1, int(p * len(sample)))] * 1e6

        return {"p50": q(0.50), "p99": q(0.99)}


class Daemon:
    """The acceptor + supervisor.  Run with ``await daemon.run(task_status=...)``."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.stats = Stats()
        self.workers: dict[int, Worker] = {}
        self.retiring: list[Worker] = []
        self.external: dict[bytes, Worker] = {}
        self._external_parking: AcceptorParking | None = None
        self._external_index = itertools.count(1000)
        self.registrations_refused = 0
        self.target_count = config.workers.count
        self.restarts: Counter[int] = Counter()
        self.listeners: list[trio.SocketListener] = []
        self.addresses: list[tuple[str, int]] = []
        # The enabled mechanisms by the DER OID a client's first token names: Noise loads
        # [server] key and allowed_clients, krb5 acquires its keytab's credentials.
        self.mechanisms = acceptor_factories(config, clock=clock)
        self.parking: AcceptorParking | None = None
        self.notifier = Notifier.from_environ()
        self._handoff_ids = itertools.count(1)
        self._capacity = trio.Event()
        self._handshake_slots = trio.Semaphore(config.server.max_handshakes)
        self._boot_failures = 0
        self._stopping = False
        self._fatal: GSSError | None = None
        self._nursery: trio.Nursery | None = None
        self._roll_generation = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Start workers, then listeners; serve until SIGTERM/SIGINT or :meth:`stop`."""
        self.parking = AcceptorParking.open(
            slots_per_worker=self.config.workers.max_unacked,
            mode=self.config.workers.keyring,
        )
        log.info("key parking mode: %s", self.parking.mode)
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                           signal.SIGTTIN, signal.SIGTTOU) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for index in range(self.target_count):
                        nursery.start_soon(self._manage_slot, index)
                    await self._wait_workers_ready()
                    await self._open_listeners()
                    for listener in self.listeners:
                        nursery.start_soon(self._accept_loop, listener)
                    await self._start_operations(nursery)
                    self._notify("READY=1", f"STATUS={self._status_line()}")
                    log.info("ready: %d workers, listening on %s", len(self.workers),
                             ", ".join(f"{h}:{p}" for h, p in self.addresses))
                    task_status.started(self)
                    await self._handle_signals(signals)
                    await self._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            for listener in self.listeners:
                await listener.aclose()
            for parking in (self.parking, self._external_parking):
                if parking is not None:
                    parking.close()
            if self.notifier is not None:
                self.notifier.close()
        if self._fatal is not None:
            raise self._fatal

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
                    log.info("received SIGHUP: rolling workers")
                    self._roll()
                elif signum == signal.SIGTTIN:
                    self._resize(self.target_count + 1)
                elif signum == signal.SIGTTOU:
                    self._resize(self.target_count - 1)

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

    # ------------------------------------------------------------------ external workers

    async def _serve_registrations(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept external workers on a Unix socket; policy decides who may register."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path.unlink(missing_ok=True)
        await sock.bind(str(path))
        # Anyone may knock; SO_PEERCRED and the [policy] section decide who gets in.
        os.chmod(path, 0o666)
        sock.listen(64)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as error:
                        if error.errno not in _ACCEPT_CAPACITY_ERRNOS:
                            raise
                        # Out of fds: wait like the client accept loop instead of dying.
                        log.error("registration accept: %s; waiting for capacity",
                                  os.strerror(error.errno or 0))
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._register, conn)
        finally:
            sock.close()
            path.unlink(missing_ok=True)

    def _registration_policy(self) -> PeerPolicy:
        p = self.config.policy
        return PeerPolicy(
            uids=frozenset(p.worker_uids) if p.worker_uids else frozenset({os.getuid()}),
            gids=frozenset(p.worker_gids) if p.worker_gids else None,
            labels=frozenset(label.encode() for label in p.worker_labels)
            if p.worker_labels else None,
            require_label=p.require_label,
        )

    async def _register(self, conn: trio.socket.SocketType) -> None:
        channel = Channel(conn, fd_kinds=FD_KINDS, validate_fd=None)
        try:
            identity = channel.peer_identity()
            self._registration_policy().check(identity)
        except GSSError as error:
            self.registrations_refused += 1
            log.warning("external worker registration refused: %s", error)
            with contextlib.suppress(GSSError):
                await channel.send(Kind.REFUSED, Refused(error.major, error.minor).encode())
            channel.close()
            return
        try:
            if self._external_parking is None:
                # External workers cannot inherit a keyring: their keys are derived from a
                # secret handed over as a pipe fd (docs/KEYRING.md, fallback mode).
                self._external_parking = AcceptorParking.open(
                    slots_per_worker=self.config.workers.max_unacked, mode="fallback")
            w = Worker(index=next(self._external_index), worker_id=os.urandom(16),
                       parking=self._external_parking, external_pid=identity.pid,
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
        self.external[w.worker_id] = w
        log.info("external worker pid %s uid %s registered", identity.pid, identity.uid)
        try:
            await self._read_channel(w)
        finally:
            await self._worker_gone(w)

    async def _wait_workers_ready(self) -> None:
        while not all(w.ready.is_set() for w in self.workers.values()) or (
            len(self.workers) < self.target_count
        ):
            if self._fatal is not None:
                await trio.sleep_forever()  # the nursery is being cancelled
            await trio.sleep(0.01)

    async def _shutdown(self) -> None:
        self._stopping = True
        self._notify("STOPPING=1", "STATUS=draining")
        for listener in self.listeners:
            await listener.aclose()
        # Connections already handshaking get their chance to reach a worker.
        with trio.move_on_after(self.config.server.handshake_timeout):
            while self._handshake_slots.value < self.config.server.max_handshakes:
                await trio.sleep(0.01)
        everyone = [*self.workers.values(), *self.retiring]
        for w in everyone:
            self._terminate(w)
        for w in list(self.external.values()):
            if w.state == "ready" and w.channel is not None:
                # We will send nothing more; the external worker finishes and leaves.
                w.state = "draining"
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
        log.info("stopped")

    # ------------------------------------------------------------------ workers

    async def _manage_slot(self, index: int) -> None:
        """Keep one worker alive at ``index``: spawn, watch, respawn with backoff."""
        backoff = 0.05
        while not self._stopping and index < self.target_count:
            assert self.parking is not None
            w = Worker(index=index, worker_id=os.urandom(16), parking=self.parking)
            self.workers[index] = w
            await self._run_worker(w)
            if self.workers.get(index) is not w:
                return  # retired (roll, resize): whoever retired it refilled the slot
            if self._stopping or index >= self.target_count:
                del self.workers[index]
                return
            lived = time.monotonic() - w.started
            backoff = 0.05 if lived > 10 else min(backoff * 2,
                                                  self.config.workers.restart_backoff_max)
            self.restarts[index] += 1
            self.stats.worker_restarts += 1
            await trio.sleep(backoff)

    async def _run_worker(self, w: Worker) -> None:
        assert self.parking is not None
        args = ["--drain-timeout", str(self.config.workers.drain_timeout),
                "--log-level", self.config.log.level, "--log-format", self.config.log.format]
        for path in self.config.workers.pythonpath:
            args += ["--pythonpath", path]
        for label in self.config.policy.acceptor_labels:
            args += ["--acceptor-label", label]
        try:
            w.process, w.channel = spawn_worker(
                self.parking, w.worker_id, self.config.workers.app, args,
                credentials=worker_credentials(self.config.workers))
        except (GSSError, OSError) as error:
            # Out of keyring quota (EDQUOT), fds or processes: not the application's
            # fault, so not a boot failure; the slot retries with backoff.
            log.error("cannot spawn worker %d: %s", w.index, error)
            w.state = "dead"
            w.gone.set()
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_channel, w)
                nursery.start_soon(self._ack_watchdog, w)
                await w.process.wait()
                nursery.cancel_scope.cancel()
        finally:
            await self._worker_gone(w)

    async def _ack_watchdog(self, w: Worker) -> None:
        """A worker holding a handoff past ``ack_timeout`` is stuck: kill it.

        Killing, not redelivering behind its back: a live worker might still claim and
        import the handoff, and two workers would then share the client.  Once it is
        dead, the usual path redelivers what it never acknowledged.
        """
        assert w.process is not None
        timeout = self.config.workers.ack_timeout
        while True:
            await trio.sleep(timeout / 4)
            now = time.monotonic()
            late = [p.handoff_id for p in w.in_flight.values() if now - p.sent_at > timeout]
            if late:
                log.error("worker %s did not acknowledge handoff %d within %gs: killing it",
                          w.pid, late[0], timeout)
                w.process.kill()
                return

    async def _read_channel(self, w: Worker) -> None:
        assert w.channel is not None
        while True:
            try:
                message = await w.channel.receive()
            except GSSError as error:
                if error.minor == Minor.CHANNEL_CLOSED:
                    return
                log.warning("worker %s sent a bad message: %s", w.pid, error)
                continue
            if message.fd is not None:  # pragma: no cover - workers never send fds
                os.close(message.fd)
            try:
                await self._on_worker_message(w, message.kind, message.payload)
            except GSSError as error:
                log.warning("worker %s sent a bad %s message: %s", w.pid, message.kind, error)

    async def _on_worker_message(self, w: Worker, kind: int, payload: bytes) -> None:
        if kind == Kind.HELLO:
            hello = Hello.decode(payload)
            if hello.worker_id != w.worker_id or hello.pid != w.pid:
                raise GSSError(GSS_S_FAILURE, Minor.PEER_PID_MISMATCH, "HELLO does not match")
            w.parking.worker_adopted(w.worker_id)
            w.state = "ready"
            w.ready.set()
            self._boot_failures = 0
            self._wake_dispatchers()
            log.info("worker %d ready (pid %s)", w.index, w.pid)
        elif kind == Kind.ACK:
            self._on_ack(w, Ack.decode(payload))
        elif kind == Kind.DRAINING:
            expect_empty(Kind.DRAINING, payload)
            self._retire(w)
            assert w.channel is not None
            await w.channel.send(Kind.DRAINED, b"")
        else:
            raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_BAD_HEADER, f"unexpected kind {kind}")

    def _on_ack(self, w: Worker, ack: Ack) -> None:
        pending = w.in_flight.pop(ack.handoff_id, None)
        if pending is None:
            log.warning("worker %s acknowledged unknown handoff %d", w.pid, ack.handoff_id)
            return
        w.parking.release(w.worker_id, pending.key_ref)
        pending.inner = b""
        self._close_copy(pending)
        if ack.major == 0:
            w.handled += 1
            self.stats.acked += 1
            latency = time.perf_counter() - pending.handshake_done
            self.stats.latencies.append(latency)
            log.debug("handoff %d of %s imported by worker %s in %.0f us", ack.handoff_id,
                      pending.peer, w.pid, latency * 1e6)
        else:
            name = status_name(ack.major)
            self.stats.refused_by_worker[name] += 1
            log.warning("worker %s refused handoff %d from %s: %s", w.pid, ack.handoff_id,
                        pending.peer, GSSError(ack.major, ack.minor))
        self._wake_dispatchers()

    def _close_copy(self, pending: Pending) -> None:
        # Closing our copy of the fd does not touch the connection the worker holds.
        pending.stream.socket.close()

    async def _worker_gone(self, w: Worker) -> None:
        w.state = "dead"
        if w.channel is not None:
            w.channel.close()
        w.parking.remove_worker(w.worker_id)
        if w.external:
            self.external.pop(w.worker_id, None)
            log.info("external worker %s left", w.pid)
        elif not w.ready.is_set():
            self._boot_failures += 1
            log.warning("worker %d (pid %s) exited with %s before it was ready",
                        w.index, w.pid, w.process.returncode if w.process else None)
            if self._boot_failures >= self.config.workers.boot_failures_max:
                self._fail(GSSError(GSS_S_FAILURE, Minor.WORKER_BOOT_FAILED,
                                    f"{self._boot_failures} workers in a row exited before "
                                    f"they were ready; last exit status "
                                    f"{w.process.returncode if w.process else None}"))
        elif not self._stopping and w not in self.retiring:
            log.warning("worker %d (pid %s) died with exit status %s", w.index, w.pid,
                        w.process.returncode if w.process else None)
        if w in self.retiring:
            self.retiring.remove(w)
        w.gone.set()
        unacked = list(w.in_flight.values())
        w.in_flight.clear()
        for pending in unacked:
            # The worker never acknowledged: it never used the connection.  Send it elsewhere.
            self.stats.redelivered += 1
            log.info("redelivering handoff %d from %s (worker %s died)", pending.handoff_id,
                     pending.peer, w.pid)
            assert self._nursery is not None
            self._nursery.start_soon(self._dispatch, pending)
        self._wake_dispatchers()

    def _terminate(self, w: Worker) -> None:
        if w.process is not None and w.process.returncode is None:
            w.process.send_signal(signal.SIGTERM)

    def _retire(self, w: Worker) -> None:
        """The worker drains: no new handoffs; its slot is refilled at once."""
        if w.state == "draining":
            return
        w.state = "draining"
        if self.workers.get(w.index) is w:
            self.retiring.append(w)
            del self.workers[w.index]
            if not self._stopping and w.index < self.target_count and self._nursery:
                self._nursery.start_soon(self._manage_slot, w.index)

    def _roll(self) -> None:
        """SIGHUP: every current worker drains; fresh ones take its place."""
        self._notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        for w in list(self.workers.values()):
            self._terminate(w)
        self._notify("READY=1")

    def _resize(self, count: int) -> None:
        count = max(1, count)
        old = self.target_count
        self.target_count = count
        log.info("resizing pool from %d to %d workers", old, count)
        assert self._nursery is not None
        for index in range(old, count):
            self._nursery.start_soon(self._manage_slot, index)
        for index in range(count, old):
            w = self.workers.get(index)
            if w is not None:
                self._terminate(w)

    # ------------------------------------------------------------------ acceptor

    async def _open_listeners(self) -> None:
        activated = listen_fds()
        if activated:
            for sock in activated:
                s = socket.socket(fileno=sock.fd)
                s.setblocking(False)
                self.listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(s)))
                self.addresses.append(s.getsockname()[:2])
            log.info("using %d socket(s) from systemd activation", len(activated))
            return
        for address in self.config.server.listen:
            host, port = parse_address(address)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = trio.socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await listener.bind((host, port))
            listener.listen(self.config.server.backlog)
            self.listeners.append(trio.SocketListener(listener))
            self.addresses.append(listener.getsockname()[:2])

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        assert self._nursery is not None
        while True:
            await self._handshake_slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as error:
                self._handshake_slots.release()
                if error.errno in _ACCEPT_CAPACITY_ERRNOS:
                    self.stats.accept_errors += 1
                    log.error("accept: %s; waiting for capacity", os.strerror(error.errno or 0))
                    await trio.sleep(0.1)
                    continue
                raise
            except trio.ClosedResourceError:
                self._handshake_slots.release()
                return  # listener closed: we are draining
            except BaseException:
                self._handshake_slots.release()
                raise
            self.stats.accepted += 1
            self._nursery.start_soon(self._serve_client, stream)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        """Handshake, then hand off; holds one handshake slot until a worker has it."""
        peer = _peer_text(stream)
        try:
            decoder = FrameDecoder()
            try:
                with trio.fail_after(self.config.server.handshake_timeout):
                    mechanism, context = await accept_any_handshake(
                        stream, self.mechanisms, decoder)
            except trio.TooSlowError:
                raise GSSError(GSS_S_FAILURE, Minor.HANDSHAKE_TIMEOUT,
                               f"{self.config.server.handshake_timeout:g}s") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise GSSError(GSS_S_FAILURE, Minor.PEER_CLOSED) from None
            done = time.perf_counter()
            self.stats.handshakes_ok += 1
            inner = context.export(unread=decoder.unread())
            pending = Pending(next(self._handoff_ids), stream, inner, done,
                              f"{peer} ({context.peer_name})", mech=mechanism.info.seal_id)
        except GSSError as error:
            self.stats.handshake_failures[status_name(error.major)] += 1
            log.info("connection from %s closed: %s", peer, error)
            if error.minor != Minor.PEER_CLOSED:
                await send_error(stream, error)
            await stream.aclose()
            self._handshake_slots.release()
            return
        try:
            await self._dispatch(pending)
        finally:
            self._handshake_slots.release()

    def _pick_worker(self) -> Worker | None:
        limit = self.config.workers.max_unacked
        candidates = [w for w in (*self.workers.values(), *self.external.values())
                      if w.state == "ready" and len(w.in_flight) < limit]
        if not candidates:
            return None
        return min(candidates, key=lambda w: (len(w.in_flight), w.handled))

    def _wake_dispatchers(self) -> None:
        self._capacity.set()
        self._capacity = trio.Event()

    async def _dispatch(self, pending: Pending) -> None:
        """Send a connection to the least-loaded worker; wait while all are full."""
        assert self.parking is not None
        send_failures = 0
        while True:
            if self._fatal is not None:
                self._drop(pending, "the daemon is failing")
                return
            w = self._pick_worker()
            if w is None:
                if self._stopping and not self.workers:
                    self._drop(pending, "no worker left while stopping")
                    return
                await self._capacity.wait()
                continue
            try:
                pending.key_ref, message = prepare_handoff(
                    w.parking, w.worker_id, pending.handoff_id, pending.inner, self.clock(),
                    mech=pending.mech)
            except GSSError as error:
                log.warning("cannot park a key for worker %s: %s", w.pid, error)
                # An ack frees keys, but the quota may be held by someone else: retry soon.
                with trio.move_on_after(0.2):
                    await self._capacity.wait()
                continue
            w.in_flight[pending.handoff_id] = pending
            pending.deliveries += 1
            pending.sent_at = time.monotonic()
            assert w.channel is not None
            try:
                await w.channel.send(Kind.HANDOFF, message, fd=pending.stream.socket.fileno())
            except GSSError as error:
                if (error.minor == Minor.CHANNEL_CLOSED
                        or w.in_flight.pop(pending.handoff_id, None) is None):
                    # The worker is going away; its death redelivers everything in flight.
                    log.warning("handoff %d to worker %s failed: %s", pending.handoff_id,
                                w.pid, error)
                    return
                # A SEQPACKET datagram goes whole or not at all (ENOBUFS, ETOOMANYREFS...):
                # the worker never saw this one.  Take it back and send it again, rather
                # than leave it to the ACK watchdog, which would kill a healthy worker.
                w.parking.release(w.worker_id, pending.key_ref)
                send_failures += 1
                if send_failures >= _SEND_ATTEMPTS:
                    self._drop(pending, f"handoff not sent after {send_failures} tries: {error}")
                    return
                log.warning("handoff %d to worker %s not sent (%s): retrying",
                            pending.handoff_id, w.pid, error)
                self._wake_dispatchers()
                await trio.sleep(_SEND_RETRY_DELAY * send_failures)
                continue
            self.stats.handoffs += 1
            return

    def _drop(self, pending: Pending, why: str) -> None:
        self.stats.lost += 1
        log.error("connection %s dropped: %s", pending.peer, why)
        pending.inner = b""
        self._close_copy(pending)

    # ------------------------------------------------------------------ operations

    async def _start_operations(self, nursery: trio.Nursery) -> None:
        from handoffd.runtime import control

        if self.config.workers.register_socket is not None:
            await nursery.start(self._serve_registrations, self.config.workers.register_socket)
        if self.config.control.socket is not None:
            await nursery.start(control.serve_control, self, self.config.control.socket)
        if self.config.control.metrics is not None:
            await nursery.start(control.serve_metrics, self, self.config.control.metrics)
        interval = watchdog_interval()
        if self.notifier is not None and interval:
            nursery.start_soon(self._watchdog, interval / 2)

    async def _watchdog(self, period: float) -> None:
        assert self.notifier is not None
        while True:
            self.notifier.watchdog()
            self.notifier.status(self._status_line())
            await trio.sleep(period)

    def _notify(self, *fields: str) -> None:
        if self.notifier is not None:
            self.notifier.notify(*fields)

    def _status_line(self) -> str:
        ready = sum(1 for w in self.workers.values() if w.state == "ready")
        return (f"{ready}/{self.target_count} workers ready, {self.stats.acked} handoffs, "
                f"{sum(self.stats.handshake_failures.values())} handshake failures")

    def snapshot(self) -> dict[str, Any]:
        """Everything ``handoffd status`` shows, as plain data."""
        workers = [*self.workers.values(), *self.retiring, *self.external.values()]
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.stats.started, 3),
            "state": "stopping" if self._stopping else "running",
            "key_parking": self.parking.mode if self.parking else None,
            "listen": [f"{h}:{p}" for h, p in self.addresses],
            "workers": [
                {
                    "index": w.index,
                    "pid": w.pid,
                    "state": w.state,
                    "in_flight": len(w.in_flight),
                    "handled": w.handled,
                    "restarts": self.restarts[w.index],
                    "external": w.external,
                }
                for w in sorted(workers, key=lambda w: (w.index, w.started))
            ],
            "totals": {
                "accepted": self.stats.accepted,
                "handshakes_ok": self.stats.handshakes_ok,
                "handoffs": self.stats.handoffs,
                "acked": self.stats.acked,
                "redelivered": self.stats.redelivered,
                "lost": self.stats.lost,
                "worker_restarts": self.stats.worker_restarts,
                "accept_errors": self.stats.accept_errors,
                "registrations_refused": self.registrations_refused,
            },
            "handshake_failures": dict(self.stats.handshake_failures),
            "refused_by_worker": dict(self.stats.refused_by_worker),
            "handoff_latency_us": self.stats.latency_quantiles(),
        }


def spawn_worker(parking: AcceptorParking, worker_id: bytes, app: str,
                 args: list[str] | None = None, *,
                 credentials: tuple[int, int] | None = None) -> tuple[ChildProcess, Channel]:
    """Fork+exec one worker process with its channel end and key grant.

    This process creates the socketpair, so the worker's ``SO_PEERCRED`` on
    its end names us: that is how the worker knows its acceptor.
    ``credentials``: ``(uid, gid)`` the worker runs as (``[workers] user``).
    """
    grant = parking.add_worker(worker_id)
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError:  # EMFILE: give the grant back (keys and its pipe) before raising
        for fd in grant.pass_fds:
            os.close(fd)
        parking.remove_worker(worker_id)
        raise
    env = dict(os.environ)
    env.update(grant.env)
    env[worker_lib.ENV_CHANNEL_FD] = str(theirs.fileno())
    env[worker_lib.ENV_WORKER_ID] = worker_id.hex()
    env[worker_lib.ENV_ACCEPTOR_PID] = str(os.getpid())
    argv = [sys.executable, "-m", "handoffd.runtime.worker_process", "--app", app, *(args or [])]
    try:
        process = ChildProcess.spawn(argv, env=env, pass_fds=(theirs.fileno(), *grant.pass_fds),
                                     credentials=credentials)
    except BaseException:
        ours.close()
        parking.remove_worker(worker_id)
        raise
    finally:
        theirs.close()
        for fd in grant.pass_fds:
            os.close(fd)
    channel = Channel(trio.socket.from_stdlib_socket(ours), fd_kinds=FD_KINDS, validate_fd=None)
    return process, channel


def prepare_handoff(parking: AcceptorParking, worker_id: bytes, handoff_id: int, inner: bytes,
                    now: float, *, mech: int = MECH_NOISE) -> tuple[bytes, bytes]:
    """Park a fresh key for ``worker_id``, seal the exported context with it.

    Returns ``(key_ref, HANDOFF payload)``.  The key itself goes only into the
    worker's keyring; the payload carries its reference and the sealed state.
    ``mech`` is the seal id of the context's mechanism (:mod:`handoffd.mech`),
    authenticated in the sealed token's header; the worker imports by it.
    """
    key_ref, key = parking.park(worker_id)
    sealed = seal(key, plaintext=inner, mech=mech, worker_id=worker_id,
                  expires_at=int(now + SEAL_LIFETIME), nonce=os.urandom(12))
    return key_ref, Handoff(handoff_id, key_ref, sealed).encode()


def _peer_text(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown peer"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
