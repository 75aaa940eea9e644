"""The worker library against hostile senders, with a real worker process.

The test process plays the acceptor with the daemon's own building blocks
(``spawn_worker``, ``prepare_handoff``): it owns the key parking, creates the
channel, runs real handshakes over loopback TCP and hands the connections off.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from handoffd.core.context import AcceptorContext
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.framing import FrameDecoder
from handoffd.core.handoff import Ack, Hello, Kind, decode_ack_batch, encode_handoff_batch
from handoffd.kernel.channel import Channel
from handoffd.kernel.parking import AcceptorParking
from handoffd.runtime.client import open_secure_stream
from handoffd.runtime.daemon import prepare_handoff, spawn_worker
from handoffd.runtime.process import ChildProcess
from handoffd.runtime.stream import SecureStream
from handoffd.runtime.wire import accept_handshake
from tests.daemon_harness import read_line

SERVER_KEY = StaticKeyPair.generate(os.urandom)


@dataclass
class Harness:
    parking: AcceptorParking
    process: ChildProcess
    channel: Channel
    worker_id: bytes
    handoff_ids: int = 0
    session_ends: list[bytes] = field(default_factory=list)

    async def expect(self, kind: Kind) -> bytes:
        """The next message of ``kind``; SESSION_END reports (asynchronous, after each
        session) are collected in ``session_ends`` on the way unless asked for."""
        with trio.fail_after(10):
            message = await self.channel.receive()
            while message.kind == Kind.SESSION_END and kind != Kind.SESSION_END:
                self.session_ends.append(message.payload)
                message = await self.channel.receive()
        assert message.kind == kind, message
        return message.payload

    async def acks(self, count: int) -> list[Ack]:
        """The next ``count`` verdicts, whether the worker sent them one ACK each or
        grouped in ACK_BATCHes (it groups the handoffs it finds queued together)."""
        acks: list[Ack] = []
        with trio.fail_after(10):
            while len(acks) < count:
                message = await self.channel.receive()
                if message.kind == Kind.ACK:
                    acks.append(Ack.decode(message.payload))
                elif message.kind == Kind.ACK_BATCH:
                    acks.extend(decode_ack_batch(message.payload))
                elif message.kind == Kind.SESSION_END:
                    self.session_ends.append(message.payload)
                else:
                    raise AssertionError(f"unexpected {message}")
        assert len(acks) == count, acks
        return acks

    async def handshake(self) -> tuple[SecureStream, trio.SocketStream, bytes]:
        """A real client handshake over loopback; returns (client stream, server side, export)."""
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        client_transport = await trio.open_tcp_stream("127.0.0.1", port)
        server_side = await listener.accept()
        await listener.aclose()
        context = AcceptorContext(static_key=SERVER_KEY, allow_list=None, allow_anonymous=True,
                                  lifetime=60, clock=trio_clock, random=os.urandom)
        decoder = FrameDecoder()
        client: SecureStream | None = None

        async def run_client() -> None:
            nonlocal client
            client = await open_secure_stream(client_transport, server_fingerprint=None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_client)
            await accept_handshake(server_side, context, decoder)
        assert client is not None
        return client, server_side, context.export(unread=decoder.unread())

    def next_id(self) -> int:
        self.handoff_ids += 1
        return self.handoff_ids


def trio_clock() -> float:
    import time

    return time.time()


@asynccontextmanager
async def worker_harness() -> AsyncIterator[Harness]:
    parking = AcceptorParking.open(slots_per_worker=4)
    worker_id = os.urandom(16)
    process, channel = spawn_worker(parking, worker_id, "tests.apps:pid_echo",
                                          ["--pythonpath", os.getcwd()])
    harness = Harness(parking, process, channel, worker_id)
    try:
        hello = Hello.decode(await harness.expect(Kind.HELLO))
        assert hello.worker_id == worker_id and hello.pid == process.pid
        parking.worker_adopted(worker_id)
        yield harness
    finally:
        process.kill()
        await process.wait()
        channel.close()
        parking.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_genuine_handoff_is_served() -> None:
    async with worker_harness() as h:
        client, server_side, inner = await h.handshake()
        handoff_id = h.next_id()
        _, message = prepare_handoff(h.parking, h.worker_id, handoff_id, inner, trio_clock())
        await h.channel.send(Kind.HANDOFF, message, fd=server_side.socket.fileno())
        assert Ack.decode(await h.expect(Kind.ACK)) == Ack(handoff_id)
        server_side.socket.close()  # our copy; the worker has its own
        async with client:
            assert int(await read_line(client)) == h.process.pid
            await client.send_all(b"ping")
            assert await client.receive_some() == b"ping"


async def test_replayed_handoff_is_refused_and_its_fd_closed() -> None:
    async with worker_harness() as h:
        client, server_side, inner = await h.handshake()
        handoff_id = h.next_id()
        _, message = prepare_handoff(h.parking, h.worker_id, handoff_id, inner, trio_clock())
        await h.channel.send(Kind.HANDOFF, message, fd=server_side.socket.fileno())
        assert Ack.decode(await h.expect(Kind.ACK)).major == 0
        server_side.socket.close()
        # Replay the very same sealed token with another connection.
        victim, victim_server, _ = await h.handshake()
        await h.channel.send(Kind.HANDOFF, message, fd=victim_server.socket.fileno())
        ack = Ack.decode(await h.expect(Kind.ACK))
        assert ack.handoff_id == handoff_id
        assert ack.major != 0, "a replayed token must not import"
        victim_server.socket.close()
        # The worker closed its copy: the victim connection is gone, not served.
        with trio.fail_after(5):
            assert await victim.transport.receive_some(100) == b""
        await victim.transport.aclose()
        await client.aclose()


async def test_handoff_for_another_worker_is_refused() -> None:
    async with worker_harness() as h:
        client, server_side, inner = await h.handshake()
        other = os.urandom(16)
        h.parking.add_worker(other)
        handoff_id = h.next_id()
        # Sealed for `other`, sent to our worker.
        _, message = prepare_handoff(h.parking, other, handoff_id, inner, trio_clock())
        await h.channel.send(Kind.HANDOFF, message, fd=server_side.socket.fileno())
        ack = Ack.decode(await h.expect(Kind.ACK))
        assert ack.major != 0
        h.parking.remove_worker(other)
        server_side.socket.close()
        await client.transport.aclose()


async def test_impostor_writing_on_the_channel_is_refused_fds_closed() -> None:
    """A process that got hold of the acceptor's channel end (a leaked fd) is not the acceptor:
    the per-message credentials name it, the worker refuses and closes every fd it sent."""
    async with worker_harness() as h:
        client, server_side, inner = await h.handshake()
        _, message = prepare_handoff(h.parking, h.worker_id, h.next_id(), inner, trio_clock())
        script = (
            "import os, socket, sys, struct\n"
            "from handoffd.kernel.channel import Channel\n"
            "import trio\n"
            "chan_fd, conn_fd = int(sys.argv[1]), int(sys.argv[2])\n"
            "payload = bytes.fromhex(sys.argv[3])\n"
            "async def main():\n"
            "    ch = Channel.from_fd(chan_fd, fd_kinds=frozenset({2}), validate_fd=None)\n"
            "    await ch.send(2, payload, fd=conn_fd)\n"
            "trio.run(main)\n"
        )
        chan_fd = h.channel.fileno()
        conn_fd = server_side.socket.fileno()
        impostor = await trio.run_process(
            [sys.executable, "-c", script, str(chan_fd), str(conn_fd), message.hex()],
            pass_fds=(chan_fd, conn_fd), check=False, capture_stderr=True)
        assert impostor.returncode == 0, impostor.stderr.decode()
        server_side.socket.close()  # the impostor's and our copies are gone; only the worker's
        # The worker closed its copy too: the client sees the connection end, unserved.
        with trio.fail_after(10):
            assert await client.transport.receive_some(100) == b""
        await client.transport.aclose()
        # No ACK was sent for the impostor's message, and the worker still serves.
        with trio.move_on_after(0.5):
            unexpected = await h.channel.receive()
            pytest.fail(f"worker answered an impostor: {unexpected}")
        client2, server2, inner2 = await h.handshake()
        handoff_id = h.next_id()
        _, message2 = prepare_handoff(h.parking, h.worker_id, handoff_id, inner2, trio_clock())
        await h.channel.send(Kind.HANDOFF, message2, fd=server2.socket.fileno())
        assert Ack.decode(await h.expect(Kind.ACK)) == Ack(handoff_id)
        server2.socket.close()
        await client2.aclose()


async def test_worker_fails_to_start_without_a_grant() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDOFFD_")}
    result = await trio.run_process(
        [sys.executable, "-m", "handoffd.runtime.worker_process", "--app", "tests.apps:pid_echo"],
        env=env, check=False, capture_stderr=True)
    assert result.returncode == 3
    assert b"not started by handoffd" in result.stderr


def test_socketpair_creator_is_the_acceptor() -> None:
    """Sanity check of the premise the worker relies on (SO_PEERCRED names the creator)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        import struct

        pid, _, _ = struct.unpack("3i", b.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        assert pid == os.getpid()
    finally:
        a.close()
        b.close()


# --- batches ------------------------------------------------------------------------------


async def _batch(h: Harness, count: int, *, sealed_for: dict[int, bytes] | None = None
                 ) -> tuple[list[SecureStream], list[trio.SocketStream], list[int], bytes]:
    """``count`` real handshakes handed off in one HANDOFF_BATCH (entry i sealed for
    ``sealed_for[i]`` instead of the worker); returns clients, our copies, ids, payload."""
    clients, copies, ids, entries = [], [], [], []
    for i in range(count):
        client, server_side, inner = await h.handshake()
        handoff_id = h.next_id()
        target = (sealed_for or {}).get(i, h.worker_id)
        _, message = prepare_handoff(h.parking, target, handoff_id, inner, trio_clock())
        clients.append(client)
        copies.append(server_side)
        ids.append(handoff_id)
        entries.append(message)
    return clients, copies, ids, encode_handoff_batch(entries)


async def test_a_batch_is_imported_and_answered_with_one_ack_batch() -> None:
    async with worker_harness() as h:
        clients, copies, ids, payload = await _batch(h, 3)
        await h.channel.send(Kind.HANDOFF_BATCH, payload,
                             fds=tuple(c.socket.fileno() for c in copies))
        assert decode_ack_batch(await h.expect(Kind.ACK_BATCH)) == [Ack(i) for i in ids]
        for copy in copies:
            copy.socket.close()
        for client in clients:
            async with client:
                assert int(await read_line(client)) == h.process.pid
                await client.send_all(b"batched")
                assert await client.receive_some() == b"batched"


async def test_a_bad_entry_in_a_batch_is_refused_alone() -> None:
    async with worker_harness() as h:
        other = os.urandom(16)
        h.parking.add_worker(other)
        clients, copies, ids, payload = await _batch(h, 3, sealed_for={1: other})
        await h.channel.send(Kind.HANDOFF_BATCH, payload,
                             fds=tuple(c.socket.fileno() for c in copies))
        acks = decode_ack_batch(await h.expect(Kind.ACK_BATCH))
        assert [a.handoff_id for a in acks] == ids
        assert [a.major == 0 for a in acks] == [True, False, True]
        h.parking.remove_worker(other)
        for copy in copies:
            copy.socket.close()
        with trio.fail_after(5):  # the refused one's connection was closed, not served
            assert await clients[1].transport.receive_some(100) == b""
        await clients[1].transport.aclose()
        for client in (clients[0], clients[2]):
            async with client:
                assert int(await read_line(client)) == h.process.pid


async def test_an_impostors_batch_is_refused_with_every_fd_closed() -> None:
    async with worker_harness() as h:
        clients, copies, _, payload = await _batch(h, 2)
        script = (
            "import sys\n"
            "from handoffd.kernel.channel import Channel\n"
            "import trio\n"
            "chan_fd = int(sys.argv[1])\n"
            "fds = tuple(int(fd) for fd in sys.argv[3:])\n"
            "async def main():\n"
            "    ch = Channel.from_fd(chan_fd, fd_kinds=frozenset({2}),\n"
            "                         batch_kinds=frozenset({9}), validate_fd=None)\n"
            "    await ch.send(9, bytes.fromhex(sys.argv[2]), fds=fds)\n"
            "trio.run(main)\n"
        )
        chan_fd = h.channel.fileno()
        fds = [c.socket.fileno() for c in copies]
        impostor = await trio.run_process(
            [sys.executable, "-c", script, str(chan_fd), payload.hex(), *map(str, fds)],
            pass_fds=(chan_fd, *fds), check=False, capture_stderr=True)
        assert impostor.returncode == 0, impostor.stderr.decode()
        for copy in copies:
            copy.socket.close()
        for client in clients:
            with trio.fail_after(10):
                assert await client.transport.receive_some(100) == b""
            await client.transport.aclose()
        with trio.move_on_after(0.5):
            unexpected = await h.channel.receive()
            pytest.fail(f"worker answered an impostor's batch: {unexpected}")
