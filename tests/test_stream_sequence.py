"""SecureStream over a real socketpair: a MESSAGE frame replayed, dropped or reordered on the
way is a failure of the stream, never data handed to the application (TCP is in order); only
the peer's authenticated CLOSE ends the stream cleanly."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import trio

from bench.common import established_pair
from handoffd.core.context import InitiatorContext
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.framing import CLOSE_MIC_MESSAGE, FrameType, encode_frame
from handoffd.minor import Minor
from handoffd.runtime.stream import SecureStream
from handoffd.status import (
    GSS_S_BAD_MIC,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_DUPLICATE_TOKEN,
    GSS_S_FAILURE,
    GSS_S_GAP_TOKEN,
    GSSError,
)


async def _read_all(frames_of: Callable[[InitiatorContext], bytes]
                    ) -> tuple[bytes, GSSError | None]:
    """What the acceptor's stream delivers from the client's ``frames_of(client)``
    followed by the end of TCP."""
    client, acceptor = established_pair(StaticKeyPair.generate(os.urandom))
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    stream = SecureStream(receiver, acceptor)
    await sender.send_all(frames_of(client))
    await sender.aclose()
    received = b""
    try:
        while chunk := await stream.receive_some():
            received += chunk
    except GSSError as error:
        return received, error
    finally:
        await receiver.aclose()
    return received, None


async def _receive_after(order: list[int]) -> tuple[bytes, GSSError | None]:
    """The acceptor's stream reads the client's tokens 0..2 sent in ``order``, then CLOSE."""
    def frames_of(client: InitiatorContext) -> bytes:
        tokens = [client.wrap(f"chunk {i};".encode()) for i in range(3)]
        return (b"".join(encode_frame(FrameType.MESSAGE, tokens[i]) for i in order)
                + _close(client))

    return await _read_all(frames_of)


async def test_in_order_tokens_are_the_stream() -> None:
    received, error = await _receive_after([0, 1, 2])
    assert error is None and received == b"chunk 0;chunk 1;chunk 2;"


@pytest.mark.parametrize(("order", "bit", "delivered"), [
    ([0, 0, 1], GSS_S_DUPLICATE_TOKEN, b"chunk 0;"),   # a frame replayed
    ([0, 2, 1], GSS_S_GAP_TOKEN, b"chunk 0;"),         # a frame dropped (or moved later)
    ([1, 0, 2], GSS_S_GAP_TOKEN, b""),                 # the first frame moved
])
async def test_a_token_out_of_sequence_fails_the_stream(order: list[int], bit: int,
                                                        delivered: bytes) -> None:
    received, error = await _receive_after(order)
    assert error is not None
    assert error.minor == Minor.MESSAGE_OUT_OF_SEQUENCE
    assert error.major & ~0xFFFF == GSS_S_FAILURE and error.major & bit
    assert received == delivered



async def _frames_until_eof(stream: trio.SocketStream) -> list[tuple[int, bytes]]:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    frames = []
    while data:
        length = int.from_bytes(data[1:5], "big")
        frames.append((data[0], data[5:5 + length]))
        data = data[5 + length:]
    return frames


async def test_abort_reports_the_failure_in_an_error_frame_without_close() -> None:
    client, acceptor = established_pair(StaticKeyPair.generate(os.urandom))
    token = client.wrap(b"once")
    left, right = trio.socket.socketpair()
    peer, transport = trio.SocketStream(left), trio.SocketStream(right)
    stream = SecureStream(transport, acceptor)
    await peer.send_all(encode_frame(FrameType.MESSAGE, token) * 2)
    assert await stream.receive_some() == b"once"
    with pytest.raises(GSSError) as failure:
        await stream.receive_some()
    await stream.abort(failure.value)
    await stream.aclose()  # already closed: sends nothing more
    frames = await _frames_until_eof(peer)
    await peer.aclose()
    body = (GSS_S_FAILURE | GSS_S_DUPLICATE_TOKEN).to_bytes(4, "big") \
        + int(Minor.MESSAGE_OUT_OF_SEQUENCE).to_bytes(4, "big")
    assert frames == [(FrameType.ERROR, body)]


async def test_abort_does_not_answer_the_peers_error() -> None:
    _, acceptor = established_pair(StaticKeyPair.generate(os.urandom))
    left, right = trio.socket.socketpair()
    peer, transport = trio.SocketStream(left), trio.SocketStream(right)
    stream = SecureStream(transport, acceptor)
    await peer.send_all(encode_frame(FrameType.ERROR, bytes.fromhex("000d0000" "0000025a")))
    with pytest.raises(GSSError) as failure:
        await stream.receive_some()
    assert (failure.value.major, failure.value.minor) == (GSS_S_FAILURE, 602)
    await stream.abort(failure.value)
    assert await _frames_until_eof(peer) == []
    await peer.aclose()


# --- the end of the stream: CLOSE carries a MIC token -----------------------------------


def _message(client: InitiatorContext, data: bytes) -> bytes:
    return encode_frame(FrameType.MESSAGE, client.wrap(data))


def _close(client: InitiatorContext, message: bytes = CLOSE_MIC_MESSAGE) -> bytes:
    return encode_frame(FrameType.CLOSE, client.get_mic(message))


async def test_the_peers_close_is_a_clean_end() -> None:
    received, error = await _read_all(lambda c: _message(c, b"all of it") + _close(c))
    assert error is None and received == b"all of it"


async def test_the_end_of_tcp_without_close_is_a_truncation_not_an_end() -> None:
    """A FIN (or a forged one) after whole frames: the data arrives, then the failure."""
    received, error = await _read_all(lambda c: _message(c, b"the first half"))
    assert received == b"the first half"
    assert error is not None
    assert (error.major, error.minor) == (GSS_S_FAILURE, Minor.STREAM_TRUNCATED)


async def test_an_unauthenticated_close_is_refused() -> None:
    """The old empty CLOSE is what an on-path attacker could inject: a defect, not an end."""
    received, error = await _read_all(lambda _: b"\x04\x00\x00\x00\x00")
    assert received == b""
    assert error is not None
    assert (error.major, error.minor) == (GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_BAD_FRAMING)


async def test_a_close_from_another_context_is_a_bad_mic() -> None:
    intruder, _ = established_pair(StaticKeyPair.generate(os.urandom))
    received, error = await _read_all(lambda c: _message(c, b"data") + _close(intruder))
    assert received == b"data"
    assert error is not None and error.major == GSS_S_BAD_MIC


async def test_a_mic_over_other_bytes_is_not_a_close() -> None:
    received, error = await _read_all(lambda c: _close(c, b"handoffd CLOSE?"))
    assert received == b""
    assert error is not None and error.major == GSS_S_BAD_MIC


async def test_a_wrap_token_cannot_be_retyped_as_close_nor_a_close_as_message() -> None:
    """TOK_ID is authenticated: a wrap token of the CLOSE bytes is no MIC (too long to be
    one), and the CLOSE's MIC in a MESSAGE frame is no wrap token."""
    as_close = await _read_all(
        lambda c: encode_frame(FrameType.CLOSE, c.wrap(CLOSE_MIC_MESSAGE)))
    as_message = await _read_all(
        lambda c: encode_frame(FrameType.MESSAGE, c.get_mic(CLOSE_MIC_MESSAGE)))
    for (received, error), minor in ((as_close, Minor.TOKEN_TRAILING_BYTES),
                                     (as_message, Minor.TOKEN_BAD_TYPE)):
        assert received == b""
        assert error is not None
        assert (error.major, error.minor) == (GSS_S_DEFECTIVE_TOKEN, minor)


