"""Live interoperability of handoffd's Noise XX with an independent implementation.

The other side is the ``noiseprotocol`` package (``noise.connection``), an
implementation written by other people from the same specification.  Each test
runs a full XX handshake with payloads, ours as initiator and theirs as
responder and the reverse, then transport messages in both directions (empty,
small, and at the 65535-byte Noise message limit).  A message tampered with in
flight must be refused by ours as ``GSSError``, never a library exception.
"""

from __future__ import annotations

import os

import pytest
from noise.connection import Keypair, NoiseConnection

from handoffd.core.noise import (
    DH_LEN,
    MAX_MESSAGE_LEN,
    PROTOCOL_NAME,
    CipherState,
    HandshakeState,
    public_key,
)
from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE, GSSError

TAG_LEN = 16
PROLOGUE = b"interop prologue"
HANDSHAKE_PAYLOADS = (b"first: in the clear", b"second: encrypted", b"third: encrypted")
LARGEST_TRANSPORT_PAYLOAD = MAX_MESSAGE_LEN - TAG_LEN
TRANSPORT_PAYLOADS = (b"", b"x", b"a small message", os.urandom(LARGEST_TRANSPORT_PAYLOAD))


def theirs(*, initiator: bool, static_private: bytes) -> NoiseConnection:
    """A noiseprotocol connection for our suite, ready to handshake."""
    connection = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        connection.set_as_initiator()
    else:
        connection.set_as_responder()
    connection.set_prologue(PROLOGUE)
    connection.set_keypair_from_private_bytes(Keypair.STATIC, static_private)
    connection.start_handshake()
    return connection


def ours(*, initiator: bool, static_private: bytes) -> HandshakeState:
    return HandshakeState(initiator=initiator, static_private=static_private,
                          random=os.urandom, prologue=PROLOGUE)


def _flip(message: bytes, index: int) -> bytes:
    out = bytearray(message)
    out[index] ^= 0x01
    return bytes(out)


def handshake(our_side: HandshakeState, their_side: NoiseConnection) -> bytes:
    """Run the three XX messages between the two, checking every payload arrives.

    Returns the static key their side received (noiseprotocol drops its
    handshake state once finished, so it is kept from the start).
    """
    their_state = their_side.noise_protocol.handshake_state
    for index, payload in enumerate(HANDSHAKE_PAYLOADS):
        initiator_writes = index % 2 == 0
        if initiator_writes == our_side.initiator:
            received = bytes(their_side.read_message(our_side.write_message(payload)))
        else:
            received = our_side.read_message(bytes(their_side.write_message(payload)))
        assert received == payload, f"handshake message {index}"
    assert our_side.complete and their_side.handshake_finished
    return bytes(their_state.rs.public_bytes)


def transport(our_side: HandshakeState, their_side: NoiseConnection) -> tuple[
        CipherState, CipherState]:
    """Our (send, receive) cipher states after Split()."""
    to_responder, to_initiator = our_side.split()
    if our_side.initiator:
        return CipherState(to_responder), CipherState(to_initiator)
    return CipherState(to_initiator), CipherState(to_responder)


@pytest.mark.parametrize("we_initiate", [True, False], ids=["ours-initiates", "theirs-initiates"])
def test_handshake_and_transport_both_ways(we_initiate: bool) -> None:
    """Same peers' keys, same handshake hash, and every transport message in both directions."""
    our_static, their_static = os.urandom(DH_LEN), os.urandom(DH_LEN)
    our_side = ours(initiator=we_initiate, static_private=our_static)
    their_side = theirs(initiator=not we_initiate, static_private=their_static)
    their_view_of_us = handshake(our_side, their_side)

    assert our_side.rs == public_key(their_static)
    assert their_view_of_us == public_key(our_static)
    assert our_side.handshake_hash == bytes(their_side.get_handshake_hash())

    send, receive = transport(our_side, their_side)
    for payload in TRANSPORT_PAYLOADS:
        ours_out = send.encrypt_with_ad(b"", payload)
        assert len(ours_out) == len(payload) + TAG_LEN <= MAX_MESSAGE_LEN
        assert their_side.decrypt(ours_out) == payload
        theirs_out = their_side.encrypt(payload)
        assert receive.decrypt_with_ad(b"", theirs_out) == payload
    assert send.n == receive.n == len(TRANSPORT_PAYLOADS)


