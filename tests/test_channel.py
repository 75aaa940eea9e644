"""The SCM_RIGHTS handoff channel against the real kernel and a hostile sender.

The hostile side is a raw socket in this process using ``sendmsg`` directly, so it
can send what the Channel never would.  Every malformed case counts
``/proc/self/fd`` before and after: all received descriptors must be closed, and
the next good message (carrying a real TCP socket over 127.0.0.1) must arrive.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from handoffd.kernel.attrs import SO_PASSPIDFD
from handoffd.kernel.channel import (
    FLAG_FD,
    HEADER,
    MAGIC,
    MAX_BATCH_FDS,
    VERSION,
    Channel,
    Received,
    tcp_stream_socket,
    validate_tcp_stream,
)
from handoffd.minor import Minor
from handoffd.status import (
    GSS_S_CALL_BAD_STRUCTURE,
    GSS_S_DEFECTIVE_TOKEN,
    GSS_S_FAILURE,
    GSSError,
)

HANDOFF = 1  # carries exactly one fd
NOTE = 2  # carries none
FD_KINDS = frozenset({HANDOFF})
MAX = 256  # a small payload limit keeps the oversized cases cheap


def open_fds() -> int:
    """How many descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))


def frame(kind: int, payload: bytes, *, flags: int | None = None, magic: bytes = MAGIC,
          version: int = VERSION, reserved: int = 0, length: int | None = None) -> bytes:
    """A channel message, well-formed unless a field is overridden."""
    if flags is None:
        flags = FLAG_FD if kind in FD_KINDS else 0
    size = len(payload) if length is None else length
    return HEADER.pack(magic, version, flags, kind, reserved, size) + payload


def send_raw(sock: socket.socket, data: bytes, fds: Sequence[int] = (),
             extra: Sequence[tuple[int, int, bytes | array.array[int]]] = ()) -> None:
    """sendmsg with an SCM_RIGHTS array (any length) and extra control messages."""
    ancillary = list(extra)
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)))
    sock.sendmsg([data], ancillary)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over 127.0.0.1 (client, accepted)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return client, accepted


@dataclass
class Ends:
    """The receiving Channel, its stdlib socket, the hostile raw end and a live TCP pair."""

    channel: Channel
    ours: socket.socket
    theirs: socket.socket
    client: socket.socket
    accepted: socket.socket


