"""Per-message protection: wrap/unwrap and MIC tokens with explicit sequence numbers.

The token format is documented byte for byte in ``docs/PER-MESSAGE.md``.  In
short, every token starts with a 16-byte header modelled on RFC 4121 §4.2.6::

    0..1   TOK_ID     0x05 0x04 (wrap) or 0x04 0x04 (MIC)
    2      Flags      0x01 SentByAcceptor, 0x02 Sealed; other bits zero
    3..7   Filler     0xFF x 5
    8..15  SND_SEQ    sender's sequence number, u64 big-endian

and the header is always part of the AEAD associated data, so nothing in it can
be altered.  The cipher is ChaCha20-Poly1305 (RFC 8439) under the direction's
key from the Noise handshake's ``Split()``; the 96-bit nonce is, as Noise's
``ChaChaPoly`` builds it, 4 zero bytes followed by SND_SEQ as u64
little-endian.  Wrap and MIC tokens share one sequence space per direction,
so no (key, nonce) pair is ever used twice.

* confidential wrap:    header | ChaCha20-Poly1305(nonce, data, AD=header)
* integrity-only wrap:  header | data | ChaCha20-Poly1305(nonce, "", AD=header | data)
* MIC:                  header | ChaCha20-Poly1305(nonce, "", AD=header | message)

Receiving checks the structure, then the tag, and only then consults the
:class:`~handoffd.core.window.SequenceWindow`; a rejected token changes no
state.  Out-of-order and duplicate tokens are not errors: their data is
returned together with the supplementary bits, exactly as GSS-API does, and it
is the caller's choice to drop a ``GSS_S_DUPLICATE_TOKEN``.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from handoffd.core.window import SequenceWindow
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_BAD_MIC,
    GSS_S_BAD_QOP,
    GSS_S_CONTEXT_EXPIRED,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSSError,
)

__all__ = [
    "HEADER_SIZE",
    "KEY_SIZE",
    "LAST_SEND_SEQ",
    "MAX_MESSAGE_SIZE",
    "MIC_TOKEN_SIZE",
    "TAG_SIZE",
    "TOK_ID_MIC",
    "TOK_ID_WRAP",
    "MessageProtection",
]

KEY_SIZE: Final = 32
HEADER_SIZE: Final = 16
TAG_SIZE: Final = 16
MIC_TOKEN_SIZE: Final = HEADER_SIZE + TAG_SIZE

MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
"""The largest payload :meth:`MessageProtection.wrap` accepts (16 MiB)."""

LAST_SEND_SEQ: Final = (1 << 64) - 2
"""The last sequence number a sender may use: Noise reserves nonce 2**64 - 1."""

TOK_ID_WRAP: Final = 0x0504
TOK_ID_MIC: Final = 0x0404
FLAG_SENT_BY_ACCEPTOR: Final = 0x01
FLAG_SEALED: Final = 0x02
_KNOWN_FLAGS: Final = FLAG_SENT_BY_ACCEPTOR | FLAG_SEALED
_FILLER: Final = b"\xff" * 5
_HEADER = struct.Struct(">HB5sQ")

# export_state layout, version 1 (see export_state).
_STATE_VERSION: Final = 1
_STATE_HEAD = struct.Struct(">BB32s32sQ")
_STATE_SIZE: Final = _STATE_HEAD.size + SequenceWindow.ENCODED_SIZE
_STATE_INITIATOR: Final = 0x01
_STATE_REPLAY: Final = 0x02
_STATE_SEQUENCE: Final = 0x04
_STATE_KNOWN: Final = _STATE_INITIATOR | _STATE_REPLAY | _STATE_SEQUENCE


def _nonce(seq: int) -> bytes:
    """Noise's ChaChaPoly nonce: 32 zero bits, then the counter as u64 little-endian."""
    return b"\x00\x00\x00\x00" + seq.to_bytes(8, "little")


def _defective(minor: Minor, detail: str) -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, minor, detail)


def _bad_parameter(detail: str) -> GSSError:
    return GSSError(GSS_S_FAILURE, Minor.PROTECTION_BAD_PARAMETER, detail)


