"""Write the seed corpus ``fuzz/corpus/<target>/`` from the real code.

Seeds are valid inputs made by handoffd itself (a real wrap token, a real
export blob, a real sealed token, a real config ...) plus a few edge cases,
framed the way each target reads its input.  Everything is deterministic
(fixed keys, nonces and clock from ``_fixtures``), so re-running this script
rewrites identical files.  Crash reproducers live next to the seeds as
``crash-*`` files and are never touched here.

Usage: ``python -m fuzz.make_corpus`` from the repository root.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

from fuzz._fixtures import (
    BINDINGS,
    KEY_A2I,
    KEY_I2A,
    MECH_NOISE,
    MIC_MESSAGE,
    NOW,
    OTHER_BINDINGS,
    OTHER_WORKER_ID,
    SEAL_EXPIRES,
    SEAL_KEY,
    WORKER_ID,
)
from fuzz._handshakes import Setup, established, exported_blobs, transcript
from fuzz._harness import u16_join
from handoffd.core.context import Flags
from handoffd.core.framing import (
    CLOSE_MIC_MESSAGE,
    FrameType,
    encode_error,
    encode_frame,
    wrap_first_token,
)
from handoffd.core.handoff import Ack, Handoff, Hello, Kind, Refused, Registered
from handoffd.core.protection import MessageProtection
from handoffd.core.seal import seal
from handoffd.core.window import SequenceWindow
from handoffd.kernel.channel import HEADER, MAGIC, VERSION

CORPUS = Path(__file__).resolve().parent / "corpus"

Seeds = dict[str, bytes]
GENERATORS: dict[str, Callable[[], Seeds]] = {}


def generator(target: str) -> Callable[[Callable[[], Seeds]], Callable[[], Seeds]]:
    """Register the seed generator of one target."""

    def register(function: Callable[[], Seeds]) -> Callable[[], Seeds]:
        GENERATORS[target] = function
        return function

    return register


def _window_after(numbers: list[int], replay: bool = True, sequence: bool = True) -> bytes:
    window = SequenceWindow(replay=replay, sequence=sequence)
    for number in numbers:
        window.check(number)
    return window.to_bytes()


@generator("window")
def window_seeds() -> Seeds:
    """States from real windows, and check() sequences with gaps, replays and huge jumps."""
    numbers = [0, 1, 2, 5, 3, 3, 70, 6, (1 << 64) - 2, (1 << 64) - 1]
    return {
        "state_fresh": b"\x00" + _window_after([]),
        "state_after_gaps": b"\x00" + _window_after([0, 2, 9, 4]),
        "state_no_flags": b"\x00" + _window_after([7], replay=False, sequence=False),
        "state_full_map": b"\x00" + _window_after(list(range(100))),
        "state_last_number": b"\x00" + _window_after([(1 << 64) - 1]),
        "state_truncated": b"\x00" + _window_after([1])[:-1],
        "state_trailing": b"\x00" + _window_after([1]) + b"\x00",
        "checks_mixed": b"\x01"
        + _window_after([0])
        + b"".join(n.to_bytes(8, "big") for n in numbers),
        "checks_replay_only": b"\x01"
        + _window_after([], sequence=False)
        + b"".join(n.to_bytes(8, "big") for n in [0, 0, 100, 1, 100]),
    }


def _pair() -> tuple[MessageProtection, MessageProtection]:
    initiator = MessageProtection(send_key=KEY_I2A, recv_key=KEY_A2I, initiator=True)
    acceptor = MessageProtection(send_key=KEY_A2I, recv_key=KEY_I2A, initiator=False)
    return initiator, acceptor


# Mode byte of fuzz_protection: op | role << 2 | replay << 3 | sequence << 4.
_ACCEPTOR_RX = 0x18
_INITIATOR_RX = 0x1C


@generator("protection")
def protection_seeds() -> Seeds:
    """Real wrap/MIC token streams in both directions, reordered and replayed, and states."""
    initiator, acceptor = _pair()
    i_tokens = [initiator.wrap(b"hello %d" % n, conf_req=n % 2 == 0)[0] for n in range(4)]
    a_tokens = [acceptor.wrap(b"", conf_req=True)[0], acceptor.wrap(b"x" * 300, False)[0]]
    mic = initiator.get_mic(MIC_MESSAGE)
    reordered = [i_tokens[0], i_tokens[2], i_tokens[1], i_tokens[1], i_tokens[3]]
    stepped = _pair()[1]
    stepped.unwrap(i_tokens[0])
    stepped.unwrap(i_tokens[2])
    return {
        "unwrap_in_order": bytes([_ACCEPTOR_RX]) + u16_join(i_tokens),
        "unwrap_reordered_duplicate": bytes([_ACCEPTOR_RX]) + u16_join(reordered),
        "unwrap_no_flags": bytes([_ACCEPTOR_RX & 0x07]) + u16_join(reordered),
        "unwrap_from_acceptor": bytes([_INITIATOR_RX]) + u16_join(a_tokens),
        "unwrap_reflected": bytes([_INITIATOR_RX]) + u16_join(i_tokens[:1]),
        "unwrap_truncated": bytes([_ACCEPTOR_RX]) + u16_join([i_tokens[0][:31]]),
        "mic_valid": bytes([_ACCEPTOR_RX | 1]) + u16_join([mic, MIC_MESSAGE]),
        "mic_wrong_message": bytes([_ACCEPTOR_RX | 1]) + u16_join([mic, b"other"]),
        "state_initiator": b"\x02" + initiator.export_state(),
        "state_acceptor_mid_stream": b"\x02" + stepped.export_state(),
        "state_bad_version": b"\x02\x02" + initiator.export_state()[1:],
    }


@generator("seal")
def seal_seeds() -> Seeds:
    """Real sealed tokens: valid, expired, for another worker, another mechanism."""

    def sealed(plaintext: bytes, *, worker: bytes = WORKER_ID, expires: int = SEAL_EXPIRES,
               mech: int = MECH_NOISE, nonce_byte: int = 1) -> bytes:
        return seal(SEAL_KEY, plaintext=plaintext, mech=mech, worker_id=worker,
                    expires_at=expires, nonce=bytes([nonce_byte]) * 12)

    valid = sealed(b"an exported context would be here")
    return {
        "valid": b"\x01" + valid,
        "valid_empty_plaintext": b"\x00" + sealed(b"", nonce_byte=2),
        "expired": b"\x00" + sealed(b"old", expires=NOW, nonce_byte=3),
        "other_worker": b"\x00" + sealed(b"misrouted", worker=OTHER_WORKER_ID, nonce_byte=4),
        "other_mech": b"\x01" + sealed(b"mech 2", mech=2, nonce_byte=5),
        "header_only": b"\x00" + valid[:39],
        "bad_version": b"\x00\x02" + valid[1:],
    }


@generator("handoff")
def handoff_seeds() -> Seeds:
    """One real payload of every kind, and short/long variants."""
    handoff = Handoff(7, b"slot-3", b"\x01" * 60).encode()
    return {
        "hello": b"\x00" + Hello(WORKER_ID, 4242).encode(),
        "handoff": b"\x01" + handoff,
        "handoff_empty_ref": b"\x01" + Handoff(1, b"", b"s").encode(),
        "handoff_ref_overruns": b"\x01" + handoff[:8] + b"\xff" + handoff[9:],
        "ack": b"\x02" + Ack(7).encode(),
        "ack_refused": b"\x02" + Ack(7, 0x90000, 208).encode(),
        "registered": b"\x03" + Registered(WORKER_ID, {"secret_fd": "0", "id": "w1"}).encode(),
        "registered_not_object": b"\x03" + WORKER_ID + b"[1, 2]",
        "refused": b"\x04" + Refused(0xF0000, 615).encode(),
        "draining": b"\x05",
        "drained_not_empty": b"\x06x",
    }


def _frame(kind: int, payload: bytes, *, fd_flag: bool = False) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 1 if fd_flag else 0, kind, 0, len(payload)) + payload


@generator("channel")
def channel_seeds() -> Seeds:
    """Real handoff-protocol frames, with and without fds, attributes and credentials."""
    handoff = _frame(Kind.HANDOFF, Handoff(9, b"slot-0", b"\x02" * 80).encode(), fd_flag=True)
    hello = _frame(Kind.HELLO, Hello(WORKER_ID, 4242).encode())
    own_credentials = struct.pack("<3I", 1, 0, 0)  # pid 1 (init) as uid 0: forged unless root
    return {
        "handoff_with_tcp_fd": b"\x01" + handoff,
        "handoff_with_pipe_fd": b"\x41" + handoff,
        "handoff_without_fd": b"\x00" + handoff,
        "handoff_two_fds": b"\x03" + handoff,
        "handoff_with_attributes": b"\x0d" + handoff,
        "handoff_fds_overflow": b"\x81" + handoff,
        "hello": b"\x04" + hello,
        "hello_with_fd": b"\x01" + hello,
        "hello_forged_credentials": b"\x24" + own_credentials + hello,
        "ack_small_limit": b"\x10" + _frame(Kind.ACK, Ack(9).encode()),
        "draining": b"\x00" + _frame(Kind.DRAINING, b""),
        "empty_datagram": b"\x00",
        "bad_magic": b"\x00XX" + hello[2:],
        "length_mismatch": b"\x00" + hello[:-1],
        "oversized_for_limit": b"\x10" + _frame(Kind.ACK, b"a" * 65),
    }


_CONFIG = b"""\
# Every section and most keys, valid.
[server]
listen = ["127.0.0.1:7443", "[::1]:7443"]
key = "server.key"
allowed_clients = "clients.allow"
allow_anonymous = false
handshake_timeout = 2.5
max_handshakes = 64
context_lifetime = 600
backlog = 128

