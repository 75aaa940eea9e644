"""The acceptor's worker states: the transition table, and the values ``status`` and
the metrics show (``handoffd.runtime.pool``)."""

from __future__ import annotations

from typing import Any

import pytest

from handoffd.runtime.pool import (
    TRANSITIONS,
    InvalidTransition,
    Worker,
    WorkerState,
    transition,
)


def _worker(state: WorkerState = WorkerState.STARTING) -> Worker:
    parking: Any = object()  # never touched by a state move
    w = Worker(index=0, worker_id=b"\x00" * 16, parking=parking)
    w.state = state
    return w


def test_state_values_are_what_status_and_metrics_show() -> None:
    assert [s.value for s in WorkerState] == ["starting", "ready", "draining", "dead"]
    assert WorkerState.READY == "ready"  # a snapshot's "state" compares as before
    assert _worker().state is WorkerState.STARTING


def test_the_life_of_a_worker() -> None:
    w = _worker()
    transition(w, WorkerState.READY)
    assert w.ready.is_set()
    transition(w, WorkerState.DRAINING)
    transition(w, WorkerState.DEAD)
    assert w.state is WorkerState.DEAD


@pytest.mark.parametrize("start", list(WorkerState))
@pytest.mark.parametrize("new", list(WorkerState))
def test_only_the_moves_in_the_table_are_allowed(start: WorkerState,
                                                 new: WorkerState) -> None:
    w = _worker(start)
    allowed = {
        (WorkerState.STARTING, WorkerState.READY),
        (WorkerState.STARTING, WorkerState.DRAINING),  # DRAINING before HELLO
        (WorkerState.STARTING, WorkerState.DEAD),  # spawn failed, died at boot
        (WorkerState.READY, WorkerState.DRAINING),
        (WorkerState.READY, WorkerState.DEAD),
        (WorkerState.DRAINING, WorkerState.DEAD),
    }
    assert (new in TRANSITIONS[start]) == ((start, new) in allowed)
    if (start, new) in allowed:
        transition(w, new)
        assert w.state is new
    else:
        with pytest.raises(InvalidTransition):
            transition(w, new)
        assert w.state is start
        assert not w.ready.is_set()
