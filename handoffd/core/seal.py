"""The sealed handoff token: an exported context, encrypted for one worker.

Pure: no clock, no randomness, no I/O - the caller passes the key, the nonce
and the time.  Byte layout (all integers big-endian; also in
``docs/HANDOFF.md``, "Sealed export token")::

    offset  size  field
         0     1  version        0x01
         1     2  mechanism      (u16, e.g. 1 = Noise)
         3     8  expires_at     (u64, seconds since the epoch)
        11    16  worker_id      the one worker the token is for
        27    12  nonce
        39     n  ciphertext     ChaCha20-Poly1305(key, nonce, plaintext, aad=bytes 0..38)
      39+n    16  tag

The whole 39-byte header is the AEAD's associated data, so version, mechanism,
target worker, expiry and nonce are all authenticated.

Why ChaCha20-Poly1305: every token is sealed with a fresh 32-byte key taken
from a parking slot (one key, one token), so nonce reuse cannot happen and the
nonce-misuse resistance of AES-GCM-SIV buys nothing; a random 96-bit nonce is
still used so that a key accidentally reused stays safe for a handful of
tokens.  ChaCha20-Poly1305 is constant-time without AES-NI (aarch64 boards,
small VMs), is the cipher of the Noise suite already in use, and is in every
``cryptography`` build (GCM-SIV needs OpenSSL 3.2+).

What is reported, and when: *nothing* is reported before the tag verifies.
Every failure to parse or authenticate (short, unknown version, flipped bit,
wrong key) is the one opaque ``GSSError(GSS_S_DEFECTIVE_TOKEN,
EXPORT_TOKEN_INVALID)``, Fernet style: an unauthenticated header is attacker
controlled, so naming which field was "wrong" would both lie (a forged expiry
would read as "expired") and hand a prober an oracle.  Only after
authentication do the header's claims mean anything, and then the specific
errors are reported: ``EXPORT_TOKEN_WRONG_WORKER`` (the acceptor really
sealed this for another worker: a routing bug worth its own code) and
``GSS_S_CONTEXT_EXPIRED``/``EXPORT_TOKEN_EXPIRED``.  With key parking a token
for another worker is normally opened with the wrong key and therefore is
``EXPORT_TOKEN_INVALID``; ``WRONG_WORKER`` needs the right key and the wrong id.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_BAD_MECH,
    GSS_S_CALL_BAD_STRUCTURE,
    GSS_S_CONTEXT_EXPIRED,
    GSS_S_DEFECTIVE_TOKEN,
    GSSError,
)

__all__ = [
    "HEADER_SIZE",
    "KEY_SIZE",
    "NONCE_SIZE",
    "OVERHEAD",
    "VERSION",
    "WORKER_ID_SIZE",
    "open_sealed",
    "seal",
]

VERSION: Final = 1
KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
WORKER_ID_SIZE: Final = 16
TAG_SIZE: Final = 16
_HEADER: Final = struct.Struct(">BHQ16s12s")
HEADER_SIZE: Final = _HEADER.size  # 39
OVERHEAD: Final = HEADER_SIZE + TAG_SIZE
MAX_PLAINTEXT: Final = 1 << 24
"""Exported contexts are a few hundred bytes plus unread client bytes; 16 MiB is generous."""


def _bad_call(what: str) -> GSSError:
    return GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.TOKEN_BAD_FIELD, f"seal: {what}")


def _invalid() -> GSSError:
    # The one opaque error: no detail, whatever went wrong.
    return GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.EXPORT_TOKEN_INVALID)


def seal(key: bytes, *, plaintext: bytes, mech: int, worker_id: bytes, expires_at: int,
         nonce: bytes) -> bytes:
    """Encrypt ``plaintext`` for ``worker_id`` until ``expires_at``; the token.

    ``key`` is the 32-byte parked key, ``nonce`` 12 random bytes from the caller.
    Bad arguments raise ``GSSError(GSS_S_CALL_BAD_STRUCTURE, TOKEN_BAD_FIELD)``.
    """
    if len(key) != KEY_SIZE:
        raise _bad_call("key must be 32 bytes")
    if len(nonce) != NONCE_SIZE:
        raise _bad_call("nonce must be 12 bytes")
    if len(worker_id) != WORKER_ID_SIZE:
        raise _bad_call("worker id must be 16 bytes")
    if not 0 <= mech <= 0xFFFF:
        raise _bad_call("mechanism out of range")
    if not 0 <= expires_at <= 0xFFFF_FFFF_FFFF_FFFF:
        raise _bad_call("expiry out of range")
    if len(plaintext) > MAX_PLAINTEXT:
        raise _bad_call("plaintext too large")
    header = _HEADER.pack(VERSION, mech, expires_at, worker_id, nonce)
    return header + ChaCha20Poly1305(key).encrypt(nonce, plaintext, header)


def open_sealed(key: bytes, token: bytes, *, worker_id: bytes, now: float,
                mech: int | None = None) -> bytes:
    """Authenticate and decrypt a token sealed for ``worker_id``; the plaintext.

    Raises ``GSSError``: ``(GSS_S_DEFECTIVE_TOKEN, EXPORT_TOKEN_INVALID)`` for any
    decode or authentication failure (no detail), then, only once authenticated,
    ``(GSS_S_DEFECTIVE_TOKEN, EXPORT_TOKEN_WRONG_WORKER)``,
    ``(GSS_S_CONTEXT_EXPIRED, EXPORT_TOKEN_EXPIRED)`` when ``now >= expires_at``,
    and ``(GSS_S_BAD_MECH, EXPORT_TOKEN_INVALID)`` when ``mech`` is given and differs.
    """
    if len(key) != KEY_SIZE:
        raise _bad_call("key must be 32 bytes")
    if len(token) < OVERHEAD or len(token) > OVERHEAD + MAX_PLAINTEXT:
        raise _invalid()
    header = token[:HEADER_SIZE]
    version, sealed_mech, expires_at, sealed_for, nonce = _HEADER.unpack(header)
    if version != VERSION:
        raise _invalid()
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, token[HEADER_SIZE:], header)
    except InvalidTag:
        raise _invalid() from None
    # Authenticated from here on: the header's claims are the acceptor's.
    if sealed_for != worker_id:
        raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.EXPORT_TOKEN_WRONG_WORKER)
    if now >= expires_at:
        raise GSSError(GSS_S_CONTEXT_EXPIRED, Minor.EXPORT_TOKEN_EXPIRED)
    if mech is not None and sealed_mech != mech:
        raise GSSError(GSS_S_BAD_MECH, Minor.EXPORT_TOKEN_INVALID)
    return plaintext
