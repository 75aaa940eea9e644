"""The systemd adapter against real descriptors, real datagram sockets and the real
``systemd-socket-activate``.

Activation tests need sockets at fds 3, 4, ... of a process whose pid is in
``LISTEN_PID``: each runs in a forked child (plain test functions, never inside
``trio.run``) that dup2()s real sockets into place and reports back over a pipe.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from handoffd.kernel import systemd
from handoffd.kernel.systemd import ActivatedSocket, Notifier, listen_fds, watchdog_interval
from handoffd.minor import Minor
from handoffd.status import GSS_S_CALL_BAD_STRUCTURE, GSS_S_FAILURE, GSSError

try:  # the repo root on sys.path (python -m pytest, or pytest's pythonpath setting) ...
    from tests.systemd_activation import SOCKET_ACTIVATE, socket_activated
except ModuleNotFoundError:  # ... or only tests/ itself (plain pytest, rootdir-relative import)
    from systemd_activation import SOCKET_ACTIVATE, socket_activated  # type: ignore[no-redef,import-not-found,unused-ignore]

# --------------------------------------------------------------------------- activation


def _in_child_with_fds(
    fds: list[int], body: Callable[[dict[str, str]], Any], env: dict[str, str] | None = None
) -> Any:
    """Fork; in the child put ``fds`` at 3, 4, ..., build the environment with ``env``
    (``{pid}`` is replaced by the child's pid), run ``body(environ)`` and send back its
    JSON-able result, or ``{"gss": [major, minor, detail]}`` if it raised GSSError."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child; results travel via the pipe
        status = 0
        try:
            # Move everything out of the way first: a source may sit at a target.
            out = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 200)
            parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 300) for fd in fds]
            # Close everything else the fork inherited, so fds 3.. hold only what we place.
            keep = sorted([out, *parked])
            low = 3
            for fd in keep:
                os.closerange(low, fd)
                low = fd + 1
            for offset, fd in enumerate(parked):
                os.dup2(fd, 3 + offset)  # inheritable, like systemd leaves them
            environ = {k: v.replace("{pid}", str(os.getpid())) for k, v in (env or {}).items()}
            try:
                result: Any = body(environ)
            except GSSError as error:
                result = {"gss": [error.major, error.minor, error.detail]}
            os.write(out, json.dumps(result).encode())
        except BaseException as error:
            os.write(out, json.dumps({"crash": repr(error)}).encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    result = json.loads(data)
    assert not (isinstance(result, dict) and "crash" in result), result
    return result


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    """A TCP listener, an IPv6 TCP listener when available, and a Unix datagram socket."""
    made = []
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    made.append(tcp)
    dgram_a, dgram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram_b.close()
    made.append(dgram_a)
    yield made
    for sock in made:
        sock.close()


def _activate(environ: dict[str, str]) -> dict[str, Any]:
    found = listen_fds(environ)
    return {
        "sockets": [[s.fd, s.name, s.family, s.type, os.get_inheritable(s.fd)] for s in found],
        "environ": environ,
    }


def test_names_families_types_and_cloexec(listeners: list[socket.socket]) -> None:
    env = {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "tcp:dgram",
           "OTHER": "kept"}
    result = _in_child_with_fds([s.fileno() for s in listeners], _activate, env)
    assert result["sockets"] == [
        [3, "tcp", socket.AF_INET, socket.SOCK_STREAM, False],
        [4, "dgram", socket.AF_UNIX, socket.SOCK_DGRAM, False],
    ]
    assert result["environ"] == {"OTHER": "kept"}


def test_default_names_and_keeping_the_environment(listeners: list[socket.socket]) -> None:
    def body(environ: dict[str, str]) -> Any:
        found = listen_fds(environ, unset_environment=False)
        return [[s.name for s in found], sorted(environ)]

    env = {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2"}
    names, keys = _in_child_with_fds([s.fileno() for s in listeners], body, env)
    assert names == ["unknown", "unknown"]
    assert keys == ["LISTEN_FDS", "LISTEN_PID"]


def test_sockets_for_another_pid_are_not_taken(listeners: list[socket.socket]) -> None:
    """A child that inherited the environment must not take its parent's sockets."""
    def body(environ: dict[str, str]) -> Any:
        found = listen_fds(environ)
        return [len(found), os.get_inheritable(3), sorted(environ)]

    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    count, inheritable, keys = _in_child_with_fds([s.fileno() for s in listeners], body, env)
    assert (count, inheritable, keys) == (0, True, [])


def test_explicit_pid_argument(listeners: list[socket.socket]) -> None:
    def body(environ: dict[str, str]) -> Any:
        mine = os.getpid()
        wrong = listen_fds(dict(environ), pid=mine + 1)
        right = listen_fds(dict(environ), pid=mine)
        return [len(wrong), [s.fd for s in right]]

    env = {"LISTEN_PID": "{pid}", "LISTEN_FDS": "1"}
    assert _in_child_with_fds([listeners[0].fileno()], body, env) == [0, [3]]


def test_no_activation_environment() -> None:
    environ = {"PATH": "/bin"}
    assert listen_fds(environ) == []
    assert environ == {"PATH": "/bin"}
    assert listen_fds({"LISTEN_PID": str(os.getpid())}) == []
    assert listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []


@pytest.mark.parametrize(
    ("variables", "detail_part"),
    [
        ({"LISTEN_PID": "x{pid}", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "LISTEN_PID=0"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": " 2"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "1_0"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": ""}, "LISTEN_FDS"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "99999999999"}, "exceeds the fd limit"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"}, "1 names"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a::b"}, "3 names"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:"}, "invalid name"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b c"}, "invalid name"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "3"}, "fd 5 from LISTEN_FDS is not open"),
    ],
)
def test_malformed_activation_changes_nothing(
    listeners: list[socket.socket], variables: dict[str, str], detail_part: str
) -> None:
    def body(environ: dict[str, str]) -> Any:
        before = dict(environ)
        try:
            listen_fds(environ)
        except GSSError as error:
            return [error.major, error.minor, error.detail, environ == before,
                    os.get_inheritable(3), os.get_inheritable(4)]
        return "no error"

    major, minor, detail, unchanged, *inheritable = _in_child_with_fds(
        [s.fileno() for s in listeners], body, variables)
    assert (major, minor) == (GSS_S_FAILURE, Minor.SYSTEMD_ACTIVATION_INVALID)
    assert detail_part in detail
    assert unchanged and inheritable == [True, True]


