"""The zero-downtime restart (SIGUSR2 to the supervisor), against a real ``handoffd serve``
run as shipped (supervisor, acceptor and workers under uids of their own): clients in a
loop through a reload and two restarts all succeed, the acceptor is replaced while the
supervisor stays, restart-only settings apply, a session opened before the restart keeps
working through its old worker, a handshake in progress at the handover is served by the
old generation, and a new generation that fails leaves the old one serving; under
``systemd-socket-activate`` the main pid sends RELOADING=1 then READY=1.  Also: a stop
and start on a socket the manager keeps (``systemctl restart`` under socket activation)
serves what queued between the two, and an unprivileged ``serve`` ignores SIGUSR2."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from handoffd.core.context import InitiatorContext
from handoffd.core.framing import FrameDecoder, FrameType, encode_frame, wrap_first_token
from handoffd.runtime.client import connect
from handoffd.runtime.control import query_control
from handoffd.runtime.stream import SecureStream
from handoffd.runtime.wire import read_frame
from handoffd.status import GSSError
from tests.daemon_harness import (
    REPO,
    RunningDaemon,
    _fingerprint,
    echo_back,
    echo_session,
    owner_of,
    read_line,
    separated_uids,
    start_daemon,
    write_config,
)
from tests.systemd_activation import (
    SETPRIV,
    SOCKET_ACTIVATE,
    as_the_unit_runs,
    socket_activated,
    unit_settings,
)

supervised = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: SIGUSR2 is the supervisor's")


async def _wait_log(log: Path, text: str, count: int = 1) -> None:
    with trio.fail_after(30):
        while log.read_text().count(text) < count:
            await trio.sleep(0.05)


async def _control_pid(control: Path) -> int:
    """The pid answering the control socket (a query cut off by a handover is retried)."""
    with trio.fail_after(30):
        while True:
            try:
                pid: int = (await query_control(control))["pid"]
                return pid
            except GSSError:
                await trio.sleep(0.05)


async def _acceptor_pid(daemon: RunningDaemon) -> int:
    return await _control_pid(daemon.control)


class Clients:
    """Four clients, each running ``echo_session`` in a loop, counting what fails."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.served = 0
        self.failures: list[str] = []

    async def _loop(self, stop: trio.Event) -> None:
        while not stop.is_set():
            try:
                await echo_session(self.daemon, messages=2)
                self.served += 1
            except (GSSError, OSError, trio.BrokenResourceError, AssertionError,
                    EOFError) as error:
                self.failures.append(repr(error))

    async def more(self, count: int) -> None:
        target = self.served + count
        while self.served < target:
            await trio.sleep(0.02)


@asynccontextmanager
async def clients_looping(daemon: Any) -> AsyncIterator[Clients]:
    clients = Clients(daemon)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(clients._loop, stop)
        await clients.more(10)
        yield clients
        stop.set()


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


