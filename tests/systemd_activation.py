"""Run a program the way systemd starts a socket-activated ``Type=notify`` service.

``systemd-socket-activate`` (Debian's systemd package) binds the listening
sockets, waits for the first connection, then execs the program with
``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` set exactly as PID 1 would.
This helper adds the other half of the service protocol: a real ``AF_UNIX``
datagram socket as ``NOTIFY_SOCKET`` (with ``SO_PASSCRED``, so each
notification's sender pid is known, as ``NotifyAccess=main`` checks), and
optionally ``WATCHDOG_USEC``.

Usage (synchronous; call it from a plain test function, never inside ``trio.run``)::

    with socket_activated([HANDOFFD, "serve", "--config", str(cfg)],
                          watchdog_usec=2_000_000) as service:
        ready = service.wait_for("READY", timeout=20)   # {"READY": "1", "STATUS": ...}
        assert ready.pid == service.process.pid         # NotifyAccess=main holds
        client = service.trigger                         # the connection that started it
        ...                                              # talk to service.address
    # leaving the block sends SIGTERM and waits; service.returncode is then set

The first connection (``service.trigger``) is what makes systemd-socket-activate
start the program; it stays open in the listen backlog and the program accepts
it like any other, so a test can use it as its first client.

:func:`as_the_unit_runs` wraps an ``ExecStart=`` command so that it starts with the
process settings of a shipped unit's ``[Service]`` section that decide whether
handoffd's process model works (root, bounded capabilities, no new privileges,
hidden /proc, umask); see there for what it does and does not reproduce.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
SETPRIV = shutil.which("setpriv")
UNSHARE = shutil.which("unshare")
_UCRED = struct.Struct("iII")


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """``key -> [values]`` of a unit file, in file order (comments and sections skipped)."""
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def as_the_unit_runs(argv: Sequence[str], service: Mapping[str, list[str]]) -> list[str]:
    """``argv`` wrapped to start as the unit's ``[Service]`` settings ``service`` would:

    * no ``User=``: root (asserted), with ``CapabilityBoundingSet=`` as the bounding set
      and no inheritable or ambient capabilities (``AmbientCapabilities=`` empty), so
      the program's effective set after execve is exactly the bounding set;
    * ``NoNewPrivileges=yes``: ``PR_SET_NO_NEW_PRIVS``;
    * ``ProtectProc=invisible``: a private mount namespace with a /proc of its own
      mounted ``hidepid=invisible``;
    * ``UMask=``.

    Every wrapper execs in place (``unshare`` without ``--fork``, ``sh -c exec``,
    ``setpriv``), so the program keeps the pid systemd-socket-activate gave it and
    ``LISTEN_PID``/``NotifyAccess=main`` hold. Not reproduced (no PID 1 systemd here):
    the seccomp filter (``SystemCallFilter=``, checked against systemd's own group
    lists in test_systemd_units.py), ProtectSystem/ProtectHome/PrivateTmp/PrivateIPC
    and the other namespaces, KeyringMode (the supervisor joins a fresh session
    keyring itself).
    """
    if SETPRIV is None or UNSHARE is None:
        raise RuntimeError("setpriv/unshare missing (util-linux)")
    assert "User" not in service and "DynamicUser" not in service, "the unit starts as root"
    assert os.geteuid() == 0, "only root can start a process as the unit would"
    assert service.get("AmbientCapabilities", [""]) == [""]
    (bounding,) = service["CapabilityBoundingSet"]
    caps = ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in bounding.split())])
    wrapped = [SETPRIV, f"--bounding-set={caps}", "--inh-caps=-all", "--ambient-caps=-all"]
    if service.get("NoNewPrivileges") == ["yes"]:
        wrapped.append("--no-new-privs")
    wrapped += ["--", *argv]
    script = []
    if service.get("ProtectProc") == ["invisible"]:
        script.append("mount -t proc -o hidepid=invisible proc /proc")
    if "UMask" in service:
        script.append(f"umask {service['UMask'][-1]}")
    script.append("exec " + shlex.join(wrapped))
    return [UNSHARE, "--mount", "--propagation=private", "--", "/bin/sh", "-ec",
            " && ".join(script)]


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram: its fields and the sender's pid (from SCM_CREDENTIALS)."""

    fields: dict[str, str]
    pid: int
    raw: bytes

    def __getitem__(self, key: str) -> str:
        return self.fields[key]


