"""Fault injection against a real ``handoffd serve``: workers killed at every point of a
handoff, the acceptor killed and restarted, the acceptor at its fd limit.

The exact points are reached with ``tests.fault_apps`` (a worker app that stops its own
process at a chosen step of the worker library; nothing of it is in the product), then
the test SIGKILLs the stopped worker.  Already covered elsewhere, not repeated here:
a worker stopped for good is killed after ``ack_timeout`` and what it was sent is not
redelivered (``test_daemon_edges.py::test_a_worker_that_never_acknowledges_...``), and
a burst of clients with a SIGKILLed worker (``test_daemon.py::test_handoffs_sent_...``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from handoffd.minor import Minor
from handoffd.runtime.client import open_secure_stream
from handoffd.runtime.stream import SecureStream
from handoffd.status import GSSError
from tests.daemon_harness import (
    REPO,
    SITE_PACKAGES,
    SYSTEM_PYTHON,
    RunningDaemon,
    _fingerprint,
    drop_dir,
    echo_session,
    pipelined_client,
    set_nofile,
    start_daemon,
    write_config,
)
from tests.fault_apps import POINTS
from tests.systemd_activation import SOCKET_ACTIVATE, socket_activated

FAULT_APP = "tests.fault_apps:pid_echo"


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``T`` stopped, ``Z`` zombie), None once reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


async def wait_paused(marker: Path) -> int:
    """The pid the fault app wrote to ``marker``, once that process has stopped itself."""
    with trio.fail_after(20):
        while not marker.exists() or not marker.read_text():
            await trio.sleep(0.02)
        pid = int(marker.read_text())
        while process_state(pid) != "T":
            await trio.sleep(0.02)
    return pid


async def wait_fds(daemon: RunningDaemon, baseline: int) -> None:
    """The acceptor's fd count settles back to ``baseline`` (control queries close late)."""
    with trio.fail_after(10):
        while daemon.fd_count() != baseline:
            await trio.sleep(0.05)


async def settled_fds(daemon: RunningDaemon) -> int:
    """The acceptor's fd count once the harness's last control query has been closed."""
    with trio.fail_after(10):
        count = daemon.fd_count()
        while True:
            await trio.sleep(0.2)
            if (now := daemon.fd_count()) == count:
                return count
            count = now




async def read_until(stream: SecureStream, size: int) -> bytes:
    """Up to ``size`` bytes, fewer if the connection ends (EOF, reset or a GSS error)."""
    received = b""
    with trio.fail_after(20):
        while len(received) < size:
            try:
                chunk = await stream.receive_some(size - len(received))
            except (trio.BrokenResourceError, GSSError):
                break
            if not chunk:
                break
            received += chunk
    return received


@pytest.mark.parametrize("point", POINTS)
async def test_worker_killed_at_each_point_of_a_handoff(tmp_path: Path, point: str) -> None:
    """Killed at any point after the HANDOFF was queued to it, the worker takes that
    client with it: the connection is never given to another worker (the worker may have
    read the token and its key, and a second import would reuse the first one's nonces).
    The acceptor counts it by what the key slot shows -- claimed (burned) or not -- and
    neither as lost nor as redelivered; killed after its ACK the connection was simply
    that worker's.  The daemon goes on serving, and no fd is left behind."""
    marker = drop_dir(tmp_path) / "paused.pid"
    daemon = await start_daemon(
        tmp_path, workers=2, app=FAULT_APP, extra="[workers]\nack_timeout = 60",
        env={"HANDOFFD_TEST_FAULT": point, "HANDOFFD_TEST_FAULT_ONCE": str(marker)})
    try:
        baseline = await settled_fds(daemon)
        early = [b"pipelined with the last handshake token\n", b"and a second one\n"]
        stream = await pipelined_client(daemon, early)
        paused = await wait_paused(marker)
        assert paused in await daemon.worker_pids()
        await stream.send_all(b"sent while the worker was stopped\n")
        os.kill(paused, signal.SIGKILL)
        async with stream:
            # Nothing more arrives: no other worker ever answers this client.
            assert await read_until(stream, 1) == b""
        with trio.fail_after(20):
            while len(await daemon.worker_pids()) < 2 or paused in await daemon.worker_pids():
                await trio.sleep(0.05)
        totals = (await daemon.status())["totals"]
        assert totals["lost"] == 0 and totals["redelivered"] == 0
        assert totals["worker_restarts"] == 1
        assert totals["acked"] == (1 if point == "after-ack" else 0)
        assert totals["died_after_claim"] == (1 if point == "after-claim" else 0)
        assert totals["died_unclaimed"] == (1 if point in ("before-receive", "before-claim")
                                            else 0)
        await echo_session(daemon, messages=2)
        await wait_fds(daemon, baseline)
    finally:
        assert await daemon.stop() == 0