def test_a_passed_fd_that_is_not_a_socket(tmp_path: Path) -> None:
    with (tmp_path / "file").open("w") as plain:
        result = _in_child_with_fds([plain.fileno()], _activate,
                                    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "1"})
    assert result["gss"][1] == Minor.SYSTEMD_ACTIVATION_INVALID
    assert "not a socket" in result["gss"][2]


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate missing")
def test_environment_made_by_systemd_socket_activate() -> None:
    """The real tool sets LISTEN_* for the exec'd program; the adapter takes the socket,
    and the program's READY=1 reaches the manager from the main pid."""
    program = (
        "from handoffd.kernel.systemd import Notifier, listen_fds\n"
        "import os\n"
        "found = listen_fds()\n"
        "notifier = Notifier.from_environ()\n"
        "s = found[0]\n"
        "notifier.ready(f'{s.fd} {s.name} {s.family} {s.type} {os.get_inheritable(s.fd)} '\n"
        "               f'{[k for k in os.environ if k.startswith(\"LISTEN_\")]}')\n"
        "import socket; conn, _ = socket.socket(fileno=s.fd).accept(); conn.sendall(b'hi')\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    with socket_activated([sys.executable, "-c", program], names=("handoffd-tcp",),
                          env={"PYTHONPATH": repo}) as service:
        ready = service.wait_for("READY", "1", timeout=20)
        assert ready.pid == service.process.pid
        assert ready["STATUS"] == (f"3 handoffd-tcp {int(socket.AF_INET)} "
                                   f"{int(socket.SOCK_STREAM)} False []")
        service.trigger.settimeout(10)
        assert service.trigger.recv(2) == b"hi"


# --------------------------------------------------------------------------- notify

