"""Applications the end-to-end tests run in workers (loaded as ``tests.apps:NAME``)."""

from __future__ import annotations

import os

from handoffd.runtime.stream import SecureStream


async def pid_echo(stream: SecureStream) -> None:
    """Say which worker serves the connection, then echo: lets tests see the spread."""
    await stream.send_all(f"{os.getpid()}\n".encode())
    async for data in stream:
        await stream.send_all(data)


async def sender_echo(stream: SecureStream) -> None:
    """``pid_echo`` whose first line also names the acceptor that handed the connection
    off, as the kernel attested it (the handoff message's ``SCM_CREDENTIALS`` pid): the
    shared-pool tests see which acceptor fed which worker."""
    sender = stream.info["sender"]
    await stream.send_all(f"{os.getpid()} {getattr(sender, 'pid', 0)}\n".encode())
    async for data in stream:
        await stream.send_all(data)


async def crash_on_import(stream: SecureStream) -> None:  # pragma: no cover - never loaded
    raise AssertionError("unreachable")


async def hostile_to_acceptor(stream: SecureStream) -> None:
    """``pid_echo``, except that on ``attack`` the worker writes on its channel, raw,
    everything a compromised worker could send the acceptor; then it answers ``done``."""
    await stream.send_all(f"{os.getpid()}\n".encode())
    async for data in stream:
        if data == b"attack":
            await _attack_acceptor(int(os.environ["HANDOFFD_CHANNEL_FD"]))
            data = b"done"
        await stream.send_all(data)


def _channel_frame(kind: int, payload: bytes, *, flags: int | None = None,
                   magic: bytes | None = None, length: int | None = None) -> bytes:
    from handoffd.core.handoff import FD_KINDS
    from handoffd.kernel.channel import FLAG_FD, HEADER, MAGIC, VERSION

    if flags is None:
        flags = FLAG_FD if kind in FD_KINDS else 0
    return HEADER.pack(MAGIC if magic is None else magic, VERSION, flags, kind, 0,
                       len(payload) if length is None else length) + payload


async def _attack_acceptor(channel_fd: int) -> None:
    import array
    import socket
    import struct

    import trio

    from handoffd.core.handoff import Ack, Hello, Kind

    null = os.open(os.devnull, os.O_RDONLY)
    read_end, write_end = os.pipe()
    ack = Ack(1).encode()
    messages: list[tuple[bytes, list[int]]] = [
        (b"", []),
        (b"HD\x01", []),
        (_channel_frame(Kind.ACK, ack, magic=b"??"), []),
        (_channel_frame(Kind.ACK, ack[:5], length=len(ack)), []),
        (_channel_frame(Kind.ACK, b"x" * 70000), []),
        (_channel_frame(Kind.ACK, ack[:5]), []),
        (_channel_frame(Kind.ACK, ack), [null]),
        (_channel_frame(Kind.ACK, ack), [null] * 200),
        (_channel_frame(Kind.REGISTERED, b"{}"), [read_end]),
        (_channel_frame(Kind.HANDOFF, b"h"), [write_end]),
        (_channel_frame(Kind.DRAINED, b""), []),
        (_channel_frame(Kind.HELLO, Hello(b"\x00" * 16, 1).encode()), []),
        (_channel_frame(99, b"unknown kind"), []),
        # Acknowledgements of every handoff id so far, imported or refused: none is ours
        # in flight, so none may close a connection or count as handled.
        *[(_channel_frame(Kind.ACK, struct.pack(">QII", i, major, 0)), [])
          for i in range(1, 40) for major in (0, 0x000D0000)],
    ]
    raw = socket.socket(fileno=os.dup(channel_fd))
    try:
        for data, fds in messages:
            ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                         if fds else [])
            while True:
                try:
                    raw.sendmsg([data], ancillary)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(raw)
    finally:
        raw.close()
        for fd in (null, read_end, write_end):
            os.close(fd)


async def identity_probe(stream: SecureStream) -> None:
    """Report the worker's uid/gid/groups and, for each path in ``HANDOFFD_TEST_FILES``
    (colon-separated), whether it can open it ("readable" or the errno name), as one
    JSON line; then echo."""
    import errno
    import json

    access = {}
    for path in filter(None, os.environ.get("HANDOFFD_TEST_FILES", "").split(":")):
        try:
            with open(path, "rb"):
                access[path] = "readable"
        except OSError as error:
            access[path] = errno.errorcode.get(error.errno or 0, str(error.errno))
    report = {"pid": os.getpid(), "uid": os.getuid(), "euid": os.geteuid(),
              "gid": os.getgid(), "groups": os.getgroups(), "access": access}
    await stream.send_all(json.dumps(report).encode() + b"\n")
    async for data in stream:
        await stream.send_all(data)


async def https_whoami(stream: SecureStream) -> None:
    """A one-request HTTP/1.1 answer naming the worker and what the handoff told it
    (for the TLS tests: curl, Python's ssl, a browser)."""
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = await stream.receive_some()
        if not chunk:
            return
        request += chunk
    info = stream.info
    body = (
        f"<html><body><h1>worker {os.getpid()}</h1><p>mechanism={info.get('mechanism')} "
        f"alpn={info.get('alpn')} sni={info.get('sni')} peer={info.get('peer_name')} "
        f"ktls={info.get('ktls')}</p>"
        "</body></html>\n"
    ).encode()
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


async def raises_after_one_message(stream: SecureStream) -> None:
    """An application that fails on every connection (after reading its first message):
    the client must not see success (tests/test_session_visibility.py)."""
    await stream.receive_some()
    raise ValueError("the application is broken")


async def lying_reports(stream: SecureStream) -> None:
    """``pid_echo``, except that on ``lie`` the worker writes SESSION_END reports on its
    channel, raw, that the acceptor must refuse: a short one, one with an unknown outcome,
    and 50 well-formed ones for sessions it never had; then it answers ``done``."""
    await stream.send_all(f"{os.getpid()}\n".encode())
    async for data in stream:
        if data == b"lie":
            await _lie_to_acceptor(int(os.environ["HANDOFFD_CHANNEL_FD"]))
            data = b"done"
        await stream.send_all(data)


async def _lie_to_acceptor(channel_fd: int) -> None:
    import socket
    import struct

    import trio

    from handoffd.core.handoff import Kind, Outcome, SessionEnd

    closed = SessionEnd(10**6, Outcome.CLOSED).encode()
    frames = [_channel_frame(Kind.SESSION_END, closed[:7]),
              _channel_frame(Kind.SESSION_END, struct.pack(">QBII", 1, 9, 0, 0)),
              *[_channel_frame(Kind.SESSION_END, closed)] * 50]
    raw = socket.socket(fileno=os.dup(channel_fd))
    try:
        for frame in frames:
            while True:
                try:
                    raw.send(frame)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(raw)
    finally:
        raw.close()
