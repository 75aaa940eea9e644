"""The worker side's LSM label policy: ``[policy] acceptor_labels`` and ``acceptor_labels=``.

This host has no LSM that labels sockets (SO_PEERSEC -> ENOPROTOOPT), so the tests that
need a *present* label inject it (marked ``injected``); the ones that need an *absent*
label use the real kernel.  Real labels are tested in the VM: tests/lsm/test_lsm_daemon.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from handoffd.config import parse_config
from handoffd.core.handoff import FD_KINDS, Kind
from handoffd.kernel.attrs import SenderAttributes
from handoffd.kernel.channel import Channel, Received
from handoffd.kernel.parking import AcceptorParking, WorkerParking
from handoffd.kernel.peer import PeerIdentity
from handoffd.minor import Minor
from handoffd.runtime.daemon import spawn_worker
from handoffd.runtime.worker import HandoffReceiver, WorkerIdentity
from handoffd.status import GSS_S_FAILURE, GSS_S_UNAUTHORIZED, GSSError

ACCEPTOR = b"system_u:system_r:handoffd_t:s0"
IMPOSTOR = b"system_u:system_r:unconfined_t:s0"


def test_config_acceptor_labels() -> None:
    """``[policy] acceptor_labels`` is a list of strings, empty by default."""
    base = Path("/")
    assert parse_config({}, base=base).policy.acceptor_labels == ()
    config = parse_config({"policy": {"acceptor_labels": [ACCEPTOR.decode()]}}, base=base)
    assert config.policy.acceptor_labels == (ACCEPTOR.decode(),)
    for bad in ("u:r:t", [1], [""]):
        with pytest.raises(GSSError) as refused:
            parse_config({"policy": {"acceptor_labels": bad}}, base=base)
        assert (refused.value.major, refused.value.minor) == (GSS_S_FAILURE,
                                                              Minor.CONFIG_INVALID)
        assert "acceptor_labels" in (refused.value.detail or "")


def receiver_with(labels: frozenset[bytes] | None) -> tuple[HandoffReceiver, socket.socket]:
    """A receiver over a real socketpair (we are its acceptor) with ``labels`` configured."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel.from_fd(theirs.detach(), fd_kinds=FD_KINDS, validate_fd=None)
    parking = WorkerParking("fallback", b"w" * 16, [], b"")
    identity = WorkerIdentity(b"w" * 16, os.getpid(), os.getuid(), labels)
    return HandoffReceiver(channel, parking, identity), ours


def handoff_from(label: bytes | None, fd: int) -> Received:
    """A HANDOFF as the channel would deliver it from this process, with ``label`` injected."""
    attributes = SenderAttributes(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(),
                                  pidfd=None, label=label)
    return Received(kind=Kind.HANDOFF, payload=b"", fd=fd, attributes=attributes,
                    attributes_changed=True)


@pytest.mark.injected
async def test_handoff_from_another_label_is_refused_and_its_fd_closed() -> None:
    """Injected SCM_SECURITY label (no LSM here): the right pid and uid but another
    label is refused before the payload is looked at, and the fd it carried is closed."""
    receiver, ours = receiver_with(frozenset({ACCEPTOR}))
    with ours:
        for label in (IMPOSTOR, None):
            client, server = socket.socketpair()
            fd = server.detach()
            assert await receiver._accept_group([handoff_from(label, fd)]) == []
            with pytest.raises(OSError):
                os.fstat(fd)
            client.close()
        assert receiver.refused == 2
        # A batch from another label: every fd it carried closed.
        pairs = [socket.socketpair() for _ in range(3)]
        fds = tuple(server.detach() for _, server in pairs)
        batch = Received(kind=Kind.HANDOFF_BATCH, payload=b"", fd=None,
                         attributes=handoff_from(IMPOSTOR, -1).attributes,
                         attributes_changed=True, fds=fds)
        assert await receiver._accept_group([batch]) == []
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
        for client, _ in pairs:
            client.close()
        assert receiver.refused == 5
        receiver.close()


@pytest.mark.injected
def test_sender_label_check_with_and_without_nul() -> None:
    """Injected labels: the acceptor's label passes with or without a trailing NUL (the
    kernel may count it), another label is PEER_LABEL_NOT_ALLOWED, none is
    PEER_LABEL_REQUIRED, and no configured labels means no label check."""
    receiver, ours = receiver_with(frozenset({ACCEPTOR}))
    unchecked, ours2 = receiver_with(None)
    with ours, ours2:
        for label in (ACCEPTOR, ACCEPTOR + b"\0"):
            receiver._verify_sender(handoff_from(label, -1))
            receiver._verify_channel_peer(PeerIdentity(os.getpid(), os.getuid(), 0, label))
        for label, minor in ((IMPOSTOR, Minor.PEER_LABEL_NOT_ALLOWED),
                             (None, Minor.PEER_LABEL_REQUIRED)):
            with pytest.raises(GSSError) as by_message:
                receiver._verify_sender(handoff_from(label, -1))
            with pytest.raises(GSSError) as by_channel:
                receiver._verify_channel_peer(PeerIdentity(os.getpid(), os.getuid(), 0, label))
            for refused in (by_message, by_channel):
                assert (refused.value.major, refused.value.minor) == (GSS_S_UNAUTHORIZED,
                                                                      minor)
        unchecked._verify_sender(handoff_from(IMPOSTOR, -1))
        unchecked._verify_sender(handoff_from(None, -1))
        receiver.close()
        unchecked.close()


async def test_spawned_worker_with_acceptor_labels_refuses_an_unlabelled_channel() -> None:
    """Real kernel, no LSM: a worker told ``--acceptor-label`` (what the daemon passes for
    ``[policy] acceptor_labels``) finds no label on its channel and refuses to start."""
    parking = AcceptorParking.open(slots_per_worker=1)
    worker_id = os.urandom(16)
    process, channel = spawn_worker(
        parking, worker_id, "tests.apps:pid_echo",
        ["--pythonpath", os.getcwd(), "--acceptor-label", ACCEPTOR.decode()])
    try:
        with trio.fail_after(30):
            assert await process.wait() == 3
        # It never said HELLO: the channel only reports the worker's end closing.
        with pytest.raises(GSSError) as closed:
            with trio.fail_after(10):
                await channel.receive()
        assert closed.value.minor == Minor.CHANNEL_CLOSED
    finally:
        process.kill()
        await process.wait()
        channel.close()
        parking.close()


async def test_external_worker_with_acceptor_labels_refuses_an_unlabelled_listener(
    tmp_path: Path,
) -> None:
    """Real kernel, no LSM: ``register(acceptor_labels=...)`` checks the listener's
    SO_PEERSEC before it reads anything; no label there is PEER_LABEL_REQUIRED."""
    path = str(tmp_path / "register.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with listener:
        await listener.bind(path)
        listener.listen(1)
        with pytest.raises(GSSError) as refused:
            await HandoffReceiver.register(path, acceptor_labels=[ACCEPTOR.decode()])
        assert (refused.value.major, refused.value.minor) == (GSS_S_UNAUTHORIZED,
                                                              Minor.PEER_LABEL_REQUIRED)