[workers]
app = "examples.echo.app:handler"
count = 2
max_unacked = 4
ack_timeout = 1.0
drain_timeout = 5
restart_backoff_max = 2.0
boot_failures_max = 3
register_socket = "register.sock"
keyring = "auto"
pythonpath = ["."]

[policy]
worker_uids = [0, 1000]
worker_gids = [1000]
worker_labels = ["system_u:system_r:handoffd_worker_t:s0"]
require_label = true

[control]
socket = "handoffd.control"
metrics = "127.0.0.1:9100"

[log]
level = "debug"
format = "json"
"""


def _config_seeds() -> Seeds:
    return {
        "full": _CONFIG,
        "empty": b"",
        "unknown_key": b"[server]\nlisten_on = 1\n",
        "bad_choice": b'[log]\nlevel = "loud"\n',
        "bad_address": b'[server]\nlisten = ["::1:7443"]\n',
        "negative": b"[workers]\ncount = -1\n",
        "wrong_type": b'[policy]\nworker_uids = ["root"]\n',
    }


@generator("config")
def config_seeds() -> Seeds:
    """A full valid config and one of each validation failure."""
    return _config_seeds()


@generator("config_file")
def config_file_seeds() -> Seeds:
    """As ``config``, plus bytes that are not UTF-8 or not TOML."""
    return _config_seeds() | {
        "not_utf8": b"[server]\nkey = \"\xff\xfe\"\n",
        "not_toml": b"[server\n",
    }


def _mode(operation: int, setup: Setup | None = None) -> bytes:
    """fuzz_handshake's mode byte: operation in bits 0-2, the setup in bits 3-7."""
    return bytes([operation | (setup.bits() if setup else 0) << 3])


