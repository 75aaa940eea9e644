"""Hostile input to every parser of the handshake and of established contexts.

Whatever bytes arrive, only ``GSSError`` may escape, and a failure leaves
things as the code documents: a failed handshake step kills the context (every
later call fails cleanly, nothing half-established survives); a rejected
per-message token changes nothing (the next genuine token is still in order);
a refused import produces no context.  Hypothesis runs with modest example
counts; the deterministic cases cover every truncation of every handshake
message, oversize messages, a low-order ephemeral key and a foreign OID.

The frame decoder and the first-token parser get their own hypothesis tests in
``tests/test_framing.py``; here they are driven together with the handshake.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoffd.core.context import (
    AcceptorContext,
    InitiatorContext,
    SecurityContext,
    import_context,
)
from handoffd.core.credentials import AllowList, StaticKeyPair
from handoffd.core.framing import (
    FrameDecoder,
    FrameType,
    encode_frame,
    unwrap_first_token,
    wrap_first_token,
)
from handoffd.core.noise import MAX_MESSAGE_LEN
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_BAD_MECH,
    GSS_S_COMPLETE,
    GSS_S_CONTEXT_EXPIRED,
    GSS_S_CONTINUE_NEEDED,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSS_S_NO_CONTEXT,
    GSSError,
)

START = 1_800_000_000.0
SERVER = StaticKeyPair(bytes([9]) * 32)
CLIENT = StaticKeyPair(bytes([10]) * 32)
ALLOW = AllowList({CLIENT.public_bytes: "client"})
KERBEROS_OID_DER = bytes.fromhex("06092a864886f712010202")
HOSTILE = settings(max_examples=60)


def clock() -> float:
    return START


def _pair(seed: int = 1) -> tuple[InitiatorContext, AcceptorContext]:
    rng = random.Random(seed).randbytes
    return (InitiatorContext(static_key=CLIENT, server_fingerprint=SERVER.fingerprint,
                             clock=clock, random=rng),
            AcceptorContext(static_key=SERVER, allow_list=ALLOW, clock=clock, random=rng))


def _messages(seed: int = 1) -> tuple[bytes, bytes, bytes]:
    """The three genuine handshake messages of one run."""
    initiator, acceptor = _pair(seed)
    _, msg1 = initiator.step(None)
    _, msg2 = acceptor.step(msg1)
    _, msg3 = initiator.step(msg2)
    acceptor.step(msg3)
    return msg1, msg2, msg3


MSG1, MSG2, MSG3 = _messages()


def _at_step(step: int) -> tuple[SecurityContext, Callable[[bytes], tuple[int, bytes]]]:
    """A context waiting for handshake message ``step`` (1, 2 or 3), and its step call."""
    initiator, acceptor = _pair()
    _, msg1 = initiator.step(None)
    if step == 1:
        return acceptor, acceptor.step
    acceptor.step(msg1)
    if step == 2:
        return initiator, initiator.step
    return acceptor, acceptor.step


GENUINE = {1: MSG1, 2: MSG2, 3: MSG3}


@pytest.mark.parametrize("step", [1, 2, 3])
def test_the_genuine_message_is_accepted_at_each_step(step: int) -> None:
    """The baseline the hostile cases below depart from: unaltered, each step succeeds."""
    context, step_call = _at_step(step)
    major, _ = step_call(GENUINE[step])
    assert major == (GSS_S_COMPLETE if step > 1 else GSS_S_CONTINUE_NEEDED)
    assert context.established == (step > 1)


def _assert_dead(context: SecurityContext, step: Callable[[bytes], tuple[int, bytes]]) -> None:
    """A failed handshake: no further step, no protection, no export."""
    assert not context.established
    with pytest.raises(GSSError) as caught:
        step(b"")
    assert (caught.value.major, caught.value.minor) == (GSS_S_FAILURE,
                                                        Minor.HANDSHAKE_OUT_OF_ORDER)
    with pytest.raises(GSSError) as caught:
        context.wrap(b"x")
    assert caught.value.major == GSS_S_NO_CONTEXT
    with pytest.raises(GSSError):
        context.export()


def _feed(step_number: int, token: bytes) -> None:
    context, step = _at_step(step_number)
    try:
        major, _ = step(token)
    except GSSError as error:
        assert error.major  # a routine or calling error, never a bare 0
        _assert_dead(context, step)
    else:
        # Only a well-formed message can succeed (msg1 is not authenticated: any 32 bytes
        # followed by a valid HELLO is a fine message 1).
        assert major in (GSS_S_CONTINUE_NEEDED, GSS_S_COMPLETE)


# --- the handshake --------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3])
@HOSTILE
@given(token=st.binary(max_size=200))
def test_arbitrary_bytes_at_each_handshake_step(step: int, token: bytes) -> None:
    _feed(step, token)


@pytest.mark.parametrize("step", [1, 2, 3])
@HOSTILE
@given(data=st.data())
def test_mutated_genuine_messages_at_each_step(step: int, data: st.DataObject) -> None:
    genuine = bytearray(GENUINE[step])
    flips = data.draw(st.lists(st.integers(0, len(genuine) * 8 - 1), min_size=1, max_size=4,
                               unique=True))
    for bit in flips:
        genuine[bit // 8] ^= 1 << (bit % 8)
    if step == 1:
        # Message 1 is not authenticated (clear ephemeral key and HELLO): the acceptor may
        # take a tampered one, but the handshake hashes then differ and the genuine
        # initiator refuses message 2.
        initiator, acceptor = _pair()
        assert initiator.step(None)[1] == MSG1
        try:
            _, msg2 = acceptor.step(bytes(genuine))
        except GSSError as error:
            # Defective, or the ANON bit of the clear HELLO flipped for a server without it.
            assert (error.major == GSS_S_DEFECTIVE_TOKEN
                    or error.minor == Minor.ANONYMOUS_NOT_ALLOWED), error
            _assert_dead(acceptor, acceptor.step)
            return
        with pytest.raises(GSSError) as caught:
            initiator.step(msg2)
        assert caught.value.major == GSS_S_DEFECTIVE_TOKEN
        _assert_dead(initiator, initiator.step)
        return
    context, step_call = _at_step(step)
    with pytest.raises(GSSError) as caught:
        step_call(bytes(genuine))
    assert caught.value.major == GSS_S_DEFECTIVE_TOKEN
    _assert_dead(context, step_call)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_every_truncation_of_every_message_is_defective(step: int) -> None:
    genuine = GENUINE[step]
    for size in range(len(genuine)):
        context, step_call = _at_step(step)
        with pytest.raises(GSSError) as caught:
            step_call(genuine[:size])
        assert caught.value.major == GSS_S_DEFECTIVE_TOKEN, (size, caught.value)
        assert caught.value.minor in (Minor.TOKEN_TRUNCATED, Minor.TOKEN_BAD_VERSION,
                                      Minor.HANDSHAKE_DECRYPT_FAILED), (size, caught.value)
        _assert_dead(context, step_call)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_trailing_bytes_are_defective(step: int) -> None:
    context, step_call = _at_step(step)
    with pytest.raises(GSSError) as caught:
        step_call(GENUINE[step] + b"\x00")
    assert caught.value.major == GSS_S_DEFECTIVE_TOKEN
    _assert_dead(context, step_call)


@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize("size", [MAX_MESSAGE_LEN + 1, 1 << 20])
def test_oversize_handshake_messages_are_refused(step: int, size: int) -> None:
    context, step_call = _at_step(step)
    with pytest.raises(GSSError) as caught:
        step_call(GENUINE[step] + bytes(size - len(GENUINE[step])))
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                        Minor.TOKEN_TOO_LARGE)
    _assert_dead(context, step_call)


# Low-order points of Curve25519 (RFC 7748 §6.1 / the libsodium blocklist).
LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"),
             bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]


@pytest.mark.parametrize("point", LOW_ORDER, ids=["zero", "one", "order-8"])
def test_a_low_order_ephemeral_key_is_refused(point: bytes) -> None:
    acceptor, step = _at_step(1)
    with pytest.raises(GSSError) as caught:
        step(point + MSG1[32:])
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                        Minor.WEAK_PUBLIC_KEY)
    _assert_dead(acceptor, step)


@pytest.mark.parametrize("point", LOW_ORDER, ids=["zero", "one", "order-8"])
def test_a_low_order_acceptor_ephemeral_is_refused(point: bytes) -> None:
    initiator, step = _at_step(2)
    with pytest.raises(GSSError) as caught:
        step(point + MSG2[32:])
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                        Minor.WEAK_PUBLIC_KEY)
    _assert_dead(initiator, step)


def test_a_replayed_or_reflected_message_is_refused() -> None:
    # Message 2 of another run (other ephemerals) and our own message 1 sent back.
    other = _messages(seed=2)
    for step, token in ((2, other[1]), (2, MSG1), (3, other[2]), (3, MSG2)):
        context, step_call = _at_step(step)
        with pytest.raises(GSSError) as caught:
            step_call(token)
        assert caught.value.major == GSS_S_DEFECTIVE_TOKEN
        _assert_dead(context, step_call)


def test_a_first_token_for_another_mechanism_is_bad_mech() -> None:
    token = wrap_first_token(MSG1, oid_der=KERBEROS_OID_DER)
    with pytest.raises(GSSError) as caught:
        unwrap_first_token(token)
    assert (caught.value.major, caught.value.minor) == (GSS_S_BAD_MECH,
                                                        Minor.TOKEN_BAD_MECH_OID)
    # The genuine wrapper carries message 1 intact.
    assert unwrap_first_token(wrap_first_token(MSG1)) == MSG1


@HOSTILE
@given(st.binary(max_size=120), st.integers(0, 120))
def test_arbitrary_bytes_through_decoder_first_token_and_acceptor(junk: bytes, cut: int) -> None:
    """The acceptor's path for its first frame: decoder, then first token, then step."""
    stream = encode_frame(FrameType.HANDSHAKE, wrap_first_token(MSG1))
    stream = stream[:cut] + junk if cut < len(stream) else junk
    decoder = FrameDecoder()
    decoder.feed(stream)
    with contextlib.suppress(GSSError):
        frame = decoder.next_frame()
        if frame is None:
            return
        inner = unwrap_first_token(frame.body)
        _, acceptor = _pair()
        acceptor.step(inner)


