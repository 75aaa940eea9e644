"""The handshake slot table (pure) and the per-source turns (trio, no sockets)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from handoffd.core.admission import Admission, Slot, SourceFull, Stage, source_of
from handoffd.runtime.pacing import SourceTurns


@pytest.mark.parametrize(("host", "v4", "v6", "source"), [
    ("203.0.113.7", 32, 64, "203.0.113.7/32"),
    ("203.0.113.7", 24, 64, "203.0.113.0/24"),
    ("2001:db8:1:2:3:4:5:6", 32, 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:3:4:5:6", 32, 128, "2001:db8:1:2:3:4:5:6/128"),
    ("::ffff:198.51.100.9", 32, 64, "198.51.100.9/32"),  # IPv4-mapped: its IPv4 address
    ("fe80::1%eth0", 32, 64, "fe80::/64"),
    ("/run/handoffd/x.sock", 32, 64, "/run/handoffd/x.sock"),
])
def test_source_of(host: str, v4: int, v6: int, source: str) -> None:
    assert source_of(host, prefix_v4=v4, prefix_v6=v6) == source


def admitted(result: tuple[Slot | SourceFull, Slot | None]) -> Slot:
    slot, _ = result
    assert isinstance(slot, Slot)
    return slot


def test_free_slots_go_to_anyone_whatever_the_share() -> None:
    table = Admission(capacity=8, per_source=2)
    for t in range(8):
        slot, evicted = table.admit("a", float(t))
        assert isinstance(slot, Slot) and evicted is None
    assert table.held_by("a") == 8 and len(table) == 8


def test_a_full_table_refuses_a_source_at_its_share_and_changes_nothing() -> None:
    table = Admission(capacity=4, per_source=2)
    for t in range(2):
        admitted(table.admit("a", t))
        admitted(table.admit("b", t))
    assert table.admit("a", 9.0) == (SourceFull("a", 2), None)
    assert len(table) == 4 and table.held_by("a") == 2


def test_eviction_order_over_share_then_first_token_then_longest_idle() -> None:
    table = Admission(capacity=4, per_source=2)
    b1 = admitted(table.admit("b", 1.0))
    a = [admitted(table.admit("a", t)) for t in (2.0, 3.0, 4.0)]  # "a" is over its share
    table.progress(a[0], Stage.HANDSHAKE, 5.0)
    table.progress(b1, Stage.HANDSHAKE, 6.0)
    # Over-share first, and among its slots the one without a first token, oldest.
    newcomer, evicted = table.admit("c", 7.0)
    assert evicted is a[1] and evicted.evicted and isinstance(newcomer, Slot)
    # "a" is at its share now: the oldest never-progressed slot of anyone goes next...
    _, evicted = table.admit("d", 8.0)
    assert evicted is a[2]
    _, evicted = table.admit("e", 9.0)
    assert evicted is newcomer
    # ...then, all mid-handshake, the one idle longest.
    table.progress(table._slots[-1], Stage.HANDSHAKE, 10.0)  # "e"
    table.progress(table._slots[-2], Stage.HANDSHAKE, 10.0)  # "d"
    _, evicted = table.admit("f", 11.0)
    assert evicted is a[0]


def test_finished_handshakes_are_never_evicted_and_make_the_table_full() -> None:
    table = Admission(capacity=2, per_source=0)
    slots = [admitted(table.admit("a", t)) for t in (1.0, 2.0)]
    table.progress(slots[0], Stage.WAITING_FOR_WORKER, 3.0)
    assert not table.full
    _, evicted = table.admit("b", 4.0)
    assert evicted is slots[1]
    table.progress(table._slots[-1], Stage.WAITING_FOR_WORKER, 5.0)
    assert table.full
    with pytest.raises(RuntimeError):
        table.admit("c", 6.0)
    table.release(slots[0])
    table.release(slots[0])  # idempotent
    assert not table.full and len(table) == 1


def test_progress_never_goes_back() -> None:
    table = Admission(capacity=1)
    slot = admitted(table.admit("a", 0.0))
    table.progress(slot, Stage.WAITING_FOR_WORKER, 1.0)
    table.progress(slot, Stage.HANDSHAKE, 2.0)
    assert slot.stage == Stage.WAITING_FOR_WORKER


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(0, 3), st.lists(st.tuples(
    st.sampled_from(["admit", "progress", "finish", "release"]), st.integers(0, 3)),
    max_size=60))
def test_the_table_stays_consistent(capacity: int, per_source: int,
                                    ops: list[tuple[str, int]]) -> None:
    """Whatever happens: never more than ``capacity`` slots, per-source counts match,
    finished handshakes are never evicted, a refusal only when full and at the share."""
    table = Admission(capacity=capacity, per_source=per_source)
    live: list[Slot] = []
    for t, (op, n) in enumerate(ops):
        now = float(t)
        if op == "admit":
            if table.full:
                continue
            source = f"s{n}"
            was_full = len(table) >= capacity
            held = table.held_by(source)
            slot, evicted = table.admit(source, now)
            if isinstance(slot, SourceFull):
                assert was_full and per_source and held >= per_source
                continue
            live.append(slot)
            if evicted is not None:
                assert evicted.stage != Stage.WAITING_FOR_WORKER
                live.remove(evicted)
        elif live:
            slot = live[n % len(live)]
            if op == "progress":
                table.progress(slot, Stage.HANDSHAKE, now)
            elif op == "finish":
                table.progress(slot, Stage.WAITING_FOR_WORKER, now)
            else:
                table.release(slot)
                live.remove(slot)
        assert len(table) == len(live) <= capacity
        for source in {s.source for s in live}:
            assert table.held_by(source) == sum(1 for s in live if s.source == source)


async def test_turns_serve_one_source_in_arrival_order_and_others_beside_it() -> None:
    turns = SourceTurns()
    order: list[str] = []
    release = trio.Event()

    async def step(source: str, name: str) -> None:
        async with turns.turn(source):
            order.append(name)
            if name == "a1":
                await release.wait()

    async with trio.open_nursery() as nursery:
        for name in ("a1", "a2", "a3"):
            nursery.start_soon(step, "a", name)
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(step, "b", "b1")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a1", "b1"]  # b does not wait behind a's queue
        release.set()
    assert order == ["a1", "b1", "a2", "a3"]
    assert len(turns) == 0  # nothing left behind per source
