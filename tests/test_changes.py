"""handoffd.runtime.changes: waiting for a condition on notifications, not a timer."""

from __future__ import annotations

import trio
import trio.testing

from handoffd.runtime.changes import Changes


async def test_wait_until_returns_at_once_when_the_condition_holds() -> None:
    changes = Changes()
    with trio.fail_after(1):
        await changes.wait_until(lambda: True)


async def test_wait_until_rechecks_at_each_notify_and_only_then() -> None:
    changes = Changes()
    state = {"value": 0}
    done = trio.Event()

    async def waiter() -> None:
        await changes.wait_until(lambda: state["value"] >= 2)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        state["value"] = 2  # changed without a notify: nobody looks
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        state["value"] = 1
        changes.notify()  # woken, condition still false: waits again
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        state["value"] = 2
        changes.notify()
        with trio.fail_after(1):
            await done.wait()


async def test_notify_wakes_every_waiter() -> None:
    changes = Changes()
    woken = []

    async def waiter(n: int) -> None:
        await changes.wait()
        woken.append(n)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(waiter, n)
        await trio.testing.wait_all_tasks_blocked()
        changes.notify()
    assert sorted(woken) == [0, 1, 2]
