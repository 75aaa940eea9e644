"""Clock jumps past context lifetimes against a real ``handoffd serve``, without faketime.

The worker runs ``tests.fault_apps:pid_echo`` with ``HANDOFFD_TEST_CLOCK_FILE``: the fault
app gives the worker library an injected clock (real time plus the offset in that file),
so a test jumps the worker's clock at will; the acceptor keeps the real clock.
"""

from __future__ import annotations

from pathlib import Path

import trio

from handoffd.minor import Minor
from handoffd.status import GSS_ROUTINE_ERROR, GSS_S_CONTEXT_EXPIRED, GSSError
from tests.daemon_harness import echo_session, start_daemon
from tests.test_faults_handoff import read_until, settled_fds, wait_fds

FAULT_APP = "tests.fault_apps:pid_echo"


async def test_context_expired_on_import_is_refused_and_logged(tmp_path: Path) -> None:
    """The worker's clock jumps 10 s, past a 2 s context lifetime but within the 30 s seal:
    the import is refused with CONTEXT_EXPIRED (CONTEXT_LIFETIME_OVER), the client's
    connection is closed, the acceptor logs and counts the refusal; with the clock back,
    the next client is served."""
    clock = tmp_path / "clock"
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, app=FAULT_APP, log=log,
                                extra="[server]\ncontext_lifetime = 2",
                                env={"HANDOFFD_TEST_CLOCK_FILE": str(clock)})
    try:
        baseline = await settled_fds(daemon)
        clock.write_text("10")
        stream = await daemon.connect()
        async with stream:
            assert await read_until(stream, 1) == b""  # closed, never served
        with trio.fail_after(10):
            while not (await daemon.status())["refused_by_worker"]:
                await trio.sleep(0.05)
        status = await daemon.status()
        assert status["refused_by_worker"] == {"CONTEXT_EXPIRED": 1}
        assert status["totals"]["acked"] == 0 and status["totals"]["lost"] == 0
        text = log.read_text()
        assert "refused handoff 1" in text and "lifetime" in text.lower()
        # The acceptor's line names the context id the client has (Noise's h, both sides).
        assert f"context {stream.context.context_id})" in text
        clock.write_text("0")
        await echo_session(daemon, messages=1)
        await wait_fds(daemon, baseline)
    finally:
        assert await daemon.stop() == 0


async def test_context_expiring_mid_session_ends_it_with_an_error_frame(tmp_path: Path) -> None:
    """A session in progress when the worker's clock jumps past the lifetime: the next
    message is refused and the client gets CONTEXT_EXPIRED in an ERROR frame."""
    clock = tmp_path / "clock"
    daemon = await start_daemon(tmp_path, workers=1, app=FAULT_APP,
                                extra="[server]\ncontext_lifetime = 2",
                                env={"HANDOFFD_TEST_CLOCK_FILE": str(clock)})
    try:
        stream = await daemon.connect()
        async with stream:
            line = await read_until(stream, 1)
            while not line.endswith(b"\n"):
                line += await read_until(stream, 1)
            clock.write_text("10")
            await stream.send_all(b"too late")
            try:
                with trio.fail_after(10):
                    got = await stream.receive_some()
            except GSSError as error:
                assert GSS_ROUTINE_ERROR(error.major) == GSS_S_CONTEXT_EXPIRED
                assert error.minor == Minor.CONTEXT_LIFETIME_OVER
            else:
                raise AssertionError(f"an expired context still answered: {got!r}")
    finally:
        assert await daemon.stop() == 0
