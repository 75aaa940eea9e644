"""Fuzz ``MessageProtection.unwrap``, ``.verify_mic`` and ``MessageProtection.import_state``.

Input, byte 0: bits 0-1 the operation (0 unwrap, 1 verify_mic, 2/3
import_state); bit 2 the receiver's role (0 acceptor, 1 initiator); bits 3-4
its replay/sequence flags.  The rest:

* unwrap: u16-length-prefixed tokens, unwrapped in turn by one receiver (so
  the window sees sequences);
* verify_mic: u16-length-prefixed (token, message) pairs;
* import_state: the state blob.

Beyond "GSSError or nothing": a rejected token leaves the receiver's state
exactly as it was, and an imported state exports back to the same bytes.
"""

from __future__ import annotations

from fuzz._fixtures import KEY_A2I, KEY_I2A
from fuzz._harness import instrumented, main, no_fd_leak, u16_chunks

with instrumented(__name__):
    from handoffd.core.protection import MessageProtection
    from handoffd.status import GSSError


def receiver(mode: int) -> MessageProtection:
    """The receiving side selected by the mode byte (keys from ``_fixtures``)."""
    initiator = bool(mode & 0x04)
    return MessageProtection(
        send_key=KEY_I2A if initiator else KEY_A2I,
        recv_key=KEY_A2I if initiator else KEY_I2A,
        initiator=initiator,
        flags_replay=bool(mode & 0x08),
        flags_sequence=bool(mode & 0x10),
    )


def _unchanged_on_error(side: MessageProtection, call: object, *args: bytes) -> None:
    before = side.export_state()
    try:
        call(*args)  # type: ignore[operator]
    except GSSError:
        if side.export_state() != before:
            raise AssertionError("a rejected token changed the receiver's state") from None


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    if not data:
        return
    mode, rest = data[0], data[1:]
    with no_fd_leak():
        operation = mode & 0x03
        if operation >= 2:
            try:
                imported = MessageProtection.import_state(rest)
            except GSSError:
                return
            if imported.export_state() != rest:
                raise AssertionError("imported protection state does not export back")
            return
        side = receiver(mode)
        pieces = list(u16_chunks(rest))
        if operation == 0:
            for token in pieces:
                _unchanged_on_error(side, side.unwrap, token)
        else:
            for token, message in zip(pieces[::2], pieces[1::2], strict=False):
                _unchanged_on_error(side, side.verify_mic, message, token)


if __name__ == "__main__":
    main(TestOneInput)
