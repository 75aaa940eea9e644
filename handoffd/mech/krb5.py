"""Kerberos V5 through GSS-API (``pip install handoffd[krb5]``): MIT krb5 via ``gssapi``.

The acceptor accepts with a keytab only it can read; the established context
is exported with MIT's ``gss_export_sec_context`` and that token is sealed,
parked and handed off exactly like a Noise context (``docs/KRB5.md``).  MIT's
token holds the session keys and imports any number of times; handoffd's
seal with a key parked in one worker's keyring, burned on first use, makes it
import once.

Wire: the client's first token is MIT's own RFC 2743 token (``0x60``, the
krb5 OID ``1.2.840.113554.1.2.2``, the AP-REQ), carried whole in a HANDSHAKE
frame; the acceptor's AP-REP comes back in one; per-message tokens are RFC
4121 wrap tokens in MESSAGE frames.

Every library failure becomes a handoffd :class:`GSSError` with the library's major
status unchanged, the minor ``KRB5_LIBRARY_ERROR`` (1104), and MIT's own minor code and
display text in the detail.
``gssapi`` is imported on first use only: without it, using this module is
``GSS_S_UNAVAILABLE`` / ``KRB5_UNAVAILABLE``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from handoffd.core.context import Flags, Unwrapped
from handoffd.mech import KRB5, MechanismInfo
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_BAD_QOP,
    GSS_S_COMPLETE,
    GSS_S_CONTINUE_NEEDED,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_NO_CONTEXT,
    GSS_S_UNAUTHORIZED,
    GSS_S_UNAVAILABLE,
    GSSError,
)

if TYPE_CHECKING:
    from handoffd.config import Config

__all__ = [
    "Krb5AcceptorFactory",
    "Krb5Initiator",
    "Krb5Session",
    "available",
    "import_session",
]

_ENVELOPE_VERSION: Final = 1
_ENVELOPE_HEAD: Final = struct.Struct(">BI")  # version, length of MIT's token; then unread
_KNOWN_FLAGS: Final = 0x1FF  # GSS_C_DELEG_FLAG .. GSS_C_TRANS_FLAG (RFC 2744)


def _gssapi() -> Any:
    """The ``gssapi`` package, or ``GSS_S_UNAVAILABLE`` saying how to get it."""
    try:
        # By name: mypy --strict stays clean where the optional extra is not installed.
        importlib.import_module("gssapi.raw.misc")
        return importlib.import_module("gssapi")
    except ImportError as error:
        raise GSSError(GSS_S_UNAVAILABLE, Minor.KRB5_UNAVAILABLE, str(error)) from None


def available() -> bool:
    """True when the ``gssapi`` package (and so MIT's libraries) can be loaded."""
    try:
        _gssapi()
    except GSSError:
        return False
    return True


def _translate(error: Any) -> GSSError:
    """The library's major status unchanged; its minor, which is MIT's and not handoffd's,
    goes into the detail with MIT's display text (never key material), and the minor
    field says ``KRB5_LIBRARY_ERROR``: no number means two things."""
    mit_minor = int(error.min_code) & 0xFFFFFFFF
    try:
        text = error.gen_message()
    except Exception:  # display itself failed: keep the codes
        text = "GSS-API failure"
    return GSSError(int(error.maj_code), Minor.KRB5_LIBRARY_ERROR,
                    f"MIT krb5 minor {mit_minor}: {text}")


@contextlib.contextmanager
def _library_calls() -> Iterator[None]:
    """Run library calls, turning ``gssapi.raw.misc.GSSError`` into handoffd's."""
    library_error: Any = _gssapi().raw.misc.GSSError
    try:
        yield
    except library_error as error:
        raise _translate(error) from None


def _flags(context: Any) -> Flags:
    value = 0
    for flag in context.actual_flags:
        value |= int(flag)
    return Flags(value & _KNOWN_FLAGS)


class Krb5Session:
    """An established krb5 context: wrap/unwrap/MIC; what a worker serves a client with."""

    def __init__(self, context: Any) -> None:
        self._context: Any = context
        self._context_id = os.urandom(4).hex()

    def _open(self) -> Any:
        if self._context is None:
            raise GSSError(GSS_S_NO_CONTEXT, Minor.CONTEXT_DELETED)
        return self._context

    @property
    def peer_name(self) -> str:
        """The peer's principal (the client's on the acceptor side)."""
        context = self._open()
        with _library_calls():
            name = context.target_name if context.locally_initiated else context.initiator_name
            return str(name)

    @property
    def peer_fingerprint(self) -> str | None:
        """Always None: Kerberos names principals, not keys."""
        return None

    @property
    def flags(self) -> Flags:
        """The context's returned flags."""
        with _library_calls():
            return _flags(self._open())

    @property
    def anonymous(self) -> bool:
        """True for an anonymous (``WELLKNOWN/ANONYMOUS``) initiator."""
        return bool(self.flags & Flags.ANON)

    @property
    def context_id(self) -> str:
        """A local identifier for logs (MIT exposes none that both sides share)."""
        return self._context_id

    def wrap(self, data: bytes, conf_req: bool = True, qop: int = 0) -> bytes:
        """An RFC 4121 wrap token for ``data``."""
        if qop:
            raise GSSError(GSS_S_BAD_QOP, Minor.BAD_QOP_REQUESTED)
        with _library_calls():
            return bytes(self._open().wrap(data, conf_req).message)

    def unwrap(self, token: bytes) -> Unwrapped:
        """Open a wrap token; a replayed or reordered one raises with its supplementary bits."""
        with _library_calls():
            result = self._open().unwrap(token)
        return Unwrapped(bytes(result.message), bool(result.encrypted), 0)

    def get_mic(self, message: bytes, qop: int = 0) -> bytes:
        """An RFC 4121 MIC token."""
        if qop:
            raise GSSError(GSS_S_BAD_QOP, Minor.BAD_QOP_REQUESTED)
        with _library_calls():
            return bytes(self._open().get_signature(message))

    def verify_mic(self, message: bytes, token: bytes) -> int:
        """Check a MIC; returns the supplementary bits (0: the library raises otherwise)."""
        with _library_calls():
            self._open().verify_signature(message, token)
        return 0

    def delete(self) -> None:
        """Forget the context (the library frees it)."""
        self._context = None


class Krb5Acceptor:
    """The acceptor's context for one connection, until it is exported.

    ``allowed`` names the client principals admitted; empty admits any.
    """

    def __init__(self, context: Any, allowed: frozenset[str] = frozenset()) -> None:
        self._context: Any = context
        self._allowed = allowed

    @property
    def peer_name(self) -> str:
        """The client's principal once established."""
        if self._context is None:
            return ""
        with _library_calls():
            name = self._context.initiator_name
        return str(name) if name is not None else ""

    def step(self, token: bytes | None) -> tuple[int, bytes]:
        """``gss_accept_sec_context``: ``(major, output token)``; failures raise."""
        if self._context is None:
            raise GSSError(GSS_S_NO_CONTEXT, Minor.CONTEXT_EXPORTED)
        if token is None:
            raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.HANDSHAKE_OUT_OF_ORDER,
                           "the acceptor needs the initiator's token")
        with _library_calls():
            output = self._context.step(token)
            complete = bool(self._context.complete)
        if complete and self._allowed and self.peer_name not in self._allowed:
            principal = self.peer_name
            self._context = None  # refused: the context dies, as a Noise one does
            raise GSSError(GSS_S_UNAUTHORIZED, Minor.KRB5_PRINCIPAL_NOT_ALLOWED,
                           f"client principal {principal}")
        return (GSS_S_COMPLETE if complete else GSS_S_CONTINUE_NEEDED), bytes(output or b"")

    def export(self, unread: bytes = b"") -> bytes:
        """MIT's export token in handoffd's envelope with the unread client bytes.

        Layout: version u8 = 1 | length u32 | MIT token | unread.  This
        object is dead afterwards; the envelope holds keys: seal it.
        """
        if self._context is None:
            raise GSSError(GSS_S_NO_CONTEXT, Minor.CONTEXT_EXPORTED)
        with _library_calls():
            if not self._context.complete:
                raise GSSError(GSS_S_UNAVAILABLE, Minor.KRB5_NOT_ESTABLISHED, "export")
            token = bytes(self._context.export())
        self._context = None
        return _ENVELOPE_HEAD.pack(_ENVELOPE_VERSION, len(token)) + token + unread


