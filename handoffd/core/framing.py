"""Bytes on the client connection: frames, the mechanism-tagged first token, error reports.

Everything between a client and handoffd travels in frames (``docs/PROTOCOL.md``)::

    type (u8) | length (u32 big-endian) | body (length bytes)

``HANDSHAKE`` frames carry mechanism tokens, ``MESSAGE`` frames per-message
tokens, ``ERROR`` a GSS status (major u32, minor u32, both big-endian) sent
before closing, ``CLOSE`` the end of the sender's stream (its body is a MIC token,
so that nobody on the path can forge a clean end: ``docs/PROTOCOL.md``).

The client's first handshake token is wrapped as RFC 2743 §3.1 prescribes
(``0x60``, DER length, the mechanism OID, the inner token) so that the
acceptor can tell mechanisms apart; handoffd's Noise mechanism is
:data:`MECH_OID`, a UUID-based OID (``2.25.<uuid as integer>``, X.667).
:class:`FrameDecoder` is sans-I/O: feed it bytes, take frames out; what it has
not consumed is :meth:`FrameDecoder.unread`, which travels with the exported
context so no byte a client pipelined is lost.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from handoffd.minor import Minor
from handoffd.status import GSS_S_BAD_MECH, GSS_S_DEFECTIVE_TOKEN, GSSError

__all__ = [
    "CLOSE_MIC_MESSAGE",
    "FRAME_HEADER_SIZE",
    "MAX_FRAME",
    "MECH_OID",
    "MECH_OID_DER",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "decode_error",
    "encode_error",
    "encode_frame",
    "encode_oid",
    "unwrap_first_token",
    "wrap_first_token",
]

MECH_OID: Final = "2.25.225041400964563648380695906358058613570"
"""handoffd's Noise XX mechanism (UUID a94d65b4-6f0b-458e-81c9-1e4df574fb42)."""

FRAME_HEADER_SIZE: Final = 5
MAX_FRAME: Final = 1024 * 1024
"""Default cap on a frame body: far above a 16 KiB message token, far below memory trouble."""

CLOSE_MIC_MESSAGE: Final = b"handoffd CLOSE"
"""What a CLOSE frame's MIC token covers.  A MIC token cannot be retyped into a wrap
token (its TOK_ID is authenticated), and it takes the next sequence number, so a CLOSE
cannot be forged, replayed, or moved in front of data the sender sent before it."""

_HEADER = struct.Struct(">BI")
_ERROR = struct.Struct(">II")


class FrameType(enum.IntEnum):
    """The frame types; any other value is a defective token."""

    HANDSHAKE = 1
    MESSAGE = 2
    ERROR = 3
    CLOSE = 4


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    body: bytes


def _defective(minor: Minor, detail: str) -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, minor, detail)


def encode_frame(frame_type: FrameType, body: bytes) -> bytes:
    """The frame's bytes: header and body."""
    return _HEADER.pack(frame_type, len(body)) + body


class FrameDecoder:
    """Incremental frame parser with a bound on the body size.

    A defect (unknown type, body over ``max_frame``, a CLOSE without a body)
    raises ``GSS_S_DEFECTIVE_TOKEN`` and leaves the buffer as it was.
    """

    __slots__ = ("_buffer", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        if len(self._buffer) < FRAME_HEADER_SIZE:
            return None
        raw_type, length = _HEADER.unpack_from(self._buffer)
        try:
            frame_type = FrameType(raw_type)
        except ValueError:
            raise _defective(Minor.TOKEN_BAD_TYPE,
                             f"frame type {raw_type}{_what_arrived(self._buffer)}") from None
        if length > self.max_frame:
            raise _defective(Minor.TOKEN_TOO_LARGE,
                             f"frame of {length} bytes (limit {self.max_frame})")
        if frame_type == FrameType.CLOSE and not length:
            raise _defective(Minor.TOKEN_BAD_FRAMING, "CLOSE frame without its MIC token")
        if frame_type == FrameType.ERROR and length != _ERROR.size:
            raise _defective(Minor.TOKEN_BAD_FRAMING, "ERROR frame body is 8 bytes")
        end = FRAME_HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[FRAME_HEADER_SIZE:end])
        del self._buffer[:end]
        return Frame(frame_type, body)

    def unread(self) -> bytes:
        """Bytes fed but not yet returned as frames."""
        return bytes(self._buffer)


