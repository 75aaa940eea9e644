"""Payload codecs of the acceptor-worker handoff messages (docs/HANDOFF.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handoffd.core.handoff import (
    BATCH_KINDS,
    FD_KINDS,
    MAX_BATCH,
    MAX_KEY_REF,
    Ack,
    Handoff,
    Hello,
    Kind,
    Outcome,
    Refused,
    Registered,
    SessionEnd,
    batch_entry_size,
    decode_ack_batch,
    decode_handoff_batch,
    encode_ack_batch,
    encode_handoff_batch,
    expect_empty,
)
from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE, GSSError

WORKER_ID = bytes(range(16))


def test_kinds_and_fd_kinds_are_the_documented_values() -> None:
    assert [(k.name, k.value) for k in Kind] == [
        ("HELLO", 1), ("HANDOFF", 2), ("ACK", 3), ("DRAINING", 4), ("DRAINED", 5),
        ("REGISTERED", 6), ("REFUSED", 7), ("SESSION_END", 8), ("HANDOFF_BATCH", 9),
        ("ACK_BATCH", 10)]
    assert [(o.name, o.value) for o in Outcome] == [
        ("CLOSED", 0), ("APP_ERROR", 1), ("PEER_ERROR", 2), ("CUT_AT_DRAIN", 3)]
    assert {Kind.HANDOFF, Kind.REGISTERED} == FD_KINDS
    assert {Kind.HANDOFF_BATCH} == BATCH_KINDS


def test_byte_layouts() -> None:
    assert Hello(WORKER_ID, 0x01020304).encode() == WORKER_ID + b"\x01\x02\x03\x04"
    assert Handoff(7, b"ref", b"sealed").encode() == (
        b"\x00" * 7 + b"\x07" + b"\x03" + b"ref" + b"sealed")
    assert Ack(1, 0x90000, 208).encode() == (
        b"\x00" * 7 + b"\x01" + b"\x00\x09\x00\x00" + b"\x00\x00\x00\xd0")
    assert Refused(0xF0000, 400).encode() == b"\x00\x0f\x00\x00\x00\x00\x01\x90"
    assert SessionEnd(9, Outcome.APP_ERROR, 0xD0000, 627).encode() == (
        b"\x00" * 7 + b"\x09" + b"\x01" + b"\x00\x0d\x00\x00" + b"\x00\x00\x02\x73")
    assert Registered(WORKER_ID, {"b": "2", "a": "1"}).encode() == (
        WORKER_ID + b'{"a": "1", "b": "2"}')


@given(worker_id=st.binary(min_size=16, max_size=16), pid=st.integers(0, 2**32 - 1),
       handoff_id=st.integers(0, 2**64 - 1), ref=st.binary(max_size=MAX_KEY_REF),
       sealed=st.binary(min_size=1, max_size=300), major=st.integers(0, 2**32 - 1),
       minor=st.integers(0, 2**32 - 1),
       grant=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4))
def test_round_trips(worker_id: bytes, pid: int, handoff_id: int, ref: bytes, sealed: bytes,
                     major: int, minor: int, grant: dict[str, str]) -> None:
    assert Hello.decode(Hello(worker_id, pid).encode()) == Hello(worker_id, pid)
    assert Handoff.decode(Handoff(handoff_id, ref, sealed).encode()) == \
        Handoff(handoff_id, ref, sealed)
    assert Ack.decode(Ack(handoff_id, major, minor).encode()) == Ack(handoff_id, major, minor)
    assert Refused.decode(Refused(major, minor).encode()) == Refused(major, minor)
    for outcome in Outcome:
        end = SessionEnd(handoff_id, outcome, major, minor)
        assert SessionEnd.decode(end.encode()) == end
    assert Registered.decode(Registered(worker_id, grant).encode()) == \
        Registered(worker_id, grant)


@pytest.mark.parametrize(("decode", "payload"), [
    (Hello.decode, WORKER_ID),                              # no pid
    (Hello.decode, WORKER_ID + bytes(5)),                   # one byte too many
    (Handoff.decode, bytes(8)),                             # no ref length
    (Handoff.decode, bytes(8) + b"\x05" + b"abc"),          # ref runs past the end
    (Handoff.decode, bytes(8) + b"\x03" + b"abc"),          # no sealed token at all
    (Ack.decode, bytes(15)),
    (Ack.decode, bytes(17)),
    (Refused.decode, bytes(7)),
    (SessionEnd.decode, bytes(16)),
    (SessionEnd.decode, bytes(18)),
    (SessionEnd.decode, bytes(8) + b"\x04" + bytes(8)),       # no such outcome
    (Registered.decode, WORKER_ID),                         # no grant
    (Registered.decode, WORKER_ID + b"not json"),
    (Registered.decode, WORKER_ID + b'["a list"]'),
    (Registered.decode, WORKER_ID + b'{"fd": 3}'),          # values must be strings
    (Registered.decode, WORKER_ID + b"[" * 100_000),        # nesting: RecursionError inside
])
def test_malformed_payloads_are_defective_tokens(decode: object, payload: bytes) -> None:
    with pytest.raises(GSSError) as caught:
        decode(payload)  # type: ignore[operator]
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                        Minor.CHANNEL_BAD_PAYLOAD)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_gss_errors(payload: bytes) -> None:
    for decode in (Hello.decode, Handoff.decode, Ack.decode, Refused.decode,
                   Registered.decode, SessionEnd.decode):
        try:
            decode(payload)
        except GSSError as error:
            assert error.major == GSS_S_DEFECTIVE_TOKEN


def test_empty_kinds_and_oversized_key_ref() -> None:
    expect_empty(Kind.DRAINING, b"")
    with pytest.raises(GSSError, match="DRAINED payload must be empty"):
        expect_empty(Kind.DRAINED, b"x")
    with pytest.raises(GSSError) as caught:
        Handoff(1, bytes(MAX_KEY_REF + 1), b"s").encode()
    assert caught.value.major == GSS_S_FAILURE


# --- batches ----------------------------------------------------------------------------


def test_batch_byte_layouts() -> None:
    one, two = Handoff(1, b"r", b"s1").encode(), Handoff(2, b"rr", b"s22").encode()
    payload = encode_handoff_batch([one, two])
    assert payload == (b"\x02" + len(one).to_bytes(4, "big") + one
                       + len(two).to_bytes(4, "big") + two)
    assert len(payload) == 1 + batch_entry_size(one) + batch_entry_size(two)
    assert decode_handoff_batch(payload, 2) == [Handoff(1, b"r", b"s1"), Handoff(2, b"rr", b"s22")]
    acks = [Ack(1), Ack(2, GSS_S_FAILURE, 7)]
    assert encode_ack_batch(acks) == b"\x02" + b"".join(a.encode() for a in acks)
    assert decode_ack_batch(encode_ack_batch(acks)) == acks


@pytest.mark.parametrize("bad", [
    b"",  # no count
    b"\x01",  # an entry missing
    b"\x01\x00\x00\x00",  # a truncated length
    b"\x01\x00\x00\x00\x20" + Handoff(1, b"r", b"s").encode(),  # length past the end
    b"\x01\x00\x00\x00\x05" + b"\x00" * 5,  # an entry that is no HANDOFF
    encode_handoff_batch([Handoff(1, b"r", b"s").encode()]) + b"x",  # trailing bytes
])
def test_a_malformed_handoff_batch_is_defective(bad: bytes) -> None:
    with pytest.raises(GSSError) as caught:
        decode_handoff_batch(bad, 1)
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                         Minor.CHANNEL_BAD_PAYLOAD)


def test_a_batch_must_have_one_fd_per_entry() -> None:
    payload = encode_handoff_batch([Handoff(1, b"r", b"s").encode()] * 3)
    for fds in (2, 4):
        with pytest.raises(GSSError, match="3 entries carried"):
            decode_handoff_batch(payload, fds)


def test_batch_sizes_are_bounded() -> None:
    entry = Handoff(1, b"r", b"s").encode()
    for count in (0, MAX_BATCH + 1):
        with pytest.raises(GSSError):
            encode_handoff_batch([entry] * count)
        with pytest.raises(GSSError):
            encode_ack_batch([Ack(1)] * count)
    for bad in (b"", b"\x00", b"\x01" + bytes(15), b"\x01" + bytes(17)):
        with pytest.raises(GSSError):
            decode_ack_batch(bad)


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=5))
def test_arbitrary_batch_bytes_parse_or_are_defective(data: bytes, fds: int) -> None:
    try:
        decode_handoff_batch(data, fds)
    except GSSError as error:
        assert error.major == GSS_S_DEFECTIVE_TOKEN
    try:
        decode_ack_batch(data)
    except GSSError as error:
        assert error.major == GSS_S_DEFECTIVE_TOKEN