class Krb5AcceptorFactory:
    """Acceptor credentials from the keytab, acquired once; one context per connection."""

    info: MechanismInfo = KRB5

    def __init__(self, *, keytab: Path, service: str | None,
                 allowed_principals: tuple[str, ...] = ()) -> None:
        gssapi = _gssapi()
        with _library_calls():
            name = None if service is None else gssapi.Name(
                service, gssapi.NameType.hostbased_service)
            # The keytab is named here, for this process only: workers never see it.
            self._credentials = gssapi.Credentials(
                name=name, usage="accept", store={"keytab": str(keytab)})
        self.keytab = keytab
        self.service = service
        self.allowed_principals = frozenset(allowed_principals)

    @classmethod
    def from_config(cls, config: Config) -> Krb5AcceptorFactory:
        """From ``[krb5] keytab`` and ``service``."""
        assert config.krb5.keytab is not None  # config validation requires it
        return cls(keytab=config.krb5.keytab, service=config.krb5.service,
                   allowed_principals=config.krb5.allowed_principals)

    def first_token(self, token: bytes) -> bytes:
        """MIT takes the whole RFC 2743 token (it checks its own OID)."""
        return token

    def new_context(self) -> Krb5Acceptor:
        """A context for one connection."""
        gssapi = _gssapi()
        with _library_calls():
            return Krb5Acceptor(gssapi.SecurityContext(creds=self._credentials, usage="accept"),
                                self.allowed_principals)


