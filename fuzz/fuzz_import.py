"""Fuzz the export-token codec: ``import_context(blob, clock=...)`` and the re-export.

Input, byte 0: bits 0-1 how the blob is made, bit 2 the clock (0: the
fixtures' ``NOW``; 1: an hour later, past every real blob's expiry), bits 3-4
which real blob the mutating modes start from (``_handshakes.exported_blobs``).

====  ==========================================================================
mode  the blob
====  ==========================================================================
0, 3  the rest of the input, as is
1     a real exported blob patched by the rest: (u16 offset, u8 xor) triples,
      offsets modulo the blob's length
2     a real exported blob cut at the u16 that starts the rest, then the bytes
      after that u16 appended
====  ==========================================================================

Beyond "GSSError or nothing": an accepted blob makes a live context whose
export (with the unread bytes the import returned) is the input again, byte for
byte: the codec has one canonical form, so no two blobs import as the same
context.  The re-imported context must still wrap a message.
"""

from __future__ import annotations

from fuzz._fixtures import NOW
from fuzz._harness import instrumented, main, no_fd_leak

with instrumented(__name__):
    from fuzz._handshakes import exported_blobs
    from handoffd.core.context import SecurityContext, import_context
    from handoffd.status import GSSError


REAL_BLOBS = exported_blobs()
LATER = NOW + 3600


def _blob(mode: int, rest: bytes) -> bytes:
    how = mode & 0x03
    if how in (0, 3):
        return rest
    real = bytearray(REAL_BLOBS[mode >> 3 & 0x03])
    if how == 1:
        for offset in range(0, len(rest) - 2, 3):
            real[int.from_bytes(rest[offset:offset + 2], "big") % len(real)] ^= rest[offset + 2]
        return bytes(real)
    cut = int.from_bytes(rest[:2].ljust(2, b"\0"), "big")
    return bytes(real[:cut]) + rest[2:]


def _round_trip(context: SecurityContext, unread: bytes, blob: bytes, now: float) -> None:
    again = context.export(unread=unread)
    if again != blob:
        raise AssertionError("an accepted export token does not export back to itself")
    revived, carried = import_context(again, clock=lambda: now)
    if carried != unread:
        raise AssertionError("unread bytes changed across export and import")
    revived.wrap(b"still usable")


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    if not data:
        return
    mode = data[0]
    now = float(LATER if mode & 0x04 else NOW)
    blob = _blob(mode, data[1:])
    with no_fd_leak():
        try:
            context, unread = import_context(blob, clock=lambda: now)
        except GSSError:
            return
        if not context.established:
            raise AssertionError("import_context returned a context that is not open")
        context.inquire()
        _round_trip(context, unread, blob, now)


if __name__ == "__main__":
    main(TestOneInput)
