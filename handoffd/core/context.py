"""The GSS-shaped security context of handoffd's Noise mechanism (pure; no I/O).

An :class:`InitiatorContext` (the client) and an :class:`AcceptorContext` (the
acceptor) exchange tokens through :meth:`~_HandshakeContext.step`, which
returns ``(major, output_token)`` with ``GSS_S_CONTINUE_NEEDED`` until the
context is established, as ``gss_init_sec_context``/``gss_accept_sec_context``
do.  Three tokens make the Noise XX handshake (``docs/PROTOCOL.md`` has every
byte)::

    initiator                                  acceptor
    step(None)  -> msg1: e | hello          ->  step(msg1) -> CONTINUE_NEEDED
    step(msg2)  <- msg2: e, ee, s, es | offer <-
                -> msg3: s, se | confirm    ->  step(msg3) -> COMPLETE (no output)
    COMPLETE

The initiator authenticates the acceptor by pinning its static key's
fingerprint; the acceptor authorizes the initiator by its static key's entry
in an :class:`~handoffd.core.credentials.AllowList`, or as anonymous (a
throwaway key, ``Flags.ANON``) when allowed.  Once established, a context
protects messages (:mod:`handoffd.core.protection`), and can be exported
once, as ``gss_export_sec_context`` does: the exported object is dead and the
blob rebuilds it in another process (:func:`import_context`).  The blob holds
the traffic keys in the clear; the daemon seals it (:mod:`handoffd.core.seal`)
before it leaves the acceptor.

Time comes from the ``clock`` callable (seconds, wall clock: expiry crosses
processes) and randomness from ``random(n)``; nothing here reads either itself.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from handoffd.core.credentials import ANONYMOUS, AllowList, StaticKeyPair, fingerprint
from handoffd.core.framing import MECH_OID
from handoffd.core.noise import HandshakeState
from handoffd.core.protection import MessageProtection
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_BAD_BINDINGS,
    GSS_S_COMPLETE,
    GSS_S_CONTEXT_EXPIRED,
    GSS_S_CONTINUE_NEEDED,
    GSS_S_DEFECTIVE_CREDENTIAL,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSS_S_NO_CONTEXT,
    GSS_S_UNAUTHORIZED,
    GSS_S_UNAVAILABLE,
    GSSError,
)

__all__ = [
    "ANONYMOUS_NAME",
    "PROLOGUE",
    "AcceptorContext",
    "ContextInfo",
    "Flags",
    "InitiatorContext",
    "SecurityContext",
    "Unwrapped",
    "import_context",
]

Clock = Callable[[], float]
Random = Callable[[int], bytes]


class Flags(enum.IntFlag):
    """Context flags with their RFC 2744 values (``GSS_C_*_FLAG``)."""

    DELEG = 1
    MUTUAL = 2
    REPLAY = 4
    SEQUENCE = 8
    CONF = 16
    INTEG = 32
    ANON = 64
    PROT_READY = 128
    TRANS = 256


PROLOGUE: Final = b"handoffd noise-xx v1"
"""Mixed into the handshake hash: a peer speaking anything else fails at msg2."""

ANONYMOUS_NAME: Final = ANONYMOUS  # no allow-list entry may carry it
PROTOCOL_VERSION: Final = 1

_WIRE_FLAGS: Final = Flags.MUTUAL | Flags.REPLAY | Flags.SEQUENCE | Flags.CONF | Flags.INTEG \
    | Flags.ANON
_ALWAYS: Final = Flags.MUTUAL | Flags.CONF | Flags.INTEG | Flags.TRANS | Flags.PROT_READY
_ALWAYS_BITS: Final = int(_ALWAYS)
_EXPORTABLE_BITS: Final = int(_WIRE_FLAGS | _ALWAYS)
_REPLAY_BIT: Final = int(Flags.REPLAY)
_SEQUENCE_BIT: Final = int(Flags.SEQUENCE)
_ANON_BIT: Final = int(Flags.ANON)
_MAX_LIFETIME_MS: Final = 0xFFFFFFFF

# Handshake payloads, all version-first (docs/PROTOCOL.md).
_HELLO = struct.Struct(">BHI")      # msg1: version, requested flags, requested lifetime ms
_OFFER = struct.Struct(">BHI")      # msg2: version, granted flags, granted lifetime ms
_CONFIRM = struct.Struct(">B32s")   # msg3: version, SHA-256 of the channel bindings


class _State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    FAILED = "failed"
    EXPORTED = "exported"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Unwrapped:
    """What ``unwrap`` returns: the data, whether it was encrypted, supplementary bits."""

    data: bytes
    conf_state: bool
    supplementary: int
    qop_state: int = 0


@dataclass(frozen=True, slots=True)
class ContextInfo:
    """``gss_inquire_context`` for handoffd contexts."""

    source_name: str
    target_name: str
    lifetime_rec: float
    mech: str
    flags: Flags
    locally_initiated: bool
    open: bool


def _defective(minor: Minor, detail: str) -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, minor, detail)


def _lifetime_ms(seconds: float) -> int:
    # "not > 0" also refuses NaN; infinity (GSS_C_INDEFINITE) is the longest the wire carries.
    if not seconds > 0:
        raise GSSError(GSS_S_FAILURE, Minor.PROTECTION_BAD_PARAMETER, "lifetime must be > 0")
    return min(_MAX_LIFETIME_MS, max(1, round(min(seconds, _MAX_LIFETIME_MS / 1000) * 1000)))


class SecurityContext:
    """An established context (or one on its way there): the per-message surface.

    Every call checks, in this order: the context exists (``GSS_S_NO_CONTEXT``
    once exported, deleted or failed), it is established, it has not expired
    (``GSS_S_CONTEXT_EXPIRED``).  ``repr`` never shows keys.
    """

    def __init__(self, *, initiator: bool, clock: Clock) -> None:
        self._initiator = initiator
        self._clock = clock
        self._state = _State.HANDSHAKE
        self._protection: MessageProtection | None = None
        self._flags = Flags(0)
        self._expires_at = 0.0
        self._handshake_hash = b""
        self._peer_public = b""
        self._local_name = ""
        self._peer_name = ""
        self._anonymous = False

    # --- established facts ---------------------------------------------------------

    @property
    def is_initiator(self) -> bool:
        return self._initiator

    @property
    def established(self) -> bool:
        return self._state == _State.OPEN

    @property
    def flags(self) -> Flags:
        """The returned flags (``ret_flags``)."""
        return self._flags

    @property
    def anonymous(self) -> bool:
        """True when the initiator did not reveal an identity."""
        return self._anonymous

    @property
    def peer_name(self) -> str:
        """The peer: the client's allow-list name or ``anonymous`` (acceptor side),
        the server's fingerprint (initiator side)."""
        return self._peer_name

    @property
    def local_name(self) -> str:
        return self._local_name

    @property
    def peer_fingerprint(self) -> str | None:
        """Fingerprint of the peer's static key; None for an anonymous initiator."""
        if not self._peer_public or (self._anonymous and not self._initiator):
            return None
        return fingerprint(self._peer_public)

    @property
    def expires_at(self) -> float:
        return self._expires_at

    @property
    def handshake_hash(self) -> bytes:
        """Noise ``h``: the same on both sides, unique per handshake (channel binding)."""
        return self._handshake_hash

    @property
    def context_id(self) -> str:
        """A short public identifier, the same on both sides, for logs."""
        return self._handshake_hash[:8].hex()

    def _open_protection(self) -> MessageProtection:
        if self._state == _State.EXPORTED:
            raise GSSError(GSS_S_NO_CONTEXT, Minor.CONTEXT_EXPORTED)
        if self._state == _State.DELETED:
            raise GSSError(GSS_S_NO_CONTEXT, Minor.CONTEXT_DELETED)
        if self._state != _State.OPEN or self._protection is None:
            raise GSSError(GSS_S_NO_CONTEXT, Minor.CONTEXT_NOT_ESTABLISHED)
        if self._clock() >= self._expires_at:
            raise GSSError(GSS_S_CONTEXT_EXPIRED, Minor.CONTEXT_LIFETIME_OVER)
        return self._protection

    def lifetime_remaining(self) -> float:
        """Seconds until expiry (0 once expired)."""
        self._open_protection_or_expired()
        return max(0.0, self._expires_at - self._clock())

    def _open_protection_or_expired(self) -> None:
        try:
            self._open_protection()
        except GSSError as error:
            if error.major != GSS_S_CONTEXT_EXPIRED:
                raise

    def inquire(self) -> ContextInfo:
        """Names, lifetime, mechanism and flags (works on an expired context too)."""
        self._open_protection_or_expired()
        if self._initiator:
            source, target = self._local_name, self._peer_name
        else:
            source, target = self._peer_name, self._local_name
        return ContextInfo(
            source_name=source,
            target_name=target,
            lifetime_rec=max(0.0, self._expires_at - self._clock()),
            mech=MECH_OID,
            flags=self._flags,
            locally_initiated=self._initiator,
            open=True,
        )

    # --- per-message protection -----------------------------------------------------

    def wrap(self, data: bytes, conf_req: bool = True, qop: int = 0) -> bytes:
        """A wrap token for ``data``; encrypted unless ``conf_req`` is False."""
        token, _ = self._open_protection().wrap(data, conf_req, qop)
        return token

    def unwrap(self, token: bytes) -> Unwrapped:
        """Check and open a wrap token; duplicates and reordering come back as bits."""
        data, conf_state, supplementary = self._open_protection().unwrap(token)
        return Unwrapped(data, conf_state, supplementary)

    def get_mic(self, message: bytes, qop: int = 0) -> bytes:
        return self._open_protection().get_mic(message, qop)

    def verify_mic(self, message: bytes, token: bytes) -> int:
        """Check a MIC; returns the supplementary bits."""
        return self._open_protection().verify_mic(message, token)

    def wrap_size_limit(self, conf_req: bool, max_output: int) -> int:
        return self._open_protection().wrap_size_limit(conf_req, max_output)

    # --- lifecycle ------------------------------------------------------------------

    def export(self, unread: bytes = b"") -> bytes:
        """``gss_export_sec_context``: the interprocess token; this object is dead after.

        ``unread`` is transport bytes already read past the handshake; they travel
        in the token and :func:`import_context` returns them.  The token holds the
        traffic keys in the clear: seal it before it leaves the process.
        """
        if self._state in (_State.HANDSHAKE, _State.FAILED):
            # RFC 2744: a context that is not fully established cannot be transferred.
            raise GSSError(GSS_S_UNAVAILABLE, Minor.CONTEXT_NOT_ESTABLISHED, "export")
        protection = self._open_protection()
        blob = _encode_export(self, protection, unread)
        self._kill(_State.EXPORTED)
        return blob

    def delete(self) -> None:
        """``gss_delete_sec_context``: forget the keys; later calls are NO_CONTEXT."""
        self._kill(_State.DELETED)

    def _kill(self, state: _State) -> None:
        self._state = state
        self._protection = None

    def _fail(self) -> None:
        self._kill(_State.FAILED)

    def __repr__(self) -> str:
        role = "initiator" if self._initiator else "acceptor"
        return f"<{type(self).__name__} {role} {self._state.value} peer={self._peer_name!r}>"


