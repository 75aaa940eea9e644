"""``make soak`` keeps working: the soak runs end to end with a tiny duration and count.

A real daemon, real load-generator processes, real SIGKILLs and a real SIGHUP roll;
it checks the shape of ``latest.json`` and that nothing was lost, never timing values
(the figures belong to the full ``make soak``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SMOKE = {
    "SOAK_SECONDS": "5",
    "SOAK_MIN_CONNECTIONS": "150",
    "SOAK_KILL_EVERY": "1.5",
    "SOAK_SAMPLE_EVERY": "1",
    "SOAK_LONG_MAX_PAUSE": "0.05",
}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_soak_quick_run_loses_nothing_and_writes_the_documented_schema(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "soak.run"], cwd=REPO,
                          env={**os.environ, **SMOKE, "SOAK_OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    result = json.loads((tmp_path / "latest.json").read_text())

    assert result["lost"] == 0, (result["failed_by_reason"], done.stderr[-3000:])
    # How many connections a 5-second run starts depends on how busy the machine is (the
    # load generators pace themselves by the clock): that is the full soak's check
    # (``connections_at_least_target``), not this one's.
    assert result["attempted"] > 0
    assert isinstance(result["checks"]["connections_at_least_target"]["ok"], bool)
    # Every connection is accounted for: completed, or killed by the soak after import.
    assert result["attempted"] == result["completed"] + result["killed_after_import"]
    assert result["failed_by_reason"] == {}
    assert result["daemon_totals"]["lost"] == 0
    assert result["worker_kills"] >= 1 and result["sighup_rolls"] == 1
    assert set(result["fd_growth"]) == {"acceptor", "worker"}
    assert all(isinstance(v, int) for v in result["fd_growth"].values())
    assert set(result["rss_growth_mib"]) == {"acceptor", "worker"}
    assert all(_number(v) for v in result["rss_growth_mib"].values())
    assert set(result["keyring_growth"]) == {"keys", "bytes"}
    assert _number(result["seconds"]) and result["seconds"] > 0
    assert set(result["machine"]) >= {"cores", "cpu", "kernel", "python", "loadavg_at_start"}
    assert len(result["samples"]) >= 3
    for point in result["samples"]:
        assert _number(point["t"]) and point["acceptor"]["fds"] > 0
        assert point["acceptor"]["rss_mib"] > 0
        assert point["workers"] and all({"pid", "fds", "rss_mib"} <= set(w)
                                        for w in point["workers"])
        assert {"lost", "redelivered", "acked"} <= set(point["totals"])
    assert all(isinstance(check["ok"], bool) for check in result["checks"].values())
    # The exit status and the summary agree with the JSON.
    assert (done.returncode == 0) == result["passed"]
    assert ("PASSED" if result["passed"] else "FAILED") in done.stdout