@supervised
async def test_clients_loop_through_a_reload_and_a_restart_without_a_failure(
        tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=2, log=log)
    config = tmp_path / "handoffd.toml"
    supervisor = daemon.process.pid
    try:
        old_acceptor = daemon.pid
        with trio.fail_after(120):
            async with clients_looping(daemon) as clients:
                # (a) SIGHUP: the workers roll.
                old_workers = set(await daemon.worker_pids())
                os.kill(supervisor, signal.SIGHUP)
                await _wait_log(log, "reloaded")
                while not set(await daemon.worker_pids()) - old_workers:
                    await trio.sleep(0.05)
                await clients.more(20)

                # An idle session, open across the restart.
                idle = await daemon.connect()
                idle_worker = int(await read_line(idle))

                # (b) SIGUSR2 with a restart-only setting changed (a new worker uid range)
                # and a bound socket's (backlog: kept, named).
                _, (first, last) = separated_uids()
                text = re.sub(r"uid_range = \[\d+, \d+\]", f"uid_range = [{first}, {last}]",
                              config.read_text())
                config.write_text(text.replace("[server]\n", "[server]\nbacklog = 7\n", 1))
                os.kill(supervisor, signal.SIGUSR2)
                await _wait_log(log, "restarted: acceptor pid")
                while await _acceptor_pid(daemon) == old_acceptor:
                    await trio.sleep(0.05)
                await clients.more(30)
            assert clients.failures == [], f"{len(clients.failures)} clients failed"

        new_acceptor = await _acceptor_pid(daemon)
        assert daemon.process.returncode is None
        assert _parent(new_acceptor) == supervisor  # same supervisor, new acceptor
        status = await daemon.status()
        assert owner_of(new_acceptor)[0] == status["privilege_separation"]["acceptor_uid"] != 0
        new_workers = [w["pid"] for w in status["workers"] if w["state"] == "ready"]
        assert idle_worker not in new_workers
        assert all(first <= owner_of(pid)[0] <= last for pid in new_workers)

        # The old acceptor handed over and is gone (the key with it); the idle session
        # still echoes through its old worker, which ends with it.
        with trio.fail_after(30):
            while os.path.exists(f"/proc/{old_acceptor}"):
                await trio.sleep(0.05)
        async with idle:
            assert await echo_back(idle, b"still here") == b"still here"
        with trio.fail_after(30):
            while os.path.exists(f"/proc/{idle_worker}"):
                await trio.sleep(0.05)
        text = log.read_text()
        assert f"acceptor[{old_acceptor}] handed over" in text
        assert "restart: [server] backlog changed but the listening sockets are kept" in text
        assert "ACCEPTOR_DIED" not in text and "SESSION_DRAINED" not in text
        assert await echo_session(daemon, messages=1) in new_workers

        # And again, from the new generation.
        with trio.fail_after(60):
            async with clients_looping(daemon) as clients:
                os.kill(supervisor, signal.SIGUSR2)
                await _wait_log(log, "restarted: acceptor pid", count=2)
                while await _acceptor_pid(daemon) == new_acceptor:
                    await trio.sleep(0.05)
                await clients.more(20)
            assert clients.failures == [], f"{len(clients.failures)} clients failed"
    finally:
        assert await daemon.stop() == 0


@supervised
async def test_a_handshake_in_progress_at_the_handover_goes_to_the_old_generation(
        tmp_path: Path) -> None:
    """The old acceptor, told to hand over, stops accepting but finishes the handshakes
    it holds and hands each to one of its own workers."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=2, log=log)
    try:
        old_acceptor, old_workers = daemon.pid, set(await daemon.worker_pids())
        with trio.fail_after(60):
            transport = await trio.open_tcp_stream(daemon.host, daemon.port)
            context = InitiatorContext(static_key=None, server_fingerprint=daemon.fingerprint,
                                       clock=time.time, random=os.urandom)
            decoder = FrameDecoder()
            _, first = context.step(None)
            await transport.send_all(encode_frame(FrameType.HANDSHAKE, wrap_first_token(first)))
            second = await read_frame(transport, decoder)  # the old acceptor answered
            os.kill(daemon.process.pid, signal.SIGUSR2)
            await _wait_log(log, f"acceptor[{old_acceptor}] received SIGUSR2")
            _, third = context.step(second.body)
            await transport.send_all(encode_frame(FrameType.HANDSHAKE, third))
            stream = SecureStream(transport, context, decoder=decoder)
            served_by = int(await read_line(stream))
            assert served_by in old_workers
            assert await echo_back(stream, b"handed over") == b"handed over"
            while await _acceptor_pid(daemon) == old_acceptor:
                await trio.sleep(0.05)
        assert await echo_session(daemon, messages=1) not in old_workers
    finally:
        assert await daemon.stop() == 0


@supervised
async def test_a_stop_after_a_restart_lets_the_old_workers_finish_their_sessions(
        tmp_path: Path) -> None:
    """SIGTERM once the old acceptor has handed over: the sessions its workers still
    serve get their drain time too, not the SIGKILL the supervisor gives what is left."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log)
    try:
        old_acceptor = daemon.pid
        idle = await daemon.connect()
        idle_worker = int(await read_line(idle))
        with trio.fail_after(60):
            os.kill(daemon.process.pid, signal.SIGUSR2)
            while os.path.exists(f"/proc/{old_acceptor}"):
                await trio.sleep(0.05)
            new_acceptor = await _acceptor_pid(daemon)
            daemon.process.send_signal(signal.SIGTERM)
            while os.path.exists(f"/proc/{new_acceptor}"):  # nothing to drain: it exits
                await trio.sleep(0.05)
            # The supervisor, which has reaped it, waits for the old worker's session
            # (SIGKILLing what is left would end it in well under a second).
            with trio.move_on_after(1):
                await daemon.process.wait()
            assert daemon.process.returncode is None and os.path.exists(f"/proc/{idle_worker}")
            async with idle:
                assert await echo_back(idle, b"while stopping") == b"while stopping"
            assert await daemon.process.wait() == 0
    finally:
        assert await daemon.stop() == 0