class _HandshakeContext(SecurityContext):
    """The token loop shared by both roles: any failure kills the context."""

    def __init__(self, *, initiator: bool, static: StaticKeyPair, clock: Clock,
                 random: Random) -> None:
        super().__init__(initiator=initiator, clock=clock)
        self._noise = HandshakeState(initiator=initiator, static_private=static.private_key,
                                     random=random, prologue=PROLOGUE)

    def step(self, token: bytes | None) -> tuple[int, bytes]:
        """Process the peer's token (None for the initiator's first call).

        Returns ``(GSS_S_CONTINUE_NEEDED, token)`` or ``(GSS_S_COMPLETE, token)``
        (the token may be empty); raises :class:`GSSError` on any failure, after
        which the context is dead.
        """
        if self._state != _State.HANDSHAKE:
            raise GSSError(GSS_S_FAILURE, Minor.HANDSHAKE_OUT_OF_ORDER,
                           f"step on a context that is {self._state.value}")
        try:
            return self._step(token)
        except GSSError:
            self._fail()
            raise

    def _step(self, token: bytes | None) -> tuple[int, bytes]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _establish(self, flags: Flags, lifetime_ms: int, recv_replay: bool,
                   recv_sequence: bool) -> None:
        to_acceptor, to_initiator = self._noise.split()
        send, recv = (to_acceptor, to_initiator) if self._initiator else \
            (to_initiator, to_acceptor)
        self._protection = MessageProtection(
            send_key=send, recv_key=recv, initiator=self._initiator,
            flags_replay=recv_replay, flags_sequence=recv_sequence)
        self._flags = flags
        self._expires_at = self._clock() + lifetime_ms / 1000
        self._handshake_hash = self._noise.handshake_hash
        self._peer_public = self._noise.rs or b""
        self._state = _State.OPEN