# --- established contexts ---------------------------------------------------------------


def _established() -> tuple[InitiatorContext, AcceptorContext]:
    initiator, acceptor = _pair()
    _, msg1 = initiator.step(None)
    _, msg2 = acceptor.step(msg1)
    _, msg3 = initiator.step(msg2)
    acceptor.step(msg3)
    return initiator, acceptor


def _state(context: SecurityContext) -> bytes:
    # The complete protection state (keys, counters, window), compared before and after.
    assert context._protection is not None
    return context._protection.export_state()


@HOSTILE
@given(st.binary(max_size=100), st.booleans())
def test_arbitrary_per_message_tokens_change_nothing(junk: bytes, mic: bool) -> None:
    initiator, acceptor = _established()
    first = initiator.wrap(b"first")
    assert acceptor.unwrap(first).supplementary == 0
    before = _state(acceptor)
    with pytest.raises(GSSError) as caught:
        if mic:
            acceptor.verify_mic(b"message", junk)
        else:
            acceptor.unwrap(junk)
    assert caught.value.major
    assert _state(acceptor) == before
    # The next genuine token is still exactly in order.
    result = acceptor.unwrap(initiator.wrap(b"second"))
    assert (result.data, result.supplementary) == (b"second", 0)


@HOSTILE
@given(st.binary(min_size=1, max_size=64), st.data())
def test_tampered_tokens_change_nothing(message: bytes, data: st.DataObject) -> None:
    initiator, acceptor = _established()
    conf = data.draw(st.booleans())
    tokens = [initiator.wrap(message, conf_req=conf), initiator.get_mic(message)]
    for index, token in enumerate(tokens):
        bit = data.draw(st.integers(0, len(token) * 8 - 1))
        bad = bytearray(token)
        bad[bit // 8] ^= 1 << (bit % 8)
        before = _state(acceptor)
        with pytest.raises(GSSError):
            if index == 0:
                acceptor.unwrap(bytes(bad))
            else:
                acceptor.verify_mic(message, bytes(bad))
        assert _state(acceptor) == before
    assert acceptor.unwrap(tokens[0]).data == message
    assert acceptor.verify_mic(message, tokens[1]) == 0


def test_oversize_and_truncated_per_message_tokens() -> None:
    initiator, acceptor = _established()
    token = initiator.wrap(b"payload")
    before = _state(acceptor)
    for size in range(len(token)):
        with pytest.raises(GSSError) as caught:
            acceptor.unwrap(token[:size])
        assert caught.value.major != 0
    with pytest.raises(GSSError) as caught:
        acceptor.unwrap(token[:16] + bytes(16 * 1024 * 1024 + 17))
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                        Minor.TOKEN_TOO_LARGE)
    mic = initiator.get_mic(b"m")
    with pytest.raises(GSSError) as caught:
        acceptor.verify_mic(b"m", mic + b"\x00")
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                        Minor.TOKEN_TRAILING_BYTES)
    assert _state(acceptor) == before
    assert acceptor.unwrap(token).supplementary == 0


