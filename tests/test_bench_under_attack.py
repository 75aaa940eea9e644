"""``bench/under_attack.py`` keeps working: the scenario runs end to end with tiny counts.

Checks the JSON's shape and that its numbers are sane (ratios in [0, 1], quantiles
ordered and positive), never timing values: how the daemon fares under attack is
measured by ``make bench`` on a quiet machine, not asserted here.  Also checks that the
replayed first message is the real client's first frame.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.attack import capture_first_message, loopback_sources, parse_sources
from handoffd.core.framing import FrameDecoder, FrameType, unwrap_first_token

REPO = Path(__file__).resolve().parents[1]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _ordered_quantiles(p50: object, p99: object) -> bool:
    """Both absent (nothing succeeded) or 0 < p50 <= p99."""
    if p50 is None or p99 is None:
        return p50 is None and p99 is None
    return _number(p50) and _number(p99) and 0 < p50 <= p99  # type: ignore[operator]


def test_under_attack_quick_run_gives_sane_json(tmp_path: Path) -> None:
    out = tmp_path / "under_attack.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.under_attack", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())

    assert set(r) >= {"legit_success_ratio", "legit_handshake_p50_ms", "legit_handshake_p99_ms",
                      "legit_handshake_p99_ms_unloaded", "attack", "config"}
    for key in ("legit_success_ratio", "legit_success_ratio_unloaded"):
        assert _number(r[key]) and 0.0 <= r[key] <= 1.0
    # Unloaded, every legitimate connection completes; under attack it may not.
    assert r["legit_success_ratio_unloaded"] == 1.0
    assert _number(r["legit_handshake_p50_ms_unloaded"])
    assert _ordered_quantiles(r["legit_handshake_p50_ms_unloaded"],
                              r["legit_handshake_p99_ms_unloaded"])
    assert _ordered_quantiles(r["legit_handshake_p50_ms"], r["legit_handshake_p99_ms"])
    attacked = r["legit"]["attacked"]
    assert attacked["attempts"] >= 1
    assert attacked["successes"] + sum(attacked["failures"].values()) == attacked["attempts"]
    assert math.isclose(r["legit_success_ratio"], attacked["successes"] / attacked["attempts"])

    slowloris, replay = r["attack"]["slowloris"], r["attack"]["replay"]
    assert slowloris["connections"] == 40 and len(slowloris["sources"]) == 2
    assert slowloris["opened"] >= 1 and slowloris["max_open"] <= slowloris["connections"]
    assert replay["concurrency"] == 2 and replay["sources"] == ["127.0.0.10"]
    assert replay["attempts"] >= 1 and 0 <= replay["replies"] <= replay["attempts"]
    assert _number(replay["replies_per_s"]) and replay["replies_per_s"] >= 0
    assert _number(slowloris["duration_s"]) and _number(replay["duration_s"])
    assert r["config"]["max_handshakes"] == 16  # the quick scenario's shrunk daemon
    assert _number(r["config"]["handshake_timeout"])
    # The table printed is the one the JSON holds.
    assert "under attack: legit success ratio" in done.stdout


async def test_captured_first_message_is_the_clients_first_handshake_frame() -> None:
    frame = await capture_first_message()
    decoder = FrameDecoder()
    decoder.feed(frame)
    parsed = decoder.next_frame()
    assert parsed is not None and parsed.type == FrameType.HANDSHAKE
    assert decoder.unread() == b""
    assert unwrap_first_token(parsed.body)  # mechanism-tagged, as the acceptor reads it
    assert frame != await capture_first_message()  # a fresh ephemeral key each time


def test_source_address_helpers() -> None:
    assert loopback_sources(2, 3) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert parse_sources("127.0.0.2-127.0.0.4,127.0.0.10") == [
        "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.10"]