async def test_acceptor_sigkill_leaves_no_orphans_and_a_restart_serves(tmp_path: Path) -> None:
    """SIGKILL of the acceptor: each worker sees its channel end (EOF), finishes the
    session it already owns (the client keeps talking to it), and exits; none is left
    running.  The supervisor starts a new acceptor on the same listening sockets, which
    serves at once."""
    daemon = await start_daemon(tmp_path, workers=2)
    try:
        workers = await daemon.worker_pids()
        session = await daemon.connect()
        async with session:
            pid_line = await read_until(session, 1)
            while not pid_line.endswith(b"\n"):
                pid_line += await session.receive_some(1)
            os.kill(daemon.pid, signal.SIGKILL)
            # The worker owns the connection: the acceptor's death does not end it.
            await session.send_all(b"after the acceptor died")
            assert await read_until(session, 23) == b"after the acceptor died"
        with trio.fail_after(20):
            while any(process_state(pid) not in (None, "Z") for pid in workers):
                await trio.sleep(0.05)
        with trio.fail_after(30):
            while True:
                with contextlib.suppress(GSSError):
                    status = await daemon.status()
                    if status["pid"] != daemon.pid and len(
                            [w for w in status["workers"] if w["state"] == "ready"]) == 2:
                        break
                await trio.sleep(0.05)
        assert daemon.process.returncode is None  # the supervisor stayed
        daemon.acceptor_pid = status["pid"]
        served_by = await echo_session(daemon, messages=2)
        assert served_by not in workers
    finally:
        assert await daemon.stop() == 0


_MANAGER_LOOP = (
    # What PID 1 does for Restart=always: it keeps the listening socket (fd 3) and starts
    # the service again, with LISTEN_PID naming the new main process.
    'while [ ! -e "$STOP" ]; do sh -c \'LISTEN_PID=$$ exec "$0" -m handoffd serve '
    '--config "$1"\' "$PYTHON" "$CONFIG"; done'
)


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate missing")
def test_socket_activated_listening_socket_survives_an_acceptor_restart(tmp_path: Path) -> None:
    """Under socket activation the manager holds the listening socket: SIGKILL the
    acceptor, a client connects while it is down (the backlog keeps it), and the restarted
    acceptor serves that client and later ones on the same socket."""
    config = write_config(tmp_path, workers=1)
    fingerprint = _fingerprint(tmp_path / "server.key.pub")
    stop = tmp_path / "stop"
    env = {"PYTHONPATH": str(REPO), "STOP": str(stop), "PYTHON": sys.executable,
           "CONFIG": str(config)}
    with socket_activated(["sh", "-c", _MANAGER_LOOP], env=env) as service:
        try:
            ready = service.wait_for("READY", "1")
            assert trio.run(_echo, service.trigger, fingerprint) == b"echo"
            acceptors = _children(ready.pid)
            os.kill(ready.pid, signal.SIGKILL)
            # The acceptor dies with its supervisor (PR_SET_PDEATHSIG), a moment later.
            deadline = time.monotonic() + 20
            while any(process_state(pid) not in (None, "Z") for pid in acceptors):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # Connected while no acceptor runs: waits in the manager's socket backlog.
            waiting = socket.create_connection(service.address, timeout=5)
            again = service.wait_for("READY", "1")
            assert again.pid != ready.pid
            assert trio.run(_echo, waiting, fingerprint) == b"echo"
            later = socket.create_connection(service.address, timeout=5)
            assert trio.run(_echo, later, fingerprint) == b"echo"
        finally:
            stop.touch()
            last = [n.pid for n in service.received if n.fields.get("READY") == "1"]
            if last:
                os.kill(last[-1], signal.SIGTERM)
            service.process.wait(30)
        assert service.process.returncode == 0, service.output()


