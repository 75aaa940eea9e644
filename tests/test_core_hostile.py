"""Hostile input into every parser of the pure core: nothing but ``GSSError`` escapes.

Hypothesis feeds arbitrary bytes, and genuine tokens with bits flipped, bytes
cut off or appended, into: each handshake step of both roles (the context
API and the bare Noise ``HandshakeState``), the RFC 2743 first-token parser,
the frame decoder, ``import_context``, ``unwrap`` and ``verify_mic``.  Any
exception other than ``GSSError`` fails the test; a ``GSSError`` must carry an
error major (not a bare supplementary bit).  Where the core promises that bad
input changes nothing (per-message tokens, the frame decoder), the test checks
that a genuine input still works after the hostile one.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoffd.core.context import AcceptorContext, InitiatorContext, import_context
from handoffd.core.credentials import AllowList, StaticKeyPair
from handoffd.core.framing import (
    FrameDecoder,
    FrameType,
    decode_error,
    encode_frame,
    read_first_token,
    unwrap_first_token,
    wrap_first_token,
)
from handoffd.core.noise import HandshakeState
from handoffd.minor import Minor
from handoffd.status import GSS_ERROR, GSS_S_DEFECTIVE_TOKEN, GSSError

NOW = 1_800_000_000.0
_KEYS = random.Random(99)
SERVER = StaticKeyPair.generate(_KEYS.randbytes)
CLIENT = StaticKeyPair.generate(_KEYS.randbytes)
ALLOW = AllowList({CLIENT.public_bytes: "client"})

HOSTILE = settings(max_examples=100, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])


def clock() -> float:
    return NOW


def only_gss_errors(call: Callable[[], object]) -> GSSError | None:
    """Run ``call``; return its GSSError (or None); any other exception fails the test."""
    try:
        call()
    except GSSError as error:
        assert GSS_ERROR(error.major), f"a GSSError without an error major: {error!r}"
        return error
    return None


@st.composite
def mangled(draw: st.DrawFn, genuine: bytes) -> bytes:
    """A genuine token with bits flipped, cut short, extended, or spliced with junk."""
    how = draw(st.sampled_from(["flip", "cut", "extend", "splice", "junk"]))
    if how == "junk" or not genuine:
        return draw(st.binary(max_size=2 * len(genuine) + 8))
    out = bytearray(genuine)
    if how == "flip":
        for index in draw(st.lists(st.integers(0, len(out) - 1), min_size=1, max_size=4)):
            out[index] ^= 1 << draw(st.integers(0, 7))
    elif how == "cut":
        del out[draw(st.integers(0, len(out) - 1)):]
    elif how == "extend":
        out += draw(st.binary(min_size=1, max_size=32))
    else:
        start = draw(st.integers(0, len(out) - 1))
        junk = draw(st.binary(min_size=1, max_size=16))
        out[start:start + len(junk)] = junk
    return bytes(out)


def token_input(genuine: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=256), mangled(genuine))


def _pair(seed: int = 1) -> tuple[InitiatorContext, AcceptorContext]:
    initiator = InitiatorContext(static_key=CLIENT, server_fingerprint=SERVER.fingerprint,
                                 clock=clock, random=random.Random(seed).randbytes)
    acceptor = AcceptorContext(static_key=SERVER, allow_list=ALLOW, clock=clock,
                               random=random.Random(seed + 1).randbytes)
    return initiator, acceptor


def _genuine_tokens() -> tuple[bytes, bytes, bytes]:
    initiator, acceptor = _pair()
    _, msg1 = initiator.step(None)
    _, msg2 = acceptor.step(msg1)
    _, msg3 = initiator.step(msg2)
    return msg1, msg2, msg3


MSG1, MSG2, MSG3 = _genuine_tokens()


def _established() -> tuple[InitiatorContext, AcceptorContext]:
    initiator, acceptor = _pair()
    _, msg1 = initiator.step(None)
    _, msg2 = acceptor.step(msg1)
    _, msg3 = initiator.step(msg2)
    acceptor.step(msg3)
    return initiator, acceptor


# --- handshake steps, context API -------------------------------------------------------


@HOSTILE
@given(token=token_input(MSG1))
def test_acceptor_first_step(token: bytes) -> None:
    _, acceptor = _pair()
    if only_gss_errors(lambda: acceptor.step(token)) is not None:
        assert not acceptor.established


@HOSTILE
@given(token=token_input(MSG2))
def test_initiator_second_step(token: bytes) -> None:
    initiator, _ = _pair()
    initiator.step(None)
    if only_gss_errors(lambda: initiator.step(token)) is not None:
        assert not initiator.established


@HOSTILE
@given(token=token_input(MSG3))
def test_acceptor_last_step(token: bytes) -> None:
    initiator, acceptor = _pair()
    _, msg1 = initiator.step(None)
    acceptor.step(msg1)
    if only_gss_errors(lambda: acceptor.step(token)) is not None:
        assert not acceptor.established


@HOSTILE
@given(first=st.binary(max_size=128), second=st.binary(max_size=128))
def test_steps_after_a_failure_stay_gss_errors(first: bytes, second: bytes) -> None:
    initiator, acceptor = _pair()
    only_gss_errors(lambda: acceptor.step(first))
    only_gss_errors(lambda: acceptor.step(second))
    only_gss_errors(lambda: initiator.step(second))
    only_gss_errors(lambda: initiator.step(first))


# --- handshake steps, bare Noise ---------------------------------------------------------


@HOSTILE
@given(index=st.integers(0, 2), data=st.data())
def test_noise_read_message_at_each_step_of_both_roles(index: int, data: st.DataObject) -> None:
    """Bring a reader to message ``index`` with genuine traffic, then feed it hostile bytes."""
    rng = random.Random(5)
    initiator = HandshakeState(initiator=True, static_private=CLIENT.private_bytes,
                               random=rng.randbytes)
    responder = HandshakeState(initiator=False, static_private=SERVER.private_bytes,
                               random=rng.randbytes)
    sides = (initiator, responder)
    for step in range(index):
        writer, reader = sides[step % 2], sides[1 - step % 2]
        reader.read_message(writer.write_message(b"payload"))
    writer, reader = sides[index % 2], sides[1 - index % 2]
    genuine = writer.write_message(b"payload")
    hostile = data.draw(token_input(genuine))
    only_gss_errors(lambda: reader.read_message(hostile))
    # A reader that must not read now refuses cleanly too.
    only_gss_errors(lambda: writer.read_message(hostile))


# --- framing ------------------------------------------------------------------------------


@HOSTILE
@given(token=st.one_of(st.binary(max_size=300),
                       st.binary(max_size=200).map(wrap_first_token),
                       st.binary(max_size=200).flatmap(
                           lambda inner: mangled(wrap_first_token(inner)))))
def test_first_token_parser(token: bytes) -> None:
    only_gss_errors(lambda: read_first_token(token))
    only_gss_errors(lambda: unwrap_first_token(token))


@HOSTILE
@given(inner=st.binary(max_size=1000))
def test_first_token_round_trips(inner: bytes) -> None:
    assert unwrap_first_token(wrap_first_token(inner)) == inner


@HOSTILE
@given(chunks=st.lists(st.one_of(
    st.binary(max_size=40),
    st.builds(encode_frame, st.sampled_from(list(FrameType)), st.binary(max_size=20)),
), max_size=8), max_frame=st.integers(0, 64))
def test_frame_decoder(chunks: list[bytes], max_frame: int) -> None:
    decoder = FrameDecoder(max_frame=max_frame)
    for chunk in chunks:
        decoder.feed(chunk)
        while True:
            before = decoder.unread()
            try:
                frame = decoder.next_frame()
            except GSSError as error:
                assert GSS_ERROR(error.major)
                assert decoder.unread() == before, "a refused frame changed the buffer"
                # Refusal is stable: asking again gives the same answer.
                again = only_gss_errors(decoder.next_frame)
                assert again is not None and again.minor == error.minor
                return
            if frame is None:
                break
            assert len(frame.body) <= max_frame


@HOSTILE
@given(body=st.binary(max_size=16))
def test_error_body_decoder(body: bytes) -> None:
    only_gss_errors(lambda: decode_error(body))


# --- import_context ---------------------------------------------------------------------


def _export_blob() -> bytes:
    _, acceptor = _established()
    return acceptor.export(b"unread bytes")


BLOB = _export_blob()


@HOSTILE
@given(blob=st.one_of(st.binary(max_size=300), mangled(BLOB)))
def test_import_context(blob: bytes) -> None:
    only_gss_errors(lambda: import_context(blob, clock=clock))


# --- per-message tokens -----------------------------------------------------------------


def _tokens() -> tuple[bytes, bytes]:
    initiator, _ = _established()
    return initiator.wrap(b"a genuine message"), initiator.get_mic(b"a genuine message")


WRAP, MIC = _tokens()


@HOSTILE
@given(token=st.one_of(st.binary(max_size=100), mangled(WRAP), mangled(MIC)),
       message=st.one_of(st.just(b"a genuine message"), st.binary(max_size=40)))
def test_unwrap_and_verify_mic(token: bytes, message: bytes) -> None:
    """Hostile tokens are refused with GSSError and leave the receive window as it was."""
    _, acceptor = _established()
    unwrapped = only_gss_errors(lambda: acceptor.unwrap(token)) is None
    verified = only_gss_errors(lambda: acceptor.verify_mic(message, token)) is None
    if unwrapped or verified:
        return  # the bytes were a genuine token after all (e.g. an unchanged splice)
    # Nothing moved: the genuine tokens are still in sequence, with no supplementary bits.
    assert acceptor.unwrap(WRAP).supplementary == 0
    assert acceptor.verify_mic(b"a genuine message", MIC) == 0


# --- low-order points -------------------------------------------------------------------

# Curve25519 points whose X25519 output is all zeros for every private key (the list
# libsodium refuses): 0, 1, the two of order 8, p - 1, and the non-canonical p and p + 1.
LOW_ORDER = [bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)]


@pytest.mark.parametrize("point", LOW_ORDER, ids=lambda p: p[:4].hex())
def test_a_low_order_ephemeral_key_is_refused_by_both_roles(point: bytes) -> None:
    """The DH with it would be all zeros: WEAK_PUBLIC_KEY, never a key derived from zeros."""
    _, acceptor = _pair()
    with pytest.raises(GSSError) as error:
        acceptor.step(point + MSG1[32:])
    assert (error.value.major, error.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                      Minor.WEAK_PUBLIC_KEY)
    initiator, _ = _pair()
    initiator.step(None)
    with pytest.raises(GSSError) as error:
        initiator.step(point + MSG2[32:])
    assert (error.value.major, error.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                      Minor.WEAK_PUBLIC_KEY)
