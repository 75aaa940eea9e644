"""The TLS 1.3 record layer after the handshake, as a sans-I/O session (RFC 8446 §5, §6, §4.6.3).

The acceptor's OpenSSL finishes the handshake; a worker continues the session from the
suite, one application traffic secret per direction and both sequence numbers.  This
module is everything the worker then needs, with no I/O: bytes from the socket go into
:meth:`TlsRecordSession.receive_data`, which returns events; :meth:`send`,
:meth:`key_update`, :meth:`close` and :meth:`alert` return bytes for the socket.

What it enforces, each answered with the alert RFC 8446 names:

* records: outer type application_data only (a change_cipher_spec or plaintext record
  after the handshake is ``unexpected_message``), ciphertext at most 2^14 + 256 bytes and
  inner plaintext (padding included) at most 2^14 + 1 (``record_overflow``), a record
  that fails authentication under the current key (``bad_record_mac``: tampered, or
  sent under a key this side does not hold), inner plaintext of zeros only, and zero-length
  handshake or alert fragments (``unexpected_message``);
* alerts: exactly two bytes (``decode_error``); ``close_notify`` ends the stream
  (:class:`PeerClosed`; anything after it is ignored, §6.1); ``user_canceled`` is
  ignored; any other alert is fatal whatever its level (§6);
* post-handshake handshake messages: KeyUpdate (``update_requested`` answered by a
  KeyUpdate of this side's own before its next record, §4.6.3), which must end its
  record (§5.1); a server refuses every other message (NewSessionTicket from a client,
  post-handshake authentication it never asked for) with ``unexpected_message``; a
  client ignores NewSessionTicket (it does not resume).  A handshake message split over
  records with another record type in between is ``unexpected_message``.

The sender updates its own key before the suite's per-key record limit
(:attr:`Suite.records_per_key`).  Failures are :class:`TlsAlert`, a :class:`GSSError`
carrying the alert to send (or none, when the peer's own alert ended the session).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Literal

from cryptography.exceptions import InvalidTag

from handoffd.core.tls_keys import AEAD, IV_LENGTH, Suite, TrafficKeys
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_BAD_SIG,
    GSS_S_CONTEXT_EXPIRED,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSSError,
)

__all__ = [
    "MAX_PLAINTEXT",
    "AlertDescription",
    "ApplicationData",
    "Event",
    "KeyUpdated",
    "PeerClosed",
    "TlsAlert",
    "TlsRecordSession",
]

CHANGE_CIPHER_SPEC: Final = 20
ALERT: Final = 21
HANDSHAKE: Final = 22
APPLICATION_DATA: Final = 23

_TYPE_BYTE: Final = tuple(bytes([t]) for t in range(256))  # no per-record allocation

MAX_PLAINTEXT: Final = 1 << 14
MAX_CIPHERTEXT: Final = MAX_PLAINTEXT + 256
TAG_LENGTH: Final = 16
HEADER: Final = struct.Struct(">BHH")
LEGACY_VERSION: Final = 0x0303
SEQUENCE_LIMIT: Final = (1 << 64) - 1

KEY_UPDATE: Final = 24
NEW_SESSION_TICKET: Final = 4
UPDATE_NOT_REQUESTED: Final = 0
UPDATE_REQUESTED: Final = 1
# Post-handshake messages larger than this are refused, not buffered: a KeyUpdate is 5
# bytes and a NewSessionTicket (client side only) a few hundred.
MAX_HANDSHAKE_MESSAGE: Final = 1 << 16


class AlertDescription(IntEnum):
    """The alerts this layer sends or names (RFC 8446 §6)."""

    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    access_denied = 49
    unknown_ca = 48
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    user_canceled = 90
    missing_extension = 109
    unsupported_extension = 110
    unrecognized_name = 112
    certificate_required = 116
    no_application_protocol = 120


def alert_name(description: int) -> str:
    try:
        return AlertDescription(description).name
    except ValueError:
        return f"alert {description}"


class TlsAlert(GSSError):
    """A TLS failure: a GSS status, plus the fatal alert to send the peer (None: send nothing)."""

    def __init__(self, alert: AlertDescription | None, major: int, minor: int, detail: str) -> None:
        super().__init__(major, minor, detail)
        self.alert = alert


def _fail(alert: AlertDescription, detail: str) -> TlsAlert:
    major, minor = _STATUS[alert]
    return TlsAlert(alert, major, minor, detail)


_STATUS: Final[dict[AlertDescription, tuple[int, Minor]]] = {
    AlertDescription.bad_record_mac: (GSS_S_BAD_SIG, Minor.TLS_BAD_RECORD_MAC),
    AlertDescription.record_overflow: (GSS_S_DEFECTIVE_TOKEN, Minor.TLS_RECORD_OVERFLOW),
    AlertDescription.unexpected_message: (GSS_S_DEFECTIVE_TOKEN, Minor.TLS_UNEXPECTED_MESSAGE),
    AlertDescription.decode_error: (GSS_S_DEFECTIVE_TOKEN, Minor.TLS_DECODE_ERROR),
    AlertDescription.illegal_parameter: (GSS_S_DEFECTIVE_TOKEN, Minor.TLS_ILLEGAL_PARAMETER),
    AlertDescription.internal_error: (GSS_S_CONTEXT_EXPIRED, Minor.SEQUENCE_EXHAUSTED),
}


@dataclass(frozen=True)
class ApplicationData:
    """Plaintext from the peer (never empty)."""

    data: bytes


@dataclass(frozen=True)
class PeerClosed:
    """The peer's ``close_notify``: the authenticated end of its stream."""


