"""The mechanism registry without a KDC: configuration, selection by OID, the sealed
token's mechanism field, and the krb5 mechanism's behaviour when gssapi is absent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from handoffd.config import parse_config
from handoffd.core.framing import MECH_OID_DER, read_first_token, wrap_first_token
from handoffd.core.seal import open_sealed, seal
from handoffd.mech import KRB5, MECHANISMS, NOISE, acceptor_factories, sealed_mechanism, select
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_BAD_MECH,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSS_S_UNAVAILABLE,
    GSSError,
)

BASE = Path("/etc/handoffd")


def test_noise_is_the_default_and_the_only_mechanism_unless_configured() -> None:
    config = parse_config({}, base=BASE)
    assert config.server.mechanisms == ("noise",)
    assert config.krb5.keytab is None


def test_krb5_config_resolves_the_keytab_against_the_config_directory() -> None:
    config = parse_config({"server": {"mechanisms": ["krb5"]},
                           "krb5": {"keytab": "http.keytab", "service": "HTTP@example.org"}},
                          base=BASE)
    assert config.server.mechanisms == ("krb5",)
    assert config.krb5.keytab == BASE / "http.keytab"
    assert config.krb5.service == "HTTP@example.org"


@pytest.mark.parametrize("data, where", [
    ({"server": {"mechanisms": ["krb5"]}}, "[krb5] keytab"),
    ({"server": {"mechanisms": ["spnego"]}}, "unknown mechanism 'spnego'"),
    ({"server": {"mechanisms": []}}, "at least one"),
    ({"server": {"mechanisms": ["noise", "noise"]}}, "twice"),
    ({"krb5": {"keytab": "k", "principal": "x"}}, "[krb5] principal"),
])
def test_bad_mechanism_config_names_the_key(data: dict[str, object], where: str) -> None:
    with pytest.raises(GSSError) as caught:
        parse_config(data, base=BASE)
    assert caught.value.major == GSS_S_FAILURE
    assert caught.value.minor == Minor.CONFIG_INVALID
    assert where in (caught.value.detail or "")


def test_mechanism_names_oids_and_seal_ids_are_distinct() -> None:
    assert NOISE.oid_der == MECH_OID_DER
    assert len({m.oid_der for m in MECHANISMS.values()}) == len(MECHANISMS)
    assert len({m.seal_id for m in MECHANISMS.values()}) == len(MECHANISMS)
    # krb5's DER OID is the one MIT's tokens open with (RFC 1964 §1.1).
    assert KRB5.oid_der == bytes.fromhex("06092a864886f712010202")


def test_a_first_token_for_a_mechanism_that_is_not_enabled_is_bad_mech(tmp_path: Path) -> None:
    from handoffd import keyfiles
    from handoffd.core.credentials import StaticKeyPair

    keyfiles.save_private_key(tmp_path / "server.key", StaticKeyPair.generate(os.urandom))
    config = parse_config({"server": {"key": "server.key"}}, base=tmp_path)
    factories = acceptor_factories(config, clock=lambda: 0.0)
    assert list(factories) == [NOISE.oid_der]
    krb5_token = wrap_first_token(b"\x01\x00ap-req", KRB5.oid_der)
    oid, _ = read_first_token(krb5_token)
    with pytest.raises(GSSError) as caught:
        select(factories, oid)
    assert (caught.value.major, caught.value.minor) == (GSS_S_BAD_MECH,
                                                        Minor.TOKEN_BAD_MECH_OID)
    assert select(factories, NOISE.oid_der) is factories[NOISE.oid_der]


def test_the_sealed_mechanism_field_picks_the_import_and_is_authenticated() -> None:
    key, worker_id = os.urandom(32), os.urandom(16)
    token = seal(key, plaintext=b"ctx", mech=KRB5.seal_id, worker_id=worker_id,
                 expires_at=2**40, nonce=os.urandom(12))
    assert sealed_mechanism(token) is KRB5
    assert open_sealed(key, token, worker_id=worker_id, now=0, mech=KRB5.seal_id) == b"ctx"
    # Claiming Noise instead breaks the tag: the field cannot be changed in transit.
    forged = token[:1] + NOISE.seal_id.to_bytes(2, "big") + token[3:]
    assert sealed_mechanism(forged) is NOISE
    with pytest.raises(GSSError) as caught:
        open_sealed(key, forged, worker_id=worker_id, now=0, mech=NOISE.seal_id)
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                        Minor.EXPORT_TOKEN_INVALID)


@pytest.mark.parametrize("sealed", [b"", b"\x01", b"\x01\x00\x63" + bytes(60)])
def test_an_unknown_or_truncated_mechanism_claim_is_the_opaque_invalid_token(
        sealed: bytes) -> None:
    with pytest.raises(GSSError) as caught:
        sealed_mechanism(sealed)
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                        Minor.EXPORT_TOKEN_INVALID)


def test_krb5_without_gssapi_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    for name in [m for m in sys.modules if m == "gssapi" or m.startswith("gssapi.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gssapi", None)
    monkeypatch.setitem(sys.modules, "gssapi.raw", None)
    monkeypatch.setitem(sys.modules, "gssapi.raw.misc", None)
    from handoffd.mech import krb5

    assert not krb5.available()
    with pytest.raises(GSSError) as caught:
        krb5.Krb5Initiator("host@localhost")
    assert (caught.value.major, caught.value.minor) == (GSS_S_UNAVAILABLE,
                                                        Minor.KRB5_UNAVAILABLE)
    with pytest.raises(GSSError) as caught:
        krb5.import_session(b"\x01\x00\x00\x00\x00")
    assert caught.value.minor == Minor.KRB5_UNAVAILABLE


@pytest.mark.parametrize("blob", [b"", b"\x01\x00\x00", b"\x02\x00\x00\x00\x00",
                                  b"\x01\x00\x00\x00\x09short"])
def test_a_malformed_krb5_envelope_is_defective(blob: bytes) -> None:
    from handoffd.mech import krb5

    with pytest.raises(GSSError) as caught:
        krb5.import_session(blob)
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                        Minor.KRB5_EXPORT_INVALID)
