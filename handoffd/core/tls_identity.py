"""Who a TLS client certificate names, as the acceptor checks it and a worker sees it.

Pure: a parsed certificate in, plain values out (``docs/TLS.md``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["allowed", "certificate_identity", "peer_name"]


def certificate_identity(cert: x509.Certificate) -> dict[str, object]:
    """The identity of a client certificate as a worker sees it (``stream.info["peer"]``)."""
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [_general_name(n) for n in san_ext]
    except x509.ExtensionNotFound:
        sans = []
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "san": sans,
        "spki_sha256": hashlib.sha256(spki).hexdigest(),
        "not_after": int(cert.not_valid_after_utc.timestamp()),
    }


def _general_name(name: x509.GeneralName) -> str:
    kinds = {x509.DNSName: "DNS", x509.RFC822Name: "email", x509.UniformResourceIdentifier: "URI"}
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    for kind, label in kinds.items():
        if isinstance(name, kind):
            return f"{label}:{name.value}"
    return f"other:{name.value!r}"


def allowed(identity: Mapping[str, Any], allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        kind, _, value = entry.partition(":")
        if kind == "subject" and identity["subject"] == value:
            return True
        if kind == "san" and value in identity["san"]:
            return True
        if kind == "spki" and identity["spki_sha256"] == value.lower():
            return True
    return False


def peer_name(identity: Mapping[str, Any], how: str) -> str:
    """The name a worker sees for a client certificate (``[tls] peer_name``)."""
    if not identity:
        return "anonymous"
    if how == "spki":
        return f"spki:{identity['spki_sha256']}"
    if how == "san" and identity["san"]:
        return str(identity["san"][0])
    return str(identity["subject"])
