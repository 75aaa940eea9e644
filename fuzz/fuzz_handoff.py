"""Fuzz the handoff-protocol payload decoders of ``handoffd.core.handoff``.

Input, byte 0 modulo 8 picks the decoder: Hello, Handoff, Ack, Registered,
Refused, ``expect_empty`` for DRAINING/DRAINED (5, 6), or SessionEnd (7).  The rest is the
payload.  Beyond "GSSError or nothing": every decoded message except
Registered (whose JSON has many spellings) encodes back to the same bytes.
"""

from __future__ import annotations

from fuzz._harness import instrumented, main, no_fd_leak

with instrumented(__name__):
    from handoffd.core.handoff import (
        Ack,
        Handoff,
        Hello,
        Kind,
        Refused,
        Registered,
        SessionEnd,
        expect_empty,
    )
    from handoffd.status import GSSError

_CODECS = (Hello, Handoff, Ack, Registered, Refused, None, None, SessionEnd)


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    if not data:
        return
    choice, payload = data[0] % 8, data[1:]
    with no_fd_leak():
        try:
            codec = _CODECS[choice]
            if codec is None:
                expect_empty(Kind.DRAINING if choice == 5 else Kind.DRAINED, payload)
                return
            message = codec.decode(payload)
        except GSSError:
            return
        if not isinstance(message, Registered) and message.encode() != payload:
            raise AssertionError(f"{type(message).__name__} does not encode back to its payload")


if __name__ == "__main__":
    main(TestOneInput)
