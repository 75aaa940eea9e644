"""Per-message sender attributes (SO_PASSCRED / SO_PASSPIDFD / SO_PASSSEC) on a real channel.

Two forked sender processes write on the *same* socket end; the receiving Channel
is in this process.  SO_PEERCRED would name us (the socketpair's creator) for every
message; the attributes name each message's actual sender.  Forks happen before
``trio.run``; each ``trio.run`` below only receives.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest
import trio

from handoffd.kernel.attrs import AttributeReceiver
from handoffd.kernel.channel import HEADER, MAGIC, VERSION, Channel, Received
from handoffd.kernel.peer import pidfd_alive, pidfd_pid
from handoffd.minor import Minor
from handoffd.status import GSS_S_CALL_BAD_STRUCTURE, GSS_S_UNAVAILABLE, GSSError

NOTE = 2  # a kind without fd
FD_KINDS = frozenset({1})


def frame(payload: bytes, kind: int = NOTE) -> bytes:
    """A well-formed channel message of a kind that carries no fd."""
    return HEADER.pack(MAGIC, VERSION, 0, kind, 0, len(payload)) + payload


def open_fds() -> int:
    """How many descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))


class Sender:
    """A forked process that sends on an inherited socket end when told to, and stays alive."""

    def __init__(self, end: socket.socket) -> None:
        command_r, self._command = os.pipe()
        self._done, done_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                # Keep only what this sender needs: a sibling holding our pipes' write
                # ends would keep them from ever seeing EOF.
                keep = {0, 1, 2, end.fileno(), command_r, done_w}
                for name in os.listdir("/proc/self/fd"):
                    if int(name) not in keep:
                        with contextlib.suppress(OSError):
                            os.close(int(name))
                with os.fdopen(command_r, "rb") as commands:
                    for line in commands:
                        end.send(frame(line.strip()))
                        os.write(done_w, b".")
                status = 0
            finally:
                os._exit(status)
        os.close(command_r)
        os.close(done_w)

    def send(self, payload: bytes) -> None:
        """Have the child send one message and wait until it has."""
        os.write(self._command, payload + b"\n")
        assert os.read(self._done, 1) == b"."

    def finish(self) -> None:
        """Let the child exit and reap it."""
        os.close(self._command)
        os.close(self._done)
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def ends() -> Iterator[tuple[Channel, socket.socket]]:
    """A receiving Channel and the raw end the senders share (created by this process)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel(trio.socket.from_stdlib_socket(ours), fd_kinds=FD_KINDS)
    with theirs:
        yield channel, theirs
    channel.close()


def receive(channel: Channel, count: int) -> list[Received]:
    """Receive ``count`` messages in a fresh trio run."""

    async def run() -> list[Received]:
        return [await channel.receive() for _ in range(count)]

    return trio.run(run)


def alternate_senders(end: socket.socket) -> tuple[Sender, Sender]:
    """A sends a1 a2, B sends b1 b2, A sends a3; both stay alive."""
    a, b = Sender(end), Sender(end)
    for sender, payload in ((a, b"a1"), (a, b"a2"), (b, b"b1"), (b, b"b2"), (a, b"a3")):
        sender.send(payload)
    return a, b


def test_new_attributes_only_across_two_sender_processes(
    ends: tuple[Channel, socket.socket],
) -> None:
    """Full set on the first message and on each change of sender, nothing otherwise;
    unreported pidfds are closed, reported ones name the right live process."""
    channel, end = ends
    channel.enable_extended_attributes()
    channel.set_new_attributes_only(True)
    assert channel.peer_identity().pid == os.getpid()  # the creator, for every message
    before = open_fds()
    a, b = alternate_senders(end)
    with_senders = open_fds()  # their command pipes
    try:
        received = receive(channel, 5)
    finally:
        reported = [m.attributes for m in received if m.attributes is not None]
        pidfds = [x.pidfd for x in reported if x.pidfd is not None]
    try:
        assert [m.payload for m in received] == [b"a1", b"a2", b"b1", b"b2", b"a3"]
        assert [m.attributes_changed for m in received] == [True, False, True, False, True]
        assert [m.attributes is None for m in received] == [False, True, False, True, False]
        assert [(x.pid, x.uid, x.gid) for x in reported] == [
            (a.pid, os.getuid(), os.getgid()),
            (b.pid, os.getuid(), os.getgid()),
            (a.pid, os.getuid(), os.getgid()),
        ]
        assert all(x.label is None for x in reported)  # no LSM labels sockets here
        assert open_fds() == with_senders + len(pidfds)  # only the reported pidfds stayed open
        if pidfds:
            assert [pidfd_pid(fd) for fd in pidfds] == [a.pid, b.pid, a.pid]
            assert all(pidfd_alive(fd) for fd in pidfds)
    finally:
        a.finish()
        b.finish()
    assert not any(pidfd_alive(fd) for fd in pidfds)
    for fd in pidfds:
        os.close(fd)
    assert open_fds() == before


def test_full_attributes_on_every_message(ends: tuple[Channel, socket.socket]) -> None:
    """Without "new only" each message carries its sender; changed still marks switches."""
    channel, end = ends
    channel.enable_extended_attributes()
    a, b = alternate_senders(end)
    try:
        received = receive(channel, 5)
    finally:
        a.finish()
        b.finish()
    attributes = [m.attributes for m in received]
    assert [x.pid if x else None for x in attributes] == [a.pid, a.pid, b.pid, b.pid, a.pid]
    assert [m.attributes_changed for m in received] == [True, False, True, False, True]
    for x in attributes:
        if x is not None and x.pidfd is not None:
            assert not pidfd_alive(x.pidfd)  # reaped above
            os.close(x.pidfd)


def test_new_only_before_enabling_is_a_calling_error(ends: tuple[Channel, socket.socket]) -> None:
    """t6new_attr before t6ext_attr is EINVAL: here GSS_S_CALL_BAD_STRUCTURE/ATTRS_NOT_ENABLED,
    and nothing changes: enabling afterwards works and messages carry attributes."""
    channel, end = ends
    with pytest.raises(GSSError) as refused:
        channel.set_new_attributes_only(True)
    assert refused.value.major == GSS_S_CALL_BAD_STRUCTURE
    assert refused.value.minor == Minor.ATTRS_NOT_ENABLED
    channel.set_new_attributes_only(False)  # the default, harmless
    end.send(frame(b"plain"))
    [plain] = receive(channel, 1)
    assert plain.attributes is None and not plain.attributes_changed
    channel.enable_extended_attributes()
    channel.set_new_attributes_only(True)
    end.send(frame(b"with"))
    [message] = receive(channel, 1)
    assert message.attributes is not None and message.attributes.pid == os.getpid()
    if message.attributes.pidfd is not None:
        os.close(message.attributes.pidfd)


def test_socket_without_an_attribute_source_is_daemon_missing() -> None:
    """A UDP socket cannot carry SCM_CREDENTIALS (EOPNOTSUPP since Linux 6.16): ENOSYS-like."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except OSError:
            pass
        else:
            pytest.skip("this kernel (< 6.16) accepts SO_PASSCRED on UDP sockets")
        receiver = AttributeReceiver()
        with pytest.raises(GSSError) as missing:
            receiver.enable(udp)
        assert missing.value.major == GSS_S_UNAVAILABLE
        assert missing.value.minor == Minor.ATTRS_DAEMON_MISSING
        assert not receiver.enabled


