"""TLS 1.3 as a handed-off mechanism: OpenSSL runs the handshake in the acceptor.

The acceptor drives a pyOpenSSL server over memory BIOs (:class:`TlsServerHandshake`,
sans-I/O: bytes from the socket in, bytes for the socket out), with TLS 1.3 as both the
minimum and the maximum version, so a TLS 1.2-only client gets OpenSSL's
``protocol_version`` alert.  The application traffic secrets come from OpenSSL's key-log
callback (kept in this object only, never logged or written); the handshake is fed one
whole record at a time so that it stops exactly after the client's Finished, and
whatever the client sent behind it stays ciphertext for the worker.  The session tickets
OpenSSL writes when the handshake completes are records under the server's key: their
count is the worker's first write sequence number.

:meth:`TlsServerHandshake.export` gives a :class:`handoffd.core.tls_export.TlsExport`;
the worker continues with :class:`handoffd.core.tls_record.TlsRecordSession`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from OpenSSL import SSL, crypto

from handoffd.core.tls_export import TlsExport
from handoffd.core.tls_identity import allowed, certificate_identity, peer_name
from handoffd.core.tls_keys import SUITES, suite_by_code
from handoffd.core.tls_record import HEADER, MAX_CIPHERTEXT, AlertDescription, TlsRecordSession
from handoffd.mech import TLS
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSS_S_NO_CRED,
    GSS_S_UNAUTHORIZED,
    GSSError,
)

if TYPE_CHECKING:
    from handoffd.config import Config

__all__ = ["TLS", "TlsAcceptorFactory", "TlsServerHandshake", "TlsSettings"]


_RECORD_HANDSHAKE: Final = 22
_RECORD_ALERT: Final = 21
_RECORD_CCS: Final = 20
_SUITE_BY_NAME: Final = {s.name: s for s in SUITES.values()}
_SECRET_LABELS: Final = (b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0")


@dataclass(frozen=True)
class TlsSettings:
    """What the acceptor's TLS listeners serve (``[tls]`` in the configuration)."""

    certificate: Path
    key: Path
    alpn: tuple[str, ...] = ("http/1.1",)
    sni: Mapping[str, tuple[Path, Path]] = field(default_factory=dict)
    client_ca: Path | None = None
    require_client_certificate: bool = False
    # "subject:<RFC 4514>", "san:<DNS|email|URI|IP>:<value>" or "spki:<sha256 hex>"
    allowed_clients: tuple[str, ...] = ()
    peer_name: str = "subject"  # what a worker sees as the peer: subject, san or spki
    context_lifetime: float = 3600.0
    # The client's whole handshake flight (a certificate chain included) is bounded.
    max_handshake_bytes: int = 256 * 1024


class TlsAcceptorFactory:
    """The acceptor's TLS contexts: one per certificate (the default and each SNI name)."""

    info = TLS

    @classmethod
    def from_config(cls, config: Config) -> TlsAcceptorFactory:
        """The factory for ``[tls]`` (whose certificate and key ``parse_config`` required)."""
        tls = config.tls
        assert tls.certificate is not None and tls.key is not None
        return cls(
            TlsSettings(
                certificate=tls.certificate, key=tls.key, alpn=tls.alpn,
                sni={name: (cert, key) for name, cert, key in tls.sni},
                client_ca=tls.client_ca, require_client_certificate=tls.require_client_certificate,
                allowed_clients=tls.allowed_clients, peer_name=tls.peer_name,
                context_lifetime=config.server.context_lifetime,
            )
        )  # fmt: skip

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._default = self._context(settings.certificate, settings.key)
        self._by_name = {
            name.lower(): self._context(*paths) for name, paths in settings.sni.items()
        }

    def _context(self, certificate: Path, key: Path) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        try:
            ctx.use_certificate_chain_file(str(certificate))
            ctx.use_privatekey_file(str(key))
            ctx.check_privatekey()
        except (SSL.Error, OSError) as err:
            raise GSSError(
                GSS_S_NO_CRED,
                Minor.TLS_CERTIFICATE_INVALID,
                f"{certificate} / {key}: {_reason(err)}",
            ) from None
        ctx.set_keylog_callback(_keylog)
        ctx.set_alpn_select_callback(self._select_alpn)
        ctx.set_tlsext_servername_callback(self._servername)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        if self.settings.client_ca is not None:
            try:
                ctx.load_verify_locations(str(self.settings.client_ca))
            except SSL.Error as err:
                raise GSSError(
                    GSS_S_NO_CRED, Minor.TLS_CERTIFICATE_INVALID,
                    f"{self.settings.client_ca}: {_reason(err)}",
                ) from None  # fmt: skip
            mode = SSL.VERIFY_PEER
            if self.settings.require_client_certificate:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            ctx.set_verify(mode, self._verify)
        return ctx

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in self.settings.alpn:
            if protocol.encode() in offered:
                return protocol.encode()
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def _servername(self, conn: SSL.Connection) -> None:
        name = conn.get_servername()
        ctx = self._by_name.get(name.decode(errors="replace").lower()) if name else None
        if ctx is not None:
            conn.set_context(ctx)

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        # The chain only: the allow-list is applied once the handshake is complete, so the
        # refusal can be the alert RFC 8446 names for it (access_denied), under the
        # session's key, rather than whatever OpenSSL makes of a failed callback.
        return bool(ok)

    def new_handshake(self) -> TlsServerHandshake:
        return TlsServerHandshake(self)


