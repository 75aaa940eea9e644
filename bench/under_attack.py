"""Scenario ``under_attack``: a legitimate client's handshakes while hostile clients run.

``python -m bench.under_attack [--quick] [--out FILE]`` starts ``handoffd serve`` with
the configuration ``make bench`` uses (``bench.run.start_handoffd``: loopback, anonymous
clients, N workers running the echo app, every admission setting at its default) and
measures, from this process over 127.0.0.1, sequential legitimate connections: connect
+ full Noise XX handshake + one 64-byte echo round trip, with handoffd's own client
(``handoffd.runtime.client.connect``), each under a deadline.  First with nothing
else running, then while, in separate processes (``python -m bench.attack``, so the
attackers never share this process's scheduling):

* a slowloris holds idle connections from 8 loopback addresses (127.0.0.2-127.0.0.9),
  more than ``[server] max_handshakes``, re-opening any the server closes;
* a replay flood sends a captured first client message (the client's first HANDSHAKE
  frame) over and over from 127.0.0.10, reading each reply (message 2).

A legitimate connection that fails or misses its deadline counts against
``legit_success_ratio`` (never raises).  Latency quantiles are over the successful
ones.  Every loop is bounded by a count and a deadline.  What the figures mean:
``docs/BENCHMARKS.md``, "Under attack".
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.attack import loopback_sources
from bench.common import cpu_seconds, quantile
from bench.run import PY, REPO, snapshot, start_handoffd
from handoffd import keyfiles
from handoffd.config import load_config
from handoffd.core.credentials import StaticKeyPair
from handoffd.minor import Minor
from handoffd.runtime.client import connect
from handoffd.status import GSSError, status_name

PAYLOAD = os.urandom(64)


@dataclass
class Scenario:
    """How much to run: the full scenario, or tiny counts for the smoke test."""

    workers: int
    legit_count: int
    """Sequential legitimate connections per phase (at most)."""
    legit_deadline: float
    """Seconds one legitimate connection may take, from connect to the echo."""
    legit_budget: float
    """Seconds the attacked phase may last: it stops at ``legit_count`` or here."""
    legit_interval: float
    """Seconds from one legitimate connection's start to the next's (or right after the
    previous one, if it took longer): spreads the sample over several of the daemon's
    timeouts instead of the attack's first second."""
    slowloris_connections: int
    slowloris_sources: int
    """Loopback addresses 127.0.0.2 ... for the slowloris."""
    replay_concurrency: int
    replay_source: str
    settle: float
    """Seconds between the attack being under way and the first measured connection."""
    server_overrides: dict[str, int | float]
    """Extra ``[server]`` settings (the smoke test shrinks the daemon; the bench: none)."""

    @classmethod
    def full(cls) -> Scenario:
        return cls(workers=os.cpu_count() or 1, legit_count=200, legit_deadline=5.0,
                   legit_budget=30.0, legit_interval=0.05, slowloris_connections=600,
                   slowloris_sources=8, replay_concurrency=16, replay_source="127.0.0.10",
                   settle=1.0, server_overrides={})

    @classmethod
    def quick(cls) -> Scenario:
        """Tiny counts against a shrunk daemon (16 handshake slots, short timeouts), so
        that the slowloris still outnumbers the slots: the smoke test and ``--quick``."""
        return cls(workers=1, legit_count=10, legit_deadline=1.0, legit_budget=4.0,
                   legit_interval=0.0, slowloris_connections=40, slowloris_sources=2,
                   replay_concurrency=2, replay_source="127.0.0.10", settle=0.3,
                   server_overrides={"max_handshakes": 16, "handshake_timeout": 2.0})


# ---------------------------------------------------------------------------- legit client


def _minor_name(minor: int) -> str:
    try:
        return Minor(minor).name
    except ValueError:
        return str(minor)


async def legit_once(port: int, fingerprint: str, deadline: float) -> tuple[float | None, str]:
    """One legitimate connection: (seconds to the echo, "ok") or (None, why it failed)."""
    started = time.perf_counter()
    with trio.move_on_after(deadline):
        try:
            stream = await connect("127.0.0.1", port, server_fingerprint=fingerprint,
                                   timeout=deadline)
            async with stream:
                await stream.send_all(PAYLOAD)
                echoed = b""
                while len(echoed) < len(PAYLOAD):
                    chunk = await stream.receive_some(len(PAYLOAD) - len(echoed))
                    if not chunk:
                        return None, "closed_before_echo"
                    echoed += chunk
                took = time.perf_counter() - started
            if echoed != PAYLOAD:
                return None, "echo_mismatch"
            return took, "ok"
        except GSSError as error:
            return None, f"GSSError:{status_name(error.major)}/{_minor_name(error.minor)}"
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            return None, type(error).__name__
    return None, "deadline"


