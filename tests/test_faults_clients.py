"""Fault injection from the client side against a real ``handoffd serve``: clients that
vanish at every step of the handshake, silent and half-open clients cut off at the
handshake deadline, and a flood of connections that never speak.

After each the daemon must still serve a real client and its fd count (and its workers')
must come back to where it was.  Already covered elsewhere, not repeated here: garbage
frames and 20 silent clients not stalling real ones
(``test_daemon.py::test_garbage_and_silent_clients_do_not_stall_others``).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from handoffd.core.context import InitiatorContext
from handoffd.core.framing import (
    CLOSE_MIC_MESSAGE,
    FrameDecoder,
    FrameType,
    decode_error,
    encode_frame,
    wrap_first_token,
)
from handoffd.minor import Minor
from handoffd.runtime.stream import SecureStream
from handoffd.runtime.wire import read_frame
from handoffd.status import GSS_S_FAILURE
from tests.daemon_harness import RunningDaemon, echo_session, start_daemon


class Client:
    """A hand-driven client: each handshake step is a separate call, so a test can stop
    (or vanish) between any two of them."""

    def __init__(self, daemon: RunningDaemon, transport: trio.SocketStream) -> None:
        self.transport = transport
        self.context = InitiatorContext(static_key=None, server_fingerprint=daemon.fingerprint,
                                        clock=time.time, random=os.urandom)
        self.decoder = FrameDecoder()
        self.third = b""

    @classmethod
    async def open(cls, daemon: RunningDaemon) -> Client:
        return cls(daemon, await trio.open_tcp_stream(daemon.host, daemon.port))

    def first_frame(self) -> bytes:
        _, first = self.context.step(None)
        return encode_frame(FrameType.HANDSHAKE, wrap_first_token(first))

    async def send_message_1(self) -> None:
        await self.transport.send_all(self.first_frame())

    async def read_message_2(self) -> None:
        second = await read_frame(self.transport, self.decoder)
        assert second.type == FrameType.HANDSHAKE
        _, self.third = self.context.step(second.body)

    async def send_message_3(self) -> None:
        await self.transport.send_all(encode_frame(FrameType.HANDSHAKE, self.third))

    async def vanish(self, *, reset: bool) -> None:
        """Close: a FIN, or with ``reset`` an RST (SO_LINGER 0), as a crashed peer might."""
        if reset:
            self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                             struct.pack("ii", 1, 0))
        await self.transport.aclose()


async def _right_after_connect(client: Client) -> None:
    pass


async def _mid_first_frame(client: Client) -> None:
    frame = client.first_frame()
    await client.transport.send_all(frame[: len(frame) // 2])


async def _after_message_1(client: Client) -> None:
    await client.send_message_1()


async def _after_reading_message_2(client: Client) -> None:
    await client.send_message_1()
    await client.read_message_2()


async def _after_message_3_before_reading(client: Client) -> None:
    await client.send_message_1()
    await client.read_message_2()
    await client.send_message_3()


async def _mid_first_message_after_the_handshake(client: Client) -> None:
    await client.send_message_1()
    await client.read_message_2()
    await client.send_message_3()
    # Reaches the worker: half a MESSAGE frame, then the client is gone.
    data = encode_frame(FrameType.MESSAGE, client.context.wrap(b"never finished"))
    await client.transport.send_all(data[: len(data) // 2])


STEPS: dict[str, Callable[[Client], Awaitable[None]]] = {
    "right-after-connect": _right_after_connect,
    "mid-first-frame": _mid_first_frame,
    "after-message-1": _after_message_1,
    "after-reading-message-2": _after_reading_message_2,
    "after-message-3-before-reading": _after_message_3_before_reading,
    "mid-first-message-after-the-handshake": _mid_first_message_after_the_handshake,
}
HANDED_OFF = ("after-message-3-before-reading", "mid-first-message-after-the-handshake")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def steady_fds(daemon: RunningDaemon) -> dict[int, int]:
    """The fd counts of the acceptor and its workers once they stop moving (the last
    session and status query close their fds a moment after the client is done)."""
    pids = (daemon.pid, *await daemon.worker_pids())
    previous: dict[int, int] = {}
    with trio.fail_after(15):
        while True:
            await trio.sleep(0.2)
            current = {pid: fd_count(pid) for pid in pids}
            if current == previous:
                return current
            previous = current


async def settled(daemon: RunningDaemon, fds: dict[int, int]) -> dict[str, int]:
    """Wait until every accepted connection is accounted for (handshake failed or handed
    off and acknowledged) and the daemon's and workers' fd counts are back at ``fds``
    (pid -> count; control connections close just after answering, so poll)."""
    with trio.fail_after(15):
        while True:
            status = await daemon.status()
            totals = status["totals"]
            failures = sum(status["handshake_failures"].values())
            # Handed off and answered: imported (acked) or refused by the worker.
            answered = totals["acked"] + sum(status["refused_by_worker"].values())
            current = {pid: fd_count(pid) for pid in fds}
            if totals["accepted"] == answered + failures and current == fds:
                return {**totals, "failures": failures, "answered": answered}
            await trio.sleep(0.05)


async def test_clients_vanishing_at_every_handshake_step_leave_nothing_behind(
    tmp_path: Path,
) -> None:
    """At each step, with a FIN and with an RST: the acceptor counts a handshake failure
    (or, after message 3, hands the connection off and the worker's session just ends,
    also when the client left halfway through its first message),
    nothing is lost, no fd stays open in the acceptor or a worker, and the next real
    client is served."""
    daemon = await start_daemon(tmp_path, workers=2)
    try:
        await echo_session(daemon, messages=1)
        workers = await daemon.worker_pids()
        baseline = await steady_fds(daemon)
        before = await settled(daemon, baseline)
        for name, step in STEPS.items():
            for reset in (False, True):
                client = await Client.open(daemon)
                await step(client)
                await client.vanish(reset=reset)
                after = await settled(daemon, baseline)
                handed_off = name in HANDED_OFF
                # Reset after message 3: the worker may find the connection already dead
                # and refuse it in its ACK; either way the acceptor hears back from it.
                assert after["answered"] - before["answered"] == int(handed_off), (
                    name, reset)
                assert after["failures"] - before["failures"] == int(not handed_off), (
                    name, reset)
                assert after["lost"] == 0
                before = after
                assert await echo_session(daemon, messages=1) in workers
                before = await settled(daemon, baseline)
        assert await daemon.worker_pids() == workers, "a worker died on the way"
    finally:
        assert await daemon.stop() == 0


async def _expect_timeout_error(stream: trio.SocketStream, decoder: FrameDecoder,
                                minor: Minor = Minor.HANDSHAKE_TIMEOUT) -> None:
    """The acceptor's last word to a client that ran out of time: ERROR(HANDSHAKE_TIMEOUT),
    or FIRST_TOKEN_TIMEOUT if its first token never arrived whole."""
    frame = await read_frame(stream, decoder)
    assert frame.type == FrameType.ERROR, frame
    assert decode_error(frame.body) == (GSS_S_FAILURE, minor)
    assert await stream.receive_some() == b"", "the acceptor did not close after the error"


async def test_silent_and_half_open_clients_are_cut_off_at_the_handshake_deadline(
    tmp_path: Path,
) -> None:
    """Clients that stop talking (after connecting, halfway through the first frame, after
    message 1 without ever reading) look half-open to the acceptor: each is told
    HANDSHAKE_TIMEOUT (FIRST_TOKEN_TIMEOUT before a whole first token) and closed at
    ``handshake_timeout`` (here shorter than ``first_token_timeout``), and so is one
    that trickles its first message a byte at a time.  A client that half-closes
    (shutdown SHUT_WR) is closed at once as PEER_CLOSED.  Nothing leaks."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log,
                                extra="[server]\nhandshake_timeout = 1.0")
    try:
        await echo_session(daemon, messages=1)
        workers = await daemon.worker_pids()
        baseline = await steady_fds(daemon)
        before = await settled(daemon, baseline)

        silent = await Client.open(daemon)
        partial = await Client.open(daemon)
        await _mid_first_frame(partial)
        mute_after_1 = await Client.open(daemon)
        await mute_after_1.send_message_1()
        half_closed = await Client.open(daemon)
        await half_closed.send_message_1()
        await half_closed.transport.send_eof()
        # A slow-loris: one byte of message 1 every 50 ms (all of it would take 3 s) earns
        # no more time: the deadline covers the whole handshake, not each silence.
        trickle = await Client.open(daemon)
        trickled = trickle.first_frame()

        async def drip() -> None:
            for byte in trickled[:-1]:
                try:
                    await trickle.transport.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await trio.sleep(0.05)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drip)
                await _expect_timeout_error(trickle.transport, trickle.decoder,
                                            Minor.FIRST_TOKEN_TIMEOUT)
                nursery.cancel_scope.cancel()
            for client in (silent, partial):
                await _expect_timeout_error(client.transport, client.decoder,
                                            Minor.FIRST_TOKEN_TIMEOUT)
            await mute_after_1.read_message_2()  # it was sent: then the deadline struck
            await _expect_timeout_error(mute_after_1.transport, mute_after_1.decoder)
            await half_closed.read_message_2()
            assert await half_closed.transport.receive_some() == b""  # no ERROR: it left
        for client in (silent, partial, mute_after_1, half_closed, trickle):
            await client.transport.aclose()

        after = await settled(daemon, baseline)
        assert after["failures"] - before["failures"] == 5
        assert after["lost"] == 0 and after["acked"] == before["acked"]
        text = log.read_text()
        assert "The client did not finish the handshake in time" in text, text
        assert "The client did not send its first token in time" in text, text
        assert await echo_session(daemon, messages=2) in workers
    finally:
        assert await daemon.stop() == 0


