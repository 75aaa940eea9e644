"""``handoffd serve`` started the way systemd starts the shipped units.

``systemd-socket-activate`` binds the port and execs the daemon with
``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``; the helper provides a real
``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` (tests/systemd_activation.py).  Checked:
READY=1 comes from the main pid only once the workers are up, the connection
that triggered the start is served (nothing in the backlog is lost), the
watchdog is kept, SIGHUP is RELOADING=1 then READY=1, SIGTERM is STOPPING=1
and exit status 0, and the daemon never opened a listening socket of its own.

Run as root (CI), the main pid is the supervisor: it forwards the acceptor's
notifications (so ``NotifyAccess=main`` still holds) and its signals, and the
acceptor and the workers run under uids of their own.  The last test runs the
shipped unit's ``ExecStart=`` and ``ExecReload=`` with the shipped
``systemd/handoffd.toml`` and the unit's capability bounding set,
NoNewPrivileges, hidden /proc and umask (tests/systemd_activation.py
``as_the_unit_runs``).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from examples.echo.demo import open_to
from handoffd.kernel.privileges import CAP_KILL, CAP_SETGID, CAP_SETUID, effective_capabilities
from handoffd.runtime.client import open_secure_stream
from handoffd.runtime.control import query_control
from tests.daemon_harness import (
    REPO,
    _fingerprint,
    echo_back,
    owner_of,
    separated_uids,
    write_config,
)
from tests.systemd_activation import (
    SETPRIV,
    SOCKET_ACTIVATE,
    as_the_unit_runs,
    socket_activated,
    unit_settings,
)

pytestmark = pytest.mark.skipif(SOCKET_ACTIVATE is None,
                                reason="systemd-socket-activate missing: make deps-debian")


async def _echo_over(sock: socket.socket, fingerprint: str) -> int:
    """Handshake over an already-connected socket; returns the serving worker's pid."""
    sock.setblocking(False)
    transport = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    stream = await open_secure_stream(transport, server_fingerprint=fingerprint)
    async with stream:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(64)
            assert chunk, "closed before the worker said hello"
            line += chunk
        await stream.send_all(b"over systemd")
        echoed = b""
        while len(echoed) < len(b"over systemd"):
            chunk = await stream.receive_some(64)
            assert chunk
            echoed += chunk
        assert echoed == b"over systemd"
        return int(line)


