"""The shared worker pool (``[server] acceptors`` > 1) from the worker's side: a worker
with its own acceptor's channel and a guest channel of another acceptor
(``HANDOFFD_GUESTS``), each with key slots of its own and its own sender check, and
what ends when either channel ends.  Real worker processes; the test process plays
both acceptors with the daemon's building blocks (the channels are its socketpairs,
so both name this process; the home grant is the keyring's, the guest's fallback, as
two acceptors' slots are two different keyrings).  The supervisor's side (ATTACH,
GUEST) is in ``tests/test_supervision.py``, a real ``serve`` in
``tests/test_acceptors.py``."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from handoffd import environment
from handoffd.core.handoff import BATCH_KINDS, FD_KINDS, Ack, Hello, Kind
from handoffd.kernel.channel import Channel
from handoffd.kernel.parking import AcceptorParking
from handoffd.runtime.daemon import prepare_handoff
from handoffd.runtime.process import ChildProcess
from handoffd.runtime.spawner import child_environment
from handoffd.runtime.worker_process import EXIT_BOOT_FAILED
from tests.daemon_harness import read_line
from tests.test_worker_library import Harness, trio_clock


def _channel(ours: socket.socket) -> Channel:
    return Channel(trio.socket.from_stdlib_socket(ours), fd_kinds=FD_KINDS,
                   batch_kinds=BATCH_KINDS, validate_fd=None)


@asynccontextmanager
async def two_channel_worker(*, guest_pid: int | None = None, guests: str | None = None,
                             app: str = "tests.apps:pid_echo"
                             ) -> AsyncIterator[tuple[Harness, Harness]]:
    """A worker spawned as the supervisor spawns one in a set of two acceptors: its own
    channel and grant, and ``HANDOFFD_GUESTS`` naming the guest channel, its grant and
    ``guest_pid`` (default: this process, which made the channel) as its acceptor."""
    home_parking = AcceptorParking.open(slots_per_worker=4)
    guest_parking = AcceptorParking.open(slots_per_worker=4, mode="fallback")
    worker_id = os.urandom(16)
    home_grant = home_parking.add_worker(worker_id)
    guest_grant = guest_parking.add_worker(worker_id)
    home_ours, home_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    guest_ours, guest_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = child_environment(os.environ)
    env.update(home_grant.env)
    env[environment.CHANNEL_FD] = str(home_theirs.fileno())
    env[environment.WORKER_ID] = worker_id.hex()
    env[environment.ACCEPTOR_PID] = str(os.getpid())
    env[environment.GUESTS] = guests if guests is not None else json.dumps([{
        "channel_fd": guest_theirs.fileno(),
        "acceptor_pid": os.getpid() if guest_pid is None else guest_pid,
        "grant": guest_grant.env}])
    inherited = (home_theirs.fileno(), guest_theirs.fileno(), *home_grant.pass_fds,
                 *guest_grant.pass_fds)
    try:
        process = ChildProcess.spawn(
            [sys.executable, "-m", "handoffd.runtime.worker_process", "--app", app,
             "--pythonpath", os.getcwd(), "--drain-timeout", "10"],
            env=env, pass_fds=inherited, new_session=True)
    finally:
        home_theirs.close()
        guest_theirs.close()
        for fd in (*home_grant.pass_fds, *guest_grant.pass_fds):
            os.close(fd)
    home = Harness(home_parking, process, _channel(home_ours), worker_id)
    guest = Harness(guest_parking, process, _channel(guest_ours), worker_id)
    try:
        yield home, guest
    finally:
        process.kill()
        await process.wait()
        for h in (home, guest):
            h.channel.close()
            h.parking.close()


async def _hellos(*harnesses: Harness) -> None:
    for h in harnesses:
        hello = Hello.decode(await h.expect(Kind.HELLO))
        assert hello.worker_id == h.worker_id and hello.pid == h.process.pid
        h.parking.worker_adopted(h.worker_id)


async def _hand_off(h: Harness) -> trio.abc.Stream:
    """One real handshake handed off through ``h``'s channel, acknowledged; the client."""
    client, server_side, inner = await h.handshake()
    handoff_id = h.next_id()
    _, message = prepare_handoff(h.parking, h.worker_id, handoff_id, inner, trio_clock())
    await h.channel.send(Kind.HANDOFF, message, fd=server_side.socket.fileno())
    assert Ack.decode(await h.expect(Kind.ACK)) == Ack(handoff_id)
    server_side.socket.close()  # ours; the worker has its copy
    assert int(await read_line(client)) == h.process.pid
    return client


async def _echo(client: trio.abc.Stream, data: bytes) -> None:
    await client.send_all(data)
    with trio.fail_after(10):
        assert await client.receive_some() == data


async def test_each_acceptor_hands_off_through_its_own_channel_and_key_slots() -> None:
    async with two_channel_worker() as (home, guest):
        await _hellos(home, guest)  # one HELLO per acceptor, each on its channel
        for h in (home, guest):
            client = await _hand_off(h)
            await _echo(client, b"ping")
            await client.aclose()
        # A token whose key is parked in the home acceptor's slots, sent on the guest
        # channel: the guest grant has no such slot, so the worker refuses it there.
        client, server_side, inner = await home.handshake()
        _, message = prepare_handoff(home.parking, home.worker_id, 99, inner, trio_clock())
        await guest.channel.send(Kind.HANDOFF, message, fd=server_side.socket.fileno())
        ack = Ack.decode(await guest.expect(Kind.ACK))
        assert ack.handoff_id == 99 and ack.major != 0
        server_side.socket.close()
        await client.aclose()


async def test_a_guest_channel_another_process_made_stops_the_worker_at_start() -> None:
    """``HANDOFFD_GUESTS`` names the acceptor that must have made each guest channel
    (``SO_PEERCRED``); a channel made by anyone else refuses the start (exit 3)."""
    async with two_channel_worker(guest_pid=os.getppid()) as (home, _):
        with trio.fail_after(30):
            assert await home.process.wait() == EXIT_BOOT_FAILED


async def test_a_malformed_guest_list_stops_the_worker_at_start() -> None:
    async with two_channel_worker(guests='[{"channel_fd": "x"}]') as (home, _):
        with trio.fail_after(30):
            assert await home.process.wait() == EXIT_BOOT_FAILED


async def test_its_own_acceptor_gone_the_worker_drains_from_the_others_and_leaves() -> None:
    """The worker belongs to its own acceptor's share: that channel closing (the acceptor
    died) makes it tell the guest acceptor DRAINING; the sessions it holds, the guest's
    included, go on until they end, then it exits."""
    async with two_channel_worker() as (home, guest):
        await _hellos(home, guest)
        session = await _hand_off(guest)
        home.channel.close()
        assert await guest.expect(Kind.DRAINING) == b""
        await guest.channel.send(Kind.DRAINED, b"")
        await _echo(session, b"after its acceptor left")
        await session.aclose()
        with trio.fail_after(30):
            assert await home.process.wait() == 0


async def test_a_guest_acceptor_gone_the_worker_goes_on_with_its_own() -> None:
    async with two_channel_worker() as (home, guest):
        await _hellos(home, guest)
        session = await _hand_off(guest)
        guest.channel.close()
        client = await _hand_off(home)
        await _echo(client, b"still here")
        await _echo(session, b"the guest's session too")
        for stream in (client, session):
            await stream.aclose()
        assert home.process.returncode is None