async def test_a_flood_of_silent_connections_above_max_handshakes(tmp_path: Path) -> None:
    """Three times ``max_handshakes`` connections that never speak: the acceptor holds at
    most ``max_handshakes`` of them at once (each newcomer evicts the oldest silent one,
    closed before anything else happens), cuts the last ones off at the deadline, and a
    real client arriving behind the flood is served; fds come back to the baseline."""
    slots = 4
    daemon = await start_daemon(tmp_path, workers=1, extra=(
        f"[server]\nhandshake_timeout = 1.0\nmax_handshakes = {slots}\nbacklog = 128"))
    flood: list[trio.SocketStream] = []
    try:
        await echo_session(daemon, messages=1)
        workers = await daemon.worker_pids()
        baseline = await steady_fds(daemon)
        before = await settled(daemon, baseline)

        for _ in range(3 * slots):
            flood.append(await trio.open_tcp_stream(daemon.host, daemon.port))
        peak = 0
        with trio.fail_after(10):  # the acceptor has taken some of the flood (a busy machine
            while peak < 1:        # may be slow to accept): only then the real client
                peak = max(peak, daemon.fd_count() - baseline[daemon.pid])
                await trio.sleep(0.005)
        served: list[int] = []

        async def real_client() -> None:
            served.append(await echo_session(daemon, messages=2))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(real_client)
            with trio.fail_after(30):
                while not served:
                    # No status query here: it would open a control connection.
                    peak = max(peak, daemon.fd_count() - baseline[daemon.pid])
                    await trio.sleep(0.01)
        # The slots, plus at most one copy of a connection handed off and not yet acked.
        assert 1 <= peak <= slots + 1, f"the acceptor held {peak} connections"
        assert served[0] in workers
        for stream in flood:
            await stream.aclose()

        after = await settled(daemon, baseline)
        assert after["failures"] - before["failures"] == 3 * slots
        assert after["acked"] - before["acked"] == 1
        assert after["lost"] == 0
        assert await echo_session(daemon, messages=1) in workers
    finally:
        for stream in flood:
            await stream.aclose()
        assert await daemon.stop() == 0


