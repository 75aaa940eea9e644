"""The mechanism registry: which security mechanisms handoffd speaks, and how to reach them.

handoffd runs every mechanism through the same daemon code paths (handshake,
authorize, export, seal, park, hand off, import, wrap/unwrap); only the
context objects differ.  A mechanism is known by three names:

* its **OID**, which opens the client's first token (RFC 2743 §3.1): the
  acceptor picks the mechanism from it among those enabled in ``[server]
  mechanisms`` (any other OID is ``GSS_S_BAD_MECH``);
* its **name** in the configuration (``noise``, ``krb5``);
* its **seal id**, the ``mechanism`` field of the sealed handoff token
  (``docs/HANDOFF.md``): authenticated with the token, it tells the worker
  which mechanism's import to run.

=====  =========  ==========================================  ==========================
seal   name       OID                                         module
=====  =========  ==========================================  ==========================
1      noise      2.25.225041400964563648380695906358058613570 :mod:`handoffd.mech.noise`
2      krb5       1.2.840.113554.1.2.2                        :mod:`handoffd.mech.krb5`
3      tls        (none on the wire: its own listeners)       :mod:`handoffd.mech.tls`
=====  =========  ==========================================  ==========================

The krb5 module imports the ``gssapi`` package only when it is used: handoffd
without the ``krb5`` extra runs Noise alone.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, Protocol

from handoffd.minor import Minor
from handoffd.status import GSS_S_BAD_MECH, GSS_S_FAILURE, GSSError

if TYPE_CHECKING:
    from handoffd.config import Config
    from handoffd.core.context import Flags

__all__ = [
    "KRB5",
    "NOISE",
    "TLS",
    "AcceptorFactory",
    "AcceptorHandshake",
    "MechanismInfo",
    "PerMessage",
    "Session",
    "Unwrapped",
    "acceptor_factories",
    "import_session",
    "sealed_mechanism",
]

Clock = Callable[[], float]


class Unwrapped(Protocol):
    """What a session's ``unwrap`` returns."""

    @property
    def data(self) -> bytes: ...
    @property
    def conf_state(self) -> bool: ...
    @property
    def supplementary(self) -> int: ...


class PerMessage(Protocol):
    """Per-message protection of an established context, initiator or acceptor: all a
    :class:`handoffd.runtime.stream.SecureStream` needs."""

    def wrap(self, data: bytes, conf_req: bool = True, qop: int = 0) -> bytes: ...
    def unwrap(self, token: bytes) -> Unwrapped: ...
    def get_mic(self, message: bytes, qop: int = 0) -> bytes: ...
    def verify_mic(self, message: bytes, token: bytes) -> int: ...


class Session(PerMessage, Protocol):
    """An established (imported) context: the per-message surface a worker uses."""

    @property
    def peer_name(self) -> str: ...
    @property
    def peer_fingerprint(self) -> str | None: ...
    @property
    def flags(self) -> Flags: ...
    @property
    def anonymous(self) -> bool: ...
    @property
    def context_id(self) -> str: ...

    def delete(self) -> None: ...


class AcceptorHandshake(Protocol):
    """The acceptor's context while the handshake runs, then until export."""

    @property
    def peer_name(self) -> str: ...

    def step(self, token: bytes | None) -> tuple[int, bytes]: ...
    def export(self, unread: bytes = b"") -> bytes: ...


class AcceptorFactory(Protocol):
    """One enabled mechanism on the acceptor: makes a fresh context per connection."""

    info: MechanismInfo

    def first_token(self, token: bytes) -> bytes:
        """What the mechanism's first ``step`` takes, given the whole first token."""
        ...

    def new_context(self) -> AcceptorHandshake: ...


class MechanismInfo:
    """The three names of a mechanism (module docstring)."""

    __slots__ = ("max_handshake_frame", "name", "oid", "oid_der", "seal_id")

    def __init__(self, name: str, oid: str, seal_id: int, *, max_handshake_frame: int) -> None:
        from handoffd.core.framing import encode_oid

        self.name = name
        self.oid = oid
        contents = encode_oid(oid)
        self.oid_der = b"\x06" + bytes([len(contents)]) + contents
        self.seal_id = seal_id
        # The largest HANDSHAKE frame body the acceptor reads for this mechanism: what
        # bounds a handshake's memory (slots x this), whatever a client announces.
        self.max_handshake_frame = max_handshake_frame

    def __repr__(self) -> str:
        return f"<mechanism {self.name} {self.oid}>"


