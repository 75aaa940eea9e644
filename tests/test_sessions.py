"""Issue 19, visibility: workers report how many sessions are open and how each ended
(SESSIONS on the handoff channel); ``handoffd status``, the metrics and the log show it.

An application that raises is an error the client sees (ERROR ``APP_FAILED``, the real
``handoffd connect`` exits non-zero) and the daemon counts (``app_error``, not
``closed``); a drain that reaches ``drain_timeout`` tells the cut clients
``SHUTTING_DOWN`` and logs how many it cut, per worker and in total."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from handoffd.core.handoff import Sessions
from handoffd.minor import Minor
from handoffd.runtime.sessions import SessionLedger, check_report
from handoffd.runtime.stream import SecureStream
from handoffd.status import GSS_S_FAILURE, GSS_S_UNAVAILABLE, GSSError
from tests.daemon_harness import REPO, RunningDaemon, echo_session, read_line, start_daemon


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _metrics(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every sample GET /metrics answers."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    body = response.partition(b"\r\n\r\n")[2].decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in body.splitlines() if line and not line.startswith("#")}


async def _sessions_until(daemon: RunningDaemon, done: Any) -> dict[str, Any]:
    """The status once ``done(status["sessions"])`` holds (reports travel on their own)."""
    with trio.fail_after(15):
        while True:
            status = await daemon.status()
            if done(status["sessions"]):
                return status
            await trio.sleep(0.05)


def _human_status(daemon: RunningDaemon) -> str:
    result = subprocess.run([sys.executable, "-m", "handoffd", "status", "--control",
                             str(daemon.control)], capture_output=True, text=True,
                            timeout=30, cwd=REPO, check=True)
    return result.stdout


async def test_an_app_that_raises_is_an_error_for_the_client_and_in_the_counters(
    tmp_path: Path,
) -> None:
    """``tests.apps:raises`` fails every session: the library client gets ERROR
    (``GSS_S_FAILURE``, ``APP_FAILED``), the real ``handoffd connect`` exits 1 printing
    that status; status and metrics count 2 ``app_error`` and no ``closed``; the worker
    logs one line per session with its context id, peer and the traceback."""
    log = tmp_path / "daemon.log"
    port = _free_port()
    daemon = await start_daemon(tmp_path, workers=1, app="tests.apps:raises", log=log,
                                extra=f'[control]\nmetrics = "127.0.0.1:{port}"')
    try:
        stream = await daemon.connect()
        with pytest.raises(GSSError) as raised:
            async with stream:
                await stream.receive_some()
        assert (raised.value.major, raised.value.minor) == (GSS_S_FAILURE, Minor.APP_FAILED)
        client = await trio.run_process(
            [sys.executable, "-m", "handoffd", "connect", f"{daemon.host}:{daemon.port}",
             "--fingerprint", daemon.fingerprint], stdin=b"hello\n", capture_stdout=True,
            capture_stderr=True, check=False, cwd=REPO)
        stderr = client.stderr.decode()
        assert client.returncode == 1, stderr
        assert f"minor {int(Minor.APP_FAILED)}" in stderr
        assert "The server's application failed while serving this session" in stderr
        assert client.stdout == b""
        status = await _sessions_until(daemon, lambda s: s["ended"]["app_error"] >= 2)
        metrics = await _metrics(port)
    finally:
        assert await daemon.stop() == 0
    sessions = status["sessions"]
    assert sessions["ended"]["app_error"] == 2
    assert sessions["ended"]["closed"] == 0 and sessions["active"] == 0
    assert status["workers"][0]["sessions_ended"]["app_error"] == 2
    assert metrics['handoffd_sessions_ended_total{outcome="app_error"}'] == 2
    assert metrics['handoffd_sessions_ended_total{outcome="closed"}'] == 0
    assert metrics["handoffd_sessions_active"] == 0
    text = log.read_text()
    failed = re.findall(r"session \d+ \(context [0-9a-f]{16}, peer 127\.0\.0\.1:\d+ "
                        r"\(anonymous\)\) ended: the application raised RuntimeError: "
                        r"tests\.apps:raises fails every session; the client gets APP_FAILED",
                        text)
    assert len(failed) == 2, text
    assert 'raise RuntimeError("tests.apps:raises fails every session")' in text  # traceback
    assert "stopped: 0 sessions cut at drain; sessions ended: closed 0, app_error 2" in text


async def test_active_sessions_show_the_open_ones_then_zero(tmp_path: Path) -> None:
    """Three open sessions over two workers: status (total and per worker), the metrics
    gauge and the human status show 3 open; once the clients close, 0 open and 3
    ``closed``."""
    port = _free_port()
    daemon = await start_daemon(tmp_path, workers=2,
                                extra=f'[control]\nmetrics = "127.0.0.1:{port}"')
    try:
        streams: list[SecureStream] = []
        for _ in range(3):
            stream = await daemon.connect()
            await read_line(stream)  # served: the worker's session is open
            streams.append(stream)
        status = await _sessions_until(daemon, lambda s: s["active"] == 3)
        assert sum(w["active_sessions"] for w in status["workers"]) == 3
        assert (await _metrics(port))["handoffd_sessions_active"] == 3
        human = await trio.to_thread.run_sync(_human_status, daemon)
        assert "sessions: 3 open; ended: closed 0, app_error 0" in human, human
        assert "connections waiting for a worker: 0" in human, human
        for stream in streams:
            await stream.aclose()
        status = await _sessions_until(daemon, lambda s: s["active"] == 0)
        assert status["sessions"]["ended"]["closed"] == 3
        assert (await _metrics(port))["handoffd_sessions_active"] == 0
        assert "sessions: 0 open; ended: closed 3" in await trio.to_thread.run_sync(
            _human_status, daemon)
    finally:
        assert await daemon.stop() == 0


async def test_the_human_status_shows_connections_waiting_for_a_worker(
    tmp_path: Path,
) -> None:
    """No worker at all: a client whose handshake finished waits for one, and ``handoffd
    status`` (not only ``--json``) says so."""
    run = tmp_path / "run"
    run.mkdir()
    daemon = await start_daemon(tmp_path, workers=0, extra=(
        f'[workers]\nwait_timeout = 2\nregister_socket = "{run / "register.sock"}"\n'
        "[policy]\nworker_uids = [64999]"))
    try:
        stream = await daemon.connect()
        async with stream:
            with trio.fail_after(10):
                while (await daemon.status())["waiting_for_worker"] != 1:
                    await trio.sleep(0.05)
            human = await trio.to_thread.run_sync(_human_status, daemon)
            with pytest.raises(GSSError):  # NO_WORKER_AVAILABLE after wait_timeout
                await stream.receive_some()
    finally:
        assert await daemon.stop() == 0
    assert "connections waiting for a worker: 1" in human, human
    assert "sessions: 0 open" in human, human


async def test_a_drain_that_reaches_drain_timeout_cuts_and_says_so(tmp_path: Path) -> None:
    """An idle open session and ``drain_timeout = 1``: SIGTERM; after a second the worker
    cuts it (its client gets ERROR ``SHUTTING_DOWN``), the worker and the acceptor log the
    count, and the last line names 1 session cut at drain, by worker."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log,
                                extra="[workers]\ndrain_timeout = 1")
    stream = await daemon.connect()
    worker_pid = int(await read_line(stream))
    await _sessions_until(daemon, lambda s: s["active"] == 1)
    daemon.process.send_signal(signal.SIGTERM)
    with pytest.raises(GSSError) as raised, trio.fail_after(15):
        await stream.receive_some()
    assert (raised.value.major, raised.value.minor) == (GSS_S_UNAVAILABLE, Minor.SHUTTING_DOWN)
    await stream.aclose()
    with trio.fail_after(15):
        assert await daemon.process.wait() == 0
    text = log.read_text()
    assert "drained: 1 sessions still open after drain_timeout 1s were cut" in text, text
    assert f"worker 0 (pid {worker_pid}) cut 1 sessions at drain" in text
    assert (f"stopped: 1 sessions cut at drain (worker 0 pid {worker_pid}: 1); sessions "
            "ended: closed 0, app_error 0, client_error 0, cut_at_drain 1, "
            "died_with_worker 0") in text