@generator("handshake")
def handshake_seeds() -> Seeds:
    """Real tokens of real handshakes (keyed, anonymous, refused), framed and unframed."""
    keyed = transcript(Setup())
    anonymous = Setup(anonymous_client=True, allow_anonymous=True)
    anon = transcript(anonymous)
    bound = Setup(acceptor_bindings=True)
    msg1, msg2, msg3 = keyed
    first = wrap_first_token(msg1)
    stream = encode_frame(FrameType.HANDSHAKE, first) + encode_frame(FrameType.HANDSHAKE, msg3)
    long_first = wrap_first_token(b"\xaa" * 300)
    wrap_token = established()[0].wrap(b"pipelined")
    return {
        "frames_transcript": _mode(0) + u16_join([stream[:3], stream[3:50], stream[50:]]),
        "frames_all_types": _mode(0) + u16_join([
            encode_frame(FrameType.MESSAGE, wrap_token)
            + encode_frame(FrameType.ERROR, encode_error(0x90000, 208))
            + encode_frame(FrameType.CLOSE, established()[0].get_mic(CLOSE_MIC_MESSAGE))]),
        "frames_small_limit": bytes([0x08])
        + u16_join([encode_frame(FrameType.MESSAGE, b"m" * 65)]),
        "frames_close_without_mic": _mode(0) + u16_join([b"\x04\x00\x00\x00\x00"]),
        "frames_bad_type": _mode(0) + u16_join([b"\x09\x00\x00\x00\x00"]),
        "frames_error_short": _mode(0) + u16_join([b"\x03\x00\x00\x00\x04abcd"]),
        "frames_huge_length": _mode(0) + u16_join([b"\x02\xff\xff\xff\xff"]),
        "first_token": _mode(1) + u16_join([first]),
        "first_token_long_form": _mode(1) + u16_join([long_first]),
        "first_token_other_mech": _mode(1)
        + u16_join([wrap_first_token(msg1, b"\x06\x03*\x03\x04")]),
        "first_token_not_minimal": _mode(1) + u16_join([b"\x60\x81\x05" + first[2:7]]),
        "first_token_no_oid": _mode(1) + u16_join([b"\x60\x02\x04\x00"]),
        "acceptor_keyed": _mode(2) + u16_join([msg1, msg3]),
        "acceptor_anonymous": _mode(2, anonymous) + u16_join([anon[0], anon[2]]),
        "acceptor_anonymous_refused": _mode(2, Setup(anonymous_client=True))
        + u16_join([anon[0]]),
        "acceptor_reflected_msg2": _mode(2) + u16_join([msg2]),
        "acceptor_truncated_msg1": _mode(2) + u16_join([msg1[:31]]),
        "initiator_msg2": _mode(3) + u16_join([msg2, msg2]),
        "initiator_msg2_anonymous": _mode(3, anonymous) + u16_join([anon[1]]),
        "initiator_msg2_flipped": _mode(3) + u16_join([msg2[:40] + bytes([msg2[40] ^ 1])
                                                       + msg2[41:]]),
        "initiator_reflected_msg1": _mode(3) + u16_join([msg1]),
        "acceptor_msg3": _mode(4) + u16_join([msg3, msg3]),
        "acceptor_msg3_bindings": _mode(4, bound) + u16_join([transcript(bound)[2]]),
        "acceptor_msg3_other_bindings": _mode(4, Setup(acceptor_bindings=True,
                                                        other_client_bindings=True))
        + u16_join([transcript(Setup(acceptor_bindings=True, other_client_bindings=True))[2]]),
        "acceptor_msg3_not_allowed": _mode(4, Setup(client_not_allowed=True))
        + u16_join([transcript(Setup(client_not_allowed=True))[2]]),
        "acceptor_msg3_truncated": _mode(4) + u16_join([msg3[:-17]]),
        "acceptor_first_token": _mode(5) + u16_join([first, msg3]),
        "established_surplus": _mode(6) + u16_join([msg3, b""]),
        "wire_transcript": _mode(7) + u16_join([stream]),
        "wire_split": _mode(7) + u16_join([stream[:1], stream[1:45], stream[45:]]),
        "wire_message_first": _mode(7) + u16_join([encode_frame(FrameType.MESSAGE, msg1)]),
        "wire_peer_error": _mode(7) + u16_join([
            encode_frame(FrameType.ERROR, encode_error(0xFFFFFFFF, 0xFFFFFFFF))]),
        "wire_unwrapped_first": _mode(7) + u16_join([encode_frame(FrameType.HANDSHAKE, msg1)]),
    }


