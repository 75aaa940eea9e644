"""Per-message protection throughput: handoffd's wrap against the bare AEAD call.

* ``handoffd_<size>``: ``SecurityContext.wrap(data)`` on an established
  context (header, sequence number, nonce, ChaCha20-Poly1305 with the header
  as associated data, state and lifetime checks);
* ``raw_aead_<size>``: ``ChaCha20Poly1305.encrypt(nonce, data, header)`` alone,
  with the nonce built per call the way wrap builds it: the floor.

* ``tls_record_16k`` / ``raw_aesgcm_16k``: a TLS 1.3 session's ``send`` of 16 KiB (one
  full record: framing, inner content type, nonce from the sequence number, AES-256-GCM
  as OpenSSL negotiates by default; ``handoffd.core.tls_record``) against the bare
  ``AESGCM.encrypt`` of the same 16 KiB plus the type byte.

Each figure is the best of a few bounded runs (a count and a time limit).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from bench.common import established_pair
from handoffd.core.context import InitiatorContext
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.tls_keys import SUITES
from handoffd.core.tls_record import MAX_PLAINTEXT, TlsRecordSession

SIZES = {"16k": 16 * 1024, "1k": 1024}


def _mib_per_s(call: Callable[[], object], size: int, max_iterations: int,
               max_seconds: float) -> float:
    iterations = 0
    started = time.perf_counter()
    deadline = started + max_seconds
    while iterations < max_iterations:
        for _ in range(64):
            call()
        iterations += 64
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - started
    return iterations * size / elapsed / 2**20


def _raw_call(aead: ChaCha20Poly1305, data: bytes) -> Callable[[], bytes]:
    header = os.urandom(16)
    seq = itertools.count()

    def raw() -> bytes:
        nonce = b"\x00\x00\x00\x00" + next(seq).to_bytes(8, "little")
        return aead.encrypt(nonce, data, header)

    return raw


def run(max_seconds: float = 0.4, repeats: int = 3, max_iterations: int = 200_000
        ) -> dict[str, float]:
    """``{"handoffd_16k": MiB/s, "raw_aead_16k": ..., "handoffd_1k": ..., "raw_aead_1k": ...}``."""
    server_key = StaticKeyPair.generate(os.urandom)
    result: dict[str, float] = {}
    for name, size in SIZES.items():
        data = os.urandom(size)
        initiator, _ = established_pair(server_key)
        aead = ChaCha20Poly1305(os.urandom(32))
        raw = _raw_call(aead, data)

        def wrap(data: bytes = data, context: InitiatorContext = initiator) -> bytes:
            return context.wrap(data)

        for label, call in (("handoffd", wrap), ("raw_aead", raw)):
            result[f"{label}_{name}"] = max(
                _mib_per_s(call, size, max_iterations, max_seconds) for _ in range(repeats))
    result.update(tls_record(max_seconds, repeats, max_iterations))
    return result


def tls_record(max_seconds: float, repeats: int, max_iterations: int) -> dict[str, float]:
    """The TLS record layer's send of one full record against the bare AES-256-GCM call."""
    suite = SUITES[0x1302]
    session = TlsRecordSession(suite, read_secret=os.urandom(48), write_secret=os.urandom(48))
    data = os.urandom(MAX_PLAINTEXT)
    aead = AESGCM(os.urandom(32))
    inner = data + b"\x17"
    header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
    seq = itertools.count()

    def raw() -> bytes:
        return aead.encrypt(next(seq).to_bytes(12, "big"), inner, header)

    def record() -> bytes:
        return session.send(data)

    return {
        f"{label}_16k": max(_mib_per_s(call, MAX_PLAINTEXT, max_iterations, max_seconds)
                            for _ in range(repeats))
        for label, call in (("tls_record", record), ("raw_aesgcm", raw))
    }


if __name__ == "__main__":
    print(run())
