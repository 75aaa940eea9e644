"""Start-up failures are one line naming what to fix, with nothing forked before the
sockets are bound; ``serve --check`` binds and releases what ``serve`` would bind."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.daemon_harness import REPO, write_config

ROOT = os.geteuid() == 0


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A port some other process listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


async def serve(config: Path, *args: str) -> tuple[int, list[str], str]:
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "handoffd", "serve", "--config", str(config), *args],
            cwd=REPO, capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    return result.returncode, result.stderr.decode().splitlines(), result.stdout.decode()


def config_with(tmp_path: Path, extra: str, *, app: str = "tests.apps:pid_echo") -> Path:
    return write_config(tmp_path, workers=1, extra=extra, app=app,
                        separated=True)  # fmt: skip


def assert_one_line(lines: list[str], *needles: str) -> None:
    assert len(lines) == 1, lines
    assert not any("Traceback" in line or "worker" in line for line in lines), lines
    for needle in needles:
        assert needle in lines[0], lines


async def test_a_port_in_use_is_one_line_and_nothing_is_started(
    tmp_path: Path, taken: socket.socket
) -> None:
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    config = config_with(tmp_path, f'[server]\nlisten = ["{address}"]\n')
    code, lines, _ = await serve(config)
    assert code == 1
    assert_one_line(lines, address, "Address already in use", "BIND_FAILED", "minor 618")
    assert not (tmp_path / "control.sock").exists()


async def test_serve_check_binds_what_serve_binds(tmp_path: Path, taken: socket.socket) -> None:
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    config = config_with(tmp_path, f'[server]\nlisten = ["{address}"]\n')
    code, lines, _ = await serve(config, "--check")
    assert code == 1
    assert_one_line(lines, address, "BIND_FAILED")
    # under socket activation the client listener is systemd's: not bound by the check
    code, lines, out = await serve(config, "--check", "--activated")
    assert code == 0, lines
    assert "client listeners: systemd" in out
    taken.close()
    code, lines, out = await serve(config, "--check")
    assert code == 0, lines
    assert f"sockets bound and released: {address}, {tmp_path / 'control.sock'}" in out
    assert not (tmp_path / "control.sock").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ('[control]\nsocket = "/nonexistent-dir/control.sock"\n', "/nonexistent-dir/control.sock"),
        ('[control]\nsocket = "/proc/control.sock"\n', "/proc/control.sock"),
        (
            '[workers]\nregister_socket = "/nonexistent-dir/register.sock"\n[policy]\n'
            "worker_uids = [12345]\n",
            "/nonexistent-dir/register.sock",
        ),
    ],
    ids=["control_dir_missing", "control_dir_read_only", "register_dir_missing"],
)
async def test_socket_paths_that_cannot_be_bound(tmp_path: Path, extra: str, needle: str) -> None:
    config = config_with(tmp_path, extra)
    for args in ((), ("--check",)):
        code, lines, _ = await serve(config, *args)
        assert code == 1
        assert_one_line(lines, needle, "BIND_FAILED")


async def test_a_metrics_port_in_use(tmp_path: Path, taken: socket.socket) -> None:
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    config = config_with(tmp_path, f'[control]\nmetrics = "{address}"\n')
    code, lines, _ = await serve(config)
    assert code == 1
    assert_one_line(lines, address, "BIND_FAILED")


async def test_ipv6_addresses_are_printed_in_brackets(tmp_path: Path) -> None:
    holder = socket.socket(socket.AF_INET6)
    try:
        holder.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    holder.listen()
    port = holder.getsockname()[1]
    config = config_with(tmp_path, f'[server]\nlisten = ["[::1]:{port}"]\n')
    try:
        code, lines, _ = await serve(config)
    finally:
        holder.close()
    assert code == 1
    assert_one_line(lines, f"[::1]:{port}:")


@pytest.mark.skipif(not ROOT, reason="needs root: the check's children switch uids")
async def test_check_never_imports_the_app_as_root(tmp_path: Path) -> None:
    config = config_with(tmp_path, "", app="tests.not_as_root_app:handler")
    code, lines, out = await serve(config, "--check")
    assert code == 0, lines  # imported under a worker uid
    assert "app tests.not_as_root_app:handler" in out
    os.chown(tmp_path / "server.key", 0, 0)  # now the acceptor's uid cannot read it
    code, lines, _ = await serve(config, "--check")
    assert code == 1
    assert_one_line(lines, "server.key")