@pytest.fixture
def ends() -> Iterator[Ends]:
    """A channel pair whose sending end is raw, plus a TCP connection to hand over."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel(trio.socket.from_stdlib_socket(ours), fd_kinds=FD_KINDS, max_payload=MAX)
    client, accepted = tcp_pair()
    with theirs, client, accepted:
        yield Ends(channel, ours, theirs, client, accepted)
    channel.close()


def run(fn: Callable[[], object]) -> object:
    """Run an async callable under trio with a deadline (a hang is a failure)."""

    async def bounded() -> object:
        with trio.fail_after(10):
            return await fn()  # type: ignore[misc]

    return trio.run(bounded)


def receive_good(ends: Ends, payload: bytes = b"good") -> None:
    """Send a good handoff and check it arrives whole with a working TCP fd (then close it)."""
    ends.theirs.sendmsg(
        [frame(HANDOFF, payload)],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ends.accepted.fileno()]))],
    )
    message = run(ends.channel.receive)
    assert isinstance(message, Received)
    assert (message.kind, message.payload) == (HANDOFF, payload)
    assert message.fd is not None
    with socket.socket(fileno=message.fd) as handed:
        ends.client.sendall(b"ping")
        assert handed.recv(4) == b"ping"
    if message.attributes is not None and message.attributes.pidfd is not None:
        os.close(message.attributes.pidfd)


# --- the good path -----------------------------------------------------------------


async def test_round_trip_with_a_real_tcp_socket() -> None:
    """send() then receive(): kind, payload and a usable dup of the TCP socket; the
    sender keeps its own fd."""
    left, right = Channel.pair(fd_kinds=FD_KINDS)
    client, accepted = tcp_pair()
    with client, accepted:
        await left.send(HANDOFF, b"context", fd=accepted.fileno())
        await left.send(NOTE, b"")
        handed = await right.receive()
        note = await right.receive()
        assert (handed.kind, handed.payload, note.kind, note.payload) == (
            HANDOFF, b"context", NOTE, b"")
        assert handed.fd is not None and handed.fd != accepted.fileno()
        assert note.fd is None and handed.attributes is None and not handed.attributes_changed
        with socket.socket(fileno=handed.fd) as dup:
            client.sendall(b"x")
            assert dup.recv(1) == b"x"
        accepted.sendall(b"y")  # still ours
        assert client.recv(1) == b"y"
    assert right.peer_identity().pid == os.getpid()
    await left.aclose()
    with pytest.raises(GSSError) as closed:
        await right.receive()
    assert closed.value.minor == Minor.CHANNEL_CLOSED
    with pytest.raises(GSSError) as gone:
        await right.send(NOTE, b"anyone?")
    assert gone.value.minor == Minor.CHANNEL_CLOSED
    right.close()
    with pytest.raises(GSSError) as local:
        await right.send(NOTE, b"")
    assert local.value.minor == Minor.CHANNEL_CLOSED


async def test_send_refuses_what_the_receiver_would_refuse() -> None:
    """Caller errors are GSS_S_CALL_BAD_STRUCTURE and send nothing."""
    left, right = Channel.pair(fd_kinds=FD_KINDS, max_payload=MAX)
    with open(os.devnull) as null:
        cases: list[tuple[Callable[[], object], Minor]] = [
            (lambda: left.send(HANDOFF, b""), Minor.CHANNEL_NO_FD),
            (lambda: left.send(NOTE, b"", fd=null.fileno()), Minor.CHANNEL_FD_NOT_ALLOWED),
            (lambda: left.send(NOTE, b"x" * (MAX + 1)), Minor.CHANNEL_MESSAGE_TOO_LARGE),
            (lambda: left.send(70000, b""), Minor.CHANNEL_BAD_HEADER),
            (lambda: left.send(-1, b""), Minor.CHANNEL_BAD_HEADER),
        ]
        for call, minor in cases:
            with pytest.raises(GSSError) as refused:
                await call()  # type: ignore[misc]
            assert (refused.value.major, refused.value.minor) == (GSS_S_CALL_BAD_STRUCTURE, minor)
    await left.send(NOTE, b"x" * MAX)  # exactly the limit is fine
    assert (await right.receive()).payload == b"x" * MAX
    await left.aclose()
    await right.aclose()


def test_from_fd_adopts_an_inherited_end_and_refuses_other_sockets() -> None:
    """from_fd makes the end close-on-exec; a stream socket or a file is refused and
    stays the caller's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = theirs.detach()
    os.set_inheritable(fd, True)
    channel = Channel.from_fd(fd, fd_kinds=FD_KINDS)
    assert channel.fileno() == fd and not os.get_inheritable(fd)
    ours.send(frame(NOTE, b"hi"))
    assert run(channel.receive).payload == b"hi"  # type: ignore[attr-defined]
    channel.close()
    ours.close()
    stream_a, stream_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with stream_a, stream_b, open(os.devnull) as null:
        for wrong in (stream_a.fileno(), null.fileno()):
            with pytest.raises(GSSError) as refused:
                Channel.from_fd(wrong, fd_kinds=FD_KINDS)
            assert refused.value.minor == Minor.CHANNEL_NOT_SEQPACKET
            os.fstat(wrong)  # still open
        with stream_a.dup() as other, pytest.raises(GSSError) as direct:
            Channel(trio.socket.from_stdlib_socket(other), fd_kinds=FD_KINDS)
        assert direct.value.minor == Minor.CHANNEL_NOT_SEQPACKET


# --- validate_tcp_stream ----------------------------------------------------------------


def test_validate_tcp_stream_accepts_only_connected_tcp() -> None:
    """Connected TCP (v4, and v6 where available) passes; everything else has a precise
    minor; the fd stays open either way."""
    client, accepted = tcp_pair()
    with client, accepted:
        validate_tcp_stream(accepted.fileno())
        validate_tcp_stream(client.fileno())
        os.fstat(accepted.fileno())
    if socket.has_ipv6:
        try:
            server6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
        except OSError:
            pass
        else:
            with server6, socket.create_connection(server6.getsockname()[:2]) as client6:
                validate_tcp_stream(client6.fileno())
    for make, minor in WRONG_FDS:
        with make() as wrong:
            with pytest.raises(GSSError) as refused:
                validate_tcp_stream(wrong.fileno())
            assert refused.value.minor == minor
            os.fstat(wrong.fileno())