def _noise_oid() -> str:
    from handoffd.core.framing import MECH_OID

    return MECH_OID


# Noise XX messages are at most ~200 bytes here (the spec's own ceiling is 64 KiB); a
# krb5 AP-REQ carries a ticket with its PAC, which Active Directory lets reach 64 KiB
# (MaxTokenSize) and beyond for users in very many groups: 256 KiB leaves room.
NOISE: Final = MechanismInfo("noise", _noise_oid(), 1, max_handshake_frame=64 * 1024)
KRB5: Final = MechanismInfo("krb5", "1.2.840.113554.1.2.2", 2,
                            max_handshake_frame=256 * 1024)
MECHANISMS: Final = {m.name: m for m in (NOISE, KRB5)}
"""The mechanisms a client's first token can name, by configuration name."""

# TLS listeners speak TLS from the first byte ([tls], handoffd.mech.tls): the OID is never
# on the wire; the seal id names TLS sessions in sealed handoff tokens.
TLS: Final = MechanismInfo("tls", "2.25.69207048195977104655848167048146508387", 3,
                           max_handshake_frame=(1 << 14) + 256)

_SEAL_HEAD: Final = struct.Struct(">BH")  # version, mechanism: the sealed token's first bytes
_BY_SEAL_ID: Final = {m.seal_id: m for m in (*MECHANISMS.values(), TLS)}  # ids are unique


def sealed_mechanism(sealed: bytes) -> MechanismInfo:
    """The mechanism a sealed handoff token claims to hold (unauthenticated!).

    The worker uses it only to choose which import to run and passes its seal
    id to ``open_sealed(mech=...)``, which checks it after the tag verifies.
    An unknown or truncated claim is the seal's own opaque ``EXPORT_TOKEN_INVALID``.
    """
    if len(sealed) >= _SEAL_HEAD.size:
        mechanism = _BY_SEAL_ID.get(_SEAL_HEAD.unpack_from(sealed)[1])
        if mechanism is not None:
            return mechanism
    from handoffd.status import GSS_S_DEFECTIVE_TOKEN

    raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.EXPORT_TOKEN_INVALID)


def import_session(mechanism: MechanismInfo, blob: bytes, *, clock: Clock
                   ) -> tuple[Session, bytes]:
    """Import an opened export token of ``mechanism``; the session and its unread bytes."""
    if mechanism is KRB5:
        from handoffd.mech import krb5

        return krb5.import_session(blob)
    from handoffd.mech import noise

    return noise.import_session(blob, clock=clock)


def acceptor_factories(config: Config, *, clock: Clock) -> dict[bytes, AcceptorFactory]:
    """The enabled mechanisms of ``[server] mechanisms``, keyed by their DER OID."""
    out: dict[bytes, AcceptorFactory] = {}
    for name in config.server.mechanisms:
        factory: AcceptorFactory
        if name == "noise":
            from handoffd.mech import noise

            factory = noise.NoiseAcceptorFactory.from_config(config, clock=clock)
        elif name == "krb5":
            from handoffd.mech import krb5

            factory = krb5.Krb5AcceptorFactory.from_config(config)
        else:  # config validation allows only known names
            raise GSSError(GSS_S_FAILURE, Minor.CONFIG_INVALID,
                           f"[server] mechanisms: unknown mechanism {name!r}")
        out[factory.info.oid_der] = factory
    return out


def select(factories: Mapping[bytes, AcceptorFactory], oid_der: bytes) -> AcceptorFactory:
    """The enabled mechanism for the OID of a first token; any other is ``GSS_S_BAD_MECH``."""
    factory = factories.get(oid_der)
    if factory is None:
        raise GSSError(GSS_S_BAD_MECH, Minor.TOKEN_BAD_MECH_OID,
                       "the client asked for a mechanism this server does not offer")
    return factory