@pytest.mark.parametrize("we_initiate", [True, False], ids=["ours-initiates", "theirs-initiates"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_tampered_handshake_message_is_a_gsserror(we_initiate: bool, where: str) -> None:
    """Their next authenticated message with one bit flipped is DEFECTIVE_TOKEN for ours.

    msg1 is unauthenticated by design (an ephemeral key and a clear payload), so
    when theirs initiates the tampered message is msg3.  "first" flips the first
    encrypted byte (the static key), "last" the payload's tag.
    """
    our_side = ours(initiator=we_initiate, static_private=os.urandom(DH_LEN))
    their_side = theirs(initiator=not we_initiate, static_private=os.urandom(DH_LEN))
    if we_initiate:
        # Ours writes msg1; theirs answers with msg2 (e, ee, s, es: all but e is encrypted).
        their_side.read_message(our_side.write_message(HANDSHAKE_PAYLOADS[0]))
    else:
        # msg1 is unauthenticated by design; exchange it and tamper with msg3.
        our_side.read_message(bytes(their_side.write_message(HANDSHAKE_PAYLOADS[0])))
        their_side.read_message(our_side.write_message(HANDSHAKE_PAYLOADS[1]))
    message = bytes(their_side.write_message(HANDSHAKE_PAYLOADS[2 if not we_initiate else 1]))
    index = DH_LEN if we_initiate and where == "first" else 0 if where == "first" else -1
    with pytest.raises(GSSError) as caught:
        our_side.read_message(_flip(message, index))
    assert caught.value.major == GSS_S_DEFECTIVE_TOKEN
    assert caught.value.minor == Minor.HANDSHAKE_DECRYPT_FAILED


@pytest.mark.parametrize("we_initiate", [True, False], ids=["ours-initiates", "theirs-initiates"])
def test_tampered_or_truncated_transport_message_is_a_gsserror(we_initiate: bool) -> None:
    """Every bit position class (header of ciphertext, middle, tag) and truncation fail cleanly."""
    our_side = ours(initiator=we_initiate, static_private=os.urandom(DH_LEN))
    their_side = theirs(initiator=not we_initiate, static_private=os.urandom(DH_LEN))
    handshake(our_side, their_side)
    _, receive = transport(our_side, their_side)
    genuine = their_side.encrypt(b"the genuine message")
    for bad in (_flip(genuine, 0), _flip(genuine, len(genuine) // 2), _flip(genuine, -1),
                genuine[:-1], genuine[:TAG_LEN - 1], b""):
        with pytest.raises(GSSError) as caught:
            receive.decrypt_with_ad(b"", bad)
        assert caught.value.major == GSS_S_DEFECTIVE_TOKEN
        assert receive.n == 0, "a rejected message must not advance the nonce"
    # The genuine message still decrypts: the failures changed nothing.
    assert receive.decrypt_with_ad(b"", genuine) == b"the genuine message"


def test_a_different_prologue_fails_at_the_first_authenticated_message() -> None:
    """The prologue is bound into the hash: a mismatch is DEFECTIVE_TOKEN at msg2."""
    our_side = HandshakeState(initiator=True, static_private=os.urandom(DH_LEN),
                              random=os.urandom, prologue=b"another prologue")
    their_side = theirs(initiator=False, static_private=os.urandom(DH_LEN))
    their_side.read_message(our_side.write_message(b""))
    with pytest.raises(GSSError) as caught:
        our_side.read_message(bytes(their_side.write_message(b"")))
    assert caught.value.major == GSS_S_DEFECTIVE_TOKEN


# The largest payload of each XX message: 65535 minus e (32), an encrypted s (32 + 16)
# and the payload's tag (16) where the message has them.
LARGEST_PAYLOAD = (MAX_MESSAGE_LEN - DH_LEN,
                   MAX_MESSAGE_LEN - DH_LEN - (DH_LEN + TAG_LEN) - TAG_LEN,
                   MAX_MESSAGE_LEN - (DH_LEN + TAG_LEN) - TAG_LEN)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["msg1", "msg2", "msg3"])
def test_largest_handshake_payload_interoperates_and_one_more_byte_is_refused(
        index: int) -> None:
    """Each message at exactly 65535 bytes crosses both ways; one byte more is refused by
    ours without spoiling the handshake, which then completes."""
    we_initiate = index % 2 == 0
    our_side = ours(initiator=we_initiate, static_private=os.urandom(DH_LEN))
    their_side = theirs(initiator=not we_initiate, static_private=os.urandom(DH_LEN))
    for step in range(3):
        if (step % 2 == 0) != we_initiate:
            # Theirs sends its largest too: ours reads a 65535-byte message.
            largest = os.urandom(LARGEST_PAYLOAD[step])
            message = bytes(their_side.write_message(largest))
            assert len(message) == MAX_MESSAGE_LEN
            assert our_side.read_message(message) == largest
            continue
        payload = b"ours"
        if step == index:
            with pytest.raises(GSSError) as caught:
                our_side.write_message(bytes(LARGEST_PAYLOAD[index] + 1))
            assert (caught.value.major, caught.value.minor) == (
                GSS_S_FAILURE, Minor.MESSAGE_TOO_LARGE)
            payload = os.urandom(LARGEST_PAYLOAD[index])
        message = our_side.write_message(payload)
        if step == index:
            assert len(message) == MAX_MESSAGE_LEN
        assert bytes(their_side.read_message(message)) == payload
    assert our_side.complete and their_side.handshake_finished
    assert our_side.handshake_hash == bytes(their_side.get_handshake_hash())


@pytest.mark.parametrize("we_initiate", [True, False], ids=["ours-initiates", "theirs-initiates"])
def test_the_last_nonce_matches_and_the_reserved_one_is_refused(we_initiate: bool) -> None:
    """Nonce 2**64 - 2 gives the same bytes as theirs; 2**64 - 1 is refused (Noise §5.1)."""
    our_side = ours(initiator=we_initiate, static_private=os.urandom(DH_LEN))
    their_side = theirs(initiator=not we_initiate, static_private=os.urandom(DH_LEN))
    handshake(our_side, their_side)
    send, receive = transport(our_side, their_side)
    last = (1 << 64) - 2
    send.n = receive.n = last
    their_side.noise_protocol.cipher_state_encrypt.n = last
    their_side.noise_protocol.cipher_state_decrypt.n = last
    ours_out = send.encrypt_with_ad(b"", b"the last one")
    assert their_side.decrypt(ours_out) == b"the last one"
    assert receive.decrypt_with_ad(b"", their_side.encrypt(b"the last one")) == b"the last one"
    for call in (lambda: send.encrypt_with_ad(b"", b"one more"),
                 lambda: receive.decrypt_with_ad(b"", ours_out)):
        with pytest.raises(GSSError) as caught:
            call()
        assert caught.value.minor == Minor.SEQUENCE_EXHAUSTED


def test_a_message_over_the_noise_limit_is_refused_before_any_work() -> None:
    """Ours reads at most 65535 bytes per handshake message (TOKEN_TOO_LARGE)."""
    our_side = ours(initiator=False, static_private=os.urandom(DH_LEN))
    with pytest.raises(GSSError) as caught:
        our_side.read_message(bytes(MAX_MESSAGE_LEN + 1))
    assert (caught.value.major, caught.value.minor) == (
        GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_TOO_LARGE)