def test_tcp_stream_socket_owns_a_good_fd_and_leaves_a_bad_one_open() -> None:
    """The returned socket is the fd (closing it closes the fd); a refused fd stays open."""
    client, accepted = tcp_pair()
    with client, accepted:
        fd = os.dup(accepted.fileno())
        sock = tcp_stream_socket(fd)
        assert sock.fileno() == fd and sock.type == socket.SOCK_STREAM
        sock.close()
        with pytest.raises(OSError):
            os.fstat(fd)
    for make, minor in WRONG_FDS:
        with make() as wrong:
            with pytest.raises(GSSError) as refused:
                tcp_stream_socket(wrong.fileno())
            assert refused.value.minor == minor
            os.fstat(wrong.fileno())


def _dev_null() -> BinaryIO:
    return open(os.devnull, "rb")  # the caller's with-block closes it


def _udp() -> socket.socket:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect(("127.0.0.1", 9))
    return udp


def _listening_tcp() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


WRONG_FDS: list[tuple[Callable[[], socket.socket | BinaryIO], Minor]] = [
    (_dev_null, Minor.CHANNEL_FD_NOT_TCP),
    (_udp, Minor.CHANNEL_FD_NOT_TCP),
    (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), Minor.CHANNEL_FD_NOT_TCP),
    (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), Minor.CHANNEL_FD_NOT_CONNECTED),
    (_listening_tcp, Minor.CHANNEL_FD_NOT_CONNECTED),
]


# --- a hostile sender ---------------------------------------------------------------------


@dataclass
class Hostile:
    """One malformed message: how to send it, the minor it must raise, and the setup."""

    send: Callable[[Ends], None]
    minor: Minor
    attributes: bool = False
    passcred_behind_our_back: int | None = None  # a SOL_SOCKET option set on our end


def _with_fd_like(make: Callable[[], socket.socket | BinaryIO]) -> Callable[[Ends], None]:
    def send(ends: Ends) -> None:
        with make() as thing:
            send_raw(ends.theirs, frame(HANDOFF, b"h"), [thing.fileno()])

    return send


def _pipe_fd(ends: Ends) -> None:
    read_end, write_end = os.pipe()
    try:
        send_raw(ends.theirs, frame(HANDOFF, b"h"), [read_end])
    finally:
        os.close(read_end)
        os.close(write_end)


def _tcp_fds(count: int, data: bytes = frame(HANDOFF, b"h")) -> Callable[[Ends], None]:
    def send(ends: Ends) -> None:
        dups = [os.dup(ends.accepted.fileno()) for _ in range(count)]
        try:
            send_raw(ends.theirs, data, dups)
        finally:
            for fd in dups:
                os.close(fd)

    return send


def _plain(data: bytes) -> Callable[[Ends], None]:
    return lambda ends: send_raw(ends.theirs, data)


def _forged_credentials(ends: Ends) -> None:
    creds = array.array("i", [os.getpid(), os.getuid(), os.getgid()])
    send_raw(ends.theirs, frame(HANDOFF, b"h"), [ends.accepted.fileno()],
             [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])


