"""Who is on the other end of a Unix socket: credentials, pidfd and LSM label.

``SO_PEERCRED`` and ``SO_PEERPIDFD`` are captured by the kernel when the
socketpair is created or when ``connect()``/``listen()`` is called.  They name
*that* process for the socket's whole life, not whoever writes to it later: a
socket end passed to (or inherited by) another process still reports its
creator.  Whoever creates a channel must therefore be the process the other
side expects; per-message sender attributes (:mod:`handoffd.kernel.attrs`)
name the actual writer of each message.

``SO_PEERSEC`` returns the peer's LSM label (SELinux, Smack, AppArmor).  The
kernel may or may not count a trailing NUL; both forms are the same label, so
labels are normalised by stripping it.  Where no LSM labels sockets the kernel
answers ``ENOPROTOOPT``: that is "no label", not an error.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Final, Protocol

from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_CALL_BAD_STRUCTURE,
    GSS_S_FAILURE,
    GSS_S_UNAUTHORIZED,
    GSSError,
)

__all__ = [
    "NAME_MAX",
    "SO_PEERPIDFD",
    "SO_PEERSEC",
    "GetSockOpt",
    "Identified",
    "OptionTooLong",
    "PeerIdentity",
    "PeerPolicy",
    "normalise_label",
    "open_peer_pidfd",
    "pidfd_alive",
    "pidfd_pid",
    "read_peer_identity",
    "read_peer_label",
]

# Values from include/uapi/asm-generic/socket.h (Python's socket module lacks some).
SO_PEERSEC: Final = 31
SO_PEERPIDFD: Final = 77
NAME_MAX: Final = 255
# A label longer than this is not believed (SELinux contexts fit in a page).
_LABEL_LIMIT: Final = 65536
_UCRED: Final = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


GetSockOpt = Callable[[socket.socket, int, int, int], bytes]
"""``(sock, level, option, size) -> value``; raises ``OSError`` (``OptionTooLong`` on ERANGE)."""


class OptionTooLong(OSError):
    """``getsockopt`` answered ERANGE; ``required`` is the size the kernel wrote to optlen."""

    def __init__(self, required: int) -> None:
        super().__init__(errno.ERANGE, os.strerror(errno.ERANGE))
        self.required = required


_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]
_libc.getsockopt.restype = ctypes.c_int


def _kernel_getsockopt(sock: _HasFileno, level: int, option: int, size: int) -> bytes:
    """getsockopt(2) that keeps the optlen the kernel reports on ERANGE (Python's drops it)."""
    buffer = ctypes.create_string_buffer(max(size, 1))
    length = ctypes.c_uint32(size)
    if _libc.getsockopt(sock.fileno(), level, option, buffer, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        if err == errno.ERANGE:
            raise OptionTooLong(length.value)
        raise OSError(err, os.strerror(err))
    return buffer.raw[: length.value]


def normalise_label(label: bytes) -> bytes | None:
    """A label without its trailing NUL; an empty label is no label (None)."""
    stripped = label.rstrip(b"\0")
    return stripped or None


def _show_label(label: bytes) -> str:
    return label.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class PeerIdentity:
    """The peer process as the kernel recorded it (``label`` normalised, None if unlabelled)."""

    pid: int
    uid: int
    gid: int
    label: bytes | None


class Identified(Protocol):
    """What :meth:`PeerPolicy.check` reads: a :class:`PeerIdentity`, or a message's
    ``SenderAttributes`` as they are (no copy per message)."""

    @property
    def pid(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def label(self) -> bytes | None: ...


def read_peer_label(
    sock: _HasFileno, *, getsockopt: GetSockOpt | None = None, require: bool = False
) -> bytes | None:
    """The peer's LSM label via ``SO_PEERSEC``, or None where no LSM labels sockets.

    Starts with a NAME_MAX buffer and retries once per ERANGE with the size
    the kernel asked for.  With ``require=True`` a missing label is refused
    (``GSS_S_UNAUTHORIZED``/``PEER_LABEL_REQUIRED``).  Any other failure,
    or a label that is not a NUL-free string, is ``PEER_LABEL_UNREADABLE``:
    an unreadable label never passes as "no label".
    """
    get = getsockopt if getsockopt is not None else _kernel_getsockopt
    size = NAME_MAX
    raw: bytes | None = None
    for _attempt in range(4):
        try:
            raw = get(sock, socket.SOL_SOCKET, SO_PEERSEC, size)  # type: ignore[arg-type]
            break
        except OptionTooLong as too_long:
            wanted = too_long.required
        except OSError as error:
            if error.errno == errno.ENOPROTOOPT:
                raw = b""
                break
            if error.errno != errno.ERANGE:
                raise GSSError(GSS_S_FAILURE, Minor.PEER_LABEL_UNREADABLE,
                               f"SO_PEERSEC: {os.strerror(error.errno or 0)}") from None
            wanted = size * 2  # ERANGE without a size: grow
        if not size < wanted <= _LABEL_LIMIT:
            raise GSSError(GSS_S_FAILURE, Minor.PEER_LABEL_UNREADABLE,
                           f"SO_PEERSEC: ERANGE with an implausible size {wanted}")
        size = wanted
    if raw is None:
        raise GSSError(GSS_S_FAILURE, Minor.PEER_LABEL_UNREADABLE, "SO_PEERSEC: ERANGE repeatedly")
    label = normalise_label(raw)
    if label is not None and b"\0" in label:
        raise GSSError(GSS_S_FAILURE, Minor.PEER_LABEL_UNREADABLE,
                       "SO_PEERSEC: label contains a NUL byte")
    if label is None and require:
        raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_LABEL_REQUIRED,
                       "the peer socket carries no LSM label")
    return label


def read_peer_identity(sock: _HasFileno, *, getsockopt: GetSockOpt | None = None) -> PeerIdentity:
    """pid/uid/gid (``SO_PEERCRED``) and label (``SO_PEERSEC``) of the socket's creator.

    The creator is who made the socketpair or called connect()/listen(), not a
    later writer.  An unconnected socket, or a peer outside our pid namespace
    (pid 0), is ``PEER_CREDENTIALS_UNAVAILABLE``.  ``getsockopt`` is injected
    into the label read only (tests of labels this kernel cannot produce).
    """
    try:
        raw = _kernel_getsockopt(sock, socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as error:
        raise GSSError(GSS_S_FAILURE, Minor.PEER_CREDENTIALS_UNAVAILABLE,
                       f"SO_PEERCRED: {os.strerror(error.errno or 0)}") from None
    if len(raw) != _UCRED.size:
        raise GSSError(GSS_S_FAILURE, Minor.PEER_CREDENTIALS_UNAVAILABLE,
                       f"SO_PEERCRED: {len(raw)} bytes")
    pid, uid, gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise GSSError(GSS_S_FAILURE, Minor.PEER_CREDENTIALS_UNAVAILABLE,
                       "no peer process (not connected, or outside this pid namespace)")
    label = read_peer_label(sock, getsockopt=getsockopt)
    return PeerIdentity(pid=pid, uid=uid, gid=gid, label=label)


def open_peer_pidfd(sock: _HasFileno) -> int | None:
    """A new close-on-exec pidfd for the socket's creator (``SO_PEERPIDFD``), caller closes it.

    None if the kernel lacks the option (ENOPROTOOPT/EINVAL): callers then
    degrade to pid + uid checks.  No peer (ENODATA, ENOTCONN) is
    ``PEER_CREDENTIALS_UNAVAILABLE``; a peer already reaped (ESRCH) is ``PEER_GONE``.
    """
    try:
        raw = _kernel_getsockopt(sock, socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError as error:
        if error.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return None
        if error.errno == errno.ESRCH:
            raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_GONE, "SO_PEERPIDFD: ESRCH") from None
        raise GSSError(GSS_S_FAILURE, Minor.PEER_CREDENTIALS_UNAVAILABLE,
                       f"SO_PEERPIDFD: {os.strerror(error.errno or 0)}") from None
    (pidfd,) = struct.unpack("=i", raw)
    return int(pidfd)


def pidfd_alive(pidfd: int) -> bool:
    """True while the process behind ``pidfd`` runs (a pidfd polls readable once it exits)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    events = poller.poll(0)
    if events and events[0][1] & select.POLLNVAL:
        raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.PEER_CREDENTIALS_UNAVAILABLE,
                       f"fd {pidfd} is not open")
    return not (events and events[0][1] & (select.POLLIN | select.POLLHUP))


def pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd names (``Pid:`` in /proc/self/fdinfo; -1 once the process is reaped).

    Compare pidfds by this (and :func:`os.fstat` inode), never by fd number.
    """
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as info:
            for line in info:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.PEER_CREDENTIALS_UNAVAILABLE,
                   f"fd {pidfd} is not a pidfd")


@dataclass(frozen=True)
class PeerPolicy:
    """Which peers are allowed; None for a field means "any".

    ``labels`` match with or without a trailing NUL.  A policy with
    ``labels`` or ``require_label`` refuses an unlabelled peer.
    """

    uids: frozenset[int] | None = None
    gids: frozenset[int] | None = None
    labels: frozenset[bytes] | None = None
    require_label: bool = False
    pid: int | None = None

    @cached_property
    def _allowed_labels(self) -> frozenset[bytes | None] | None:
        # Normalised once, not on every message checked.
        if self.labels is None:
            return None
        return frozenset(normalise_label(entry) for entry in self.labels)

    def check(self, identity: Identified) -> None:
        """Raise ``GSSError(GSS_S_UNAUTHORIZED, PEER_*)`` naming the first field that fails."""
        if self.pid is not None and identity.pid != self.pid:
            raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_PID_MISMATCH,
                           f"peer pid {identity.pid}, expected {self.pid}")
        if self.uids is not None and identity.uid not in self.uids:
            raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_UID_NOT_ALLOWED,
                           f"peer uid {identity.uid} not allowed")
        if self.gids is not None and identity.gid not in self.gids:
            raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_GID_NOT_ALLOWED,
                           f"peer gid {identity.gid} not allowed")
        label = normalise_label(identity.label) if identity.label is not None else None
        if label is None:
            if self.require_label or self.labels is not None:
                raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_LABEL_REQUIRED,
                               f"peer pid {identity.pid} has no LSM label")
            return
        allowed = self._allowed_labels
        if allowed is not None and label not in allowed:
            raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_LABEL_NOT_ALLOWED,
                           f"peer label {_show_label(label)} not allowed")
