"""Key files on disk: the server's and clients' private keys, public keys, allow-lists.

Formats (text, one line each; ``docs/PROTOCOL.md`` §Keys)::

    private key:  handoffd-x25519-private <base64 of the 32-byte private key>
    public key:   noise-x25519 <base64 of the 32-byte public key> [comment]
    allow-list:   one public-key line per client, with its name as the comment

A private key file must be a regular file not readable, writable or
executable by group or others (mode 0600 or stricter): handoffd refuses it
otherwise, as ssh does, with ``KEY_FILE_PERMISSIONS`` naming the mode.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from typing import Final

from handoffd.core.credentials import KEY_TYPE, AllowList, StaticKeyPair, parse_public_key_line
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_DEFECTIVE_CREDENTIAL,
    GSS_S_DUPLICATE_ELEMENT,
    GSS_S_FAILURE,
    GSS_S_NO_CRED,
    GSSError,
)

__all__ = [
    "PRIVATE_KEY_TYPE",
    "load_allow_list",
    "load_private_key",
    "load_public_key",
    "public_key_line",
    "save_private_key",
]

PRIVATE_KEY_TYPE: Final = "handoffd-x25519-private"
_MAX_FILE: Final = 1024 * 1024


def _why(error: OSError | ValueError) -> str:
    # os.open raises ValueError, not OSError, for a path with a NUL byte in it.
    return (error.strerror or str(error)) if isinstance(error, OSError) else "NUL byte in the path"


def _read_text(path: str | os.PathLike[str], what: str) -> tuple[str, os.stat_result]:
    try:
        # O_NONBLOCK: a FIFO planted at the path must be refused below, not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (OSError, ValueError) as error:
        raise GSSError(GSS_S_NO_CRED, Minor.BAD_KEY_FILE,
                       f"cannot open {what} {os.fspath(path)}: {_why(error)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GSSError(GSS_S_NO_CRED, Minor.BAD_KEY_FILE,
                           f"{what} {os.fspath(path)} is not a regular file")
        data = os.read(fd, _MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE:
        raise GSSError(GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE,
                       f"{what} {os.fspath(path)} is larger than 1 MiB")
    try:
        return data.decode("ascii"), info
    except UnicodeDecodeError:
        raise GSSError(GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE,
                       f"{what} {os.fspath(path)} is not ASCII text") from None


def load_private_key(path: str | os.PathLike[str]) -> StaticKeyPair:
    """Load a private key file; refuse one that group or others can access.

    A public key file (``noise-x25519 ...``, a ``.pub``) given in its place is
    ``KEY_FILE_IS_PUBLIC``, whatever its mode: saying "chmod 600 it" would mislead.
    """
    text, info = _read_text(path, "private key")
    if text.split(maxsplit=1)[:1] == [KEY_TYPE]:
        raise GSSError(GSS_S_DEFECTIVE_CREDENTIAL, Minor.KEY_FILE_IS_PUBLIC,
                       f"{os.fspath(path)} is a public key ({KEY_TYPE}); give the private key "
                       f"file{_private_hint(path)}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise GSSError(GSS_S_NO_CRED, Minor.KEY_FILE_PERMISSIONS,
                       f"{os.fspath(path)} has mode {mode:04o}; run chmod 600 on it")
    parts = text.split()
    if len(parts) != 2 or parts[0] != PRIVATE_KEY_TYPE:
        raise GSSError(GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE,
                       f"{os.fspath(path)}: expected '{PRIVATE_KEY_TYPE} <base64>'")
    try:
        private = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise GSSError(GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE,
                       f"{os.fspath(path)}: key is not base64") from None
    return StaticKeyPair(private)


def _private_hint(path: str | os.PathLike[str]) -> str:
    name = os.fspath(path)
    if name.endswith(".pub") and os.path.exists(name[:-4]):
        return f", probably {name[:-4]}"
    return " (handoffd keygen --out FILE writes FILE and FILE.pub)"


def public_key_line(public_key: bytes, comment: str = "") -> str:
    """``noise-x25519 <base64> [comment]``, the public key and allow-list line."""
    line = f"{KEY_TYPE} {base64.b64encode(public_key).decode('ascii')}"
    return f"{line} {comment}" if comment else line


def save_private_key(path: str | os.PathLike[str], keypair: StaticKeyPair,
                     comment: str = "") -> None:
    """Write ``path`` (mode 0600, must not exist: else ``KEY_FILE_EXISTS``) and
    ``path.pub`` (0644)."""
    target = Path(path)
    body = f"{PRIVATE_KEY_TYPE} {base64.b64encode(keypair.private_bytes).decode('ascii')}\n"
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise GSSError(GSS_S_DUPLICATE_ELEMENT, Minor.KEY_FILE_EXISTS,
                       f"{target} already exists; keygen never overwrites a key (remove it "
                       "first or choose another --out)") from None
    except (OSError, ValueError) as error:
        raise GSSError(GSS_S_FAILURE, Minor.BAD_KEY_FILE,
                       f"cannot create {target}: {_why(error)}") from None
    public = target.with_name(target.name + ".pub")
    try:
        try:
            os.write(fd, body.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        # A stale .pub of an earlier key is replaced; a symlink there is refused (run as
        # root, following it would overwrite whatever it points at).
        pub_fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
        try:
            os.write(pub_fd, (public_key_line(keypair.public_bytes, comment) + "\n").encode())
        finally:
            os.close(pub_fd)
    except OSError as error:
        # No half-made key pair: a private key without its .pub would block the next attempt.
        target.unlink(missing_ok=True)
        raise GSSError(GSS_S_FAILURE, Minor.BAD_KEY_FILE,
                       f"cannot write {error.filename or target}: {error.strerror}") from None


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The 32-byte key of a public key file."""
    text, _ = _read_text(path, "public key")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 1:
        raise GSSError(GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE,
                       f"{os.fspath(path)}: expected one '{KEY_TYPE} <base64>' line")
    try:
        key, _ = parse_public_key_line(lines[0])
    except GSSError as error:
        raise GSSError(GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE,
                       f"{os.fspath(path)}: {error.detail}") from None
    return key


def load_allow_list(path: str | os.PathLike[str]) -> AllowList:
    """Parse an allow-list file (see :mod:`handoffd.core.credentials`)."""
    text, _ = _read_text(path, "allow-list")
    try:
        return AllowList.parse(text)
    except GSSError as error:
        raise GSSError(error.major, error.minor, f"{os.fspath(path)}: {error.detail}") from None
