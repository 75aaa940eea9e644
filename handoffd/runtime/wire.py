"""The client-server handshake over a trio stream, for both roles.

Framing and the mechanism are sans-I/O (``handoffd.core``); this module only
moves their bytes.  On the acceptor, bytes read past the final handshake frame
stay in the decoder and travel with the exported context, so nothing the
client pipelined is lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio

from handoffd.core.context import AcceptorContext, InitiatorContext
from handoffd.core.framing import (
    Frame,
    FrameDecoder,
    FrameType,
    decode_error,
    encode_error,
    encode_frame,
    read_first_token,
    unwrap_first_token,
    wrap_first_token,
)
from handoffd.mech import AcceptorFactory, AcceptorHandshake, select
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_COMPLETE,
    GSS_S_CONTINUE_NEEDED,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSSError,
)

READ_SIZE = 64 * 1024
ACCEPT_READ_SIZE = 16 * 1024
"""The acceptor's read size.  What it reads past the final handshake frame travels inside
the exported context, and the HANDOFF message carrying that is limited to 64 KiB: reading
less per call bounds those bytes whatever the client pipelines (the rest stays in the
socket for the worker)."""


async def read_frame(stream: trio.abc.ReceiveStream, decoder: FrameDecoder, *,
                     max_read: int = READ_SIZE) -> Frame:
    """The next whole frame; EOF before it is ``PEER_CLOSED``."""
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            return frame
        data = await stream.receive_some(max_read)
        if not data:
            raise GSSError(GSS_S_FAILURE, Minor.PEER_CLOSED,
                           "connection closed during the handshake")
        decoder.feed(data)


class PeerReportedError(GSSError):
    """The peer's own ERROR frame: reported locally, never answered (docs/PROTOCOL.md)."""


def _handshake_body(frame: Frame) -> bytes:
    if frame.type == FrameType.ERROR:
        major, minor = decode_error(frame.body)
        raise PeerReportedError(major, minor, "reported by the peer")
    if frame.type != FrameType.HANDSHAKE:
        raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_BAD_TYPE,
                       f"expected a HANDSHAKE frame, got {frame.type.name}")
    return frame.body


async def accept_handshake(
    stream: trio.abc.Stream, context: AcceptorContext, decoder: FrameDecoder
) -> None:
    """Run the acceptor side until the context is established."""
    first = True
    while True:
        body = _handshake_body(await read_frame(stream, decoder, max_read=ACCEPT_READ_SIZE))
        token = unwrap_first_token(body) if first else body
        first = False
        major, output = context.step(token)
        if output:
            await stream.send_all(encode_frame(FrameType.HANDSHAKE, output))
        if major == GSS_S_COMPLETE:
            return
        if major != GSS_S_CONTINUE_NEEDED:  # pragma: no cover - step raises on errors
            raise GSSError(major)


class HandshakePace(Protocol):
    """How the acceptor paces one connection's handshake (the daemon's admission)."""

    def token_arrived(self, first: bool) -> None:
        """A whole token arrived (and, for the first, its mechanism is known)."""

    def turn(self) -> AbstractAsyncContextManager[None]:
        """Held around each expensive step, so one source's steps queue behind each
        other instead of in front of everybody else's."""


class _Unpaced:
    def token_arrived(self, first: bool) -> None:
        pass

    def turn(self) -> AbstractAsyncContextManager[None]:
        return _no_turn()


@asynccontextmanager
async def _no_turn() -> AsyncIterator[None]:
    yield


def max_handshake_frame(factories: Mapping[bytes, AcceptorFactory]) -> int:
    """The frame cap before the first token names its mechanism: the largest enabled."""
    return max(f.info.max_handshake_frame for f in factories.values())


async def accept_any_handshake(
    stream: trio.abc.Stream, factories: Mapping[bytes, AcceptorFactory], decoder: FrameDecoder,
    *, pace: HandshakePace | None = None,
) -> tuple[AcceptorFactory, AcceptorHandshake]:
    """Pick the mechanism by the OID of the client's first token, then run its acceptor.

    Only mechanisms in ``factories`` (the enabled ones, by DER OID) are accepted;
    any other OID is ``GSS_S_BAD_MECH``.  Nothing costly happens before the first
    token parses (frame, RFC 2743 framing, an enabled OID, the mechanism's own
    unwrapping); from then on frames are capped at that mechanism's
    ``max_handshake_frame``.  Returns the mechanism and its established context.
    """
    pace = pace or _Unpaced()
    decoder.max_frame = min(decoder.max_frame, max_handshake_frame(factories))
    body = _handshake_body(await read_frame(stream, decoder, max_read=ACCEPT_READ_SIZE))
    oid_der, _ = read_first_token(body)
    factory = select(factories, oid_der)
    token = factory.first_token(body)
    decoder.max_frame = min(decoder.max_frame, factory.info.max_handshake_frame)
    pace.token_arrived(first=True)
    context = factory.new_context()
    while True:
        async with pace.turn():
            major, output = context.step(token)
        if output:
            await stream.send_all(encode_frame(FrameType.HANDSHAKE, output))
        if major == GSS_S_COMPLETE:
            return factory, context
        if major != GSS_S_CONTINUE_NEEDED:  # pragma: no cover - step raises on errors
            raise GSSError(major)
        token = _handshake_body(await read_frame(stream, decoder, max_read=ACCEPT_READ_SIZE))
        pace.token_arrived(first=False)


class _Initiator(Protocol):
    def step(self, token: bytes | None) -> tuple[int, bytes]: ...


async def initiate_handshake(
    stream: trio.abc.Stream, context: InitiatorContext | _Initiator, decoder: FrameDecoder,
    *, frame_first: bool = True,
) -> None:
    """Run the initiator side until the context is established.

    ``frame_first`` False sends the first token as the mechanism made it (krb5's
    already carries its RFC 2743 framing and OID).
    """
    major, output = context.step(None)
    first = wrap_first_token(output) if frame_first else output
    await stream.send_all(encode_frame(FrameType.HANDSHAKE, first))
    while major == GSS_S_CONTINUE_NEEDED:
        body = _handshake_body(await read_frame(stream, decoder))
        major, output = context.step(body)
        if output:
            await stream.send_all(encode_frame(FrameType.HANDSHAKE, output))


async def send_error(stream: trio.abc.SendStream, error: GSSError) -> None:
    """Best effort: tell the peer why we are closing (status codes only, no secrets)."""
    try:
        with trio.move_on_after(1):
            await stream.send_all(encode_frame(FrameType.ERROR,
                                               encode_error(error.major, error.minor)))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