async def test_a_close_moved_before_the_last_message_is_out_of_sequence() -> None:
    """The attacker drops the last MESSAGE frame and forwards the CLOSE: a gap, not an end."""
    def frames_of(client: InitiatorContext) -> bytes:
        first, _dropped = _message(client, b"kept"), _message(client, b"dropped")
        return first + _close(client)

    received, error = await _read_all(frames_of)
    assert received == b"kept"
    assert error is not None and error.minor == Minor.MESSAGE_OUT_OF_SEQUENCE
    assert error.major & ~0xFFFF == GSS_S_FAILURE and error.major & GSS_S_GAP_TOKEN


async def test_send_close_half_closes_then_the_peers_data_and_close_still_arrive() -> None:
    client, acceptor = established_pair(StaticKeyPair.generate(os.urandom))
    left, right = trio.socket.socketpair()
    client_stream = SecureStream(trio.SocketStream(left), client)
    acceptor_stream = SecureStream(trio.SocketStream(right), acceptor)
    await client_stream.send_all(b"question")
    await client_stream.send_close()
    with pytest.raises(trio.ClosedResourceError, match="CLOSE already sent"):
        await client_stream.send_all(b"more")
    assert await acceptor_stream.receive_some() == b"question"
    assert await acceptor_stream.receive_some() == b""
    await acceptor_stream.send_all(b"answer")
    await acceptor_stream.aclose()
    assert await client_stream.receive_some() == b"answer"
    assert await client_stream.receive_some() == b""
    await client_stream.aclose()  # its CLOSE went out already: nothing more is sent