class Krb5Initiator(Krb5Session):
    """The client side: a context for ``service@host`` from the user's ticket cache.

    ``step(None)`` gives the first token, already in RFC 2743 framing (send it
    as is); ``step(AP-REP)`` completes mutual authentication.
    """

    first_token_framed = True

    def __init__(self, service: str, *, lifetime: float | None = None) -> None:
        gssapi = _gssapi()
        flags = (gssapi.RequirementFlag.mutual_authentication
                 | gssapi.RequirementFlag.replay_detection
                 | gssapi.RequirementFlag.out_of_sequence_detection
                 | gssapi.RequirementFlag.confidentiality
                 | gssapi.RequirementFlag.integrity)
        with _library_calls():
            name = gssapi.Name(service, gssapi.NameType.hostbased_service)
            context = gssapi.SecurityContext(
                name=name, usage="initiate", flags=flags, mech=gssapi.MechType.kerberos,
                lifetime=None if lifetime is None else max(1, int(lifetime)))
        super().__init__(context)

    def step(self, token: bytes | None) -> tuple[int, bytes]:
        """``gss_init_sec_context``: ``(major, output token)``; failures raise."""
        context = self._open()
        with _library_calls():
            output = context.step(token)
            complete = bool(context.complete)
        return (GSS_S_COMPLETE if complete else GSS_S_CONTINUE_NEEDED), bytes(output or b"")


def import_session(blob: bytes) -> tuple[Krb5Session, bytes]:
    """Open an envelope from :meth:`Krb5Acceptor.export`; the session and unread bytes."""
    if len(blob) < _ENVELOPE_HEAD.size:
        raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.KRB5_EXPORT_INVALID, "truncated")
    version, length = _ENVELOPE_HEAD.unpack_from(blob)
    end = _ENVELOPE_HEAD.size + length
    if version != _ENVELOPE_VERSION or end > len(blob):
        raise GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.KRB5_EXPORT_INVALID, "envelope")
    gssapi = _gssapi()
    with _library_calls():
        context = gssapi.SecurityContext(token=blob[_ENVELOPE_HEAD.size:end])
    return Krb5Session(context), blob[end:]