def _expect_size(payload: bytes, layout: struct.Struct, what: str) -> None:
    if len(payload) < 1 or payload[0] != PROTOCOL_VERSION:
        raise _defective(Minor.TOKEN_BAD_VERSION, f"{what}: protocol version")
    if len(payload) < layout.size:
        raise _defective(Minor.TOKEN_TRUNCATED, what)
    if len(payload) > layout.size:
        raise _defective(Minor.TOKEN_TRAILING_BYTES, what)


class InitiatorContext(_HandshakeContext):
    """The client side.

    ``static_key`` None (or ``Flags.ANON`` in ``req_flags``) makes an anonymous
    client with a throwaway key.  ``server_fingerprint`` pins the acceptor's key
    (``SHA256:...``); None accepts any key, for trust on first use only, where
    the caller checks :attr:`peer_fingerprint` itself.  ``channel_bindings`` are
    sent hashed inside the encrypted last message and compared by an acceptor
    that has bindings of its own.
    """

    def __init__(
        self,
        *,
        static_key: StaticKeyPair | None,
        server_fingerprint: str | None,
        req_flags: Flags = Flags.MUTUAL | Flags.REPLAY | Flags.SEQUENCE | Flags.CONF
        | Flags.INTEG,
        lifetime: float = 3600.0,
        clock: Clock,
        random: Random,
        channel_bindings: bytes = b"",
    ) -> None:
        anonymous = static_key is None or bool(req_flags & Flags.ANON)
        static = StaticKeyPair.generate(random) if anonymous or static_key is None \
            else static_key
        super().__init__(initiator=True, static=static, clock=clock, random=random)
        self._anonymous = anonymous
        self._req_flags = Flags(req_flags) | (Flags.ANON if anonymous else Flags(0))
        self._lifetime_ms = _lifetime_ms(lifetime)
        self._server_fingerprint = server_fingerprint
        self._bindings_hash = hashlib.sha256(channel_bindings).digest()
        self._local_name = ANONYMOUS_NAME if anonymous else static.fingerprint
        self._sent_hello = False

    def _step(self, token: bytes | None) -> tuple[int, bytes]:
        if token is None:
            if self._sent_hello:
                raise GSSError(GSS_S_FAILURE, Minor.HANDSHAKE_OUT_OF_ORDER,
                               "the initiator's first step was already taken")
            self._sent_hello = True
            hello = _HELLO.pack(PROTOCOL_VERSION, int(self._req_flags & _WIRE_FLAGS),
                                self._lifetime_ms)
            return GSS_S_CONTINUE_NEEDED, self._noise.write_message(hello)
        if not self._sent_hello:
            raise GSSError(GSS_S_FAILURE, Minor.HANDSHAKE_OUT_OF_ORDER,
                           "the initiator speaks first: call step(None)")
        offer = self._noise.read_message(token)
        _expect_size(offer, _OFFER, "acceptor offer")
        _, raw_flags, lifetime_ms = _OFFER.unpack(offer)
        granted = Flags(raw_flags)
        if raw_flags & ~int(_WIRE_FLAGS) or not granted & Flags.MUTUAL or lifetime_ms == 0:
            raise _defective(Minor.TOKEN_BAD_FIELD, "acceptor offer flags or lifetime")
        if bool(granted & Flags.ANON) != self._anonymous:
            raise _defective(Minor.TOKEN_BAD_FIELD, "acceptor changed the anonymous flag")
        server = fingerprint(self._noise.rs or b"")
        # Compared as bytes: compare_digest raises TypeError on a non-ASCII str (a typo'd pin).
        if self._server_fingerprint is not None and not hmac.compare_digest(
                server.encode(), self._server_fingerprint.encode("utf-8", "surrogatepass")):
            raise GSSError(GSS_S_DEFECTIVE_CREDENTIAL, Minor.SERVER_KEY_MISMATCH,
                           f"server key is {server}, expected {self._server_fingerprint}")
        confirm = self._noise.write_message(_CONFIRM.pack(PROTOCOL_VERSION, self._bindings_hash))
        self._peer_name = server
        self._establish(granted | _ALWAYS, lifetime_ms,
                        bool(granted & Flags.REPLAY), bool(granted & Flags.SEQUENCE))
        return GSS_S_COMPLETE, confirm


