"""Fuzz the handshake *payloads* behind the Noise AEAD: hello, offer and confirm fields.

``fuzz_handshake`` mutates whole tokens, so past msg1 every mutation dies at
the AEAD tag and the fields inside msg2 (the acceptor's offer) and msg3 (the
initiator's confirm) are never parsed.  Here the fuzzer writes those
plaintexts and a raw Noise peer (:class:`~handoffd.core.noise.HandshakeState`
with fixed keys) encrypts them, so the real context parses every byte.

Input, byte 0: bit 0 which side is real (0: an initiator facing a raw
responder; 1: an acceptor facing a raw initiator); bit 1 the raw peer's static
key is a stranger's (a server the initiator did not pin; a client that is not
on the allow-list); bits 2-6 the :class:`~fuzz._handshakes.Setup` (bit 7
unused).  The rest: u16-length-prefixed plaintexts, the offer (side 0) or the
hello and the confirm (side 1).

Invariants beyond "GSSError or nothing, no fd left": a rejected token kills
the context (every later step is ``HANDSHAKE_OUT_OF_ORDER``); a context
completes only for well-formed payloads (version 1, exact size); a pinned
initiator completes only with the pinned server; an acceptor admits only its
allowed client key, or an anonymous client when anonymous clients are allowed
and the client asked for anonymity, and only with the channel bindings it
demands; the offer grants no flag the client did not ask for (beyond mutual,
confidentiality and integrity) and no lifetime over the cap; the lifetime
established is the one offered; and both sides end with the same traffic keys.
"""

from __future__ import annotations

import hashlib
import random
import struct

from fuzz._harness import instrumented, main, no_fd_leak, u16_chunks

with instrumented(__name__):
    from fuzz._fixtures import (
        ACCEPTOR_SEED,
        BINDINGS,
        CLIENT_NAME,
        INITIATOR_SEED,
        LIFETIME,
        NOW,
        OTHER_BINDINGS,
        STRANGER_PRIVATE,
    )
    from fuzz._handshakes import CLIENT_KEY, SERVER_KEY, Setup
    from handoffd.core.context import (
        ANONYMOUS_NAME,
        PROLOGUE,
        AcceptorContext,
        Flags,
        InitiatorContext,
    )
    from handoffd.core.credentials import StaticKeyPair
    from handoffd.core.noise import HandshakeState
    from handoffd.core.protection import MessageProtection
    from handoffd.minor import Minor
    from handoffd.status import GSS_S_COMPLETE, GSS_S_CONTINUE_NEEDED, GSSError

STRANGER_KEY = StaticKeyPair(STRANGER_PRIVATE)
_PAYLOAD = struct.Struct(">BHI")  # hello and offer: version, flags, lifetime in ms
_MAX_PLAINTEXT = 4096
_GRANTED_ALWAYS = Flags.MUTUAL | Flags.CONF | Flags.INTEG
_RETURNED = _GRANTED_ALWAYS | Flags.REPLAY | Flags.SEQUENCE | Flags.ANON | Flags.PROT_READY \
    | Flags.TRANS

Handshaking = InitiatorContext | AcceptorContext


def _fields(payload: bytes) -> tuple[int, int, int] | None:
    """(version, flags, lifetime ms) of a well-formed hello/offer, else None."""
    if len(payload) != _PAYLOAD.size or payload[0] != 1:
        return None
    version, flags, lifetime_ms = _PAYLOAD.unpack(payload)
    return version, flags, lifetime_ms


def _step(context: Handshaking, token: bytes) -> bytes | None:
    """One step; its output, or None after checking that a failure left the context dead."""
    try:
        major, output = context.step(token)
    except GSSError:
        if context.established:
            raise AssertionError("a context that rejected a token is established") from None
        try:
            context.step(b"")
        except GSSError as again:
            if again.minor != Minor.HANDSHAKE_OUT_OF_ORDER:
                raise AssertionError(f"failed context answered {again!r}") from None
        else:
            raise AssertionError("a failed context took another step") from None
        return None
    if major not in (GSS_S_CONTINUE_NEEDED, GSS_S_COMPLETE) or \
            (major == GSS_S_COMPLETE) != context.established:
        raise AssertionError(f"step returned {major:#x}, established={context.established}")
    if context.established and context.flags & ~_RETURNED:
        raise AssertionError(f"returned flags {context.flags!r}")
    return bytes(output)


