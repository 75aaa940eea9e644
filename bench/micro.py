"""Micro-benchmarks of handoffd's pure core: the CPU cost of each operation.

``python -m bench.micro`` (``make bench-micro``) prints a table; ``make bench``
includes the same figures under ``micro`` in ``bench/results/latest.json``.

* **handshake**: one full Noise XX handshake side, context construction
  included (ephemeral key, DH operations, payload checks): the initiator's two
  steps, the acceptor's two steps, timed separately on the same handshakes;
* **export / import**: ``SecurityContext.export`` of an established acceptor
  context and ``import_context`` of the result (what a worker does);
* **seal / open**: ``handoffd.core.seal`` on that export token;
* **wrap / unwrap** (confidential), **get_mic / verify_mic** at 64 B, 1 KiB and
  16 KiB, each beside the bare ``cryptography`` ChaCha20-Poly1305 call that
  does the same cryptographic work (encrypt with the 16-byte header as
  associated data for wrap; an empty plaintext with header and message as
  associated data for a MIC), so the ratio is handoffd's overhead.

Every figure is microseconds per operation, wall clock (``perf_counter_ns``)
on one thread: the best of a few repeats of a bounded loop, since other load
on the machine only ever adds time.  Counts are fixed, so the whole run takes
well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from handoffd.core.context import (
    AcceptorContext,
    InitiatorContext,
    SecurityContext,
    import_context,
)
from handoffd.core.credentials import AllowList, StaticKeyPair
from handoffd.core.seal import open_sealed, seal

SIZES = {"64": 64, "1k": 1024, "16k": 16 * 1024}
OPERATIONS = ("wrap", "unwrap", "get_mic", "verify_mic")
_HEADER = b"\x05\x04\x02" + b"\xff" * 5 + bytes(8)
_NOW = 1_767_225_600.0


def _clock() -> float:
    return _NOW


def _best_us(measure: Callable[[], tuple[int, int]], repeats: int) -> float:
    """Best per-operation time over ``repeats``; ``measure()`` returns (ns, operations)."""
    best = float("inf")
    for _ in range(repeats):
        elapsed, count = measure()
        best = min(best, elapsed / count / 1000)
    return best


def _pair(server: StaticKeyPair) -> tuple[InitiatorContext, AcceptorContext]:
    initiator = InitiatorContext(static_key=None, server_fingerprint=server.fingerprint,
                                 clock=_clock, random=os.urandom)
    acceptor = AcceptorContext(static_key=server, allow_list=None, allow_anonymous=True,
                               clock=_clock, random=os.urandom)
    _, msg1 = initiator.step(None)
    _, msg2 = acceptor.step(msg1)
    _, msg3 = initiator.step(msg2)
    acceptor.step(msg3)
    return initiator, acceptor


def handshake(server: StaticKeyPair, client: StaticKeyPair, count: int, repeats: int
              ) -> dict[str, float]:
    """µs per handshake side: ``{"initiator": ..., "acceptor": ...}`` (named client)."""
    allow = AllowList({client.public_bytes: "bench"})
    best = {"initiator": float("inf"), "acceptor": float("inf")}
    for _ in range(repeats):
        spent = {"initiator": 0, "acceptor": 0}
        for _ in range(count):
            t0 = time.perf_counter_ns()
            initiator = InitiatorContext(static_key=client,
                                         server_fingerprint=server.fingerprint,
                                         clock=_clock, random=os.urandom)
            _, msg1 = initiator.step(None)
            t1 = time.perf_counter_ns()
            acceptor = AcceptorContext(static_key=server, allow_list=allow, clock=_clock,
                                       random=os.urandom)
            _, msg2 = acceptor.step(msg1)
            t2 = time.perf_counter_ns()
            _, msg3 = initiator.step(msg2)
            t3 = time.perf_counter_ns()
            acceptor.step(msg3)
            t4 = time.perf_counter_ns()
            spent["initiator"] += (t1 - t0) + (t3 - t2)
            spent["acceptor"] += (t2 - t1) + (t4 - t3)
        for side, ns in spent.items():
            best[side] = min(best[side], ns / count / 1000)
    return best


def context_transfer(server: StaticKeyPair, count: int, repeats: int) -> dict[str, Any]:
    """µs for export, import, seal and open of one context; and the token sizes."""
    key, worker_id, nonce = os.urandom(32), os.urandom(16), os.urandom(12)
    best = {"export": float("inf"), "import": float("inf"), "seal": float("inf"),
            "open": float("inf")}
    blob = sealed = b""
    for _ in range(repeats):
        contexts: list[SecurityContext] = [_pair(server)[1] for _ in range(count)]
        t0 = time.perf_counter_ns()
        blobs = [context.export() for context in contexts]
        t1 = time.perf_counter_ns()
        for blob in blobs:
            import_context(blob, clock=_clock)
        t2 = time.perf_counter_ns()
        tokens = [seal(key, plaintext=blob, mech=1, worker_id=worker_id,
                       expires_at=int(_NOW) + 30, nonce=nonce) for blob in blobs]
        t3 = time.perf_counter_ns()
        for sealed in tokens:
            open_sealed(key, sealed, worker_id=worker_id, now=_NOW)
        t4 = time.perf_counter_ns()
        for name, ns in (("export", t1 - t0), ("import", t2 - t1), ("seal", t3 - t2),
                         ("open", t4 - t3)):
            best[name] = min(best[name], ns / count / 1000)
    return {"us": best, "export_token_bytes": len(blob), "sealed_token_bytes": len(sealed)}


def _per_message_size(server: StaticKeyPair, size: int, count: int, repeats: int
                      ) -> dict[str, dict[str, float]]:
    # Like for like: the sending loops (ours and bare) discard what they make; the
    # receiving loops (ours and bare) each read ``count`` distinct, pre-made inputs.
    data = os.urandom(size)
    aead = ChaCha20Poly1305(os.urandom(32))
    nonces = [b"\x00" * 4 + seq.to_bytes(8, "little") for seq in range(count)]
    mic_ad = _HEADER + data
    sealed = [aead.encrypt(nonce, data, _HEADER) for nonce in nonces]
    tags = [aead.encrypt(nonce, b"", mic_ad) for nonce in nonces]
    out: dict[str, dict[str, float]] = {op: {"handoffd": float("inf"), "aead": float("inf")}
                                        for op in OPERATIONS}
    for _ in range(repeats):
        sender, _ = _pair(server)
        peer, receiver = _pair(server)
        tokens = [peer.wrap(data) for _ in range(count)]
        mics = [peer.get_mic(data) for _ in range(count)]
        t0 = time.perf_counter_ns()
        for _ in range(count):
            sender.wrap(data)
        t1 = time.perf_counter_ns()
        for token in tokens:
            receiver.unwrap(token)
        t2 = time.perf_counter_ns()
        for _ in range(count):
            sender.get_mic(data)
        t3 = time.perf_counter_ns()
        for mic in mics:
            receiver.verify_mic(data, mic)
        t4 = time.perf_counter_ns()
        for nonce in nonces:
            aead.encrypt(nonce, data, _HEADER)
        t5 = time.perf_counter_ns()
        for nonce, ciphertext in zip(nonces, sealed, strict=True):
            aead.decrypt(nonce, ciphertext, _HEADER)
        t6 = time.perf_counter_ns()
        for nonce in nonces:
            aead.encrypt(nonce, b"", mic_ad)
        t7 = time.perf_counter_ns()
        for nonce, tag in zip(nonces, tags, strict=True):
            aead.decrypt(nonce, tag, mic_ad)
        t8 = time.perf_counter_ns()
        for op, ours, bare in (("wrap", t1 - t0, t5 - t4), ("unwrap", t2 - t1, t6 - t5),
                               ("get_mic", t3 - t2, t7 - t6), ("verify_mic", t4 - t3, t8 - t7)):
            out[op]["handoffd"] = min(out[op]["handoffd"], ours / count / 1000)
            out[op]["aead"] = min(out[op]["aead"], bare / count / 1000)
    for figures in out.values():
        figures["ratio"] = figures["handoffd"] / figures["aead"]
    return out


def run(scale: float = 1.0, repeats: int = 5) -> dict[str, Any]:
    """Every micro-benchmark; ``scale`` multiplies the iteration counts (tests use tiny ones).

    Returns ``{"handshake_us": {"initiator", "acceptor"}, "context_us": {"export",
    "import", "seal", "open"}, "export_token_bytes", "sealed_token_bytes",
    "per_message_us": {op: {size: {"handoffd", "aead", "ratio"}}}, ...}``, all in µs.
    """
    def n(count: int) -> int:
        return max(2, round(count * scale))

    started = time.perf_counter()
    server = StaticKeyPair.generate(os.urandom)
    client = StaticKeyPair.generate(os.urandom)
    counts = {"handshake": n(300), "context": n(500), "64": n(20_000), "1k": n(10_000),
              "16k": n(2_000)}
    transfer = context_transfer(server, counts["context"], repeats)
    per_message: dict[str, dict[str, dict[str, float]]] = {op: {} for op in OPERATIONS}
    for name, size in SIZES.items():
        for op, figures in _per_message_size(server, size, counts[name], repeats).items():
            per_message[op][name] = figures
    return {
        "unit": "microseconds per operation",
        "method": "best of repeats of a bounded loop, perf_counter_ns, one thread",
        "repeats": repeats,
        "counts": counts,
        "handshake_us": handshake(server, client, counts["handshake"], repeats),
        "context_us": transfer["us"],
        "export_token_bytes": transfer["export_token_bytes"],
        "sealed_token_bytes": transfer["sealed_token_bytes"],
        "per_message_us": per_message,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }


def table(result: dict[str, Any]) -> str:
    """The figures as a fixed-width table (what ``main`` and ``make bench`` print)."""
    lines = [f"{'operation':26} {'size':>7} {'handoffd us':>12} {'bare AEAD us':>13} "
             f"{'ratio':>6}"]

    def row(name: str, size: str, ours: float, bare: float | None = None) -> None:
        tail = "" if bare is None else f" {bare:13.2f} {ours / bare:6.2f}"
        lines.append(f"{name:26} {size:>7} {ours:12.2f}{tail}")

    for side in ("initiator", "acceptor"):
        row(f"handshake, {side} side", "-", result["handshake_us"][side])
    export_size = f"{result['export_token_bytes']} B"
    sealed_size = f"{result['sealed_token_bytes']} B"
    for name, size in (("export", export_size), ("import", export_size),
                       ("seal", export_size), ("open", sealed_size)):
        row(f"context {name}", size, result["context_us"][name])
    labels = {"wrap": "wrap (conf)", "unwrap": "unwrap (conf)", "get_mic": "get_mic",
              "verify_mic": "verify_mic"}
    for op in OPERATIONS:
        for size_name, nbytes in SIZES.items():
            figures = result["per_message_us"][op][size_name]
            row(labels[op], f"{nbytes} B", figures["handoffd"], figures["aead"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run and print the table (``--json`` prints the result instead)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON result")
    parser.add_argument("--scale", type=float, default=1.0, help="iteration count multiplier")
    args = parser.parse_args(argv)
    result = run(scale=args.scale)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
        print(f"\n{result['method']}; {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
