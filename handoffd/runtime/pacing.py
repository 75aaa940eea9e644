"""Pacing handshakes on the acceptor: deadlines, eviction and fair turns per source.

:mod:`handoffd.core.admission` decides who holds a slot; this module applies that to
running connections with trio:

* each connection's handshake runs in a cancel scope whose deadline is
  ``first_token_timeout`` after ``accept()`` until the first token arrives, then
  ``handshake_timeout`` after ``accept()``; an eviction cancels it;
* each expensive handshake step (message 2's key generation and DHs) takes the
  source's **turn**, a FIFO lock per source: a source with many connections ready
  gets one step per scheduling round, so its flood queues behind itself instead of
  in front of other sources' clients.  A flood from many sources still shares the
  acceptor's CPU among them all (docs/THREATS.md says what that costs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import trio

from handoffd.core.admission import Admission, Slot, Stage


@dataclass
class _Turn:
    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0


class SourceTurns:
    """One handshake step at a time per source, first come first served."""

    def __init__(self) -> None:
        self._turns: dict[str, _Turn] = {}

    def __len__(self) -> int:
        """Sources with a step running or waiting (tests check nothing stays behind)."""
        return len(self._turns)

    @asynccontextmanager
    async def turn(self, source: str) -> AsyncIterator[None]:
        """Hold ``source``'s turn (trio.Lock is fair: waiters go in arrival order)."""
        turn = self._turns.get(source)
        if turn is None:
            turn = self._turns[source] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[source]


class ConnectionPace:
    """One connection's :class:`~handoffd.runtime.wire.HandshakePace`."""

    def __init__(self, admission: Admission, slot: Slot, turns: SourceTurns, *,
                 first_token_timeout: float, handshake_timeout: float) -> None:
        self.admission = admission
        self.slot = slot
        self.turns = turns
        self._handshake_deadline = slot.admitted + handshake_timeout
        self.scope = trio.CancelScope(
            deadline=slot.admitted + min(first_token_timeout, handshake_timeout))

    def token_arrived(self, first: bool) -> None:
        """Progress: the slot is no longer the first to evict; the long deadline applies."""
        self.admission.progress(self.slot, Stage.HANDSHAKE, trio.current_time())
        if first:
            self.scope.deadline = self._handshake_deadline

    def turn(self) -> AbstractAsyncContextManager[None]:
        """The source's turn for one expensive step."""
        return self.turns.turn(self.slot.source)

    def evict(self) -> None:
        """A newcomer took this slot (the admission table already let it go)."""
        self.scope.cancel()