BROKEN = {
    "config": (lambda text: text.replace("count = 2", "count = 'many'"),
               "restart failed, the running generation keeps serving: "),
    "key": (lambda text: text.replace('key = "server.key"', 'key = "missing.key"'),
            "exited with status 1 before it was ready; the running generation keeps serving"),
    "never ready": (lambda text: text.replace(
        'app = "tests.apps:pid_echo"',
        'app = "tests.never_ready_app:handler"\ndrain_timeout = 2'),
        "was not ready within 2s ([workers] drain_timeout); the running generation"),
}


@supervised
@pytest.mark.parametrize("broken", BROKEN)
async def test_a_failed_restart_leaves_the_old_generation_serving(
        tmp_path: Path, broken: str) -> None:
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=2, log=log)
    config = tmp_path / "handoffd.toml"
    good = config.read_text()
    breaking, logged = BROKEN[broken]
    try:
        acceptor = daemon.pid
        workers = set(await daemon.worker_pids())
        with trio.fail_after(120):
            async with clients_looping(daemon) as clients:
                config.write_text(breaking(good))
                os.kill(daemon.process.pid, signal.SIGUSR2)
                await _wait_log(log, logged)
                await clients.more(10)
            assert clients.failures == [], f"{len(clients.failures)} clients failed"
        assert await _acceptor_pid(daemon) == acceptor
        assert set(await daemon.worker_pids()) == workers
        # The failed generation is gone, and the next restart works.
        config.write_text(good)
        os.kill(daemon.process.pid, signal.SIGUSR2)
        await _wait_log(log, "restarted: acceptor pid")
        with trio.fail_after(30):
            while await _acceptor_pid(daemon) == acceptor:
                await trio.sleep(0.05)
        await echo_session(daemon, messages=1)
    finally:
        assert await daemon.stop() == 0


@dataclass
class Endpoint:
    """What :func:`echo_session` needs of a daemon the harness did not start."""

    host: str
    port: int
    fingerprint: str

    async def connect(self) -> SecureStream:
        return await connect(self.host, self.port, server_fingerprint=self.fingerprint)


@supervised
@pytest.mark.skipif(SOCKET_ACTIVATE is None,
                    reason="systemd-socket-activate missing: make deps-debian")
