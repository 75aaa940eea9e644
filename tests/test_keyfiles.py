"""Key files on disk (``handoffd/keyfiles.py``): formats, permissions, refusals.

The formats are checked against the documented one-line layouts decoded here by
hand (base64 and ``cryptography``'s X25519), not by round-tripping alone.  Every
refusal is a ``GSSError`` whose detail names the path and never the key.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from handoffd import keyfiles
from handoffd.core.credentials import StaticKeyPair
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_DEFECTIVE_CREDENTIAL,
    GSS_S_DUPLICATE_ELEMENT,
    GSS_S_FAILURE,
    GSS_S_NO_CRED,
    GSSError,
)

PRIVATE = bytes(range(32))
PAIR = StaticKeyPair(PRIVATE)
PRIVATE_B64 = base64.b64encode(PRIVATE).decode()


def _write(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _refused(call: object, major: int, minor: Minor) -> GSSError:
    with pytest.raises(GSSError) as caught:
        call()  # type: ignore[operator]
    assert (caught.value.major, caught.value.minor) == (major, minor), caught.value
    assert PRIVATE_B64 not in str(caught.value)
    return caught.value


def test_save_writes_the_documented_formats_with_private_modes(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    keyfiles.save_private_key(key, PAIR, comment="web-1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text() == f"handoffd-x25519-private {PRIVATE_B64}\n"
    public = tmp_path / "server.key.pub"
    kind, encoded, comment = public.read_text().split()
    assert public.read_text().endswith("\n")
    assert (kind, comment) == ("noise-x25519", "web-1")
    expected = X25519PrivateKey.from_private_bytes(PRIVATE).public_key().public_bytes_raw()
    assert base64.b64decode(encoded) == expected
    assert not stat.S_IMODE(public.stat().st_mode) & 0o022  # others may read, not write
    assert keyfiles.load_private_key(key) == PAIR
    assert keyfiles.load_public_key(public) == expected


def test_save_without_comment_and_public_key_line() -> None:
    line = keyfiles.public_key_line(PAIR.public_bytes)
    assert line == "noise-x25519 " + base64.b64encode(PAIR.public_bytes).decode()
    assert keyfiles.public_key_line(PAIR.public_bytes, "x") == line + " x"


def test_save_never_overwrites(tmp_path: Path) -> None:
    key = _write(tmp_path / "server.key", "keep me\n")
    error = _refused(lambda: keyfiles.save_private_key(key, PAIR), GSS_S_DUPLICATE_ELEMENT,
                     Minor.KEY_FILE_EXISTS)
    assert error.detail == (f"{key} already exists; keygen never overwrites a key (remove it "
                            "first or choose another --out)")
    assert key.read_text() == "keep me\n"
    assert not (tmp_path / "server.key.pub").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o644, 0o666,
                                  0o700 | 0o007])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    key = _write(tmp_path / "k", f"handoffd-x25519-private {PRIVATE_B64}\n", mode)
    error = _refused(lambda: keyfiles.load_private_key(key), GSS_S_NO_CRED,
                     Minor.KEY_FILE_PERMISSIONS)
    assert f"{mode:04o}" in (error.detail or "")
    assert "chmod 600" in (error.detail or "")


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_a_public_key_file_given_as_the_private_key_is_named_as_such(
        tmp_path: Path, mode: int) -> None:
    """Issue 19: a 0644 .pub used to be refused with "chmod 600 it", which would only
    make a public key private; it is a public key file, whatever its mode."""
    keyfiles.save_private_key(tmp_path / "server.key", PAIR)
    pub = tmp_path / "server.key.pub"
    pub.chmod(mode)
    error = _refused(lambda: keyfiles.load_private_key(pub), GSS_S_DEFECTIVE_CREDENTIAL,
                     Minor.KEY_FILE_IS_PUBLIC)
    assert error.detail == (f"{pub} is a public key (noise-x25519); give the private key "
                            f"file, probably {tmp_path / 'server.key'}")
    assert "chmod" not in str(error)
    alone = _write(tmp_path / "lonely.pub", keyfiles.public_key_line(PAIR.public_bytes), 0o644)
    error = _refused(lambda: keyfiles.load_private_key(alone), GSS_S_DEFECTIVE_CREDENTIAL,
                     Minor.KEY_FILE_IS_PUBLIC)
    assert "handoffd keygen --out FILE writes FILE and FILE.pub" in (error.detail or "")


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    key = _write(tmp_path / "k", f"handoffd-x25519-private {PRIVATE_B64}\n", mode)
    assert keyfiles.load_private_key(key) == PAIR


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    target = _write(tmp_path / "real.key", f"handoffd-x25519-private {PRIVATE_B64}\n")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    error = _refused(lambda: keyfiles.load_private_key(link), GSS_S_NO_CRED,
                     Minor.BAD_KEY_FILE)
    assert "cannot open" in (error.detail or "")
    public_link = tmp_path / "link.pub"
    public_link.symlink_to(_write(tmp_path / "real.pub", keyfiles.public_key_line(
        PAIR.public_bytes) + "\n", 0o644))
    _refused(lambda: keyfiles.load_public_key(public_link), GSS_S_NO_CRED, Minor.BAD_KEY_FILE)
    allow_link = tmp_path / "allow.link"
    allow_link.symlink_to(tmp_path / "real.pub")
    _refused(lambda: keyfiles.load_allow_list(allow_link), GSS_S_NO_CRED, Minor.BAD_KEY_FILE)


def test_missing_and_non_regular_files(tmp_path: Path) -> None:
    error = _refused(lambda: keyfiles.load_private_key(tmp_path / "absent"), GSS_S_NO_CRED,
                     Minor.BAD_KEY_FILE)
    assert str(tmp_path / "absent") in (error.detail or "")
    error = _refused(lambda: keyfiles.load_allow_list(tmp_path), GSS_S_NO_CRED,
                     Minor.BAD_KEY_FILE)
    assert "not a regular file" in (error.detail or "")


@pytest.mark.parametrize(
    "text",
    [
        "",
        PRIVATE_B64,
        f"ssh-ed25519 {PRIVATE_B64}",
        f"handoffd-x25519-private {PRIVATE_B64} trailing",
        "handoffd-x25519-private not*base64",
        "handoffd-x25519-private " + base64.b64encode(bytes(31)).decode(),
        "handoffd-x25519-private " + base64.b64encode(bytes(33)).decode(),
    ],
    ids=["empty", "no-type", "wrong-type", "extra-field", "bad-base64", "short", "long"],
)
def test_malformed_private_key_files(tmp_path: Path, text: str) -> None:
    key = _write(tmp_path / "k", text + "\n")
    error = _refused(lambda: keyfiles.load_private_key(key), GSS_S_DEFECTIVE_CREDENTIAL,
                     Minor.BAD_KEY_FILE)
    assert error.detail


def test_non_ascii_and_oversize_files(tmp_path: Path) -> None:
    key = _write(tmp_path / "k", "handoffd-x25519-private \u00e9\n")
    error = _refused(lambda: keyfiles.load_private_key(key), GSS_S_DEFECTIVE_CREDENTIAL,
                     Minor.BAD_KEY_FILE)
    assert "ASCII" in (error.detail or "")
    big = _write(tmp_path / "big", b"#" * (1024 * 1024 + 1), 0o644)
    error = _refused(lambda: keyfiles.load_allow_list(big), GSS_S_DEFECTIVE_CREDENTIAL,
                     Minor.BAD_KEY_FILE)
    assert "1 MiB" in (error.detail or "")


def test_public_key_file_takes_exactly_one_key_line(tmp_path: Path) -> None:
    line = keyfiles.public_key_line(PAIR.public_bytes, "c")
    ok = _write(tmp_path / "ok.pub", f"# a comment\n\n{line}\n", 0o644)
    assert keyfiles.load_public_key(ok) == PAIR.public_bytes
    for name, text in {"none": "# nothing\n", "two": f"{line}\n{line}\n",
                       "bad": "noise-x25519 AAAA c\n"}.items():
        path = _write(tmp_path / name, text, 0o644)
        error = _refused(lambda p=path: keyfiles.load_public_key(p),  # type: ignore[misc]
                         GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE)
        assert str(path) in (error.detail or "")


def test_load_allow_list(tmp_path: Path) -> None:
    alice = StaticKeyPair(bytes([1]) * 32)
    bob = StaticKeyPair(bytes([2]) * 32)
    text = (f"# clients\n{keyfiles.public_key_line(alice.public_bytes, 'alice')}\n\n"
            f"   {keyfiles.public_key_line(bob.public_bytes, 'bob')}   \n")
    listed = keyfiles.load_allow_list(_write(tmp_path / "allow", text, 0o644))
    assert dict(listed) == {alice.public_bytes: "alice", bob.public_bytes: "bob"}
    bad = _write(tmp_path / "bad", text + "noise-x25519 !!! carol\n", 0o644)
    error = _refused(lambda: keyfiles.load_allow_list(bad), GSS_S_FAILURE, Minor.BAD_ALLOW_LIST)
    assert str(bad) in (error.detail or "") and "line 5" in (error.detail or "")


def test_empty_allow_list_file_lists_nobody(tmp_path: Path) -> None:
    assert len(keyfiles.load_allow_list(_write(tmp_path / "a", "# none yet\n", 0o644))) == 0


def test_files_are_not_left_open(tmp_path: Path) -> None:
    key = _write(tmp_path / "k", f"handoffd-x25519-private {PRIVATE_B64}\n", 0o644)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(GSSError):
            keyfiles.load_private_key(key)
        keyfiles.load_public_key(_write(tmp_path / "p", keyfiles.public_key_line(
            PAIR.public_bytes) + "\n", 0o644))
    assert len(os.listdir("/proc/self/fd")) == before