async def test_a_burst_of_connections_reset_at_once(tmp_path: Path) -> None:
    """200 clients connect and reset (RST) at once, some before the acceptor even called
    accept(): the acceptor neither dies nor leaks, and serves the next client."""
    daemon = await start_daemon(tmp_path, workers=1)
    try:
        await echo_session(daemon, messages=1)
        workers = await daemon.worker_pids()
        baseline = await steady_fds(daemon)

        async def connect_and_reset() -> None:
            client = await Client.open(daemon)
            await client.vanish(reset=True)

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(connect_and_reset)
        after = await settled(daemon, baseline)
        assert after["lost"] == 0 and after["accept_errors"] == 0
        assert await echo_session(daemon, messages=1) in workers
        assert daemon.process.returncode is None
    finally:
        assert await daemon.stop() == 0


async def test_a_client_that_says_everything_and_hangs_up_still_gets_its_answers(
    tmp_path: Path,
) -> None:
    """Message 3, two messages and a CLOSE in one segment, then the client shuts its
    sending side (FIN) before reading anything: the acceptor exports the bytes past the
    handshake, the worker echoes both messages and closes, the client reads it all."""
    daemon = await start_daemon(tmp_path, workers=1)
    try:
        client = await Client.open(daemon)
        await client.send_message_1()
        await client.read_message_2()
        early = [b"said early\n", b"and hung up\n"]
        await client.transport.send_all(
            encode_frame(FrameType.HANDSHAKE, client.third)
            + b"".join(encode_frame(FrameType.MESSAGE, client.context.wrap(data))
                       for data in early)
            + encode_frame(FrameType.CLOSE, client.context.get_mic(CLOSE_MIC_MESSAGE)))
        await client.transport.send_eof()
        stream = SecureStream(client.transport, client.context, decoder=client.decoder)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                received += chunk
        pid, _, echoed = received.partition(b"\n")
        assert int(pid) in await daemon.worker_pids()
        assert echoed == b"".join(early)
        await stream.aclose()
    finally:
        assert await daemon.stop() == 0