# --- import ----------------------------------------------------------------------------


def _blob() -> bytes:
    _, acceptor = _established()
    return acceptor.export(unread=b"pipelined")


BLOB = _blob()


@HOSTILE
@given(st.binary(max_size=300))
def test_arbitrary_bytes_to_import(junk: bytes) -> None:
    try:
        import_context(junk, clock=clock)
    except GSSError as error:
        assert error.major in (GSS_S_DEFECTIVE_TOKEN, GSS_S_CONTEXT_EXPIRED), error


@HOSTILE
@given(st.data())
def test_mutated_export_blobs_import_or_fail_cleanly(data: st.DataObject) -> None:
    blob = bytearray(BLOB)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(blob) - 1))
        blob[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    candidate = bytes(blob[:cut]) + data.draw(st.binary(max_size=4))
    try:
        context, unread = import_context(candidate, clock=clock)
    except GSSError as error:
        assert error.major
        return
    # Fields that import cannot judge (names, hash, keys) may change; the result still
    # behaves as a context: every call returns or raises GSSError.
    assert isinstance(unread, bytes)
    for call in (lambda: context.wrap(b"x"), lambda: context.unwrap(BLOB[:40]),
                 lambda: context.inquire(), lambda: context.export()):
        with contextlib.suppress(GSSError):
            call()
