"""Hostile peers on the handoff channel, against a real worker process.

``test_channel.py`` proves the channel refuses every malformed message (many fds,
non-socket fds, truncated and oversized messages...) inside one process, and
``test_worker_library.py::test_impostor_writing_on_the_channel_is_refused_fds_closed``
covers a process of the acceptor's uid that is not the acceptor.  What is added here:
the same hostile messages sent into a running worker process (its ``/proc/PID/fd`` must
come back to where it was, a HANDOFF the acceptor really sent is always answered, and
the worker keeps serving), and a sender of another uid.
"""

from __future__ import annotations

import array
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from handoffd.core.handoff import Ack, Handoff, Kind
from handoffd.kernel.channel import FLAG_FD, HEADER, MAGIC, VERSION
from handoffd.minor import Minor
from handoffd.runtime.daemon import prepare_handoff
from handoffd.runtime.stream import SecureStream
from tests.daemon_harness import REPO, RunningDaemon, echo_session, read_line, start_daemon
from tests.test_worker_library import Harness, trio_clock, worker_harness

MAX_PAYLOAD = 65536  # the worker channel's default limit


def frame(kind: int, payload: bytes, *, flags: int | None = None, magic: bytes = MAGIC,
          length: int | None = None) -> bytes:
    """A channel message, well-formed unless a field is overridden."""
    if flags is None:
        flags = FLAG_FD if kind == Kind.HANDOFF else 0
    return HEADER.pack(magic, VERSION, flags, kind, 0,
                       len(payload) if length is None else length) + payload


def worker_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def steady_fds(pid: int) -> int:
    """The worker's fd count once it stops moving."""
    previous = -1
    with trio.fail_after(10):
        while True:
            await trio.sleep(0.1)
            current = worker_fds(pid)
            if current == previous:
                return current
            previous = current


@contextmanager
def tcp_connection() -> Iterator[socket.socket]:
    """The accepted end of a live loopback TCP connection (its client is kept open)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    with client, accepted:
        yield accepted


def _unix_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def _udp() -> socket.socket:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect(("127.0.0.1", 9))
    return udp


def _listening_tcp() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def _unconnected_tcp() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


# A HANDOFF payload that decodes (so the worker knows which handoff to answer) but whose
# fd is wrong: the worker must ACK it with the reason, or the acceptor would take the
# worker for stuck and kill it.
WRONG_FD: dict[str, tuple[Callable[[], socket.socket], Minor]] = {
    "unix-socket": (_unix_socket, Minor.CHANNEL_FD_NOT_TCP),
    "udp": (_udp, Minor.CHANNEL_FD_NOT_TCP),
    "unconnected-tcp": (_unconnected_tcp, Minor.CHANNEL_FD_NOT_CONNECTED),
    "listening-tcp": (_listening_tcp, Minor.CHANNEL_FD_NOT_CONNECTED),
}


async def _send_raw(h: Harness, data: bytes, fds: list[int]) -> None:
    ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                 if fds else [])
    with trio.fail_after(10):
        await trio.lowlevel.wait_writable(h.channel.fileno())
    raw = socket.socket(fileno=os.dup(h.channel.fileno()))
    with raw:
        raw.sendmsg([data], ancillary)


async def _serve_one(h: Harness) -> None:
    """A genuine handoff: acknowledged and served (proves the worker still works, and
    that it read everything sent before it)."""
    client, server_side, inner = await h.handshake()
    handoff_id = h.next_id()
    _, message = prepare_handoff(h.parking, h.worker_id, handoff_id, inner, trio_clock())
    await h.channel.send(Kind.HANDOFF, message, fd=server_side.socket.fileno())
    assert Ack.decode(await h.expect(Kind.ACK)) == Ack(handoff_id)
    server_side.socket.close()
    async with client:
        assert int(await read_line(client)) == h.process.pid
        await client.send_all(b"still serving")
        assert await client.receive_some() == b"still serving"


async def test_hostile_messages_from_the_acceptor_end_leak_nothing_in_the_worker() -> None:
    """Malformed messages on the channel of a running worker: those the channel refuses
    (no fd, 2 and 200 fds, an fd on a kind that carries none, truncated, oversized, bad
    magic, a short header, an undecodable HANDOFF) get no answer; a decodable HANDOFF with
    a non-TCP, unconnected or listening socket, or a key reference that names no parked
    key, is answered with an ACK carrying the reason.  Every fd the worker received is
    closed, and it serves a genuine handoff afterwards."""
    async with worker_harness() as h:
        pid = h.process.pid
        await _serve_one(h)
        baseline = await steady_fds(pid)
        expected_acks: list[tuple[int, int]] = []
        with tcp_connection() as tcp:
            fd = tcp.fileno()
            good_payload = Handoff(h.next_id(), b"\x01" * 8, b"sealed").encode()
            channel_refusals: list[tuple[bytes, list[int]]] = [
                (frame(Kind.HANDOFF, good_payload), []),
                (frame(Kind.HANDOFF, good_payload), [fd, fd]),
                (frame(Kind.HANDOFF, good_payload), [fd] * 200),
                (frame(Kind.DRAINED, b""), [fd]),
                (frame(Kind.HANDOFF, good_payload[:5], length=100), [fd]),
                (frame(Kind.HANDOFF, b"x" * (MAX_PAYLOAD + 1)), [fd]),
                (frame(Kind.HANDOFF, b"x" * (MAX_PAYLOAD + 4096)), [fd]),
                (frame(Kind.HANDOFF, good_payload, magic=b"??"), [fd]),
                (b"HD\x01", [fd]),
                (frame(Kind.HANDOFF, b"h"), [fd]),  # decodes to no handoff id: no answer
                (frame(Kind.HELLO, b"not for a worker"), []),
            ]
            for data, fds in channel_refusals:
                await _send_raw(h, data, fds)
            for make, minor in WRONG_FD.values():
                with make() as wrong:
                    handoff_id = h.next_id()
                    payload = Handoff(handoff_id, b"\x01" * 8, b"sealed").encode()
                    await _send_raw(h, frame(Kind.HANDOFF, payload), [wrong.fileno()])
                    expected_acks.append((handoff_id, minor))
            # A real TCP fd, but the key reference names nothing parked for this worker.
            handoff_id = h.next_id()
            await _send_raw(h, frame(Kind.HANDOFF,
                                     Handoff(handoff_id, b"\x01" * 8, b"sealed").encode()), [fd])
            answers = await h.acks(len(expected_acks) + 1)
        assert [(a.handoff_id, a.minor) for a in answers[:-1]] == expected_acks
        assert answers[-1].handoff_id == handoff_id and answers[-1].major != 0
        assert all(a.major != 0 for a in answers)
        await _serve_one(h)
        with trio.fail_after(10):
            while worker_fds(pid) != baseline:
                await trio.sleep(0.05)
        assert h.process.returncode is None


# Runs as root so that the interpreter loads, then becomes nobody before it writes on the
# acceptor's end it inherited (as a leaked fd would let it): the worker sees uid 65534 in
# the message's credentials.
_OTHER_UID = """
import os, sys, trio
from handoffd.kernel.channel import Channel
chan_fd, conn_fd, payload = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
async def main():
    channel = Channel.from_fd(chan_fd, fd_kinds=frozenset({2}), validate_fd=None)
    for _ in range(20):
        await channel.send(2, payload, fd=conn_fd)
