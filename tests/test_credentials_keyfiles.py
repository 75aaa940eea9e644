"""Static keys, fingerprints and allow-lists (``handoffd/core/credentials.py``) and the
key files on disk (``handoffd/keyfiles.py``), on real files in a temporary directory.

Known answers come from outside handoffd: the X25519 pair is RFC 7748 §6.1's
(Alice), the fingerprint is OpenSSH's ``SHA256:`` form of the well-known
SHA-256 of 32 zero bytes.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest

from handoffd import keyfiles
from handoffd.core.credentials import (
    KEY_TYPE,
    AllowList,
    StaticKeyPair,
    fingerprint,
    parse_public_key_line,
)
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_DEFECTIVE_CREDENTIAL,
    GSS_S_DUPLICATE_ELEMENT,
    GSS_S_FAILURE,
    GSS_S_NO_CRED,
    GSSError,
)

RFC7748_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
ZERO_KEY_FINGERPRINT = "SHA256:Zmh6rfhivXdsj8GLjp+OIAiXFIVu4jOzkCpZHQ1fKSU"
FINGERPRINT_FORM = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def check(error: pytest.ExceptionInfo[GSSError], major: int, minor: Minor) -> None:
    assert (error.value.major, error.value.minor) == (major, minor), error.value


# --- StaticKeyPair and fingerprints ------------------------------------------------------


def test_key_pair_from_rfc7748() -> None:
    pair = StaticKeyPair(RFC7748_PRIVATE)
    assert pair.public_bytes == RFC7748_PUBLIC
    assert pair.private_key.public_key().public_bytes_raw() == RFC7748_PUBLIC
    assert pair == StaticKeyPair(RFC7748_PRIVATE)


def test_generate_uses_the_random_source_given() -> None:
    asked: list[int] = []

    def source(n: int) -> bytes:
        asked.append(n)
        return RFC7748_PRIVATE

    pair = StaticKeyPair.generate(source)
    assert asked == [32]
    assert pair.private_bytes == RFC7748_PRIVATE and pair.public_bytes == RFC7748_PUBLIC
    one, two = StaticKeyPair.generate(os.urandom), StaticKeyPair.generate(os.urandom)
    assert one != two and one.fingerprint != two.fingerprint


def test_repr_shows_the_fingerprint_never_the_private_key() -> None:
    pair = StaticKeyPair(RFC7748_PRIVATE)
    text = repr(pair) + str(pair)
    assert pair.fingerprint in text
    for secret in (RFC7748_PRIVATE.hex(), b64(RFC7748_PRIVATE), str(RFC7748_PRIVATE)):
        assert secret not in text


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_a_private_key_is_32_bytes(size: int) -> None:
    with pytest.raises(GSSError) as error:
        StaticKeyPair(bytes(size))
    check(error, GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE)


def test_fingerprint_form_and_known_answer() -> None:
    assert fingerprint(bytes(32)) == ZERO_KEY_FINGERPRINT
    pair = StaticKeyPair.generate(os.urandom)
    assert FINGERPRINT_FORM.match(pair.fingerprint)
    assert pair.fingerprint == fingerprint(pair.public_bytes)
    assert fingerprint(RFC7748_PUBLIC) != fingerprint(bytes(32))


# --- public key lines and the allow-list -------------------------------------------------


def test_public_key_line_round_trips() -> None:
    line = keyfiles.public_key_line(RFC7748_PUBLIC, "alice")
    assert line == f"{KEY_TYPE} {b64(RFC7748_PUBLIC)} alice"
    assert parse_public_key_line(line) == (RFC7748_PUBLIC, "alice")
    assert keyfiles.public_key_line(RFC7748_PUBLIC) == f"{KEY_TYPE} {b64(RFC7748_PUBLIC)}"
    assert parse_public_key_line(keyfiles.public_key_line(RFC7748_PUBLIC)) == (
        RFC7748_PUBLIC, "")


def test_allow_list_parse_ignores_comments_and_blank_lines() -> None:
    bob = StaticKeyPair.generate(os.urandom).public_bytes
    text = "\n".join([
        "# the clients of the echo service",
        "",
        "   ",
        f"{KEY_TYPE} {b64(RFC7748_PUBLIC)} alice",
        "   # an indented comment",
        f"\t{KEY_TYPE}   {b64(bob)}   bob@example  ",
        "",
    ])
    allowed = AllowList.parse(text)
    assert len(allowed) == 2
    assert allowed[RFC7748_PUBLIC] == "alice" and allowed.get(bob) == "bob@example"
    assert allowed.get(bytes(32)) is None
    assert set(allowed) == {RFC7748_PUBLIC, bob}
    assert len(AllowList.parse("")) == 0 and len(AllowList.parse("# nothing\n\n")) == 0
    assert "2 keys" in repr(allowed) and b64(bob) not in repr(allowed)


@pytest.mark.parametrize(("line", "why"), [
    (f"ssh-ed25519 {b64(RFC7748_PUBLIC)} alice", "expected"),
    (f"{KEY_TYPE}", "expected"),
    (f"{KEY_TYPE} {b64(RFC7748_PUBLIC)} alice extra", "expected"),
    (f"{KEY_TYPE} not*base64 alice", "not base64"),
    (f"{KEY_TYPE} {b64(RFC7748_PUBLIC)[:-1]} alice", "not base64"),
    (f"{KEY_TYPE} {b64(bytes(31))} alice", "31 bytes"),
    (f"{KEY_TYPE} {b64(bytes(33))} alice", "33 bytes"),
    (f"{KEY_TYPE} {b64(RFC7748_PUBLIC)}", "no name"),
    (f"{KEY_TYPE} {b64(RFC7748_PUBLIC)} al\u00efce", "printable ASCII"),
    (f"{KEY_TYPE} {b64(RFC7748_PUBLIC)} {'n' * 256}", "printable ASCII"),
    (f"{KEY_TYPE} {b64(RFC7748_PUBLIC)} anonymous", "reserved"),
], ids=["wrong-type", "no-key", "four-fields", "bad-base64", "truncated-base64",
        "short-key", "long-key", "no-name", "non-ascii-name", "long-name", "anonymous-name"])
def test_allow_list_bad_lines_are_clear_errors(line: str, why: str) -> None:
    text = f"# header\n\n{KEY_TYPE} {b64(bytes(32))} zero\n{line}\n"
    with pytest.raises(GSSError) as error:
        AllowList.parse(text)
    check(error, GSS_S_FAILURE, Minor.BAD_ALLOW_LIST)
    assert error.value.detail is not None
    assert error.value.detail.startswith("line 4:") and why in error.value.detail


def test_allow_list_refuses_a_key_listed_twice() -> None:
    text = f"{KEY_TYPE} {b64(RFC7748_PUBLIC)} alice\n{KEY_TYPE} {b64(RFC7748_PUBLIC)} eve\n"
    with pytest.raises(GSSError) as error:
        AllowList.parse(text)
    check(error, GSS_S_FAILURE, Minor.BAD_ALLOW_LIST)
    assert "line 2" in str(error.value.detail) and "alice" in str(error.value.detail)


@pytest.mark.parametrize("entries", [{bytes(31): "short"}, {bytes(32): ""},
                                     {bytes(32): "anonymous"}])
def test_allow_list_from_a_mapping_is_checked(entries: dict[bytes, str]) -> None:
    with pytest.raises(GSSError) as error:
        AllowList(entries)
    check(error, GSS_S_FAILURE, Minor.BAD_ALLOW_LIST)


# --- key files ---------------------------------------------------------------------------


def test_save_creates_a_0600_private_key_and_a_public_key(tmp_path: Path) -> None:
    pair = StaticKeyPair(RFC7748_PRIVATE)
    path = tmp_path / "server.key"
    keyfiles.save_private_key(path, pair, "server@host")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"handoffd-x25519-private {b64(RFC7748_PRIVATE)}\n"
    public = tmp_path / "server.key.pub"
    assert public.read_text() == f"{KEY_TYPE} {b64(RFC7748_PUBLIC)} server@host\n"
    assert not stat.S_IMODE(public.stat().st_mode) & 0o022
    assert keyfiles.load_private_key(path) == pair
    assert keyfiles.load_public_key(public) == RFC7748_PUBLIC


def test_save_refuses_a_symlink_where_the_public_key_goes(tmp_path: Path) -> None:
    """The .pub is written with O_NOFOLLOW: a symlink planted there is not followed (the
    file it points at stays intact) and no private key is left without its .pub."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "server.key.pub").symlink_to(victim)
    with pytest.raises(GSSError) as error:
        keyfiles.save_private_key(tmp_path / "server.key", StaticKeyPair(RFC7748_PRIVATE))
    check(error, GSS_S_FAILURE, Minor.BAD_KEY_FILE)
    assert victim.read_text() == "precious"
    assert not (tmp_path / "server.key").exists()


