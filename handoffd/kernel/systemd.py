"""systemd's service protocol: socket activation, ``sd_notify`` and the watchdog.

The same wire contract as libsystemd's ``sd_listen_fds_with_names``, ``sd_notify``
and ``sd_watchdog_enabled`` (see sd_listen_fds(3), sd_notify(3)), written out
in a few lines of Python rather than linking libsystemd:

* activation: ``LISTEN_PID`` names the process the sockets are for (a child that
  inherited the environment must not take them), ``LISTEN_FDS`` counts them from
  fd 3, ``LISTEN_FDNAMES`` names them (colon-separated, ``unknown`` by default);
* notification: one datagram of newline-separated ``KEY=VALUE`` fields to the
  ``AF_UNIX`` socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
  namespace); systemd reads the sender's pid from the kernel's credentials, which
  is why ``NotifyAccess=main`` needs the acceptor itself to send;
* watchdog: ``WATCHDOG_USEC`` (and optionally ``WATCHDOG_PID``).

Synchronous and trio-free: every call is one or two syscalls that never wait
on the network.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Final

from handoffd.minor import Minor
from handoffd.status import GSS_S_CALL_BAD_STRUCTURE, GSS_S_FAILURE, GSSError

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivatedSocket",
    "Notifier",
    "listen_fds",
    "watchdog_interval",
]

log = logging.getLogger("handoffd.systemd")

SD_LISTEN_FDS_START: Final = 3
"""The first passed descriptor (``SD_LISTEN_FDS_START`` in sd-daemon.h)."""

_ACTIVATION_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_DIGITS: Final = re.compile(r"[0-9]{1,19}")
# systemd's fdname_is_valid(): printable ASCII without ':' and at most 255 bytes.
_FD_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]{1,255}")
_NOTIFY_SEND_TIMEOUT: Final = 1.0
"""Seconds a notification may block when systemd's queue is full (it never is for long)."""


@dataclass(frozen=True)
class ActivatedSocket:
    """One socket passed by the service manager: its fd, its ``FileDescriptorName=``,
    its address family and its socket type (``SOCK_STREAM`` ...)."""

    fd: int
    name: str
    family: int
    type: int


def _activation_error(detail: str) -> GSSError:
    return GSSError(GSS_S_FAILURE, Minor.SYSTEMD_ACTIVATION_INVALID, detail)


def _parse_count(variable: str, value: str) -> int:
    """A decimal made of ASCII digits only: no sign, no spaces, no underscores
    (Python's ``int()`` would accept all three, systemd's ``safe_atoi`` none)."""
    if not _DIGITS.fullmatch(value):
        raise _activation_error(f"{variable}={value[:32]!r} is not a decimal number")
    return int(value)


