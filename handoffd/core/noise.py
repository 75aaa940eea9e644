"""Noise_XX_25519_ChaChaPoly_SHA256: the handshake of handoffd's mechanism.

A direct transcription of the Noise Protocol Framework, revision 34 (§5,
§7.5 pattern XX), for the one suite handoffd uses; no negotiation, no other
patterns.  Pure: the caller passes the static key, and ephemeral keys come
from a ``random`` callable (or are fixed, for the test vectors).

Every failure is a :class:`~handoffd.status.GSSError`: a token that does not
decrypt or does not have the shape the pattern demands is
``GSS_S_DEFECTIVE_TOKEN``; a peer public key that gives an all-zero DH output
(a low-order point) is refused as ``WEAK_PUBLIC_KEY`` rather than used.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE, GSSError

__all__ = [
    "DH_LEN",
    "HASH_LEN",
    "MAX_MESSAGE_LEN",
    "PROTOCOL_NAME",
    "CipherState",
    "HandshakeState",
    "public_key",
]

PROTOCOL_NAME: Final = b"Noise_XX_25519_ChaChaPoly_SHA256"
DH_LEN: Final = 32
HASH_LEN: Final = 32
TAG_LEN: Final = 16
MAX_MESSAGE_LEN: Final = 65535
_MAX_NONCE: Final = (1 << 64) - 1

# XX: -> e ; <- e, ee, s, es ; -> s, se
_XX: Final = (("e",), ("e", "ee", "s", "es"), ("s", "se"))


def _defective(minor: Minor, detail: str) -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, minor, detail)


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _load_private(private: bytes) -> X25519PrivateKey:
    # Loading a raw X25519 private key derives its public key (a full scalar multiplication,
    # as dear as a DH): each key is loaded once per handshake, never once per use.
    return X25519PrivateKey.from_private_bytes(private)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        # cryptography refuses an all-zero shared secret (low-order point).
        raise _defective(Minor.WEAK_PUBLIC_KEY, "peer key is a low-order point") from None


def _hkdf2(chaining_key: bytes, material: bytes) -> tuple[bytes, bytes]:
    temp = hmac.digest(chaining_key, material, "sha256")
    out1 = hmac.digest(temp, b"\x01", "sha256")
    out2 = hmac.digest(temp, out1 + b"\x02", "sha256")
    return out1, out2


def _nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


class CipherState:
    """Noise §5.1: a key (or none) and a 64-bit nonce counter."""

    __slots__ = ("_aead", "key", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self.n = 0
        self._aead = ChaCha20Poly1305(key) if key is not None else None

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt and count (Noise §5.1); without a key, return the plaintext."""
        if self._aead is None:
            return plaintext
        if self.n >= _MAX_NONCE:
            raise GSSError(GSS_S_FAILURE, Minor.SEQUENCE_EXHAUSTED, "Noise nonce exhausted")
        out = self._aead.encrypt(_nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt; on failure raise and leave the nonce unchanged (Noise §5.1)."""
        if self._aead is None:
            return ciphertext
        if self.n >= _MAX_NONCE:
            raise GSSError(GSS_S_FAILURE, Minor.SEQUENCE_EXHAUSTED, "Noise nonce exhausted")
        try:
            out = self._aead.decrypt(_nonce(self.n), ciphertext, ad)
        except InvalidTag:
            raise _defective(Minor.HANDSHAKE_DECRYPT_FAILED, "authentication tag") from None
        self.n += 1
        return out


class _SymmetricState:
    """Noise §5.2."""

    __slots__ = ("cipher", "ck", "h")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASH_LEN:
            self.h = protocol_name.ljust(HASH_LEN, b"\x00")
        else:  # pragma: no cover - our name is exactly 32 bytes
            self.h = hashlib.sha256(protocol_name).digest()
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, material: bytes) -> None:
        self.ck, temp_k = _hkdf2(self.ck, material)
        self.cipher = CipherState(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        return _hkdf2(self.ck, b"")


class HandshakeState:
    """Noise §5.3 for pattern XX.

    ``static_private`` is this side's 32-byte X25519 private key (or that key
    already loaded, which spares a scalar multiplication per handshake);
    ``random(n)`` supplies the ephemeral key unless ``ephemeral_private`` fixes
    it (test vectors only).  Call :meth:`write_message` and
    :meth:`read_message` in the order of the pattern (the initiator writes
    first); when :attr:`complete` is true, :meth:`split` gives the transport
    keys ``(initiator_to_responder, responder_to_initiator)``.
    """

    __slots__ = ("_e", "_index", "_random", "_s", "_s_public", "_ss", "initiator", "re", "rs")

    def __init__(
        self,
        *,
        initiator: bool,
        static_private: bytes | X25519PrivateKey,
        random: Callable[[int], bytes] | None = None,
        ephemeral_private: bytes | None = None,
        prologue: bytes = b"",
    ) -> None:
        if not isinstance(static_private, X25519PrivateKey) and len(static_private) != DH_LEN:
            raise GSSError(GSS_S_FAILURE, Minor.PROTECTION_BAD_PARAMETER,
                           "static key must be 32 bytes")
        if ephemeral_private is not None and len(ephemeral_private) != DH_LEN:
            raise GSSError(GSS_S_FAILURE, Minor.PROTECTION_BAD_PARAMETER,
                           "ephemeral key must be 32 bytes")
        if random is None and ephemeral_private is None:
            raise GSSError(GSS_S_FAILURE, Minor.PROTECTION_BAD_PARAMETER,
                           "need a random source or a fixed ephemeral key")
        self.initiator = initiator
        self._s = static_private if isinstance(static_private, X25519PrivateKey) \
            else _load_private(bytes(static_private))
        self._s_public = self._s.public_key().public_bytes_raw()
        self._e = None if ephemeral_private is None else _load_private(ephemeral_private)
        self._random = random
        self.re: bytes | None = None
        self.rs: bytes | None = None
        self._index = 0
        self._ss = _SymmetricState(PROTOCOL_NAME)
        self._ss.mix_hash(prologue)

    @property
    def complete(self) -> bool:
        """True once all three messages of XX are written or read."""
        return self._index == len(_XX)

    @property
    def handshake_hash(self) -> bytes:
        """``h``: unique to this handshake; valid for channel binding once complete."""
        return self._ss.h

    def _my_turn(self) -> bool:
        return (self._index % 2 == 0) == self.initiator

    def _ephemeral(self) -> X25519PrivateKey:
        if self._e is None:
            assert self._random is not None
            self._e = _load_private(self._random(DH_LEN))
        return self._e

    def _mix_dh(self, token: str) -> None:
        ss = self._ss
        # In "es" the initiator uses e and the responder s; "se" the reverse.
        if token == "ee":
            assert self._e is not None and self.re is not None
            ss.mix_key(_dh(self._e, self.re))
        elif token == "es":
            if self.initiator:
                assert self._e is not None and self.rs is not None
                ss.mix_key(_dh(self._e, self.rs))
            else:
                assert self.re is not None
                ss.mix_key(_dh(self._s, self.re))
        else:  # "se"
            if self.initiator:
                assert self.re is not None
                ss.mix_key(_dh(self._s, self.re))
            else:
                assert self._e is not None and self.rs is not None
                ss.mix_key(_dh(self._e, self.rs))

    def write_message(self, payload: bytes) -> bytes:
        """This side's next handshake message carrying ``payload`` (encrypted once keyed)."""
        if self.complete or not self._my_turn():
            raise GSSError(GSS_S_FAILURE, Minor.HANDSHAKE_OUT_OF_ORDER,
                           "not this side's turn to write")
        # Check the size before any mixing: a refused payload must leave the state usable.
        if self._message_size(len(payload)) > MAX_MESSAGE_LEN:
            raise GSSError(GSS_S_FAILURE, Minor.MESSAGE_TOO_LARGE, "handshake payload")
        out = bytearray()
        for token in _XX[self._index]:
            if token == "e":
                e_pub = self._ephemeral().public_key().public_bytes_raw()
                out += e_pub
                self._ss.mix_hash(e_pub)
            elif token == "s":
                out += self._ss.encrypt_and_hash(self._s_public)
            else:
                self._mix_dh(token)
        out += self._ss.encrypt_and_hash(payload)
        self._index += 1
        return bytes(out)

    def _message_size(self, payload_len: int) -> int:
        """The length of this side's next message for a payload of ``payload_len`` bytes."""
        keyed = self._ss.cipher.key is not None
        size = 0
        for token in _XX[self._index]:
            if token == "e":
                size += DH_LEN
            elif token == "s":
                size += DH_LEN + (TAG_LEN if keyed else 0)
            else:
                keyed = True
        return size + payload_len + (TAG_LEN if keyed else 0)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next message; a failure leaves this state unusable."""
        if self.complete or self._my_turn():
            raise GSSError(GSS_S_FAILURE, Minor.HANDSHAKE_OUT_OF_ORDER,
                           "not this side's turn to read")
        if len(message) > MAX_MESSAGE_LEN:
            raise _defective(Minor.TOKEN_TOO_LARGE, "handshake message")
        view = memoryview(message)
        keyed = self._ss.cipher.key is not None
        for token in _XX[self._index]:
            if token == "e":
                if len(view) < DH_LEN:
                    raise _defective(Minor.TOKEN_TRUNCATED, "handshake message: e")
                self.re = bytes(view[:DH_LEN])
                view = view[DH_LEN:]
                self._ss.mix_hash(self.re)
            elif token == "s":
                size = DH_LEN + (TAG_LEN if keyed else 0)
                if len(view) < size:
                    raise _defective(Minor.TOKEN_TRUNCATED, "handshake message: s")
                self.rs = self._ss.decrypt_and_hash(bytes(view[:size]))
                view = view[size:]
            else:
                self._mix_dh(token)
                keyed = True
        if keyed and len(view) < TAG_LEN:
            raise _defective(Minor.TOKEN_TRUNCATED, "handshake message: payload tag")
        payload = self._ss.decrypt_and_hash(bytes(view))
        self._index += 1
        return payload

    def split(self) -> tuple[bytes, bytes]:
        """The two transport keys: (initiator to responder, responder to initiator)."""
        if not self.complete:
            raise GSSError(GSS_S_FAILURE, Minor.CONTEXT_NOT_ESTABLISHED, "handshake incomplete")
        return self._ss.split()