def test_save_replaces_a_stale_public_key(tmp_path: Path) -> None:
    (tmp_path / "server.key.pub").write_text("an older key's line\n")
    keyfiles.save_private_key(tmp_path / "server.key", StaticKeyPair(RFC7748_PRIVATE))
    assert keyfiles.load_public_key(tmp_path / "server.key.pub") == RFC7748_PUBLIC


def test_save_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    path.write_text("precious")
    with pytest.raises(GSSError) as error:
        keyfiles.save_private_key(path, StaticKeyPair(RFC7748_PRIVATE))
    check(error, GSS_S_DUPLICATE_ELEMENT, Minor.KEY_FILE_EXISTS)
    assert f"{path} already exists; keygen never overwrites" in str(error.value.detail)
    assert path.read_text() == "precious"
    assert not (tmp_path / "server.key.pub").exists()


def test_a_failed_save_leaves_no_half_made_key_pair(tmp_path: Path) -> None:
    """The .pub cannot be written (a directory is in the way): GSSError, and no private key."""
    path = tmp_path / "server.key"
    (tmp_path / "server.key.pub").mkdir()
    with pytest.raises(GSSError) as error:
        keyfiles.save_private_key(path, StaticKeyPair(RFC7748_PRIVATE))
    check(error, GSS_S_FAILURE, Minor.BAD_KEY_FILE)
    assert "server.key.pub" in str(error.value.detail)
    assert not path.exists()
    (tmp_path / "server.key.pub").rmdir()
    keyfiles.save_private_key(path, StaticKeyPair(RFC7748_PRIVATE))
    assert keyfiles.load_private_key(path).public_bytes == RFC7748_PUBLIC


