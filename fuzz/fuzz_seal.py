"""Fuzz ``open_sealed`` with the fixture key, worker id and clock.

Input, byte 0: bit 0 set -> also require mechanism 1.  The rest is the token.
Beyond "GSSError or nothing": a token that opens must be exactly what
``seal`` produces from its header fields and plaintext (no malleability).
"""

from __future__ import annotations

from fuzz._fixtures import NOW, SEAL_KEY, WORKER_ID
from fuzz._harness import instrumented, main, no_fd_leak

with instrumented(__name__):
    from handoffd.core.seal import HEADER_SIZE, open_sealed, seal
    from handoffd.status import GSSError


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    if not data:
        return
    token = data[1:]
    with no_fd_leak():
        try:
            plaintext = open_sealed(
                SEAL_KEY, token, worker_id=WORKER_ID, now=NOW, mech=1 if data[0] & 1 else None
            )
        except GSSError:
            return
        again = seal(
            SEAL_KEY,
            plaintext=plaintext,
            mech=int.from_bytes(token[1:3], "big"),
            worker_id=token[11:27],
            expires_at=int.from_bytes(token[3:11], "big"),
            nonce=token[27:HEADER_SIZE],
        )
        if again != token:
            raise AssertionError("an accepted sealed token is not what seal() makes")


if __name__ == "__main__":
    main(TestOneInput)
