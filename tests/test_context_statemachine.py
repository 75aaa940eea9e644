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

from handoffd.core.credentials import AllowList, StaticKeyPair  # noqa: E402
from handoffd.status import (  # noqa: E402
    GSS_ERROR,
    GSS_ROUTINE_ERROR,
    GSS_S_COMPLETE,
    GSS_S_CONTEXT_EXPIRED,
    GSS_S_CONTINUE_NEEDED,
    GSS_S_DUPLICATE_TOKEN,
    GSS_S_GAP_TOKEN,
    GSS_S_NO_CONTEXT,
    GSS_S_UNAVAILABLE,
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


# --- the handshake itself in random orders ------------------------------------------------
#
# The machine above starts from an established pair.  This one starts from two fresh
# contexts and lets hypothesis pick every call: either side's step() with any token in
# flight (or None), a tampered token, wrap/export/import before, during and after the
# handshake, and messages once both sides are open.  A model says what each call must do:
# the one right token at each step advances the handshake; anything else fails that side
# for good while it is still handshaking (HANDSHAKE_OUT_OF_ORDER ever after) and is refused
# without harm once it is open.

_CLIENT_KEY = StaticKeyPair.generate(random_module.Random(2).randbytes)
# What each side's step() needs next: (role, phase) -> index of the peer's message.
_NEXT_MESSAGE = {("initiator", 0): 0, ("initiator", 1): 2, ("acceptor", 0): 1,
                 ("acceptor", 1): 3}


@dataclass
class HandshakeSide:
    """The model of one side: handshake phase (2 = open), failed, replaced by an import."""

    phase: int = 0
    failed: bool = False
    imported: bool = False

    @property
    def open(self) -> bool:
        return self.phase == 2 and not self.failed


class HandshakeMachine(RuleBasedStateMachine):
    """init/accept/wrap/unwrap/export/import on a fresh pair, in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.rng = random_module.Random(3)
        allow = AllowList({_CLIENT_KEY.public_bytes: "client"})
        self.contexts: dict[str, object] = {
            "initiator": InitiatorContext(
                static_key=_CLIENT_KEY, server_fingerprint=_SERVER_KEY.fingerprint,
                lifetime=LIFETIME, clock=self.clock, random=self.rng.randbytes),
            "acceptor": AcceptorContext(
                static_key=_SERVER_KEY, allow_list=allow, allow_anonymous=False,
                lifetime=LIFETIME, clock=self.clock, random=self.rng.randbytes),
        }
        self.model = {"initiator": HandshakeSide(), "acceptor": HandshakeSide()}
        # Handshake messages sent so far, by number (msg1 = 1); both sides see them all.
        self.messages: dict[int, bytes] = {}

    def _expect_step(self, side: str, number: int | None) -> bool:
        """Whether step() with message ``number`` (None: no token) is the right call now."""
        model = self.model[side]
        if model.failed or model.phase == 2:
            return False
        return _NEXT_MESSAGE[(side, model.phase)] == (number or 0)

    def _step(self, side: str, number: int | None, token: bytes | None) -> None:
        context = self.contexts[side]
        model = self.model[side]
        if model.imported:
            return  # an imported context is a plain SecurityContext: it has no step()
        if not self._expect_step(side, number):
            was_handshaking = model.phase < 2 and not model.failed
            with pytest.raises(GSSError):
                context.step(token)  # type: ignore[attr-defined]
            if was_handshaking:
                model.failed = True
            return
        major, output = context.step(token)  # type: ignore[attr-defined]
        model.phase += 1
        if side == "initiator":
            assert major == (GSS_S_CONTINUE_NEEDED if model.phase == 1 else GSS_S_COMPLETE)
            self.messages[1 if model.phase == 1 else 3] = output
        elif model.phase == 1:
            assert major == GSS_S_CONTINUE_NEEDED
            self.messages[2] = output
        else:
            assert (major, output) == (GSS_S_COMPLETE, b"")

    def _can_advance(self, side: str) -> bool:
        model = self.model[side]
        if model.failed or model.phase == 2 or model.imported:
            return False
        number = _NEXT_MESSAGE[(side, model.phase)]
        return number == 0 or number in self.messages

    @rule(side=SIDES, pick=st.integers(min_value=0, max_value=3),
          any_token=st.integers(min_value=0, max_value=3))
    def step(self, side: str, pick: int, any_token: int) -> None:
        """Mostly the handshake's next step (on whichever side can take it); one call in
        four, step() on ``side`` with no token (pick 0) or any message sent so far."""
        if any_token:
            ready = [s for s in (side, "acceptor" if side == "initiator" else "initiator")
                     if self._can_advance(s)]
            if ready:
                number = _NEXT_MESSAGE[(ready[0], self.model[ready[0]].phase)]
                self._step(ready[0], number or None, self.messages.get(number))
            return
        number = pick if pick in self.messages else None
        self._step(side, number, self.messages[number] if number else None)

    @rule(side=SIDES, number=st.sampled_from([2, 3]), bit=st.integers(min_value=0))
    def step_tampered(self, side: str, number: int, bit: int) -> None:
        """A flipped bit in an authenticated message is refused like a wrong message."""
        if number not in self.messages:
            return
        token = bytearray(self.messages[number])
        bit %= len(token) * 8
        token[bit // 8] ^= 1 << (bit % 8)
        self._step(side, -1, bytes(token))

    @rule(side=SIDES)
    def protect_before_open(self, side: str) -> None:
        """wrap and export refuse a context that is not open, and change nothing."""
        if self.model[side].open:
            return
        context = self.contexts[side]
        with pytest.raises(GSSError) as caught:
            context.wrap(b"too early")  # type: ignore[attr-defined]
        assert _routine(caught.value) == GSS_S_NO_CONTEXT
        with pytest.raises(GSSError) as caught:
            context.export()  # type: ignore[attr-defined]
        assert _routine(caught.value) == GSS_S_UNAVAILABLE  # RFC 2744: not established

    @precondition(lambda self: self.model["initiator"].open and self.model["acceptor"].open)
    @rule(sender=SIDES, data=st.binary(max_size=32))
    def talk(self, sender: str, data: bytes) -> None:
        receiver = "acceptor" if sender == "initiator" else "initiator"
        token = self.contexts[sender].wrap(data)  # type: ignore[attr-defined]
        assert self.contexts[receiver].unwrap(token).data == data  # type: ignore[attr-defined]

    @rule(side=SIDES)
    def export_and_import(self, side: str) -> None:
        """Only an open context exports; the import carries on in its place."""
        if not self.model[side].open:
            return
        blob = self.contexts[side].export()  # type: ignore[attr-defined]
        dead = self.contexts[side]
        self.contexts[side], _ = import_context(blob, clock=self.clock)
        self.model[side].imported = True
        with pytest.raises(GSSError) as caught:
            dead.wrap(b"after export")  # type: ignore[attr-defined]
        assert _routine(caught.value) == GSS_S_NO_CONTEXT

    @invariant()
    def established_matches_the_model(self) -> None:
        for side, context in self.contexts.items():
            assert context.established == self.model[side].open  # type: ignore[attr-defined]


HandshakeMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_handshake_state_machine = HandshakeMachine.TestCase
