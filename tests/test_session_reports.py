"""Session reports (SESSION_END) on their way from a worker to the acceptor's counts
(issue 19): the reports of sessions a drain cuts arrive even as their worker exits, and
the acceptor's last line says how many were cut, per worker and in total; reports from
many sessions at once wait their turn on a full channel instead of killing the worker;
a worker's false or malformed reports are refused, counted and logged rate-limited.
What the client and ``handoffd status`` see of sessions: ``test_session_visibility.py``."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from handoffd.core.handoff import FD_KINDS, Kind, Outcome, SessionEnd
from handoffd.kernel.channel import Channel
from handoffd.kernel.parking import WorkerParking
from handoffd.minor import Minor
from handoffd.runtime.worker import HandoffReceiver, WorkerIdentity
from handoffd.status import GSSError
from tests.daemon_harness import RunningDaemon, echo_session, read_line, start_daemon


async def _status_until(daemon: RunningDaemon, done: Any) -> dict[str, Any]:
    with trio.fail_after(15):
        while not done(status := await daemon.status()):
            await trio.sleep(0.05)
    return status


async def test_the_drain_counts_and_logs_every_session_it_cut(tmp_path: Path) -> None:
    """Two idle sessions, ``drain_timeout = 1``, SIGTERM: both clients get
    ``SESSION_DRAINED``; the worker's SESSION_END reports, sent as it exits, are read
    (counted ``cut_at_drain``, not ``lost_with_worker``), and the acceptor's last line
    names the count per worker and in total."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log,
                                extra="[workers]\ndrain_timeout = 1")
    streams = [await daemon.connect() for _ in range(2)]
    (worker,) = {int(await read_line(stream)) for stream in streams}
    await _status_until(daemon, lambda s: s["sessions_active"] == 2)
    daemon.process.send_signal(signal.SIGTERM)
    for stream in streams:
        with pytest.raises(GSSError) as cut, trio.fail_after(15):
            await stream.receive_some()
        assert cut.value.minor == Minor.SESSION_DRAINED
        await stream.aclose()
    with trio.fail_after(20):
        assert await daemon.process.wait() == 0
    text = log.read_text()
    assert (f"stopped: 2 sessions cut at drain (worker 0 pid {worker}: 2); sessions ended: "
            "closed 0, app_error 0, peer_error 0, cut_at_drain 2, lost_with_worker 0") \
        in text, text[-2000:]


async def test_reports_wait_their_turn_on_a_full_channel() -> None:
    """The acceptor is not reading and the channel is full: three sessions end at once.
    Each report waits for room in turn (a second task waiting to write one trio socket
    would be BusyResourceError, killing the worker); once the acceptor reads, all three
    arrive.  A real socketpair; this test plays the acceptor."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel.from_fd(theirs.detach(), fd_kinds=FD_KINDS, validate_fd=None)
    parking = WorkerParking("fallback", b"w" * 16, [], b"")
    receiver = HandoffReceiver(channel, parking,
                               WorkerIdentity(b"w" * 16, os.getpid(), os.getuid()))
    filler = socket.socket(fileno=os.dup(channel.fileno()))
    sent = 0
    try:
        while True:  # the channel's fd is non-blocking: fill it to EAGAIN
            filler.send(b"x" * 1024)
            sent += 1
    except BlockingIOError:
        pass
    finally:
        filler.close()
    try:
        async with trio.open_nursery() as nursery:
            for handoff_id in (1, 2, 3):
                nursery.start_soon(receiver.session_ended, handoff_id, Outcome.CLOSED)
            await trio.testing.wait_all_tasks_blocked()
            received = []
            ours.setblocking(False)
            while len(received) < sent + 3:
                await trio.lowlevel.wait_readable(ours)
                received.append(ours.recv(65536))
        ends = [SessionEnd.decode(data[12:]) for data in received[sent:]]
        assert sorted(end.handoff_id for end in ends) == [1, 2, 3]
        assert all(data[4:6] == Kind.SESSION_END.to_bytes(2, "big") for data in received[sent:])
    finally:
        receiver.close()
        ours.close()


async def test_false_and_malformed_reports_are_refused_and_counted(tmp_path: Path) -> None:
    """A compromised worker (``tests.apps:lying_reports``) with one session open sends a
    short SESSION_END, one with an unknown outcome and 50 "closed" ones: the malformed two
    and 49 of the 50 are refused and counted, logged rate-limited (the rest counted in the
    next line).  It can misreport its own session (the one report taken: ``closed`` 1, so
    the session's real end is refused in turn), never count beyond the sessions it was
    handed; the daemon serves on."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, app="tests.apps:lying_reports", log=log)
    try:
        stream = await daemon.connect()
        await read_line(stream)
        await stream.send_all(b"lie")
        assert await stream.receive_some() == b"done"
        status = await _status_until(
            daemon, lambda s: s["totals"]["session_reports_refused"] >= 51)
        assert status["totals"]["session_reports_refused"] == 51
        assert status["totals"]["sessions_closed"] == 1 and status["sessions_active"] == 0
        await stream.aclose()
        await _status_until(daemon, lambda s: s["totals"]["session_reports_refused"] == 52)
        await echo_session(daemon, messages=1)
        status = await _status_until(daemon, lambda s: s["totals"]["sessions_closed"] == 2)
        assert status["sessions_active"] == 0
        assert status["totals"]["session_reports_refused"] == 52
        assert daemon.process.returncode is None
    finally:
        assert await daemon.stop() == 0
    text = log.read_text()
    assert "sent a malformed session report" in text
    assert "more like this in the last" in text
    assert "sent a bad" not in text  # refused as session reports, not as channel noise
