"""Fuzz the handshake-token path: frames, the RFC 2743 first token, and both ``step()``s.

Input, byte 0: bits 0-2 the operation, bits 3-7 the :class:`~fuzz._handshakes.Setup`
(anonymous client, anonymous allowed, acceptor bindings, other client bindings,
client not in the allow list) for operations 2-7.  The rest is u16-length-prefixed
pieces (``_harness.u16_chunks``).

===  ===========================================================================
op   what the pieces are
===  ===========================================================================
0    bytes fed in turn to a ``FrameDecoder`` (bit 3: ``max_frame`` 64), frames
     drained after each feed; ERROR bodies go through ``decode_error`` and into a
     ``GSSError`` as ``runtime/wire.py`` does
1    first tokens for ``read_first_token`` / ``unwrap_first_token``
2    tokens for the acceptor from msg1 on (raw, no first-token wrapping)
3    tokens for the initiator from msg2 on (after its real ``step(None)``)
4    tokens for the acceptor from msg3 on (after a real msg1)
5    as 2, but the first piece is a first token, unwrapped as the daemon does
6    tokens for both sides of an established context
7    bytes fed to a ``FrameDecoder`` whose frames drive the acceptor exactly as
     ``runtime/wire.accept_handshake`` does
===  ===========================================================================

Invariants beyond "GSSError or nothing": a frame decoder that raises keeps its
buffer; decoded frames re-encode to the bytes fed; an accepted first token is
canonical (re-wrapping gives the same bytes); ``step`` returns only
CONTINUE_NEEDED or COMPLETE; after a rejected token the context fails cleanly
(not established, every later step is HANDSHAKE_OUT_OF_ORDER, no wrap, no
export) and the error's text holds no key; an established context refuses
further steps and still protects messages both ways.
"""

from __future__ import annotations

from fuzz._harness import instrumented, main, no_fd_leak, u16_chunks

with instrumented(__name__):
    from fuzz._handshakes import CLIENT_KEY, SERVER_KEY, Setup, established
    from handoffd.core.context import SecurityContext, _HandshakeContext
    from handoffd.core.framing import (
        FrameDecoder,
        FrameType,
        decode_error,
        encode_frame,
        read_first_token,
        unwrap_first_token,
        wrap_first_token,
    )
    from handoffd.minor import Minor
    from handoffd.status import (
        GSS_S_COMPLETE,
        GSS_S_CONTINUE_NEEDED,
        GSS_S_NO_CONTEXT,
        GSS_S_UNAVAILABLE,
        GSSError,
    )

_SECRETS = (SERVER_KEY.private_bytes, CLIENT_KEY.private_bytes)


def _no_secret_in(error: GSSError) -> None:
    text = str(error) + repr(error)
    for secret in _SECRETS:
        if secret.hex() in text or repr(secret) in text:
            raise AssertionError("an error's text holds a private key")


def _frames(mode: int, pieces: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame=64 if mode & 0x08 else 1024 * 1024)
    fed = bytearray()
    taken = bytearray()
    for piece in pieces:
        decoder.feed(piece)
        fed += piece
        while True:
            before = decoder.unread()
            try:
                frame = decoder.next_frame()
            except GSSError as error:
                _no_secret_in(error)
                if decoder.unread() != before:
                    raise AssertionError("a rejected frame changed the decoder's buffer") from None
                return
            if frame is None:
                break
            taken += encode_frame(frame.type, frame.body)
            if frame.type == FrameType.ERROR:
                major, minor = decode_error(frame.body)
                reported = GSSError(major, minor, "reported by the peer")
                str(reported), repr(reported)  # what the runtime logs must not raise
        if bytes(taken) + decoder.unread() != bytes(fed):
            raise AssertionError("frames and unread bytes do not add up to what was fed")


def _first_token(token: bytes) -> None:
    try:
        oid, inner = read_first_token(token)
    except GSSError:
        return
    if wrap_first_token(inner, oid) != token:
        raise AssertionError("an accepted first token is not canonical DER")
    try:
        unwrap_first_token(token)
    except GSSError as error:
        _no_secret_in(error)


def _check_failed(context: _HandshakeContext, error: GSSError) -> None:
    """The code's semantics for a rejected token: the context is dead, not half-open."""
    _no_secret_in(error)
    if context.established:
        raise AssertionError("a context that rejected a token is established")
    for probe in (b"", None):
        try:
            context.step(probe)
        except GSSError as again:
            if again.minor != Minor.HANDSHAKE_OUT_OF_ORDER:
                raise AssertionError(f"failed context stepped again: {again!r}") from None
        else:
            raise AssertionError("a failed context accepted another step")
    _expect_major(lambda: context.wrap(b"x"), GSS_S_NO_CONTEXT)
    _expect_major(context.export, GSS_S_UNAVAILABLE)