async def test_a_client_pipelining_far_more_than_a_handoff_message_holds(tmp_path: Path) -> None:
    """128 KiB of messages in the segment of message 3: whatever the acceptor reads past
    the handshake must fit in the 64 KiB HANDOFF message (the rest waits in the socket for
    the worker).  It used to read all of it, fail to send the handoff, leave it in flight,
    and SIGKILL every worker in turn at ``ack_timeout``."""
    daemon = await start_daemon(tmp_path, workers=2, extra="[workers]\nack_timeout = 2")
    try:
        workers = await daemon.worker_pids()
        client = await Client.open(daemon)
        await client.send_message_1()
        await client.read_message_2()
        chunks = [bytes([65 + i]) * 16000 for i in range(8)]
        await client.transport.send_all(
            encode_frame(FrameType.HANDSHAKE, client.third)
            + b"".join(encode_frame(FrameType.MESSAGE, client.context.wrap(chunk))
                       for chunk in chunks))
        stream = SecureStream(client.transport, client.context, decoder=client.decoder)
        expected = b"".join(chunks)
        received = b""
        async with stream:
            with trio.fail_after(10):
                while not received.endswith(expected):
                    chunk = await stream.receive_some()
                    assert chunk, len(received)
                    received += chunk
        pid, _, echoed = received.partition(b"\n")
        assert echoed == expected and int(pid) in workers
        status = await daemon.status()
        assert status["totals"]["acked"] == 1 and status["totals"]["redelivered"] == 0
        assert status["totals"]["worker_restarts"] == 0
        assert await daemon.worker_pids() == workers
    finally:
        assert await daemon.stop() == 0
