"""``docs/PROTOCOL.md`` is current and complete.

* The worked example is what the code produces today (drift test).
* The example's bytes are reproduced from the document's keys with the independent
  ``noiseprotocol`` package and the layouts below, not with handoffd's code.
* A client written here from the document alone (``noiseprotocol`` for Noise,
  ``cryptography``'s ChaCha20-Poly1305 for tokens, struct layouts copied from the
  document's tables) talks to a real ``handoffd serve`` over TCP: handshake, wrapped
  messages to the echo application and back, CLOSE, and the ERROR frame of a refused key;
  then the Errors section's behaviours: an ERROR never answered, expiry, half-close,
  frame defects in the documented check order, and the context id in the worker's log.

Nothing below imports handoffd's framing, Noise, context or protection code.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib.metadata
import os
import re
import select
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from noise.connection import Keypair, NoiseConnection

from docs import gen_protocol_example
from tests.daemon_harness import start_daemon

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"

# --- the document's layouts, copied from its tables ----------------------------------

FRAME_HEADER = struct.Struct(">BI")          # Framing: type u8, length u32 BE
HANDSHAKE, MESSAGE, ERROR, CLOSE = 1, 2, 3, 4
MAX_FRAME = 1_048_576
ERROR_BODY = struct.Struct(">II")            # Errors: major, minor
FIRST_TOKEN_PREFIX = bytes.fromhex("603d06146982d2cdb2ed8df0da969d81e4c7c9dfabd3f642")
SUITE = b"Noise_XX_25519_ChaChaPoly_SHA256"
PROLOGUE = b"handoffd noise-xx v1"
HELLO = struct.Struct(">BHI")                # version, req_flags, lifetime ms
OFFER = struct.Struct(">BHI")                # version, granted_flags, lifetime ms
CONFIRM = struct.Struct(">B32s")             # version, SHA-256 of the channel bindings
WIRE_FLAGS, MUTUAL, ANON = 0x007E, 0x0002, 0x0040
DEFAULT_FLAGS = 0x003E
TOKEN_HEADER = struct.Struct(">HB5sQ")       # TOK_ID, Flags, Filler, SND_SEQ
TOK_WRAP, TOK_MIC, SENT_BY_ACCEPTOR, SEALED = 0x0504, 0x0404, 0x01, 0x02
CLOSE_MIC_MESSAGE = b"handoffd CLOSE"         # Close: what the CLOSE's MIC covers
FILLER = b"\xff" * 5
GSS_S_UNAUTHORIZED, PEER_KEY_NOT_ALLOWED = 0x000F0000, 103
GSS_S_FAILURE, GSS_S_DUPLICATE_TOKEN, MESSAGE_OUT_OF_SEQUENCE = 0x000D0000, 0x0002, 616
GSS_S_GAP_TOKEN = 0x0010
GSS_S_DEFECTIVE_TOKEN, TOKEN_BAD_FRAMING = 0x00090000, 207
GSS_S_CONTEXT_EXPIRED, CONTEXT_LIFETIME_OVER = 0x000C0000, 108
STREAM_TRUNCATED, TOKEN_TRUNCATED = 617, 200
GSS_S_BAD_MIC, MESSAGE_TAMPERED, MESSAGE_REFLECTED = 0x00060000, 111, 112
TOKEN_BAD_TYPE, TOKEN_BAD_FIELD = 203, 204


def nonce(seq: int) -> bytes:
    return b"\x00" * 4 + seq.to_bytes(8, "little")


def fingerprint(public: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")


def wrap(key: bytes, seq: int, data: bytes, *, from_acceptor: bool, sealed: bool = True
         ) -> bytes:
    flags = (SENT_BY_ACCEPTOR if from_acceptor else 0) | (SEALED if sealed else 0)
    header = TOKEN_HEADER.pack(TOK_WRAP, flags, FILLER, seq)
    aead = ChaCha20Poly1305(key)
    if sealed:
        return header + aead.encrypt(nonce(seq), data, header)
    return header + data + aead.encrypt(nonce(seq), b"", header + data)


def mic(key: bytes, seq: int, message: bytes, *, from_acceptor: bool) -> bytes:
    header = TOKEN_HEADER.pack(TOK_MIC, SENT_BY_ACCEPTOR if from_acceptor else 0, FILLER, seq)
    return header + ChaCha20Poly1305(key).encrypt(nonce(seq), b"", header + message)


def verify_mic(key: bytes, expected_seq: int, message: bytes, token: bytes, *,
               from_acceptor: bool) -> None:
    assert len(token) == 32
    tok_id, flags, filler, seq = TOKEN_HEADER.unpack_from(token)
    assert tok_id == TOK_MIC and filler == FILLER and seq == expected_seq
    assert flags == (SENT_BY_ACCEPTOR if from_acceptor else 0)
    ChaCha20Poly1305(key).decrypt(nonce(seq), token[16:], token[:16] + message)


def unwrap(key: bytes, expected_seq: int, token: bytes, *, from_acceptor: bool) -> bytes:
    tok_id, flags, filler, seq = TOKEN_HEADER.unpack_from(token)
    assert tok_id == TOK_WRAP and filler == FILLER and seq == expected_seq
    assert flags & ~(SENT_BY_ACCEPTOR | SEALED) == 0
    assert bool(flags & SENT_BY_ACCEPTOR) == from_acceptor
    header, body = token[:16], token[16:]
    aead = ChaCha20Poly1305(key)
    if flags & SEALED:
        return aead.decrypt(nonce(seq), body, header)
    aead.decrypt(nonce(seq), body[-16:], header + body[:-16])
    return body[:-16]


def frame(frame_type: int, body: bytes) -> bytes:
    return FRAME_HEADER.pack(frame_type, len(body)) + body


def initiator(static_private: bytes, ephemeral_private: bytes | None = None
              ) -> NoiseConnection:
    noise = NoiseConnection.from_name(SUITE)
    noise.set_as_initiator()
    noise.set_prologue(PROLOGUE)
    noise.set_keypair_from_private_bytes(Keypair.STATIC, static_private)
    if ephemeral_private is not None:
        noise.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral_private)
    noise.start_handshake()
    return noise


def split_keys(noise: NoiseConnection, *, initiator: bool) -> tuple[bytes, bytes]:
    """(k_i, k_a), read as the document's noiseprotocol table says."""
    mine = bytes(noise.noise_protocol.cipher_state_encrypt.k)
    theirs = bytes(noise.noise_protocol.cipher_state_decrypt.k)
    return (mine, theirs) if initiator else (theirs, mine)


