"""The TLS export's bytes (docs/TLS.md): round trip, strictness, and never anything but a
GSS status on hostile input."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handoffd.core.tls_export import TlsExport
from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSSError


def sample(**changes: object) -> TlsExport:
    fields: dict[str, object] = {
        "suite": 0x1302, "client_secret": os.urandom(48), "server_secret": os.urandom(48),
        "client_sequence": 0, "server_sequence": 2, "expiry": 1_900_000_000,
        "context_id": os.urandom(16), "alpn": b"h2", "sni": "www.example.org",
        "peer": {"subject": "CN=alice", "san": ["email:alice@example.org"]},
        "unread": b"\x17\x03\x03",
    }  # fmt: skip
    fields.update(changes)
    return TlsExport(**fields)  # type: ignore[arg-type]


def test_round_trip_and_layout() -> None:
    export = sample()
    blob = export.encode()
    assert TlsExport.decode(blob) == export
    assert blob[:3] == b"\x01\x13\x02"  # version 1, TLS_AES_256_GCM_SHA384
    assert blob[43] == 48 and blob[-7:] == b"\x00\x00\x00\x03\x17\x03\x03"


@pytest.mark.parametrize(
    "changes",
    [
        {"suite": 0x1304},
        {"client_secret": bytes(32)},
        {"context_id": bytes(8)},
        {"unread": bytes(65537)},
    ],
    ids=["ccm_suite", "short_secret", "short_context_id", "too_much_unread"],
)
def test_encode_refuses_what_a_worker_could_not_continue(changes: dict[str, object]) -> None:
    with pytest.raises(GSSError):
        sample(**changes).encode()


def test_every_truncation_and_any_trailing_byte_is_refused() -> None:
    blob = sample().encode()
    for cut in range(len(blob)):
        with pytest.raises(GSSError) as err:
            TlsExport.decode(blob[:cut])
        assert (err.value.major, err.value.minor) == (
            GSS_S_DEFECTIVE_TOKEN,
            Minor.TLS_STATE_INVALID,
        )
    with pytest.raises(GSSError):
        TlsExport.decode(blob + b"\x00")


@given(st.binary(max_size=400))
def test_decode_never_raises_anything_but_a_gss_error(blob: bytes) -> None:
    with contextlib.suppress(GSSError):
        TlsExport.decode(blob)


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0))
def test_decode_of_a_mutated_export_never_raises_anything_else(noise: bytes, at: int) -> None:
    blob = bytearray(sample().encode())
    at %= len(blob)
    blob[at : at + len(noise)] = noise
    with contextlib.suppress(GSSError):
        TlsExport.decode(bytes(blob))
