"""The receive window: replay and sequence checking of per-message tokens.

Semantics are RFC 2743 §1.2.3 as MIT krb5 implements them in
``src/lib/gssapi/generic/util_seqstate.c``: the window remembers the next
expected sequence number and a 64-bit map of which of the 64 numbers before
it have been seen.  :meth:`SequenceWindow.check` classifies a sequence number
and records it, returning the supplementary status bits:

==============================  ============================================
token                           result (replay on / sequence on)
==============================  ============================================
the next expected one           0
later than expected             ``GSS_S_GAP_TOKEN`` (only with sequencing)
earlier, unseen, in the window  ``GSS_S_UNSEQ_TOKEN`` (only with sequencing)
earlier, already seen           ``GSS_S_DUPLICATE_TOKEN`` (only with replay
                                detection; with sequencing alone: UNSEQ)
older than the window (> 64)    ``GSS_S_UNSEQ_TOKEN`` with sequencing, else
                                ``GSS_S_OLD_TOKEN``
==============================  ============================================

With both checks switched off nothing is recorded and 0 is returned, as MIT does.

Differences from MIT, on purpose: sequence numbers are explicit 64-bit values
that never wrap (the sender stops at 2**64 - 2, see ``protection.py``), so
there is no base offset and no modular arithmetic; ``next`` may reach 2**64
after the (never sent, but representable) number 2**64 - 1.  MIT's C shifts the
map by the gap, which is undefined behaviour for gaps of 64 or more; in Python
it would build an unbounded integer.  Every shift here is bounded and masked
to 64 bits.
"""

from __future__ import annotations

import struct
from typing import Final

from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_DUPLICATE_TOKEN,
    GSS_S_GAP_TOKEN,
    GSS_S_OLD_TOKEN,
    GSS_S_UNSEQ_TOKEN,
    GSSError,
)

__all__ = ["MAX_SEQNUM", "WINDOW_SIZE", "SequenceWindow"]

WINDOW_SIZE: Final = 64
"""How many sequence numbers before the next expected one are remembered."""

MAX_SEQNUM: Final = (1 << 64) - 1
"""The largest sequence number :meth:`SequenceWindow.check` accepts."""

_MASK64: Final = (1 << 64) - 1
_FLAG_REPLAY: Final = 0x01
_FLAG_SEQUENCE: Final = 0x02
_STATE = struct.Struct(">BQQ")  # flags | highest seen (0 if none) | receive map


class SequenceWindow:
    """The receive-side replay/sequence window of one direction of a context.

    ``replay`` switches on duplicate detection (``GSS_C_REPLAY_FLAG``),
    ``sequence`` switches on order reporting (``GSS_C_SEQUENCE_FLAG``).  The
    first expected sequence number is 0.  Call :meth:`check` only for tokens
    whose integrity has been verified: it records the number.
    """

    __slots__ = ("_next", "_recvmap", "_replay", "_sequence")

    def __init__(self, *, replay: bool = True, sequence: bool = True) -> None:
        self._replay = replay
        self._sequence = sequence
        # One more than the highest number seen (0: none yet); at most 2**64.
        self._next = 0
        # Bit i set: number ``next - 1 - i`` was seen.  Bit 0 is set exactly
        # when anything has been seen (it marks the highest number).
        self._recvmap = 0

    @property
    def replay(self) -> bool:
        """Whether duplicates are detected."""
        return self._replay

    @property
    def sequence(self) -> bool:
        """Whether out-of-order and missing tokens are reported."""
        return self._sequence

    @property
    def next_expected(self) -> int:
        """The sequence number an in-order token would carry next (may be 2**64)."""
        return self._next

    def check(self, seqnum: int) -> int:
        """Classify ``seqnum``, record it, and return the supplementary bits (0: in order).

        Raises ``GSSError(GSS_S_DEFECTIVE_TOKEN, TOKEN_BAD_FIELD)`` for a number
        outside 0..2**64-1 (state unchanged).
        """
        if not 0 <= seqnum <= MAX_SEQNUM:
            raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_BAD_FIELD, "sequence number range")
        if not (self._replay or self._sequence):
            return 0
        if seqnum >= self._next:
            gap = seqnum - self._next
            shift = gap + 1
            # A shift of 64 or more pushes every remembered number out of the map.
            kept = (self._recvmap << shift) & _MASK64 if shift < WINDOW_SIZE else 0
            self._recvmap = kept | 1
            self._next = seqnum + 1
            return GSS_S_GAP_TOKEN if gap and self._sequence else 0
        age = self._next - seqnum  # 1 = the highest number seen
        if age > WINDOW_SIZE:
            return GSS_S_UNSEQ_TOKEN if self._sequence else GSS_S_OLD_TOKEN
        bit = 1 << (age - 1)
        if self._replay and self._recvmap & bit:
            return GSS_S_DUPLICATE_TOKEN
        self._recvmap |= bit
        return GSS_S_UNSEQ_TOKEN if self._sequence else 0

    # --- state export -------------------------------------------------------------

    ENCODED_SIZE: Final = _STATE.size
    """Length of :meth:`to_bytes` output (17)."""

    def to_bytes(self) -> bytes:
        """The full window state: ``flags (u8) | highest seen (u64 BE) | map (u64 BE)``.

        ``flags`` bit 0 is replay detection, bit 1 sequencing.  ``highest`` is
        ``next_expected - 1``, or 0 when nothing was seen (then the map is 0).
        """
        flags = (_FLAG_REPLAY if self._replay else 0) | (_FLAG_SEQUENCE if self._sequence else 0)
        highest = self._next - 1 if self._recvmap else 0
        return _STATE.pack(flags, highest, self._recvmap)

    @classmethod
    def from_bytes(cls, data: bytes) -> SequenceWindow:
        """Rebuild a window from :meth:`to_bytes` output; strict.

        Raises ``GSSError(GSS_S_DEFECTIVE_TOKEN, TOKEN_TRUNCATED /
        TOKEN_TRAILING_BYTES / TOKEN_BAD_FIELD)`` for anything
        :meth:`to_bytes` could not have produced.
        """
        if len(data) < _STATE.size:
            raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_TRUNCATED, "window state")
        if len(data) > _STATE.size:
            raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_TRAILING_BYTES, "window state")
        flags, highest, recvmap = _STATE.unpack(data)
        if flags & ~(_FLAG_REPLAY | _FLAG_SEQUENCE):
            raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_BAD_FIELD, "window flags")
        if recvmap == 0:
            if highest != 0:
                raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_BAD_FIELD, "window map")
        elif not recvmap & 1 or (highest < WINDOW_SIZE - 1 and recvmap >> (highest + 1)):
            # The highest number must be marked, and nothing below 0 can have been seen.
            raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_BAD_FIELD, "window map")
        window = cls(replay=bool(flags & _FLAG_REPLAY), sequence=bool(flags & _FLAG_SEQUENCE))
        window._next = highest + 1 if recvmap else 0
        window._recvmap = recvmap
        return window

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SequenceWindow):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"SequenceWindow(replay={self._replay}, sequence={self._sequence}, "
            f"next_expected={self._next}, map=0x{self._recvmap:016x})"
        )
