"""Static keys, fingerprints and the allow-list of client keys (pure; no file I/O).

Names in handoffd are keys: a server is named by the fingerprint of its static
X25519 public key (``SHA256:`` and the unpadded base64 of its SHA-256, as
OpenSSH prints them), a client by the name its public key has in the
acceptor's allow-list.  The on-disk formats are in :mod:`handoffd.keyfiles`.

Allow-list text, one client per line, authorized-keys style::

    # comments and blank lines are ignored
    noise-x25519 <base64 of the 32-byte public key> <name>

The name is what the worker sees as the context's source name; it is one
token of printable ASCII without spaces.  A key may appear only once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_CREDENTIAL, GSS_S_FAILURE, GSSError

__all__ = [
    "ANONYMOUS", "KEY_TYPE", "AllowList", "StaticKeyPair", "fingerprint", "parse_public_key_line",
]

KEY_TYPE: Final = "noise-x25519"
KEY_SIZE: Final = 32
_NAME_MAX: Final = 255


def fingerprint(public_key: bytes) -> str:
    """``SHA256:<unpadded base64>`` of the public key, the form operators pin."""
    digest = hashlib.sha256(public_key).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


@dataclass(frozen=True, repr=False)
class StaticKeyPair:
    """An X25519 static key pair.  ``repr`` shows the fingerprint, never the private key."""

    private_bytes: bytes
    public_bytes: bytes = field(init=False)
    private_key: X25519PrivateKey = field(init=False, compare=False)
    """The key loaded once: loading derives the public key, a scalar multiplication that
    every handshake would otherwise repeat."""

    def __post_init__(self) -> None:
        if len(self.private_bytes) != KEY_SIZE:
            raise GSSError(GSS_S_DEFECTIVE_CREDENTIAL, Minor.BAD_KEY_FILE,
                           "a private key is 32 bytes")
        key = X25519PrivateKey.from_private_bytes(self.private_bytes)
        object.__setattr__(self, "public_bytes", key.public_key().public_bytes_raw())
        object.__setattr__(self, "private_key", key)

    @classmethod
    def generate(cls, random: Callable[[int], bytes]) -> StaticKeyPair:
        """A new key pair from ``random(32)`` (pass ``os.urandom`` outside tests)."""
        return cls(random(KEY_SIZE))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_bytes)

    def __repr__(self) -> str:
        return f"<StaticKeyPair {self.fingerprint}>"


def _bad_line(number: int, why: str) -> GSSError:
    return GSSError(GSS_S_FAILURE, Minor.BAD_ALLOW_LIST, f"line {number}: {why}")


def parse_public_key_line(line: str, number: int = 1) -> tuple[bytes, str]:
    """``noise-x25519 <base64> <name>`` → (public key, name); the name may be absent."""
    parts = line.split()
    if len(parts) not in (2, 3) or parts[0] != KEY_TYPE:
        raise _bad_line(number, f"expected '{KEY_TYPE} <base64 key> [name]'")
    try:
        key = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise _bad_line(number, "key is not base64") from None
    if len(key) != KEY_SIZE:
        raise _bad_line(number, f"key is {len(key)} bytes, not {KEY_SIZE}")
    name = parts[2] if len(parts) == 3 else ""
    if name and not _valid_name(name):
        raise _bad_line(number, "name must be printable ASCII, at most 255 characters")
    return key, name


# Clients without a key are named "anonymous"; a listed client of that name would be
# indistinguishable to an application that goes by name.
ANONYMOUS: Final = "anonymous"
_ANONYMOUS_TAKEN: Final = "'anonymous' is reserved for clients without a key"


def _valid_name(name: str) -> bool:
    # One token of printable ASCII: it travels in the export token with a one-byte length.
    return 0 < len(name) <= _NAME_MAX and name.isascii() and name.isprintable() \
        and name.split() == [name]


class AllowList(Mapping[bytes, str]):
    """Client public key → client name.  Build with :meth:`parse` or from a mapping."""

    def __init__(self, entries: Mapping[bytes, str] | None = None) -> None:
        self._names: dict[bytes, str] = {}
        for key, name in (entries or {}).items():
            # The same name rule as the text form: a longer or non-ASCII name could not
            # be exported with the context later.
            if len(key) != KEY_SIZE or not _valid_name(name):
                raise GSSError(GSS_S_FAILURE, Minor.BAD_ALLOW_LIST,
                               "entries are 32-byte keys with names of 1 to 255 printable "
                               "ASCII characters, no spaces")
            if name == ANONYMOUS:
                raise GSSError(GSS_S_FAILURE, Minor.BAD_ALLOW_LIST, _ANONYMOUS_TAKEN)
            self._names[bytes(key)] = name

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """Parse allow-list text (module docstring); every entry needs a name."""
        names: dict[bytes, str] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, name = parse_public_key_line(line, number)
            if not name:
                raise _bad_line(number, "entry has no name")
            if name == ANONYMOUS:
                raise _bad_line(number, _ANONYMOUS_TAKEN)
            if key in names:
                raise _bad_line(number, f"key already listed as {names[key]!r}")
            names[key] = name
        return cls(names)

    def __getitem__(self, key: bytes) -> str:
        return self._names[key]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"<AllowList {len(self._names)} keys>"
