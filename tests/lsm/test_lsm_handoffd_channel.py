"""handoffd's SCM_RIGHTS channel with real SELinux labels per message (guest only).

Every party is a forked child in its own domain that runs its own ``trio.run`` (never a
fork inside trio); the receiving side is this test process, in a plain sync test that
calls ``trio.run`` itself.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from lsm_support import (
    ACCEPTOR,
    IMPOSTOR,
    fork_as,
    observe,
    seqpacket_listener,
    switch_label,
    wait_ok,
)

from handoffd.kernel.channel import Channel, Received
from handoffd.kernel.peer import PeerIdentity, PeerPolicy
from handoffd.minor import Minor
from handoffd.status import GSS_S_UNAUTHORIZED, GSSError

HANDOFF = 1  # a kind that carries exactly one fd
NOTE = 2  # a kind that carries none
FD_KINDS = frozenset({HANDOFF})
ONLY_THE_ACCEPTOR = PeerPolicy(labels=frozenset({ACCEPTOR}), require_label=True)


def open_fd_count() -> int:
    """How many descriptors this process holds right now."""
    return len(os.listdir("/proc/self/fd"))


def tcp_connection() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over 127.0.0.1: the kind of fd a handoff carries."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return client, accepted


def send_as_child(path: str, messages: Callable[[Channel], Awaitable[None]]) -> None:
    """Child part: connect to ``path`` and run ``messages`` on a project Channel."""

    async def run() -> None:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.connect(path)
        channel = Channel(trio.socket.from_stdlib_socket(raw), fd_kinds=FD_KINDS)
        try:
            await messages(channel)
            await channel.receive()  # until the receiver hangs up
        except GSSError as error:
            if error.minor != Minor.CHANNEL_CLOSED:
                raise
        finally:
            await channel.aclose()

    trio.run(run)


def receive_all(conn: socket.socket, count: int, *, new_only: bool = False) -> list[Received]:
    """Receive ``count`` messages on a project Channel with extended attributes on."""

    async def run() -> list[Received]:
        channel = Channel(trio.socket.from_stdlib_socket(conn), fd_kinds=FD_KINDS)
        channel.enable_extended_attributes()
        if new_only:
            channel.set_new_attributes_only(True)
        try:
            return [await channel.receive() for _ in range(count)]
        finally:
            await channel.aclose()

    return trio.run(run)


def refuse_unless_allowed(message: Received, policy: PeerPolicy) -> None:
    """What a worker does with a handoff: check the sender's label, else close its fds."""
    attributes = message.attributes
    try:
        assert attributes is not None
        policy.check(
            PeerIdentity(
                pid=attributes.pid, uid=attributes.uid, gid=attributes.gid, label=attributes.label
            )
        )
    except GSSError:
        if message.fd is not None:
            os.close(message.fd)
        raise
    finally:
        if attributes is not None and attributes.pidfd is not None:
            os.close(attributes.pidfd)


def test_impostor_handoff_is_refused_by_label_and_its_fd_closed(tmp_path: Path) -> None:
    """A root impostor reaches the worker's channel (SELinux allows it) and sends a real
    TCP fd; the label in the message refuses it and no descriptor is left behind."""
    listener, path = seqpacket_listener(tmp_path)

    async def messages(channel: Channel) -> None:
        client, accepted = tcp_connection()
        with client, accepted:
            await channel.send(HANDOFF, b"not from the acceptor", fd=accepted.fileno())

    pid = fork_as(IMPOSTOR, lambda: send_as_child(path, messages))
    try:
        conn, _ = listener.accept()
        before = open_fd_count() - 1  # conn itself is closed by the channel
        [message] = receive_all(conn, 1)
        assert message.kind == HANDOFF and message.fd is not None
        assert message.attributes is not None
        assert message.attributes.label is not None
        observe("channel-impostor", message.attributes.label)
        assert message.attributes.label == IMPOSTOR
        assert message.attributes.uid == 0
        with pytest.raises(GSSError) as refused:
            refuse_unless_allowed(message, ONLY_THE_ACCEPTOR)
        assert refused.value.major == GSS_S_UNAUTHORIZED
        assert refused.value.minor == Minor.PEER_LABEL_NOT_ALLOWED
        assert open_fd_count() == before
    finally:
        listener.close()
        wait_ok(pid)


def test_acceptor_handoff_is_accepted(tmp_path: Path) -> None:
    """The same path with the acceptor's label passes, and the fd is a live TCP socket."""
    listener, path = seqpacket_listener(tmp_path)

    async def messages(channel: Channel) -> None:
        client, accepted = tcp_connection()
        with client, accepted:
            await channel.send(HANDOFF, b"from the acceptor", fd=accepted.fileno())
            client.sendall(b"hello")

    pid = fork_as(ACCEPTOR, lambda: send_as_child(path, messages))
    try:
        conn, _ = listener.accept()
        [message] = receive_all(conn, 1)
        refuse_unless_allowed(message, ONLY_THE_ACCEPTOR)
        assert message.fd is not None
        with socket.socket(fileno=message.fd) as handed:
            assert handed.recv(5) == b"hello"
    finally:
        listener.close()
        wait_ok(pid)


def test_new_attributes_only_reports_first_and_changes(tmp_path: Path) -> None:
    """In "new attributes only" mode: the first message's set, nothing while it stays the same, the
    full set again when another process writes on the channel.

    The second writer enters another domain first, yet the label it sends is still the
    acceptor's: SELinux labels unix messages with the sending *socket's* context.
    """
    listener, path = seqpacket_listener(tmp_path)
    labels: list[bytes | None] = []

    def sender() -> None:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.connect(path)

        async def send(*payloads: bytes) -> None:
            channel = Channel(trio.socket.from_stdlib_socket(raw.dup()), fd_kinds=FD_KINDS)
            for payload in payloads:
                await channel.send(NOTE, payload)
            await channel.aclose()

        trio.run(send, b"1", b"2")
        # A second sender on the same socket, forked outside trio.run, in another domain.
        second = os.fork()
        if second == 0:
            status = 1
            try:
                switch_label(IMPOSTOR)
                trio.run(send, b"3")
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(second, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        raw.recv(1)  # until the receiver hangs up
        raw.close()

    pid = fork_as(ACCEPTOR, sender)
    try:
        conn, _ = listener.accept()
        received = receive_all(conn, 3, new_only=True)
    finally:
        listener.close()
        wait_ok(pid)
    assert [m.payload for m in received] == [b"1", b"2", b"3"]
    assert [m.attributes_changed for m in received] == [True, False, True]
    first, same, other = received
    assert first.attributes is not None and other.attributes is not None
    assert same.attributes is None
    assert first.attributes.pid == pid
    assert other.attributes.pid not in (pid, os.getpid())
    for attributes in (first.attributes, other.attributes):
        labels.append(attributes.label)
        if attributes.pidfd is not None:
            os.close(attributes.pidfd)
    observe("channel-new-only", labels[-1] or b"")
    assert labels == [ACCEPTOR, ACCEPTOR]