def _write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o644, 0o666,
                                  0o700 | 0o007])
def test_a_private_key_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    path = _write_private(tmp_path / "key", f"handoffd-x25519-private {b64(RFC7748_PRIVATE)}\n",
                          mode)
    with pytest.raises(GSSError) as error:
        keyfiles.load_private_key(path)
    check(error, GSS_S_NO_CRED, Minor.KEY_FILE_PERMISSIONS)
    detail = str(error.value.detail)
    assert f"{mode:04o}" in detail and "chmod 600" in detail and str(path) in detail
    assert b64(RFC7748_PRIVATE) not in str(error.value)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = _write_private(tmp_path / "key", f"handoffd-x25519-private {b64(RFC7748_PRIVATE)}\n",
                          mode)
    assert keyfiles.load_private_key(path).public_bytes == RFC7748_PUBLIC


def test_a_symlink_is_refused_even_to_a_good_key(tmp_path: Path) -> None:
    """O_NOFOLLOW: a link someone planted must not redirect the key."""
    real = _write_private(tmp_path / "real.key",
                          f"handoffd-x25519-private {b64(RFC7748_PRIVATE)}\n")
    link = tmp_path / "server.key"
    link.symlink_to(real)
    for load in (keyfiles.load_private_key, keyfiles.load_public_key,
                 keyfiles.load_allow_list):
        with pytest.raises(GSSError) as error:
            load(link)
        check(error, GSS_S_NO_CRED, Minor.BAD_KEY_FILE)
        assert str(link) in str(error.value.detail)


@pytest.mark.parametrize("what", ["missing", "directory", "device", "fifo"])
def test_not_a_readable_regular_file(tmp_path: Path, what: str) -> None:
    """Refused promptly; a FIFO with no writer must not block the open."""
    path = {"missing": tmp_path / "nothing", "directory": tmp_path,
            "device": Path("/dev/null"), "fifo": tmp_path / "fifo"}[what]
    if what == "fifo":
        os.mkfifo(path, 0o600)
    for load in (keyfiles.load_private_key, keyfiles.load_public_key,
                 keyfiles.load_allow_list):
        with pytest.raises(GSSError) as error:
            load(path)
        check(error, GSS_S_NO_CRED, Minor.BAD_KEY_FILE)


