"""The ACK watchdog on trio's clock (``handoffd.runtime.pool.ack_watchdog``), driven by
a MockClock that jumps: a handoff left unacknowledged past ``ack_timeout`` gets its
worker killed, one acknowledged in time does not.  In-process, a fake worker process."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from handoffd.runtime.dispatch import Pending
from handoffd.runtime.pool import Worker, ack_watchdog

ACK_TIMEOUT = 5.0


class FakeProcess:
    """What the watchdog may touch of a worker process: its pid and kill()."""

    pid = 4242
    uid = 4242
    returncode: int | None = None

    def __init__(self) -> None:
        self.killed_at: list[float] = []

    def kill(self) -> None:
        self.killed_at.append(trio.current_time())

    def send_signal(self, signum: int) -> None:  # pragma: no cover - not used here
        raise AssertionError("the watchdog only kills")

    async def wait(self) -> int:  # pragma: no cover - not used here
        await trio.sleep_forever()
        return 0


def _worker() -> tuple[Worker, FakeProcess]:
    parking: Any = object()
    process = FakeProcess()
    return Worker(index=0, worker_id=b"\x01" * 16, parking=parking, process=process), process


def _send(w: Worker, handoff_id: int) -> None:
    stream: Any = object()  # the watchdog reads only the bookkeeping
    w.in_flight[handoff_id] = Pending(handoff_id, stream, b"", 0.0, "client",
                                      sent_at=trio.current_time())


async def test_an_unacknowledged_handoff_gets_its_worker_killed(
        autojump_clock: trio.testing.MockClock, caplog: Any) -> None:
    w, process = _worker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ack_watchdog, w, ACK_TIMEOUT)
        await trio.sleep(1.0)
        sent = trio.current_time()
        _send(w, 7)
        with trio.fail_after(10 * ACK_TIMEOUT):
            while not process.killed_at:
                await trio.sleep(0.1)
    # Killed once (the watchdog returned), after ack_timeout, within one check period.
    assert len(process.killed_at) == 1
    late = process.killed_at[0] - sent
    assert ACK_TIMEOUT < late <= ACK_TIMEOUT * 1.25 + 1e-9
    assert "did not acknowledge handoff 7 within 5s: killing it" in caplog.text


async def test_a_handoff_acknowledged_in_time_does_not(
        autojump_clock: trio.testing.MockClock) -> None:
    w, process = _worker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ack_watchdog, w, ACK_TIMEOUT)
        for handoff_id in range(1, 6):
            _send(w, handoff_id)
            await trio.sleep(ACK_TIMEOUT * 0.9)
            del w.in_flight[handoff_id]  # the ACK
        await trio.sleep(ACK_TIMEOUT * 10)  # nothing in flight: nothing to be late
        assert process.killed_at == []
        nursery.cancel_scope.cancel()
    assert trio.current_time() >= ACK_TIMEOUT * 14  # the clock did jump
