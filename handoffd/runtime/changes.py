"""A broadcast "something changed" for trio tasks that wait for a condition, instead of
polling it on a timer."""

from __future__ import annotations

from collections.abc import Callable

import trio


class Changes:
    """Woken waiters re-check their condition.

    :meth:`notify` wakes every task waiting now (and none that starts waiting later:
    each notification is a fresh :class:`trio.Event`).  Whoever changes what a waiter's
    condition reads calls :meth:`notify`; since trio switches tasks only at checkpoints,
    a condition checked false and then waited on cannot miss a change.
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        """Wake every task in :meth:`wait` or :meth:`wait_until`."""
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        """Until the next :meth:`notify`."""
        await self._event.wait()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Until ``condition()`` is true (checked now, then at each :meth:`notify`)."""
        while not condition():
            await self._event.wait()
