"""The TLS mechanism with real clients: OpenSSL's handshake in the acceptor role, the
export encoded and decoded as a worker receives it, and the session continued by
handoffd's own record layer (``TlsStream``) against Python's ``ssl``, ``curl`` and
``openssl s_client``.  In one process here; the daemon's cross-process handoff of the
same export is tested with the daemon.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from handoffd.core.tls_export import TlsExport
from handoffd.mech.tls import TlsAcceptorFactory, TlsSettings
from handoffd.minor import Minor
from handoffd.runtime.tls_stream import TlsStream, accept_tls_handshake, session_from_export
from handoffd.status import GSSError

App = Callable[[TlsStream], Awaitable[None]]
Start = Callable[..., Awaitable[tuple[int, "Served"]]]
Pki = dict[str, Path]


@dataclass
class Served:
    exports: list[TlsExport] = field(default_factory=list)
    errors: list[GSSError] = field(default_factory=list)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    paths = {"ca": d / "ca.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for name, hosts in (("server", ["localhost", "127.0.0.1"]), ("other", ["other.example"])):
        cert = ca.issue_cert(*hosts)
        paths[f"{name}_cert"], paths[f"{name}_key"] = d / f"{name}.pem", d / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(paths[f"{name}_cert"]))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(paths[f"{name}_cert"]), append=True)
        cert.private_key_pem.write_to_path(str(paths[f"{name}_key"]))
    for name in ("alice", "mallory"):
        cert = ca.issue_cert(f"{name}@example.org", common_name=name)
        paths[f"{name}_pem"] = d / f"{name}-both.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(paths[f"{name}_pem"]))
    return paths


async def echo(stream: TlsStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.aclose()


async def http_hello(stream: TlsStream) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = await stream.receive_some()
        if not chunk:
            return
        request += chunk
    body = f"served over TLS, ALPN {stream.info.get('alpn')!r}\n".encode()
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    await stream.aclose()


async def serve(
    listener: trio.SocketListener, factory: TlsAcceptorFactory, app: App, served: Served
) -> None:
    """Accept connections: handshake, export as bytes, import, continue with ``app``."""
    while True:
        transport = await listener.accept()
        handshake = factory.new_handshake()
        try:
            with trio.fail_after(10):
                await accept_tls_handshake(transport, handshake)
            blob = handshake.export().encode()
        except GSSError as err:
            served.errors.append(err)
            await transport.aclose()
            continue
        export = TlsExport.decode(blob)  # what the worker gets, after the seal
        served.exports.append(export)
        stream = TlsStream(
            transport,
            session_from_export(export),
            unread=export.unread,
            expiry=export.expiry,
            info={"alpn": export.alpn.decode(), "sni": export.sni, "peer": export.peer},
        )
        try:
            await app(stream)
        except GSSError as err:
            served.errors.append(err)
            await stream.abort(err)


@pytest.fixture
async def server(
    pki: dict[str, Path], request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[tuple[int, Served]]]]:
    opened: list[trio.SocketListener] = []
    async with trio.open_nursery() as nursery:

        async def start(app: App = echo, **settings: object) -> tuple[int, Served]:
            factory = TlsAcceptorFactory(
                TlsSettings(certificate=pki["server_cert"], key=pki["server_key"], **settings)  # type: ignore[arg-type]
            )
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            opened.extend(listeners)
            served = Served()
            nursery.start_soon(serve, listeners[0], factory, app, served)
            return listeners[0].socket.getsockname()[1], served

        yield start
        nursery.cancel_scope.cancel()
    for listener in opened:
        await listener.aclose()


def python_client(port: int, ca: Path, messages: list[bytes], **kw: object) -> list[bytes]:
    ctx = ssl.create_default_context(cafile=str(ca))
    if "alpn" in kw:
        ctx.set_alpn_protocols(kw["alpn"])  # type: ignore[arg-type]
    if "cert" in kw:
        ctx.load_cert_chain(str(kw["cert"]))
    replies = []
    sni = str(kw.get("sni", "localhost"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        for message in messages:
            tls.sendall(message)
            got = b""
            while len(got) < len(message):
                got += tls.recv(65536)
            replies.append(got)
        tls.unwrap()
    return replies


async def test_python_ssl_client_is_served_by_the_continued_session(
    server: Start, pki: Pki
) -> None:
    port, served = await server()
    messages = [b"hello", b"x" * 100_000, b"bye"]
    assert await trio.to_thread.run_sync(python_client, port, pki["ca"], messages) == messages
    (export,) = served.exports
    assert export.server_sequence == 2  # OpenSSL's two session tickets
    assert served.errors == []


async def test_bytes_pipelined_behind_the_finished_reach_the_worker(
    server: Start, pki: Pki
) -> None:
    port, served = await server()

    def client() -> bytes:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        in_bio, out_bio = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(in_bio, out_bio, server_hostname="localhost")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(out_bio.read())
                    in_bio.write(raw.recv(65536))
            obj.write(b"pipelined")
            raw.sendall(out_bio.read())  # Finished and data in one write
            got = b""
            while len(got) < 9:
                in_bio.write(raw.recv(65536))
                with contextlib.suppress(ssl.SSLWantReadError):
                    got += obj.read(65536)
            return got

    assert await trio.to_thread.run_sync(client) == b"pipelined"
    assert served.exports[0].unread  # the data record travelled as ciphertext


async def test_curl_gets_an_answer_over_http_1_1_with_alpn(server: Start, pki: Pki) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian package curl)")
    port, served = await server(http_hello)
    result = await trio.run_process(
        ["curl", "-sS", "--http1.1", "--cacert", str(pki["ca"]), f"https://localhost:{port}/"],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"served over TLS, ALPN 'http/1.1'\n"
    assert served.exports[0].alpn == b"http/1.1" and served.exports[0].sni == "localhost"


async def test_alpn_h2_is_chosen_when_offered_and_configured(server: Start, pki: Pki) -> None:
    port, served = await server(alpn=("h2", "http/1.1"))
    await trio.to_thread.run_sync(
        lambda: python_client(port, pki["ca"], [b"x"], alpn=["h2", "http/1.1"])
    )
    assert served.exports[0].alpn == b"h2"


async def test_sni_picks_the_certificate(server: Start, pki: Pki) -> None:
    port, served = await server(sni={"other.example": (pki["other_cert"], pki["other_key"])})
    await trio.to_thread.run_sync(
        lambda: python_client(port, pki["ca"], [b"x"], sni="other.example")
    )
    assert served.exports[0].sni == "other.example"  # verified against other.example's cert


async def test_a_tls_1_2_client_gets_protocol_version(server: Start, pki: Pki) -> None:
    port, served = await server()

    def client() -> str:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                ctx.wrap_socket(raw, server_hostname="localhost")
            except ssl.SSLError as err:
                return str(err)
        return "connected"

    assert "PROTOCOL_VERSION" in (await trio.to_thread.run_sync(client)).upper()
    assert served.errors[0].minor == Minor.TLS_HANDSHAKE_FAILED


async def test_client_certificates_and_the_allow_list(server: Start, pki: Pki) -> None:
    port, served = await server(
        client_ca=pki["ca"],
        require_client_certificate=True,
        allowed_clients=("san:email:alice@example.org",),
    )
    await trio.to_thread.run_sync(
        lambda: python_client(port, pki["ca"], [b"x"], cert=pki["alice_pem"])
    )
    assert served.errors == []
    peer = served.exports[0].peer
    assert str(peer["subject"]).startswith("CN=alice,") and peer["san"] == [
        "email:alice@example.org"
    ]

    def refused(**kw: object) -> str:
        with pytest.raises(ssl.SSLError) as err:
            python_client(port, pki["ca"], [b"x"], **kw)
        return str(err.value)

    assert "ACCESS_DENIED" in await trio.to_thread.run_sync(
        lambda: refused(cert=pki["mallory_pem"])
    )
    assert "CERTIFICATE_REQUIRED" in await trio.to_thread.run_sync(refused)  # none at all
    assert [e.minor for e in served.errors] == [
        Minor.TLS_CLIENT_NOT_ALLOWED, Minor.TLS_HANDSHAKE_FAILED,
    ]  # fmt: skip
    assert "CN=mallory" in str(served.errors[0]) and len(served.exports) == 1


async def test_plain_http_on_the_tls_port_is_named(server: Start) -> None:
    port, served = await server()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await stream.receive_some() == b""
    await stream.aclose()
    assert served.errors[0].minor == Minor.TLS_NOT_TLS
    assert "GET / HT" in str(served.errors[0])


def s_client_session(port: int, ca: Path, lines: list[bytes]) -> bytes:
    """Drive ``openssl s_client`` line by line; each line's effect is awaited before the next.

    s_client's commands: a line ``k`` sends a KeyUpdate (update_not_requested), ``K`` one
    with update_requested (the server must answer with a KeyUpdate of its own), ``Q``
    closes with close_notify; any other line is sent as data and echoed back.
    """
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
               "-CAfile", str(ca), "-tls1_3"]  # fmt: skip
    seen = bytearray()
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        assert process.stdin is not None and process.stdout is not None

        def until(marker: bytes, count: int) -> None:
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
                while seen.count(marker) < count:
                    assert selector.select(timeout=10), seen.decode(errors="replace")
                    chunk = os.read(process.stdout.fileno(), 65536)  # type: ignore[union-attr]
                    assert chunk, seen.decode(errors="replace")
                    seen.extend(chunk)

        try:
            until(b"Verify return code: 0 (ok)", 1)
            updates = 0
            for line in lines:
                process.stdin.write(line + b"\n")
                process.stdin.flush()
                if line in (b"k", b"K"):
                    updates += 1
                    until(b"KEYUPDATE", updates)
                elif line != b"Q":
                    until(line + b"\n", 1)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
    return bytes(seen)


async def test_openssl_s_client_key_updates_both_ways(server: Start, pki: Pki) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian package openssl)")
    port, served = await server()
    lines = [b"before", b"k", b"middle", b"K", b"after", b"Q"]
    seen = await trio.to_thread.run_sync(s_client_session, port, pki["ca"], lines)
    assert b"after\n" in seen
    assert served.errors == []


async def test_a_requested_key_update_is_sent_at_once_not_with_the_next_data() -> None:
    from handoffd.core.tls_keys import SUITES
    from handoffd.core.tls_record import ApplicationData, KeyUpdated, TlsRecordSession

    suite = SUITES[0x1303]
    c_secret, s_secret = bytes(32), bytes(range(32))
    client = TlsRecordSession(suite, read_secret=s_secret, write_secret=c_secret, role="client")
    server_end, client_end = trio.testing.memory_stream_pair()
    stream = TlsStream(
        server_end, TlsRecordSession(suite, read_secret=c_secret, write_secret=s_secret)
    )
    await client_end.send_all(client.key_update(request_peer=True) + client.send(b"x"))
    assert await stream.receive_some() == b"x"  # the app reads and sends nothing
    with trio.fail_after(5):
        assert client.receive_data(await client_end.receive_some()) == [KeyUpdated(False)]
    await stream.send_all(b"y")
    assert client.receive_data(await client_end.receive_some()) == [ApplicationData(b"y")]


def test_the_tls_section_of_the_configuration(tmp_path: Path, pki: Pki) -> None:
    from handoffd.config import load_config
    from handoffd.mech.tls import TlsAcceptorFactory as Factory

    path = tmp_path / "handoffd.toml"
    path.write_text(
        "[tls]\n"
        'listen = ["127.0.0.1:8443"]\n'
        f'certificate = "{pki["server_cert"]}"\n'
        f'key = "{pki["server_key"]}"\n'
        'alpn = ["h2", "http/1.1"]\n'
        f'sni = ["Other.Example {pki["other_cert"]} {pki["other_key"]}"]\n'
        f'client_ca = "{pki["ca"]}"\n'
        'allowed_clients = ["spki:AB12"]\n'
        'peer_name = "spki"\n'
    )
    config = load_config(path)
    assert config.tls.sni == (("other.example", pki["other_cert"], pki["other_key"]),)
    factory = Factory.from_config(config)
    assert factory.settings.alpn == ("h2", "http/1.1") and factory.settings.peer_name == "spki"
    for bad, why in (
        ('[tls]\nlisten = ["127.0.0.1:8443"]\n', "need a certificate"),
        ('[tls]\nsni = ["only-a-name"]\n', "<server name> <certificate> <key>"),
        ('[tls]\nallowed_clients = ["cn:alice"]\n', "expected subject:"),
        ("[tls]\nrequire_client_certificate = true\n", "CA bundle"),
        ('[tls]\npeer_name = "cn"\n', "expected one of subject, san, spki"),
    ):
        path.write_text(bad)
        with pytest.raises(GSSError) as err:
            load_config(path)
        assert err.value.minor == Minor.CONFIG_INVALID and why in str(err.value)


def test_a_certificate_that_does_not_load_is_named(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "broken.pem").write_text("not a certificate")
    with pytest.raises(GSSError) as err:
        TlsAcceptorFactory(TlsSettings(certificate=tmp_path / "broken.pem", key=pki["server_key"]))
    assert err.value.minor == Minor.TLS_CERTIFICATE_INVALID and "broken.pem" in str(err.value)
    with pytest.raises(GSSError) as err:  # a key that is not the certificate's
        TlsAcceptorFactory(TlsSettings(certificate=pki["server_cert"], key=pki["other_key"]))
    assert err.value.minor == Minor.TLS_CERTIFICATE_INVALID


async def _s_client_once(port: int, ca: Path, *extra: str) -> tuple[int, str]:
    """One ``openssl s_client`` connection that sends a line and quits; status and output."""
    result = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-CAfile", str(ca), *extra],
        stdin=b"hello\nQ\n", capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_openssl_s_client_tls_1_2_gets_protocol_version(server: Start, pki: Pki) -> None:
    port, served = await server()
    code, out = await _s_client_once(port, pki["ca"], "-tls1_2")
    assert code != 0 and "protocol version" in out.lower(), out[-1500:]
    assert served.errors[0].minor == Minor.TLS_HANDSHAKE_FAILED


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_openssl_s_client_with_a_client_certificate(server: Start, pki: Pki) -> None:
    port, served = await server(
        client_ca=pki["ca"],
        require_client_certificate=True,
        allowed_clients=("san:email:alice@example.org",),
    )
    alice = ("-cert", str(pki["alice_pem"]), "-key", str(pki["alice_pem"]))
    code, out = await _s_client_once(port, pki["ca"], "-tls1_3", *alice)
    assert code == 0 and "verify return:1" in out, out[-1500:]
    assert served.exports[0].peer["san"] == ["email:alice@example.org"]
    # refused after the handshake: -ign_eof keeps s_client reading until the alert
    mallory = ("-cert", str(pki["mallory_pem"]), "-key", str(pki["mallory_pem"]))
    code, out = await _s_client_once(port, pki["ca"], "-tls1_3", "-ign_eof", *mallory)
    assert "access denied" in out.lower(), out[-1500:]
    assert served.errors[-1].minor == Minor.TLS_CLIENT_NOT_ALLOWED
