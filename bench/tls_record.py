"""The TLS record layer against the bare AEAD call, both directions, every suite.

``python -m bench.tls_record`` prints, per suite, the microseconds of

* ``send``: ``TlsRecordSession.send`` of 16 KiB (one full record) against the bare
  ``encrypt`` of the same inner plaintext with the record header as associated data
  (what ``bench/wrap.py``'s ``tls_record_16k`` / ``raw_aesgcm_16k`` compare, for
  AES-256-GCM only; here the bare call's nonce is a constant, not built per call);
* ``receive``: ``TlsRecordSession.receive_data`` of that record, handed over whole,
  against the bare ``decrypt`` of its body.  The same record is fed again each time, the
  session's read sequence number set back before each call (that assignment is counted
  against the record layer).

Record and bare call run in alternating batches and each figure is the minimum over the
batches, so load on the machine that comes and goes hits both sides alike rather than
whichever ran second (``bench/wrap.py`` times them one after the other, best of three).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from handoffd.core.tls_keys import SUITES, Suite
from handoffd.core.tls_record import MAX_PLAINTEXT, ApplicationData, TlsRecordSession

SIZE = MAX_PLAINTEXT


def _interleaved(calls: dict[str, Callable[[], object]], batches: int, batch: int
                 ) -> dict[str, float]:
    """Microseconds per call of each, the minimum over ``batches`` alternating batches."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(batches):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(batch):
                call()
            best[name] = min(best[name], (time.perf_counter() - started) / batch * 1e6)
    return best


def suite_figures(suite: Suite, batches: int = 200, batch: int = 100) -> dict[str, float]:
    """``{"send_us", "encrypt_us", "send_ratio", "receive_us", "decrypt_us", "receive_ratio"}``."""
    data = os.urandom(SIZE)
    client_secret, server_secret = os.urandom(suite.hash_length), os.urandom(suite.hash_length)
    sender = TlsRecordSession(suite, client_secret, server_secret)
    receiver = TlsRecordSession(suite, server_secret, client_secret, role="client")
    record = sender.send(data)
    header, body = record[:5], record[5:]
    aead = suite.aead(os.urandom(suite.key_length))
    inner = data + b"\x17"
    nonce = os.urandom(12)
    ciphertext = aead.encrypt(nonce, inner, header)
    read = receiver._read

    def receive() -> object:
        read.sequence = 0
        return receiver.receive_data(record)

    assert receive() == [ApplicationData(data)] and len(body) == len(ciphertext)
    figures = _interleaved(
        {
            "send_us": lambda: sender.send(data),
            "encrypt_us": lambda: aead.encrypt(nonce, inner, header),
            "receive_us": receive,
            "decrypt_us": lambda: aead.decrypt(nonce, ciphertext, header),
        },
        batches,
        batch,
    )
    figures["send_ratio"] = figures["send_us"] / figures["encrypt_us"]
    figures["receive_ratio"] = figures["receive_us"] / figures["decrypt_us"]
    return figures


def run(batches: int = 200, batch: int = 100) -> dict[str, dict[str, float]]:
    return {suite.name: suite_figures(suite, batches, batch) for suite in SUITES.values()}


if __name__ == "__main__":
    for name, f in run().items():
        print(f"{name:30s} send {f['send_us']:6.2f} µs / encrypt {f['encrypt_us']:6.2f} µs"
              f" = {f['send_ratio']:.2f}   receive {f['receive_us']:6.2f} µs"
              f" / decrypt {f['decrypt_us']:6.2f} µs = {f['receive_ratio']:.2f}")