class AcceptorContext(_HandshakeContext):
    """The acceptor side.

    ``allow_list`` names the client keys that may connect (None: none by key);
    ``allow_anonymous`` admits anonymous clients.  ``lifetime`` caps the
    context lifetime (seconds; a client may ask for less).  ``channel_bindings``
    None accepts whatever bindings the client used; bytes must match exactly
    (``GSS_S_BAD_BINDINGS`` otherwise).
    """

    def __init__(
        self,
        *,
        static_key: StaticKeyPair,
        allow_list: AllowList | None,
        allow_anonymous: bool = False,
        lifetime: float = 3600.0,
        clock: Clock,
        random: Random,
        channel_bindings: bytes | None = None,
    ) -> None:
        super().__init__(initiator=False, static=static_key, clock=clock, random=random)
        self._allow_list = allow_list if allow_list is not None else AllowList()
        self._allow_anonymous = allow_anonymous
        self._lifetime_ms = _lifetime_ms(lifetime)
        self._bindings_hash = None if channel_bindings is None else \
            hashlib.sha256(channel_bindings).digest()
        self._local_name = static_key.fingerprint
        self._granted = Flags(0)
        self._granted_ms = 0

    def _step(self, token: bytes | None) -> tuple[int, bytes]:
        if token is None:
            raise GSSError(GSS_S_FAILURE, Minor.HANDSHAKE_OUT_OF_ORDER,
                           "the acceptor needs the initiator's token")
        if not self._granted:
            return self._answer_hello(token)
        return self._check_confirm(token)

    def _answer_hello(self, token: bytes) -> tuple[int, bytes]:
        hello = self._noise.read_message(token)
        _expect_size(hello, _HELLO, "initiator hello")
        _, raw_flags, lifetime_ms = _HELLO.unpack(hello)
        requested = Flags(raw_flags) & _WIRE_FLAGS
        if requested & Flags.ANON and not self._allow_anonymous:
            raise GSSError(GSS_S_UNAUTHORIZED, Minor.ANONYMOUS_NOT_ALLOWED)
        self._granted = (requested & (Flags.REPLAY | Flags.SEQUENCE | Flags.ANON)) \
            | Flags.MUTUAL | Flags.CONF | Flags.INTEG
        self._granted_ms = min(self._lifetime_ms, lifetime_ms or self._lifetime_ms)
        offer = _OFFER.pack(PROTOCOL_VERSION, int(self._granted), self._granted_ms)
        return GSS_S_CONTINUE_NEEDED, self._noise.write_message(offer)

    def _check_confirm(self, token: bytes) -> tuple[int, bytes]:
        confirm = self._noise.read_message(token)
        _expect_size(confirm, _CONFIRM, "initiator confirm")
        _, bindings_hash = _CONFIRM.unpack(confirm)
        if self._bindings_hash is not None and not hmac.compare_digest(
                bindings_hash, self._bindings_hash):
            raise GSSError(GSS_S_BAD_BINDINGS, Minor.CHANNEL_BINDINGS_MISMATCH)
        client = self._noise.rs or b""
        anonymous = bool(self._granted & Flags.ANON)
        if anonymous:
            name = ANONYMOUS_NAME
        else:
            found = self._allow_list.get(client)
            if found is None:
                raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_KEY_NOT_ALLOWED,
                               f"client key {fingerprint(client)}")
            name = found
        self._anonymous = anonymous
        self._peer_name = name
        self._establish(self._granted | _ALWAYS, self._granted_ms,
                        bool(self._granted & Flags.REPLAY), bool(self._granted & Flags.SEQUENCE))
        return GSS_S_COMPLETE, b""


