"""A trio stream over an established security context: wrap on send, unwrap on receive.

Both the client and a worker that imported a handed-off context talk to the
peer through :class:`SecureStream`.  Each ``send_all`` chunk becomes one
per-message token in one MESSAGE frame; ``receive_some`` unwraps frames and
returns plaintext.  The peer's CLOSE frame (a MIC token, so it cannot be forged)
is end of stream; a connection that ends without one raises ``STREAM_TRUNCATED``,
as TLS does without close_notify, so a cut cannot pass for a clean end.  An ERROR
frame raises the GSS status the peer reported.
"""

from __future__ import annotations

import trio

from handoffd.core.framing import (
    CLOSE_MIC_MESSAGE,
    Frame,
    FrameDecoder,
    FrameType,
    decode_error,
    encode_error,
    encode_frame,
)
from handoffd.mech import PerMessage
from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE, GSSError

MAX_CHUNK = 16 * 1024
"""Plaintext bytes per per-message token: small enough for low latency, big enough
that the AEAD call dominates the per-token overhead."""

_READ_SIZE = 64 * 1024


class SecureStream(trio.abc.Stream):
    """Per-message-protected byte stream over a transport stream.

    ``context`` is an established security context (``handoffd.core.context``);
    ``decoder`` may already hold bytes read past the handshake (nothing is lost
    across a handoff: the worker seeds it with the exported ``unread`` bytes).
    ``info`` carries what the application may want to know: peer name, flags,
    the sender's attributes of the handoff.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: PerMessage,
        *,
        decoder: FrameDecoder | None = None,
        info: dict[str, object] | None = None,
    ) -> None:
        self.transport = transport
        self.context = context
        self.info: dict[str, object] = info or {}
        self._decoder = decoder or FrameDecoder()
        self._plain = bytearray()
        self._eof = False
        self._send_lock = trio.StrictFIFOLock()
        self._closed = False
        self._close_sent = False
        self._peer_failed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Wrap ``data`` into per-message tokens of at most ``MAX_CHUNK`` bytes and send them."""
        if self._closed or self._close_sent:
            raise trio.ClosedResourceError("stream is closed" if self._closed
                                           else "CLOSE already sent")
        view = memoryview(data)
        async with self._send_lock:
            out = bytearray()
            for start in range(0, len(view), MAX_CHUNK):
                token = self.context.wrap(bytes(view[start:start + MAX_CHUNK]))
                out += encode_frame(FrameType.MESSAGE, token)
            if out:
                await self.transport.send_all(out)

    async def wait_send_all_might_not_block(self) -> None:
        """As the transport's."""
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Unwrapped plaintext; ``b""`` once the peer's CLOSE has arrived.

        The connection ending without that CLOSE raises ``GSS_S_FAILURE`` /
        ``STREAM_TRUNCATED``: the data may have been cut short.  An ERROR frame from
        the peer raises its GSS status; a token that is not the next in sequence
        (replayed, reordered or one skipped) raises ``GSS_S_FAILURE`` with its
        supplementary bits and ``MESSAGE_OUT_OF_SEQUENCE``.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        while not self._plain and not self._eof:
            frame = self._decoder.next_frame()
            if frame is None:
                chunk = await self.transport.receive_some(_READ_SIZE)
                if not chunk:
                    if self._decoder.unread():
                        raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_TRUNCATED,
                                       "connection closed in the middle of a frame")
                    raise GSSError(GSS_S_FAILURE, Minor.STREAM_TRUNCATED,
                                   "connection closed before the peer's CLOSE")
                self._decoder.feed(chunk)
                continue
            self._handle(frame)
        size = len(self._plain) if max_bytes is None else min(max_bytes, len(self._plain))
        data = bytes(self._plain[:size])
        del self._plain[:size]
        return data

    def _handle(self, frame: Frame) -> None:
        if frame.type == FrameType.MESSAGE:
            result = self.context.unwrap(frame.body)
            if result.supplementary:
                # TCP delivers in order: a duplicate, old, reordered or skipped token means
                # frames were replayed, moved or dropped on the way; never pass that data on.
                raise GSSError(GSS_S_FAILURE | result.supplementary,
                               Minor.MESSAGE_OUT_OF_SEQUENCE)
            self._plain += result.data
        elif frame.type == FrameType.CLOSE:
            supplementary = self.context.verify_mic(CLOSE_MIC_MESSAGE, frame.body)
            if supplementary:
                raise GSSError(GSS_S_FAILURE | supplementary, Minor.MESSAGE_OUT_OF_SEQUENCE,
                               "CLOSE")
            self._eof = True
        elif frame.type == FrameType.ERROR:
            self._peer_failed = True
            major, minor = decode_error(frame.body)
            raise GSSError(major, minor, "reported by the peer")
        else:
            raise GSSError(GSS_S_FAILURE, Minor.TOKEN_BAD_TYPE,
                           f"unexpected {frame.type.name} frame after the handshake")

    async def send_close(self) -> None:
        """Tell the peer we are done (a CLOSE frame); the transport stays open for reading.

        Raises the context's ``GSSError`` if it can no longer make the CLOSE's MIC
        (expired, sequence numbers exhausted).
        """
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        await self._send_close()

    async def _send_close(self) -> None:
        async with self._send_lock:
            if not self._close_sent:
                frame = encode_frame(FrameType.CLOSE, self.context.get_mic(CLOSE_MIC_MESSAGE))
                self._close_sent = True
                await self.transport.send_all(frame)

    async def abort(self, error: GSSError) -> None:
        """End the session on a failure: an ERROR frame with ``error``'s status, no CLOSE.

        Status codes only (never the detail text), best effort within 1 s, then the
        transport is closed.  Nothing is sent when the failure is the peer's own ERROR
        frame: an ERROR is never answered.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if not self._peer_failed:
                with trio.move_on_after(1):
                    await self.transport.send_all(encode_frame(
                        FrameType.ERROR, encode_error(error.major, error.minor)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.transport.aclose()

    async def aclose(self) -> None:
        """Send CLOSE (best effort, 1 s), then close the transport.

        A context that can no longer make the CLOSE's MIC (expired) closes without it;
        the peer then sees ``STREAM_TRUNCATED``, which is the truth.
        """
        if self._closed:
            return
        self._closed = True
        try:
            with trio.move_on_after(1):
                await self._send_close()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, GSSError):
            pass
        finally:
            await self.transport.aclose()