def _same_keys(context: Handshaking, raw: HandshakeState) -> None:
    """The raw peer's Split() must open what the real context wraps, and the reverse."""
    to_acceptor, to_initiator = raw.split()
    initiator = context.is_initiator
    peer = MessageProtection(send_key=to_initiator if initiator else to_acceptor,
                             recv_key=to_acceptor if initiator else to_initiator,
                             initiator=not initiator)
    if peer.unwrap(context.wrap(b"to the raw peer"))[0] != b"to the raw peer":
        raise AssertionError("the real context and its peer disagree on keys")
    if context.unwrap(peer.wrap(b"from the raw peer", True)[0]).data != b"from the raw peer":
        raise AssertionError("the real context does not open its peer's tokens")


def _real_initiator(mode: int, setup: Setup, offer: bytes) -> None:
    client = setup.initiator()
    _, msg1 = client.step(None)
    server = STRANGER_KEY if mode & 0x02 else SERVER_KEY
    raw = HandshakeState(initiator=False, static_private=server.private_key,
                         random=random.Random(ACCEPTOR_SEED).randbytes, prologue=PROLOGUE)
    raw.read_message(msg1)
    confirm = _step(client, raw.write_message(offer[:_MAX_PLAINTEXT]))
    if confirm is None:
        return
    fields = _fields(offer)
    if fields is None or server is not SERVER_KEY:
        raise AssertionError("the initiator completed on a bad offer or an unpinned server")
    _, flags, lifetime_ms = fields
    if not flags & Flags.MUTUAL or flags & ~int(_GRANTED_ALWAYS | Flags.REPLAY
                                                | Flags.SEQUENCE | Flags.ANON):
        raise AssertionError(f"the initiator accepted offered flags {flags:#x}")
    if bool(flags & Flags.ANON) != setup.anonymous_client or \
            client.expires_at != NOW + lifetime_ms / 1000:
        raise AssertionError("the initiator's context differs from the offer")
    bindings = OTHER_BINDINGS if setup.other_client_bindings else BINDINGS
    if raw.read_message(confirm) != b"\x01" + hashlib.sha256(bindings).digest():
        raise AssertionError("the initiator's confirm does not carry its bindings")
    _same_keys(client, raw)


def _real_acceptor(mode: int, setup: Setup, hello: bytes, confirm: bytes) -> None:
    server = setup.acceptor()
    client_key = STRANGER_KEY if mode & 0x02 else CLIENT_KEY
    raw = HandshakeState(initiator=True, static_private=client_key.private_key,
                         random=random.Random(INITIATOR_SEED).randbytes, prologue=PROLOGUE)
    msg2 = _step(server, raw.write_message(hello[:_MAX_PLAINTEXT]))
    if msg2 is None:
        return
    requested, offered = _fields(hello), _fields(raw.read_message(msg2))
    if requested is None or offered is None:
        raise AssertionError("the acceptor answered a bad hello, or with a bad offer")
    asked, granted, lifetime_ms = requested[1], offered[1], offered[2]
    if granted & Flags.ANON and not setup.allow_anonymous:
        raise AssertionError("the acceptor offered anonymity it does not allow")
    if granted & ~(asked | int(_GRANTED_ALWAYS)) or \
            not 0 < lifetime_ms <= LIFETIME * 1000:
        raise AssertionError(f"the acceptor offered flags {granted:#x}, {lifetime_ms} ms")
    if _step(server, raw.write_message(confirm[:_MAX_PLAINTEXT])) is None:
        return
    if len(confirm) != 33 or confirm[0] != 1:
        raise AssertionError("the acceptor completed on a malformed confirm")
    if setup.acceptor_bindings and confirm[1:] != hashlib.sha256(BINDINGS).digest():
        raise AssertionError("the acceptor completed with other channel bindings")
    if server.anonymous:
        if not granted & Flags.ANON or server.peer_name != ANONYMOUS_NAME:
            raise AssertionError("the acceptor admitted an anonymous client it should refuse")
    elif client_key is not CLIENT_KEY or setup.client_not_allowed or \
            server.peer_name != CLIENT_NAME:
        raise AssertionError("the acceptor admitted a client key not on its allow-list")
    if server.expires_at != NOW + lifetime_ms / 1000:
        raise AssertionError("the acceptor's lifetime differs from its offer")
    _same_keys(server, raw)


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    if not data:
        return
    mode = data[0]
    setup = Setup.from_bits(mode >> 2 & 0x1F)
    pieces = list(u16_chunks(data[1:]))
    with no_fd_leak():
        if not mode & 0x01:
            if pieces:
                _real_initiator(mode, setup, pieces[0])
        elif len(pieces) >= 2:
            _real_acceptor(mode, setup, pieces[0], pieces[1])


if __name__ == "__main__":
    main(TestOneInput)