# --- export token --------------------------------------------------------------------
#
# version u8 = 1 | role+anon u8 | flags u16 | expires_at_ms u64 | handshake_hash 32
# | peer_public 32 | local_name (u8 length, UTF-8) | peer_name (u8 length, UTF-8)
# | protection state (u16 length) | unread (u32 length)

_EXPORT_VERSION: Final = 1
_EXPORT_HEAD = struct.Struct(">BBHQ32s32s")
_ROLE_INITIATOR: Final = 0x01
_ROLE_ANONYMOUS: Final = 0x02
_MAX_UNREAD: Final = 16 * 1024 * 1024
# The context holds its expiry in float seconds: up to 2**50 ms (some 35,000 years)
# ms -> s -> ms is exact, past it an imported token would not export back to itself
# (and 2**64 - 1 ms would not export at all: struct.error).
_MAX_EXPIRES_MS: Final = 1 << 50


def _encode_export(context: SecurityContext, protection: MessageProtection,
                   unread: bytes) -> bytes:
    if len(unread) > _MAX_UNREAD:
        raise GSSError(GSS_S_FAILURE, Minor.MESSAGE_TOO_LARGE, "unread bytes over 16 MiB")
    role = (_ROLE_INITIATOR if context.is_initiator else 0) | \
        (_ROLE_ANONYMOUS if context.anonymous else 0)
    state = protection.export_state()
    out = bytearray(_EXPORT_HEAD.pack(
        _EXPORT_VERSION, role, int(context.flags), round(context.expires_at * 1000),
        context.handshake_hash, context._peer_public))
    for name in (context.local_name, context.peer_name):
        encoded = name.encode()
        out += bytes([len(encoded)]) + encoded
    out += len(state).to_bytes(2, "big") + state
    out += len(unread).to_bytes(4, "big") + unread
    return bytes(out)


