"""Fuzz ``SequenceWindow.from_bytes`` (and ``check`` on what it accepts).

Input: byte 0 even -> ``from_bytes(data[1:])`` as a whole; odd -> the window
is ``data[1:18]`` and every following 8-byte chunk is a sequence number
passed to ``check``.  Beyond "GSSError or nothing": an accepted state must
round-trip exactly, and ``check`` must return only supplementary bits.
"""

from __future__ import annotations

from fuzz._harness import instrumented, main, no_fd_leak

with instrumented(__name__):
    from handoffd.core.window import SequenceWindow
    from handoffd.status import (
        GSS_S_DUPLICATE_TOKEN,
        GSS_S_GAP_TOKEN,
        GSS_S_OLD_TOKEN,
        GSS_S_UNSEQ_TOKEN,
        GSSError,
    )

_SUPPLEMENTARY = {0, GSS_S_DUPLICATE_TOKEN, GSS_S_GAP_TOKEN, GSS_S_OLD_TOKEN, GSS_S_UNSEQ_TOKEN}


def _check_numbers(window: SequenceWindow, numbers: bytes) -> None:
    for offset in range(0, len(numbers) - 7, 8):
        seq = int.from_bytes(numbers[offset : offset + 8], "big")
        bits = window.check(seq)
        if bits not in _SUPPLEMENTARY:
            raise AssertionError(f"check({seq}) returned 0x{bits:x}")
        state = window.to_bytes()
        if SequenceWindow.from_bytes(state).to_bytes() != state:
            raise AssertionError("window state does not round-trip after check")


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    if not data:
        return
    with no_fd_leak():
        try:
            if data[0] % 2 == 0:
                window = SequenceWindow.from_bytes(data[1:])
                if window.to_bytes() != data[1:]:
                    raise AssertionError("accepted window state is not canonical")
            else:
                window = SequenceWindow.from_bytes(data[1:18])
                _check_numbers(window, data[18:])
        except GSSError:
            pass


if __name__ == "__main__":
    main(TestOneInput)
