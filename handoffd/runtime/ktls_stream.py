"""A handed-off TLS session whose records the kernel writes and reads (kTLS).

:class:`KernelTlsStream` is a :class:`TlsStream` that, on its first read or write, moves
the session into the kernel: it first finishes in userspace what the acceptor read past
the client's Finished (``unread``: whole records, and the rest of a record cut in the
middle, read exactly), then installs the ``tls`` ULP with the session's current keys and
sequence numbers (:mod:`handoffd.kernel.ktls`).  From then on ``send`` takes plaintext and
``recvmsg`` returns decrypted records with their content type; alerts and post-handshake
messages go through the same checks as in userspace
(:meth:`TlsRecordSession.receive_plaintext`), and every alert this side sends is a record
the kernel seals (``TLS_SET_RECORD_TYPE``).

KeyUpdate: where the kernel can take a new key (:attr:`KtlsSupport.rekey`) the new read
key, and after our own KeyUpdate the new write key, are installed again.  Where it cannot
(Linux before 6.14), a KeyUpdate ends the session with ``internal_error``: the next
record would be under a key the kernel does not have.  ``[tls] ktls = "auto"`` therefore
moves sessions into the kernel only where it can rekey; ``"on"`` also where it cannot.
A session that ends, fails or owes a KeyUpdate before the move stays in userspace.
"""

from __future__ import annotations

import errno
import logging
from enum import Enum
from typing import Literal

import trio

from handoffd.core.tls_record import (
    ALERT,
    APPLICATION_DATA,
    HANDSHAKE,
    MAX_PLAINTEXT,
    AlertDescription,
    KeyUpdated,
    TlsAlert,
    TlsRecordSession,
)
from handoffd.kernel import ktls
from handoffd.minor import Minor
from handoffd.runtime.tls_stream import TlsStream
from handoffd.status import GSS_S_CONTEXT_EXPIRED, GSS_S_FAILURE, GSS_S_UNAVAILABLE, GSSError

log = logging.getLogger("handoffd.worker")

KtlsMode = Literal["auto", "on", "off"]
_READ_SIZE = 64 * 1024
# recvmsg errors of a kTLS socket and the alert RFC 8446 names for each.
_RECEIVE_ERRORS = {
    errno.EBADMSG: (AlertDescription.bad_record_mac, "a record failed authentication"),
    errno.EMSGSIZE: (AlertDescription.record_overflow, "a record exceeds 2^14 bytes"),
}


class _Where(Enum):
    PENDING = "pending"  # not read or written yet
    KERNEL = "kernel"
    USERSPACE = "userspace"


def kernel_wanted(mode: KtlsMode, suite: int, support: ktls.KtlsSupport) -> bool:
    """Whether a session of ``suite`` moves into the kernel under ``[tls] ktls = mode``."""
    if mode == "off" or not support.takes(suite):
        return False
    return support.rekey or mode == "on"


