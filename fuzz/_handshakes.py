"""Real handoffd security contexts with fixed keys, for the handshake and import targets.

Imports handoffd, so a target must import this module inside its
``instrumented(__name__)`` block (``_harness`` explains why).  Everything is
deterministic: fixed static keys, seeded "randomness" per side, a fixed clock;
the same :class:`Setup` always produces the same tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fuzz._fixtures import (
    ACCEPTOR_SEED,
    BINDINGS,
    CLIENT_NAME,
    CLIENT_PRIVATE,
    INITIATOR_SEED,
    LIFETIME,
    NOW,
    OTHER_BINDINGS,
    SERVER_PRIVATE,
)
from handoffd.core.context import AcceptorContext, InitiatorContext
from handoffd.core.credentials import AllowList, StaticKeyPair

SERVER_KEY = StaticKeyPair(SERVER_PRIVATE)
CLIENT_KEY = StaticKeyPair(CLIENT_PRIVATE)
ALLOW_LIST = AllowList({CLIENT_KEY.public_bytes: CLIENT_NAME})
EMPTY_ALLOW_LIST = AllowList()


def clock() -> float:
    """The fixed wall clock of every fuzzed context."""
    return float(NOW)


@dataclass(frozen=True)
class Setup:
    """Who the two sides are; each flag is one bit of a target's mode byte."""

    anonymous_client: bool = False
    allow_anonymous: bool = False
    acceptor_bindings: bool = False
    other_client_bindings: bool = False
    client_not_allowed: bool = False

    @classmethod
    def from_bits(cls, bits: int) -> Setup:
        """Bits 0-4 in the order of the fields."""
        return cls(*(bool(bits >> n & 1) for n in range(5)))

    def bits(self) -> int:
        """The inverse of :meth:`from_bits`."""
        fields = (self.anonymous_client, self.allow_anonymous, self.acceptor_bindings,
                  self.other_client_bindings, self.client_not_allowed)
        return sum(1 << n for n, on in enumerate(fields) if on)

    def initiator(self) -> InitiatorContext:
        """A fresh client context pinned to the server key."""
        return InitiatorContext(
            static_key=None if self.anonymous_client else CLIENT_KEY,
            server_fingerprint=SERVER_KEY.fingerprint, lifetime=LIFETIME, clock=clock,
            random=random.Random(INITIATOR_SEED).randbytes,
            channel_bindings=OTHER_BINDINGS if self.other_client_bindings else BINDINGS)

    def acceptor(self) -> AcceptorContext:
        """A fresh acceptor context with the server key."""
        return AcceptorContext(
            static_key=SERVER_KEY,
            allow_list=EMPTY_ALLOW_LIST if self.client_not_allowed else ALLOW_LIST,
            allow_anonymous=self.allow_anonymous, lifetime=LIFETIME, clock=clock,
            random=random.Random(ACCEPTOR_SEED).randbytes,
            channel_bindings=BINDINGS if self.acceptor_bindings else None)


def transcript(setup: Setup) -> list[bytes]:
    """The three real handshake tokens (msg1, msg2, msg3) of ``setup`` (may stop early
    if the setup is refused: then the tokens made so far)."""
    initiator, acceptor = setup.initiator(), setup.acceptor()
    tokens = [initiator.step(None)[1]]
    tokens.append(acceptor.step(tokens[0])[1])
    tokens.append(initiator.step(tokens[1])[1])
    return tokens


def established(setup: Setup | None = None) -> tuple[InitiatorContext, AcceptorContext]:
    """Both sides of a completed handshake (the setup must be one the acceptor admits)."""
    setup = setup or Setup()
    initiator, acceptor = setup.initiator(), setup.acceptor()
    msg1 = initiator.step(None)[1]
    msg2 = acceptor.step(msg1)[1]
    msg3 = initiator.step(msg2)[1]
    acceptor.step(msg3)
    return initiator, acceptor


def exported_blobs() -> list[bytes]:
    """Export tokens of real contexts: an initiator that has sent one message, an acceptor
    with pipelined unread bytes, and both sides of an anonymous handshake."""
    initiator, acceptor = established(Setup())
    initiator.wrap(b"one message before export")
    anon_initiator, anon_acceptor = established(Setup(anonymous_client=True,
                                                      allow_anonymous=True))
    return [initiator.export(), acceptor.export(unread=b"\x02\x00\x00\x00\x01x"),
            anon_initiator.export(), anon_acceptor.export()]
