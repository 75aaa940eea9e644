"""The handoff channel: framed messages over ``AF_UNIX``/``SOCK_SEQPACKET`` carrying fds.

One message is one datagram: a 12-byte header, the payload, and -- for the
kinds listed in ``fd_kinds`` -- exactly one descriptor passed with
``SCM_RIGHTS``; for the kinds listed in ``batch_kinds``, 1 to ``MAX_BATCH_FDS``
descriptors, their number in the header (docs/CHANNEL.md has the byte layout).  The receiving side
trusts nothing the peer sends: on truncated data or control data, a wrong
number of descriptors, unexpected control messages, a malformed header or a
descriptor that fails ``validate_fd``, every descriptor the kernel installed
(pidfds included) is closed and a ``GSSError`` with the precise
``CHANNEL_*`` minor is raised.  The channel itself stays usable: the next
good message is received normally.

``peer_identity()`` names the process that created the socketpair or called
connect()/listen() -- not later writers (see :mod:`handoffd.kernel.peer`);
``enable_extended_attributes()`` names the sender of each message.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from handoffd.kernel.attrs import (
    SCM_CREDENTIALS,
    SCM_PIDFD,
    SCM_SECURITY,
    AttributeReceiver,
    SenderAttributes,
)
from handoffd.kernel.peer import PeerIdentity, read_peer_identity
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_CALL_BAD_STRUCTURE,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSSError,
)

__all__ = [
    "HEADER", "MAGIC", "VERSION", "Channel", "Received", "tcp_stream_socket",
    "validate_tcp_stream",
]

HEADER: Final = struct.Struct(">2sBBHHI")  # magic, version, flags, kind, fd_count, length
MAGIC: Final = b"HD"
VERSION: Final = 1
FLAG_FD: Final = 0x01  # the message carries descriptors
MAX_KIND: Final = 0xFFFF
MAX_BATCH_FDS: Final = 64
"""Descriptors one message of a batch kind may carry (the kernel allows 253)."""
# Room for one fd more than a batch so that too many is reported as such, not MSG_CTRUNC.
_FD_ROOM: Final = socket.CMSG_SPACE(4 * (MAX_BATCH_FDS + 1))
# Room for one SCM_CREDENTIALS so credentials nobody asked for are reported as unexpected.
_STRAY_ROOM: Final = socket.CMSG_SPACE(12)
_CLOSED_ERRNOS: Final = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)
# Plain ints: ``int & socket.MSG_*`` goes through enum.IntFlag (~0.6 us per test, per message).
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_RECV_NOWAIT: Final = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_SOCK_STREAM: Final = int(socket.SOCK_STREAM)
_SOL_SOCKET: Final = int(socket.SOL_SOCKET)
_SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)
_INT: Final = struct.Struct("=i")
_INET_FAMILIES: Final = (int(socket.AF_INET), int(socket.AF_INET6))
_IPPROTO_TCP: Final = int(socket.IPPROTO_TCP)


@dataclass(frozen=True)
class Received:
    """One good message; ``fd``, ``fds`` and ``attributes.pidfd`` now belong to the caller.

    ``fd``: the one descriptor of an ``fd_kinds`` message; ``fds``: those of a
    ``batch_kinds`` message, in the order they were sent."""

    kind: int
    payload: bytes
    fd: int | None
    attributes: SenderAttributes | None
    attributes_changed: bool
    fds: tuple[int, ...] = ()

    def close_fds(self) -> None:
        """Close every descriptor the message carried (a refused message)."""
        _close_all([*([self.fd] if self.fd is not None else []), *self.fds])


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _defective(minor: Minor, detail: str) -> GSSError:
    return GSSError(GSS_S_DEFECTIVE_TOKEN, minor, detail)


def validate_tcp_stream(fd: int) -> None:
    """Accept only a connected TCP stream socket (IPv4 or IPv6); ``fd`` is left open."""
    tcp_stream_socket(fd).detach()  # the caller owns fd


def tcp_stream_socket(fd: int) -> socket.socket:
    """:func:`validate_tcp_stream`, then a socket object that owns ``fd`` (one is needed
    to serve it anyway).  On error ``fd`` stays open and the caller's."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise _defective(Minor.CHANNEL_FD_NOT_TCP,
                         f"fd is not a socket ({os.strerror(error.errno or 0)})") from None
    try:
        # socket(fileno=) asked the kernel already (getsockname's family, SO_TYPE,
        # SO_PROTOCOL): asking again cost three getsockopt calls per handoff.  Read as
        # the plain ints the kernel gave (socket.socket's own properties convert them to
        # enums first: ~1 us per handoff for nothing).
        raw: Any = super(socket.socket, sock)  # _socket.socket's int fields
        kind, domain, protocol = raw.type, raw.family, sock.proto
        if (
            kind != _SOCK_STREAM
            or domain not in _INET_FAMILIES
            or protocol != _IPPROTO_TCP
        ):
            raise _defective(Minor.CHANNEL_FD_NOT_TCP,
                             f"socket type {kind} domain {domain} protocol {protocol}")
        try:
            sock.getpeername()
        except OSError as error:
            raise _defective(Minor.CHANNEL_FD_NOT_CONNECTED,
                             f"getpeername: {os.strerror(error.errno or 0)}") from None
    except BaseException:
        sock.detach()  # the caller still owns fd
        raise
    return sock