async def legit_phase(port: int, fingerprint: str, count: int, deadline: float,
                      budget: float, interval: float) -> dict[str, Any]:
    """Up to ``count`` sequential legitimate connections, one started every ``interval``
    seconds at most, stopping after ``budget`` s."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    attempts = 0
    started = time.monotonic()
    while attempts < count and time.monotonic() - started < budget:
        await trio.sleep_until(trio.current_time() + max(
            0.0, started + attempts * interval - time.monotonic()))
        attempts += 1
        took, why = await legit_once(port, fingerprint, deadline)
        if took is None:
            failures[why] = failures.get(why, 0) + 1
        else:
            latencies.append(took)
    latencies.sort()

    def ms(p: float) -> float | None:
        return round(quantile(latencies, p) * 1e3, 3) if latencies else None

    return {
        "attempts": attempts,
        "successes": len(latencies),
        "success_ratio": len(latencies) / attempts if attempts else 0.0,
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "max_ms": round(latencies[-1] * 1e3, 3) if latencies else None,
        "failures": failures,
        "seconds": round(time.monotonic() - started, 3),
    }


# ---------------------------------------------------------------------------- attackers


def start_attacker(args: list[str], ready_timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """``python -m bench.attack ARGS --ready``; returns once it printed ``ready``."""
    process = subprocess.Popen([PY, "-m", "bench.attack", *args, "--ready"], cwd=REPO,
                               stdout=subprocess.PIPE)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], ready_timeout)
    if not ready or process.stdout.readline().strip() != b"ready":
        process.kill()
        process.wait()
        raise SystemExit(f"bench.attack {args[0]} did not start")
    return process


def stop_attacker(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """SIGTERM, then its report (the last line of its stdout)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        return {"error": "did not stop on SIGTERM"}
    lines = out.decode().strip().splitlines()
    if not lines:
        return {"error": f"no report (exit {process.returncode})"}
    report: dict[str, Any] = json.loads(lines[-1])
    return report


# ---------------------------------------------------------------------------- scenario


def settings_that_matter(config_path: Path) -> dict[str, Any]:
    """The daemon's admission settings as it read them (absent ones: not in this version)."""
    config = load_config(config_path)
    server, workers = config.server, config.workers
    out: dict[str, Any] = {"workers": workers.count}
    for name in ("max_handshakes", "max_handshakes_per_source", "source_prefix_v4",
                 "source_prefix_v6", "handshake_timeout", "first_token_timeout", "backlog"):
        if hasattr(server, name):
            out[name] = getattr(server, name)
    for name in ("wait_timeout", "max_unacked"):
        if hasattr(workers, name):
            out[f"workers_{name}"] = getattr(workers, name)
    try:
        from handoffd.mech import NOISE
        out["noise_max_handshake_frame"] = getattr(NOISE, "max_handshake_frame", None)
    except ImportError:
        pass
    from handoffd.core.framing import MAX_FRAME
    out["max_frame"] = MAX_FRAME
    return out


def _source_revision() -> dict[str, Any]:
    """The handoffd tree measured: commit, and whether it had uncommitted changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "handoffd")
    return {"commit": commit or None, "handoffd_modified": bool(dirty) if commit else None}


def server_overrides(overrides: dict[str, int | float]) -> Callable[[Path], None] | None:
    """A ``start_handoffd`` hook adding ``overrides`` to the config's ``[server]`` table."""
    if not overrides:
        return None

    def configure(config: Path) -> None:
        lines = "".join(f"{k} = {v!r}\n" for k, v in overrides.items())
        config.write_text(config.read_text().replace("[server]\n", "[server]\n" + lines, 1))

    return configure