def test_message_queued_before_enabling_has_no_known_sender(
    ends: tuple[Channel, socket.socket],
) -> None:
    """The kernel gives such a message pid 0: refused, and the next message is fine."""
    channel, end = ends
    end.send(frame(b"early"))
    channel.enable_extended_attributes()
    end.send(frame(b"late"))
    before = open_fds()

    async def run() -> Received:
        with pytest.raises(GSSError) as unknown:
            await channel.receive()
        assert unknown.value.minor == Minor.PEER_CREDENTIALS_UNAVAILABLE
        return await channel.receive()

    late = trio.run(run)
    assert late.payload == b"late"
    assert late.attributes is not None and late.attributes.pid == os.getpid()
    if late.attributes.pidfd is not None:
        os.close(late.attributes.pidfd)
    assert open_fds() == before


def test_sender_gone_before_the_message_is_read(ends: tuple[Channel, socket.socket]) -> None:
    """The message still names its (now reaped) sender; a pidfd, if any, says it is dead."""
    channel, end = ends
    channel.enable_extended_attributes()
    sender = Sender(end)
    sender.send(b"last words")
    sender.finish()
    [message] = receive(channel, 1)
    assert message.attributes is not None and message.attributes.pid == sender.pid
    if message.attributes.pidfd is not None:
        assert not pidfd_alive(message.attributes.pidfd)
        os.close(message.attributes.pidfd)


def test_pidfds_not_kept_are_closed_on_receipt_and_their_process_reported(
    ends: tuple[Channel, socket.socket],
) -> None:
    """keep_pidfds=False: no pidfd reaches the caller, its pidfs identity does (each sender's)."""
    channel, end = ends
    channel.enable_extended_attributes(keep_pidfds=False)
    first, second = Sender(end), Sender(end)
    before = open_fds()
    first.send(b"one")
    second.send(b"two")
    messages = receive(channel, 2)
    assert open_fds() == before  # every pidfd the kernel installed is closed already
    assert [m.attributes.pid for m in messages if m.attributes] == [first.pid, second.pid]
    for message, sender in zip(messages, (first, second), strict=True):
        assert message.attributes is not None and message.attributes.pidfd is None
        expected = os.pidfd_open(sender.pid)
        try:
            if channel._attributes.pidfds:  # only where the kernel has pidfds
                assert message.attributes.process == os.fstat(expected).st_ino
            else:
                assert message.attributes.process is None
        finally:
            os.close(expected)
    first.finish()
    second.finish()
