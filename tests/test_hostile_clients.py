"""Hostile network clients against a real ``handoffd serve``: each attack is bounded in
count and time, and each test shows a legitimate client still served beside it.

Attackers connect from other loopback addresses (Linux routes all of 127/8 to ``lo``:
a client ``bind()``s its source before ``connect()``), so they count as other sources
than the legitimate client's 127.0.0.1.  Deadlines are set far above the test's own
duration where a test must show that eviction or refusal, not a timeout, made room.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

import trio

from handoffd.core.context import InitiatorContext
from handoffd.core.framing import (
    FrameDecoder,
    FrameType,
    decode_error,
    encode_frame,
    wrap_first_token,
)
from handoffd.minor import Minor
from handoffd.runtime.wire import read_frame
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSS_S_UNAVAILABLE, GSSError
from tests.daemon_harness import RunningDaemon, echo_session, start_daemon

PATIENT = "first_token_timeout = 60.0\nhandshake_timeout = 60.0"
"""Deadlines no test here reaches: what makes room must be eviction or refusal."""


async def open_from(daemon: RunningDaemon, source: str) -> trio.SocketStream:
    """A TCP connection to the daemon from ``source`` (a 127/8 address)."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect((daemon.host, daemon.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def last_word(stream: trio.SocketStream) -> tuple[int, int] | None:
    """The ERROR the acceptor sent before closing (None: it closed without one)."""
    decoder = FrameDecoder()
    try:
        frame = await read_frame(stream, decoder)
    except GSSError:
        return None  # EOF
    assert frame.type == FrameType.ERROR, frame
    assert await stream.receive_some() == b""
    return decode_error(frame.body)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_slowloris_from_one_address_cannot_keep_others_out(tmp_path: Path) -> None:
    """Three times ``max_handshakes`` idle connections from one address: it gets the free
    slots, then each further one is refused at once (ERROR HANDSHAKE_SOURCE_LIMIT), and
    renewing them gains nothing.  A client from elsewhere evicts one of the idle ones and
    is served, long before any deadline could have freed a slot."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log, extra=(
        f"[server]\nmax_handshakes = 16\nmax_handshakes_per_source = 4\n{PATIENT}"))
    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(20):
            for _ in range(48):
                idle.append(await open_from(daemon, "127.0.0.2"))
            refused = 0
            for stream in idle[16:]:  # the first 16 took the free slots
                assert await last_word(stream) == (GSS_S_UNAVAILABLE,
                                                   Minor.HANDSHAKE_SOURCE_LIMIT)
                refused += 1
            renewed = await open_from(daemon, "127.0.0.2")
            idle.append(renewed)
            assert await last_word(renewed) == (GSS_S_UNAVAILABLE, Minor.HANDSHAKE_SOURCE_LIMIT)
            for _ in range(3):
                await echo_session(daemon, messages=1)
        status = await daemon.status()
        assert status["totals"]["refused_per_source"] == refused + 1 == 33
        assert status["totals"]["evicted"] >= 1
        assert status["totals"]["acked"] == 3
        assert status["handshake_slots"]["first_token"] <= 16
        # One line for the burst of refusals, not 33: the log is rate-limited.
        assert log.read_text().count("max_handshakes_per_source") <= 2
    finally:
        for stream in idle:
            await stream.aclose()
        assert await daemon.stop() == 0
    assert "more like this" in log.read_text()


async def test_slowloris_from_many_addresses_is_evicted_oldest_first(tmp_path: Path) -> None:
    """Idle connections from twelve addresses, each within its share, renewed as soon
    (20 ms) after they are closed, three times the slots in all: newcomers evict the oldest idle
    ones, and legitimate clients connecting meanwhile are served every time."""
    daemon = await start_daemon(tmp_path, workers=1, extra=(
        f"[server]\nmax_handshakes = 16\nmax_handshakes_per_source = 4\n{PATIENT}"))
    sources = [f"127.0.1.{n}" for n in range(1, 13)]
    opened = 0
    served: list[int] = []

    async def hold(source: str) -> None:
        nonlocal opened
        while True:  # bounded by the nursery's cancellation below
            stream = await open_from(daemon, source)
            opened += 1
            async with stream:
                assert await last_word(stream) == (GSS_S_UNAVAILABLE, Minor.HANDSHAKE_EVICTED)
            # Renewed 20 ms later: these attackers share the legitimate client's event
            # loop, and renewing without pause would starve its own sends, not the daemon.
            await trio.sleep(0.02)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for source in sources:
                    for _ in range(4):
                        nursery.start_soon(hold, source)
                while opened < 48:
                    await trio.sleep(0.01)
                for _ in range(5):
                    served.append(await echo_session(daemon, messages=1))
                nursery.cancel_scope.cancel()
        status = await daemon.status()
        assert len(served) == 5 and status["totals"]["acked"] == 5
        assert status["totals"]["evicted"] >= 48 - 16
        assert status["totals"]["refused_per_source"] == 0
    finally:
        assert await daemon.stop() == 0


async def test_a_message_1_replay_flood_queues_behind_itself(tmp_path: Path) -> None:
    """Eight connections from one address replay a captured message 1 as fast as the
    acceptor answers (each answer costs it a key generation and two DHs); a client from
    another address completes every one of its handshakes meanwhile."""
    daemon = await start_daemon(tmp_path, workers=1, extra="[server]\nhandshake_timeout = 5.0")
    context = InitiatorContext(static_key=None, server_fingerprint=daemon.fingerprint,
                               clock=time.time, random=os.urandom)
    frame = encode_frame(FrameType.HANDSHAKE, wrap_first_token(context.step(None)[1]))
    answered = 0

    async def replay() -> None:
        nonlocal answered
        while True:  # bounded by the nursery's cancellation below
            async with await open_from(daemon, "127.0.0.3") as stream:
                await stream.send_all(frame)
                second = await read_frame(stream, FrameDecoder())
                assert second.type == FrameType.HANDSHAKE
                answered += 1

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(replay)
                while answered < 50:
                    await trio.sleep(0.01)
                served = [await echo_session(daemon, messages=1) for _ in range(10)]
                nursery.cancel_scope.cancel()
        assert len(served) == 10
        status = await daemon.status()
        assert status["totals"]["acked"] == 10 and status["totals"]["lost"] == 0
    finally:
        assert await daemon.stop() == 0


async def test_oversized_handshake_frames_are_refused_at_the_header(tmp_path: Path) -> None:
    """A HANDSHAKE frame announcing more than Noise's 64 KiB cap is refused as soon as
    its 5-byte header arrives (TOKEN_TOO_LARGE), its body never read; frames up to the
    cap, held open one byte short, cost the acceptor at most slots x cap of memory."""
    slots = 32
    daemon = await start_daemon(tmp_path, workers=1, extra=(
        f"[server]\nmax_handshakes = {slots}\nmax_handshakes_per_source = 0\n{PATIENT}"))
    streams: list[trio.SocketStream] = []
    try:
        with trio.fail_after(30):
            for size in (64 * 1024 + 1, 1024 * 1024, 2**32 - 1):
                stream = await open_from(daemon, "127.0.0.4")
                streams.append(stream)
                await stream.send_all(struct.pack(">BI", FrameType.HANDSHAKE, size))
                assert await last_word(stream) == (GSS_S_DEFECTIVE_TOKEN,
                                                   Minor.TOKEN_TOO_LARGE)
            before = rss_kib(daemon.pid)
            cap = 64 * 1024
            for _ in range(slots):
                stream = await open_from(daemon, "127.0.0.5")
                streams.append(stream)
                await stream.send_all(struct.pack(">BI", FrameType.HANDSHAKE, cap)
                                      + b"\x60" * (cap - 1))
            while (await daemon.status())["handshake_slots"]["first_token"] < slots:
                await trio.sleep(0.05)
            await trio.sleep(0.2)  # let the acceptor read what it will
            grown = rss_kib(daemon.pid) - before
            # Each holds at most its frame plus one read (16 KiB) beyond: 2.5 MiB here;
            # before the cap, the same 32 connections could pin 32 MiB (1 MiB frames).
            assert grown < slots * (cap + 16 * 1024) // 1024 + 4096, f"grew {grown} KiB"
            assert await echo_session(daemon, messages=1) in await daemon.worker_pids()
    finally:
        for stream in streams:
            await stream.aclose()
        assert await daemon.stop() == 0


async def test_no_worker_means_a_bounded_wait_then_unavailable(tmp_path: Path) -> None:
    """With no worker at all (count = 0, none registered) a client whose handshake
    finished waits ``[workers] wait_timeout``, shown in status as waiting, then gets
    ERROR GSS_S_UNAVAILABLE / NO_WORKER_AVAILABLE, counted and logged.  Once a worker
    exists (SIGTTIN grows the pool) the next client is served."""
    log = tmp_path / "daemon.log"
    run = tmp_path / "run"
    run.mkdir()
    daemon = await start_daemon(tmp_path, workers=0, log=log, extra=(
        f'[workers]\nwait_timeout = 1.5\nregister_socket = "{run / "register.sock"}"\n'
        "[policy]\nworker_uids = [64999]"))
    try:
        with trio.fail_after(20):
            stream = await daemon.connect()
            async with stream:
                while (await daemon.status())["waiting_for_worker"] != 1:
                    await trio.sleep(0.05)
                try:
                    await stream.receive_some()
                except GSSError as error:
                    assert (error.major, error.minor) == (GSS_S_UNAVAILABLE,
                                                          Minor.NO_WORKER_AVAILABLE)
                else:
                    raise AssertionError("the client was not told UNAVAILABLE")
            status = await daemon.status()
            assert status["totals"]["unavailable"] == 1 and status["waiting_for_worker"] == 0
            assert "no worker is ready" in log.read_text()
            assert "wait_timeout" in log.read_text()
            os.kill(daemon.pid, signal.SIGTTIN)
            while not await daemon.worker_pids():
                await trio.sleep(0.05)
            await echo_session(daemon, messages=1)
    finally:
        assert await daemon.stop() == 0
