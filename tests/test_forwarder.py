"""``handoffd connect --listen``: curl, which speaks neither Noise nor krb5, reaches an
app behind handoffd through the local forwarder (stunnel's client mode)."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.daemon_harness import RunningDaemon, start_daemon, start_forwarder

pytestmark = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="curl is not installed (make deps-chromium)")


@pytest.fixture
async def forwarded(tmp_path: Path) -> AsyncIterator[tuple[RunningDaemon, int, trio.Process]]:
    daemon = await start_daemon(tmp_path, workers=2, app="examples.https.app:handler")
    process, port = await start_forwarder(daemon, "--server-key",
                                          str(tmp_path / "server.key.pub"))
    try:
        yield daemon, port, process
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()
        await daemon.stop()


async def curl(port: int) -> tuple[int, bytes]:
    result = await trio.run_process(
        ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"],
        capture_stdout=True, capture_stderr=True, check=False)
    return result.returncode, result.stdout + result.stderr


async def test_curl_reaches_a_worker_through_the_forwarder(
    forwarded: tuple[RunningDaemon, int, trio.Process],
) -> None:
    daemon, port, _ = forwarded
    workers = set(await daemon.worker_pids())
    for _ in range(3):  # one secure connection per local one
        code, out = await curl(port)
        assert code == 0, out
        match = re.search(rb"served by worker (\d+)</h1><p>mechanism=noise", out)
        assert match and int(match[1]) in workers, out
    assert (await daemon.status())["totals"]["handoffs"] == 3


async def test_a_server_that_cannot_be_reached_is_one_line_and_a_closed_connection(
    forwarded: tuple[RunningDaemon, int, trio.Process],
) -> None:
    daemon, port, process = forwarded
    await daemon.stop()
    code, _ = await curl(port)
    assert code != 0  # curl sees the connection closed, never an answer
    assert process.stderr is not None
    with trio.fail_after(10):
        line = b""
        while b"cannot reach" not in line:
            line += await process.stderr.receive_some()
    assert b"connection refused" in line.lower()