def _children(pid: int) -> list[int]:
    """The children of ``pid`` (all its threads')."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            found += [int(child) for child in children.read().split()]
    return found


async def _echo(sock: socket.socket, fingerprint: str) -> bytes:
    sock.setblocking(False)
    transport = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    with trio.fail_after(20):
        stream = await open_secure_stream(transport, server_fingerprint=fingerprint)
        async with stream:
            line = b""
            while not line.endswith(b"\n"):
                line += await stream.receive_some(1)
            await stream.send_all(b"echo")
            return await read_until(stream, 4)


async def test_acceptor_at_its_fd_limit_keeps_running_and_recovers(tmp_path: Path) -> None:
    """RLIMIT_NOFILE lowered on the running acceptor to a few fds above what it holds,
    then more clients than that connect and stay silent: accept() fails with EMFILE, the
    acceptor logs it (rate-limited) and closes the connections it cannot take with its
    reserved fd rather than leave them hanging (a status query, a registration or a
    worker that must be respawned at the limit must not kill it either; the status
    query is refused at once); once the clients leave it accepts again, respawns the
    worker and serves a real client, and its fd count is as before."""
    log = tmp_path / "daemon.log"
    register = Path(tempfile.mkdtemp(prefix="handoffd-emfile-", dir="/tmp")) / "register.sock"
    daemon = await start_daemon(tmp_path, workers=1, log=log, extra=(
        f'[server]\nhandshake_timeout = 30\n[workers]\nregister_socket = "{register}"\n'
        '[policy]\nworker_uids = [64999]'))
    try:
        await echo_session(daemon, messages=1)
        [worker] = await daemon.worker_pids()
        baseline = await settled_fds(daemon)
        _soft, hard = set_nofile(daemon.pid, baseline + 4)
        silent = [await trio.open_tcp_stream(daemon.host, daemon.port) for _ in range(12)]
        with trio.fail_after(10):
            while b"Too many open files" not in log.read_bytes():
                await trio.sleep(0.05)
        assert daemon.fd_count() == baseline + 4
        # Neither a worker knocking at the registration socket nor a status query (when
        # an operator is most likely to ask) may kill it: each waits for capacity too.
        knock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        knock.connect(str(register))
        with trio.fail_after(10):
            while b"registration accept: Too many open files" not in log.read_bytes():
                await trio.sleep(0.05)
        with pytest.raises(GSSError), trio.fail_after(5):  # shed for lack of fds, no crash
            await daemon.status()
        # The connection is shed (closed) before the line is written: wait for it.
        with trio.fail_after(10):
            while b"control accept: Too many open files" not in log.read_bytes():
                await trio.sleep(0.05)
        assert log.read_bytes().count(b"accept: Too many open files") <= 3  # rate-limited
        knock.close()
        # A worker dying now cannot be replaced (its channel needs fds): logged, retried.
        os.kill(worker, signal.SIGKILL)
        with trio.fail_after(10):
            while b"cannot spawn worker 0" not in log.read_bytes():
                await trio.sleep(0.05)
        assert daemon.process.returncode is None
        for stream in silent:
            await stream.aclose()
        # Still under the low limit: the connections that waited in the backlog end, then
        # a real client is served and the status answers again.
        with trio.fail_after(20):
            assert await echo_session(daemon, messages=2) != worker
        status = await daemon.status()
        assert status["totals"]["accept_errors"] >= 1
        assert status["totals"]["lost"] == 0
        await wait_fds(daemon, baseline)
        set_nofile(daemon.pid, _soft, hard)
    finally:
        assert await daemon.stop() == 0
        register.unlink(missing_ok=True)
        register.parent.rmdir()



def starve(pid: int, spare: int) -> None:
    """Lower ``pid``'s RLIMIT_NOFILE so that exactly ``spare`` more fds can be opened."""
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    limit, free = 0, 0
    while free < spare or limit in used:
        free += limit not in used
        limit += 1
    set_nofile(pid, limit)


