"""Kernel TLS (kTLS): the thin adapter over Linux's ``tls`` upper-layer protocol.

A worker that imported a TLS 1.3 session can give the kernel its record keys
(``setsockopt(SOL_TLS, TLS_TX / TLS_RX)``, Documentation/networking/tls.rst); from then on
``send`` takes plaintext and the kernel writes records, ``recvmsg`` returns one record
type at a time (``TLS_GET_RECORD_TYPE`` control message) already decrypted.  This module
packs the kernel's ``tls12_crypto_info_*`` structures, installs and replaces keys, sends
and receives control records, and probes once what this kernel can do:

* ``ulp``: the ``tls`` ULP exists (``CONFIG_TLS``; this project's CI host has none, the
  Debian kernel its VM suite boots has it);
* ``suites``: the TLS 1.3 suites the kernel takes in both directions (its crypto modules);
* ``rekey``: a second ``TLS_TX`` on the same socket is accepted, i.e. the kernel can take a
  new key after a KeyUpdate (Linux 6.14, "tls: implement rekey for TLS1.3"); before that
  the kernel answers ``EBUSY`` and a session in the kernel cannot survive a KeyUpdate.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from functools import cache
from typing import Final, Protocol

from handoffd.core.tls_keys import SUITES, TrafficKeys

__all__ = [
    "RECORD_TYPE_CMSG_SPACE",
    "KtlsSupport",
    "install_rx",
    "install_tx",
    "install_ulp",
    "probe",
    "record_type",
    "type_cmsg",
]

TCP_ULP: Final = 31
SOL_TLS: Final = 282
TLS_TX: Final = 1
TLS_RX: Final = 2
TLS_SET_RECORD_TYPE: Final = 1  # cmsg on sendmsg: the record's content type
TLS_GET_RECORD_TYPE: Final = 2  # cmsg on recvmsg: the record's content type
TLS_1_3_VERSION: Final = 0x0304

# IANA suite code -> (kernel cipher type, salt length): AES-GCM's 12-byte IV is the
# kernel's 4-byte salt followed by its 8-byte iv field; ChaCha20-Poly1305's is the iv.
_CIPHERS: Final[dict[int, tuple[int, int]]] = {
    0x1301: (51, 4),  # TLS_CIPHER_AES_GCM_128
    0x1302: (52, 4),  # TLS_CIPHER_AES_GCM_256
    0x1303: (54, 0),  # TLS_CIPHER_CHACHA20_POLY1305
}
RECORD_TYPE_CMSG_SPACE: Final = socket.CMSG_SPACE(1)


class Settable(Protocol):
    """A stdlib or trio socket: all that installing keys needs."""

    def setsockopt(self, level: int, option: int, value: bytes, /) -> None: ...


def crypto_info(keys: TrafficKeys, sequence: int) -> bytes:
    """``struct tls12_crypto_info_<cipher>`` for TLS 1.3: version, cipher type, iv, key,
    salt, rec_seq (the next record's 64-bit sequence number, big-endian)."""
    cipher, salt_length = _CIPHERS[keys.suite.code]
    salt, iv = keys.iv[:salt_length], keys.iv[salt_length:]
    return (struct.pack("=HH", TLS_1_3_VERSION, cipher) + iv + keys.key + salt
            + sequence.to_bytes(8, "big"))


def install_ulp(sock: Settable) -> None:
    """Attach the ``tls`` ULP (``OSError`` ENOENT where the kernel has none)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")


def install_tx(sock: Settable, keys: TrafficKeys, sequence: int) -> None:
    """The kernel writes records under ``keys`` from ``sequence`` on (again: a rekey)."""
    sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(keys, sequence))


def install_rx(sock: Settable, keys: TrafficKeys, sequence: int) -> None:
    """The kernel reads records under ``keys`` from ``sequence`` on (again: a rekey)."""
    sock.setsockopt(SOL_TLS, TLS_RX, crypto_info(keys, sequence))


def type_cmsg(content_type: int) -> tuple[int, int, bytes]:
    """The ``sendmsg`` ancillary item that makes the kernel send a non-data record."""
    return (SOL_TLS, TLS_SET_RECORD_TYPE, bytes([content_type]))


def record_type(ancillary: list[tuple[int, int, bytes]], default: int) -> int:
    """The content type ``recvmsg`` reported (the kernel may omit it for data records)."""
    for level, kind, data in ancillary:
        if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and data:
            return data[0]
    return default


@dataclass(frozen=True)
class KtlsSupport:
    """What this kernel's TLS can do, as :func:`probe` measured it."""

    ulp: bool
    suites: frozenset[int]
    rekey: bool
    detail: str

    def takes(self, suite: int) -> bool:
        return self.ulp and suite in self.suites


def _dummy_keys(suite: int) -> TrafficKeys:
    s = SUITES[suite]
    return TrafficKeys(s, bytes(s.hash_length), bytes(s.key_length), bytes(12))


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


def _try_suite(suite: int) -> tuple[bool, bool, str]:
    """(both directions installed, a second TLS_TX accepted, why not) on a fresh pair."""
    client, server = _loopback_pair()
    try:
        install_ulp(server)
        keys = _dummy_keys(suite)
        try:
            install_tx(server, keys, 0)
            install_rx(server, keys, 0)
        except OSError as error:
            return False, False, f"{SUITES[suite].name}: {os.strerror(error.errno or 0)}"
        try:
            install_tx(server, keys, 0)
        except OSError as error:
            if error.errno not in (errno.EBUSY, errno.EEXIST, errno.EINVAL):
                raise
            return True, False, ""
        return True, True, ""
    finally:
        client.close()
        server.close()


@cache
def probe() -> KtlsSupport:
    """Measure, once per process, what kernel TLS offers here (never raises)."""
    try:
        client, server = _loopback_pair()
    except OSError as error:
        return KtlsSupport(False, frozenset(), False, f"no loopback TCP: {error}")
    try:
        install_ulp(server)
    except OSError as error:
        return KtlsSupport(False, frozenset(), False,
                           f"no tls ULP ({os.strerror(error.errno or 0)}; "
                           "/proc/sys/net/ipv4/tcp_available_ulp)")
    finally:
        client.close()
        server.close()
    suites: set[int] = set()
    rekey = True
    refused: list[str] = []
    for code in _CIPHERS:
        try:
            ok, second_key, why = _try_suite(code)
        except OSError as error:
            ok, second_key, why = False, False, f"{SUITES[code].name}: {error}"
        if ok:
            suites.add(code)
            rekey = rekey and second_key
        else:
            refused.append(why)
    rekey = rekey and bool(suites)
    detail = (f"tls ULP, TLS 1.3 in both directions for "
              f"{', '.join(SUITES[c].name for c in sorted(suites)) or 'no suite'}"
              + (f" (refused: {'; '.join(refused)})" if refused else "")
              + ("; rekey (KeyUpdate) supported" if rekey
                 else "; no rekey: a new key after KeyUpdate is refused (Linux < 6.14)"))
    return KtlsSupport(True, frozenset(suites), rekey, detail)