HOSTILE: dict[str, Hostile] = {
    "no-fd": Hostile(_plain(frame(HANDOFF, b"h")), Minor.CHANNEL_NO_FD),
    "two-fds": Hostile(_tcp_fds(2), Minor.CHANNEL_TOO_MANY_FDS),
    "200-fds": Hostile(_tcp_fds(200), Minor.CHANNEL_CONTROL_TRUNCATED),
    "200-fds-attrs-on": Hostile(_tcp_fds(200), Minor.CHANNEL_TOO_MANY_FDS, attributes=True),
    "fd-on-note": Hostile(_tcp_fds(1, frame(NOTE, b"n")), Minor.CHANNEL_FD_NOT_ALLOWED),
    "pipe": Hostile(_pipe_fd, Minor.CHANNEL_FD_NOT_TCP),
    "dev-null": Hostile(_with_fd_like(_dev_null), Minor.CHANNEL_FD_NOT_TCP),
    "udp": Hostile(_with_fd_like(_udp), Minor.CHANNEL_FD_NOT_TCP),
    "unconnected-tcp": Hostile(
        _with_fd_like(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
        Minor.CHANNEL_FD_NOT_CONNECTED),
    "listening-tcp": Hostile(_with_fd_like(_listening_tcp), Minor.CHANNEL_FD_NOT_CONNECTED),
    "truncated-payload": Hostile(_tcp_fds(1, frame(HANDOFF, b"short", length=100)),
                                 Minor.CHANNEL_BAD_HEADER),
    "payload-over-limit": Hostile(_tcp_fds(1, frame(HANDOFF, b"x" * (MAX + 1))),
                                  Minor.CHANNEL_MESSAGE_TOO_LARGE),
    "length-over-limit": Hostile(_plain(frame(NOTE, b"", length=MAX + 1)),
                                 Minor.CHANNEL_MESSAGE_TOO_LARGE),
    "oversized-datagram": Hostile(_tcp_fds(1, frame(HANDOFF, b"x" * 4 * MAX)),
                                  Minor.CHANNEL_TRUNCATED),
    "bad-magic": Hostile(_tcp_fds(1, frame(HANDOFF, b"h", magic=b"XX")),
                         Minor.CHANNEL_BAD_HEADER),
    "bad-version": Hostile(_tcp_fds(1, frame(HANDOFF, b"h", version=9)),
                           Minor.CHANNEL_BAD_HEADER),
    "reserved-set": Hostile(_plain(frame(NOTE, b"n", reserved=1)), Minor.CHANNEL_BAD_HEADER),
    "unknown-flag": Hostile(_plain(frame(NOTE, b"n", flags=0x80)), Minor.CHANNEL_BAD_HEADER),
    "fd-flag-on-note": Hostile(_plain(frame(NOTE, b"n", flags=FLAG_FD)),
                               Minor.CHANNEL_BAD_HEADER),
    "short": Hostile(_tcp_fds(1, b"HD\x01"), Minor.CHANNEL_BAD_HEADER),
    "empty-datagram": Hostile(_plain(b""), Minor.CHANNEL_BAD_HEADER),
    "credentials-not-enabled": Hostile(_forged_credentials, Minor.CHANNEL_UNEXPECTED_CONTROL,
                                       passcred_behind_our_back=socket.SO_PASSCRED),
    "pidfd-not-enabled": Hostile(_tcp_fds(1), Minor.CHANNEL_UNEXPECTED_CONTROL,
                                 passcred_behind_our_back=SO_PASSPIDFD),
    "bad-header-with-attrs": Hostile(_tcp_fds(1, frame(HANDOFF, b"h", magic=b"??")),
                                     Minor.CHANNEL_BAD_HEADER, attributes=True),
}


@pytest.mark.parametrize("case", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_message_is_refused_and_leaks_nothing(ends: Ends, case: Hostile) -> None:
    """The precise minor, every installed fd (and pidfd) closed, the next message fine."""
    if case.attributes:
        ends.channel.enable_extended_attributes()
    before = open_fds()
    if case.passcred_behind_our_back is not None:
        ends.ours.setsockopt(socket.SOL_SOCKET, case.passcred_behind_our_back, 1)
    case.send(ends)
    with pytest.raises(GSSError) as refused:
        run(ends.channel.receive)
    assert (refused.value.major, refused.value.minor) == (GSS_S_DEFECTIVE_TOKEN, case.minor)
    assert open_fds() == before
    if case.passcred_behind_our_back is not None:
        ends.ours.setsockopt(socket.SOL_SOCKET, case.passcred_behind_our_back, 0)
    receive_good(ends)
    assert open_fds() == before


def test_a_flood_of_hostile_fds_is_all_closed(ends: Ends) -> None:
    """Thousands of bad messages with fds: all refused and closed, the fd count stays
    flat, and the channel still delivers a good handoff afterwards."""
    count = 3000
    before = open_fds()
    bad_frames = [
        (frame(HANDOFF, b"h", magic=b"!!"), 1),
        (frame(HANDOFF, b"h"), 2),
        (frame(NOTE, b"n"), 1),
        (frame(HANDOFF, b"h", length=99), 3),
    ]
    ends.theirs.setblocking(False)
    sender = trio.socket.from_stdlib_socket(ends.theirs.dup())
    refused: dict[int, int] = {}

    async def flood() -> None:
        fd = ends.accepted.fileno()
        for i in range(count):
            data, fds = bad_frames[i % len(bad_frames)]
            await sender.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * fds))]
            )

    async def drain() -> None:
        for _ in range(count):
            try:
                await ends.channel.receive()
            except GSSError as error:
                refused[error.minor] = refused.get(error.minor, 0) + 1

    async def both() -> None:
        with sender:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                nursery.start_soon(drain)

    run(both)
    ends.theirs.setblocking(True)
    assert refused == {
        # The header is judged before the fd count (a batch kind may carry several), unless
        # there are more fds than any batch may carry.
        Minor.CHANNEL_BAD_HEADER: count // 2,
        Minor.CHANNEL_TOO_MANY_FDS: count // 4,
        Minor.CHANNEL_FD_NOT_ALLOWED: count // 4,
    }
    assert open_fds() == before
    receive_good(ends)
    assert open_fds() == before


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=2 * MAX), with_fd=st.booleans())
def test_arbitrary_bytes_never_break_the_channel(data: bytes, with_fd: bool) -> None:
    """Whatever a peer sends, receive() returns a message or raises a channel error,
    closes what it must, and the channel keeps working."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel(trio.socket.from_stdlib_socket(ours), fd_kinds=FD_KINDS, max_payload=MAX)
    client, accepted = tcp_pair()
    ends = Ends(channel, ours, theirs, client, accepted)
    try:
        before = open_fds()
        send_raw(theirs, data, [accepted.fileno()] if with_fd else [])
        try:
            message = run(channel.receive)
        except GSSError as error:
            assert error.major in (GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE)
            assert Minor(error.minor).name.startswith("CHANNEL_")
            assert error.minor != Minor.CHANNEL_CLOSED or not data
        else:
            assert isinstance(message, Received)
            if message.fd is not None:
                os.close(message.fd)
        assert open_fds() == before
        receive_good(ends)
    finally:
        channel.close()
        for sock in (theirs, client, accepted):
            sock.close()


async def test_send_on_a_full_channel_waits_for_room_and_loses_nothing() -> None:
    """Sends go out at once while the socket has room and wait (trio) when it is full:
    every message arrives, in order, once the peer reads."""
    left, right = Channel.pair(fd_kinds=FD_KINDS)
    payload = b"x" * 4096
    sent = 0
    with trio.move_on_after(0.5):
        while True:  # fill the socket until a send has to wait
            await left.send(NOTE, payload + sent.to_bytes(4, "big"))
            sent += 1
    assert sent > 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.send, NOTE, payload + sent.to_bytes(4, "big"))
        for index in range(sent + 1):
            message = await right.receive()
            assert message.payload[-4:] == index.to_bytes(4, "big")
    left.close()
    right.close()


async def test_receive_after_an_empty_receive_nowait_waits_then_gets_the_message() -> None:
    """receive_nowait() takes what is queued and answers None on an empty channel; the
    receive() after such a None waits first (no recvmsg bound to fail) and still gets the
    next message, a local close or the peer's end of file."""
    left, right = Channel.pair(fd_kinds=FD_KINDS)
    await left.send(NOTE, b"queued")
    queued = right.receive_nowait()
    assert queued is not None and queued.payload == b"queued"
    assert right.receive_nowait() is None

    async def later(payload: bytes) -> None:
        await trio.sleep(0.05)
        await left.send(NOTE, payload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later, b"later")
        with trio.fail_after(5):
            assert (await right.receive()).payload == b"later"
    assert right.receive_nowait() is None
    await left.send(NOTE, b"raced")  # arrives between the None and receive()
    with trio.fail_after(5):
        assert (await right.receive()).payload == b"raced"

    assert right.receive_nowait() is None
    async with trio.open_nursery() as nursery:
        async def close_soon() -> None:
            await trio.sleep(0.05)
            right.close()
        nursery.start_soon(close_soon)
        with pytest.raises(GSSError) as closed, trio.fail_after(5):
            await right.receive()
    assert closed.value.minor == Minor.CHANNEL_CLOSED

    ours, theirs = Channel.pair(fd_kinds=FD_KINDS)
    assert ours.receive_nowait() is None
    theirs.close()
    with pytest.raises(GSSError) as ended, trio.fail_after(5):
        await ours.receive()
    assert ended.value.minor == Minor.CHANNEL_CLOSED
    ours.close()
    left.close()


