"""The exported state of a TLS 1.3 session after its handshake: what a worker needs to
continue it, byte for byte (``docs/TLS.md``).  Pure encode/decode, strict on input.

All integers big-endian::

    version          u8    1
    suite            u16   IANA code (0x1301, 0x1302, 0x1303)
    client_sequence  u64   records already read under client_secret
    server_sequence  u64   records already written under server_secret (session tickets)
    expiry           u64   Unix seconds after which the worker ends the session
    context_id       16    random, for logs on both sides
    client_secret    u8 length + bytes   client_application_traffic_secret_0
    server_secret    u8 length + bytes   server_application_traffic_secret_0
    alpn             u8 length + bytes   the negotiated protocol, empty for none
    sni              u16 length + bytes  server name the client asked for (UTF-8), or empty
    peer             u16 length + bytes  client certificate's identity (JSON object), or empty
    unread           u32 length + bytes  ciphertext the acceptor read past the client's Finished

Nothing may follow.  The token is only ever seen sealed (``handoffd.core.seal``): this
layout is what the seal protects, not a wire format of its own.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Final

from handoffd.core.tls_keys import suite_by_code
from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSSError

__all__ = ["EXPORT_VERSION", "TlsExport"]

EXPORT_VERSION: Final = 1
_FIXED: Final = struct.Struct(">BHQQQ16s")
MAX_UNREAD: Final = 64 * 1024


def _invalid(why: str) -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TLS_STATE_INVALID, why)


@dataclass(frozen=True)
class TlsExport:
    """A TLS 1.3 session's state at the handoff (see the module docstring for its bytes)."""

    suite: int
    client_secret: bytes = field(repr=False)
    server_secret: bytes = field(repr=False)
    client_sequence: int
    server_sequence: int
    expiry: int
    context_id: bytes
    alpn: bytes = b""
    sni: str = ""
    peer: dict[str, object] = field(default_factory=dict)
    unread: bytes = field(default=b"", repr=False)

    def encode(self) -> bytes:
        suite = suite_by_code(self.suite)
        for name, secret in (("client", self.client_secret), ("server", self.server_secret)):
            if len(secret) != suite.hash_length:
                raise _invalid(f"{name} secret of {len(secret)} bytes for {suite.name}")
        if len(self.context_id) != 16:
            raise _invalid("context id is not 16 bytes")
        if len(self.unread) > MAX_UNREAD:
            raise _invalid(f"{len(self.unread)} unread bytes (at most {MAX_UNREAD})")
        peer = (
            json.dumps(self.peer, sort_keys=True, separators=(",", ":")).encode()
            if self.peer
            else b""
        )
        sni = self.sni.encode()
        if len(self.alpn) > 255 or len(sni) > 0xFFFF or len(peer) > 0xFFFF:
            raise _invalid("an ALPN, SNI or peer field is too long")
        return b"".join(
            (
                _FIXED.pack(
                    EXPORT_VERSION, self.suite, self.client_sequence, self.server_sequence,
                    self.expiry, self.context_id,
                ),
                bytes([len(self.client_secret)]), self.client_secret,
                bytes([len(self.server_secret)]), self.server_secret,
                bytes([len(self.alpn)]), self.alpn,
                struct.pack(">H", len(sni)), sni,
                struct.pack(">H", len(peer)), peer,
                struct.pack(">I", len(self.unread)), self.unread,
            )
        )  # fmt: skip

    @classmethod
    def decode(cls, blob: bytes) -> TlsExport:
        """Parse an export; any defect is ``GSS_S_DEFECTIVE_TOKEN`` / ``TLS_STATE_INVALID``."""
        reader = _Reader(blob)
        version, suite_code, client_seq, server_seq, expiry, context_id = reader.fixed(_FIXED)
        if version != EXPORT_VERSION:
            raise _invalid(f"export version {version}")
        suite = suite_by_code(suite_code)
        client_secret = reader.field(1)
        server_secret = reader.field(1)
        if len(client_secret) != suite.hash_length or len(server_secret) != suite.hash_length:
            raise _invalid(f"traffic secrets not {suite.hash_length} bytes for {suite.name}")
        alpn = reader.field(1)
        try:
            sni = reader.field(2).decode()
            peer_bytes = reader.field(2)
            peer = json.loads(peer_bytes) if peer_bytes else {}
        except (UnicodeDecodeError, ValueError):
            raise _invalid("SNI or peer identity is not UTF-8 JSON") from None
        if not isinstance(peer, dict):
            raise _invalid("peer identity is not a JSON object")
        unread = reader.field(4)
        if len(unread) > MAX_UNREAD:
            raise _invalid(f"{len(unread)} unread bytes (at most {MAX_UNREAD})")
        reader.end()
        return cls(
            suite=suite_code, client_secret=client_secret, server_secret=server_secret,
            client_sequence=client_seq, server_sequence=server_seq, expiry=expiry,
            context_id=context_id, alpn=alpn, sni=sni, peer=peer, unread=unread,
        )  # fmt: skip


class _Reader:
    def __init__(self, blob: bytes) -> None:
        self._blob = blob
        self._at = 0

    def fixed(self, layout: struct.Struct) -> tuple[Any, ...]:
        if len(self._blob) - self._at < layout.size:
            raise _invalid("truncated")
        values = layout.unpack_from(self._blob, self._at)
        self._at += layout.size
        return values

    def field(self, length_bytes: int) -> bytes:
        if len(self._blob) - self._at < length_bytes:
            raise _invalid("truncated")
        length = int.from_bytes(self._blob[self._at : self._at + length_bytes], "big")
        self._at += length_bytes
        if len(self._blob) - self._at < length:
            raise _invalid("truncated")
        value = self._blob[self._at : self._at + length]
        self._at += length
        return value

    def end(self) -> None:
        if self._at != len(self._blob):
            raise _invalid(f"{len(self._blob) - self._at} bytes after the last field")
