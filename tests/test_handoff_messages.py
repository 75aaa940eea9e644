"""Payload codecs of the acceptor-worker handoff messages (docs/HANDOFF.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handoffd.core.handoff import (
    FD_KINDS,
    MAX_KEY_REF,
    Ack,
    Handoff,
    Hello,
    Kind,
    Outcome,
    Refused,
    Registered,
    SessionEnd,
    expect_empty,
)
from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE, GSSError

WORKER_ID = bytes(range(16))


def test_kinds_and_fd_kinds_are_the_documented_values() -> None:
    assert [(k.name, k.value) for k in Kind] == [
        ("HELLO", 1), ("HANDOFF", 2), ("ACK", 3), ("DRAINING", 4), ("DRAINED", 5),
        ("REGISTERED", 6), ("REFUSED", 7), ("SESSION_END", 8)]
    assert [(o.name, o.value) for o in Outcome] == [
        ("CLOSED", 0), ("APP_ERROR", 1), ("PEER_ERROR", 2), ("CUT_AT_DRAIN", 3)]
    assert {Kind.HANDOFF, Kind.REGISTERED} == FD_KINDS


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