def server_static_key(noise: NoiseConnection) -> bytes:
    """``rs``, read as the document's noiseprotocol table says (between messages 2 and 3)."""
    return bytes(noise.noise_protocol.handshake_state.rs.public_bytes)


def test_the_documented_noiseprotocol_version_is_the_one_installed() -> None:
    """The private attributes the document names are checked for one version only."""
    documented = re.search(r"In version \*\*([0-9.]+)\*\*", DOC.read_text())
    assert documented, "PROTOCOL.md no longer names the noiseprotocol version"
    assert importlib.metadata.version("noiseprotocol") == documented[1], (
        "another noiseprotocol: check PROTOCOL.md's attribute table against it")


# --- 1. drift --------------------------------------------------------------------------


def test_worked_example_is_current() -> None:
    """Regenerate the example with today's code: the document must hold exactly it."""
    current = gen_protocol_example.section_in(DOC.read_text())
    assert current, "docs/PROTOCOL.md lost its example markers"
    assert current == gen_protocol_example.generate(), (
        "docs/PROTOCOL.md is stale: run python -m docs.gen_protocol_example --write")


def _table_rows(heading: str) -> list[list[str]]:
    """The rows of the first table after the line starting with ``heading``."""
    text = DOC.read_text()
    rest = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(rest) if line.startswith("|"))
    rows = []
    for line in rest[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def test_the_documented_status_values_are_handoffds() -> None:
    """Errors: the major and supplementary tables hold RFC 2744's values, as status.py."""
    from handoffd import status

    majors = _table_rows("Routine errors (major) used by handoffd")
    assert len(majors) == 11
    for name, value, _ in majors:
        assert getattr(status, name.split("`")[0]) == int(value, 16), name
    bits = _table_rows("Supplementary information bits")
    assert [int(row[1], 16) for row in bits] == [1 << int(row[0]) for row in bits]
    assert {row[2]: int(row[1], 16) for row in bits} == {
        name: getattr(status, name) for name in ("GSS_S_CONTINUE_NEEDED", "GSS_S_DUPLICATE_TOKEN",
                                                 "GSS_S_OLD_TOKEN", "GSS_S_UNSEQ_TOKEN",
                                                 "GSS_S_GAP_TOKEN")}


# --- 2. the example, reproduced from the document's bytes alone ------------------------


def _example() -> tuple[dict[str, bytes], list[bytes]]:
    section = gen_protocol_example.section_in(DOC.read_text())
    keys = {m[1]: bytes.fromhex(m[2]) for m in re.finditer(
        r"^    (client static|client ephemeral|server static|server ephemeral) private +"
        r"([0-9a-f]{64})$", section, re.M)}
    frames = [bytes.fromhex("".join(block.split())) for block in re.findall(
        r"^    frame:\n\n((?:    [0-9a-f]+\n)+)", section, re.M)]
    return keys, frames


# noiseprotocol warns (rightly, outside tests) when an ephemeral key is fixed.
@pytest.mark.filterwarnings("ignore:One of ephemeral keypairs is already set:UserWarning")
def test_worked_example_reproduced_with_noiseprotocol() -> None:
    keys, frames = _example()
    assert len(keys) == 4 and len(frames) == 7
    client = initiator(keys["client static"], keys["client ephemeral"])
    server = NoiseConnection.from_name(SUITE)
    server.set_as_responder()
    server.set_prologue(PROLOGUE)
    server.set_keypair_from_private_bytes(Keypair.STATIC, keys["server static"])
    server.set_keypair_from_private_bytes(Keypair.EPHEMERAL, keys["server ephemeral"])
    server.start_handshake()

    hello = HELLO.pack(1, DEFAULT_FLAGS, 3_600_000)
    msg1 = bytes(client.write_message(hello))
    assert frames[0] == frame(HANDSHAKE, FIRST_TOKEN_PREFIX + msg1)
    assert server.read_message(msg1) == hello
    offer = OFFER.pack(1, DEFAULT_FLAGS, 3_600_000)
    msg2 = bytes(server.write_message(offer))
    assert frames[1] == frame(HANDSHAKE, msg2)
    assert client.read_message(msg2) == offer
    confirm = CONFIRM.pack(1, hashlib.sha256(b"").digest())
    msg3 = bytes(client.write_message(confirm))
    assert frames[2] == frame(HANDSHAKE, msg3)
    assert server.read_message(msg3) == confirm
    k_i, k_a = split_keys(client, initiator=True)
    assert split_keys(server, initiator=False) == (k_i, k_a)
    h = re.search(r"^    h after message 3 +([0-9a-f]{64})$",
                  gen_protocol_example.section_in(DOC.read_text()), re.M)
    assert h and bytes(client.get_handshake_hash()).hex() == h[1]
    assert bytes(server.get_handshake_hash()).hex() == h[1]

    assert frames[3] == frame(MESSAGE, wrap(k_i, 0, b"hello, handoffd", from_acceptor=False))
    assert frames[4] == frame(MESSAGE, wrap(k_a, 0, b"hello, handoffd", from_acceptor=True))
    assert frames[5] == frame(CLOSE, mic(k_i, 1, CLOSE_MIC_MESSAGE, from_acceptor=False))
    assert frames[6] == frame(CLOSE, mic(k_a, 1, CLOSE_MIC_MESSAGE, from_acceptor=True))


# --- 3. a client from the document, against a real daemon ------------------------------


class Refused(Exception):
    """The server sent an ERROR frame."""

    def __init__(self, major: int, minor: int) -> None:
        super().__init__(f"ERROR major 0x{major:08x} minor {minor}")
        self.major, self.minor = major, minor


@dataclass
class DocClient:
    """A blocking client built from docs/PROTOCOL.md, "Writing a client"."""

    sock: socket.socket
    buffer: bytes = b""
    k_i: bytes = b""
    k_a: bytes = b""
    send_seq: int = 0
    recv_seq: int = 0
    context_id: str = ""

    def read_frame(self) -> tuple[int, bytes] | None:
        while True:
            if len(self.buffer) >= FRAME_HEADER.size:
                frame_type, length = FRAME_HEADER.unpack_from(self.buffer)
                assert frame_type in (HANDSHAKE, MESSAGE, ERROR, CLOSE) and length <= MAX_FRAME
                end = FRAME_HEADER.size + length
                if len(self.buffer) >= end:
                    body, self.buffer = self.buffer[FRAME_HEADER.size:end], self.buffer[end:]
                    if frame_type == ERROR:
                        raise Refused(*ERROR_BODY.unpack(body))
                    return frame_type, body
            chunk = self.sock.recv(65536)
            if not chunk:
                assert not self.buffer, "connection closed inside a frame"
                return None
            self.buffer += chunk

    def handshake(self, static_private: bytes, pin: str, *, anonymous: bool = False,
                  lifetime_ms: int = 600_000) -> int:
        """Run messages 1-3; returns the granted flags."""
        noise = initiator(static_private)
        flags = DEFAULT_FLAGS | (ANON if anonymous else 0)
        msg1 = bytes(noise.write_message(HELLO.pack(1, flags, lifetime_ms)))
        assert len(msg1) == 39
        self.sock.sendall(frame(HANDSHAKE, FIRST_TOKEN_PREFIX + msg1))
        received = self.read_frame()
        assert received is not None and received[0] == HANDSHAKE and len(received[1]) == 103
        version, granted, lifetime = OFFER.unpack(bytes(noise.read_message(received[1])))
        assert version == 1 and granted & ~WIRE_FLAGS == 0 and granted & MUTUAL
        assert bool(granted & ANON) == anonymous and 0 < lifetime <= lifetime_ms
        assert fingerprint(server_static_key(noise)) == pin
        msg3 = bytes(noise.write_message(CONFIRM.pack(1, hashlib.sha256(b"").digest())))
        assert noise.handshake_finished and len(msg3) == 97
        self.sock.sendall(frame(HANDSHAKE, msg3))
        self.k_i, self.k_a = split_keys(noise, initiator=True)
        self.context_id = bytes(noise.get_handshake_hash())[:8].hex()  # as the logs show it
        return int(granted)

    def send(self, data: bytes, *, sealed: bool = True) -> None:
        token = wrap(self.k_i, self.send_seq, data, from_acceptor=False, sealed=sealed)
        self.send_seq += 1
        self.sock.sendall(frame(MESSAGE, token))

    def close(self) -> None:
        """Send CLOSE: a MIC over the document's 14 bytes, the next SND_SEQ."""
        token = mic(self.k_i, self.send_seq, CLOSE_MIC_MESSAGE, from_acceptor=False)
        self.send_seq += 1
        self.sock.sendall(frame(CLOSE, token))

    def receive(self) -> bytes | None:
        """The next message's data; None at the server's (verified) CLOSE."""
        received = self.read_frame()
        assert received is not None, "end of stream without CLOSE"
        frame_type, body = received
        if frame_type == CLOSE:
            verify_mic(self.k_a, self.recv_seq, CLOSE_MIC_MESSAGE, body, from_acceptor=True)
            self.recv_seq += 1
            return None
        assert frame_type == MESSAGE
        data = unwrap(self.k_a, self.recv_seq, body, from_acceptor=True)
        self.recv_seq += 1
        return data


def _echo_session(address: tuple[str, int], pin: str, static_private: bytes,
                  anonymous: bool) -> None:
    with socket.create_connection(address, timeout=20) as sock:
        client = DocClient(sock)
        granted = client.handshake(static_private, pin, anonymous=anonymous)
        assert granted == DEFAULT_FLAGS | (ANON if anonymous else 0)
        sent = [b"hello, handoffd", os.urandom(3000), b"integrity only"]
        client.send(sent[0])
        client.send(sent[1])
        client.send(sent[2], sealed=False)
        expected = b"".join(sent)
        echoed = b""
        while len(echoed) < len(expected):
            data = client.receive()
            assert data is not None, "CLOSE before the whole echo"
            echoed += data
        assert echoed == expected
        client.close()
        assert client.receive() is None  # the echo application answers CLOSE with CLOSE


def _refused_session(address: tuple[str, int], pin: str, static_private: bytes) -> None:
    with socket.create_connection(address, timeout=20) as sock:
        client = DocClient(sock)
        client.handshake(static_private, pin)
        # Established on the client's side; the allow-list check comes with message 3.
        client.send(b"pipelined, then discarded")
        with pytest.raises(Refused) as refused:
            client.receive()
        assert (refused.value.major, refused.value.minor) == (GSS_S_UNAUTHORIZED,
                                                              PEER_KEY_NOT_ALLOWED)
        # The server closed after the ERROR frame; with our pipelined MESSAGE unread in its
        # socket, the kernel ends the connection with a reset rather than a FIN.
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""


def _replayed_session(address: tuple[str, int], pin: str) -> str:
    """A MESSAGE frame sent twice (as an attacker could): the worker answers with ERROR.
    Returns the context id."""
    with socket.create_connection(address, timeout=20) as sock:
        client = DocClient(sock)
        client.handshake(os.urandom(32), pin, anonymous=True)
        token = wrap(client.k_i, 0, b"pay 100", from_acceptor=False)
        sock.sendall(frame(MESSAGE, token) * 2)
        assert client.receive() == b"pay 100"  # the first copy is echoed, the second is not
        with pytest.raises(Refused) as refused:
            client.receive()
        assert (refused.value.major, refused.value.minor) == (
            GSS_S_FAILURE | GSS_S_DUPLICATE_TOKEN, MESSAGE_OUT_OF_SEQUENCE)
        return client.context_id


def _skipped_session(address: tuple[str, int], pin: str) -> None:
    """A MESSAGE frame with SND_SEQ 1 where 0 is due (one dropped): ERROR with GAP_TOKEN."""
    with socket.create_connection(address, timeout=20) as sock:
        client = DocClient(sock)
        client.handshake(os.urandom(32), pin, anonymous=True)
        sock.sendall(frame(MESSAGE, wrap(client.k_i, 1, b"the second", from_acceptor=False)))
        with pytest.raises(Refused) as refused:
            client.receive()
        assert (refused.value.major, refused.value.minor) == (
            GSS_S_FAILURE | GSS_S_GAP_TOKEN, MESSAGE_OUT_OF_SEQUENCE)


def _defective_frame_session(address: tuple[str, int], pin: str, defect: str) -> None:
    """After the handshake: "What a receiver checks, in order" (and PER-MESSAGE.md's)."""
    with socket.create_connection(address, timeout=20) as sock:
        client = DocClient(sock)
        client.handshake(os.urandom(32), pin, anonymous=True)
        good = wrap(client.k_i, 0, b"data", from_acceptor=False)
        reflected = wrap(client.k_i, 0, b"data", from_acceptor=True)  # the server's own kind
        sent, expected = {
            "handshake frame": (frame(HANDSHAKE, b"\x00" * 97), (GSS_S_FAILURE, TOKEN_BAD_TYPE)),
            "short token": (frame(MESSAGE, good[:31]), (GSS_S_DEFECTIVE_TOKEN, TOKEN_TRUNCATED)),
            "MIC in a MESSAGE": (frame(MESSAGE, mic(client.k_i, 0, b"x", from_acceptor=False)),
                                 (GSS_S_DEFECTIVE_TOKEN, TOKEN_BAD_TYPE)),
            "reflected": (frame(MESSAGE, reflected), (GSS_S_BAD_MIC, MESSAGE_REFLECTED)),
            # check 5 (filler) comes before check 6 (reflection)
            "reflected, bad filler": (frame(MESSAGE, reflected[:3] + b"\0" + reflected[4:]),
                                      (GSS_S_DEFECTIVE_TOKEN, TOKEN_BAD_FIELD)),
            "tampered": (frame(MESSAGE, good[:-1] + bytes([good[-1] ^ 1])),
                         (GSS_S_BAD_MIC, MESSAGE_TAMPERED)),
            # the tag (check 8) before the window (check 9): not reported as a duplicate
            "replayed, tampered": (frame(MESSAGE, good[:-1] + bytes([good[-1] ^ 1])),
                                   (GSS_S_BAD_MIC, MESSAGE_TAMPERED)),
        }[defect]
        if defect == "replayed, tampered":
            sock.sendall(frame(MESSAGE, good))
            assert client.receive() == b"data"
        sock.sendall(sent)
        with pytest.raises(Refused) as refused:
            client.receive()
        assert (refused.value.major, refused.value.minor) == expected, defect


def _forged_close_session(address: tuple[str, int], pin: str) -> None:
    """An empty CLOSE (what anyone on the path could inject) ends nothing: it is refused
    with an ERROR frame, and the data before it is still answered."""
    with socket.create_connection(address, timeout=20) as sock:
        client = DocClient(sock)
        client.handshake(os.urandom(32), pin, anonymous=True)
        client.send(b"first half")
        sock.sendall(frame(CLOSE, b""))
        assert client.receive() == b"first half"
        with pytest.raises(Refused) as refused:
            client.receive()
        assert (refused.value.major, refused.value.minor) == (GSS_S_DEFECTIVE_TOKEN,
                                                              TOKEN_BAD_FRAMING)


def _assert_closed_silently(sock: socket.socket) -> None:
    """The server closes without sending anything (a reset counts: nothing was sent)."""
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(65536) == b""


def _error_in_handshake_session(address: tuple[str, int]) -> None:
    """Errors: an ERROR is never answered.  A client's ERROR in place of message 1: the
    acceptor closes without an ERROR of its own."""
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(frame(ERROR, ERROR_BODY.pack(GSS_S_FAILURE, 0)))
        _assert_closed_silently(sock)


def _error_after_message_2_session(address: tuple[str, int]) -> None:
    """... nor in place of message 3 (the acceptor waits for message 3)."""
    with socket.create_connection(address, timeout=20) as sock:
        noise = initiator(os.urandom(32))
        msg1 = bytes(noise.write_message(HELLO.pack(1, DEFAULT_FLAGS | ANON, 600_000)))
        sock.sendall(frame(HANDSHAKE, FIRST_TOKEN_PREFIX + msg1))
        client = DocClient(sock)
        received = client.read_frame()
        assert received is not None and received[0] == HANDSHAKE
        sock.sendall(frame(ERROR, ERROR_BODY.pack(GSS_S_UNAUTHORIZED, 104)))
        _assert_closed_silently(sock)


def _error_when_established_session(address: tuple[str, int], pin: str) -> None:
    """... nor by the worker, once the context is established."""
    with socket.create_connection(address, timeout=20) as sock:
        client = DocClient(sock)
        client.handshake(os.urandom(32), pin, anonymous=True)
        client.send(b"before the error")
        assert client.receive() == b"before the error"
        sock.sendall(frame(ERROR, ERROR_BODY.pack(GSS_S_FAILURE, 0)))
        _assert_closed_silently(sock)


def _half_closed_session(address: tuple[str, int], pin: str, *, where: str) -> None:
    """Errors, half-close: the client's FIN without its CLOSE, between frames or inside
    one, is answered with an ERROR (the server can still write); after its CLOSE, the
    server's CLOSE comes as usual."""
    with socket.create_connection(address, timeout=20) as sock:
        client = DocClient(sock)
        client.handshake(os.urandom(32), pin, anonymous=True)
        client.send(b"ping")
        assert client.receive() == b"ping"
        if where == "inside a frame":
            sock.sendall(frame(MESSAGE, wrap(client.k_i, 1, b"cut", from_acceptor=False))[:10])
        elif where == "after CLOSE":
            client.close()
        sock.shutdown(socket.SHUT_WR)
        if where == "after CLOSE":
            assert client.receive() is None
            assert sock.recv(1) == b""
            return
        with pytest.raises(Refused) as refused:
            client.receive()
        expected = ((GSS_S_FAILURE, STREAM_TRUNCATED) if where == "between frames"
                    else (GSS_S_DEFECTIVE_TOKEN, TOKEN_TRUNCATED))
        assert (refused.value.major, refused.value.minor) == expected
        assert sock.recv(1) == b""


def _expired_session(address: tuple[str, int], pin: str) -> None:
    """Close, expiry: nothing is sent when the lifetime ends; the next frame is answered
    with ERROR CONTEXT_EXPIRED."""
    with socket.create_connection(address, timeout=20) as sock:
        client = DocClient(sock)
        client.handshake(os.urandom(32), pin, anonymous=True, lifetime_ms=1000)
        time.sleep(1.5)  # past the lifetime OFFER granted (1 s, as requested)
        readable, _, _ = select.select([sock], [], [], 0)
        assert not readable, "the worker sent something (or closed) when the lifetime ended"
        client.send(b"too late")
        with pytest.raises(Refused) as refused:
            client.receive()
        assert (refused.value.major, refused.value.minor) == (GSS_S_CONTEXT_EXPIRED,
                                                              CONTEXT_LIFETIME_OVER)
        assert sock.recv(1) == b""


async def test_a_client_written_from_the_document_talks_to_handoffd(tmp_path: Path) -> None:
    listed, unlisted = os.urandom(32), os.urandom(32)
    listed_public = _public(listed)
    (tmp_path / "clients").write_text(
        f"noise-x25519 {base64.b64encode(listed_public).decode()} doc-client\n")
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, app="examples.echo.app:handler",
                                log=log, extra='[server]\nallowed_clients = "clients"\n'
                                                "allow_anonymous = true\n")
    try:
        address = (daemon.host, daemon.port)
        await trio.to_thread.run_sync(_echo_session, address, daemon.fingerprint, listed,
                                      False)
        await trio.to_thread.run_sync(_echo_session, address, daemon.fingerprint,
                                      os.urandom(32), True)
        await trio.to_thread.run_sync(_refused_session, address, daemon.fingerprint, unlisted)
        replayed = await trio.to_thread.run_sync(_replayed_session, address,
                                                 daemon.fingerprint)
        await trio.to_thread.run_sync(_forged_close_session, address, daemon.fingerprint)
        await trio.to_thread.run_sync(_skipped_session, address, daemon.fingerprint)
        for defect in ("handshake frame", "short token", "MIC in a MESSAGE", "reflected",
                       "reflected, bad filler", "tampered", "replayed, tampered"):
            await trio.to_thread.run_sync(_defective_frame_session, address,
                                          daemon.fingerprint, defect)
        await trio.to_thread.run_sync(_error_in_handshake_session, address)
        await trio.to_thread.run_sync(_error_after_message_2_session, address)
        await trio.to_thread.run_sync(_error_when_established_session, address,
                                      daemon.fingerprint)
        await trio.to_thread.run_sync(_expired_session, address, daemon.fingerprint)
        for where in ("between frames", "inside a frame", "after CLOSE"):
            await trio.to_thread.run_sync(
                functools.partial(_half_closed_session, where=where), address,
                daemon.fingerprint)
        # Logs: the worker's info line for the session names the client's context id.
        line = re.compile(
            rf" info +worker\[\d+\] session \d+ \([^,]*, context {replayed}\) ended: ")
        with trio.fail_after(10):
            while not line.search(log.read_text()):
                await trio.sleep(0.05)
    finally:
        assert await daemon.stop() == 0


def _public(private: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
