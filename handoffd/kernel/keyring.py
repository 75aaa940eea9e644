"""Thin synchronous adapter over the Linux key management syscalls.

``add_key(2)`` and ``keyctl(2)`` are called through ``ctypes`` (``libc.syscall``
with the architecture's syscall numbers): no C extension, no keyutils.  Every
failure becomes ``GSSError(major, Minor.KEYRING_*, detail)`` whose detail names
the operation and the errno (``"keyctl_read: EACCES"``) and never a payload.

Facts this module relies on, checked against the kernel here (6.18; see
``docs/KEYRING.md``):

* Access is granted by *possession* (the key is reachable from the calling
  thread's thread, process or session keyring) or by the uid/gid/other bits of
  the permission mask; a process of another uid that possesses a key gets the
  possessor bits.  Reading a key that is neither possessed nor permitted gives
  ``EACCES``; a serial that does not exist gives ``ENOKEY``.
* The session and process keyrings live in each *thread's* credentials:
  ``KEYCTL_JOIN_SESSION_KEYRING`` changes the calling thread only; threads
  created afterwards inherit the change, threads created before do not.
* ``EINTR`` is retried here (PEP 475 style); the other errnos are reported.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import platform
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Final

from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_FAILURE,
    GSS_S_UNAUTHORIZED,
    GSS_S_UNAVAILABLE,
    GSSError,
)

__all__ = [
    "KEY_POS_ALL",
    "KEY_POS_LINK",
    "KEY_POS_READ",
    "KEY_POS_SEARCH",
    "KEY_POS_SETATTR",
    "KEY_POS_VIEW",
    "KEY_POS_WRITE",
    "KEY_SPEC_PROCESS_KEYRING",
    "KEY_SPEC_SESSION_KEYRING",
    "KEY_SPEC_THREAD_KEYRING",
    "KEY_SPEC_USER_KEYRING",
    "KEY_USR_ALL",
    "KEY_USR_READ",
    "KEY_USR_VIEW",
    "KeyDescription",
    "KeyUsers",
    "KeyringStatus",
    "add_key",
    "add_keyring",
    "clear",
    "describe",
    "error_for",
    "get_keyring_id",
    "invalidate",
    "join_session_keyring",
    "keyring_members",
    "link",
    "move",
    "probe",
    "read",
    "read_key_users",
    "revoke",
    "set_timeout",
    "setperm",
    "unlink",
    "update",
]

# --- syscall numbers (asm-generic for aarch64, the x86_64 table otherwise) -------------

_SYSCALLS: Final[dict[str, tuple[int, int]]] = {
    # machine: (add_key, keyctl)
    "x86_64": (248, 250),
    "amd64": (248, 250),
    "aarch64": (217, 219),
    "arm64": (217, 219),
}

# keyctl operations (include/uapi/linux/keyctl.h)
_KEYCTL_GET_KEYRING_ID: Final = 0
_KEYCTL_JOIN_SESSION_KEYRING: Final = 1
_KEYCTL_UPDATE: Final = 2
_KEYCTL_REVOKE: Final = 3
_KEYCTL_SETPERM: Final = 5
_KEYCTL_DESCRIBE: Final = 6
_KEYCTL_CLEAR: Final = 7
_KEYCTL_LINK: Final = 8
_KEYCTL_UNLINK: Final = 9
_KEYCTL_READ: Final = 11
_KEYCTL_SET_TIMEOUT: Final = 15
_KEYCTL_INVALIDATE: Final = 21
_KEYCTL_MOVE: Final = 30

# special keyring ids
KEY_SPEC_THREAD_KEYRING: Final = -1
KEY_SPEC_PROCESS_KEYRING: Final = -2
KEY_SPEC_SESSION_KEYRING: Final = -3
KEY_SPEC_USER_KEYRING: Final = -4

# permission bits: possessor (bits 24-29) and user (bits 16-21)
KEY_POS_VIEW: Final = 0x01000000
KEY_POS_READ: Final = 0x02000000
KEY_POS_WRITE: Final = 0x04000000
KEY_POS_SEARCH: Final = 0x08000000
KEY_POS_LINK: Final = 0x10000000
KEY_POS_SETATTR: Final = 0x20000000
KEY_POS_ALL: Final = 0x3F000000
KEY_USR_VIEW: Final = 0x00010000
KEY_USR_READ: Final = 0x00020000
KEY_USR_ALL: Final = 0x003F0000

_KEYCTL_MOVE_EXCL: Final = 1

# errno -> (major, minor).  EPERM is what Docker's default seccomp profile answers,
# ENOSYS what some LXC profiles answer; EACCES is the kernel's own permission check.
_ERRNO_STATUS: Final[dict[int, tuple[int, Minor]]] = {
    _errno.ENOSYS: (GSS_S_UNAVAILABLE, Minor.KEYRING_UNAVAILABLE),
    _errno.EPERM: (GSS_S_UNAVAILABLE, Minor.KEYRING_DENIED),
    _errno.EACCES: (GSS_S_UNAUTHORIZED, Minor.KEYRING_DENIED),
    _errno.EDQUOT: (GSS_S_UNAVAILABLE, Minor.KEYRING_QUOTA),
    _errno.ENOKEY: (GSS_S_FAILURE, Minor.KEYRING_KEY_NOT_FOUND),
    _errno.EKEYREVOKED: (GSS_S_FAILURE, Minor.KEYRING_KEY_REVOKED),
    _errno.EKEYEXPIRED: (GSS_S_FAILURE, Minor.KEYRING_KEY_EXPIRED),
    _errno.EINVAL: (GSS_S_FAILURE, Minor.KEYRING_BAD_ARGUMENT),
    _errno.ENOMEM: (GSS_S_FAILURE, Minor.KEYRING_NO_MEMORY),
    _errno.EINTR: (GSS_S_FAILURE, Minor.KEYRING_INTERRUPTED),
}


def error_for(operation: str, err: int) -> GSSError:
    """The ``GSSError`` for ``errno`` ``err`` returned by ``operation`` (no payload in it)."""
    major, minor = _ERRNO_STATUS.get(err, (GSS_S_FAILURE, Minor.KEYRING_FAILED))
    return GSSError(major, minor, f"{operation}: {_errno.errorcode.get(err, str(err))}")


class _Syscalls:
    """The two syscalls, bound once; ENOSYS on an architecture we have no numbers for."""

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine().lower())
        self.add_key_nr, self.keyctl_nr = numbers if numbers is not None else (-1, -1)
        libc = ctypes.CDLL(None, use_errno=True)
        self.syscall = libc.syscall
        self.syscall.restype = ctypes.c_long

    def call(self, operation: str, number: int, *args: int | bytes | None) -> int:
        if number < 0:
            raise error_for(operation, _errno.ENOSYS)
        c_args = [a if isinstance(a, bytes) or a is None else ctypes.c_long(a) for a in args]
        while True:
            result: int = self.syscall(ctypes.c_long(number), *c_args)
            if result >= 0:
                return result
            err = ctypes.get_errno()
            if err != _errno.EINTR:
                raise error_for(operation, err)


_sys = _Syscalls()


def _keyctl(operation: str, *args: int | bytes | None) -> int:
    return _sys.call(operation, _sys.keyctl_nr, *args)


# --- the operations ------------------------------------------------------------------------


def add_key(description: str, payload: bytes, keyring: int, *, key_type: str = "user") -> int:
    """Create (or update in place, if ``keyring`` holds one of that name) a key; its serial."""
    if not payload:
        raise error_for("add_key", _errno.EINVAL)  # the user type refuses empty payloads
    return _sys.call("add_key", _sys.add_key_nr, key_type.encode(), description.encode(),
                     payload, len(payload), keyring)


def add_keyring(description: str, keyring: int) -> int:
    """Create a keyring named ``description`` linked into ``keyring``; its serial."""
    return _sys.call("add_key", _sys.add_key_nr, b"keyring", description.encode(), None, 0,
                     keyring)


def update(key: int, payload: bytes) -> None:
    """Replace a key's payload (``KEYCTL_UPDATE``); needs write permission."""
    _keyctl("keyctl_update", _KEYCTL_UPDATE, key, payload, len(payload))


