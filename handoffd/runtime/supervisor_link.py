"""The supervisor-acceptor link: one SEQPACKET socketpair, messages of
:mod:`handoffd.core.supervision`, at most two fds per message (SPAWN and GUEST; PEER has one).

The receiving side closes every fd of a message it refuses (truncated, too many
fds, fds on a kind that carries none, malformed payload), so a bad message leaks
nothing and the link stays usable.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from dataclasses import dataclass

import trio

from handoffd.core import supervision
from handoffd.minor import Minor
from handoffd.status import GSS_S_FAILURE, GSSError

MAX_FDS = 2
_FD_ROOM = socket.CMSG_SPACE(4 * (MAX_FDS + 2))


def _link_error(detail: str) -> GSSError:
    return GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK, detail)


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(frozen=True)
class Incoming:
    """A decoded message and the fds that came with it (now the caller's)."""

    message: supervision.Message
    fds: list[int]


class SupervisorLink:
    """One end of the link."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._raw = sock  # for send_nowait; the same fd trio waits on
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._send_lock = trio.Lock()

    @classmethod
    def from_fd(cls, fd: int) -> SupervisorLink:
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            sock.detach()
            raise _link_error(f"fd {fd} is not an AF_UNIX SOCK_SEQPACKET socket")
        return cls(sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    async def send(self, message: supervision.Message, fds: tuple[int, ...] = ()) -> None:
        """Send one message (and its fds); a gone peer is ``SUPERVISOR_LINK``."""
        ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                     if fds else [])
        async with self._send_lock:
            try:
                await self._sock.sendmsg([message.encode()], ancillary, socket.MSG_NOSIGNAL)
            except OSError as error:
                raise _link_error(f"send: {os.strerror(error.errno or 0)}") from None

    def send_nowait(self, message: supervision.Message) -> bool:
        """Send without waiting (notifications); False when the queue is full or gone."""
        try:
            self._raw.send(message.encode(), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except OSError:
            return False
        return True

    async def receive(self) -> Incoming:
        """The next message; ``SUPERVISOR_LINK`` with detail "closed" at end of link."""
        try:
            data, ancdata, flags, _ = await self._sock.recvmsg(
                supervision.MAX_MESSAGE, _FD_ROOM, socket.MSG_CMSG_CLOEXEC)
        except OSError as error:
            if error.errno in (errno.ECONNRESET, errno.EPIPE):
                raise _link_error("closed") from None
            raise _link_error(f"receive: {os.strerror(error.errno or 0)}") from None
        fds: list[int] = []
        unexpected = False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
            else:
                unexpected = True
        if not data and not fds and not ancdata:
            raise _link_error("closed")
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise _link_error("truncated message")
            if unexpected or len(fds) > MAX_FDS:
                raise _link_error("unexpected control data")
            message = supervision.decode(data)
            if fds and not isinstance(message, supervision.Spawn | supervision.Guest
                                                | supervision.Peer):
                raise _link_error("fds on a message that carries none")
            if isinstance(message, supervision.Peer) and len(fds) != 1:
                raise _link_error("PEER without its one fd")
        except GSSError:
            _close(fds)
            raise
        return Incoming(message, fds)

    def close(self) -> None:
        self._sock.close()