def test_under_socket_activation_a_restart_is_reloading_then_ready_from_the_main_pid(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, workers=2)
    control = tmp_path / "control.sock"
    argv = [sys.executable, "-m", "handoffd", "serve", "--config", str(config)]
    with socket_activated(argv, env={"PYTHONPATH": str(REPO)}) as service:
        service.wait_for("READY", "1")
        main = service.process.pid
        endpoint = Endpoint(*service.address, _fingerprint(tmp_path / "server.key.pub"))

        async def restart() -> tuple[int, int]:
            with trio.fail_after(120):
                return await restart_under_clients()

        async def restart_under_clients() -> tuple[int, int]:
            before = await _control_pid(control)
            idle = await endpoint.connect()
            await read_line(idle)
            async with clients_looping(endpoint) as clients:
                os.kill(main, signal.SIGUSR2)
                for key in ("RELOADING", "READY"):
                    notified = await trio.to_thread.run_sync(
                        lambda key=key: service.wait_for(key, "1", timeout=30))
                    assert notified.pid == main, f"{key}=1 from the main pid"
                await clients.more(20)
            assert clients.failures == [], f"{len(clients.failures)} clients failed"
            async with idle:
                assert await echo_back(idle, b"across") == b"across"
            while (after := await _control_pid(control)) == before:
                await trio.sleep(0.05)  # the old acceptor may answer until it hands over
            return before, after

        before, after = trio.run(restart)
        assert after != before and service.process.poll() is None
        assert not any("STOPPING" in n.fields for n in service.received)

        # A new generation that fails (no key): RELOADING=1, then READY=1 again, the same
        # acceptor serving.
        config.write_text(config.read_text().replace('key = "server.key"',
                                                     'key = "missing.key"'))
        os.kill(main, signal.SIGUSR2)
        for key in ("RELOADING", "READY"):
            assert service.wait_for(key, "1", timeout=30).pid == main
        assert trio.run(_control_pid, control) == after
        trio.run(echo_session, endpoint, 1)
        assert service.stop() == 0


# Socket activation by hand: the listening socket at fd 3 with LISTEN_* for this very pid,
# then exec (the pid stays, as systemd's activation needs).
_ACTIVATED = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="handoffd")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _start_activated(listener: Any, config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-c", _ACTIVATED, str(listener.fileno()), "-m", "handoffd",
             "serve", "--config", str(config)], pass_fds=(listener.fileno(),), cwd=REPO,
            stdin=subprocess.DEVNULL, stderr=output)


async def _until_ready(control: Path, workers: int, process: subprocess.Popen[bytes]) -> None:
    while True:
        assert process.poll() is None, "serve exited"
        try:
            status = await query_control(control)
            if len([w for w in status["workers"] if w["state"] == "ready"]) >= workers:
                return
        except GSSError:
            pass
        await trio.sleep(0.05)


async def _record(served: list[int], endpoint: Endpoint) -> None:
    served.append(await echo_session(endpoint, messages=1))  # type: ignore[arg-type]


async def test_a_stop_and_start_on_a_kept_socket_serves_what_queued_meanwhile(
        tmp_path: Path) -> None:
    """``systemctl restart`` under socket activation: systemd keeps the socket, the old
    instance stops accepting at SIGTERM and drains, the new one takes the backlog.  With
    short sessions no client fails (with a long one the stop waits for it, up to
    ``[workers] drain_timeout``: that case is the SIGUSR2 restart's)."""
    config = write_config(tmp_path, workers=2)
    control, log = tmp_path / "control.sock", tmp_path / "daemon.log"
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as listener:
        endpoint = Endpoint("127.0.0.1", listener.getsockname()[1],
                            _fingerprint(tmp_path / "server.key.pub"))
        first = _start_activated(listener, config, log)
        second: subprocess.Popen[bytes] | None = None
        try:
            with trio.fail_after(120):
                await _until_ready(control, 2, first)
                async with clients_looping(endpoint) as clients:
                    first.send_signal(signal.SIGTERM)
                    while first.poll() is None:
                        await trio.sleep(0.02)
                    served_by_first = clients.served
                    # No process accepts now: this connection can only wait in the backlog.
                    async with trio.open_nursery() as nursery:
                        queued: list[int] = []
                        nursery.start_soon(lambda: _record(queued, endpoint))
                        await trio.sleep(0.5)
                        assert not queued
                        second = _start_activated(listener, config, log)
                        await _until_ready(control, 2, second)
                    assert queued, "the connection queued between the instances was served"
                    await clients.more(20)
            assert first.returncode == 0
            assert clients.failures == [], f"{len(clients.failures)} clients failed"
            assert clients.served > served_by_first
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(30)


