"""Sockets bound before any process starts: Unix socket files made without following
symlinks, with their mode from the umask and their group without chown by path; a port
in use is one BIND_FAILED status naming the address."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from handoffd.minor import Minor
from handoffd.runtime.binding import bind_tcp, bind_unix, show_address
from handoffd.status import GSSError


def test_a_planted_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    os.chmod(target, 0o600)
    path = tmp_path / "register.sock"
    path.symlink_to(target)
    sock = bind_unix(path, socket.SOCK_SEQPACKET, mode=0o660)
    try:
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
        assert target.read_text() == "keep me"
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    finally:
        sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs CAP_SETGID to create as another group")
def test_the_socket_gets_its_group_at_creation(tmp_path: Path) -> None:
    path = tmp_path / "register.sock"
    sock = bind_unix(path, socket.SOCK_SEQPACKET, mode=0o660, group=65534)
    try:
        assert os.lstat(path).st_gid == 65534
        assert os.getegid() == os.getgid()  # switched back
    finally:
        sock.close()


def test_the_control_socket_is_private(tmp_path: Path) -> None:
    sock = bind_unix(tmp_path / "control.sock", socket.SOCK_STREAM, mode=0o600)
    try:
        assert stat.S_IMODE(os.lstat(tmp_path / "control.sock").st_mode) == 0o600
    finally:
        sock.close()


def test_a_port_in_use_is_one_status_naming_the_address() -> None:
    taken = bind_tcp("127.0.0.1:0", 8)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(GSSError) as caught:
            bind_tcp(f"127.0.0.1:{port}", 8)
        assert caught.value.minor == Minor.BIND_FAILED
        assert f"127.0.0.1:{port}" in str(caught.value) and "in use" in str(caught.value)
    finally:
        taken.close()


def test_ipv6_addresses_are_shown_in_brackets() -> None:
    assert show_address("::1", 7443) == "[::1]:7443"
    assert show_address("127.0.0.1", 7443) == "127.0.0.1:7443"