@dataclass(frozen=True)
class KeyUpdated:
    """The peer updated its sending key; ``requested``: it asked this side to update too
    (done by the next :meth:`TlsRecordSession.send`, or at once by :meth:`key_update`)."""

    requested: bool


Event = ApplicationData | PeerClosed | KeyUpdated


class _Direction:
    """One direction's keys, AEAD and sequence number."""

    def __init__(self, keys: TrafficKeys, sequence: int) -> None:
        self.keys = keys
        self.aead: AEAD = keys.suite.aead(keys.key)
        self.iv = int.from_bytes(keys.iv, "big")
        self.sequence = sequence

    def rekey(self) -> None:
        self.keys = self.keys.updated()
        self.aead = self.keys.suite.aead(self.keys.key)
        self.iv = int.from_bytes(self.keys.iv, "big")
        self.sequence = 0  # RFC 8446 §5.3: reset to zero with every key change

    def next_nonce(self) -> bytes:
        sequence = self.sequence
        if sequence >= SEQUENCE_LIMIT:
            raise _fail(
                AlertDescription.internal_error, "the record sequence number space is exhausted"
            )
        self.sequence = sequence + 1
        return (self.iv ^ sequence).to_bytes(IV_LENGTH, "big")  # RFC 8446 §5.3


class TlsRecordSession:
    """A TLS 1.3 session after its handshake, one side of it (sans-I/O).

    ``read_sequence``/``write_sequence`` are the records each direction has already
    protected under its current secret (the acceptor's NewSessionTicket records count
    against the server's write side).  Not thread-safe; one task reads, one writes.
    """

    def __init__(
        self,
        suite: Suite,
        read_secret: bytes,
        write_secret: bytes,
        read_sequence: int = 0,
        write_sequence: int = 0,
        *,
        role: Literal["server", "client"] = "server",
    ) -> None:
        self.suite = suite
        self.role = role
        self._read = _Direction(TrafficKeys.from_secret(suite, read_secret), read_sequence)
        self._write = _Direction(TrafficKeys.from_secret(suite, write_secret), write_sequence)
        self._inbuf = bytearray()
        self._handshake = bytearray()  # a post-handshake message split over records
        self._owe_key_update = False
        self.peer_closed = False
        self.closed = False  # this side sent close_notify or a fatal alert
        self.failed: TlsAlert | None = None

    # --- receiving ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the socket; returns the events of every complete record.

        Raises :class:`TlsAlert` on the first defect; the session is then failed and
        every later call raises the same error (send :meth:`alert` first).
        """
        if self.failed is not None:
            raise self.failed
        if self.peer_closed:
            return []  # RFC 8446 §6.1: data after close_notify is ignored
        self._inbuf += data
        events: list[Event] = []
        try:
            while not self.peer_closed:
                record = self._next_record()
                if record is None:
                    break
                events.extend(self._dispatch(*record))
        except TlsAlert as err:
            self.failed = err
            raise
        if self.peer_closed:
            self._inbuf.clear()
        return events

    @property
    def buffered(self) -> int:
        """Bytes received and not yet a whole record (a cut here is a truncation)."""
        return len(self._inbuf)

    def missing(self) -> int:
        """How many more bytes complete the record (or the record header) buffered so far;
        0 when no record is begun.  A kTLS handover reads exactly these first."""
        if not self._inbuf:
            return 0
        if len(self._inbuf) < HEADER.size:
            return HEADER.size - len(self._inbuf)
        length: int = HEADER.unpack_from(self._inbuf)[2]
        return HEADER.size + length - len(self._inbuf)

    def receive_plaintext(self, content_type: int, fragment: bytes) -> list[Event]:
        """A record the kernel (kTLS) already authenticated and decrypted: the same checks
        and events as :meth:`receive_data`, without the decryption."""
        if self.failed is not None:
            raise self.failed
        if self.peer_closed:
            return []
        try:
            return self._dispatch(content_type, fragment)
        except TlsAlert as err:
            self.failed = err
            raise

    @property
    def read_keys(self) -> tuple[TrafficKeys, int]:
        """The current read key and the sequence number of the next record it opens."""
        return self._read.keys, self._read.sequence

    @property
    def write_keys(self) -> tuple[TrafficKeys, int]:
        """The current write key and the sequence number of the next record it seals."""
        return self._write.keys, self._write.sequence

    def _next_record(self) -> tuple[int, bytes] | None:
        if len(self._inbuf) < HEADER.size:
            return None
        outer_type, _version, length = HEADER.unpack_from(self._inbuf)
        if outer_type != APPLICATION_DATA:
            what = (
                "change_cipher_spec" if outer_type == CHANGE_CIPHER_SPEC else f"type {outer_type}"
            )
            raise _fail(
                AlertDescription.unexpected_message,
                f"an unprotected {what} record after the handshake",
            )
        if length > MAX_CIPHERTEXT:
            raise _fail(
                AlertDescription.record_overflow,
                f"a {length}-byte record (at most {MAX_CIPHERTEXT})",
            )
        if len(self._inbuf) < HEADER.size + length:
            return None
        header = bytes(self._inbuf[: HEADER.size])
        body = bytes(self._inbuf[HEADER.size : HEADER.size + length])
        del self._inbuf[: HEADER.size + length]
        try:
            inner = self._read.aead.decrypt(self._read.next_nonce(), body, header)
        except InvalidTag:
            raise _fail(
                AlertDescription.bad_record_mac,
                "a record failed authentication (tampered, or under a key this side does not hold)",
            ) from None
        if len(inner) > MAX_PLAINTEXT + 1:
            raise _fail(AlertDescription.record_overflow, f"{len(inner)} bytes of inner plaintext")
        content = inner.rstrip(b"\x00")
        if not content:
            raise _fail(AlertDescription.unexpected_message, "a record with no content type")
        return content[-1], content[:-1]

    def _dispatch(self, content_type: int, fragment: bytes) -> list[Event]:
        if self._handshake and content_type != HANDSHAKE:
            raise _fail(
                AlertDescription.unexpected_message,
                "a record between the fragments of a handshake message",
            )
        if content_type == APPLICATION_DATA:
            return [ApplicationData(fragment)] if fragment else []
        if not fragment:
            raise _fail(
                AlertDescription.unexpected_message,
                f"a zero-length record of content type {content_type}",
            )
        if content_type == ALERT:
            return self._on_alert(fragment)
        if content_type == HANDSHAKE:
            return self._on_handshake(fragment)
        raise _fail(
            AlertDescription.unexpected_message,
            f"a protected record of content type {content_type}",
        )

    def _on_alert(self, fragment: bytes) -> list[Event]:
        if len(fragment) != 2:
            raise _fail(AlertDescription.decode_error, f"a {len(fragment)}-byte alert")
        description = fragment[1]
        if description == AlertDescription.close_notify:
            self.peer_closed = True
            return [PeerClosed()]
        if description == AlertDescription.user_canceled:
            return []  # followed by close_notify (§6.1)
        raise TlsAlert(
            None,
            GSS_S_FAILURE,
            Minor.TLS_ALERT_RECEIVED,
            f"the peer sent {alert_name(description)}",
        )

    def _on_handshake(self, fragment: bytes) -> list[Event]:
        self._handshake += fragment
        events: list[Event] = []
        while len(self._handshake) >= 4:
            msg_type = self._handshake[0]
            length = int.from_bytes(self._handshake[1:4], "big")
            if msg_type == KEY_UPDATE and length != 1:
                raise _fail(AlertDescription.decode_error, f"a KeyUpdate of {length} bytes")
            if msg_type not in self._acceptable_messages():
                raise _fail(
                    AlertDescription.unexpected_message, f"post-handshake message type {msg_type}"
                )
            if length > MAX_HANDSHAKE_MESSAGE:
                raise _fail(
                    AlertDescription.unexpected_message, f"a {length}-byte post-handshake message"
                )
            if len(self._handshake) < 4 + length:
                break
            body = bytes(self._handshake[4 : 4 + length])
            del self._handshake[: 4 + length]
            if msg_type == KEY_UPDATE:
                if self._handshake:
                    # §5.1: a message that changes keys must end its record
                    raise _fail(
                        AlertDescription.unexpected_message,
                        "a KeyUpdate not at the end of its record",
                    )
                events.append(self._on_key_update(body[0]))
            # NEW_SESSION_TICKET (client side only): not resumed, nothing to keep
        return events

    def _acceptable_messages(self) -> tuple[int, ...]:
        return (KEY_UPDATE,) if self.role == "server" else (KEY_UPDATE, NEW_SESSION_TICKET)

    def _on_key_update(self, request: int) -> KeyUpdated:
        if request not in (UPDATE_NOT_REQUESTED, UPDATE_REQUESTED):
            raise _fail(AlertDescription.illegal_parameter, f"KeyUpdate request_update {request}")
        self._read.rekey()
        if request == UPDATE_REQUESTED and not self.closed:
            self._owe_key_update = True
        return KeyUpdated(requested=request == UPDATE_REQUESTED)

    # --- sending --------------------------------------------------------------------

    def send(self, data: bytes) -> bytes:
        """Records carrying ``data`` (fragmented at 2^14), preceded by any KeyUpdate owed."""
        if (
            len(data) <= MAX_PLAINTEXT
            and not self.closed
            and not self._owe_key_update
            and self._write.sequence < self.suite.records_per_key
        ):
            return self._seal(APPLICATION_DATA, data) if data else b""  # the common case
        self._check_can_send()
        out = bytearray(self._pending_key_update())
        view = memoryview(data)
        for start in range(0, len(data), MAX_PLAINTEXT):
            if self._write.sequence >= self.suite.records_per_key:
                out += self._key_update_record(request_peer=False)
            out += self._seal(APPLICATION_DATA, bytes(view[start : start + MAX_PLAINTEXT]))
        return bytes(out)

    def key_update(self, request_peer: bool) -> bytes:
        """A KeyUpdate record (this side's key changes after it); ``request_peer`` asks
        the peer to update its own key too (``update_requested``)."""
        self._check_can_send()
        self._owe_key_update = False
        return self._key_update_record(request_peer)

    def close(self) -> bytes:
        """``close_notify`` (once; after it nothing more is sent)."""
        if self.closed:
            return b""
        record = self._pending_key_update() + self._seal(
            ALERT, bytes([1, AlertDescription.close_notify])
        )
        self.closed = True
        return record

    def alert(self, description: AlertDescription) -> bytes:
        """A fatal alert record (RFC 8446 §6.2); the session sends nothing after it.

        Sent under the current write key, as every record after the handshake is.
        """
        if self.closed:
            return b""
        self.closed = True
        try:
            return self._seal(ALERT, bytes([2, description]))
        except TlsAlert:
            return b""

    @property
    def owes_key_update(self) -> bool:
        """The peer asked for a KeyUpdate that has not been sent yet."""
        return self._owe_key_update

    def key_update_message(self, request_peer: bool) -> bytes:
        """A KeyUpdate handshake message in the clear, for a record the kernel seals; this
        side's write key changes now (settles any KeyUpdate owed to the peer)."""
        self._check_can_send()
        self._owe_key_update = False
        self._write.rekey()
        return bytes([KEY_UPDATE, 0, 0, 1, UPDATE_REQUESTED if request_peer else 0])

    def end_fragment(self, description: AlertDescription) -> bytes:
        """An alert's two bytes in the clear, for a record the kernel seals:
        ``close_notify`` (warning) or a fatal alert; nothing is sent after it (b"" when
        this side already ended the session)."""
        if self.closed:
            return b""
        self.closed = True
        level = 1 if description == AlertDescription.close_notify else 2
        return bytes([level, description])

    def _check_can_send(self) -> None:
        if self.closed:
            raise GSSError(
                GSS_S_FAILURE, Minor.TLS_SESSION_CLOSED, "close_notify or an alert was already sent"
            )

    def _pending_key_update(self) -> bytes:
        if not self._owe_key_update:
            return b""
        self._owe_key_update = False
        return self._key_update_record(request_peer=False)

    def _key_update_record(self, request_peer: bool) -> bytes:
        request = UPDATE_REQUESTED if request_peer else UPDATE_NOT_REQUESTED
        record = self._seal(HANDSHAKE, bytes([KEY_UPDATE, 0, 0, 1, request]))
        self._write.rekey()
        return record

    def _seal(self, content_type: int, fragment: bytes, padding: int = 0) -> bytes:
        # The per-record path, kept flat: Python's call overhead is what separates a record
        # from the bare AEAD call (bench/wrap.py's tls_record figures).
        w = self._write
        sequence = w.sequence
        if sequence >= SEQUENCE_LIMIT:
            raise _fail(
                AlertDescription.internal_error, "the record sequence number space is exhausted"
            )
        w.sequence = sequence + 1
        nonce = (w.iv ^ sequence).to_bytes(IV_LENGTH, "big")  # RFC 8446 §5.3
        inner = fragment + _TYPE_BYTE[content_type] + (bytes(padding) if padding else b"")
        header = HEADER.pack(APPLICATION_DATA, LEGACY_VERSION, len(inner) + TAG_LENGTH)
        return header + w.aead.encrypt(nonce, inner, header)