trio.run(main)
"""


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another uid")
async def test_a_sender_of_another_uid_is_refused_and_changes_nothing() -> None:
    """A process of another uid holding the acceptor's end sends a genuine sealed handoff
    20 times: all refused without an ACK, every fd closed in the worker, and the parked
    key untouched: the acceptor's own delivery of the very same message imports."""
    async with worker_harness() as h:
        pid = h.process.pid
        baseline = await steady_fds(pid)
        client, server_side, inner = await h.handshake()
        handoff_id = h.next_id()
        _, message = prepare_handoff(h.parking, h.worker_id, handoff_id, inner, trio_clock())
        chan_fd, conn_fd = h.channel.fileno(), server_side.socket.fileno()
        impostor = await trio.run_process(
            [sys.executable, "-c", _OTHER_UID, str(chan_fd), str(conn_fd), message.hex()],
            pass_fds=(chan_fd, conn_fd), check=False, capture_stderr=True,
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")
        assert impostor.returncode == 0, impostor.stderr.decode()
        # The worker processes in order: once the acceptor's delivery is acknowledged,
        # all 20 were refused, and without an answer (the next message is this ACK).
        await h.channel.send(Kind.HANDOFF, message, fd=conn_fd)
        assert Ack.decode(await h.expect(Kind.ACK)) == Ack(handoff_id)
        server_side.socket.close()
        async with client:
            assert int(await read_line(client)) == pid
        with trio.fail_after(10):
            while worker_fds(pid) != baseline:
                await trio.sleep(0.05)


async def test_a_hostile_worker_cannot_crash_the_acceptor_or_touch_other_handoffs(
    tmp_path: Path,
) -> None:
    """A compromised worker (``tests.apps:hostile_to_acceptor``) writes on its channel what
    the acceptor never expects: empty, short, oversized, truncated and bad-magic messages,
    ACKs with 1 and 200 fds, fds on REGISTERED and HANDOFF, kinds meant for workers, a
    HELLO naming someone else, and ACKs for every handoff id so far.  The acceptor refuses
    each, closes every fd it received, counts none of those ACKs, keeps both workers and
    the other worker's session, and serves new clients."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=2, app="tests.apps:hostile_to_acceptor",
                                log=log)
    try:
        workers = set(await daemon.worker_pids())
        sessions: dict[int, SecureStream] = {}
        with trio.fail_after(20):
            while set(sessions) != workers:  # one open session on each worker
                stream = await daemon.connect()
                pid = int(await read_line(stream))
                if pid in sessions:
                    await stream.aclose()
                else:
                    sessions[pid] = stream
        attacker, victim = sessions.values()
        baseline = await daemon_fds(daemon)
        acked = (await daemon.status())["totals"]["acked"]
        await attacker.send_all(b"attack")
        with trio.fail_after(10):
            assert await attacker.receive_some() == b"done"
            while "unexpected kind 99" not in log.read_text():
                await trio.sleep(0.05)
        await victim.send_all(b"unharmed")
        assert await victim.receive_some() == b"unharmed"
        status = await daemon.status()
        assert status["totals"]["acked"] == acked and status["totals"]["lost"] == 0
        assert set(await daemon.worker_pids()) == workers
        assert daemon.process.returncode is None
        for stream in sessions.values():
            await stream.aclose()
        await echo_session(daemon, messages=2)
        # Acknowledged sessions hold no fd in the acceptor: the count is what it was.
        assert await daemon_fds(daemon) == baseline
        text = log.read_text()
        for expected in ("sent a bad message", "acknowledged unknown handoff",
                         "HELLO does not match"):
            assert expected in text, expected
    finally:
        assert await daemon.stop() == 0


async def daemon_fds(daemon: RunningDaemon) -> int:
    """The acceptor's fd count once it stops moving (status queries close a bit late)."""
    previous = -1
    with trio.fail_after(10):
        while True:
            await trio.sleep(0.2)
            current = daemon.fd_count()
            if current == previous:
                return current
            previous = current
