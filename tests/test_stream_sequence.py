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

