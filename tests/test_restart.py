"""A restart that fails no connection (issue 19): SIGUSR2 to ``serve`` (the supervisor)
starts a new acceptor, with new code and the config re-read, on the same listening
sockets, while the old one hands over: its handshakes in progress reach its workers,
which finish their sessions on their own.  Clients in a loop through a reload (SIGHUP)
and through a restart (SIGUSR2) see zero failures; a session open across the restart
goes on; a config that no longer loads refuses the restart and changes nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from tests.daemon_harness import RunningDaemon, echo_back, echo_session, read_line, start_daemon

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the supervisor runs the acceptor generations"
)


async def clients_through(daemon: RunningDaemon, signum: int, seconds: float = 6.0) -> list[str]:
    """4 client loops (connect, handshake, echo, close) for ``seconds``, ``signum`` sent to
    ``serve`` a third of the way in; the failures."""
    failures: list[str] = []
    served = 0
    stop_at = trio.current_time() + seconds

    async def loop() -> None:
        nonlocal served
        while trio.current_time() < stop_at:
            try:
                with trio.fail_after(10):
                    await echo_session(daemon, messages=2)
                served += 1
            except Exception as error:  # every failure counts, whatever it is
                failures.append(repr(error))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(loop)
        await trio.sleep(seconds / 3)
        daemon.process.send_signal(signum)
    assert served > 8, served
    return failures


async def wait_acceptor_change(daemon: RunningDaemon, old: int) -> dict[str, object]:
    with trio.fail_after(20):
        while True:
            try:
                status = await daemon.status()
            except Exception:
                status = {}
            if status.get("pid") not in (None, old) and status.get("state") == "running":
                ready = [w for w in status["workers"] if w["state"] == "ready"]  # type: ignore[attr-defined]
                if len(ready) == 2:
                    return status
            await trio.sleep(0.05)


async def test_clients_in_a_loop_through_reload_and_restart_see_no_failure(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=2, log=tmp_path / "daemon.log")
    try:
        idle = await daemon.connect()
        await read_line(idle)  # imported by a worker of the first acceptor
        assert await clients_through(daemon, signal.SIGHUP) == []
        before = await daemon.status()
        assert await clients_through(daemon, signal.SIGUSR2) == []
        after = await wait_acceptor_change(daemon, int(before["pid"]))
        assert {w["pid"] for w in after["workers"]}.isdisjoint(  # type: ignore[attr-defined]
            {w["pid"] for w in before["workers"]})
        # the session opened before the restart goes on with its worker, then ends cleanly
        assert await echo_back(idle, b"still here") == b"still here"
        await idle.aclose()
        assert await clients_through(daemon, signal.SIGUSR2) == []  # and again
    finally:
        assert await daemon.stop() == 0
    log = (tmp_path / "daemon.log").read_text()
    assert log.count("handed over: starting a new one on the same sockets") == 2


async def test_a_restart_with_a_broken_config_changes_nothing(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=2, log=tmp_path / "daemon.log")
    try:
        before = await daemon.status()
        config = tmp_path / "handoffd.toml"
        config.write_text(config.read_text() + "\n[nonsense]\n")
        daemon.process.send_signal(signal.SIGUSR2)
        with trio.fail_after(10):
            while "restart refused" not in (tmp_path / "daemon.log").read_text():
                await trio.sleep(0.05)
        assert await echo_session(daemon) > 0
        assert (await daemon.status())["pid"] == before["pid"]
    finally:
        assert await daemon.stop() == 0
