"""The sealed handoff token (handoffd.core.seal): round trip, tamper, routing, expiry."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoffd.core.seal import HEADER_SIZE, OVERHEAD, open_sealed, seal
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_BAD_MECH,
    GSS_S_CALL_BAD_STRUCTURE,
    GSS_S_CONTEXT_EXPIRED,
    GSS_S_DEFECTIVE_TOKEN,
    GSSError,
)

KEY = bytes(range(32))
WORKER = b"W" * 16
OTHER = b"O" * 16
NONCE = b"\x07" * 12
NOW = 1_700_000_000
PLAIN = b"exported context state"


def make(plaintext: bytes = PLAIN, *, key: bytes = KEY, worker: bytes = WORKER,
         expires_at: int = NOW + 5, mech: int = 1) -> bytes:
    return seal(key, plaintext=plaintext, mech=mech, worker_id=worker, expires_at=expires_at,
                nonce=NONCE)


def assert_opaque(error: GSSError) -> None:
    assert (error.major, error.minor, error.detail) == (
        GSS_S_DEFECTIVE_TOKEN, Minor.EXPORT_TOKEN_INVALID, None)


def test_round_trip_and_layout() -> None:
    token = make()
    assert len(token) == OVERHEAD + len(PLAIN)
    version, mech, expires_at, worker, nonce = struct.unpack(">BHQ16s12s", token[:HEADER_SIZE])
    assert (version, mech, expires_at, worker, nonce) == (1, 1, NOW + 5, WORKER, NONCE)
    assert PLAIN not in token
    assert open_sealed(KEY, token, worker_id=WORKER, now=NOW) == PLAIN
    assert open_sealed(KEY, token, worker_id=WORKER, now=NOW, mech=1) == PLAIN


def test_empty_plaintext_round_trips() -> None:
    assert open_sealed(KEY, make(b""), worker_id=WORKER, now=NOW) == b""


def test_every_bit_flip_is_the_one_opaque_error() -> None:
    token = make()
    for bit in range(len(token) * 8):
        flipped = bytearray(token)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(GSSError) as caught:
            open_sealed(KEY, bytes(flipped), worker_id=WORKER, now=NOW)
        assert_opaque(caught.value)


def test_truncation_extension_and_wrong_key_are_opaque() -> None:
    token = make()
    for bad in (token[:-1], token[:OVERHEAD - 1], b"", token + b"\0"):
        with pytest.raises(GSSError) as caught:
            open_sealed(KEY, bad, worker_id=WORKER, now=NOW)
        assert_opaque(caught.value)
    with pytest.raises(GSSError) as caught:
        open_sealed(os.urandom(32), token, worker_id=WORKER, now=NOW)
    assert_opaque(caught.value)


def test_forged_header_never_reads_as_expired_or_misrouted() -> None:
    """An attacker rewriting expiry or worker id gets the opaque error, not a specific one."""
    token = bytearray(make())
    token[3:11] = (0).to_bytes(8, "big")  # "already expired"
    token[11:27] = OTHER
    with pytest.raises(GSSError) as caught:
        open_sealed(KEY, bytes(token), worker_id=OTHER, now=NOW)
    assert_opaque(caught.value)


def test_wrong_worker_is_reported_after_authentication() -> None:
    with pytest.raises(GSSError) as caught:
        open_sealed(KEY, make(), worker_id=OTHER, now=NOW)
    assert (caught.value.major, caught.value.minor) == (
        GSS_S_DEFECTIVE_TOKEN, Minor.EXPORT_TOKEN_WRONG_WORKER)


def test_expiry() -> None:
    token = make(expires_at=NOW + 5)
    assert open_sealed(KEY, token, worker_id=WORKER, now=NOW + 4.999) == PLAIN
    for now in (NOW + 5, NOW + 3600):
        with pytest.raises(GSSError) as caught:
            open_sealed(KEY, token, worker_id=WORKER, now=now)
        assert (caught.value.major, caught.value.minor) == (
            GSS_S_CONTEXT_EXPIRED, Minor.EXPORT_TOKEN_EXPIRED)


def test_mechanism_is_bound_and_checked() -> None:
    with pytest.raises(GSSError) as caught:
        open_sealed(KEY, make(mech=2), worker_id=WORKER, now=NOW, mech=1)
    assert caught.value.major == GSS_S_BAD_MECH


@pytest.mark.parametrize("kwargs", [
    {"key": b"short"},
    {"nonce": b"\0" * 11},
    {"worker_id": b"\0" * 15},
    {"mech": -1},
    {"mech": 0x10000},
    {"expires_at": -1},
    {"expires_at": 1 << 64},
])
def test_bad_seal_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"key": KEY, "plaintext": PLAIN, "mech": 1, "worker_id": WORKER,
                               "expires_at": NOW, "nonce": NONCE}
    args.update(kwargs)
    key = args.pop("key")
    with pytest.raises(GSSError) as caught:
        seal(key, **args)  # type: ignore[arg-type]
    assert caught.value.major == GSS_S_CALL_BAD_STRUCTURE


def test_open_with_a_bad_key_length_is_a_calling_error() -> None:
    with pytest.raises(GSSError) as caught:
        open_sealed(b"k", make(), worker_id=WORKER, now=NOW)
    assert caught.value.major == GSS_S_CALL_BAD_STRUCTURE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(min_size=32, max_size=32))
def test_arbitrary_bytes_only_ever_raise_the_opaque_error(token: bytes, key: bytes) -> None:
    with pytest.raises(GSSError) as caught:
        open_sealed(key, token, worker_id=WORKER, now=NOW)
    assert_opaque(caught.value)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=512), st.integers(0, 0xFFFF), st.binary(min_size=16, max_size=16))
def test_round_trip_property(plaintext: bytes, mech: int, worker: bytes) -> None:
    token = make(plaintext, worker=worker, mech=mech)
    assert open_sealed(KEY, token, worker_id=worker, now=NOW, mech=mech) == plaintext
