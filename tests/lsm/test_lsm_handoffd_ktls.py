"""Kernel TLS (kTLS) in a worker, on a kernel that has the ``tls`` ULP (guest only).

This host's kernel has no ``tls`` ULP; the Debian kernel ``make test-lsm`` boots has it
(lsm/run.sh loads ``tls`` and the AEAD modules).  Two levels, both real:

* a TLS 1.3 session continued by :class:`KernelTlsStream` over a real loopback TCP
  connection, against a peer that is this project's userspace record layer in the client
  role: each suite, data both ways, what the acceptor read past Finished (whole records
  and a record cut in the middle), large writes, close_notify both ways, a tampered
  record, and a KeyUpdate (rekeyed where the kernel can, ``internal_error`` where not);
* ``handoffd serve`` with a ``[tls]`` listener and Python's ``ssl`` client (OpenSSL):
  with ``ktls = "on"`` the worker's socket carries the ``tls`` ULP, with ``"auto"`` it
  does so only where the kernel can rekey.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme

from handoffd.core.tls_keys import SUITES
from handoffd.core.tls_record import (
    AlertDescription,
    ApplicationData,
    PeerClosed,
    TlsAlert,
    TlsRecordSession,
)
from handoffd.kernel import ktls
from handoffd.minor import Minor
from handoffd.runtime.ktls_stream import KernelTlsStream
from tests.daemon_harness import separated_uids, start_daemon

TCP_ULP = 31
SUITE_CODES = sorted(SUITES)


def _kernel_can_rekey() -> bool:
    """Linux 6.14 added TLS 1.3 rekey ("tls: implement rekey for TLS1.3")."""
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 14)


def test_the_probe_finds_the_ulp_every_suite_and_whether_it_can_rekey() -> None:
    support = ktls.probe()
    assert support.ulp, support.detail
    assert support.suites == frozenset(SUITE_CODES), support.detail
    assert support.rekey == _kernel_can_rekey(), (os.uname().release, support.detail)


class Pair:
    """A kTLS server stream and a userspace client session on one loopback connection."""

    def __init__(self, server: KernelTlsStream, client: TlsRecordSession,
                 wire: trio.SocketStream) -> None:
        self.server = server
        self.client = client
        self.wire = wire

    async def client_send(self, data: bytes) -> None:
        await self.wire.send_all(self.client.send(data))

    async def client_receive(self, count: int) -> list[object]:
        events: list[object] = []
        received = 0
        with trio.fail_after(10):
            while received < count:
                chunk = await self.wire.receive_some()
                if not chunk:
                    break
                for event in self.client.receive_data(chunk):
                    events.append(event)
                    if isinstance(event, ApplicationData):
                        received += len(event.data)
                    elif isinstance(event, PeerClosed):
                        return events
        return events


@asynccontextmanager
async def _pair(suite: int, *,
                prepare: Callable[[TlsRecordSession], tuple[bytes, bytes]] | None = None
                ) -> AsyncIterator[Pair]:
    """``prepare(client)``: (what the acceptor read past Finished, what is on the socket)."""
    length = SUITES[suite].hash_length
    client_secret, server_secret = os.urandom(length), os.urandom(length)
    # Two NewSessionTicket records were sent by the acceptor, as OpenSSL does.
    server_session = TlsRecordSession(SUITES[suite], read_secret=client_secret,
                                      write_secret=server_secret, write_sequence=2)
    client = TlsRecordSession(SUITES[suite], read_secret=server_secret,
                              write_secret=client_secret, read_sequence=2, role="client")
    unread, on_wire = prepare(client) if prepare is not None else (b"", b"")
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    wire = await trio.open_tcp_stream(*listener.getsockname())
    accepted, _ = await listener.accept()
    listener.close()
    if on_wire:
        await wire.send_all(on_wire)
    server = KernelTlsStream(trio.SocketStream(accepted), server_session,
                             support=ktls.probe(), unread=unread)
    try:
        yield Pair(server, client, wire)
    finally:
        await server.aclose()
        await wire.aclose()


def _ulp(stream: KernelTlsStream) -> bytes:
    assert isinstance(stream.transport, trio.SocketStream)
    name: bytes = stream.transport.socket.getsockopt(socket.IPPROTO_TCP, TCP_ULP, 16)
    return name.rstrip(b"\0")


@pytest.mark.parametrize("suite", SUITE_CODES, ids=[SUITES[c].name for c in SUITE_CODES])
async def test_data_both_ways_through_the_kernel(suite: int) -> None:
    async with _pair(suite) as pair:
        await pair.client_send(b"hello over kTLS")
        assert await pair.server.receive_some() == b"hello over kTLS"
        assert pair.server.info["ktls"] is True and _ulp(pair.server) == b"tls"
        big = os.urandom(100_000)  # seven records, sealed by the kernel
        await pair.server.send_all(big)
        events = await pair.client_receive(len(big))
        assert b"".join(e.data for e in events if isinstance(e, ApplicationData)) == big
        await pair.server.send_close()
        assert any(isinstance(e, PeerClosed) for e in await pair.client_receive(1))
        await pair.wire.send_all(pair.client.close())
        assert await pair.server.receive_some() == b""


async def test_what_the_acceptor_read_past_finished_is_served_first() -> None:
    """Two whole records and half of a third arrive as ``unread``; the rest of the third
    is on the socket: the stream reads exactly that, then the kernel takes over."""
    def prepare(client: TlsRecordSession) -> tuple[bytes, bytes]:
        early = client.send(b"one,") + client.send(b"two,")
        third = client.send(b"three")
        cut = len(third) // 2
        return early + third[:cut], third[cut:] + client.send(b",four")

    async with _pair(0x1302, prepare=prepare) as pair:
        got = b""
        with trio.fail_after(10):
            while got != b"one,two,three,four":
                got += await pair.server.receive_some()
        assert pair.server.info["ktls"] is True


async def test_a_tampered_record_is_bad_record_mac() -> None:
    async with _pair(0x1301) as pair:
        record = bytearray(pair.client.send(b"tampered"))
        record[-1] ^= 1
        await pair.wire.send_all(bytes(record))
        with pytest.raises(TlsAlert) as caught:
            await pair.server.receive_some()
        assert caught.value.alert == AlertDescription.bad_record_mac
        assert caught.value.minor == Minor.TLS_BAD_RECORD_MAC
        await pair.server.abort(caught.value)


async def test_a_key_update_from_the_client() -> None:
    """Where the kernel can rekey, the session goes on under the new keys (and answers an
    ``update_requested``); where it cannot, it ends with ``internal_error``."""
    async with _pair(0x1303) as pair:
        await pair.client_send(b"before")
        assert await pair.server.receive_some() == b"before"
        await pair.wire.send_all(pair.client.key_update(request_peer=True)
                                 + pair.client.send(b"after"))
        if not ktls.probe().rekey:
            with pytest.raises(TlsAlert) as caught:
                await pair.server.receive_some()
            assert caught.value.minor == Minor.TLS_KTLS_NO_REKEY
            await pair.server.abort(caught.value)
            with pytest.raises(TlsAlert) as alert:
                await pair.client_receive(1)
            assert "internal_error" in str(alert.value)
            return
        assert await pair.server.receive_some() == b"after"
        await pair.server.send_all(b"answer")
        events = await pair.client_receive(len(b"answer"))
        assert [e for e in events if isinstance(e, ApplicationData)] == [
            ApplicationData(b"answer")]


async def test_a_session_that_ended_before_the_move_stays_in_userspace() -> None:
    def prepare(client: TlsRecordSession) -> tuple[bytes, bytes]:
        return client.send(b"last words") + client.close(), b""

    async with _pair(0x1302, prepare=prepare) as pair:
        assert await pair.server.receive_some() == b"last words"
        assert await pair.server.receive_some() == b""
        assert pair.server.info["ktls"] is False
        assert _ulp(pair.server) == b""  # no ULP on the socket


# --- the daemon, with a real client ---------------------------------------------------


def _write_pki(directory: Path, owner: int) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = directory / "ca.pem", directory / "tls.pem", directory / "tls.key"
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.cert_chain_pems[0].write_to_path(str(paths[1]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    os.chmod(paths[2], 0o600)
    for path in paths[1:]:
        os.chown(path, owner, owner)
    return paths


def _https_get(port: int, ca: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    return answer.decode()


@pytest.mark.parametrize("mode", ["on", "auto", "off"])
async def test_the_daemon_moves_sessions_into_the_kernel_as_configured(
    tmp_path: Path, mode: str,
) -> None:
    acceptor_uid = separated_uids()[0]
    os.chmod(tmp_path, 0o755)
    ca, cert, key = _write_pki(tmp_path, acceptor_uid)
    extra = ("[tls]\nlisten = [\"127.0.0.1:0\"]\n"
             f'certificate = "{cert}"\nkey = "{key}"\nktls = "{mode}"\n')
    daemon = await start_daemon(tmp_path, workers=1, app="tests.apps:https_whoami",
                                extra=extra, acceptor_uid=acceptor_uid, timeout=120,
                                log=tmp_path / "daemon.log")
    try:
        (address,) = (await daemon.status())["tls_listen"]
        answer = await trio.to_thread.run_sync(_https_get, int(address.rsplit(":", 1)[1]), ca)
    finally:
        await daemon.stop()
    expected = mode == "on" or (mode == "auto" and ktls.probe().rekey)
    assert "mechanism=tls" in answer, answer
    assert f"ktls={expected}" in answer, answer


def test_doctor_says_what_ktls_does_on_this_kernel() -> None:
    from handoffd.doctor import _check_ktls

    check = _check_ktls()
    assert check.ok, check
    assert ("moves TLS sessions into the kernel" in check.consequence
            if ktls.probe().rekey else "keeps TLS sessions in userspace" in check.consequence)