def _keylog(conn: SSL.Connection, line: bytes) -> None:
    handshake = conn.get_app_data()
    label, _, rest = line.partition(b" ")
    if isinstance(handshake, TlsServerHandshake) and label in _SECRET_LABELS:
        handshake._secrets[label] = bytes.fromhex(rest.split(b" ")[-1].decode())


def _reason(err: Exception) -> str:
    if isinstance(err, SSL.Error) and err.args and isinstance(err.args[0], list):
        parts = [str(e[-1]) for e in err.args[0] if isinstance(e, tuple) and e]
        if parts:
            return ", ".join(parts)
    return str(err) or type(err).__name__


def _records(data: bytes) -> int:
    count = 0
    while len(data) >= HEADER.size:
        _, _, length = HEADER.unpack_from(data)
        data = data[HEADER.size + length :]
        count += 1
    return count


class TlsServerHandshake:
    """One TLS 1.3 server handshake over memory BIOs (sans-I/O).

    :meth:`receive_data` takes bytes from the socket and returns bytes to send; once
    :attr:`complete`, :meth:`export` gives the session's state.  A failure raises
    :class:`GSSError` after OpenSSL's alert, if any, was put in :attr:`alert_bytes`.
    """

    def __init__(self, factory: TlsAcceptorFactory) -> None:
        self._factory = factory
        self._conn = SSL.Connection(factory._default, None)
        self._conn.set_accept_state()
        self._conn.set_app_data(self)
        self._pending = bytearray()  # from the socket, not yet given to OpenSSL
        self._consumed = 0
        self._secrets: dict[bytes, bytes] = {}
        self._tickets = 0
        self.complete = False
        self.alert_bytes = b""
        self.records_seen = 0

    def receive_data(self, data: bytes) -> bytes:
        """Feed socket bytes; returns what OpenSSL wants sent (its flight, tickets, alerts)."""
        if self.complete:
            self._pending += data
            return b""
        self._pending += data
        out = bytearray()
        while not self.complete:
            record = self._next_record()
            if record is None:
                break
            self._conn.bio_write(record)
            self.records_seen += 1
            try:
                self._conn.do_handshake()
            except SSL.WantReadError:
                out += self._drain()
                continue
            except SSL.Error as err:
                self.alert_bytes = self._drain()
                raise self._failure(err) from None
            tickets = self._drain()  # written once the client's Finished was read
            self._tickets = _records(tickets)
            out += tickets
            self.complete = True
            self._authorize(bytes(out))
        return bytes(out)

    def _authorize(self, unsent: bytes) -> None:
        allow_list = self._factory.settings.allowed_clients
        if not allow_list or allowed(self.peer_identity, allow_list):
            return
        name = self.peer_name
        self.alert_bytes = unsent + self._refusal_alert()
        raise GSSError(GSS_S_UNAUTHORIZED, Minor.TLS_CLIENT_NOT_ALLOWED, name)

    def _refusal_alert(self) -> bytes:
        """access_denied under the server's application key, after OpenSSL's tickets."""
        export = self.export()
        session = TlsRecordSession(
            suite_by_code(export.suite), export.client_secret, export.server_secret,
            write_sequence=export.server_sequence,
        )  # fmt: skip
        return session.alert(AlertDescription.access_denied)

    def _next_record(self) -> bytes | None:
        if len(self._pending) < HEADER.size:
            return None
        record_type, _, length = HEADER.unpack_from(self._pending)
        if self.records_seen == 0 and record_type != _RECORD_HANDSHAKE:
            raise GSSError(
                GSS_S_DEFECTIVE_TOKEN,
                Minor.TLS_NOT_TLS,
                f"first bytes {bytes(self._pending[:8])!r}",
            )
        if (
            record_type not in (_RECORD_HANDSHAKE, _RECORD_ALERT, _RECORD_CCS, 23)
            or length > MAX_CIPHERTEXT
        ):
            raise GSSError(
                GSS_S_DEFECTIVE_TOKEN, Minor.TLS_HANDSHAKE_FAILED,
                f"a record of type {record_type} and {length} bytes in the handshake",
            )  # fmt: skip
        if len(self._pending) < HEADER.size + length:
            return None
        self._consumed += HEADER.size + length
        limit = self._factory.settings.max_handshake_bytes
        if self._consumed > limit:
            raise GSSError(
                GSS_S_DEFECTIVE_TOKEN,
                Minor.TOKEN_TOO_LARGE,
                f"the client's handshake is over {limit} bytes",
            )
        record = bytes(self._pending[: HEADER.size + length])
        del self._pending[: HEADER.size + length]
        return record

    def _drain(self) -> bytes:
        out = bytearray()
        while True:
            try:
                chunk = self._conn.bio_read(65536)
            except SSL.WantReadError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk

    def _failure(self, err: SSL.Error) -> GSSError:
        return GSSError(GSS_S_FAILURE, Minor.TLS_HANDSHAKE_FAILED, _reason(err))

    @property
    def peer_identity(self) -> dict[str, object]:
        cert = self._conn.get_peer_certificate()
        return certificate_identity(cert.to_cryptography()) if cert is not None else {}

    @property
    def peer_name(self) -> str:
        return peer_name(self.peer_identity, self._factory.settings.peer_name)

    def export(self) -> TlsExport:
        """The session's state for a worker; the handshake object holds no secret after it."""
        if not self.complete:
            raise GSSError(GSS_S_FAILURE, Minor.CONTEXT_NOT_ESTABLISHED, "TLS handshake")
        name = self._conn.get_cipher_name()
        suite = _SUITE_BY_NAME.get(name or "")
        if suite is None:
            raise GSSError(GSS_S_FAILURE, Minor.TLS_SUITE_UNSUPPORTED, str(name))
        try:
            client_secret, server_secret = (self._secrets.pop(label) for label in _SECRET_LABELS)
        except KeyError:
            raise GSSError(
                GSS_S_FAILURE, Minor.TLS_STATE_INVALID, "OpenSSL logged no traffic secret"
            ) from None
        identity = self.peer_identity
        if identity:
            identity["name"] = peer_name(identity, self._factory.settings.peer_name)
        expiry = time.time() + self._factory.settings.context_lifetime
        if identity:
            expiry = min(expiry, float(identity["not_after"]))  # type: ignore[arg-type]
        servername = self._conn.get_servername()
        export = TlsExport(
            suite=suite.code, client_secret=client_secret, server_secret=server_secret,
            client_sequence=0, server_sequence=self._tickets, expiry=int(expiry),
            context_id=os.urandom(16), alpn=self._conn.get_alpn_proto_negotiated() or b"",
            sni=servername.decode(errors="replace") if servername else "", peer=identity,
            unread=bytes(self._pending),
        )  # fmt: skip
        self._secrets.clear()
        self._pending.clear()
        return export