def read(key: int, *, size_hint: int = 0) -> bytes:
    """A key's payload (for a keyring: its links as native-endian 32-bit serials).

    Asks the size first, then reads; loops if the payload grew in between.  A caller
    that knows the payload's size passes ``size_hint``: the first read then uses a
    buffer that large and the size query (one keyctl per read) is skipped; a payload
    larger than the hint is still read in full, by the same loop.
    """
    size = size_hint if size_hint > 0 else _keyctl("keyctl_read", _KEYCTL_READ, key, None, 0)
    while True:
        buffer = ctypes.create_string_buffer(max(size, 1))
        try:
            got = _keyctl("keyctl_read", _KEYCTL_READ, key, ctypes.addressof(buffer), size)
            if got <= size:
                return buffer.raw[:got]
            size = got
        finally:
            ctypes.memset(buffer, 0, len(buffer))  # do not leave a copy in freed memory


def keyring_members(keyring: int) -> list[int]:
    """The serials linked into ``keyring`` (``read`` of a keyring, decoded)."""
    raw = read(keyring)
    return [int.from_bytes(raw[i:i + 4], sys.byteorder, signed=True)
            for i in range(0, len(raw) - len(raw) % 4, 4)]


def revoke(key: int) -> None:
    """Revoke a key: every later use fails with ``EKEYREVOKED``; garbage-collected soon."""
    _keyctl("keyctl_revoke", _KEYCTL_REVOKE, key)


