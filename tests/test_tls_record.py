"""The TLS 1.3 record layer a worker continues, against OpenSSL itself.

The handshake runs between two OpenSSL endpoints (Python's ``ssl`` over memory BIOs,
the server writing an NSS key log); then the server side is replaced by
:class:`TlsRecordSession`, built from the key log's application traffic secrets, and
talks to the still-OpenSSL client: data both ways, KeyUpdate both ways, fragmenting,
close_notify, session tickets counted against the server's sequence number. The
defects are then driven with a second :class:`TlsRecordSession` as the peer, which can
build records OpenSSL will not send.
"""

from __future__ import annotations

import datetime
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from handoffd.core.tls_keys import SUITES, TrafficKeys, hkdf_expand_label, suite_by_code
from handoffd.core.tls_record import (
    MAX_PLAINTEXT,
    AlertDescription,
    ApplicationData,
    KeyUpdated,
    PeerClosed,
    TlsAlert,
    TlsRecordSession,
)
from handoffd.minor import Minor
from handoffd.status import GSS_S_BAD_MECH, GSS_S_BAD_SIG, GSS_S_DEFECTIVE_TOKEN, GSSError

SUITE_BY_NAME = {s.name: s for s in SUITES.values()}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for localhost (cert, key) in PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Handshaken:
    """An OpenSSL client whose server half is now a TlsRecordSession."""

    client: ssl.SSLObject
    client_in: ssl.MemoryBIO
    client_out: ssl.MemoryBIO
    server: TlsRecordSession

    def to_server(self) -> list[object]:
        return list(self.server.receive_data(self.client_out.read()))

    def to_client(self, records: bytes) -> bytes:
        self.client_in.write(records)
        out = bytearray()
        while True:
            try:
                chunk = self.client.read(65536)
            except ssl.SSLWantReadError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk


def _pump(a_out: ssl.MemoryBIO, b_in: ssl.MemoryBIO) -> None:
    data = a_out.read()
    if data:
        b_in.write(data)


def handshake(certificate: tuple[Path, Path], tmp_path: Path, tickets: int = 0) -> Handshaken:
    """Run a TLS 1.3 handshake OpenSSL to OpenSSL in memory, then continue the server in
    a TlsRecordSession from the key log (write sequence = the ticket records sent)."""
    keylog = tmp_path / "keylog.txt"
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(*map(str, certificate))
    server_ctx.keylog_filename = str(keylog)
    server_ctx.num_tickets = tickets
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(str(certificate[0]))
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        _pump(c_out, s_in)
        _pump(s_out, c_in)
        if all(done.values()):
            break
    assert all(done.values())
    cipher = server.cipher()
    assert cipher is not None and cipher[1] == "TLSv1.3"
    secrets = {}
    for line in keylog.read_text().splitlines():
        if line.startswith("#"):
            continue  # Python's header line
        label, _random, secret = line.split()
        secrets[label] = bytes.fromhex(secret)
    session = TlsRecordSession(
        SUITE_BY_NAME[cipher[0]],
        read_secret=secrets["CLIENT_TRAFFIC_SECRET_0"],
        write_secret=secrets["SERVER_TRAFFIC_SECRET_0"],
        write_sequence=tickets,  # each ticket is one record under the server's key
    )
    return Handshaken(client, c_in, c_out, session)


def data_of(events: list[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ApplicationData))