async def test_workers_at_their_fd_limit_are_replaced_and_nothing_is_duplicated(
    tmp_path: Path,
) -> None:
    """Workers with no fd left: the kernel cannot install the connection's fd (nor the
    sender's pidfd) in them (MSG_CTRUNC), so they refuse the message and never
    acknowledge; the acceptor kills them after ``ack_timeout``.  That client's connection
    ends with them (it was sent: never to a second worker), and the next client is served
    by a fresh worker."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=2, log=log,
                                extra="[workers]\nack_timeout = 1.0")
    try:
        starved = await daemon.worker_pids()
        for pid in starved:
            starve(pid, 0)
        cut = 0
        with trio.fail_after(60):
            while True:  # each starved worker takes the one client it was sent with it
                try:
                    served_by = await echo_session(daemon, messages=2)
                    break
                except (GSSError, EOFError):
                    cut += 1
        assert served_by not in starved and 1 <= cut <= len(starved)
        status = await daemon.status()
        assert status["totals"]["redelivered"] == 0
        assert status["totals"]["died_unclaimed"] >= 1
        assert status["totals"]["lost"] == 0
        assert b"did not acknowledge handoff 1" in log.read_bytes()
    finally:
        assert await daemon.stop() == 0



async def test_a_worker_that_cannot_receive_the_senders_pidfd_fails_closed(
    tmp_path: Path,
) -> None:
    """One fd left: the connection's fd is installed but the kernel cannot make the
    sender's pidfd (it sends a negative errno instead). The worker must not skip the
    pidfd check: it refuses the handoff (fds closed, no ACK), the acceptor replaces it
    after ``ack_timeout``; that client is cut, the next one served by the new worker."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log,
                                extra="[workers]\nack_timeout = 1.0")
    try:
        [worker] = await daemon.worker_pids()
        starve(worker, 1)
        with trio.fail_after(30), pytest.raises((GSSError, EOFError)):
            await echo_session(daemon, messages=2)
        with trio.fail_after(30):
            assert await echo_session(daemon, messages=2) != worker
        assert b"no pidfd for pid" in log.read_bytes()
        status = await daemon.status()
        assert status["totals"]["lost"] == 0 and status["totals"]["redelivered"] == 0
        assert status["totals"]["died_unclaimed"] == 1
    finally:
        assert await daemon.stop() == 0


async def test_acceptor_killed_mid_handoff_the_worker_still_serves_the_client(
    tmp_path: Path,
) -> None:
    """The acceptor dies between HANDOFF and ACK (the worker is stopped before claiming):
    the worker claims, imports and fails to acknowledge (channel gone, logged), then
    serves the client it holds, pipelined bytes included, and exits once it is done."""
    marker = drop_dir(tmp_path) / "paused.pid"
    daemon = await start_daemon(
        tmp_path, workers=1, app=FAULT_APP,
        env={"HANDOFFD_TEST_FAULT": "before-claim", "HANDOFFD_TEST_FAULT_ONCE": str(marker)})
    early = [b"pipelined\n"]
    stream = await pipelined_client(daemon, early)
    paused = await wait_paused(marker)
    os.kill(daemon.pid, signal.SIGKILL)
    with trio.fail_after(20):
        while process_state(daemon.pid) not in (None, "Z"):
            await trio.sleep(0.05)
    os.kill(paused, signal.SIGCONT)
    async with stream:
        line = await read_until(stream, 1)
        while line and not line.endswith(b"\n"):
            line += await read_until(stream, 1)
        assert int(line) == paused
        assert await read_until(stream, len(early[0])) == early[0]
        await stream.send_all(b"more")
        assert await read_until(stream, 4) == b"more"
    with trio.fail_after(20):
        while process_state(paused) not in (None, "Z"):
            await trio.sleep(0.05)
    assert await daemon.stop() == 0


