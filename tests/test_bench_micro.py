"""``bench/micro.py`` keeps working: tiny counts, the documented schema, never timing values."""

from __future__ import annotations

import math

from bench import micro, tls_record
from handoffd.core.tls_keys import SUITES


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_micro_run_schema_and_table() -> None:
    result = micro.run(scale=0.0001, repeats=1)

    assert set(result["handshake_us"]) == {"initiator", "acceptor"}
    assert set(result["context_us"]) == {"export", "import", "seal", "open"}
    assert all(_positive(v) for v in (*result["handshake_us"].values(),
                                      *result["context_us"].values()))
    # The sealed token is the export token plus the seal's 39-byte header and 16-byte tag.
    assert result["sealed_token_bytes"] == result["export_token_bytes"] + 55
    assert set(result["per_message_us"]) == set(micro.OPERATIONS)
    for sizes in result["per_message_us"].values():
        assert set(sizes) == set(micro.SIZES)
        for figures in sizes.values():
            assert set(figures) == {"handoffd", "aead", "ratio"}
            assert all(_positive(v) for v in figures.values())
            assert math.isclose(figures["ratio"], figures["handoffd"] / figures["aead"])
    assert all(count == 2 for count in result["counts"].values())  # the floor of the scale

    lines = micro.table(result).splitlines()
    assert lines[0].split()[:2] == ["operation", "size"]
    # 2 handshake sides, 4 context rows, 4 operations x 3 sizes.
    assert len(lines) == 1 + 2 + 4 + 4 * 3


def test_tls_record_bench_schema() -> None:
    """``python -m bench.tls_record`` keeps working: every suite, both directions."""
    result = tls_record.run(batches=1, batch=2)
    assert set(result) == {suite.name for suite in SUITES.values()}
    for figures in result.values():
        assert set(figures) == {"send_us", "encrypt_us", "send_ratio",
                                "receive_us", "decrypt_us", "receive_ratio"}
        assert all(_positive(v) for v in figures.values())