def test_openssl_client_and_continued_server_exchange_data(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    h = handshake(certificate, tmp_path)
    h.client.write(b"GET / HTTP/1.1\r\n\r\n")
    assert data_of(h.to_server()) == b"GET / HTTP/1.1\r\n\r\n"
    assert h.to_client(h.server.send(b"HTTP/1.1 200 OK\r\n\r\n")) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_session_tickets_count_against_the_servers_sequence(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    h = handshake(certificate, tmp_path, tickets=2)
    assert h.to_client(h.server.send(b"after two tickets")) == b"after two tickets"


def test_a_server_starting_at_the_wrong_sequence_is_refused_by_openssl(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    h = handshake(certificate, tmp_path, tickets=2)
    h.server._write.sequence = 0  # the trap: tickets already used 0 and 1
    with pytest.raises(ssl.SSLError, match=r"DECRYPTION_FAILED_OR_BAD_RECORD_MAC|bad record mac"):
        h.to_client(h.server.send(b"x"))


def test_large_writes_are_fragmented_at_16_kib(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    h = handshake(certificate, tmp_path)
    payload = bytes(range(256)) * 400  # 102,400 bytes
    records = h.server.send(payload)
    assert sum(1 for _ in _record_lengths(records)) == -(-len(payload) // MAX_PLAINTEXT)
    assert all(length <= MAX_PLAINTEXT + 1 + 16 for length in _record_lengths(records))
    assert h.to_client(records) == payload
    h.client.write(payload)
    assert data_of(h.to_server()) == payload


def test_key_update_requested_by_the_server_is_answered_by_openssl(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    h = handshake(certificate, tmp_path)
    assert (
        h.to_client(h.server.key_update(request_peer=True) + h.server.send(b"new key"))
        == b"new key"
    )
    h.client.write(b"client data after its own update")
    events = h.to_server()
    assert events[0] == KeyUpdated(requested=False)
    assert data_of(events) == b"client data after its own update"
    assert h.to_client(h.server.send(b"still here")) == b"still here"


def test_a_requested_key_update_is_sent_before_the_next_record(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    # OpenSSL's client cannot be told to send update_requested from Python, so the
    # peer here is a second session built from the same secrets (the client's view).
    h = handshake(certificate, tmp_path)
    client = mirror(h.server)
    assert h.server.receive_data(client.key_update(request_peer=True)) == [
        KeyUpdated(requested=True)
    ]
    assert h.server.owes_key_update
    out = h.server.send(b"reply")
    assert not h.server.owes_key_update
    assert client.receive_data(out) == [KeyUpdated(requested=False), ApplicationData(b"reply")]


def test_close_notify_both_ways(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    h = handshake(certificate, tmp_path)
    with pytest.raises(ssl.SSLWantReadError):
        h.client.unwrap()
    assert h.to_server() == [PeerClosed()]
    assert h.server.receive_data(b"ignored after close_notify") == []
    h.client_in.write(h.server.close())
    assert h.server.close() == b""
    h.client.unwrap()  # completes: OpenSSL accepted the server's close_notify
    with pytest.raises(GSSError) as err:
        h.server.send(b"late")
    assert err.value.minor == Minor.TLS_SESSION_CLOSED


# --- defects, with a session as the peer --------------------------------------------------


def mirror(server: TlsRecordSession) -> TlsRecordSession:
    """The client side of ``server`` (same secrets, swapped; same sequence numbers)."""
    return TlsRecordSession(
        server.suite,
        read_secret=server._write.keys.secret,
        write_secret=server._read.keys.secret,
        read_sequence=server._write.sequence,
        write_sequence=server._read.sequence,
        role="client",
    )


@pytest.fixture(params=sorted(SUITES))
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[TlsRecordSession, TlsRecordSession]]:
    suite = SUITES[request.param]
    c_secret, s_secret = bytes(range(suite.hash_length)), bytes(range(1, suite.hash_length + 1))
    server = TlsRecordSession(suite, read_secret=c_secret, write_secret=s_secret)
    yield server, mirror(server)


def raw_record(peer: TlsRecordSession, content_type: int, inner: bytes) -> bytes:
    """A record as the peer would seal it, with any inner content type and padding."""
    return peer._seal(content_type, inner)


def _record_lengths(records: bytes) -> Iterator[int]:
    while records:
        _type, _version, length = struct.unpack_from(">BHH", records)
        yield length
        records = records[5 + length :]


def expect_alert(
    server: TlsRecordSession, data: bytes, alert: AlertDescription, minor: Minor
) -> None:
    with pytest.raises(TlsAlert) as err:
        server.receive_data(data)
    assert (err.value.alert, err.value.minor) == (alert, minor)
    with pytest.raises(TlsAlert):  # failed for good
        server.receive_data(b"")


def test_every_suite_round_trips_and_updates_keys(
    pair: tuple[TlsRecordSession, TlsRecordSession],
) -> None:
    server, client = pair
    for _ in range(3):
        assert server.receive_data(client.send(b"ping")) == [ApplicationData(b"ping")]
        assert client.receive_data(server.send(b"pong")) == [ApplicationData(b"pong")]
        assert server.receive_data(client.key_update(request_peer=True)) == [KeyUpdated(True)]
        assert client.receive_data(server.send(b"")) == [KeyUpdated(False)]


def test_bytes_arrive_in_any_split(pair: tuple[TlsRecordSession, TlsRecordSession]) -> None:
    server, client = pair
    stream = client.send(b"a" * 40000) + client.key_update(request_peer=False) + client.send(b"b")
    events: list[object] = []
    for i in range(0, len(stream), 7):
        events += server.receive_data(stream[i : i + 7])
    assert data_of(events) == b"a" * 40000 + b"b"
    assert KeyUpdated(False) in events
    assert server.buffered == 0


def reference_record(
    keys: TrafficKeys, sequence: int, content_type: int, fragment: bytes, padding: int = 0
) -> bytes:
    """One record encoded the plain way (RFC 8446 §5.2), for the sealed-in-place path."""
    inner = fragment + bytes([content_type]) + bytes(padding)
    header = struct.pack(">BHH", 23, 0x0303, len(inner) + 16)
    return header + keys.suite.aead(keys.key).encrypt(keys.nonce(sequence), inner, header)


def test_records_sealed_in_the_reused_buffer_match_a_plain_encoding(
    pair: tuple[TlsRecordSession, TlsRecordSession],
) -> None:
    """Records sealed in place in the session's buffer (full ones) and the others, however
    lengths, content types, padding and key changes alternate, are byte for byte the
    plain encoding; and the buffer keeps no plaintext."""
    server, _client = pair
    keys, sequence = server._write.keys, 0

    def record(content_type: int, fragment: bytes, padding: int = 0) -> bytes:
        nonlocal sequence
        sequence += 1
        return reference_record(keys, sequence - 1, content_type, fragment, padding)

    payload = bytes((7 * i + 1) % 251 + 1 for i in range(3 * MAX_PLAINTEXT))  # no zero byte
    for size in (1, 100, 99, MAX_PLAINTEXT, MAX_PLAINTEXT, 1, 0, 100, 100, 5, MAX_PLAINTEXT):
        chunk = payload[size : 2 * size]
        assert server.send(chunk) == (record(23, chunk) if size else b"")
    assert server._seal(23, b"padded", padding=100) == record(23, b"padded", 100)
    assert server._seal(23, b"padded", padding=7) == record(23, b"padded", 7)
    assert server.send(payload[:6]) == record(23, payload[:6])
    full = payload[:MAX_PLAINTEXT]
    assert server._seal(21, full) == record(21, full)  # a full record of another type
    assert server.send(full) == record(23, full)
    assert server.key_update(request_peer=True) == record(22, bytes([24, 0, 0, 1, 1]))
    keys, sequence = keys.updated(), 0
    big = payload[: 2 * MAX_PLAINTEXT + 1000]  # three records
    assert server.send(big) == b"".join(
        record(23, big[i : i + MAX_PLAINTEXT]) for i in range(0, len(big), MAX_PLAINTEXT)
    )
    # a write that crosses the per-key limit: one record, the KeyUpdate, the rest
    server._write.sequence = sequence = server.suite.records_per_key - 1
    first = record(23, big[:MAX_PLAINTEXT])
    update = record(22, bytes([24, 0, 0, 1, 0]))
    keys, sequence = keys.updated(), 0
    assert server.send(big[: MAX_PLAINTEXT + 10]) == first + update + record(
        23, big[MAX_PLAINTEXT : MAX_PLAINTEXT + 10]
    )
    assert server.send(big[:10]) == record(23, big[:10])  # the same length, the new key
    assert server.close() == record(21, bytes([1, 0]))
    assert payload[:64] not in server._out and payload[100:164] not in server._out


@pytest.mark.parametrize("step", [1, 7, 4096, 16406, 16407, 40000, 0])
def test_records_are_opened_in_any_split_through_close_notify(
    pair: tuple[TlsRecordSession, TlsRecordSession], step: int
) -> None:
    """Records opened where they arrive (in the bytes given, or in the buffer holding a
    partial one), whatever the cut: data, KeyUpdate, padding, close_notify, and the bytes
    after it ignored."""
    server, client = pair
    stream = (
        client.send(b"a")
        + client.send(b"a" * 39999)
        + client.key_update(request_peer=False)
        + client.send(b"b")
        + client._seal(23, b"padded", padding=30)
        + client.close()
        + b"ignored after close_notify"
    )
    step = step or len(stream)
    events: list[object] = []
    for i in range(0, len(stream), step):
        events += server.receive_data(stream[i : i + step])
    assert data_of(events) == b"a" * 40000 + b"b" + b"padded"
    assert KeyUpdated(False) in events and events[-1] == PeerClosed()
    assert server.buffered == 0


def test_a_tampered_record_is_bad_record_mac(
    pair: tuple[TlsRecordSession, TlsRecordSession],
) -> None:
    server, client = pair
    record = bytearray(client.send(b"hello"))
    record[-1] ^= 1
    expect_alert(server, bytes(record), AlertDescription.bad_record_mac, Minor.TLS_BAD_RECORD_MAC)


def test_a_record_under_a_key_the_server_does_not_hold(
    pair: tuple[TlsRecordSession, TlsRecordSession],
) -> None:
    server, client = pair
    client._write.rekey()  # the client moved on without telling the server
    expect_alert(
        server, client.send(b"x"), AlertDescription.bad_record_mac, Minor.TLS_BAD_RECORD_MAC
    )
    with pytest.raises(TlsAlert) as err:
        server.receive_data(b"")
    assert err.value.major == GSS_S_BAD_SIG


def test_oversized_records(pair: tuple[TlsRecordSession, TlsRecordSession]) -> None:
    server, _client = pair
    header = struct.pack(">BHH", 23, 0x0303, MAX_PLAINTEXT + 257)  # refused from its header alone
    expect_alert(server, header, AlertDescription.record_overflow, Minor.TLS_RECORD_OVERFLOW)


def test_oversized_inner_plaintext(pair: tuple[TlsRecordSession, TlsRecordSession]) -> None:
    server, client = pair
    big = raw_record(client, 23, b"x" * (MAX_PLAINTEXT + 1))  # 2^14 + 2 with its type byte
    expect_alert(server, big, AlertDescription.record_overflow, Minor.TLS_RECORD_OVERFLOW)
    server2 = TlsRecordSession(client.suite, client._write.keys.secret, client._read.keys.secret)
    at_limit = TlsRecordSession(
        client.suite, client._read.keys.secret, client._write.keys.secret, role="client"
    )
    assert server2.receive_data(raw_record(at_limit, 23, b"x" * MAX_PLAINTEXT)) == [
        ApplicationData(b"x" * MAX_PLAINTEXT)
    ]


def test_padding_is_removed_and_all_zero_plaintext_refused(
    pair: tuple[TlsRecordSession, TlsRecordSession],
) -> None:
    server, client = pair
    assert server.receive_data(client._seal(23, b"data", padding=100)) == [ApplicationData(b"data")]
    inner = bytes(32)  # padding only: no content type
    header = struct.pack(">BHH", 23, 0x0303, len(inner) + 16)
    zeros = header + client._write.aead.encrypt(client._write.next_nonce(), inner, header)
    expect_alert(server, zeros, AlertDescription.unexpected_message, Minor.TLS_UNEXPECTED_MESSAGE)


@pytest.mark.parametrize(
    ("record", "alert", "minor"),
    [
        (
            struct.pack(">BHH", 20, 0x0303, 1) + b"\x01",
            AlertDescription.unexpected_message,
            Minor.TLS_UNEXPECTED_MESSAGE,
        ),
        (
            struct.pack(">BHH", 21, 0x0303, 2) + b"\x02\x28",
            AlertDescription.unexpected_message,
            Minor.TLS_UNEXPECTED_MESSAGE,
        ),
        (
            struct.pack(">BHH", 22, 0x0303, 4) + b"\x18\x00\x00\x00",
            AlertDescription.unexpected_message,
            Minor.TLS_UNEXPECTED_MESSAGE,
        ),
        (
            struct.pack(">BHH", 99, 0x0303, 0),
            AlertDescription.unexpected_message,
            Minor.TLS_UNEXPECTED_MESSAGE,
        ),
    ],
    ids=["change_cipher_spec", "plaintext_alert", "plaintext_handshake", "unknown_type"],
)
def test_unprotected_records_after_the_handshake(
    pair: tuple[TlsRecordSession, TlsRecordSession],
    record: bytes,
    alert: AlertDescription,
    minor: Minor,
) -> None:
    expect_alert(pair[0], record, alert, minor)


@pytest.mark.parametrize(
    ("content_type", "inner", "alert", "minor"),
    [
        (21, b"", AlertDescription.unexpected_message, Minor.TLS_UNEXPECTED_MESSAGE),
        (22, b"", AlertDescription.unexpected_message, Minor.TLS_UNEXPECTED_MESSAGE),
        (21, b"\x01", AlertDescription.decode_error, Minor.TLS_DECODE_ERROR),
        (21, b"\x01\x00\x00", AlertDescription.decode_error, Minor.TLS_DECODE_ERROR),
        (20, b"\x01", AlertDescription.unexpected_message, Minor.TLS_UNEXPECTED_MESSAGE),
        (24, b"x", AlertDescription.unexpected_message, Minor.TLS_UNEXPECTED_MESSAGE),
        (
            22,
            b"\x04\x00\x00\x01\x00",
            AlertDescription.unexpected_message,
            Minor.TLS_UNEXPECTED_MESSAGE,
        ),
        (
            22,
            b"\x0b\x00\x00\x00",
            AlertDescription.unexpected_message,
            Minor.TLS_UNEXPECTED_MESSAGE,
        ),
        (
            22,
            b"\x14\x00\x00\x20" + bytes(32),
            AlertDescription.unexpected_message,
            Minor.TLS_UNEXPECTED_MESSAGE,
        ),
        (22, b"\x18\x00\x00\x02\x00\x00", AlertDescription.decode_error, Minor.TLS_DECODE_ERROR),
        (
            22,
            b"\x18\x00\x00\x01\x02",
            AlertDescription.illegal_parameter,
            Minor.TLS_ILLEGAL_PARAMETER,
        ),
        (
            22,
            b"\x18\x00\x00\x01\x00\x18\x00\x00\x01\x00",
            AlertDescription.unexpected_message,
            Minor.TLS_UNEXPECTED_MESSAGE,
        ),
    ],
    ids=[
        "empty_alert",
        "empty_handshake",
        "short_alert",
        "long_alert",
        "protected_ccs",
        "unknown_inner_type",
        "new_session_ticket_from_client",
        "certificate_unrequested",
        "finished_unrequested",
        "key_update_wrong_length",
        "key_update_bad_request",
        "key_update_not_last",
    ],
)
def test_protected_records_the_server_refuses(
    pair: tuple[TlsRecordSession, TlsRecordSession],
    content_type: int,
    inner: bytes,
    alert: AlertDescription,
    minor: Minor,
) -> None:
    server, client = pair
    expect_alert(server, raw_record(client, content_type, inner), alert, minor)


def test_a_handshake_message_interrupted_by_data_is_refused(
    pair: tuple[TlsRecordSession, TlsRecordSession],
) -> None:
    server, client = pair
    assert server.receive_data(raw_record(client, 22, b"\x18\x00")) == []
    expect_alert(
        server,
        client.send(b"data"),
        AlertDescription.unexpected_message,
        Minor.TLS_UNEXPECTED_MESSAGE,
    )


def test_a_key_update_split_over_records_is_accepted(
    pair: tuple[TlsRecordSession, TlsRecordSession],
) -> None:
    server, client = pair
    assert server.receive_data(raw_record(client, 22, b"\x18\x00\x00")) == []
    assert server.receive_data(raw_record(client, 22, b"\x01\x00")) == [KeyUpdated(False)]
    client._write.rekey()
    assert server.receive_data(client.send(b"x")) == [ApplicationData(b"x")]


def test_alerts_from_the_peer(pair: tuple[TlsRecordSession, TlsRecordSession]) -> None:
    server, client = pair
    assert server.receive_data(raw_record(client, 21, b"\x01\x5a")) == []  # user_canceled: ignored
    with pytest.raises(TlsAlert) as err:
        server.receive_data(client.alert(AlertDescription.internal_error))
    assert err.value.alert is None  # nothing is sent back
    assert err.value.minor == Minor.TLS_ALERT_RECEIVED
    assert "internal_error" in str(err.value)


def test_a_warning_level_alert_is_fatal_too(
    pair: tuple[TlsRecordSession, TlsRecordSession],
) -> None:
    server, client = pair  # RFC 8446 §6: every alert but close_notify and user_canceled
    with pytest.raises(TlsAlert) as err:
        server.receive_data(raw_record(client, 21, b"\x01\x2a"))  # warning, bad_certificate
    assert "bad_certificate" in str(err.value)


def test_a_fatal_alert_sent_ends_sending(pair: tuple[TlsRecordSession, TlsRecordSession]) -> None:
    server, client = pair
    with pytest.raises(TlsAlert) as err:
        client.receive_data(server.alert(AlertDescription.bad_record_mac))
    assert "bad_record_mac" in str(err.value)
    assert server.alert(AlertDescription.decode_error) == b""
    with pytest.raises(GSSError):
        server.send(b"x")


def test_the_sender_updates_its_key_at_the_per_key_record_limit(
    pair: tuple[TlsRecordSession, TlsRecordSession],
) -> None:
    server, client = pair
    # the limit counts every record under the key (session tickets too)
    server._write.sequence = client._read.sequence = server.suite.records_per_key
    events = client.receive_data(server.send(b"y"))
    assert events == [KeyUpdated(False), ApplicationData(b"y")]


def test_key_schedule_rejects_bad_inputs() -> None:
    with pytest.raises(GSSError) as err:
        suite_by_code(0x1304)  # TLS_AES_128_CCM_SHA256: not continued
    assert (err.value.major, err.value.minor) == (GSS_S_BAD_MECH, Minor.TLS_SUITE_UNSUPPORTED)
    with pytest.raises(GSSError) as err:
        TrafficKeys.from_secret(SUITES[0x1302], bytes(32))
    assert (err.value.major, err.value.minor) == (GSS_S_DEFECTIVE_TOKEN, Minor.TLS_STATE_INVALID)


def test_hkdf_expand_label_matches_rfc_8448() -> None:
    # RFC 8448 §3 (simple 1-RTT handshake), server application traffic secret -> key, iv
    suite = SUITES[0x1301]
    secret = bytes.fromhex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
    assert (
        hkdf_expand_label(suite, secret, b"key", b"", 16).hex()
        == "9f02283b6c9c07efc26bb9f2ac92e356"
    )
    assert hkdf_expand_label(suite, secret, b"iv", b"", 12).hex() == "cf782b88dd83549aadf1e984"