class KernelTlsStream(TlsStream):
    """:class:`TlsStream` with its records in the kernel after the first read or write."""

    def __init__(self, transport: trio.SocketStream, session: TlsRecordSession, *,
                 support: ktls.KtlsSupport, unread: bytes = b"", expiry: float | None = None,
                 info: dict[str, object] | None = None) -> None:
        super().__init__(transport, session, unread=unread, expiry=expiry, info=info)
        self._socket = transport.socket
        self._support = support
        self._where = _Where.PENDING
        self._settling = trio.Lock()
        # Upper bound on the records the kernel sealed under the current write key: one
        # per started 2^14 bytes of each send (the kernel never merges two sends).
        self._records_sealed = 0
        self.info["ktls"] = False

    # --- the move into the kernel ---------------------------------------------------

    async def _settle(self) -> None:
        if self._where is not _Where.PENDING:
            return
        async with self._settling:
            if self._where is not _Where.PENDING:
                return
            self._where = _Where.USERSPACE  # unless everything below succeeds
            await self._finish_unread()
            session = self.session
            if session.owes_key_update and not session.closed:
                async with self._send_lock:
                    await self.transport.send_all(session.send(b""))
            if session.peer_closed or session.failed is not None or session.closed:
                return
            self._install()

    async def _finish_unread(self) -> None:
        """Whole records of ``unread`` in userspace; a cut record completed from the socket
        with exact reads (the kernel must start at a record boundary)."""
        chunk, self._unread = self._unread, b""
        while True:
            if chunk:
                self._apply(self.session.receive_data(chunk))
            need = self.session.missing()
            if not need or self.session.peer_closed:
                return
            chunk = bytes(await self.transport.receive_some(need))
            if not chunk:
                raise GSSError(GSS_S_FAILURE, Minor.STREAM_TRUNCATED,
                               "connection closed inside a TLS record")

    def _install(self) -> None:
        write_keys, write_sequence = self.session.write_keys
        read_keys, read_sequence = self.session.read_keys
        try:
            ktls.install_ulp(self._socket)
            ktls.install_tx(self._socket, write_keys, write_sequence)
        except OSError as error:
            # Nothing sealed by the kernel yet: the socket is still plain TCP.
            log.warning("kTLS not installed (%s): the session stays in userspace", error)
            return
        try:
            ktls.install_rx(self._socket, read_keys, read_sequence)
        except OSError as error:
            raise GSSError(GSS_S_FAILURE, Minor.TLS_KTLS_FAILED,
                           f"TLS_RX refused after TLS_TX: {error}") from None
        self._where = _Where.KERNEL
        self.info["ktls"] = True

    # --- the stream -----------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self.session.closed:
            raise trio.ClosedResourceError(
                "stream is closed" if self._closed else "close_notify already sent")
        await self._settle()
        if self._where is not _Where.KERNEL:
            await super().send_all(data)
            return
        self._check_expiry()
        async with self._send_lock:
            if self.session.owes_key_update:
                await self._send_key_update(request_peer=False)
            records = -(-len(data) // MAX_PLAINTEXT)
            if self._records_sealed + records > self.session.suite.records_per_key:
                await self._send_key_update(request_peer=False)
            self._records_sealed += records
            await self.transport.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        await self._settle()
        if self._where is not _Where.KERNEL:
            return await super().receive_some(max_bytes)
        while not self._plain and not self._eof:
            self._check_expiry()
            try:
                data, ancillary, _flags, _address = await self._socket.recvmsg(
                    _READ_SIZE, ktls.RECORD_TYPE_CMSG_SPACE)
            except OSError as error:
                raise self._receive_error(error) from None
            content_type = ktls.record_type(ancillary, APPLICATION_DATA)
            if not data and content_type == APPLICATION_DATA:
                raise GSSError(GSS_S_FAILURE, Minor.STREAM_TRUNCATED,
                               "connection closed before close_notify")
            events = self.session.receive_plaintext(content_type, data)
            self._apply(events)
            if any(isinstance(event, KeyUpdated) for event in events):
                await self._on_peer_key_update()
        return self._take(max_bytes)

    def _receive_error(self, error: OSError) -> GSSError:
        alert, why = _RECEIVE_ERRORS.get(error.errno or 0, (None, ""))
        if alert is None:
            return GSSError(GSS_S_FAILURE, Minor.TLS_KTLS_FAILED, f"kTLS receive: {error}")
        major, minor = ((GSS_S_FAILURE, Minor.TLS_BAD_RECORD_MAC)
                        if alert == AlertDescription.bad_record_mac
                        else (GSS_S_FAILURE, Minor.TLS_RECORD_OVERFLOW))
        failure = TlsAlert(alert, major, minor, f"{why} (kernel TLS: {error.strerror})")
        self.session.failed = failure
        return failure

    async def _on_peer_key_update(self) -> None:
        if not self._support.rekey:
            failure = TlsAlert(
                AlertDescription.internal_error, GSS_S_UNAVAILABLE, Minor.TLS_KTLS_NO_REKEY,
                "the client sent a KeyUpdate on a session in the kernel, which cannot take "
                "a new key (Linux < 6.14; [tls] ktls = \"auto\" keeps sessions in userspace "
                "on such kernels)")
            self.session.failed = failure
            raise failure
        read_keys, _ = self.session.read_keys
        ktls.install_rx(self._socket, read_keys, 0)
        if self.session.owes_key_update:
            async with self._send_lock:
                if self.session.owes_key_update and not self.session.closed:
                    await self._send_key_update(request_peer=False)

    async def _send_key_update(self, request_peer: bool) -> None:
        """Our KeyUpdate, sealed by the kernel under the old key, then the new key."""
        if not self._support.rekey:
            raise GSSError(GSS_S_CONTEXT_EXPIRED, Minor.TLS_KTLS_NO_REKEY,
                           "the write key is due for a KeyUpdate the kernel cannot take")
        message = self.session.key_update_message(request_peer)
        await self._send_record(HANDSHAKE, message)
        write_keys, _ = self.session.write_keys
        ktls.install_tx(self._socket, write_keys, 0)
        self._records_sealed = 0

    async def _send_record(self, content_type: int, fragment: bytes) -> None:
        await self._socket.sendmsg([fragment], [ktls.type_cmsg(content_type)])

    async def _before_io(self) -> None:
        await self._settle()

    async def _send_end(self, description: AlertDescription) -> None:
        if self._where is not _Where.KERNEL:
            await super()._send_end(description)
            return
        fragment = self.session.end_fragment(description)
        if fragment:
            await self._send_record(ALERT, fragment)
