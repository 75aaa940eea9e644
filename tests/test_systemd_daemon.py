"""``handoffd serve`` started the way systemd starts the shipped units.

``systemd-socket-activate`` binds the port and execs the daemon with
``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``; the helper provides a real
``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` (tests/systemd_activation.py).  Checked:
READY=1 comes from the main pid only once the workers are up, the connection
that triggered the start is served (nothing in the backlog is lost), the
watchdog is kept, SIGHUP is RELOADING=1 then READY=1, SIGTERM is STOPPING=1
and exit status 0, and the daemon never opened a listening socket of its own.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import trio

from handoffd.runtime.client import open_secure_stream
from handoffd.runtime.control import query_control
from tests.daemon_harness import REPO, _fingerprint, write_config
from tests.systemd_activation import SOCKET_ACTIVATE, socket_activated

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
    async with stream:
        await stream.send_all(message)
        echoed = b""
        while len(echoed) < len(message):
            chunk = await stream.receive_some(64)
            assert chunk, "closed before the echo came back"
            echoed += chunk
        return echoed


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
