"""TLS through the real daemon: ``handoffd serve`` with a ``[tls]`` listener, OpenSSL's
handshake in the acceptor, the session handed off to a worker process and continued
there; real clients (curl, Python's ssl); the private key never in a worker."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from tests.daemon_harness import RunningDaemon, separated_uids, start_daemon

ROOT = os.geteuid() == 0


def _write_pki(directory: Path, owner: int | None) -> dict[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = {
        "ca": directory / "ca.pem",
        "cert": directory / "tls.pem",
        "key": directory / "tls.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    os.chmod(paths["key"], 0o600)
    if owner is not None:
        for path in (paths["cert"], paths["key"]):
            os.chown(path, owner, owner)
    return paths


@pytest.fixture
async def tls_daemon(tmp_path: Path) -> AsyncIterator[tuple[RunningDaemon, dict[str, Path], int]]:
    acceptor_uid = separated_uids()[0] if ROOT else None
    os.chmod(tmp_path, 0o755)
    pki = _write_pki(tmp_path, acceptor_uid)
    extra = (
        "[tls]\n"
        'listen = ["127.0.0.1:0"]\n'
        f'certificate = "{pki["cert"]}"\n'
        f'key = "{pki["key"]}"\n'
        'alpn = ["h2", "http/1.1"]\n'
    )
    daemon = await start_daemon(
        tmp_path, workers=2, app="tests.apps:https_whoami", extra=extra,
        acceptor_uid=acceptor_uid, log=tmp_path / "daemon.log",
    )  # fmt: skip
    try:
        (address,) = (await daemon.status())["tls_listen"]
        yield daemon, pki, int(address.rsplit(":", 1)[1])
    finally:
        await daemon.stop()


async def test_curl_is_served_by_a_worker_process(
    tls_daemon: tuple[RunningDaemon, dict[str, Path], int],
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian package curl)")
    daemon, pki, port = tls_daemon
    result = await trio.run_process(
        ["curl", "-sS", "--http1.1", "--cacert", str(pki["ca"]), f"https://localhost:{port}/"],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    match = re.search(
        rb"worker (\d+)</h1><p>mechanism=tls alpn=http/1.1 sni=localhost", result.stdout
    )
    assert match, result.stdout
    assert int(match[1]) in await daemon.worker_pids()
    assert int(match[1]) != daemon.pid


async def test_python_ssl_clients_in_parallel_and_the_noise_port_still_works(
    tls_daemon: tuple[RunningDaemon, dict[str, Path], int],
) -> None:
    daemon, pki, port = tls_daemon

    def get() -> bytes:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.selected_alpn_protocol() == "h2"
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data

    replies: list[bytes] = []

    async def one() -> None:
        replies.append(await trio.to_thread.run_sync(get))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    assert all(b"mechanism=tls alpn=h2" in r for r in replies)
    status = await daemon.status()
    assert status["totals"]["handoffs"] >= 8


async def test_the_private_key_is_in_no_worker(
    tls_daemon: tuple[RunningDaemon, dict[str, Path], int],
) -> None:
    if not ROOT:
        pytest.skip("needs root: reads every worker's memory")
    daemon, pki, _ = tls_daemon
    await test_python_ssl_clients_in_parallel_and_the_noise_port_still_works(tls_daemon)
    key = serialization.load_pem_private_key(pki["key"].read_bytes(), None)
    value = key.private_numbers().private_value  # type: ignore[union-attr]
    # OpenSSL keeps the scalar as a BIGNUM: 64-bit limbs, least significant first
    forms = (value.to_bytes(32, "big"), value.to_bytes(32, "little"))
    for pid in await daemon.worker_pids():
        opened = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert str(pki["key"]) not in opened
        memory = _memory(pid)
        assert not any(form in memory for form in forms), f"worker {pid} holds the key"
    acceptor = _memory(daemon.pid)
    assert any(form in acceptor for form in forms)  # the search finds it where it is


def _memory(pid: int) -> bytes:
    out = bytearray()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if "r" not in perms or "[vvar]" in line or "[vsyscall]" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                out += mem.read(end - start)
            except OSError:
                continue
    return bytes(out)


async def test_http_or_tls_sent_to_the_noise_port_is_named_in_one_log_line(
    tls_daemon: tuple[RunningDaemon, dict[str, Path], int],
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian package curl)")
    daemon, pki, _ = tls_daemon
    for scheme in ("http", "https"):
        result = await trio.run_process(
            ["curl", "-sS", "--max-time", "5", "--cacert", str(pki["ca"]),
             f"{scheme}://127.0.0.1:{daemon.port}/"],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert result.returncode != 0
    await daemon.stop()
    log = (daemon.directory / "daemon.log").read_text()
    assert len(re.findall(r"plain HTTP arrived \('GET / HTTP/1.1'\), not handoffd", log)) == 1
    assert len(re.findall(r"a TLS ClientHello arrived, not handoffd", log)) == 1