def _check_still_open(context: _HandshakeContext, error: GSSError) -> None:
    if error.minor != Minor.HANDSHAKE_OUT_OF_ORDER or not context.established:
        raise AssertionError(f"an established context mishandled a surplus token: {error!r}")
    context.get_mic(b"still open")


def _expect_major(call: object, major: int) -> None:
    try:
        call()  # type: ignore[operator]
    except GSSError as error:
        if error.major != major:
            raise AssertionError(f"expected major 0x{major:08x}, got {error!r}") from None
    else:
        raise AssertionError("a dead context still works")


def _talks(sender: SecurityContext, receiver: SecurityContext) -> None:
    token = sender.wrap(b"after the handshake")
    if receiver.unwrap(token).data != b"after the handshake":
        raise AssertionError("established contexts do not agree on keys")


def _drive(context: _HandshakeContext, tokens: list[bytes], first_wrapped: bool = False) -> None:
    """Feed ``tokens`` to ``context`` in turn; stop at the first rejection and check it."""
    for index, token in enumerate(tokens):
        try:
            inner = unwrap_first_token(token) if first_wrapped and index == 0 else token
        except GSSError as error:
            _no_secret_in(error)
            return  # the daemon drops the connection before any step
        was_open = context.established
        try:
            major, _ = context.step(inner)
        except GSSError as error:
            if was_open:  # a surplus token: refused, and the context stays open
                _check_still_open(context, error)
            else:
                _check_failed(context, error)
            return
        if was_open:
            raise AssertionError("an established context took another step")
        if major not in (GSS_S_CONTINUE_NEEDED, GSS_S_COMPLETE):
            raise AssertionError(f"step returned major 0x{major:08x}")
        if (major == GSS_S_COMPLETE) != context.established:
            raise AssertionError("COMPLETE and established disagree")


def _handshake(operation: int, setup: Setup, pieces: list[bytes]) -> None:
    if operation in (2, 5):
        _drive(setup.acceptor(), pieces, first_wrapped=operation == 5)
    elif operation == 3:
        initiator = setup.initiator()
        initiator.step(None)
        _drive(initiator, pieces)
    elif operation == 4:
        initiator, acceptor = setup.initiator(), setup.acceptor()
        try:
            acceptor.step(initiator.step(None)[1])
        except GSSError as error:  # this setup is refused at msg1: nothing to fuzz after it
            _check_failed(acceptor, error)
            return
        _drive(acceptor, pieces)
    elif operation == 6:
        if setup.client_not_allowed or (setup.anonymous_client and not setup.allow_anonymous) \
                or (setup.acceptor_bindings and setup.other_client_bindings):
            setup = Setup()  # a refused setup has no established pair to poke
        pair = established(setup)
        for token in pieces:
            for side in pair:
                _drive(side, [token])
        _talks(pair[0], pair[1])
        _talks(pair[1], pair[0])


def _wire_acceptor(setup: Setup, pieces: list[bytes]) -> None:
    """``runtime/wire.accept_handshake`` without the socket."""
    acceptor = setup.acceptor()
    decoder = FrameDecoder()
    first = True
    for piece in pieces:
        decoder.feed(piece)
        while True:
            try:
                frame = decoder.next_frame()
                if frame is None:
                    break
                if frame.type == FrameType.ERROR:
                    decode_error(frame.body)
                    return
                if frame.type != FrameType.HANDSHAKE:
                    return
                token = unwrap_first_token(frame.body) if first else frame.body
            except GSSError as error:
                _no_secret_in(error)
                return
            first = False
            try:
                major, _ = acceptor.step(token)
            except GSSError as error:
                _check_failed(acceptor, error)
                return
            if major == GSS_S_COMPLETE:
                return


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    if not data:
        return
    mode = data[0]
    operation = mode & 0x07
    pieces = list(u16_chunks(data[1:]))
    with no_fd_leak():
        if operation == 0:
            _frames(mode, pieces)
        elif operation == 1:
            for token in pieces:
                _first_token(token)
        elif operation == 7:
            _wire_acceptor(Setup.from_bits(mode >> 3), pieces)
        else:
            _handshake(operation, Setup.from_bits(mode >> 3), pieces)


if __name__ == "__main__":
    main(TestOneInput)