class _Reader:
    """A strict cursor: running past the end is TOKEN_TRUNCATED.

    Slices the bytes directly (one copy per field, no memoryview round trip) and reads a
    length prefix without a second call: every handoff's import runs nine of these."""

    __slots__ = ("data", "offset", "size")

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.offset = 0
        self.size = len(self.data)

    def take(self, n: int) -> bytes:
        start = self.offset
        end = start + n
        if end > self.size:
            raise _defective(Minor.TOKEN_TRUNCATED, "export token")
        self.offset = end
        return self.data[start:end]

    def length_prefixed(self, width: int) -> bytes:
        start = self.offset + width
        if start > self.size:
            raise _defective(Minor.TOKEN_TRUNCATED, "export token")
        end = start + int.from_bytes(self.data[self.offset:start], "big")
        if end > self.size:
            raise _defective(Minor.TOKEN_TRUNCATED, "export token")
        self.offset = end
        return self.data[start:end]


def import_context(blob: bytes, *, clock: Clock) -> tuple[SecurityContext, bytes]:
    """``gss_import_sec_context``: rebuild an exported context; returns it and its unread bytes.

    Strict: any defect is ``GSS_S_DEFECTIVE_TOKEN`` with a ``TOKEN_*`` minor; a
    context past its lifetime is ``GSS_S_CONTEXT_EXPIRED``.
    """
    if len(blob) >= 1 and blob[0] != _EXPORT_VERSION:
        raise _defective(Minor.TOKEN_BAD_VERSION, "export token")
    reader = _Reader(blob)
    _, role, raw_flags, expires_ms, hs_hash, peer_public = _EXPORT_HEAD.unpack(
        reader.take(_EXPORT_HEAD.size))
    if role & ~(_ROLE_INITIATOR | _ROLE_ANONYMOUS) or raw_flags & ~_EXPORTABLE_BITS:
        raise _defective(Minor.TOKEN_BAD_FIELD, "export token role or flags")
    if expires_ms > _MAX_EXPIRES_MS:
        raise _defective(Minor.TOKEN_BAD_FIELD, "export token expiry")
    try:
        local_name = reader.length_prefixed(1).decode()
        peer_name = reader.length_prefixed(1).decode()
    except UnicodeDecodeError:
        raise _defective(Minor.TOKEN_BAD_FIELD, "export token names") from None
    protection = MessageProtection.import_state(reader.length_prefixed(2))
    unread = reader.length_prefixed(4)
    if reader.offset != len(blob):
        raise _defective(Minor.TOKEN_TRAILING_BYTES, "export token")
    initiator = bool(role & _ROLE_INITIATOR)
    if protection.initiator != initiator:
        raise _defective(Minor.TOKEN_BAD_FIELD, "export token role differs from its state")
    # Flags the context reports must be the ones in force: REPLAY/SEQUENCE as the window
    # checks them, ANON as the role says, and what every context has.
    # (Tested on plain ints: each IntFlag operation costs ~0.6 us, on every handoff.)
    if (bool(raw_flags & _REPLAY_BIT), bool(raw_flags & _SEQUENCE_BIT),
            bool(raw_flags & _ANON_BIT)) != (protection.flags_replay, protection.flags_sequence,
                                             bool(role & _ROLE_ANONYMOUS)) \
            or raw_flags & _ALWAYS_BITS != _ALWAYS_BITS:
        raise _defective(Minor.TOKEN_BAD_FIELD, "export token flags differ from its state")
    context = SecurityContext(initiator=initiator, clock=clock)
    context._protection = protection
    context._flags = Flags(raw_flags)
    context._expires_at = expires_ms / 1000
    context._handshake_hash = hs_hash
    context._peer_public = peer_public
    context._local_name = local_name
    context._peer_name = peer_name
    context._anonymous = bool(role & _ROLE_ANONYMOUS)
    context._state = _State.OPEN
    if clock() >= context._expires_at:
        context.delete()
        raise GSSError(GSS_S_CONTEXT_EXPIRED, Minor.CONTEXT_LIFETIME_OVER, "on import")
    return context, unread
