"""handoffd's default mechanism, Noise XX (:mod:`handoffd.core.context`), behind the registry.

The pure core does all the work; this module only builds acceptor contexts
from the configuration and imports exported ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from handoffd.core.context import AcceptorContext, SecurityContext, import_context
from handoffd.core.credentials import AllowList, StaticKeyPair
from handoffd.core.framing import unwrap_first_token
from handoffd.mech import NOISE, MechanismInfo

if TYPE_CHECKING:
    from handoffd.config import Config

Clock = Callable[[], float]


class NoiseAcceptorFactory:
    """Fresh :class:`AcceptorContext` objects with the server's key and policy."""

    info: MechanismInfo = NOISE

    def __init__(self, *, static_key: StaticKeyPair, allow_list: AllowList | None,
                 allow_anonymous: bool, lifetime: float, clock: Clock) -> None:
        self.static_key = static_key
        self.allow_list = allow_list
        self.allow_anonymous = allow_anonymous
        self.lifetime = lifetime
        self.clock = clock

    @classmethod
    def from_config(cls, config: Config, *, clock: Clock) -> NoiseAcceptorFactory:
        """Load ``[server] key`` and ``allowed_clients`` (errors are ``GSSError``)."""
        from handoffd import keyfiles

        server = config.server
        return cls(
            static_key=keyfiles.load_private_key(server.key),
            allow_list=keyfiles.load_allow_list(server.allowed_clients)
            if server.allowed_clients else None,
            allow_anonymous=server.allow_anonymous,
            lifetime=server.context_lifetime,
            clock=clock,
        )

    def first_token(self, token: bytes) -> bytes:
        """The Noise message inside the RFC 2743 framing."""
        return unwrap_first_token(token, NOISE.oid_der)

    def new_context(self) -> AcceptorContext:
        """A context for one connection."""
        return AcceptorContext(static_key=self.static_key, allow_list=self.allow_list,
                               allow_anonymous=self.allow_anonymous, lifetime=self.lifetime,
                               clock=self.clock, random=os.urandom)


def import_session(blob: bytes, *, clock: Clock) -> tuple[SecurityContext, bytes]:
    """:func:`handoffd.core.context.import_context`."""
    return import_context(blob, clock=clock)
