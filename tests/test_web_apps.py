"""ASGI and WSGI apps in handoffd's workers (``[workers] asgi`` / ``wsgi``), served by the
real hypercorn, reached by real clients: httpx and curl over TLS (HTTP/1.1 and h2 by ALPN), a
WebSocket client, curl through the local forwarder over Noise.  The apps are the shipped
examples (``examples/asgi``: Starlette, ``examples/flask``: Flask)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from websockets.sync.client import connect as ws_connect

from examples.echo.demo import open_to
from tests.daemon_harness import (
    REPO,
    RunningDaemon,
    start_daemon,
    start_forwarder,
    tls_config,
)

ROOT = os.geteuid() == 0


async def start_web(tmp_path: Path, kind: str, spec: str) -> tuple[RunningDaemon, int, Path]:
    tls, pki, acceptor_uid = tls_config(tmp_path)
    extra = f'[workers]\n{kind} = "{spec}"\n' + tls
    daemon = await start_daemon(tmp_path, workers=2, extra=extra, acceptor_uid=acceptor_uid,
                                log=tmp_path / "daemon.log")
    (address,) = (await daemon.status())["tls_listen"]
    return daemon, int(address.rsplit(":", 1)[1]), pki["ca"]


@pytest.fixture
async def asgi(tmp_path: Path) -> AsyncIterator[tuple[RunningDaemon, int, Path]]:
    daemon, port, ca = await start_web(tmp_path, "asgi", "examples.asgi.app:app")
    try:
        yield daemon, port, ca
    finally:
        await daemon.stop()


async def test_asgi_over_tls_http_1_1_and_h2(asgi: tuple[RunningDaemon, int, Path]) -> None:
    daemon, port, ca = asgi
    workers = set(await daemon.worker_pids())
    url = f"https://localhost:{port}/whoami"
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca))) as client:
        one = (await client.get(url)).json()
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca)),
                                 http2=True) as client:
        response = await client.get(url)
        two = response.json()
    assert response.http_version == "HTTP/2" and two["http_version"] == "2"
    assert one["http_version"] == "1.1"
    for answer in (one, two):
        assert answer["worker_pid"] in workers and answer["scheme"] == "https"
        assert answer["peer"]["mechanism"] == "tls" and answer["peer"]["sni"] == "localhost"
    assert two["peer"]["alpn"] == "h2"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_over_tls_with_http_1_1_and_http2(asgi: tuple[RunningDaemon, int, Path]) -> None:
    """Debian's curl (OpenSSL, nghttp2): ``--http1.1`` and ``--http2`` (ALPN h2) both
    reach the ASGI app in a worker; curl's own report says which version was spoken."""
    daemon, port, ca = asgi
    workers = set(await daemon.worker_pids())
    for flag, version, alpn in (("--http1.1", "1.1", "http/1.1"), ("--http2", "2", "h2")):
        result = await trio.run_process(
            ["curl", "-sS", flag, "--max-time", "10", "--cacert", str(ca),
             "-w", "\n%{http_version}", f"https://localhost:{port}/whoami"],
            capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 0, result.stderr.decode()
        body, _, spoken = result.stdout.decode().rpartition("\n")
        answer = json.loads(body)
        assert spoken == version and answer["http_version"] == version, (flag, spoken, answer)
        assert answer["worker_pid"] in workers and answer["peer"]["alpn"] == alpn


async def test_asgi_websocket_echo(asgi: tuple[RunningDaemon, int, Path]) -> None:
    _, port, ca = asgi

    def exchange() -> list[str]:
        context = ssl.create_default_context(cafile=str(ca))
        with ws_connect(f"wss://localhost:{port}/ws", ssl=context) as ws:
            replies = []
            for text in ("hello", "over a handed-off TLS session"):
                ws.send(text)
                replies.append(str(ws.recv(timeout=10)))
            return replies

    assert await trio.to_thread.run_sync(exchange) == ["hello", "over a handed-off TLS session"]


async def test_an_asgi_app_error_is_a_500_and_counted(
    asgi: tuple[RunningDaemon, int, Path],
) -> None:
    daemon, port, ca = asgi
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca))) as client:
        response = await client.get(f"https://localhost:{port}/fail")
    assert response.status_code == 500
    with trio.fail_after(10):
        while (await daemon.status())["totals"]["sessions_app_error"] < 1:
            await trio.sleep(0.05)


