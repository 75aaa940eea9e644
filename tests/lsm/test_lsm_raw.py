"""SO_PEERSEC against real SELinux labels, with the standard library only (guest only).

These cases check the ground the project's own code stands on: what the kernel really
returns for AF_UNIX peers when an LSM labels sockets.  They run in the ``make test-lsm``
VM; elsewhere conftest.py skips them.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest
from lsm_support import (
    ACCEPTOR,
    IMPOSTOR,
    LONG,
    OUTSIDER,
    RUNNER,
    SO_PASSSEC,
    WORKER,
    connect_and_wait,
    current_label,
    fork_as,
    observe,
    raw_peer_label,
    seqpacket_listener,
    switch_label,
    wait_ok,
)

SCM_SECURITY = getattr(socket, "SCM_SECURITY", 3)


def test_runner_domain_and_enforcing() -> None:
    """pytest itself runs in the runner's domain under an enforcing policy."""
    assert Path("/sys/fs/selinux/enforce").read_text().strip() == "1"
    assert current_label() == RUNNER


@pytest.mark.parametrize(
    "kind", [socket.SOCK_SEQPACKET, socket.SOCK_STREAM], ids=["seqpacket", "stream"]
)
def test_peersec_names_the_connecting_process(tmp_path: Path, kind: int) -> None:
    """The accepted socket's SO_PEERSEC is the connecting process's context."""
    listener = socket.socket(socket.AF_UNIX, kind)
    path = str(tmp_path / "s")
    listener.bind(path)
    listener.listen(1)
    pid = fork_as(ACCEPTOR, connect_and_wait(path, kind))
    try:
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(1) == b"!"
            raw = raw_peer_label(conn)
            observe(f"accepted-{socket.SocketKind(kind).name}", raw)
            # The kernel may or may not include the NUL; here (SELinux) it does.
            assert raw.rstrip(b"\0") == ACCEPTOR
            assert raw in (ACCEPTOR, ACCEPTOR + b"\0")
    finally:
        listener.close()
        wait_ok(pid)


def test_connecting_side_sees_the_listener_label(tmp_path: Path) -> None:
    """The connecting side's SO_PEERSEC names the listener's creator (the runner here)."""
    listener, path = seqpacket_listener(tmp_path)

    def part() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(path)
            assert raw_peer_label(sock).rstrip(b"\0") == RUNNER
            sock.sendall(b"!")

    pid = fork_as(WORKER, part)
    with listener:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1)
    wait_ok(pid)


def test_policy_is_enforced_outsider_cannot_connect(tmp_path: Path) -> None:
    """A domain without ``connectto`` gets EACCES even as root: the policy is live."""
    listener, path = seqpacket_listener(tmp_path)

    def part() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            try:
                sock.connect(path)
            except PermissionError as error:
                assert error.errno == errno.EACCES
            else:
                raise AssertionError("the outsider connected despite the policy")

    with listener:
        wait_ok(fork_as(OUTSIDER, part))
    assert os.getuid() == 0


def test_socketpair_reports_the_creator_label() -> None:
    """Both ends of a socketpair carry the label their creator had when making it."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def part() -> None:
        # Made while this child was still the runner: the label does not follow a switch.
        assert raw_peer_label(child_end).rstrip(b"\0") == RUNNER
        mine, kept = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socket.send_fds(child_end, [b"p"], [mine.fileno()])
        child_end.recv(1)
        kept.close()

    pid = fork_as(WORKER, part)
    try:
        msg, fds, _, _ = socket.recv_fds(parent_end, 1, 1)
        assert (msg, len(fds)) == (b"p", 1)
        with socket.socket(fileno=fds[0]) as passed:
            raw = raw_peer_label(passed)
        parent_end.sendall(b"!")
    finally:
        parent_end.close()
        child_end.close()
        wait_ok(pid)
    observe("socketpair-made-by-worker", raw)
    assert raw.rstrip(b"\0") == WORKER


def test_long_label_needs_more_than_name_max(tmp_path: Path) -> None:
    """A context longer than NAME_MAX: a 256-byte buffer gets ERANGE, a bigger one works."""
    assert len(LONG) > 255
    listener, path = seqpacket_listener(tmp_path)
    pid = fork_as(LONG, connect_and_wait(path))
    try:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1)
            with pytest.raises(OSError) as too_small:
                raw_peer_label(conn, 256)
            assert too_small.value.errno == errno.ERANGE
            # 1024 is the most Python's getsockopt() accepts.
            raw = raw_peer_label(conn, 1024)
            observe("long", raw)
            assert raw.rstrip(b"\0") == LONG
    finally:
        listener.close()
        wait_ok(pid)


def test_runner_can_switch_and_back() -> None:
    """dyntransition works for a forked child and leaves the parent's domain unchanged."""
    seen: list[bytes] = []
    read_end, write_end = os.pipe()

    def part() -> None:
        os.write(write_end, current_label())
        switch_label(RUNNER)

    pid = fork_as(ACCEPTOR, part)
    os.close(write_end)
    seen.append(os.read(read_end, 256))
    os.close(read_end)
    wait_ok(pid)
    assert seen == [ACCEPTOR]
    assert current_label() == RUNNER


def _security_of(ancdata: list[tuple[int, int, bytes]]) -> bytes | None:
    """The SCM_SECURITY payload among a message's control data, if any."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SCM_SECURITY:
            return data
    return None


def test_passsec_labels_each_message_with_the_sending_socket(tmp_path: Path) -> None:
    """SO_PASSSEC: every message carries SCM_SECURITY, the label of the *sending socket*.

    The sender switches domain between its two messages; the label does not follow,
    because SELinux labels a unix message with its socket's context (fixed when the
    socket was created), not with the sending process's current context.
    """
    listener, path = seqpacket_listener(tmp_path)

    def part() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(path)
            sock.sendall(b"1")
            switch_label(IMPOSTOR)
            sock.sendall(b"2")
            sock.recv(1)

    pid = fork_as(ACCEPTOR, part)
    labels: list[bytes | None] = []
    try:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, SO_PASSSEC, 1)
            for _ in range(2):
                _, ancdata, _, _ = conn.recvmsg(16, socket.CMSG_SPACE(1024))
                labels.append(_security_of(ancdata))
    finally:
        listener.close()
        wait_ok(pid)
    for raw in labels:
        assert raw is not None
        observe("scm-security", raw)
    assert [raw.rstrip(b"\0") for raw in labels if raw] == [ACCEPTOR, ACCEPTOR]
