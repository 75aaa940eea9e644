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
