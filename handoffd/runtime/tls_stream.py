"""TLS on trio streams: the acceptor's handshake driver and the worker's continued session.

:func:`accept_tls_handshake` moves bytes between a socket and
:class:`handoffd.mech.tls.TlsServerHandshake`.  :class:`TlsStream` is what a worker's
app gets for a handed-off TLS session: the same surface as
:class:`handoffd.runtime.stream.SecureStream` (``send_all``, ``receive_some``,
``send_close``, ``abort``, ``aclose``, ``info``), over
:class:`handoffd.core.tls_record.TlsRecordSession`, so every app runs unchanged.
``close_notify`` is the authenticated end of stream; a connection cut without it raises
``STREAM_TRUNCATED``; a defect is answered with its fatal alert.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import trio

from handoffd.core.tls_export import TlsExport
from handoffd.core.tls_keys import suite_by_code
from handoffd.core.tls_record import (
    AlertDescription,
    ApplicationData,
    Event,
    PeerClosed,
    TlsAlert,
    TlsRecordSession,
)
from handoffd.minor import Minor
from handoffd.runtime.wire import ACCEPT_READ_SIZE, HandshakePace, _Unpaced
from handoffd.status import GSS_S_CONTEXT_EXPIRED, GSS_S_FAILURE, GSSError

if TYPE_CHECKING:
    from handoffd.mech.tls import TlsServerHandshake

_READ_SIZE = 64 * 1024


async def accept_tls_handshake(
    stream: trio.abc.Stream, handshake: TlsServerHandshake, *, pace: HandshakePace | None = None
) -> None:
    """Run the server handshake until it completes; OpenSSL's alert is sent on failure."""
    pace = pace or _Unpaced()
    try:
        while not handshake.complete:
            data = await stream.receive_some(ACCEPT_READ_SIZE)
            if not data:
                raise GSSError(
                    GSS_S_FAILURE, Minor.PEER_CLOSED, "connection closed during the TLS handshake"
                )
            records_before = handshake.records_seen
            async with pace.turn():
                out = handshake.receive_data(bytes(data))
            if handshake.records_seen > records_before:
                # progress is a whole record, never a dribble of bytes (eviction order)
                pace.token_arrived(first=records_before == 0)
            if out:
                await stream.send_all(out)
    except GSSError:
        if handshake.alert_bytes:
            gone = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
            with trio.move_on_after(1), contextlib.suppress(*gone):
                await stream.send_all(handshake.alert_bytes)
        raise


def session_from_export(export: TlsExport) -> TlsRecordSession:
    """The worker's side of an imported session: reads the client's records, writes its own."""
    return TlsRecordSession(
        suite_by_code(export.suite),
        read_secret=export.client_secret,
        write_secret=export.server_secret,
        read_sequence=export.client_sequence,
        write_sequence=export.server_sequence,
    )


class TlsStream(trio.abc.Stream):
    """A continued TLS 1.3 session as a byte stream (``SecureStream``'s surface)."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        session: TlsRecordSession,
        *,
        unread: bytes = b"",
        expiry: float | None = None,
        info: dict[str, object] | None = None,
    ) -> None:
        self.transport = transport
        self.session = session
        self.info: dict[str, object] = info or {}
        self._unread = unread
        self._expiry = expiry
        self._plain = bytearray()
        self._eof = False
        self._send_lock = trio.StrictFIFOLock()
        self._closed = False

    def _check_expiry(self) -> None:
        if self._expiry is not None and time.time() >= self._expiry:
            raise GSSError(GSS_S_CONTEXT_EXPIRED, Minor.CONTEXT_LIFETIME_OVER, "TLS session")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self.session.closed:
            raise trio.ClosedResourceError(
                "stream is closed" if self._closed else "close_notify already sent"
            )
        self._check_expiry()
        async with self._send_lock:
            records = self.session.send(bytes(data))
            if records:
                await self.transport.send_all(records)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Plaintext; ``b""`` after the peer's close_notify.

        A connection that ends without close_notify raises ``GSS_S_FAILURE`` /
        ``STREAM_TRUNCATED``; a defective record raises its :class:`TlsAlert` (send it
        with :meth:`abort`); a fatal alert from the peer raises ``TLS_ALERT_RECEIVED``.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        while not self._plain and not self._eof:
            self._check_expiry()
            if self._unread:
                chunk, self._unread = self._unread, b""
            else:
                chunk = bytes(await self.transport.receive_some(_READ_SIZE))
                if not chunk:
                    raise GSSError(
                        GSS_S_FAILURE,
                        Minor.STREAM_TRUNCATED,
                        "connection closed before close_notify",
                    )
            self._apply(self.session.receive_data(chunk))
            if self.session.owes_key_update:
                # the peer asked for our KeyUpdate: send it now, not only with our next data
                async with self._send_lock:
                    if self.session.owes_key_update and not self.session.closed:
                        await self.transport.send_all(self.session.send(b""))
        return self._take(max_bytes)

    def _apply(self, events: list[Event]) -> None:
        """Plaintext into the read buffer; close_notify marks the end of stream."""
        for event in events:
            if isinstance(event, ApplicationData):
                self._plain += event.data
            elif isinstance(event, PeerClosed):
                self._eof = True

    def _take(self, max_bytes: int | None) -> bytes:
        """Up to ``max_bytes`` (all, for None) of the plaintext read so far."""
        size = len(self._plain) if max_bytes is None else min(max_bytes, len(self._plain))
        data = bytes(self._plain[:size])
        del self._plain[:size]
        return data

    async def send_close(self) -> None:
        """close_notify; the transport stays open for reading."""
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        await self._before_io()
        async with self._send_lock:
            await self._send_end(AlertDescription.close_notify)

    async def send_eof(self) -> None:
        await self.send_close()

    async def abort(self, error: GSSError) -> None:
        """End on a failure: the fatal alert a :class:`TlsAlert` names (none for the
        peer's own alert; ``internal_error`` for any other failure), then close."""
        if self._closed:
            return
        self._closed = True
        description = (error.alert if isinstance(error, TlsAlert)
                       else AlertDescription.internal_error)
        try:
            if description is not None:
                with trio.move_on_after(1):
                    await self._send_end(description)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.transport.aclose()

    async def aclose(self) -> None:
        """close_notify (best effort, 1 s), then close the transport."""
        if self._closed:
            return
        self._closed = True
        try:
            with trio.move_on_after(1):
                async with self._send_lock:
                    await self._send_end(AlertDescription.close_notify)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, GSSError):
            pass
        finally:
            await self.transport.aclose()

    async def _before_io(self) -> None:
        """What must happen before this stream's first read or write (nothing here)."""

    async def _send_end(self, description: AlertDescription) -> None:
        """``close_notify`` or a fatal alert, once; nothing is sent after it."""
        if description == AlertDescription.close_notify:
            record = self.session.close()
        else:
            record = self.session.alert(description)
        if record:
            await self.transport.send_all(record)
