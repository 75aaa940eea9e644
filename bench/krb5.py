"""krb5 beside Noise: CPU per handshake side, export+seal and open+import (docs/KRB5.md).

Needs the krb5 extra and MIT's KDC (``make deps-krb5``); makes a throwaway k5test realm.
Run: ``.venv/bin/python -m bench.krb5`` (about 10 s).
"""

from __future__ import annotations

import os
import statistics
import time

import k5test

from handoffd.core.context import AcceptorContext, InitiatorContext, import_context
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.seal import open_sealed, seal
from handoffd.mech.krb5 import Krb5AcceptorFactory, Krb5Initiator
from handoffd.mech.krb5 import import_session as krb5_import

ROUNDS = 300
KEY = os.urandom(32)
WORKER_ID = os.urandom(16)


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _seal(inner: bytes, mech: int) -> bytes:
    return seal(KEY, plaintext=inner, mech=mech, worker_id=WORKER_ID,
                expires_at=int(time.time() + 30), nonce=os.urandom(12))


def _open(sealed: bytes, mech: int) -> bytes:
    return open_sealed(KEY, sealed, worker_id=WORKER_ID, now=time.time(), mech=mech)


def krb5_figures(realm: k5test.K5Realm) -> dict[str, float]:
    factory = Krb5AcceptorFactory(keytab=realm.keytab, service="host@localhost")
    samples: dict[str, list[float]] = {
        "initiator_ap_req_us": [], "acceptor_us": [], "initiator_ap_rep_us": [],
        "seal_us": [], "open_import_us": []}
    inner = b""
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        initiator = Krb5Initiator("host@localhost")
        _, token1 = initiator.step(None)
        t1 = time.perf_counter()
        acceptor = factory.new_context()
        _, token2 = acceptor.step(token1)
        t2 = time.perf_counter()
        initiator.step(token2)
        t3 = time.perf_counter()
        inner = acceptor.export(b"")
        t4 = time.perf_counter()
        sealed = _seal(inner, 2)
        t5 = time.perf_counter()
        krb5_import(_open(sealed, 2))
        t6 = time.perf_counter()
        for key, seconds in zip(samples, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5),
                                strict=True):
            samples[key].append(seconds)
    figures = {key: _median_us(values) for key, values in samples.items()}
    figures["export_token_bytes"] = len(inner)
    return figures


def noise_figures() -> dict[str, float]:
    server_key = StaticKeyPair.generate(os.urandom)
    initiator_side: list[float] = []
    acceptor_side: list[float] = []
    export: list[float] = []
    imported: list[float] = []
    inner = b""
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        initiator = InitiatorContext(static_key=None, server_fingerprint=None,
                                     clock=time.time, random=os.urandom)
        acceptor = AcceptorContext(static_key=server_key, allow_list=None, allow_anonymous=True,
                                   clock=time.time, random=os.urandom)
        _, m1 = initiator.step(None)
        t1 = time.perf_counter()
        _, m2 = acceptor.step(m1)
        t2 = time.perf_counter()
        _, m3 = initiator.step(m2)
        t3 = time.perf_counter()
        acceptor.step(m3)
        t4 = time.perf_counter()
        initiator_side.append((t1 - t0) + (t3 - t2))
        acceptor_side.append((t2 - t1) + (t4 - t3))
        inner = acceptor.export(b"")
        t5 = time.perf_counter()
        sealed = _seal(inner, 1)
        t6 = time.perf_counter()
        import_context(_open(sealed, 1), clock=time.time)
        t7 = time.perf_counter()
        export.append(t6 - t5)
        imported.append(t7 - t6)
    return {"initiator_us": _median_us(initiator_side), "acceptor_us": _median_us(acceptor_side),
            "seal_us": _median_us(export), "open_import_us": _median_us(imported),
            "export_token_bytes": len(inner)}


def main() -> None:
    realm = k5test.K5Realm(portbase=62500)
    os.environ.update({k: v for k, v in realm.env.items() if k != "KRB5_KTNAME"})
    try:
        print("krb5 ", {k: round(v, 1) for k, v in krb5_figures(realm).items()})
        print("noise", {k: round(v, 1) for k, v in noise_figures().items()})
    finally:
        realm.stop()


if __name__ == "__main__":
    main()