async def test_lifespan_runs_once_per_worker(tmp_path: Path) -> None:
    daemon, port, ca = await start_web(tmp_path, "asgi", "examples.asgi.app:app")
    workers = await daemon.worker_pids()
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca))) as client:
        for _ in range(4):
            assert (await client.get(f"https://localhost:{port}/")).status_code == 200
    assert await daemon.stop() == 0
    log = (tmp_path / "daemon.log").read_text()
    for pid in workers:
        assert log.count(f"lifespan startup in worker {pid}") == 1, log[-2000:]
        assert log.count(f"lifespan shutdown in worker {pid}") == 1, log[-2000:]


async def test_flask_over_tls(tmp_path: Path) -> None:
    daemon, port, ca = await start_web(tmp_path, "wsgi", "examples.flask.app:app")
    try:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca))) as client:
            answer = (await client.get(f"https://localhost:{port}/")).json()
            failed = await client.get(f"https://localhost:{port}/fail")
        assert answer["worker_pid"] in await daemon.worker_pids()
        assert answer["scheme"] == "https" and answer["peer"]["mechanism"] == "tls"
        assert failed.status_code == 500
    finally:
        await daemon.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_reaches_the_asgi_app_over_noise_through_the_forwarder(
    asgi: tuple[RunningDaemon, int, Path],
) -> None:
    daemon, _, _ = asgi
    process, port = await start_forwarder(daemon, "--fingerprint", daemon.fingerprint)
    try:
        result = await trio.run_process(
            ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/whoami"],
            capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 0, result.stderr
        assert b'"mechanism":"noise"' in result.stdout and b'"scheme":"https"' in result.stdout
    finally:
        process.kill()
        await process.wait()
        await process.stderr.aclose()  # type: ignore[union-attr]


README_BLOCK = re.compile(r"The examples, from the checkout.*?```sh\n(.*?)```", re.DOTALL)


@pytest.mark.skipif(not ROOT or shutil.which("openssl") is None or shutil.which("curl") is None,
                    reason="the shipped example config runs separated (root), with openssl, curl")
async def test_readme_asgi_example_as_shipped() -> None:
    # A short directory: the shipped config's control socket sits beside it, and a Unix
    # socket path is at most 107 bytes.
    with tempfile.TemporaryDirectory(prefix="hd-", dir="/tmp") as short:
        await _readme_asgi_example(Path(short))


async def _readme_asgi_example(tmp_path: Path) -> None:
    """README's example block for examples/asgi: its set-up lines run as written (sudo
    dropped: the suite is root; handoffd from this venv), then its serve and curl lines,
    with the shipped examples/asgi/handoffd.toml, from another directory."""
    block = README_BLOCK.search((REPO / "README.md").read_text())
    assert block is not None
    lines = [line.split("  #")[0].strip() for line in block[1].replace("\\\n", " ").splitlines()]
    setup = [line.removeprefix("sudo ") for line in lines
             if line.startswith(("handoffd keygen", "openssl req", "sudo chown"))]
    assert len(setup) == 3, lines
    open_to(tmp_path)  # the acceptor and worker uids read the copy
    os.chmod(tmp_path, 0o755)
    shutil.copytree(REPO / "examples" / "asgi", tmp_path / "examples" / "asgi",
                    ignore=shutil.ignore_patterns("*.key*", "*.pem", "__pycache__"))
    shutil.copy(REPO / "examples" / "__init__.py", tmp_path / "examples" / "__init__.py")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for line in setup:
        subprocess.run(["bash", "-euc", line], cwd=tmp_path, env=env, check=True,
                       capture_output=True, timeout=60)
    serve = next(line for line in lines if " serve --config " in line)
    config = tmp_path / serve.split("--config ")[1].split()[0]
    log = (tmp_path / "serve.log").open("wb")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "handoffd", "serve", "--config", str(config)], cwd="/",
        env={**env, "PYTHONPATH": str(REPO)}, stderr=log)
    log.close()
    try:
        curl = next(line for line in lines if line.startswith("curl --cacert")).split()
        command = [str(tmp_path / a) if a.startswith("examples/") else a for a in curl]
        with trio.fail_after(60):
            while True:
                result = await trio.run_process(command, capture_stdout=True,
                                                capture_stderr=True, check=False)
                if result.returncode == 0:
                    break
                assert process.returncode is None, (tmp_path / "serve.log").read_text()
                await trio.sleep(0.3)
        assert b'"mechanism":"tls"' in result.stdout and b'"scheme":"https"' in result.stdout
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(40):
            assert await process.wait() == 0