@pytest.mark.root
async def test_an_unprivileged_serve_ignores_sigusr2_with_a_reason(
        worker_user: tuple[str, int, int], open_dir: Path) -> None:
    """Without the supervisor there is no second generation to start: ``serve`` run as
    an ordinary user logs why and keeps serving (SIGUSR2's default would kill it)."""
    from tests.daemon_harness import SITE_PACKAGES, SYSTEM_PYTHON

    _, uid, gid = worker_user
    log = open_dir / "daemon.log"
    daemon = await start_daemon(open_dir, workers=1, log=log, python=SYSTEM_PYTHON,
                                env={"PYTHONPATH": f"{SITE_PACKAGES}:{REPO}"},
                                user=(uid, gid))
    try:
        acceptor = daemon.pid
        os.kill(daemon.process.pid, signal.SIGUSR2)
        await _wait_log(log, "SIGUSR2 (restart without dropping connections) needs the "
                             "supervisor")
        assert daemon.process.returncode is None
        assert await _acceptor_pid(daemon) == acceptor
        await echo_session(daemon, messages=1)
    finally:
        assert await daemon.stop() == 0


@supervised
@pytest.mark.skipif(SOCKET_ACTIVATE is None or SETPRIV is None,
                    reason="systemd-socket-activate and setpriv (util-linux) needed")
def test_the_shipped_unit_allows_the_restart(tmp_path: Path) -> None:
    """handoffd.service's ExecStart= as written, with the unit's capabilities, hidden
    /proc and umask, and the shipped config: what ``systemctl kill --signal=USR2
    --kill-whom=main`` sends (SIGUSR2 to the main pid) replaces the acceptor and its
    workers, still separated, and the service stops cleanly after."""
    from tests.test_systemd_daemon import (
        SHIPPED_CONFIG,
        UNITS,
        _check_separation,
        _plain_echo,
        _shipped_config,
    )

    service = unit_settings(UNITS / "handoffd.service")
    directory = tmp_path / "etc-handoffd"
    directory.mkdir()
    config, acceptor_uid, (first, last) = _shipped_config(directory)
    control = directory / "control.sock"
    argv = [str(Path(sys.executable).with_name("handoffd")),
            *[str(config) if a == SHIPPED_CONFIG else a
              for a in shlex.split(service["ExecStart"][0])[1:]]]
    endpoint_key = _fingerprint(directory / "server.key.pub")
    with socket_activated(as_the_unit_runs(argv, service),
                          env={"PYTHONPATH": str(REPO)}) as run:
        run.wait_for("READY", "1")
        main = run.process.pid
        before = trio.run(query_control, control)
        os.kill(main, signal.SIGUSR2)
        assert run.wait_for("RELOADING", "1", timeout=30).pid == main
        assert run.wait_for("READY", "1", timeout=30).pid == main
        while trio.run(_control_pid, control) == before["pid"]:
            time.sleep(0.05)  # the old acceptor may answer until it hands over
        after = trio.run(query_control, control)
        _check_separation(main, after)
        assert owner_of(after["pid"])[0] == acceptor_uid
        assert all(first <= w["uid"] <= last for w in after["workers"])
        later = socket.create_connection(run.address, timeout=30)
        assert trio.run(_plain_echo, later, endpoint_key, b"restarted") == b"restarted"
        assert run.stop() == 0, run.output()
    leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit()
                 and first <= os.stat(f"/proc/{pid}").st_uid <= last]
    assert leftovers == []