@generator("import")
def import_seeds() -> Seeds:
    """Real export tokens as they are, expired, patched, cut and extended."""
    blobs = exported_blobs()
    initiator, acceptor, anon_initiator, anon_acceptor = blobs
    return {
        "initiator": b"\x00" + initiator,
        "acceptor_with_unread": b"\x00" + acceptor,
        "anonymous_initiator": b"\x00" + anon_initiator,
        "anonymous_acceptor": b"\x00" + anon_acceptor,
        "expired": b"\x04" + initiator,
        "bad_version": b"\x00\x02" + initiator[1:],
        "trailing_byte": b"\x00" + initiator + b"\x00",
        "truncated": b"\x00" + acceptor[:-1],
        "empty": b"\x00",
        "role_flipped": b"\x01\x00\x01\x01",
        "flags_patched": b"\x09\x00\x02\x80\x00\x03\x01",
        "expiry_patched": b"\x01\x00\x05\x01\x00\x0b\x07",
        "names_patched": b"\x11" + b"".join(struct.pack(">HB", 0x4c + n, 0x80) for n in range(3)),
        "cut_in_state": b"\x02" + struct.pack(">H", 150) + b"\x00" * 4,
        "unread_extended": b"\x0a" + struct.pack(">H", len(acceptor) - 6)
        + b"\x00\x00\x00\x03abc",
    }


def _payload_mode(real_acceptor: bool, setup: Setup | None = None, stranger: bool = False) -> bytes:
    """fuzz_handshake_payload's mode byte: side in bit 0, stranger key in bit 1, setup 2-6."""
    return bytes([real_acceptor | stranger << 1 | (setup.bits() if setup else 0) << 2])