def _describe(fd: int) -> tuple[int, int]:
    """(family, type) of a passed fd, or the reason it cannot be used."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        raise _activation_error(
            f"fd {fd} from LISTEN_FDS is not open ({errno.errorcode.get(error.errno or 0)})"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise _activation_error(f"fd {fd} from LISTEN_FDS is not a socket")
    # A borrowed socket object only to ask the kernel (SO_DOMAIN, SO_TYPE); detach()
    # hands the fd back without closing it.
    probe = socket.socket(fileno=fd)
    try:
        return int(probe.family), int(probe.type)
    finally:
        probe.detach()


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    unset_environment: bool = True,
) -> list[ActivatedSocket]:
    """The sockets systemd passed to this process, in order, with their names.

    ``environ`` defaults to ``os.environ`` and ``pid`` to ``os.getpid()``. Returns
    ``[]`` when no activation variables are set or ``LISTEN_PID`` names another
    process. Each fd gets ``FD_CLOEXEC`` so workers spawned later do not inherit
    the listening sockets. With ``unset_environment`` the three variables are
    removed afterwards (also when they were for another pid), so that children
    never see them.

    Malformed values, a name count that differs from the fd count, or an fd that
    is not an open socket raise ``GSSError(GSS_S_FAILURE,
    Minor.SYSTEMD_ACTIVATION_INVALID)``; then nothing is changed: neither the
    environment nor the fds, which are not closed either (when the environment is
    wrong, fds 3.. may well belong to someone else).
    """
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    sockets = _read_activation(env, os.getpid() if pid is None else pid)
    for activated in sockets:
        os.set_inheritable(activated.fd, False)
    if unset_environment:
        for variable in _ACTIVATION_VARIABLES:
            env.pop(variable, None)
    return sockets


def _read_activation(env: Mapping[str, str], pid: int) -> list[ActivatedSocket]:
    """Validate everything before touching anything (see :func:`listen_fds`)."""
    listen_pid = env.get("LISTEN_PID")
    if listen_pid is None:
        return []
    owner = _parse_count("LISTEN_PID", listen_pid)
    if owner == 0:
        raise _activation_error("LISTEN_PID=0 names no process")
    if owner != pid:
        return []
    listen_fds_value = env.get("LISTEN_FDS")
    if listen_fds_value is None:
        return []
    count = _parse_count("LISTEN_FDS", listen_fds_value)
    if count == 0:
        return []
    # A count beyond the descriptor table is malformed, not a reason to build a
    # list of millions of names or probe fds one by one.
    limit = os.sysconf("SC_OPEN_MAX")
    if SD_LISTEN_FDS_START + count > limit:
        raise _activation_error(f"LISTEN_FDS={count} exceeds the fd limit {limit}")
    names_value = env.get("LISTEN_FDNAMES")
    if names_value is None:
        names = ["unknown"] * count
    else:
        names = names_value.split(":")
        if len(names) != count:
            raise _activation_error(
                f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}"
            )
        for name in names:
            if not _FD_NAME.fullmatch(name):
                raise _activation_error(f"LISTEN_FDNAMES holds an invalid name {name[:32]!r}")
    sockets = []
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        family, kind = _describe(fd)
        sockets.append(ActivatedSocket(fd=fd, name=name, family=family, type=kind))
    return sockets


def _notify_error(detail: str) -> GSSError:
    return GSSError(GSS_S_FAILURE, Minor.SYSTEMD_NOTIFY_SOCKET_INVALID, detail)


class Notifier:
    """Sends ``sd_notify`` datagrams to the service manager over one socket.

    Sending never raises: a failure is logged (WARNING once, then DEBUG until a
    send succeeds again), because the daemon must keep serving when systemd is
    restarting or gone. Only a malformed field — a caller's bug — raises.
    """

    def __init__(self, address: str) -> None:
        """``address``: an absolute path, or ``@name`` for the abstract namespace.

        Raises ``GSSError(GSS_S_FAILURE, Minor.SYSTEMD_NOTIFY_SOCKET_INVALID)``
        for any other form (systemd's ``vsock:`` addresses are not supported).
        """
        if address.startswith("@") and len(address) > 1:
            self._address: bytes = b"\0" + os.fsencode(address[1:])
        elif address.startswith("/"):
            self._address = os.fsencode(address)
        else:
            raise _notify_error(f"NOTIFY_SOCKET={address[:64]!r} is not a path or @name")
        if len(self._address) > 107:  # sizeof(sun_path) - 1 on Linux
            raise _notify_error("NOTIFY_SOCKET is longer than a socket path may be")
        self.address = address
        self._socket: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        )
        self._socket.settimeout(_NOTIFY_SEND_TIMEOUT)
        self._failing_errno: int | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """A notifier for ``NOTIFY_SOCKET``, or None when not run under systemd
        (unset or empty). An unusable value raises as :class:`Notifier` does."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        return cls(address) if address else None

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (each ``KEY=VALUE``, one line) as one datagram.

        Raises ``GSSError(GSS_S_CALL_BAD_STRUCTURE,
        Minor.SYSTEMD_NOTIFY_FIELD_INVALID)`` for a field without ``=`` or with a
        newline (it would smuggle in another field); send errors are only logged.
        """
        for field in fields:
            key, equals, _ = field.partition("=")
            if not key or not equals or "\n" in field or "\0" in field:
                raise GSSError(
                    GSS_S_CALL_BAD_STRUCTURE,
                    Minor.SYSTEMD_NOTIFY_FIELD_INVALID,
                    f"notification field {field[:40]!r}",
                )
        if not fields:
            return
        if self._socket is None:
            log.debug("notifier closed; dropped %s", fields[0].partition("=")[0])
            return
        datagram = "\n".join(fields).encode()
        try:
            self._socket.sendto(datagram, socket.MSG_NOSIGNAL, self._address)
        except OSError as error:
            code = error.errno if error.errno is not None else -1
            level = logging.DEBUG if code == self._failing_errno else logging.WARNING
            self._failing_errno = code
            log.log(level, "systemd notification to %s failed: %s", self.address,
                    os.strerror(code) if code > 0 else "timed out")
        else:
            if self._failing_errno is not None:
                log.info("systemd notifications to %s work again", self.address)
            self._failing_errno = None

    def ready(self, status: str | None = None) -> None:
        """``READY=1`` (start-up finished: workers are up), optionally with a status."""
        self.notify("READY=1", *([] if status is None else [_status_field(status)]))

    def status(self, text: str) -> None:
        """``STATUS=...``: the one-line text ``systemctl status`` shows."""
        self.notify(_status_field(text))

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the keep-alive ping, due every half ``WatchdogSec=``."""
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        """``STOPPING=1``: draining has begun."""
        self.notify("STOPPING=1")

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, as systemd >= 253
        requires to match a reload to its request); send :meth:`ready` when done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def close(self) -> None:
        """Close the socket; later notifications are dropped (logged at DEBUG)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status_field(text: str) -> str:
    """``STATUS=`` with line breaks flattened: a status text is free-form."""
    return "STATUS=" + " ".join(text.replace("\0", " ").splitlines())


def watchdog_interval(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """The watchdog timeout in seconds (``WATCHDOG_USEC``), or None when there is none
    or ``WATCHDOG_PID`` names another process. Ping at half this interval.

    A malformed or zero value raises ``GSSError(GSS_S_FAILURE,
    Minor.SYSTEMD_WATCHDOG_INVALID)``, as ``sd_watchdog_enabled`` returns -EINVAL.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if usec is None:
        return None
    if not _DIGITS.fullmatch(usec) or int(usec) == 0:
        raise GSSError(GSS_S_FAILURE, Minor.SYSTEMD_WATCHDOG_INVALID,
                       f"WATCHDOG_USEC={usec[:32]!r}")
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid is not None:
        if not _DIGITS.fullmatch(watchdog_pid) or int(watchdog_pid) == 0:
            raise GSSError(GSS_S_FAILURE, Minor.SYSTEMD_WATCHDOG_INVALID,
                           f"WATCHDOG_PID={watchdog_pid[:32]!r}")
        if int(watchdog_pid) != (os.getpid() if pid is None else pid):
            return None
    return int(usec) / 1_000_000
