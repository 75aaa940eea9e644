"""Static keys, fingerprints and the allow-list (``handoffd/core/credentials.py``)."""

from __future__ import annotations

import base64
import hashlib
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from handoffd.core.context import AcceptorContext, InitiatorContext, import_context
from handoffd.core.credentials import (
    KEY_TYPE,
    AllowList,
    StaticKeyPair,
    fingerprint,
    parse_public_key_line,
)
from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_CREDENTIAL, GSS_S_FAILURE, GSSError


def _line(public: bytes, name: str = "") -> str:
    encoded = base64.b64encode(public).decode()
    return f"{KEY_TYPE} {encoded} {name}".rstrip()


ALICE = StaticKeyPair(bytes([1]) * 32)
BOB = StaticKeyPair(bytes([2]) * 32)


def test_generate_takes_32_bytes_from_the_random_source() -> None:
    asked: list[int] = []

    def source(n: int) -> bytes:
        asked.append(n)
        return bytes(range(n))

    pair = StaticKeyPair.generate(source)
    assert asked == [32]
    assert pair.private_bytes == bytes(range(32))
    expected = X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    assert pair.public_bytes == expected.public_bytes_raw()
    assert StaticKeyPair.generate(random.Random(7).randbytes) == \
        StaticKeyPair.generate(random.Random(7).randbytes)
    assert StaticKeyPair.generate(random.Random(7).randbytes) != ALICE


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_a_private_key_is_32_bytes(size: int) -> None:
    with pytest.raises(GSSError) as caught:
        StaticKeyPair(bytes(size))
    assert (caught.value.major, caught.value.minor) == (GSS_S_DEFECTIVE_CREDENTIAL,
                                                      Minor.BAD_KEY_FILE)


def test_fingerprint_is_openssh_style_sha256() -> None:
    value = fingerprint(ALICE.public_bytes)
    digest = hashlib.sha256(ALICE.public_bytes).digest()
    assert value == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert value.startswith("SHA256:") and "=" not in value
    assert len(value) == len("SHA256:") + 43
    assert ALICE.fingerprint == value
    assert fingerprint(BOB.public_bytes) != value


def test_repr_shows_the_fingerprint_never_the_private_key() -> None:
    text = repr(ALICE)
    assert ALICE.fingerprint in text
    assert ALICE.private_bytes.hex() not in text
    assert base64.b64encode(ALICE.private_bytes).decode() not in text
    assert repr(AllowList({ALICE.public_bytes: "a"})) == "<AllowList 1 keys>"


def test_parse_with_comments_blank_lines_and_spaces() -> None:
    text = "\n".join([
        "# handoffd clients",
        "",
        "   ",
        _line(ALICE.public_bytes, "alice"),
        "   # indented comment",
        "\t" + _line(BOB.public_bytes, "bob@host-1") + "  ",
    ])
    listed = AllowList.parse(text)
    assert dict(listed) == {ALICE.public_bytes: "alice", BOB.public_bytes: "bob@host-1"}
    assert len(listed) == 2 and ALICE.public_bytes in listed
    assert listed.get(StaticKeyPair(bytes([3]) * 32).public_bytes) is None
    assert len(AllowList.parse("")) == 0


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("ssh-ed25519 " + base64.b64encode(bytes(32)).decode() + " x", "expected"),
        (KEY_TYPE, "expected"),
        (_line(bytes(32), "a b"), "expected"),
        (f"{KEY_TYPE} %%%% alice", "not base64"),
        (f"{KEY_TYPE} {base64.b64encode(bytes(32)).decode()[:-1]} alice", "not base64"),
        (_line(bytes(31), "alice"), "31 bytes"),
        (_line(bytes(33), "alice"), "33 bytes"),
        (_line(bytes(32)), "no name"),
        (_line(bytes(32), "caf\u00e9"), "printable ASCII"),
        (_line(bytes(32), "x" * 256), "printable ASCII"),
    ],
    ids=["wrong-type", "no-key", "too-many-fields", "bad-base64", "bad-padding", "short-key",
         "long-key", "no-name", "non-ascii-name", "long-name"],
)
def test_bad_lines_are_clear_errors_with_the_line_number(line: str, why: str) -> None:
    text = "# first\n" + _line(ALICE.public_bytes, "alice") + "\n" + line + "\n"
    with pytest.raises(GSSError) as caught:
        AllowList.parse(text)
    error = caught.value
    assert (error.major, error.minor) == (GSS_S_FAILURE, Minor.BAD_ALLOW_LIST)
    assert error.detail is not None
    assert error.detail.startswith("line 3: ")
    assert why in error.detail


def test_a_key_listed_twice_is_refused() -> None:
    text = _line(ALICE.public_bytes, "alice") + "\n" + _line(ALICE.public_bytes, "eve")
    with pytest.raises(GSSError) as caught:
        AllowList.parse(text)
    assert caught.value.minor == Minor.BAD_ALLOW_LIST
    assert "line 2" in (caught.value.detail or "") and "'alice'" in (caught.value.detail or "")


def test_parse_public_key_line_name_is_optional() -> None:
    assert parse_public_key_line(_line(ALICE.public_bytes)) == (ALICE.public_bytes, "")
    assert parse_public_key_line(_line(ALICE.public_bytes, "n")) == (ALICE.public_bytes, "n")


@pytest.mark.parametrize(
    "entries",
    [{bytes(31): "a"}, {bytes(32): ""}, {bytes(32): "x" * 256}, {bytes(32): "caf\u00e9"},
     {bytes(32): "\u00e9" * 200}, {bytes(32): "two words"}, {bytes(32): " lead"},
     {bytes(32): "tab\there"}],
    ids=["short-key", "empty-name", "long-name", "non-ascii", "long-utf8", "space",
         "leading-space", "control"],
)
def test_mapping_entries_follow_the_text_rules(entries: dict[bytes, str]) -> None:
    # A name the text form refuses used to be accepted from a mapping, and one over 255
    # bytes then made the context export raise a bare ValueError.
    with pytest.raises(GSSError) as caught:
        AllowList(entries)
    assert (caught.value.major, caught.value.minor) == (GSS_S_FAILURE, Minor.BAD_ALLOW_LIST)


def test_the_longest_name_travels_in_an_exported_context() -> None:
    name = "n" * 255
    server, clock = StaticKeyPair(bytes([5]) * 32), (lambda: 1_800_000_000.0)
    rng = random.Random(3).randbytes
    client = InitiatorContext(static_key=ALICE, server_fingerprint=server.fingerprint,
                              clock=clock, random=rng)
    acceptor = AcceptorContext(static_key=server, allow_list=AllowList({ALICE.public_bytes: name}),
                               clock=clock, random=rng)
    _, msg1 = client.step(None)
    _, msg2 = acceptor.step(msg1)
    _, msg3 = client.step(msg2)
    acceptor.step(msg3)
    imported, _ = import_context(acceptor.export(), clock=clock)
    assert imported.peer_name == name


@settings(max_examples=200)
@given(st.text(max_size=300))
def test_arbitrary_text_parses_or_raises_gsserror(text: str) -> None:
    try:
        listed = AllowList.parse(text)
    except GSSError as error:
        assert error.minor == Minor.BAD_ALLOW_LIST
    else:
        assert all(len(key) == 32 and name for key, name in listed.items())