def _hello_or_offer(flags: int, lifetime_ms: int, version: int = 1) -> bytes:
    return struct.pack(">BHI", version, flags, lifetime_ms)


@generator("handshake_payload")
def handshake_payload_seeds() -> Seeds:
    """Offers for a real initiator, hellos and confirms for a real acceptor: the real ones
    (the hello is msg1's clear payload) and one of each defect the contexts check."""
    usual = Flags.MUTUAL | Flags.REPLAY | Flags.SEQUENCE | Flags.CONF | Flags.INTEG
    anonymous = Setup(anonymous_client=True, allow_anonymous=True)
    bound = Setup(acceptor_bindings=True)
    offer = _hello_or_offer(usual, 600_000)
    hello = transcript(Setup())[0][32:]  # msg1 is e (32 bytes), then the hello in clear
    anon_hello = transcript(anonymous)[0][32:]
    confirm = b"\x01" + hashlib.sha256(BINDINGS).digest()
    other_confirm = b"\x01" + hashlib.sha256(OTHER_BINDINGS).digest()
    initiator, acceptor = _payload_mode(False), _payload_mode(True)
    return {
        "offer": initiator + u16_join([offer]),
        "offer_stranger_server": _payload_mode(False, stranger=True) + u16_join([offer]),
        "offer_anonymous": _payload_mode(False, anonymous)
        + u16_join([_hello_or_offer(usual | Flags.ANON, 1000)]),
        "offer_anonymous_to_keyed": initiator
        + u16_join([_hello_or_offer(usual | Flags.ANON, 1000)]),
        "offer_without_mutual": initiator + u16_join([_hello_or_offer(Flags.CONF, 1000)]),
        "offer_unknown_flag": initiator + u16_join([_hello_or_offer(usual | 0x8000, 1000)]),
        "offer_zero_lifetime": initiator + u16_join([_hello_or_offer(usual, 0)]),
        "offer_longest_lifetime": initiator + u16_join([_hello_or_offer(usual, 0xFFFFFFFF)]),
        "offer_version_2": initiator + u16_join([_hello_or_offer(usual, 1000, version=2)]),
        "offer_truncated": initiator + u16_join([offer[:-1]]),
        "offer_trailing": initiator + u16_join([offer + b"\x00"]),
        "client_real": acceptor + u16_join([hello, confirm]),
        "client_bindings": _payload_mode(True, bound) + u16_join([hello, confirm]),
        "client_other_bindings": _payload_mode(True, bound) + u16_join([hello, other_confirm]),
        "client_not_allowed": _payload_mode(True, Setup(client_not_allowed=True))
        + u16_join([hello, confirm]),
        "client_stranger": _payload_mode(True, stranger=True) + u16_join([hello, confirm]),
        "client_anonymous": _payload_mode(True, anonymous, stranger=True)
        + u16_join([anon_hello, confirm]),
        "client_anonymous_refused": acceptor + u16_join([anon_hello, confirm]),
        "client_all_flags_no_lifetime": acceptor
        + u16_join([_hello_or_offer(0xFFFF, 0), confirm]),
        "client_hello_version_2": acceptor
        + u16_join([_hello_or_offer(usual, 1000, version=2), confirm]),
        "client_hello_empty": acceptor + u16_join([b"", confirm]),
        "client_confirm_truncated": acceptor + u16_join([hello, confirm[:-1]]),
        "client_confirm_trailing": acceptor + u16_join([hello, confirm + b"\x00"]),
        "client_confirm_version_0": acceptor + u16_join([hello, b"\x00" + confirm[1:]]),
    }

def write(target: str, seeds: Seeds) -> Path:
    """Replace the generated seeds of ``target``; keep ``crash-*`` reproducers."""
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.name.startswith("seed-"):
            old.unlink()
    for name, data in sorted(seeds.items()):
        (directory / f"seed-{name}").write_bytes(data)
    return directory


def main() -> None:
    """Regenerate every target's seeds and print a short listing."""
    for target, make in sorted(GENERATORS.items()):
        seeds = make()
        write(target, seeds)
        digest = hashlib.sha256(b"".join(seeds[k] for k in sorted(seeds))).hexdigest()[:12]
        print(f"{target:14} {len(seeds):3} seeds  {digest}")


if __name__ == "__main__":
    main()