@dataclass
class Activation:
    """A running socket-activated program and the manager's side of its sockets."""

    process: subprocess.Popen[bytes]
    address: tuple[str, int]
    trigger: socket.socket
    notify_socket: socket.socket
    notify_path: str
    log_path: Path
    received: list[Notification] = field(default_factory=list)
    returncode: int | None = None

    def receive(self, timeout: float) -> Notification | None:
        """The next notification, or None if none arrives within ``timeout`` seconds."""
        self.notify_socket.settimeout(timeout)
        try:
            data, ancillary, _flags, _addr = self.notify_socket.recvmsg(
                65536, socket.CMSG_SPACE(_UCRED.size)
            )
        except TimeoutError:
            return None
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
        notification = Notification(fields=fields, pid=pid, raw=data)
        self.received.append(notification)
        return notification

    def wait_for(self, key: str, value: str | None = None, *, timeout: float = 20.0
                 ) -> Notification:
        """Receive until a notification carries ``key`` (with ``value`` if given).

        Raises AssertionError with the program's state if the deadline passes or the
        program exits first (its output is in the message).
        """
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(min(left, 0.2))
            if got is not None and key in got.fields and value in (None, got.fields[key]):
                return got
            if got is None and self.process.poll() is not None:
                raise AssertionError(
                    f"program exited with {self.process.returncode} before {key}; "
                    f"received {[n.raw for n in self.received]}; output:\n{self.output()}"
                )
        raise AssertionError(f"no {key} within {timeout}s; received "
                             f"{[n.raw for n in self.received]}; output:\n{self.output()}")

    def output(self) -> str:
        """Everything the program (and systemd-socket-activate) wrote to stdout/stderr."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit status (SIGKILL after ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.returncode = self.process.returncode
        return self.returncode


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _connect_when_listening(host: str, port: int, process: subprocess.Popen[bytes],
                            timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextmanager
def socket_activated(
    argv: Sequence[str],
    *,
    names: Sequence[str] = ("handoffd",),
    host: str = "127.0.0.1",
    watchdog_usec: int | None = None,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 10.0,
) -> Iterator[Activation]:
    """Start ``argv`` under ``systemd-socket-activate`` on a free TCP port of ``host``.

    One listening socket per entry of ``names`` is not possible on one port, so
    ``names`` gives the single socket's ``FileDescriptorName=`` (its first
    element). ``env`` is added to the program's environment with ``-E``
    (systemd-socket-activate passes only what it is told to, like PID 1).
    """
    if SOCKET_ACTIVATE is None:
        raise RuntimeError("systemd-socket-activate is missing: make deps-debian")
    with tempfile.TemporaryDirectory(prefix="handoffd-sd-") as tmp:
        notify_path = str(Path(tmp) / "notify")
        log_path = Path(tmp) / "output.log"
        notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify_socket.bind(notify_path)
        notify_socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        extra = {"NOTIFY_SOCKET": notify_path, **(env or {})}
        if watchdog_usec is not None:
            extra["WATCHDOG_USEC"] = str(watchdog_usec)
        # PATH and PYTHONPATH so that the program finds its interpreter and modules.
        for inherited in ("PATH", "PYTHONPATH", "HOME", "LANG"):
            if inherited in os.environ and inherited not in extra:
                extra[inherited] = os.environ[inherited]
        process: subprocess.Popen[bytes] | None = None
        for _attempt in range(3):  # a free port can be taken between probe and bind
            port = _free_port(host)
            listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            command = [SOCKET_ACTIVATE, "-l", listen, f"--fdname={names[0]}"]
            for key, value in extra.items():
                command += ["-E", f"{key}={value}"]
            # A file, not a pipe: a chatty program must never block on a full pipe.
            with log_path.open("wb") as log:
                process = subprocess.Popen([*command, *argv], stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT)
            try:
                trigger = _connect_when_listening(host, port, process, start_timeout)
                break
            except ConnectionRefusedError:
                process.wait()
        else:
            notify_socket.close()
            raise RuntimeError("systemd-socket-activate could not bind a free port")
        activation = Activation(process=process, address=(host, port), trigger=trigger,
                                notify_socket=notify_socket, notify_path=notify_path,
                                log_path=log_path)
        try:
            yield activation
        finally:
            activation.stop()
            trigger.close()
            notify_socket.close()


__all__ = ["SOCKET_ACTIVATE", "Activation", "Notification", "as_the_unit_runs",
           "socket_activated", "unit_settings"]
