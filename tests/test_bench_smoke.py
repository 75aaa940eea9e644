"""``make bench`` keeps working: the harness runs end to end with tiny counts.

Checks the shape of ``latest.json`` (keys, units, numbers), never timing values:
the figures themselves belong to ``make bench`` on a quiet machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_bench_quick_run_writes_the_documented_schema(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--no-micro", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "latest.json").read_text())

    assert set(result["handoff_latency_us"]) >= {"p50", "p99"}
    assert result["handoff_latency_us"]["p50"] <= result["handoff_latency_us"]["p99"]
    assert _number(result["handoffs_per_s"]) and result["handoffs_per_s"] > 0
    assert set(result["e2e_conn_per_s"]) == {"handoffd", "inprocess", "tls_prefork", "tls_handoffd"}
    assert all(_number(v) and v > 0 for v in result["e2e_conn_per_s"].values())
    assert set(result["wrap_mib_s"]) == {"handoffd_16k", "raw_aead_16k", "handoffd_1k",
                                         "raw_aead_1k", "tls_record_16k", "raw_aesgcm_16k"}
    assert all(_number(v) and v > 0 for v in result["wrap_mib_s"].values())
    web = result["web"]  # the ASGI example through handoffd and under plain hypercorn
    assert set(web["requests_per_s"]) == {"handoffd", "hypercorn"}
    assert all(_number(v) and v > 0 for v in web["requests_per_s"].values())
    assert web["client_errors"] == {"handoffd": 0, "hypercorn": 0}
    pair = result["acceptors"]["uncapped"]  # [server] acceptors = 1 against 2
    assert set(pair["conn_per_s"]) == {"1", "2"} and pair["errors"] == 0
    assert all(_number(v) and v > 0 for v in pair["conn_per_s"].values())
    assert [len(run["handshake_share"]) for run in pair["runs"]["2"]] == [2]
    assert set(result["rss_mib"]) == {"acceptor", "worker"}
    assert all(_number(v) and v > 0 for v in result["rss_mib"].values())
    assert isinstance(result["fd_count_after"], int) and result["fd_count_after"] > 0
    assert set(result["machine"]) >= {"cores", "python", "trio", "cryptography", "kernel"}
    assert all(_number(v) for v in result["ratios"].values())
    assert all(isinstance(v, bool) for v in result["targets"].values())
    assert isinstance(result["micro"], dict)
    # What the TLS contender negotiated is asserted by the harness, and recorded.
    assert result["tls_negotiated"]["version"] == "TLSv1.3"
    assert result["tls_negotiated"]["group"] == "X25519"
    assert result["tls_negotiated"]["p256_key_exchange_refused"] is True
    assert result["wakeup_latency_us"]["p50"] <= result["wakeup_latency_us"]["p99"]
    assert all(_number(v) and v > 0 for v in result["server_cpu_us_per_conn"].values())
    assert all(_number(v) and v > 0 for v in result["client_cpu_us_per_conn"].values())
    headline = result["handoff_path"]["handoff_latency_by_load"][0]
    assert headline["load_per_s"] == result["moderate_conn_per_s"]
    # Every client connection in every variant completed: a broken server shows here.
    assert result["client_errors"] == {
        "handoffd": 0, "inprocess": 0, "tls_prefork": 0, "tls_handoffd": 0}
    assert result["daemon_totals"]["lost"] == 0
    # The table printed is the one the JSON holds.
    assert "e2e conn/s handoffd" in done.stdout and "targets:" in done.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "latest.png").exists()
    else:
        assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