def _listening_sockets(pid: int) -> set[str]:
    """Inodes of the TCP sockets ``pid`` has open, to compare with the one systemd bound."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _check_separation(main_pid: int, status: dict[str, Any]) -> None:
    """As root: the main pid is the supervisor (root), the acceptor (status' pid) and
    every worker run under non-root uids of their own."""
    if os.geteuid() != 0:
        assert status["privilege_separation"]["separated"] is False
        return
    assert status["pid"] != main_pid
    assert owner_of(main_pid)[0] == 0
    acceptor_uid = owner_of(status["pid"])[0]
    assert acceptor_uid != 0 and effective_capabilities(status["pid"]) == 0
    assert status["privilege_separation"]["acceptor_uid"] == acceptor_uid
    uids = [owner_of(w["pid"])[0] for w in status["workers"]]
    assert uids == [w["uid"] for w in status["workers"]]
    assert len(set(uids)) == len(uids) and not {0, acceptor_uid} & set(uids)


def test_socket_activated_notify_service(tmp_path: Path) -> None:
    config = write_config(tmp_path, workers=2)
    fingerprint = _fingerprint(tmp_path / "server.key.pub")
    argv = [sys.executable, "-m", "handoffd", "serve", "--config", str(config)]
    env = {"PYTHONPATH": str(REPO)}
    with socket_activated(argv, watchdog_usec=1_000_000, env=env) as service:
        ready = service.wait_for("READY", "1")
        assert ready.pid == service.process.pid, "NotifyAccess=main: READY from the main pid"
        assert "workers" in ready.fields.get("STATUS", "")
        status = trio.run(query_control, tmp_path / "control.sock")
        assert len([w for w in status["workers"] if w["state"] == "ready"]) == 2
        host, port = service.address
        assert status["listen"] == [f"{host}:{port}"]
        _check_separation(service.process.pid, status)

        # The connection that made systemd start us waited in the backlog: served.
        first = trio.run(_echo_over, service.trigger, fingerprint)
        second = trio.run(_echo_over, socket.create_connection(service.address), fingerprint)
        workers = {w["pid"] for w in status["workers"]}
        assert {first, second} <= workers

        # WATCHDOG_USEC=1s: pings at least every half second.
        service.wait_for("WATCHDOG", "1", timeout=3)

        os.kill(service.process.pid, signal.SIGHUP)
        service.wait_for("RELOADING", "1", timeout=10)
        service.wait_for("READY", "1", timeout=20)
        third = trio.run(_echo_over, socket.create_connection(service.address), fingerprint)
        assert third not in workers, "SIGHUP rolled the workers"

        assert service.stop() == 0
        while service.receive(0.2) is not None:  # what was sent while stopping
            pass
        assert any(n.fields.get("STOPPING") == "1" for n in service.received)


async def _plain_echo(sock: socket.socket, fingerprint: str, message: bytes) -> bytes:
    sock.setblocking(False)
    transport = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    stream = await open_secure_stream(transport, server_fingerprint=fingerprint)
    return await echo_back(stream, message)


def test_socket_activated_serves_the_echo_demo_app(tmp_path: Path) -> None:
    """The echo demo's own app, ``examples.echo.app:handler``, behind
    ``systemd-socket-activate``: the triggering connection and a later one are echoed."""
    config = write_config(tmp_path, workers=2, app="examples.echo.app:handler")
    fingerprint = _fingerprint(tmp_path / "server.key.pub")
    argv = [sys.executable, "-m", "handoffd", "serve", "--config", str(config)]
    with socket_activated(argv, env={"PYTHONPATH": str(REPO)}) as service:
        service.wait_for("READY", "1")
        assert trio.run(_plain_echo, service.trigger, fingerprint, b"first") == b"first"
        later = socket.create_connection(service.address)
        assert trio.run(_plain_echo, later, fingerprint, b"x" * 300) == b"x" * 300
        assert service.stop() == 0


# --------------------------------------------------------------------------- as shipped

UNITS = REPO / "systemd"
SHIPPED_CONFIG = "/etc/handoffd/handoffd.toml"


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _shipped_config(directory: Path) -> tuple[Path, int, tuple[int, int]]:
    """systemd/handoffd.toml with exactly these changed: the /etc and /run paths moved
    into ``directory`` (the app is the package's own: no import path), and the acceptor
    user and worker range replaced by a block of the test harness (no user
    ``handoffd`` here; a range of its own so that concurrent daemons never share a uid).
    Installed as docs/DEPLOY.md says: key 0600 owned by the acceptor, config 0640
    root:acceptor-group in a 0750 root:acceptor-group directory."""
    acceptor, workers = separated_uids()
    text = (UNITS / "handoffd.toml").read_text()
    for old, new in (
        ('key = "/etc/handoffd/server.key"', f'key = "{directory}/server.key"'),
        ('socket = "/run/handoffd/control.sock"', f'socket = "{directory}/control.sock"'),
        ('user = "handoffd"', f'user = "{acceptor}"'),
        ("uid_range = [70000, 70255]", f"uid_range = [{workers[0]}, {workers[1]}]"),
    ):
        text = _replace_once(text, old, new)
    config = directory / "handoffd.toml"
    config.write_text(text)
    subprocess.run([sys.executable, "-m", "handoffd", "keygen", "--out",
                    str(directory / "server.key")], check=True, capture_output=True)
    for name in ("server.key", "server.key.pub"):
        os.chown(directory / name, acceptor, acceptor)
    os.chown(config, 0, acceptor)
    os.chmod(config, 0o640)
    open_to(directory.parent)
    os.chown(directory, 0, acceptor)
    os.chmod(directory, 0o750)
    return config, acceptor, workers


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                    reason="the unit starts as root (setpriv from util-linux)")
def test_the_shipped_unit_runs_the_shipped_config_separated(tmp_path: Path) -> None:
    """handoffd.service's ExecStart= and ExecReload=, as written, with the unit's
    capabilities and the shipped config: the supervisor keeps exactly CAP_SETUID,
    CAP_SETGID and CAP_KILL, and that is enough to run the acceptor and one uid per
    worker, serve the echo app, reload and stop cleanly."""
    service = unit_settings(UNITS / "handoffd.service")
    directory = tmp_path / "etc-handoffd"
    directory.mkdir()
    config, acceptor_uid, (first, last) = _shipped_config(directory)
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == "/usr/bin/handoffd" and argv.count(SHIPPED_CONFIG) == 1
    argv = [str(Path(sys.executable).with_name("handoffd")),
            *[str(config) if a == SHIPPED_CONFIG else a for a in argv[1:]]]
    fingerprint = _fingerprint(directory / "server.key.pub")
    (exec_pre,) = service["ExecStartPre"]  # serve --check, with the unit's capabilities
    pre = shlex.split(exec_pre)
    assert pre[0] == "/usr/bin/handoffd" and "--check" in pre
    pre = [argv[0], *[str(config) if a == SHIPPED_CONFIG else a for a in pre[1:]]]
    checked = subprocess.run(as_the_unit_runs(pre, service), capture_output=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert checked.returncode == 0, checked.stderr.decode()
    assert b"client listeners: systemd" in checked.stdout
    with socket_activated(as_the_unit_runs(argv, service), env={"PYTHONPATH": str(REPO)},
                          watchdog_usec=4_000_000) as service_run:
        ready = service_run.wait_for("READY", "1")
        main = service_run.process.pid
        assert ready.pid == main, "NotifyAccess=main: the supervisor forwards READY"
        assert effective_capabilities(main) == (
            1 << CAP_SETUID | 1 << CAP_SETGID | 1 << CAP_KILL)
        status = trio.run(query_control, directory / "control.sock")
        _check_separation(main, status)
        assert owner_of(status["pid"])[0] == acceptor_uid
        workers = {w["pid"]: w["uid"] for w in status["workers"]}
        assert len(workers) == 4 and all(first <= uid <= last for uid in workers.values())

        assert trio.run(_plain_echo, service_run.trigger, fingerprint, b"shipped") == b"shipped"
        later = socket.create_connection(service_run.address)
        assert trio.run(_plain_echo, later, fingerprint, b"again") == b"again"

        (exec_reload,) = service["ExecReload"]
        reload = shlex.split(exec_reload.replace("$MAINPID", str(main)))
        subprocess.run(reload, check=True, timeout=10)
        service_run.wait_for("RELOADING", "1", timeout=10)
        service_run.wait_for("READY", "1", timeout=20)
        deadline = time.monotonic() + 20
        while True:  # new workers ready, the old ones drained (idle: at once) and gone
            rolled = trio.run(query_control, directory / "control.sock")
            pids = {w["pid"] for w in rolled["workers"]}
            ready_now = [w for w in rolled["workers"] if w["state"] == "ready"]
            if not pids & set(workers) and len(ready_now) == 4:
                break
            assert time.monotonic() < deadline, (rolled["workers"], service_run.output())
            time.sleep(0.1)
        _check_separation(main, rolled)

        assert service_run.stop() == 0, service_run.output()
        while service_run.receive(0.2) is not None:
            pass
        assert any(n.fields.get("STOPPING") == "1" for n in service_run.received)
    leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit()
                 and first <= os.stat(f"/proc/{pid}").st_uid <= last]
    assert leftovers == []