def run(s: Scenario, directory: Path) -> dict[str, Any]:
    """The whole scenario against a fresh daemon; the JSON described in the module doc."""
    started = time.monotonic()
    server_key = directory / "server.key"
    keyfiles.save_private_key(server_key, StaticKeyPair.generate(os.urandom))
    fingerprint = keyfiles.load_private_key(server_key).fingerprint
    daemon = start_handoffd(directory, s.workers, server_overrides(s.server_overrides))
    attackers: list[subprocess.Popen[bytes]] = []
    try:
        config = settings_that_matter(directory / "handoffd.toml")
        acceptor = snapshot(daemon)["pid"]
        unloaded = trio.run(legit_phase, daemon.port, fingerprint, s.legit_count,
                            s.legit_deadline, s.legit_budget, s.legit_interval)
        sources = loopback_sources(2, s.slowloris_sources)
        # Upper bounds only: both are stopped (SIGTERM) when the attacked phase ends.
        attack_bound = s.settle + s.legit_budget + s.legit_deadline + 30
        attackers.append(start_attacker([
            "slowloris", "--port", str(daemon.port), "--connections",
            str(s.slowloris_connections), "--sources", ",".join(sources),
            "--hold", str(attack_bound)]))
        attackers.append(start_attacker([
            "replay", "--port", str(daemon.port), "--concurrency", str(s.replay_concurrency),
            "--sources", s.replay_source, "--duration", str(attack_bound),
            "--reply-timeout", str(s.legit_deadline)]))
        time.sleep(s.settle)
        before = snapshot(daemon)
        cpu_before = cpu_seconds(acceptor)
        attacked = trio.run(legit_phase, daemon.port, fingerprint, s.legit_count,
                            s.legit_deadline, s.legit_budget, s.legit_interval)
        acceptor_busy = (cpu_seconds(acceptor) - cpu_before) / max(attacked["seconds"], 1e-3)
        after = snapshot(daemon)
        reports = [stop_attacker(p) for p in attackers]
        attackers.clear()
    finally:
        for p in attackers:
            p.kill()
            p.wait()
        daemon.stop()
    slowloris, replay = reports
    failures_during = {
        k: v - before["handshake_failures"].get(k, 0)
        for k, v in after["handshake_failures"].items()
        if v - before["handshake_failures"].get(k, 0)}
    return {
        "legit_success_ratio": attacked["success_ratio"],
        "legit_handshake_p50_ms": attacked["p50_ms"],
        "legit_handshake_p99_ms": attacked["p99_ms"],
        "legit_handshake_p50_ms_unloaded": unloaded["p50_ms"],
        "legit_handshake_p99_ms_unloaded": unloaded["p99_ms"],
        "legit_success_ratio_unloaded": unloaded["success_ratio"],
        "legit": {"unloaded": unloaded, "attacked": attacked,
                  "deadline_s": s.legit_deadline, "interval_s": s.legit_interval,
                  "source": "127.0.0.1",
                  "what": "connect + Noise XX handshake + 64 B echo, sequential"},
        "attack": {
            "slowloris": {
                "connections": s.slowloris_connections, "sources": sources,
                "opened": slowloris.get("opened"),
                "closed_by_server": slowloris.get("closed_by_server"),
                "refused": slowloris.get("refused"),
                "max_open": slowloris.get("max_open"),
                "open_at_end": slowloris.get("open_at_end"),
                "mean_held_s": slowloris.get("mean_held_s"),
                "server_errors": slowloris.get("server_errors"),
                "duration_s": slowloris.get("hold_s"),
            },
            "replay": {
                "concurrency": s.replay_concurrency, "sources": [s.replay_source],
                "frame_bytes": replay.get("frame_bytes"),
                "attempts": replay.get("attempts"),
                "replies": replay.get("replies"),
                "replies_per_s": replay.get("replies_per_s"),
                "timeouts": replay.get("timeouts"),
                "closed_without_reply": replay.get("closed_without_reply"),
                "server_errors": replay.get("server_errors"),
                "failed": replay.get("failed"),
                "duration_s": replay.get("duration_s"),
            },
            "settle_s": s.settle,
            "acceptor_cpu_busy": round(acceptor_busy, 3),
            "daemon_accepted": after["totals"]["accepted"] - before["totals"]["accepted"],
            "daemon_handshakes_ok": (after["totals"]["handshakes_ok"]
                                     - before["totals"]["handshakes_ok"]),
            "daemon_handshake_failures": failures_during,
        },
        "config": {**config, "overrides": s.server_overrides},
        "source": _source_revision(),
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def table_lines(r: dict[str, Any]) -> list[str]:
    """The scenario's lines in ``bench.run``'s table."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    a = r["attack"]
    unloaded = (ms(r["legit_handshake_p50_ms_unloaded"]) + "/"
                + ms(r["legit_handshake_p99_ms_unloaded"]))
    return [
        f"{'under attack: legit success ratio':44} {r['legit_success_ratio']:12.2f}  "
        f"({r['legit']['attacked']['successes']}/{r['legit']['attacked']['attempts']}, "
        f"deadline {r['legit']['deadline_s']:g} s)",
        f"{'  legit handshake ms p50/p99 attacked':44} "
        f"{ms(r['legit_handshake_p50_ms']) + '/' + ms(r['legit_handshake_p99_ms']):>12}",
        f"{'  legit handshake ms p50/p99 unloaded':44} "
        f"{unloaded:>12}",
        f"{'  attack: slowloris conns / replay replies/s':44} "
        f"{a['slowloris']['connections']:5d} / {a['replay']['replies_per_s'] or 0:<6.0f}"
        f" ({len(a['slowloris']['sources'])} sources, replay x{a['replay']['concurrency']})",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the scenario, print (or write) its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    s = Scenario.quick() if args.quick else Scenario.full()
    with tempfile.TemporaryDirectory(prefix="handoffd-under-attack-") as tmp:
        result = run(s, Path(tmp))
    text = json.dumps(result, indent=2) + "\n"
    if args.out is not None:
        args.out.write_text(text)
        print("\n".join(table_lines(result)))
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
