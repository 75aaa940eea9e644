"""Batching under load, through the real daemon: handoffs ready for one worker at the same
moment go in one HANDOFF_BATCH, and a worker answers what it found queued with one
ACK_BATCH; nothing verified per handoff is skipped (tests/test_worker_library.py has the
refusals inside a batch).

The load is made deterministic with signals: the only worker is stopped (SIGSTOP) while
clients finish their handshakes, so its channel holds ``max_unacked`` single HANDOFFs
and the rest wait for the window; on SIGCONT the worker finds them all queued and answers
with one ACK_BATCH, which frees the window at once, so the waiting handoffs leave in one
HANDOFF_BATCH.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio

from tests.daemon_harness import RunningDaemon, read_line, start_daemon

CLIENTS = 6
WINDOW = 2


async def _client(daemon: RunningDaemon, served: list[int]) -> None:
    stream = await daemon.connect()
    async with stream:
        served.append(int(await read_line(stream)))
        await stream.send_all(b"batched")
        assert await stream.receive_some() == b"batched"


async def test_a_stopped_worker_gets_its_backlog_in_batches_and_acks_it_in_one(
    tmp_path: Path,
) -> None:
    daemon = await start_daemon(tmp_path, workers=1,
                                extra=f"[workers]\nmax_unacked = {WINDOW}\nack_timeout = 30\n")
    try:
        (worker,) = await daemon.worker_pids()
        os.kill(worker, signal.SIGSTOP)
        served: list[int] = []
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(CLIENTS):
                    nursery.start_soon(_client, daemon, served)
                with trio.fail_after(30):  # the window is full, the rest wait for it
                    while True:
                        status = await daemon.status()
                        if (status["totals"]["handoffs"] == WINDOW
                                and status["waiting_for_worker"] == CLIENTS - WINDOW):
                            break
                        await trio.sleep(0.05)
                os.kill(worker, signal.SIGCONT)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert served == [worker] * CLIENTS
        totals = (await daemon.status())["totals"]
        assert totals["handoffs"] == totals["acked"] == CLIENTS
        assert totals["ack_batches"] >= 1, totals
        assert totals["handoff_batches"] >= 1, totals
        assert totals["batched_handoffs"] >= 2 * totals["handoff_batches"], totals
        assert totals["lost"] == 0
    finally:
        assert await daemon.stop() == 0