# --- batches: several fds in one message -----------------------------------------------

BATCH = 3  # a batch kind: 1 to MAX_BATCH_FDS fds, their number in the header


def _batch_frame(payload: bytes, count: int, *, flags: int = FLAG_FD) -> bytes:
    return HEADER.pack(MAGIC, VERSION, flags, BATCH, count, len(payload)) + payload


@pytest.fixture
def batch_ends() -> Iterator[Ends]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel(trio.socket.from_stdlib_socket(ours), fd_kinds=FD_KINDS,
                      batch_kinds=frozenset({BATCH}), max_payload=MAX)
    client, accepted = tcp_pair()
    with theirs, client, accepted:
        yield Ends(channel, ours, theirs, client, accepted)
    channel.close()


async def test_a_batch_carries_its_fds_in_order() -> None:
    left, right = Channel.pair(fd_kinds=FD_KINDS, batch_kinds=frozenset({BATCH}))
    pairs = [tcp_pair() for _ in range(5)]
    try:
        await left.send(BATCH, b"five", fds=tuple(a.fileno() for _, a in pairs))
        message = await right.receive()
        assert (message.kind, message.payload, message.fd) == (BATCH, b"five", None)
        assert len(message.fds) == 5
        for (client, _), fd in zip(pairs, message.fds, strict=True):
            with socket.socket(fileno=fd) as handed:
                client.sendall(b"which")
                assert handed.recv(5) == b"which"
    finally:
        for client, accepted in pairs:
            client.close()
            accepted.close()
        left.close()
        right.close()


