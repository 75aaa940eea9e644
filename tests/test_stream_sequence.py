"""SecureStream over a real socketpair: a MESSAGE frame replayed, dropped or reordered on the
way is a failure of the stream, never data handed to the application (TCP is in order)."""

from __future__ import annotations

import os

import pytest
import trio

from bench.common import established_pair
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.framing import FrameType, encode_frame
from handoffd.minor import Minor
from handoffd.runtime.stream import SecureStream
from handoffd.status import (
    GSS_S_DUPLICATE_TOKEN,
    GSS_S_FAILURE,
    GSS_S_GAP_TOKEN,
    GSSError,
)


async def _receive_after(order: list[int]) -> tuple[bytes, GSSError | None]:
    """The acceptor's stream reads the client's tokens 0..2 sent in ``order``."""
    client, acceptor = established_pair(StaticKeyPair.generate(os.urandom))
    tokens = [client.wrap(f"chunk {i};".encode()) for i in range(3)]
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    stream = SecureStream(receiver, acceptor)
    await sender.send_all(b"".join(encode_frame(FrameType.MESSAGE, tokens[i]) for i in order)
                          + encode_frame(FrameType.CLOSE, b""))
    received = b""
    try:
        while chunk := await stream.receive_some():
            received += chunk
    except GSSError as error:
        return received, error
    finally:
        await sender.aclose()
        await receiver.aclose()
    return received, None


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