# Runs as the daemon's user: keeps 96 fds in flight in a socketpair nobody reads, until
# its stdin closes.  The kernel counts in-flight fds per user and refuses SCM_RIGHTS
# (ETOOMANYREFS) to a sender of that user whose RLIMIT_NOFILE is below the count.
_FD_HOLDER = """
import array, os, socket, sys
left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
null = os.open("/dev/null", os.O_RDONLY)
for _ in range(12):
    left.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [null] * 8))])
print("holding 96", flush=True)
sys.stdin.read()
"""


@pytest.mark.root
async def test_a_handoff_the_kernel_will_not_queue_is_retried_then_dropped_no_worker_killed(
    worker_user: tuple[str, int, int], open_dir: Path,
) -> None:
    """The acceptor's HANDOFF ``sendmsg`` fails with something other than a gone worker
    (here a real ETOOMANYREFS: the daemon's user has more fds in flight than the
    acceptor's RLIMIT_NOFILE).  A SEQPACKET datagram is queued whole or not at all, so
    the acceptor takes the handoff back (its key slot too), tries again with a growing
    pause, and after 5 refusals drops that one connection, logged and counted; the
    healthy worker is neither blamed nor killed by the ACK watchdog, and once the
    kernel takes fds again the same worker serves the next client."""
    _name, uid, gid = worker_user
    log = open_dir / "daemon.log"
    env = {"PYTHONPATH": f"{SITE_PACKAGES}:{REPO}"}
    # Two key slots: a slot not given back on a failed send would stall the retries.
    # RLIMIT_NOFILE 64: far above the ~15 fds the acceptor holds, below the 96 in flight.
    daemon = await start_daemon(open_dir, workers=1, log=log, env=env, python=SYSTEM_PYTHON,
                                user=(uid, gid), nofile=64, extra="[workers]\nmax_unacked = 2")
    holder: trio.Process | None = None
    try:
        worker = await echo_session(daemon, messages=1)
        holder = await trio.lowlevel.open_process(
            [SYSTEM_PYTHON, "-c", _FD_HOLDER], cwd="/", stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, user=uid, group=gid, extra_groups=[])
        assert holder.stdout is not None and holder.stdin is not None
        with trio.fail_after(20):
            assert (await holder.stdout.receive_some(100)).startswith(b"holding 96")

        with pytest.raises(GSSError) as cut, trio.fail_after(20):
            await echo_session(daemon, messages=1)
        # The client's handshake succeeded; the acceptor then closed the connection it
        # could not hand off, which the client sees as a stream cut before CLOSE.
        assert cut.value.minor == Minor.STREAM_TRUNCATED
        text = log.read_text()
        assert text.count("Too many references: cannot splice): retrying") == 4, text[-3000:]
        assert "not sent after 5 tries" in text
        status = await daemon.status()
        assert status["totals"]["lost"] == 1 and status["totals"]["worker_restarts"] == 0
        assert [(w["pid"], w["in_flight"]) for w in status["workers"]] == [(worker, 0)]

        await holder.stdin.aclose()
        with trio.fail_after(20):
            await holder.wait()
        for _ in range(3):  # every key slot is usable again
            assert await echo_session(daemon, messages=1) == worker
        assert (await daemon.status())["totals"]["lost"] == 1
    finally:
        if holder is not None and holder.returncode is None:
            holder.kill()
            await holder.wait()
        assert await daemon.stop() == 0, log.read_text(errors="replace")[-3000:]