def unlink(key: int, keyring: int) -> None:
    """Remove the link to ``key`` from ``keyring`` (returns the link's quota)."""
    _keyctl("keyctl_unlink", _KEYCTL_UNLINK, key, keyring)


def link(key: int, keyring: int) -> None:
    """Link ``key`` into ``keyring`` (``KEYCTL_LINK``)."""
    _keyctl("keyctl_link", _KEYCTL_LINK, key, keyring)


def move(key: int, from_keyring: int, to_keyring: int, *, exclusive: bool = False) -> None:
    """Atomically move a link from one keyring to another (``KEYCTL_MOVE``, Linux 5.1+)."""
    _keyctl("keyctl_move", _KEYCTL_MOVE, key, from_keyring, to_keyring,
            _KEYCTL_MOVE_EXCL if exclusive else 0)


def setperm(key: int, permissions: int) -> None:
    """Set a key's permission mask (``KEY_POS_*`` | ``KEY_USR_*`` | ...)."""
    _keyctl("keyctl_setperm", _KEYCTL_SETPERM, key, permissions)


def set_timeout(key: int, seconds: int) -> None:
    """Expire the key ``seconds`` from now (0 clears the timeout)."""
    _keyctl("keyctl_set_timeout", _KEYCTL_SET_TIMEOUT, key, seconds)


def clear(keyring: int) -> None:
    """Unlink every key from ``keyring``."""
    _keyctl("keyctl_clear", _KEYCTL_CLEAR, keyring)


def invalidate(key: int) -> None:
    """Invalidate a key (``KEYCTL_INVALIDATE``).  Beware: leaks link quota, see the docs."""
    _keyctl("keyctl_invalidate", _KEYCTL_INVALIDATE, key)


@dataclass(frozen=True)
class KeyDescription:
    """What ``KEYCTL_DESCRIBE`` reports: ``type;uid;gid;perm;description``."""

    key_type: str
    uid: int
    gid: int
    permissions: int
    description: str


def describe(key: int) -> KeyDescription:
    """Type, owner, permissions and description of a key (needs view permission)."""
    size = _keyctl("keyctl_describe", _KEYCTL_DESCRIBE, key, None, 0)
    buffer = ctypes.create_string_buffer(max(size, 1))
    got = _keyctl("keyctl_describe", _KEYCTL_DESCRIBE, key, ctypes.addressof(buffer), size)
    text = buffer.raw[:min(got, size)].rstrip(b"\0").decode(errors="replace")
    parts = text.split(";", 4)
    if len(parts) != 5:
        raise GSSError(GSS_S_FAILURE, Minor.KEYRING_FAILED, "keyctl_describe: unparsable")
    return KeyDescription(parts[0], int(parts[1]), int(parts[2]), int(parts[3], 16), parts[4])


