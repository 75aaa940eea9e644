"""TLS 1.3 cipher suites and the part of the key schedule a record layer needs (RFC 8446 §7).

The acceptor's OpenSSL runs the handshake; what crosses to a worker is a cipher suite
and one *application traffic secret* per direction.  From a secret this module derives
the record key and IV (§7.3), and the next secret when either side sends a KeyUpdate
(§7.2).  Pure: no I/O, no state beyond the frozen values it returns.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from handoffd.minor import Minor
from handoffd.status import GSS_S_BAD_MECH, GSS_S_DEFECTIVE_TOKEN, GSSError

__all__ = ["SUITES", "Suite", "TrafficKeys", "hkdf_expand_label", "suite_by_code"]

AEAD = AESGCM | ChaCha20Poly1305


@dataclass(frozen=True)
class Suite:
    """One TLS 1.3 cipher suite: its IANA code, name, AEAD, key length and hash.

    ``records_per_key`` is how many records one key may protect before the sender
    must update it: RFC 8446 §5.5 bounds AES-GCM at 2^24.5 full records; ChaCha20-Poly1305
    has no such bound short of the 64-bit sequence number, so it is given the same
    margin below that.
    """

    code: int
    name: str
    key_length: int
    hash_name: str
    records_per_key: int

    def hash(self) -> hashes.HashAlgorithm:
        return hashes.SHA384() if self.hash_name == "sha384" else hashes.SHA256()

    @property
    def hash_length(self) -> int:
        return 48 if self.hash_name == "sha384" else 32

    def aead(self, key: bytes) -> AEAD:
        if self.code == 0x1303:
            return ChaCha20Poly1305(key)
        return AESGCM(key)


SUITES: Final[dict[int, Suite]] = {
    s.code: s
    for s in (
        Suite(0x1301, "TLS_AES_128_GCM_SHA256", 16, "sha256", 1 << 24),
        Suite(0x1302, "TLS_AES_256_GCM_SHA384", 32, "sha384", 1 << 24),
        Suite(0x1303, "TLS_CHACHA20_POLY1305_SHA256", 32, "sha256", 1 << 62),
    )
}
IV_LENGTH: Final = 12


def suite_by_code(code: int) -> Suite:
    """The suite for an IANA code; any other is ``GSS_S_BAD_MECH`` / ``TLS_SUITE_UNSUPPORTED``."""
    try:
        return SUITES[code]
    except KeyError:
        raise GSSError(
            GSS_S_BAD_MECH, Minor.TLS_SUITE_UNSUPPORTED, f"cipher suite 0x{code:04x}"
        ) from None


def hkdf_expand_label(
    suite: Suite, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1) under the suite's hash."""
    full_label = b"tls13 " + label
    info = (
        struct.pack(">HB", length, len(full_label)) + full_label + bytes([len(context)]) + context
    )
    return HKDFExpand(suite.hash(), length, info).derive(secret)


@dataclass(frozen=True)
class TrafficKeys:
    """One direction's application traffic secret and the key and IV derived from it."""

    suite: Suite
    secret: bytes
    key: bytes
    iv: bytes

    @classmethod
    def from_secret(cls, suite: Suite, secret: bytes) -> TrafficKeys:
        if len(secret) != suite.hash_length:
            raise GSSError(
                GSS_S_DEFECTIVE_TOKEN,
                Minor.TLS_STATE_INVALID,
                f"a {suite.name} traffic secret is {suite.hash_length} bytes, not {len(secret)}",
            )
        key = hkdf_expand_label(suite, secret, b"key", b"", suite.key_length)
        iv = hkdf_expand_label(suite, secret, b"iv", b"", IV_LENGTH)
        return cls(suite, secret, key, iv)

    def updated(self) -> TrafficKeys:
        """application_traffic_secret_N+1 (RFC 8446 §7.2), after a KeyUpdate."""
        nxt = hkdf_expand_label(
            self.suite, self.secret, b"traffic upd", b"", self.suite.hash_length
        )
        return TrafficKeys.from_secret(self.suite, nxt)

    def nonce(self, sequence: int) -> bytes:
        """The per-record nonce (RFC 8446 §5.3): the IV XOR the 64-bit sequence number."""
        return (int.from_bytes(self.iv, "big") ^ sequence).to_bytes(IV_LENGTH, "big")
