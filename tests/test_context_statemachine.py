"""Hypothesis state machine over a pair of real security contexts (no mocks).

One initiator and one acceptor complete the Noise handshake, then hypothesis
interleaves: wraps in both directions, deliveries of any token sent so far
(reordered, duplicated, or with one bit flipped), export + import of either
side at any point, and the clock running past the context lifetime.  Checked
after every step:

* every call returns or raises ``GSSError`` (anything else fails the test);
* after export, the exported object answers ``GSS_S_NO_CONTEXT``;
* the imported object carries on: it unwraps with the right data,
  ``conf_state`` and supplementary bits (from an independent model of the
  RFC 2743 window), and its wraps continue the sequence;
* a sender never uses a sequence number twice, across exports too;
* a tampered token is rejected and changes nothing.
"""

from __future__ import annotations

import random as random_module
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

context_module = pytest.importorskip("handoffd.core.context")

from handoffd.core.credentials import StaticKeyPair  # noqa: E402
from handoffd.status import (  # noqa: E402
    GSS_ERROR,
    GSS_ROUTINE_ERROR,
    GSS_S_COMPLETE,
    GSS_S_CONTEXT_EXPIRED,
    GSS_S_CONTINUE_NEEDED,
    GSS_S_DUPLICATE_TOKEN,
    GSS_S_GAP_TOKEN,
    GSS_S_NO_CONTEXT,
    GSS_S_UNSEQ_TOKEN,
    GSSError,
)

AcceptorContext = context_module.AcceptorContext
InitiatorContext = context_module.InitiatorContext
import_context = context_module.import_context

LIFETIME = 600.0
START = 1_800_000_000.0
WINDOW = 64


