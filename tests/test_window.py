"""The receive window against a plain reference model, and its exact MIT semantics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoffd.core.window import MAX_SEQNUM, WINDOW_SIZE, SequenceWindow
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_DUPLICATE_TOKEN,
    GSS_S_GAP_TOKEN,
    GSS_S_OLD_TOKEN,
    GSS_S_UNSEQ_TOKEN,
    GSSError,
)

DUP, OLD, UNSEQ, GAP = GSS_S_DUPLICATE_TOKEN, GSS_S_OLD_TOKEN, GSS_S_UNSEQ_TOKEN, GSS_S_GAP_TOKEN


class ReferenceWindow:
    """RFC 2743 §1.2.3 / MIT rules written the obvious way: every number ever seen, in a set."""

    def __init__(self, replay: bool, sequence: bool) -> None:
        self.replay = replay
        self.sequence = sequence
        self.seen: set[int] = set()
        self.next = 0

    def check(self, n: int) -> int:
        if not (self.replay or self.sequence):
            return 0
        if n >= self.next:
            gap = n > self.next
            self.seen.add(n)
            self.next = n + 1
            return GAP if gap and self.sequence else 0
        if self.next - n > 64:
            return UNSEQ if self.sequence else OLD
        if self.replay and n in self.seen:
            return DUP
        self.seen.add(n)
        return UNSEQ if self.sequence else 0


# Sequence numbers that stay close together (so the window is exercised), with the odd
# big jump, some of them near the top of the u64 range.
_steps = st.lists(
    st.one_of(
        st.integers(-70, 70),
        st.sampled_from([63, 64, 65, -63, -64, -65, 2**40, -(2**40)]),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    start=st.sampled_from([0, 1000, MAX_SEQNUM - 200, MAX_SEQNUM - 5]),
    steps=_steps,
    replay=st.booleans(),
    sequence=st.booleans(),
    export_at=st.integers(0, 60),
)
def test_window_matches_reference_model(
    start: int, steps: list[int], replay: bool, sequence: bool, export_at: int
) -> None:
    window = SequenceWindow(replay=replay, sequence=sequence)
    model = ReferenceWindow(replay, sequence)
    n = start
    for i, step in enumerate([0, *steps]):
        n = min(max(n + step, 0), MAX_SEQNUM)
        if i == export_at:  # the state survives an export at any point
            window = SequenceWindow.from_bytes(window.to_bytes())
        assert window.check(n) == model.check(n), (i, n)
        assert window.next_expected == model.next or not (replay or sequence)


@pytest.mark.parametrize("gap", [62, 63, 64, 65, 66, 2**32, 2**63, MAX_SEQNUM - 1])
def test_gaps_around_the_window_size(gap: int) -> None:
    """After a jump of ``gap``, exactly the numbers within 64 of the top are checkable."""
    window = SequenceWindow()
    assert window.check(0) == 0
    assert window.check(1 + gap) == GAP
    if gap >= WINDOW_SIZE - 1:  # the shift pushed 0 out: the map holds only the top
        assert window.to_bytes()[9:] == (1).to_bytes(8, "big")
    # 0 is 1 + gap + 1 - 0 steps behind the next expected number.
    assert window.check(0) == (UNSEQ if gap + 1 >= WINDOW_SIZE else DUP)
    if gap:
        assert window.check(1) == UNSEQ  # in the window iff gap <= 63; unseen: UNSEQ either way
        assert window.check(1) == (DUP if gap < WINDOW_SIZE else UNSEQ)


def test_replay_only_reports_old_not_unseq() -> None:
    window = SequenceWindow(replay=True, sequence=False)
    assert window.check(5) == 0  # a gap is not reported without sequencing
    assert window.check(3) == 0
    assert window.check(3) == DUP
    assert window.check(200) == 0
    assert window.check(137) == 0  # 64 behind next (201): still in the window
    assert window.check(137) == DUP
    assert window.check(136) == OLD


def test_sequence_only_reports_duplicates_as_unseq() -> None:
    window = SequenceWindow(replay=False, sequence=True)
    assert window.check(0) == 0
    assert window.check(0) == UNSEQ
    assert window.check(2) == GAP
    assert window.check(1) == UNSEQ
    assert window.check(100) == GAP
    assert window.check(1) == UNSEQ  # too old: also UNSEQ, as MIT reports it


def test_both_off_records_nothing() -> None:
    window = SequenceWindow(replay=False, sequence=False)
    for n in (5, 5, 0, MAX_SEQNUM):
        assert window.check(n) == 0
    assert window.next_expected == 0
    assert window == SequenceWindow(replay=False, sequence=False)


def test_top_of_the_range() -> None:
    window = SequenceWindow()
    assert window.check(MAX_SEQNUM) == GAP
    assert window.next_expected == 2**64
    assert window.check(MAX_SEQNUM) == DUP
    assert window.check(MAX_SEQNUM - 63) == UNSEQ
    assert window.check(MAX_SEQNUM - 63) == DUP
    assert window.check(MAX_SEQNUM - 64) == UNSEQ  # out of the window: never a duplicate
    assert window.check(MAX_SEQNUM - 64) == UNSEQ
    restored = SequenceWindow.from_bytes(window.to_bytes())
    assert restored == window
    assert restored.next_expected == 2**64
    assert restored.check(MAX_SEQNUM) == DUP


@pytest.mark.parametrize("bad", [-1, MAX_SEQNUM + 1, 2**200])
def test_out_of_range_numbers_are_rejected_without_change(bad: int) -> None:
    window = SequenceWindow()
    window.check(3)
    before = window.to_bytes()
    with pytest.raises(GSSError) as info:
        window.check(bad)
    assert (info.value.major, info.value.minor) == (GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_BAD_FIELD)
    assert window.to_bytes() == before


def test_encoding_layout() -> None:
    window = SequenceWindow(replay=True, sequence=False)
    assert window.to_bytes() == bytes([1]) + bytes(16)
    window.check(0)
    window.check(2)
    assert window.to_bytes() == bytes([1]) + (2).to_bytes(8, "big") + (0b101).to_bytes(8, "big")
    assert len(window.to_bytes()) == SequenceWindow.ENCODED_SIZE == 17


@pytest.mark.parametrize(
    ("data", "minor"),
    [
        (b"", Minor.TOKEN_TRUNCATED),
        (bytes(16), Minor.TOKEN_TRUNCATED),
        (bytes(18), Minor.TOKEN_TRAILING_BYTES),
        (bytes([4]) + bytes(16), Minor.TOKEN_BAD_FIELD),  # unknown flag
        (bytes([3]) + (5).to_bytes(8, "big") + bytes(8), Minor.TOKEN_BAD_FIELD),  # no map
        (bytes([3]) + (5).to_bytes(8, "big") + (2).to_bytes(8, "big"), Minor.TOKEN_BAD_FIELD),
        (bytes([3]) + (1).to_bytes(8, "big") + (5).to_bytes(8, "big"), Minor.TOKEN_BAD_FIELD),
    ],
)
def test_from_bytes_is_strict(data: bytes, minor: Minor) -> None:
    with pytest.raises(GSSError) as info:
        SequenceWindow.from_bytes(data)
    assert (info.value.major, info.value.minor) == (GSS_S_DEFECTIVE_TOKEN, minor)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_from_bytes_arbitrary_input_raises_only_gsserror(data: bytes) -> None:
    try:
        window = SequenceWindow.from_bytes(data)
    except GSSError as exc:
        assert exc.major == GSS_S_DEFECTIVE_TOKEN
    else:
        assert window.to_bytes() == data  # whatever decodes, re-encodes identically


def test_full_map_is_accepted_at_highest_63() -> None:
    data = bytes([3]) + (63).to_bytes(8, "big") + (2**64 - 1).to_bytes(8, "big")
    window = SequenceWindow.from_bytes(data)
    assert window.check(0) == DUP
    assert window.check(64) == 0