def test_a_path_with_a_nul_byte_is_a_gsserror(tmp_path: Path) -> None:
    """os.open raises ValueError, not OSError, for these: it must not escape raw."""
    bad = f"{tmp_path}/key\x00name"
    for load in (keyfiles.load_private_key, keyfiles.load_public_key,
                 keyfiles.load_allow_list):
        with pytest.raises(GSSError) as error:
            load(bad)
        check(error, GSS_S_NO_CRED, Minor.BAD_KEY_FILE)
    with pytest.raises(GSSError) as error:
        keyfiles.save_private_key(bad, StaticKeyPair(RFC7748_PRIVATE))
    check(error, GSS_S_FAILURE, Minor.BAD_KEY_FILE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", [
    "",
    "handoffd-x25519-private\n",
    f"handoffd-x25519-private {b64(RFC7748_PRIVATE)} extra\n",
    "handoffd-x25519-private not*base64\n",
    f"handoffd-x25519-private {b64(RFC7748_PRIVATE[:31])}\n",
    "handoffd-x25519-private \u00e9\n",
    "x" * (1024 * 1024 + 1),
], ids=["empty", "no-key", "extra", "bad-base64", "short", "not-ascii", "too-large"])
def test_malformed_private_key_files(tmp_path: Path, text: str) -> None:
    path = _write_private(tmp_path / "key", text)
    with pytest.raises(GSSError) as error:
        keyfiles.load_private_key(path)
    check(error, GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE)
    # Whatever the file held, no key material is echoed into the error.
    assert b64(RFC7748_PRIVATE) not in str(error.value)
    assert b64(RFC7748_PRIVATE[:31]) not in str(error.value)


def test_a_public_key_line_in_a_private_key_file_is_named_as_such(tmp_path: Path) -> None:
    path = _write_private(tmp_path / "key", f"noise-x25519 {b64(RFC7748_PRIVATE)}\n")
    with pytest.raises(GSSError) as error:
        keyfiles.load_private_key(path)
    check(error, GSS_S_DEFECTIVE_CREDENTIAL, Minor.KEY_FILE_IS_PUBLIC)
    assert b64(RFC7748_PRIVATE) not in str(error.value)


def test_public_key_file_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "server.pub"
    path.write_text(f"# the server\n\n{keyfiles.public_key_line(RFC7748_PUBLIC, 'srv')}\n")
    assert keyfiles.load_public_key(path) == RFC7748_PUBLIC


@pytest.mark.parametrize("text", [
    "",
    "# only a comment\n",
    f"{KEY_TYPE} {b64(RFC7748_PUBLIC)}\n{KEY_TYPE} {b64(bytes(32))}\n",
    f"{KEY_TYPE} {b64(bytes(16))}\n",
    f"handoffd-x25519-private {b64(RFC7748_PRIVATE)}\n",
], ids=["empty", "comment-only", "two-keys", "short-key", "private-key"])
def test_malformed_public_key_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "server.pub"
    path.write_text(text)
    with pytest.raises(GSSError) as error:
        keyfiles.load_public_key(path)
    check(error, GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE)
    assert str(path) in str(error.value.detail)
    assert b64(RFC7748_PRIVATE) not in str(error.value)


def test_load_allow_list(tmp_path: Path) -> None:
    path = tmp_path / "clients"
    path.write_text(f"# clients\n{keyfiles.public_key_line(RFC7748_PUBLIC, 'alice')}\n")
    allowed = keyfiles.load_allow_list(path)
    assert dict(allowed) == {RFC7748_PUBLIC: "alice"}
    path.write_text(f"# clients\n\n{KEY_TYPE} {b64(bytes(32))} zero\n{KEY_TYPE} junk x\n")
    with pytest.raises(GSSError) as error:
        keyfiles.load_allow_list(path)
    check(error, GSS_S_FAILURE, Minor.BAD_ALLOW_LIST)
    assert str(path) in str(error.value.detail) and "line 4" in str(error.value.detail)
    with pytest.raises(GSSError) as error:
        keyfiles.load_allow_list(tmp_path / "absent")
    check(error, GSS_S_NO_CRED, Minor.BAD_KEY_FILE)
