"""Fuzz the receive path of ``handoffd.kernel.channel.Channel`` over a real socketpair.

Each input is one datagram (header + payload, whatever the bytes) sent with a
plain ``sendmsg`` to a fresh ``SOCK_SEQPACKET`` socketpair whose other end is a
:class:`Channel`, optionally with descriptors and credentials attached.  Byte 0:

====  ==========================================================================
bit   meaning
====  ==========================================================================
0     attach one fd: a connected TCP socket (or, with bit 6, a pipe end)
1     attach one more fd (a pipe end): two in all, or one if bit 0 is clear
2     switch on extended attributes (SO_PASSCRED / SO_PASSPIDFD / SO_PASSSEC)
3     ... and "new attributes only"
4     max_payload 64 instead of the default
5     attach an explicit SCM_CREDENTIALS (pid, uid, gid: bytes 1-12, u32 LE)
6     bit 0's fd is a pipe end, not a TCP socket
7     attach six more pipe ends (more than the receive buffer has room for: MSG_CTRUNC)
====  ==========================================================================

The rest is the datagram.  Invariant: ``receive`` returns or raises
``GSSError``; once the returned fds are closed the process has exactly the
descriptors it had before; and the channel still delivers a good message
sent after the fuzzed one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import struct

import trio

from fuzz._harness import instrumented, main, no_fd_leak

with instrumented(__name__):
    from handoffd.core.handoff import FD_KINDS
    from handoffd.kernel.channel import HEADER, MAGIC, VERSION, Channel, Received
    from handoffd.status import GSSError


def _tcp_connection() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


# Long-lived descriptors the inputs attach (SCM_RIGHTS installs fresh copies in the receiver).
_TCP_CLIENT, _TCP_SERVER = _tcp_connection()
_PIPE_READ, _PIPE_WRITE = os.pipe()


@atexit.register
def _close_fixtures() -> None:
    # Imported by tests/test_fuzz_corpus.py too: close them at exit rather than leave
    # them to the interpreter's teardown, which reports them as unclosed.
    _TCP_CLIENT.close()
    _TCP_SERVER.close()
    os.close(_PIPE_READ)
    os.close(_PIPE_WRITE)

_PROBE_KIND = 3  # ACK: a kind without an fd
_PROBE = HEADER.pack(MAGIC, VERSION, 0, _PROBE_KIND, 0, 5) + b"probe"


def _ancillary(mode: int, data: bytes) -> list[tuple[int, int, bytes]]:
    fds = []
    if mode & 0x01:
        fds.append(_PIPE_READ if mode & 0x40 else _TCP_CLIENT.fileno())
    if mode & 0x02:
        fds.append(_PIPE_WRITE)
    if mode & 0x80:
        fds.extend([_PIPE_READ, _PIPE_WRITE] * 3)
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds)))
    if mode & 0x20:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, data[1:13].ljust(12, b"\0")))
    return ancillary


def _release(received: Received) -> None:
    """The caller owns a good message's fd and pidfd."""
    if received.fd is not None:
        os.close(received.fd)
    if received.attributes is not None and received.attributes.pidfd is not None:
        os.close(received.attributes.pidfd)


async def _exchange(mode: int, datagram: bytes, ancillary: list[tuple[int, int, bytes]]) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    channel = Channel(trio.socket.from_stdlib_socket(right), fd_kinds=FD_KINDS,
                      max_payload=64 if mode & 0x10 else 65536)
    try:
        with left:
            if mode & 0x04:
                channel.enable_extended_attributes()
                if mode & 0x08:
                    channel.set_new_attributes_only(True)
            try:
                left.sendmsg([datagram], ancillary)
            except OSError:
                return  # the kernel refused to send this (e.g. credentials it will not forge)
            with contextlib.suppress(GSSError):
                _release(await channel.receive())
            left.send(_PROBE)
            probe = await channel.receive()
            _release(probe)
            if (probe.kind, probe.payload) != (_PROBE_KIND, b"probe"):
                raise AssertionError(f"channel delivered {probe} after the fuzzed message")
    finally:
        channel.close()


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    if not data:
        return
    mode = data[0]
    datagram = data[13:] if mode & 0x20 else data[1:]
    ancillary = _ancillary(mode, data)
    with no_fd_leak():
        trio.run(_exchange, mode, datagram, ancillary)


if __name__ == "__main__":
    main(TestOneInput)