async def test_send_refuses_a_batch_the_receiver_would_refuse() -> None:
    left, right = Channel.pair(fd_kinds=FD_KINDS, batch_kinds=frozenset({BATCH}))
    client, accepted = tcp_pair()
    with client, accepted:
        for kind, fds, minor in [
            (BATCH, (), Minor.CHANNEL_TOO_MANY_FDS),  # a batch of none
            (BATCH, (accepted.fileno(),) * (MAX_BATCH_FDS + 1), Minor.CHANNEL_TOO_MANY_FDS),
            (NOTE, (accepted.fileno(),), Minor.CHANNEL_FD_NOT_ALLOWED),
            (HANDOFF, (accepted.fileno(),) * 2, Minor.CHANNEL_FD_NOT_ALLOWED),
        ]:
            with pytest.raises(GSSError) as caught:
                await left.send(kind, b"x", fds=fds)
            assert caught.value.minor == minor, (kind, len(fds))
    left.close()
    right.close()


@pytest.mark.parametrize(("count_in_header", "fds_sent", "minor"), [
    (3, 2, Minor.CHANNEL_NO_FD),  # fewer fds than the header says
    (2, 3, Minor.CHANNEL_TOO_MANY_FDS),  # more
    (0, 1, Minor.CHANNEL_BAD_HEADER),  # a batch of none
    (MAX_BATCH_FDS + 1, MAX_BATCH_FDS + 1, Minor.CHANNEL_TOO_MANY_FDS),
])
def test_a_batch_whose_fds_do_not_match_is_refused_all_closed(
    batch_ends: Ends, count_in_header: int, fds_sent: int, minor: Minor,
) -> None:
    before = open_fds()
    send_raw(batch_ends.theirs, _batch_frame(b"b", count_in_header),
             [batch_ends.accepted.fileno()] * fds_sent)
    with pytest.raises(GSSError) as caught:
        run(batch_ends.channel.receive)
    assert caught.value.minor == minor
    assert open_fds() == before
    receive_good(batch_ends)  # the channel goes on


def test_a_batch_with_one_fd_that_is_not_tcp_is_refused_all_closed(batch_ends: Ends) -> None:
    before = open_fds()
    read_end, write_end = os.pipe()
    try:
        send_raw(batch_ends.theirs, _batch_frame(b"b", 2),
                 [batch_ends.accepted.fileno(), read_end])
        with pytest.raises(GSSError) as caught:
            run(batch_ends.channel.receive)
        assert caught.value.minor == Minor.CHANNEL_FD_NOT_TCP
    finally:
        os.close(read_end)
        os.close(write_end)
    assert open_fds() == before


def test_a_non_batch_kind_with_a_count_is_a_bad_header(batch_ends: Ends) -> None:
    before = open_fds()
    send_raw(batch_ends.theirs, frame(HANDOFF, b"h", reserved=2),
             [batch_ends.accepted.fileno()] * 2)
    with pytest.raises(GSSError) as caught:
        run(batch_ends.channel.receive)
    assert caught.value.minor == Minor.CHANNEL_BAD_HEADER
    assert open_fds() == before