async def test_sessions_open_in_a_killed_worker_count_as_died_with_worker(
    tmp_path: Path,
) -> None:
    """SIGKILL a worker serving two sessions: the acceptor counts them as
    ``died_with_worker`` (from the worker's last report), none is left open, and the log
    says so."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log)
    try:
        streams = [await daemon.connect() for _ in range(2)]
        pids = {int(await read_line(stream)) for stream in streams}
        await _sessions_until(daemon, lambda s: s["active"] == 2)
        (worker,) = pids
        os.kill(worker, signal.SIGKILL)
        status = await _sessions_until(daemon, lambda s: s["ended"]["died_with_worker"] == 2)
        assert status["sessions"]["active"] == 0
        for stream in streams:
            with pytest.raises((GSSError, trio.BrokenResourceError)):
                await stream.receive_some()
            await stream.aclose()
    finally:
        assert await daemon.stop() == 0
    assert f"2 sessions ended with worker 0 (pid {worker}), which exited while they were " \
        "open" in log.read_text()


async def test_a_worker_cannot_inflate_the_counts_or_crash_the_acceptor(
    tmp_path: Path,
) -> None:
    """A compromised worker (``tests.apps:lying_reports``) sends SESSIONS reports that are
    short, long, claim a million sessions or 2^32-1 open, and one with an fd: each is
    refused and counted (the fd one by the channel), logged rate-limited, none changes
    the counts, and the daemon serves on."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, app="tests.apps:lying_reports", log=log)
    try:
        await echo_session(daemon, messages=1)
        await _sessions_until(daemon, lambda s: s["ended"]["closed"] == 1)
        stream = await daemon.connect()
        await read_line(stream)
        await stream.send_all(b"lie")
        assert await stream.receive_some() == b"done"
        status = await _sessions_until(daemon, lambda s: s["reports_refused"] >= 4)
        await stream.aclose()
        await echo_session(daemon, messages=1)
        status = await _sessions_until(daemon, lambda s: s["ended"]["closed"] == 3)
        assert status["sessions"]["reports_refused"] == 4
        assert status["sessions"]["active"] == 0
        assert daemon.process.returncode is None
    finally:
        assert await daemon.stop() == 0
    text = log.read_text()
    # The first refusal is logged, the next three only counted until the next line.
    assert "session report that was refused: " in text
    assert "SESSIONS payload has the wrong length" in text
    assert "sessions reported, 2 handoffs acknowledged (3 more like this in the last" in text
    assert "sent a bad message" in text  # the one with an fd


def test_reports_are_checked_against_handoffs_and_never_go_down() -> None:
    """The acceptor's rules for a report: no more sessions than acknowledged handoffs,
    no ended count lower than the last report's (an open count may fall)."""
    check_report(None, Sessions(active=1, closed=2), acknowledged=3)
    with pytest.raises(GSSError) as refused:
        check_report(None, Sessions(active=2, closed=2), acknowledged=3)
    assert refused.value.minor == Minor.SESSION_REPORT_INVALID
    with pytest.raises(GSSError) as refused:
        check_report(Sessions(closed=2, app_error=1), Sessions(closed=1, app_error=2), 5)
    assert "closed went down" in str(refused.value)
    check_report(Sessions(active=3), Sessions(active=0, client_error=3), acknowledged=3)
    ledger = SessionLedger()
    assert ledger.worker_gone(Sessions(active=2, closed=1)) == 2
    totals = ledger.totals([Sessions(active=1, app_error=1), None])
    assert totals["active"] == 1
    assert totals["ended"] == {"closed": 1, "app_error": 1, "client_error": 0,
                               "cut_at_drain": 0, "died_with_worker": 2}
    assert json.dumps(totals)  # plain data for the control socket
