"""handoffd's Noise XX against the published test vectors (cacophony and snow).

Every vector for ``Noise_XX_25519_ChaChaPoly_SHA256`` (the one suite
``handoffd/core/noise.py`` implements) is replayed with the vector's static
and ephemeral private keys and prologue injected: each handshake message must
be the vector's ciphertext byte for byte and decrypt to its payload on the
other side, the handshake hash must match where the vector gives one, and
after ``Split()`` the transport messages must match in both directions.

The vectors of our suite are vendored in ``tests/vectors`` (source in its README), so a
clone needs nothing beside it; a count check makes sure a parsing slip cannot silently
select no vector at all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from handoffd.core.noise import PROTOCOL_NAME, CipherState, HandshakeState

VECTORS = Path(__file__).resolve().parent / "vectors"
FILES = ("cacophony-xx.json", "snow-xx.json")
SUITE = PROTOCOL_NAME.decode("ascii")
HANDSHAKE_MESSAGES = 3  # XX: -> e ; <- e, ee, s, es ; -> s, se


def _all_vectors(name: str) -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads((VECTORS / name).read_text())["vectors"]
    return vectors


def _selected(name: str) -> list[dict[str, Any]]:
    # A plain XX vector only: no PSKs (snow writes an empty list), no fallback, no hybrid.
    return [v for v in _all_vectors(name)
            if v["protocol_name"] == SUITE and not v.get("init_psks") and not v.get("fallback")]


def _cases() -> list[Any]:
    cases = []
    for name in FILES:
        for index, vector in enumerate(_selected(name)):
            source = name.removesuffix("-xx.json")
            cases.append(pytest.param(vector, id=f"{source}-{SUITE}-{index}"))
    return cases


@pytest.mark.parametrize("name", FILES)
def test_every_vector_of_our_suite_is_selected(name: str) -> None:
    """The selection is neither empty nor short of the file's count for the suite."""
    everything = _all_vectors(name)
    assert everything, f"{name} has no vectors"
    with_our_name = [v for v in everything if v["protocol_name"] == SUITE]
    assert len(_selected(name)) > 0
    assert len(_selected(name)) == len(with_our_name)


def _key(vector: dict[str, Any], field: str) -> bytes:
    return bytes.fromhex(vector[field])


@pytest.mark.parametrize("vector", _cases())
def test_vector(vector: dict[str, Any]) -> None:
    """Handshake, handshake hash and transport messages match the vector byte for byte."""
    initiator = HandshakeState(initiator=True, static_private=_key(vector, "init_static"),
                               ephemeral_private=_key(vector, "init_ephemeral"),
                               prologue=_key(vector, "init_prologue"))
    responder = HandshakeState(initiator=False, static_private=_key(vector, "resp_static"),
                               ephemeral_private=_key(vector, "resp_ephemeral"),
                               prologue=_key(vector, "resp_prologue"))
    messages = vector["messages"]
    assert len(messages) > HANDSHAKE_MESSAGES, "vector has no transport messages"

    for index, message in enumerate(messages[:HANDSHAKE_MESSAGES]):
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        payload = bytes.fromhex(message["payload"])
        ciphertext = sender.write_message(payload)
        assert ciphertext.hex() == message["ciphertext"], f"handshake message {index}"
        assert receiver.read_message(ciphertext) == payload, f"handshake message {index}"
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash == responder.handshake_hash
    if "handshake_hash" in vector:
        assert initiator.handshake_hash.hex() == vector["handshake_hash"]

    # Both sides derive the same pair: (initiator -> responder, responder -> initiator).
    to_responder, to_initiator = initiator.split()
    assert responder.split() == (to_responder, to_initiator)
    send = {True: CipherState(to_responder), False: CipherState(to_initiator)}
    receive = {True: CipherState(to_responder), False: CipherState(to_initiator)}
    directions = set()
    # Transport messages keep alternating: even indices come from the initiator.
    for index, message in enumerate(messages[HANDSHAKE_MESSAGES:], HANDSHAKE_MESSAGES):
        from_initiator = index % 2 == 0
        directions.add(from_initiator)
        payload = bytes.fromhex(message["payload"])
        ciphertext = send[from_initiator].encrypt_with_ad(b"", payload)
        assert ciphertext.hex() == message["ciphertext"], f"transport message {index}"
        assert receive[from_initiator].decrypt_with_ad(b"", ciphertext) == payload
    assert directions == {True, False}, "transport messages in only one direction"


@pytest.mark.parametrize("name", FILES)
def test_selection_matches_a_count_of_the_raw_text(name: str) -> None:
    """Counted in the file's text, not through the JSON loader, so a loader slip shows."""
    raw = (VECTORS / name).read_text()
    present = len(re.findall(r'"protocol_name"\s*:\s*"' + re.escape(SUITE) + '"', raw))
    assert present >= 1
    assert len(_selected(name)) == present