class Clock:
    """A clock the machine moves by hand (contexts take the clock as a callable)."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def _seq(token: bytes) -> int:
    # docs/PER-MESSAGE.md: SND_SEQ is bytes 8..15 of every per-message token, u64 BE.
    return int.from_bytes(token[8:16], "big")


@dataclass
class ReceiveModel:
    """What RFC 2743 section 1.2.3 says the receiver reports (replay and sequence on)."""

    next_expected: int = 0
    seen: set[int] = field(default_factory=set)

    def expect(self, seq: int) -> int:
        if seq >= self.next_expected:
            bits = GSS_S_GAP_TOKEN if seq > self.next_expected else 0
            self.next_expected = seq + 1
        elif self.next_expected - seq > WINDOW:
            bits = GSS_S_UNSEQ_TOKEN
        elif seq in self.seen:
            bits = GSS_S_DUPLICATE_TOKEN
        else:
            bits = GSS_S_UNSEQ_TOKEN
        self.seen.add(seq)
        return bits


@dataclass
class Sent:
    token: bytes
    data: bytes
    conf: bool


SIDES = st.sampled_from(["initiator", "acceptor"])
_SERVER_KEY = StaticKeyPair.generate(random_module.Random(1).randbytes)


def _routine(error: GSSError) -> int:
    return GSS_ROUTINE_ERROR(error.major)


class ContextMachine(RuleBasedStateMachine):
    """Two live contexts, the tokens in flight between them, and a model of each receiver."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.rng = random_module.Random(0)
        self.sides: dict[str, object] = {}
        self.sent: dict[str, list[Sent]] = {"initiator": [], "acceptor": []}
        self.models = {"initiator": ReceiveModel(), "acceptor": ReceiveModel()}
        self.used_seqs: dict[str, set[int]] = {"initiator": set(), "acceptor": set()}
        self.exported: list[object] = []
        self.expired = False

    @initialize()
    def handshake(self) -> None:
        initiator = InitiatorContext(
            static_key=None, server_fingerprint=None, lifetime=LIFETIME,
            clock=self.clock, random=self.rng.randbytes,
        )
        acceptor = AcceptorContext(
            static_key=_SERVER_KEY, allow_list=None, allow_anonymous=True, lifetime=LIFETIME,
            clock=self.clock, random=self.rng.randbytes,
        )
        major, token1 = initiator.step(None)
        assert major == GSS_S_CONTINUE_NEEDED
        major, token2 = acceptor.step(token1)
        assert major == GSS_S_CONTINUE_NEEDED
        major, token3 = initiator.step(token2)
        assert major == GSS_S_COMPLETE
        major, out = acceptor.step(token3)
        assert major == GSS_S_COMPLETE
        assert not out
        self.sides = {"initiator": initiator, "acceptor": acceptor}

    @staticmethod
    def _peer(side: str) -> str:
        return "acceptor" if side == "initiator" else "initiator"

    @precondition(lambda self: not self.expired)
    @rule(side=SIDES, data=st.binary(max_size=64), conf=st.booleans())
    def wrap(self, side: str, data: bytes, conf: bool) -> None:
        token = self.sides[side].wrap(data, conf_req=conf)  # type: ignore[attr-defined]
        seq = _seq(token)
        assert seq not in self.used_seqs[side], f"{side} reused sequence number {seq}"
        self.used_seqs[side].add(seq)
        self.sent[side].append(Sent(token, data, conf))

    @precondition(lambda self: not self.expired and any(self.sent.values()))
    @rule(sender=SIDES, pick=st.integers(min_value=0))
    def deliver(self, sender: str, pick: int) -> None:
        if not self.sent[sender]:
            return
        sent = self.sent[sender][pick % len(self.sent[sender])]
        receiver = self._peer(sender)
        result = self.sides[receiver].unwrap(sent.token)  # type: ignore[attr-defined]
        assert result.data == sent.data
        assert result.conf_state == sent.conf
        assert result.supplementary == self.models[receiver].expect(_seq(sent.token))

    @precondition(lambda self: not self.expired and any(self.sent.values()))
    @rule(sender=SIDES, pick=st.integers(min_value=0), bit=st.integers(min_value=0))
    def deliver_tampered(self, sender: str, pick: int, bit: int) -> None:
        if not self.sent[sender]:
            return
        token = bytearray(self.sent[sender][pick % len(self.sent[sender])].token)
        bit %= len(token) * 8
        token[bit // 8] ^= 1 << (bit % 8)
        receiver = self.sides[self._peer(sender)]
        with pytest.raises(GSSError) as caught:
            receiver.unwrap(bytes(token))  # type: ignore[attr-defined]
        assert GSS_ERROR(caught.value.major)
        # Nothing changed: the model is untouched and later deliveries still match it.

    @precondition(lambda self: not self.expired)
    @rule(side=SIDES, unread=st.binary(max_size=16))
    def export_and_import(self, side: str, unread: bytes) -> None:
        old = self.sides[side]
        blob = old.export(unread=unread)  # type: ignore[attr-defined]
        self.exported.append(old)
        new, carried = import_context(blob, clock=self.clock)
        assert carried == unread
        self.sides[side] = new

    @rule(seconds=st.floats(min_value=LIFETIME, max_value=10 * LIFETIME))
    def expire(self, seconds: float) -> None:
        self.clock.now += seconds
        self.expired = True

    @precondition(lambda self: self.expired)
    @rule(side=SIDES)
    def expired_context_refuses(self, side: str) -> None:
        context = self.sides[side]
        for call in (lambda: context.wrap(b"late"),  # type: ignore[attr-defined]
                     lambda: context.export()):  # type: ignore[attr-defined]
            with pytest.raises(GSSError) as caught:
                call()
            assert _routine(caught.value) == GSS_S_CONTEXT_EXPIRED
        if self.sent[self._peer(side)]:
            with pytest.raises(GSSError) as caught:
                context.unwrap(self.sent[self._peer(side)][0].token)  # type: ignore[attr-defined]
            assert _routine(caught.value) == GSS_S_CONTEXT_EXPIRED

    @invariant()
    def exported_contexts_are_dead(self) -> None:
        for dead in self.exported[-2:]:  # the newest ones; older ones were checked before
            for call in (lambda: dead.wrap(b"x"),  # type: ignore[attr-defined]  # noqa: B023
                         lambda: dead.unwrap(b"\x05\x04" + b"\x00" * 30),  # type: ignore[attr-defined]  # noqa: B023
                         lambda: dead.export()):  # type: ignore[attr-defined]  # noqa: B023
                with pytest.raises(GSSError) as caught:
                    call()
                assert _routine(caught.value) == GSS_S_NO_CONTEXT


ContextMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_context_state_machine = ContextMachine.TestCase
