"""Fixed, public test material shared by the targets and ``make_corpus.py``.

Fuzzing needs determinism: the same input must take the same path on every
run, so keys, worker ids and the clock are constants here (never real keys).
"""

from __future__ import annotations

from typing import Final

# Per-message keys of one test context: the initiator sends with I2A, the acceptor with A2I.
KEY_I2A: Final = bytes(range(32))
KEY_A2I: Final = bytes(range(32, 64))

SEAL_KEY: Final = bytes(range(64, 96))
WORKER_ID: Final = b"fuzz-worker-0001"
OTHER_WORKER_ID: Final = b"fuzz-worker-0002"
NOW: Final = 1_800_000_000
SEAL_EXPIRES: Final = NOW + 30
MECH_NOISE: Final = 1

MIC_MESSAGE: Final = b"the message a MIC token covers"

# Static keys of the handshake targets (fuzz_handshake, fuzz_import): public test values.
SERVER_PRIVATE: Final = bytes(range(96, 128))
CLIENT_PRIVATE: Final = bytes(range(128, 160))
CLIENT_NAME: Final = "fuzz-client"
BINDINGS: Final = b"tls-server-end-point:fuzz"
OTHER_BINDINGS: Final = b"tls-server-end-point:other"
# Each side's "randomness" (ephemeral keys, an anonymous client's key) is a seeded PRNG,
# so the same input replays the same handshake and real tokens in the corpus stay valid.
INITIATOR_SEED: Final = 1
ACCEPTOR_SEED: Final = 2
LIFETIME: Final = 600.0
# fuzz_handshake_payload: a static key that is neither the pinned server nor an allowed client.
STRANGER_PRIVATE: Final = bytes(range(192, 224))