def _require_seqpacket(family: int, kind: int) -> None:
    if family != socket.AF_UNIX or kind != socket.SOCK_SEQPACKET:
        raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.CHANNEL_NOT_SEQPACKET,
                       f"socket family {family} type {kind}")


class Channel:
    """One end of a handoff channel on trio; see the module docstring for the rules."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        fd_kinds: frozenset[int],
        batch_kinds: frozenset[int] = frozenset(),
        max_payload: int = 65536,
        validate_fd: Callable[[int], None] | None = validate_tcp_stream,
    ) -> None:
        _require_seqpacket(sock.family, sock.type)
        if not 0 <= max_payload <= 0xFFFFFFFF:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.CHANNEL_MESSAGE_TOO_LARGE,
                           f"max_payload {max_payload}")
        self._sock = sock
        # The stdlib socket under trio's wrapper, for sends that need no wait (see send).
        self._raw: socket.socket | None = getattr(sock, "_sock", None)
        self.fd_kinds = fd_kinds
        self.batch_kinds = batch_kinds
        self.max_payload = max_payload
        self._validate_fd = validate_fd
        self._attributes = AttributeReceiver()
        # recvmsg's buffer sizes, per channel constants (attributes change the control room).
        self._bufsize = HEADER.size + max_payload + 1  # +1: an oversized payload shows
        self._ancsize = _FD_ROOM + _STRAY_ROOM
        # receive_nowait() just found the channel empty: receive() waits before its recvmsg
        # instead of trying one that would fail with EAGAIN first.
        self._empty = False

    @classmethod
    def pair(cls, *, fd_kinds: frozenset[int], **kw: Any) -> tuple[Channel, Channel]:
        """Two connected ends (close-on-exec); both name this process as their peer."""
        left, right = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        return (
            cls(trio.socket.from_stdlib_socket(left), fd_kinds=fd_kinds, **kw),
            cls(trio.socket.from_stdlib_socket(right), fd_kinds=fd_kinds, **kw),
        )

    @classmethod
    def from_fd(cls, fd: int, **kw: Any) -> Channel:
        """Adopt an inherited end (made close-on-exec); on error the caller still owns ``fd``."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.CHANNEL_NOT_SEQPACKET,
                           f"fd {fd}: {os.strerror(error.errno or 0)}") from None
        try:
            _require_seqpacket(sock.family, sock.type)
        except GSSError:
            sock.detach()
            raise
        sock.set_inheritable(False)
        return cls(trio.socket.from_stdlib_socket(sock), **kw)

    # --- attributes -----------------------------------------------------------------

    def enable_extended_attributes(self, *, keep_pidfds: bool = True) -> None:
        """Attach the sender's pid/uid/gid (and pidfd, label where available) to each message.

        ``keep_pidfds=False``: each message's pidfd is closed on receipt and only its
        identity (``SenderAttributes.process``) is reported; the last call's choice holds.
        """
        self._attributes.enable(self._sock)
        self._attributes.keep_pidfds = keep_pidfds
        self._ancsize = _FD_ROOM + _STRAY_ROOM + self._attributes.control_space()

    def set_new_attributes_only(self, on: bool) -> None:
        """Report attributes only when they differ from the last set (``ATTRS_NOT_ENABLED``
        if attributes are not switched on)."""
        self._attributes.set_new_only(on)

    def peer_identity(self) -> PeerIdentity:
        """The process that created the socketpair or connected/listened (not later writers)."""
        return read_peer_identity(self._sock)

    # --- sending ----------------------------------------------------------------------

    async def send(self, kind: int, payload: bytes, fd: int | None = None,
                   fds: tuple[int, ...] = ()) -> None:
        """Send one message; ``fd`` (required exactly for ``fd_kinds``) and ``fds`` (1 to
        ``MAX_BATCH_FDS``, exactly for ``batch_kinds``) stay the caller's."""
        if not 0 <= kind <= MAX_KIND:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.CHANNEL_BAD_HEADER, f"kind {kind}")
        if len(payload) > self.max_payload:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.CHANNEL_MESSAGE_TOO_LARGE,
                           f"{len(payload)} > {self.max_payload} bytes")
        if kind in self.batch_kinds or fds:
            await self._send_batch(kind, payload, fds)
            return
        carries_fd = kind in self.fd_kinds
        if carries_fd and fd is None:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.CHANNEL_NO_FD,
                           f"kind {kind} needs an fd")
        if not carries_fd and fd is not None:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.CHANNEL_FD_NOT_ALLOWED,
                           f"kind {kind} carries no fd")
        header = HEADER.pack(MAGIC, VERSION, FLAG_FD if carries_fd else 0, kind, 0, len(payload))
        ancillary = []
        if fd is not None:
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", fd)))
        await self._send_message([header, payload], ancillary)

    async def _send_batch(self, kind: int, payload: bytes, fds: tuple[int, ...]) -> None:
        if kind not in self.batch_kinds:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.CHANNEL_FD_NOT_ALLOWED,
                           f"kind {kind} carries no batch of fds")
        if not 1 <= len(fds) <= MAX_BATCH_FDS:
            raise GSSError(GSS_S_CALL_BAD_STRUCTURE, Minor.CHANNEL_TOO_MANY_FDS,
                           f"{len(fds)} fds (1 to {MAX_BATCH_FDS})")
        header = HEADER.pack(MAGIC, VERSION, FLAG_FD, kind, len(fds), len(payload))
        rights = array.array("i", fds).tobytes()
        await self._send_message([header, payload],
                                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])

    async def _send_message(self, buffers: list[bytes],
                            ancillary: list[tuple[int, int, bytes]]) -> None:
        try:
            if not self._send_now(buffers, ancillary):
                await self._sock.sendmsg(buffers, ancillary, socket.MSG_NOSIGNAL)
        except trio.ClosedResourceError:
            raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_CLOSED, "channel closed locally") from None
        except OSError as error:
            if self._sock.fileno() < 0:
                raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_CLOSED,
                               "channel closed locally") from None
            if error.errno in _CLOSED_ERRNOS:
                raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_CLOSED,
                               os.strerror(error.errno or 0)) from None
            raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_SEND_FAILED,
                           os.strerror(error.errno or 0)) from None

    def _send_now(self, buffers: list[bytes], ancillary: list[tuple[int, int, bytes]]) -> bool:
        """Send without a trio round trip when the socket has room (nearly always: one
        datagram, a peer that keeps reading); False when it would block.

        trio's sendmsg yields to the run loop even when the send succeeds at once: one
        more scheduler pass (and epoll_wait) per HANDOFF and per ACK.  The channel's
        receive still checkpoints, so a loop over messages keeps yielding.
        """
        raw = self._raw
        if raw is None:
            return False
        try:
            raw.sendmsg(buffers, ancillary, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return False
        return True

    # --- receiving --------------------------------------------------------------------

    async def receive(self) -> Received:
        """The next good message; a bad one has all its fds closed and raises ``CHANNEL_*``."""
        try:
            if self._empty:
                # Nothing was queued a moment ago: trio's recvmsg would try the syscall
                # first, fail with EAGAIN, then wait.  Wait first (wait_readable is a
                # checkpoint, as recvmsg is); its recvmsg then finds the message.
                self._empty = False
                await trio.lowlevel.wait_readable(self._sock)
            data, ancillary, flags, _ = await self._sock.recvmsg(
                self._bufsize, self._ancsize, socket.MSG_CMSG_CLOEXEC
            )
        except trio.ClosedResourceError:
            raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_CLOSED, "channel closed locally") from None
        except OSError as error:
            raise self._receive_error(error) from None
        return self._received(data, ancillary, flags)

    def receive_nowait(self) -> Received | None:
        """The next message if one is already queued (no wait, no trio checkpoint), else
        None: a caller that just received one drains what arrived with it, to answer
        them together.  A bad message raises as :meth:`receive` does."""
        raw = self._raw
        if raw is None:
            return None
        try:
            data, ancillary, flags, _ = raw.recvmsg(self._bufsize, self._ancsize, _RECV_NOWAIT)
        except BlockingIOError:
            self._empty = True
            return None
        except OSError as error:
            raise self._receive_error(error) from None
        return self._received(data, ancillary, flags)

    def _receive_error(self, error: OSError) -> GSSError:
        detail = "channel closed locally" if self._sock.fileno() < 0 else None
        return GSSError(GSS_S_FAILURE, Minor.CHANNEL_CLOSED,
                        detail or os.strerror(error.errno or 0))

    def _received(self, data: bytes, ancillary: list[tuple[int, int, bytes]],
                  flags: int) -> Received:
        # First take every descriptor the kernel installed, so that none can escape.
        fds: list[int] = []
        pidfds: list[int] = []
        credentials: list[bytes] = []
        labels: list[bytes] = []
        unexpected: list[tuple[int, int]] = []
        expected = self._attributes.expected  # what AttributeReceiver.expects() accepts
        for level, kind, body in ancillary:
            if level == _SOL_SOCKET:
                if kind == _SCM_RIGHTS:
                    numbers = array.array("i")
                    numbers.frombytes(body[: len(body) - len(body) % numbers.itemsize])
                    fds.extend(numbers)
                    continue
                if kind == SCM_PIDFD:
                    if len(body) >= 4:
                        (pidfd,) = _INT.unpack_from(body)
                        if pidfd >= 0:  # a negative errno when the kernel could not make one
                            pidfds.append(pidfd)
                elif kind == SCM_CREDENTIALS:
                    credentials.append(body)
                elif kind == SCM_SECURITY:
                    labels.append(body)
                if kind in expected:
                    continue
            unexpected.append((level, kind))
        try:
            return self._accept(data, flags, fds, pidfds, credentials, labels, unexpected)
        except BaseException:
            _close_all(fds + pidfds)
            raise

    def _accept(
        self,
        data: bytes,
        flags: int,
        fds: list[int],
        pidfds: list[int],
        credentials: list[bytes],
        labels: list[bytes],
        unexpected: list[tuple[int, int]],
    ) -> Received:
        if flags & _MSG_CTRUNC:
            raise _defective(Minor.CHANNEL_CONTROL_TRUNCATED,
                             f"control data truncated ({len(fds)} fds arrived)")
        if unexpected or len(credentials) > 1 or len(labels) > 1 or len(pidfds) > 1:
            raise _defective(Minor.CHANNEL_UNEXPECTED_CONTROL,
                             f"control messages {unexpected or 'repeated'}")
        if len(fds) > MAX_BATCH_FDS:
            raise _defective(Minor.CHANNEL_TOO_MANY_FDS, f"{len(fds)} fds")
        if flags & _MSG_TRUNC:
            raise _defective(Minor.CHANNEL_TRUNCATED, "message larger than the receive buffer")
        if not data and not fds and self._peer_hung_up():
            raise GSSError(GSS_S_FAILURE, Minor.CHANNEL_CLOSED, "end of file")
        kind, payload, fd_count = self._parse(data)
        if kind in self.batch_kinds:
            return self._accept_batch(kind, payload, fd_count, fds, pidfds, credentials, labels)
        if len(fds) > 1:
            raise _defective(Minor.CHANNEL_TOO_MANY_FDS, f"{len(fds)} fds")
        fd = fds[0] if fds else None
        if kind in self.fd_kinds:
            if fd is None:
                raise _defective(Minor.CHANNEL_NO_FD, f"kind {kind} arrived without an fd")
            if self._validate_fd is not None:
                try:
                    self._validate_fd(fd)
                except OSError as error:
                    raise _defective(Minor.CHANNEL_FD_NOT_TCP,
                                     os.strerror(error.errno or 0)) from None
        elif fd is not None:
            raise _defective(Minor.CHANNEL_FD_NOT_ALLOWED, f"kind {kind} arrived with an fd")
        attributes, changed = self._report(pidfds, credentials, labels)
        return Received(kind, payload, fd, attributes, changed)

    def _accept_batch(self, kind: int, payload: bytes, fd_count: int, fds: list[int],
                      pidfds: list[int], credentials: list[bytes], labels: list[bytes]
                      ) -> Received:
        if len(fds) != fd_count:
            raise _defective(Minor.CHANNEL_NO_FD if len(fds) < fd_count
                             else Minor.CHANNEL_TOO_MANY_FDS,
                             f"kind {kind}: {len(fds)} fds, the header says {fd_count}")
        if self._validate_fd is not None:
            for fd in fds:
                try:
                    self._validate_fd(fd)
                except OSError as error:
                    raise _defective(Minor.CHANNEL_FD_NOT_TCP,
                                     os.strerror(error.errno or 0)) from None
        attributes, changed = self._report(pidfds, credentials, labels)
        return Received(kind, payload, None, attributes, changed, tuple(fds))

    def _report(self, pidfds: list[int], credentials: list[bytes], labels: list[bytes]
                ) -> tuple[SenderAttributes | None, bool]:
        # Last step: on success it closes an unreported pidfd and never raises after that.
        return self._attributes.report(
            credentials[0] if credentials else None,
            pidfds[0] if pidfds else None,
            labels[0] if labels else None,
        )

    def _parse(self, data: bytes) -> tuple[int, bytes, int]:
        if len(data) < HEADER.size:
            raise _defective(Minor.CHANNEL_BAD_HEADER, f"{len(data)}-byte message")
        magic, version, flags, kind, fd_count, length = HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION or flags & ~FLAG_FD:
            raise _defective(Minor.CHANNEL_BAD_HEADER,
                             f"magic {magic!r} version {version} flags {flags:#x}")
        batch = kind in self.batch_kinds
        if (not 1 <= fd_count <= MAX_BATCH_FDS) if batch else fd_count:
            raise _defective(Minor.CHANNEL_BAD_HEADER, f"fd count {fd_count} for kind {kind}")
        if length > self.max_payload or len(data) - HEADER.size > self.max_payload:
            raise _defective(Minor.CHANNEL_MESSAGE_TOO_LARGE,
                             f"payload over {self.max_payload} bytes")
        if length != len(data) - HEADER.size:
            raise _defective(Minor.CHANNEL_BAD_HEADER,
                             f"length {length}, {len(data) - HEADER.size} bytes arrived")
        if bool(flags & FLAG_FD) != (batch or kind in self.fd_kinds):
            raise _defective(Minor.CHANNEL_BAD_HEADER, f"fd flag wrong for kind {kind}")
        return kind, data[HEADER.size :], fd_count

    def _peer_hung_up(self) -> bool:
        # recvmsg() == 0 is EOF, or a zero-length datagram a peer may send: only a hang-up
        # (RDHUP) is EOF, so an empty message cannot make us drop the channel.
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))

    # --- lifetime ---------------------------------------------------------------------

    def fileno(self) -> int:
        """The channel socket's descriptor (for poll loops and pass_fds)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close this end (wakes any task blocked on it); also works outside ``trio.run``."""
        try:
            self._sock.close()
        except RuntimeError:  # no trio run, so no task can be waiting on this socket
            fd = self._sock.detach()
            if fd >= 0:
                os.close(fd)

    async def aclose(self) -> None:
        """Close this end, as a trio checkpoint."""
        self._sock.close()
        await trio.lowlevel.checkpoint()