def get_keyring_id(special: int, *, create: bool = False) -> int:
    """The serial behind a special id (``KEY_SPEC_*``), creating the keyring if asked."""
    return _keyctl("keyctl_get_keyring_id", _KEYCTL_GET_KEYRING_ID, special, 1 if create else 0)


def join_session_keyring(name: str | None = None) -> int:
    """Join (or create) the named session keyring; ``None``: a fresh anonymous one.

    Affects the calling thread and threads (and processes) created after it.
    """
    return _keyctl("keyctl_join_session_keyring", _KEYCTL_JOIN_SESSION_KEYRING,
                   name.encode() if name is not None else None)


# --- availability -------------------------------------------------------------------------


class KeyringStatus(Enum):
    """Whether this process can use the kernel keyring, as :func:`probe` found it."""

    AVAILABLE = "available"
    DENIED = "denied"  # EPERM: e.g. Docker's default seccomp profile
    UNAVAILABLE = "unavailable"  # ENOSYS: e.g. some LXC profiles, or an unknown architecture
    QUOTA = "quota"  # EDQUOT: the user's key quota is exhausted


_PROBE_STATUS: Final[dict[Minor, KeyringStatus]] = {
    Minor.KEYRING_DENIED: KeyringStatus.DENIED,
    Minor.KEYRING_UNAVAILABLE: KeyringStatus.UNAVAILABLE,
    Minor.KEYRING_QUOTA: KeyringStatus.QUOTA,
}


def probe() -> KeyringStatus:
    """Try a tiny add + revoke + unlink in a throwaway keyring and classify the outcome.

    The throwaway keyring hangs off the calling thread's process keyring and is
    revoked and unlinked again.  Errnos other than EPERM/EACCES, ENOSYS and
    EDQUOT are raised as ``GSSError``.
    """
    try:
        ring = add_keyring("handoffd:probe", KEY_SPEC_PROCESS_KEYRING)
        try:
            key = add_key("handoffd:probe", b"\0", ring)
            revoke(key)
            unlink(key, ring)
        finally:
            revoke(ring)
            unlink(ring, KEY_SPEC_PROCESS_KEYRING)
    except GSSError as error:
        status = _PROBE_STATUS.get(Minor(error.minor))
        if status is None:
            raise
        return status
    return KeyringStatus.AVAILABLE


# --- quota -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyUsers:
    """One line of ``/proc/key-users``: a user's key usage against its quota."""

    usage: int  # references to the kernel's per-user record
    nkeys: int  # keys owned
    nikeys: int  # of which instantiated
    qnkeys: int  # keys charged to the quota
    maxkeys: int
    qnbytes: int  # bytes charged to the quota
    maxbytes: int


def _sysctl(name: str) -> int:
    with open(f"/proc/sys/kernel/keys/{name}") as f:
        return int(f.read())


def read_key_users(uid: int, *, path: str = "/proc/key-users") -> KeyUsers:
    """The quota line of ``uid``; all-zero usage (with the sysctl limits) if it has none."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise error_for("read /proc/key-users", error.errno or 0) from None
    for line in lines:
        head, _, rest = line.partition(":")
        if head.strip() != str(uid):
            continue
        try:
            usage, keys, quota_keys, quota_bytes = rest.split()
            numbers = [usage, *keys.split("/"), *quota_keys.split("/"),
                       *quota_bytes.split("/")]
            if len(numbers) != 7:
                raise ValueError(line)
            return KeyUsers(*(int(n) for n in numbers))
        except ValueError:
            raise GSSError(GSS_S_FAILURE, Minor.KEYRING_FAILED,
                           "read /proc/key-users: unparsable line") from None
    prefix = "root_" if uid == 0 else ""
    try:
        maxkeys, maxbytes = _sysctl(prefix + "maxkeys"), _sysctl(prefix + "maxbytes")
    except (OSError, ValueError):
        maxkeys = maxbytes = 0
    return KeyUsers(0, 0, 0, 0, maxkeys, 0, maxbytes)