def encode_error(major: int, minor: int) -> bytes:
    """An ERROR frame body; statuses only, never detail text (it could leak state)."""
    return _ERROR.pack(major & 0xFFFFFFFF, minor & 0xFFFFFFFF)


def decode_error(body: bytes) -> tuple[int, int]:
    """(major, minor) from an ERROR frame body."""
    if len(body) != _ERROR.size:
        raise _defective(Minor.TOKEN_BAD_FRAMING, "ERROR frame body is 8 bytes")
    major, minor = _ERROR.unpack(body)
    return int(major), int(minor)


# --- RFC 2743 §3.1 mechanism-independent token framing ---------------------------


def encode_oid(dotted: str) -> bytes:
    """The DER contents octets of an OBJECT IDENTIFIER (no tag or length)."""
    arcs = [int(part) for part in dotted.split(".")]
    first = 40 * arcs[0] + arcs[1]
    out = bytearray()
    for arc in (first, *arcs[2:]):
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


MECH_OID_DER: Final = b"\x06" + bytes([len(encode_oid(MECH_OID))]) + encode_oid(MECH_OID)
"""Tag, length and contents of :data:`MECH_OID`, as they open the first token."""


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def wrap_first_token(inner: bytes, oid_der: bytes = MECH_OID_DER) -> bytes:
    """``0x60 | DER length | OID | inner``: the initiator's first token."""
    body = oid_der + inner
    return b"\x60" + _der_length(len(body)) + body


def read_first_token(token: bytes) -> tuple[bytes, bytes]:
    """Split a first token into (OID tag+length+contents, inner token); strict DER."""
    if len(token) < 2 or token[0] != 0x60:
        raise _defective(Minor.TOKEN_BAD_FRAMING, "first token does not start with 0x60")
    first = token[1]
    if first < 0x80:
        length, offset = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(token) < 2 + count:
            raise _defective(Minor.TOKEN_BAD_FRAMING, "first token length")
        length = int.from_bytes(token[2:2 + count], "big")
        offset = 2 + count
        if length < 0x80 or token[2] == 0:
            raise _defective(Minor.TOKEN_BAD_FRAMING, "first token length is not minimal DER")
    if len(token) - offset != length:
        raise _defective(Minor.TOKEN_BAD_FRAMING, "first token length does not match")
    if length < 2 or token[offset] != 0x06:
        raise _defective(Minor.TOKEN_BAD_FRAMING, "first token has no mechanism OID")
    oid_len = token[offset + 1]
    if oid_len >= 0x80 or length < 2 + oid_len:
        raise _defective(Minor.TOKEN_BAD_FRAMING, "mechanism OID length")
    oid_end = offset + 2 + oid_len
    return bytes(token[offset:oid_end]), bytes(token[oid_end:])


def unwrap_first_token(token: bytes, oid_der: bytes = MECH_OID_DER) -> bytes:
    """The inner token of a first token for ``oid_der``; another mechanism is BAD_MECH."""
    oid, inner = read_first_token(token)
    if oid != oid_der:
        raise GSSError(GSS_S_BAD_MECH, Minor.TOKEN_BAD_MECH_OID,
                       "the client asked for another mechanism")
    return inner


_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                 b"CONNECT ", b"PRI * HTTP/2")


def _what_arrived(head: bytes | bytearray) -> str:
    """Name the usual wrong protocol, so an operator sees it in one log line: a browser
    or curl speaking plain HTTP or TLS to a handoffd port."""
    if head.startswith(_HTTP_METHODS):
        line = bytes(head[:head.find(b"\r")] if b"\r" in head else head[:40])
        return f": plain HTTP arrived ({line[:60].decode('ascii', 'replace')!r}), not handoffd"
    if len(head) >= 3 and head[0] == 0x16 and head[1] == 0x03:
        return ": a TLS ClientHello arrived, not handoffd (TLS clients need a [tls] listener)"
    return ""