_UCRED = struct.Struct("iII")


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """The service manager's end: a bound AF_UNIX datagram socket with SO_PASSCRED."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
    else:
        address = f"@handoffd-test/{uuid.uuid4()}"
        sock.bind("\0" + address[1:])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(5)
    yield address, sock
    sock.close()


def _receive(sock: socket.socket) -> tuple[bytes, int]:
    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
    pids = [_UCRED.unpack(payload[: _UCRED.size])[0] for level, kind, payload in ancillary
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)]
    return data, pids[0]


def test_each_notification_is_one_exact_datagram(manager: tuple[str, socket.socket]) -> None:
    address, sock = manager
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier is not None
    notifier.ready()
    notifier.ready("4/4 workers ready")
    notifier.status("draining:\n3 sessions left")
    notifier.watchdog()
    notifier.stopping()
    notifier.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=x=y")
    received = [_receive(sock) for _ in range(6)]
    assert [data for data, _ in received] == [
        b"READY=1",
        b"READY=1\nSTATUS=4/4 workers ready",
        b"STATUS=draining: 3 sessions left",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"EXTEND_TIMEOUT_USEC=5000000\nSTATUS=x=y",
    ]
    # systemd attributes each datagram to the kernel-reported sender (NotifyAccess=main).
    assert {pid for _, pid in received} == {os.getpid()}
    notifier.close()


def test_reloading_carries_the_monotonic_clock(manager: tuple[str, socket.socket]) -> None:
    address, sock = manager
    notifier = Notifier(address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    data, _ = _receive(sock)
    first, second = data.decode().split("\n")
    assert first == "RELOADING=1"
    key, usec = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    notifier.close()


def test_not_under_systemd() -> None:
    assert Notifier.from_environ({}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": ""}) is None


@pytest.mark.parametrize("address", ["relative/notify", "@", "vsock:2:1234", "/" + "x" * 120])
def test_unusable_notify_socket(address: str) -> None:
    with pytest.raises(GSSError) as caught:
        Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert caught.value.minor == Minor.SYSTEMD_NOTIFY_SOCKET_INVALID


@pytest.mark.parametrize("field", ["READY", "=1", "STATUS=a\nREADY=1", "X=\0"])
def test_malformed_fields_raise_and_send_nothing(
    manager: tuple[str, socket.socket], field: str
) -> None:
    address, sock = manager
    notifier = Notifier(address)
    with pytest.raises(GSSError) as caught:
        notifier.notify("WATCHDOG=1", field)
    assert (caught.value.major, caught.value.minor) == (
        GSS_S_CALL_BAD_STRUCTURE, Minor.SYSTEMD_NOTIFY_FIELD_INVALID)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)
    notifier.close()


def test_a_vanished_manager_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """systemd restarting (socket gone) must not kill the daemon: one WARNING, then
    DEBUG for the same error, and INFO when notifications get through again."""
    address = str(tmp_path / "notify")
    notifier = Notifier(address)
    caplog.set_level(logging.DEBUG, logger="handoffd.systemd")
    notifier.watchdog()
    notifier.watchdog()
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG]
    assert "No such file or directory" in caplog.records[0].getMessage()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as back:
        back.bind(address)
        notifier.watchdog()
        assert back.recv(64) == b"WATCHDOG=1"
    assert caplog.records[-1].levelno == logging.INFO
    notifier.close()
    notifier.close()
    notifier.stopping()  # after close: dropped, no exception
    assert caplog.records[-1].levelno == logging.DEBUG


def test_the_notify_socket_does_not_leak_into_children(manager: tuple[str, socket.socket]) -> None:
    address, _sock = manager
    notifier = Notifier(address)
    assert notifier._socket is not None
    fd = notifier._socket.fileno()
    assert not os.get_inheritable(fd)
    notifier.close()
    with pytest.raises(OSError):
        os.fstat(fd)


# --------------------------------------------------------------------------- watchdog


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "1500"}) == 0.0015
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 2.0
    assert watchdog_interval(mine, pid=os.getpid() + 1) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


@pytest.mark.parametrize(
    "environ",
    [
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "1e6"},
        {"WATCHDOG_USEC": "18446744073709551615"},  # USEC_INFINITY: "no watchdog" is EINVAL
        {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "self"},
        {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "0"},
    ],
)
def test_malformed_watchdog(environ: dict[str, str]) -> None:
    with pytest.raises(GSSError) as caught:
        watchdog_interval(environ)
    assert (caught.value.major, caught.value.minor) == (
        GSS_S_FAILURE, Minor.SYSTEMD_WATCHDOG_INVALID)


def test_public_names() -> None:
    assert systemd.SD_LISTEN_FDS_START == 3
    assert ActivatedSocket(3, "x", 1, 1) == ActivatedSocket(3, "x", 1, 1)
    assert set(systemd.__all__) >= {"ActivatedSocket", "Notifier", "listen_fds",
                                    "watchdog_interval"}


def test_a_subprocess_sees_no_activation_variables(listeners: list[socket.socket]) -> None:
    """After listen_fds, a program the daemon starts neither sees LISTEN_* nor fd 3."""
    def body(environ: dict[str, str]) -> Any:
        os.environ.update(environ)
        listen_fds()
        probe = ("import os; print(sorted(k for k in os.environ if k.startswith('LISTEN')));"
                 "print(os.path.exists('/proc/self/fd/3') and os.readlink('/proc/self/fd/3'))")
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              check=True, close_fds=False).stdout.split("\n")[:2]

    env = {"LISTEN_PID": "{pid}", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "tcp"}
    variables, fd3 = _in_child_with_fds([listeners[0].fileno()], body, env)
    assert variables == "[]"
    assert not fd3.startswith("socket:")