class MessageProtection:
    """Per-message protection of one established context (both directions).

    ``send_key`` protects what this side sends, ``recv_key`` what it receives
    (32-byte ChaCha20-Poly1305 keys, from Noise ``Split()``).  ``initiator``
    is this side's role: it fills and checks the SentByAcceptor flag, which is
    what detects tokens reflected back to their sender.  ``flags_replay`` and
    ``flags_sequence`` are the context's ``GSS_C_REPLAY_FLAG`` and
    ``GSS_C_SEQUENCE_FLAG``.  ``send_seq`` and ``window`` restore a context
    mid-conversation (prefer :meth:`import_state`); the window's flags must
    match.  Invalid parameters raise ``GSSError(GSS_S_FAILURE,
    PROTECTION_BAD_PARAMETER)``.
    """

    __slots__ = (
        "_initiator",
        "_recv_aead",
        "_recv_key",
        "_send_aead",
        "_send_key",
        "_send_seq",
        "_window",
    )

    def __init__(
        self,
        *,
        send_key: bytes,
        recv_key: bytes,
        initiator: bool,
        flags_replay: bool = True,
        flags_sequence: bool = True,
        send_seq: int = 0,
        window: SequenceWindow | None = None,
    ) -> None:
        if len(send_key) != KEY_SIZE or len(recv_key) != KEY_SIZE:
            raise _bad_parameter("keys must be 32 bytes")
        if not 0 <= send_seq <= LAST_SEND_SEQ + 1:
            raise _bad_parameter("send sequence number out of range")
        if window is None:
            window = SequenceWindow(replay=flags_replay, sequence=flags_sequence)
        elif (window.replay, window.sequence) != (flags_replay, flags_sequence):
            raise _bad_parameter("window flags differ from the context flags")
        self._send_key = bytes(send_key)
        self._recv_key = bytes(recv_key)
        self._send_aead = ChaCha20Poly1305(self._send_key)
        self._recv_aead = ChaCha20Poly1305(self._recv_key)
        self._initiator = initiator
        self._send_seq = send_seq
        self._window = window

    # --- read-only state ----------------------------------------------------------

    @property
    def send_seq(self) -> int:
        """The sequence number the next wrap or MIC token will carry."""
        return self._send_seq

    @property
    def initiator(self) -> bool:
        """True on the initiator's side, False on the acceptor's."""
        return self._initiator

    @property
    def flags_replay(self) -> bool:
        """Whether duplicate tokens are reported (``GSS_C_REPLAY_FLAG``)."""
        return self._window.replay

    @property
    def flags_sequence(self) -> bool:
        """Whether out-of-order tokens are reported (``GSS_C_SEQUENCE_FLAG``)."""
        return self._window.sequence

    @property
    def recv_next_expected(self) -> int:
        """The sequence number an in-order token from the peer would carry next."""
        return self._window.next_expected

    # --- sending ------------------------------------------------------------------

    def _header(self, tok_id: int, sealed: bool) -> tuple[bytes, int]:
        """The next header and its sequence number; raises before anything is consumed."""
        seq = self._send_seq
        if seq > LAST_SEND_SEQ:
            raise GSSError(GSS_S_CONTEXT_EXPIRED, Minor.SEQUENCE_EXHAUSTED)
        flags = (0 if self._initiator else FLAG_SENT_BY_ACCEPTOR) | (FLAG_SEALED if sealed else 0)
        return _HEADER.pack(tok_id, flags, _FILLER, seq), seq

    def wrap(self, data: bytes, conf_req: bool = True, qop: int = 0) -> tuple[bytes, bool]:
        """Protect ``data``; return ``(token, conf_state)``.

        ``conf_req=True`` encrypts (``conf_state`` True); ``False`` only
        authenticates, and the data travels in the clear.  Raises
        ``GSS_S_BAD_QOP`` for a qop other than 0, ``GSS_S_FAILURE /
        MESSAGE_TOO_LARGE`` above :data:`MAX_MESSAGE_SIZE`, and
        ``GSS_S_CONTEXT_EXPIRED / SEQUENCE_EXHAUSTED`` once the sequence space
        is used up; no token is produced and no state changes on any error.
        """
        if qop != 0:
            raise GSSError(GSS_S_BAD_QOP, Minor.BAD_QOP_REQUESTED)
        if len(data) > MAX_MESSAGE_SIZE:
            raise GSSError(GSS_S_FAILURE, Minor.MESSAGE_TOO_LARGE, f"{len(data)} bytes")
        header, seq = self._header(TOK_ID_WRAP, conf_req)
        if conf_req:
            token = header + self._send_aead.encrypt(_nonce(seq), bytes(data), header)
        else:
            data = bytes(data)
            token = header + data + self._send_aead.encrypt(_nonce(seq), b"", header + data)
        self._send_seq = seq + 1
        return token, bool(conf_req)

    def get_mic(self, message: bytes, qop: int = 0) -> bytes:
        """A MIC token for ``message`` (header and tag only, 32 bytes).

        Raises as :meth:`wrap` does for qop and sequence exhaustion; the
        message itself has no size limit.
        """
        if qop != 0:
            raise GSSError(GSS_S_BAD_QOP, Minor.BAD_QOP_REQUESTED)
        header, seq = self._header(TOK_ID_MIC, False)
        tag = self._send_aead.encrypt(_nonce(seq), b"", header + bytes(message))
        self._send_seq = seq + 1
        return header + tag

    def wrap_size_limit(self, conf_req: bool, max_output: int) -> int:
        """The largest input whose wrap token fits in ``max_output`` bytes (0 if none does).

        Both protection modes add the same 32 bytes (header and tag).
        """
        del conf_req  # same overhead either way
        return max(0, min(max_output - HEADER_SIZE - TAG_SIZE, MAX_MESSAGE_SIZE))

    # --- receiving ----------------------------------------------------------------

    def _parse_header(self, token: bytes, expected_id: int) -> tuple[bytes, int, bool]:
        """Check the header's structure and direction; return it, its seq and Sealed."""
        if len(token) < HEADER_SIZE + TAG_SIZE:
            raise _defective(Minor.TOKEN_TRUNCATED, "per-message token")
        tok_id, flags, filler, seq = _HEADER.unpack_from(token)
        if tok_id != expected_id:
            raise _defective(Minor.TOKEN_BAD_TYPE, f"token id 0x{tok_id:04x}")
        if flags & ~_KNOWN_FLAGS or filler != _FILLER:
            raise _defective(Minor.TOKEN_BAD_FIELD, "per-message token flags or filler")
        sealed = bool(flags & FLAG_SEALED)
        if expected_id == TOK_ID_MIC and sealed:
            raise _defective(Minor.TOKEN_BAD_FIELD, "MIC token marked sealed")
        if bool(flags & FLAG_SENT_BY_ACCEPTOR) != self._initiator:
            raise GSSError(GSS_S_BAD_MIC, Minor.MESSAGE_REFLECTED)
        if seq > LAST_SEND_SEQ:
            raise _defective(Minor.TOKEN_BAD_FIELD, "reserved sequence number")
        return bytes(token[:HEADER_SIZE]), seq, sealed

    def unwrap(self, token: bytes) -> tuple[bytes, bool, int]:
        """Verify (and decrypt) a wrap token; return ``(data, conf_state, supplementary)``.

        ``supplementary`` holds ``GSS_S_DUPLICATE_TOKEN``, ``GSS_S_OLD_TOKEN``,
        ``GSS_S_UNSEQ_TOKEN`` or ``GSS_S_GAP_TOKEN`` (0 when in order); the data
        is returned in every one of these cases.  A token that is malformed
        raises ``GSS_S_DEFECTIVE_TOKEN`` (``TOKEN_*``; ``TOKEN_TOO_LARGE`` above
        the size limit), one that fails its tag ``GSS_S_BAD_MIC /
        MESSAGE_TAMPERED``, one sent by this side ``GSS_S_BAD_MIC /
        MESSAGE_REFLECTED``; nothing changes then.
        """
        if len(token) > HEADER_SIZE + MAX_MESSAGE_SIZE + TAG_SIZE:
            raise _defective(Minor.TOKEN_TOO_LARGE, f"{len(token)} bytes")
        header, seq, sealed = self._parse_header(token, TOK_ID_WRAP)
        body = bytes(token[HEADER_SIZE:])
        try:
            if sealed:
                data = self._recv_aead.decrypt(_nonce(seq), body, header)
            else:
                data = body[:-TAG_SIZE]
                self._recv_aead.decrypt(_nonce(seq), body[-TAG_SIZE:], header + data)
        except InvalidTag:
            raise GSSError(GSS_S_BAD_MIC, Minor.MESSAGE_TAMPERED) from None
        return data, sealed, self._window.check(seq)

    def verify_mic(self, message: bytes, token: bytes) -> int:
        """Verify a MIC token over ``message``; return the supplementary bits.

        Raises as :meth:`unwrap` does; a MIC token must be exactly 32 bytes.
        """
        if len(token) > MIC_TOKEN_SIZE:
            raise _defective(Minor.TOKEN_TRAILING_BYTES, "MIC token")
        header, seq, _ = self._parse_header(token, TOK_ID_MIC)
        try:
            self._recv_aead.decrypt(_nonce(seq), bytes(token[HEADER_SIZE:]), header + message)
        except InvalidTag:
            raise GSSError(GSS_S_BAD_MIC, Minor.MESSAGE_TAMPERED) from None
        return self._window.check(seq)

    # --- state export -------------------------------------------------------------

    def export_state(self) -> bytes:
        """The complete state, to rebuild this object elsewhere (91 bytes, version 1)::

            version (u8 = 1) | flags (u8: 1 initiator, 2 replay, 4 sequence)
            | send_key (32) | recv_key (32) | send_seq (u64 BE)
            | window (17, see SequenceWindow.to_bytes)

        The result holds both keys in the clear: seal it before it leaves the
        process (the context export does).  Unlike ``gss_export_sec_context``
        this does not deactivate anything; the caller must.
        """
        flags = (
            (_STATE_INITIATOR if self._initiator else 0)
            | (_STATE_REPLAY if self._window.replay else 0)
            | (_STATE_SEQUENCE if self._window.sequence else 0)
        )
        head = _STATE_HEAD.pack(
            _STATE_VERSION, flags, self._send_key, self._recv_key, self._send_seq
        )
        return head + self._window.to_bytes()

    @classmethod
    def import_state(cls, data: bytes) -> MessageProtection:
        """Rebuild from :meth:`export_state` output; strict.

        Any defect — short, long, unknown version or flag bits, a window that
        :class:`SequenceWindow` could not have produced, a sequence number past
        the end — raises ``GSSError(GSS_S_DEFECTIVE_TOKEN, TOKEN_*)``.
        """
        if len(data) >= 1 and data[0] != _STATE_VERSION:
            raise _defective(Minor.TOKEN_BAD_VERSION, "protection state")
        if len(data) < _STATE_SIZE:
            raise _defective(Minor.TOKEN_TRUNCATED, "protection state")
        if len(data) > _STATE_SIZE:
            raise _defective(Minor.TOKEN_TRAILING_BYTES, "protection state")
        _, flags, send_key, recv_key, send_seq = _STATE_HEAD.unpack_from(data)
        if flags & ~_STATE_KNOWN or send_seq > LAST_SEND_SEQ + 1:
            raise _defective(Minor.TOKEN_BAD_FIELD, "protection state")
        window = SequenceWindow.from_bytes(bytes(data[_STATE_HEAD.size :]))
        if (window.replay, window.sequence) != (
            bool(flags & _STATE_REPLAY),
            bool(flags & _STATE_SEQUENCE),
        ):
            raise _defective(Minor.TOKEN_BAD_FIELD, "protection state window flags")
        return cls(
            send_key=send_key,
            recv_key=recv_key,
            initiator=bool(flags & _STATE_INITIATOR),
            flags_replay=window.replay,
            flags_sequence=window.sequence,
            send_seq=send_seq,
            window=window,
        )

    def __repr__(self) -> str:
        # Never the keys.
        role = "initiator" if self._initiator else "acceptor"
        return f"<MessageProtection {role} send_seq={self._send_seq} window={self._window!r}>"
