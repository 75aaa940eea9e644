"""End to end: a real ``handoffd serve`` with pre-forked workers and real clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio

from handoffd.core.framing import FrameType, decode_error, encode_frame
from handoffd.status import GSS_ROUTINE_ERROR, GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE, GSSError
from tests.daemon_harness import RunningDaemon, echo_session, start_daemon


async def test_echo_through_four_workers_with_200_clients(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=4)
    try:
        pids: Counter[int] = Counter()

        async def client() -> None:
            pids[await echo_session(daemon, messages=3)] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(client)
        assert sum(pids.values()) == 200
        assert len(pids) > 1, f"all connections went to one worker: {pids}"
        assert set(pids) <= set(await daemon.worker_pids())

        status = await daemon.status()
        assert status["totals"]["acked"] == 200
        assert status["totals"]["lost"] == 0
        assert sum(w["handled"] for w in status["workers"]) == 200
        # The CLI shows the same numbers.
        result = subprocess.run(
            [sys.executable, "-m", "handoffd", "status", "--control", str(daemon.control),
             "--json"], capture_output=True, text=True, check=True)
        assert json.loads(result.stdout)["totals"]["acked"] == 200
    finally:
        assert await daemon.stop() == 0


async def test_handoffs_sent_to_a_killed_worker_are_never_given_to_another(
    tmp_path: Path,
) -> None:
    """A stopped worker is sent handoffs it never acknowledges; SIGKILLed, it takes those
    clients with it.  None of them goes to the other worker (a second import of a context
    the dead worker may have opened would reuse its nonces): each is counted
    ``died_unclaimed``, not lost, not redelivered, and every other client is served."""
    daemon = await start_daemon(tmp_path, workers=2)
    try:
        await echo_session(daemon)  # warm-up, so the fd baseline is steady
        baseline = daemon.fd_count()
        stuck, other = await daemon.worker_pids()
        os.kill(stuck, signal.SIGSTOP)  # it can receive but never acknowledge
        served: list[int] = []
        cut: list[BaseException] = []

        async def client() -> None:
            try:
                served.append(await echo_session(daemon, messages=2))
            except (GSSError, EOFError) as error:
                cut.append(error)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(client)
            # Killed once all 8 handoffs are sent (the warm-up's was the first): one still
            # to send when the kill lands would find the worker gone, never reach it, and
            # rightly go to the other (redelivered): not what this test is about.
            with trio.fail_after(20):
                while True:
                    status = await daemon.status()
                    in_flight = {w["pid"]: w["in_flight"] for w in status["workers"]}
                    if in_flight.get(stuck) and status["totals"]["handoffs"] == 9:
                        break
                    await trio.sleep(0.02)
            os.kill(stuck, signal.SIGKILL)
        assert len(served) + len(cut) == 8 and cut
        assert set(served) <= {other}
        status = await daemon.status()
        assert status["totals"]["redelivered"] == 0
        assert status["totals"]["died_unclaimed"] == len(cut)
        assert status["totals"]["lost"] == 0
        assert status["totals"]["worker_restarts"] >= 1
        with trio.fail_after(10):
            while len(await daemon.worker_pids()) < 2:
                await trio.sleep(0.05)
        await echo_session(daemon, messages=1)
        # The status queries above use control connections the acceptor closes just
        # after answering: wait for the count to settle; a leak never does.
        with trio.fail_after(10):
            while daemon.fd_count() != baseline:
                await trio.sleep(0.05)
        assert other in await daemon.worker_pids()
    finally:
        assert await daemon.stop() == 0


async def test_garbage_and_silent_clients_do_not_stall_others(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=2,
                                extra="[server]\nhandshake_timeout = 1.5\nmax_handshakes = 64")
    try:
        silent = [await trio.open_tcp_stream(daemon.host, daemon.port) for _ in range(20)]
        garbage = await trio.open_tcp_stream(daemon.host, daemon.port)
        await garbage.send_all(encode_frame(FrameType.HANDSHAKE, b"\x60\x05hello"))
        reply = await garbage.receive_some(4096)
        # The acceptor says why, in GSS terms, then closes.
        assert reply[0] == FrameType.ERROR
        major, _minor = decode_error(reply[5:13])
        assert GSS_ROUTINE_ERROR(major) in (GSS_S_DEFECTIVE_TOKEN, 0x10000)  # or BAD_MECH
        await garbage.aclose()

        with trio.fail_after(10):  # well before the silent ones time out... or after: no stall
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(echo_session, daemon)
        # The silent clients are cut off at the handshake deadline, with a status.
        with trio.fail_after(10):
            for stream in silent:
                data = await stream.receive_some(4096)
                if data:
                    assert data[0] == FrameType.ERROR
                    major, _ = decode_error(data[5:13])
                    assert GSS_ROUTINE_ERROR(major) == GSS_S_FAILURE
                await stream.aclose()
        status = await daemon.status()
        assert sum(status["handshake_failures"].values()) >= 21
        assert status["totals"]["acked"] == 20
    finally:
        assert await daemon.stop() == 0


async def test_sigterm_drains_established_sessions(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=2)
    stream = await daemon.connect()
    async with stream:
        pid_line = b""
        while not pid_line.endswith(b"\n"):
            pid_line += await stream.receive_some(1)
        daemon.process.send_signal(signal.SIGTERM)
        # The session keeps working while the daemon drains.
        for i in range(10):
            await stream.send_all(b"still here %d" % i)
            expected = b"still here %d" % i
            got = b""
            while len(got) < len(expected):
                got += await stream.receive_some()
            assert got == expected
            await trio.sleep(0.05)
        # New connections are no longer accepted.
        with pytest.raises(OSError):
            await trio.open_tcp_stream(daemon.host, daemon.port)
    with trio.fail_after(30):
        assert await daemon.process.wait() == 0


async def test_workers_that_fail_at_boot_stop_the_daemon_with_a_clear_error(
    tmp_path: Path,
) -> None:
    from tests.daemon_harness import write_config

    config = write_config(tmp_path, workers=2, app="tests.apps:no_such_handler",
                          extra="[workers]\nboot_failures_max = 3\nrestart_backoff_max = 0.1")
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "handoffd", "serve", "--config", str(config)],
            capture_stderr=True, check=False)
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "Workers keep failing at start-up" in stderr
    assert "no_such_handler" in stderr  # the worker's own log line says why


async def test_resize_and_roll(tmp_path: Path) -> None:
    daemon: RunningDaemon = await start_daemon(tmp_path, workers=2)
    try:
        before = set(await daemon.worker_pids())
        daemon.process.send_signal(signal.SIGTTIN)
        with trio.fail_after(20):
            while len(await daemon.worker_pids()) != 3:
                await trio.sleep(0.05)
        daemon.process.send_signal(signal.SIGTTOU)
        with trio.fail_after(20):
            while len((await daemon.status())["workers"]) != 2:
                await trio.sleep(0.05)
        daemon.process.send_signal(signal.SIGHUP)
        with trio.fail_after(30):
            while True:
                now = set(await daemon.worker_pids())
                status = await daemon.status()
                if len(now) == 2 and not now & before and len(status["workers"]) == 2:
                    break
                await trio.sleep(0.05)
        await echo_session(daemon)
    finally:
        assert await daemon.stop() == 0
