"""FdReserve and RLIMIT_NOFILE sizing against the real kernel: a process at its fd
limit whose accept() fails with EMFILE sheds the pending connection instead of leaving
it in the backlog, and gets its reserve back."""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from handoffd.config import Config, ControlConfig, ServerConfig, WorkersConfig
from handoffd.kernel.fdreserve import NOFILE_MARGIN, FdReserve, nofile_needed, raise_nofile

_MAX_FILL = 4096


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def at_fd_limit(spare: int = 8) -> Iterator[list[int]]:
    """Lower this process's soft RLIMIT_NOFILE to a few fds above what it holds, then
    open /dev/null until EMFILE: inside, every new fd fails.  Everything is given back
    (fds closed, limit restored) on the way out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (_highest_fd() + 1 + spare, hard))
    try:
        for _ in range(_MAX_FILL):
            try:
                filler.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as error:
                assert error.errno == errno.EMFILE
                break
        else:
            pytest.fail(f"no EMFILE after {_MAX_FILL} opens")
        yield filler
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _highest_fd() -> int:
    return max(int(name) for name in os.listdir("/proc/self/fd"))


def _tcp_listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    return listener


def _accept_fails_with_emfile(listener: socket.socket) -> None:
    with pytest.raises(OSError) as failed:
        listener.accept()
    assert failed.value.errno == errno.EMFILE


def _reset_or_eof(client: socket.socket) -> bytes | int:
    """What the client reads once its connection was shed: b'' (EOF) or ECONNRESET."""
    client.settimeout(5)
    try:
        return client.recv(100)
    except ConnectionResetError:
        return errno.ECONNRESET


def test_shed_drops_the_pending_connection_at_emfile_and_keeps_the_reserve() -> None:
    with _tcp_listener() as listener, FdReserve(1) as reserve:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        with client:
            with at_fd_limit():
                _accept_fails_with_emfile(listener)
                assert reserve.held == 1
                assert reserve.shed(listener) is True
                # The reserve is back: the process is at its limit again.
                assert reserve.held == 1
                _accept_fails_with_emfile(listener)
                # Nothing pending any more: nothing shed, nothing raised (EAGAIN).
                assert reserve.shed(listener) is False
                assert reserve.held == 1
            assert _reset_or_eof(client) in (b"", errno.ECONNRESET)


def test_a_client_that_sent_its_request_sees_a_reset() -> None:
    with _tcp_listener() as listener, FdReserve(2) as reserve:
        clients = [socket.create_connection(listener.getsockname(), timeout=5)
                   for _ in range(3)]
        try:
            for client in clients:
                client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            with at_fd_limit():
                shed = 0
                for _ in range(10):
                    if not reserve.shed(listener):
                        break
                    shed += 1
                assert shed == 3
                assert reserve.held == 2
            # Unread bytes at close: the kernel answers with RST.
            assert [_reset_or_eof(c) for c in clients] == [errno.ECONNRESET] * 3
        finally:
            for client in clients:
                client.close()


def test_shed_on_a_unix_listener(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, FdReserve() as reserve:
        listener.bind(path)
        listener.listen(4)
        listener.setblocking(False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            with at_fd_limit():
                _accept_fails_with_emfile(listener)
                assert reserve.shed(listener) is True
            assert _reset_or_eof(client) in (b"", errno.ECONNRESET)


def test_shed_never_blocks_or_raises_on_a_blocking_listener() -> None:
    with socket.socket() as listener, FdReserve() as reserve:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        started = time.monotonic()
        assert reserve.shed(listener) is False
        assert time.monotonic() - started < 1
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            assert reserve.shed(listener) is True  # pending: accepted without blocking
            assert _reset_or_eof(client) in (b"", errno.ECONNRESET)


def test_shed_swallows_the_accept_errors_of_a_closed_listener() -> None:
    listener = _tcp_listener()
    listener.close()
    with FdReserve() as reserve:
        assert reserve.shed(listener) is False
        assert reserve.held == 1


def test_the_reserve_holds_dev_null_fds_and_gives_them_back() -> None:
    before = _fd_count()
    reserve = FdReserve(3)
    assert reserve.held == 3 and _fd_count() == before + 3
    opened = [fd for fd in map(int, os.listdir("/proc/self/fd"))
              if os.path.realpath(f"/proc/self/fd/{fd}") == os.devnull]
    assert len(opened) >= 3
    reserve.close()
    reserve.close()
    assert reserve.held == 0 and _fd_count() == before
    with pytest.raises(ValueError):
        FdReserve(0)


def test_a_reserve_made_at_the_limit_holds_what_it_can() -> None:
    with at_fd_limit(spare=2) as filler:
        os.close(filler.pop())  # one fd free
        reserve = FdReserve(3)
        try:
            assert reserve.held == 1
        finally:
            reserve.close()


def test_nofile_needed_adds_up_its_terms() -> None:
    config = Config(
        server=ServerConfig(listen=("127.0.0.1:1", "[::1]:1"), max_handshakes=100),
        workers=WorkersConfig(count=3, max_unacked=5, register_socket=Path("/run/x.sock")),
        control=ControlConfig(socket=Path("c.sock"), metrics="127.0.0.1:9", max_connections=4),
    )
    listeners = 2 + 1 + 1 + 1
    assert nofile_needed(config) == 100 + 3 * (5 + 2) + 2 * 4 + listeners + NOFILE_MARGIN
    bare = Config(control=ControlConfig(socket=None, metrics=None))
    default = Config()
    assert nofile_needed(bare) == (default.server.max_handshakes
                                   + default.workers.count * (default.workers.max_unacked + 2)
                                   + 2 * default.control.max_connections
                                   + len(default.server.listen) + NOFILE_MARGIN)


_RAISE = """
import json, resource, sys
from handoffd.kernel.fdreserve import raise_nofile
warning = raise_nofile(int(sys.argv[1]))
print(json.dumps([warning, resource.getrlimit(resource.RLIMIT_NOFILE)]))
"""


def _raise_in_child(soft: int, hard: int, needed: int) -> tuple[str | None, list[int]]:
    """raise_nofile(needed) in a child started with RLIMIT_NOFILE soft:hard (lowering a
    hard limit cannot be undone here: no CAP_SYS_RESOURCE)."""
    result = subprocess.run(
        ["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-c", _RAISE, str(needed)],
        capture_output=True, text=True, check=True, timeout=30,
        cwd=Path(__file__).resolve().parents[1])
    warning, limits = json.loads(result.stdout)
    return warning, limits


def test_raise_nofile_lifts_the_soft_limit_to_what_is_needed() -> None:
    warning, limits = _raise_in_child(64, 1000, 300)
    assert warning is None
    assert limits == [300, 1000]


def test_raise_nofile_never_lowers() -> None:
    warning, limits = _raise_in_child(800, 1000, 300)
    assert warning is None
    assert limits == [800, 1000]


def test_raise_nofile_stops_at_the_hard_limit_and_warns() -> None:
    warning, limits = _raise_in_child(64, 200, 300)
    assert limits == [200, 200]
    assert warning is not None
    assert "200" in warning and "300" in warning and "max_handshakes" in warning


def test_raise_nofile_in_this_process_with_room_changes_nothing() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_nofile(min(before[0], 64)) is None
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before
