"""What operators see of sessions (issue 19): an application that fails is not success,
sessions open right now are counted, and a drain that cuts sessions says so, to the
client (an ERROR with its status) and in status, metrics and the log."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from handoffd.minor import Minor
from handoffd.runtime.control import render_metrics
from handoffd.status import GSSError
from tests.daemon_harness import RunningDaemon, echo_back, read_line, start_daemon
from tests.test_cli_commands import _connect, _text


async def wait_for(daemon: RunningDaemon, check: str, predicate: object) -> dict[str, object]:
    """Poll status until ``predicate(status)`` holds (reports travel asynchronously)."""
    with trio.fail_after(10):
        while True:
            status = await daemon.status()
            if predicate(status):  # type: ignore[operator]
                return status
            await trio.sleep(0.02)


async def test_an_app_that_raises_is_an_error_for_the_client_and_counted(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=1, app="tests.apps:raises_after_one_message",
                                log=tmp_path / "daemon.log")
    try:
        pub = str(tmp_path / "server.key.pub")
        result = await _connect(daemon, "--server-key", pub, stdin=b"hello\n")
        assert result.returncode != 0, _text(result)
        assert "application failed" in _text(result) and "minor 627" in _text(result)
        stream = await daemon.connect()
        await stream.send_all(b"x")
        with pytest.raises(GSSError) as err:
            await stream.receive_some()
        assert err.value.minor == Minor.APP_FAILED
        await stream.aclose()
        status = await wait_for(daemon, "app errors",
                                lambda s: s["totals"]["sessions_app_error"] == 2)
        totals = status["totals"]
        assert totals["sessions_closed"] == 0  # type: ignore[index]
        assert status["sessions_active"] == 0
        assert 'handoffd_sessions_ended_total{outcome="app_error"} 2' in render_metrics(status)
    finally:
        await daemon.stop()
    log = (tmp_path / "daemon.log").read_text()
    assert log.count("the application raised ValueError: the application is broken") == 2


async def test_active_sessions_are_counted_while_open(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=2)
    try:
        streams = []
        for _ in range(3):
            stream = await daemon.connect()
            await read_line(stream)  # the worker's pid: imported and running
            streams.append(stream)
        status = await wait_for(daemon, "3 active", lambda s: s["sessions_active"] == 3)
        assert sum(w["active"] for w in status["workers"]) == 3  # type: ignore[attr-defined]
        assert "handoffd_sessions_active 3" in render_metrics(status)
        for stream in streams:
            assert await echo_back(stream, b"bye") == b"bye"
            await stream.aclose()
        status = await wait_for(daemon, "none active", lambda s: s["sessions_active"] == 0)
        assert status["totals"]["sessions_closed"] == 3  # type: ignore[index]
    finally:
        await daemon.stop()


async def test_a_drain_that_cuts_a_session_tells_the_client_and_the_log(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=1, extra="[workers]\ndrain_timeout = 1\n",
                                log=tmp_path / "daemon.log")
    stream = await daemon.connect()
    await read_line(stream)
    await wait_for(daemon, "1 active", lambda s: s["sessions_active"] == 1)
    daemon.process.send_signal(signal.SIGTERM)
    with trio.fail_after(10), pytest.raises(GSSError) as err:
        await stream.receive_some()  # idle until the drain ends it
    assert err.value.minor == Minor.SESSION_DRAINED
    await stream.aclose()
    with trio.fail_after(20):
        assert await daemon.process.wait() == 0
    assert not (tmp_path / "control.sock").exists()  # sockets are removed at exit
    log = (tmp_path / "daemon.log").read_text()
    assert "1 cut at drain_timeout (1s)" in log, log[-3000:]
