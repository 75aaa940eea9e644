"""Kernel TLS on this host: the structures handed to the kernel, the probe, the policy of
``[tls] ktls``, and the record layer's plaintext paths that a kTLS session uses.

This host's kernel has no ``tls`` ULP, so sessions here always stay in userspace; the
kernel path itself runs in ``make test-lsm``'s VM (tests/lsm/test_lsm_handoffd_ktls.py),
whose Debian kernel has it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from handoffd.config import load_config
from handoffd.core.tls_keys import SUITES, TrafficKeys
from handoffd.core.tls_record import (
    AlertDescription,
    ApplicationData,
    KeyUpdated,
    PeerClosed,
    TlsAlert,
    TlsRecordSession,
)
from handoffd.kernel import ktls
from handoffd.runtime.ktls_stream import kernel_wanted
from handoffd.runtime.spawner import worker_command
from handoffd.status import GSSError


def _keys(code: int) -> TrafficKeys:
    return TrafficKeys.from_secret(SUITES[code], os.urandom(SUITES[code].hash_length))


@pytest.mark.parametrize(("code", "cipher", "size"), [
    (0x1301, 51, 40), (0x1302, 52, 56), (0x1303, 54, 56)])
def test_crypto_info_is_the_kernels_struct(code: int, cipher: int, size: int) -> None:
    """``struct tls12_crypto_info_*`` (include/uapi/linux/tls.h): version and cipher type
    in host order, then iv, key, salt, rec_seq; AES-GCM's 12-byte IV split into a 4-byte
    salt and the 8-byte iv field, ChaCha20-Poly1305's whole in iv."""
    keys = _keys(code)
    info = ktls.crypto_info(keys, 0x0102030405060708)
    assert len(info) == size
    assert struct.unpack_from("=HH", info) == (0x0304, cipher)
    assert info[-8:] == bytes(range(1, 9))
    body = info[4:-8]
    if code == 0x1303:
        assert body == keys.iv + keys.key
    else:
        assert body == keys.iv[4:] + keys.key + keys.iv[:4]


def test_the_probe_agrees_with_the_kernels_list_of_ulps() -> None:
    available = Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split()
    support = ktls.probe()
    assert support.ulp == ("tls" in available), support.detail
    if not support.ulp:
        assert not support.suites and not support.rekey and "no tls ULP" in support.detail


@pytest.mark.parametrize(("mode", "ulp", "rekey", "wanted"), [
    ("off", True, True, False),
    ("auto", True, True, True),
    ("auto", True, False, False),  # a KeyUpdate could not be served: stay in userspace
    ("on", True, False, True),
    ("on", False, False, False),
    ("auto", False, False, False),
])
def test_when_sessions_move_into_the_kernel(mode: str, ulp: bool, rekey: bool,
                                            wanted: bool) -> None:
    suites = frozenset(SUITES) if ulp else frozenset()
    support = ktls.KtlsSupport(ulp, suites, rekey, "")
    assert kernel_wanted(mode, 0x1302, support) is wanted  # type: ignore[arg-type]
    # a suite the kernel does not take never moves
    partial = ktls.KtlsSupport(ulp, frozenset({0x1301}), rekey, "")
    assert kernel_wanted(mode, 0x1303, partial) is False  # type: ignore[arg-type]


def test_ktls_setting_is_checked_and_reaches_the_workers(tmp_path: Path) -> None:
    base = ('[server]\nlisten = ["127.0.0.1:0"]\nkey = "k"\n[tls]\nlisten = ["127.0.0.1:0"]\n'
            'certificate = "c.pem"\nkey = "k.pem"\n')
    path = tmp_path / "handoffd.toml"
    path.write_text(base + 'ktls = "sometimes"\n')
    with pytest.raises(GSSError, match="ktls"):
        load_config(path)
    path.write_text(base + 'ktls = "on"\n')
    argv = worker_command(load_config(path))
    assert argv[argv.index("--ktls") + 1] == "on"
    path.write_text(base)
    assert load_config(path).tls.ktls == "auto"


def _pair(code: int = 0x1302) -> tuple[TlsRecordSession, TlsRecordSession]:
    a, b = os.urandom(SUITES[code].hash_length), os.urandom(SUITES[code].hash_length)
    server = TlsRecordSession(SUITES[code], read_secret=a, write_secret=b)
    client = TlsRecordSession(SUITES[code], read_secret=b, write_secret=a, role="client")
    return server, client


def test_missing_counts_the_bytes_that_complete_a_cut_record() -> None:
    server, client = _pair()
    record = client.send(b"x" * 300)
    assert server.missing() == 0
    server.receive_data(record[:3])
    assert server.missing() == 2  # the rest of the header first
    server.receive_data(record[3:10])
    assert server.missing() == len(record) - 10
    assert server.receive_data(record[10:]) == [ApplicationData(b"x" * 300)]
    assert server.missing() == 0


def test_receive_plaintext_applies_the_same_rules_as_records() -> None:
    server, _ = _pair()
    assert server.receive_plaintext(23, b"data") == [ApplicationData(b"data")]
    assert server.receive_plaintext(22, bytes([24, 0, 0, 1, 0])) == [KeyUpdated(False)]
    with pytest.raises(TlsAlert) as caught:
        server.receive_plaintext(22, bytes([4, 0, 0, 1, 0]))  # NewSessionTicket to a server
    assert caught.value.alert == AlertDescription.unexpected_message
    with pytest.raises(TlsAlert):  # failed: every later call raises the same
        server.receive_plaintext(23, b"more")
    other, _ = _pair()
    assert other.receive_plaintext(21, bytes([1, 0])) == [PeerClosed()]
    assert other.receive_plaintext(23, b"ignored after close_notify") == []


def test_a_kernel_sealed_key_update_is_the_userspace_one() -> None:
    """The plaintext KeyUpdate a kTLS session hands the kernel changes the write key
    exactly as the userspace record does: the peer reads on under the new key."""
    server, client = _pair()
    keys_before, _ = server.write_keys
    message = server.key_update_message(request_peer=True)
    assert message == bytes([24, 0, 0, 1, 1])
    keys_after, sequence = server.write_keys
    assert keys_after == keys_before.updated() and sequence == 0
    # what the kernel would seal: the message under the old key, as a handshake record
    old = TlsRecordSession(SUITES[0x1302], read_secret=os.urandom(48),
                           write_secret=keys_before.secret)
    assert client.receive_data(old._seal(22, message)) == [KeyUpdated(True)]
    assert client.receive_data(server.send(b"new key")) == [ApplicationData(b"new key")]


def test_end_fragment_is_sent_once() -> None:
    server, _ = _pair()
    assert server.end_fragment(AlertDescription.close_notify) == bytes([1, 0])
    assert server.end_fragment(AlertDescription.internal_error) == b""
    other, _ = _pair()
    assert other.end_fragment(AlertDescription.bad_record_mac) == bytes([2, 20])
