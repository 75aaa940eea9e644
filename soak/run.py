"""``make soak``: the real daemon under sustained load and faults; nothing may be lost.

Starts ``handoffd serve`` (4 workers running the echo demo behind a pid greeting,
``soak.app``), drives it from separate load-generator processes (``soak.loadgen``)
for ``SOAK_SECONDS``, SIGKILLs a random worker every ``SOAK_KILL_EVERY`` seconds and
sends one SIGHUP (a rolling restart of every worker) half-way through.  Every ~5 s it
samples the acceptor's and each worker's fd count and RSS, the daemon user's line of
``/proc/key-users`` and the daemon's status (the control-socket query behind
``handoffd status --json``).  At the end it classifies every connection, checks that
fds, RSS and keys are flat, writes ``soak/results/latest.json`` and prints a summary.
Exit status 0 only if every check passed.  docs/SOAK.md explains fields and criteria.

Knobs (environment): ``SOAK_SECONDS`` (600), ``SOAK_MIN_CONNECTIONS`` (100000 per 600 s),
``SOAK_KILL_EVERY`` (20), ``SOAK_SAMPLE_EVERY`` (5), ``SOAK_LOADGENS`` (2),
``SOAK_LONG_FRACTION`` (0.05), ``SOAK_LONG_MAX_PAUSE`` (0.4 s), ``SOAK_OUT`` (soak/results).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from examples.echo.demo import write_config
from handoffd.runtime.control import query_control
from handoffd.status import GSSError
from soak.loadgen import Session, Tally

REPO = Path(__file__).resolve().parents[1]
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_SECONDS = 600
DEFAULT_CONNECTIONS = 100_000
RATE_MARGIN = 1.1
"""Connections are started 10% faster than ``SOAK_MIN_CONNECTIONS / SOAK_SECONDS``."""
TIMING_WINDOW = 5.0
"""A failure without a worker pid counts as killed after import only if it happened
within this many seconds after a kill that came after its handshake."""
TOLERANCES: dict[str, float] = {
    "fd_growth_acceptor": 0,
    "fd_growth_worker": 0,
    "rss_growth_acceptor_mib": 10.0,
    "rss_growth_worker_mib": 10.0,
    "keyring_growth_keys": 0,
}
"""Flatness limits (docs/SOAK.md, "Pass criteria")."""


def _env_number(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass
class Settings:
    """What one soak run does, from the environment."""

    seconds: float = field(default_factory=lambda: _env_number("SOAK_SECONDS",
                                                                DEFAULT_SECONDS))
    min_connections: int = field(default=0)
    kill_every: float = field(default_factory=lambda: _env_number("SOAK_KILL_EVERY", 20))
    sample_every: float = field(default_factory=lambda: _env_number("SOAK_SAMPLE_EVERY", 5))
    loadgens: int = field(default_factory=lambda: int(_env_number("SOAK_LOADGENS", 2)))
    long_fraction: float = field(
        default_factory=lambda: _env_number("SOAK_LONG_FRACTION", 0.05))
    long_max_pause: float = field(
        default_factory=lambda: _env_number("SOAK_LONG_MAX_PAUSE", 0.4))
    out: Path = field(
        default_factory=lambda: Path(os.environ.get("SOAK_OUT", REPO / "soak" / "results")))
    workers: int = 4

    def __post_init__(self) -> None:
        # 100,000 in the default 600 s; a shorter or longer run keeps the same rate.
        default = math.ceil(DEFAULT_CONNECTIONS * self.seconds / DEFAULT_SECONDS)
        self.min_connections = self.min_connections or int(
            _env_number("SOAK_MIN_CONNECTIONS", default))

    @property
    def rate(self) -> float:
        """Connection starts per second, all load generators together."""
        return self.min_connections * RATE_MARGIN / self.seconds

    @property
    def warmup(self) -> float:
        """Seconds of load before the flatness baseline is taken."""
        return max(self.sample_every, 0.1 * self.seconds)


# ---------------------------------------------------------------------- /proc readings

def fd_count(pid: int) -> int | None:
    """Open fds of a process, or None if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_mib(pid: int) -> float | None:
    """Resident set size in MiB, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return round(int(f.read().split()[1]) * PAGE_SIZE / 2**20, 2)
    except OSError:
        return None


def key_users(uid: int) -> dict[str, int] | None:
    """This uid's ``/proc/key-users`` line: usage nkeys/nikeys qnkeys/maxkeys qnbytes/maxbytes."""
    try:
        lines = Path("/proc/key-users").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        head, _, rest = line.partition(":")
        if head.strip() == str(uid):
            usage, keys, quota_keys, quota_bytes = rest.split()
            nkeys, nikeys = keys.split("/")
            qnkeys, maxkeys = quota_keys.split("/")
            qnbytes, maxbytes = quota_bytes.split("/")
            return {"usage": int(usage), "nkeys": int(nkeys), "nikeys": int(nikeys),
                    "qnkeys": int(qnkeys), "maxkeys": int(maxkeys), "qnbytes": int(qnbytes),
                    "maxbytes": int(maxbytes)}
    return None


def other_test_processes() -> int:
    """Processes on the machine running pytest (other engineers' load), not counting ours."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"pytest" in cmdline and b"test_soak_smoke" not in cmdline:
            count += 1
    return count


def machine() -> dict[str, Any]:
    """What the figures were measured on, including how busy the machine was."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "trio": trio.__version__,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "other_pytest_processes_at_start": other_test_processes()}


# ---------------------------------------------------------------------- the daemon

@dataclass
class Daemon:
    """The ``handoffd serve`` process under test."""

    process: subprocess.Popen[bytes]
    directory: Path
    control: Path
    fingerprint: str
    port: int = 0
    acceptor_pid: int = 0
    """The key holder (``status`` pid); ``process`` is the supervisor when run as root."""
    acceptor_uid: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid


def start_daemon(directory: Path, workers: int) -> Daemon:
    """Key, config and ``handoffd serve``; its log goes to ``directory/daemon.log``."""
    handoffd = [sys.executable, "-m", "handoffd"]
    keygen = subprocess.run([*handoffd, "keygen", "--out", str(directory / "server.key")],
                            capture_output=True, text=True, check=True)
    fingerprint = keygen.stdout.split()[-1]
    config = write_config(directory, workers, app="soak.app:handler")
    with (directory / "daemon.log").open("wb") as log:
        process = subprocess.Popen([*handoffd, "serve", "--config", str(config)], cwd=REPO,
                                   stdout=log, stderr=log)
    return Daemon(process, directory, directory / "control.sock", fingerprint)


async def wait_ready(daemon: Daemon, workers: int, timeout: float = 60) -> dict[str, Any]:
    """Until the daemon listens with ``workers`` ready workers and nothing in flight."""
    with trio.fail_after(timeout):
        while True:
            if daemon.process.poll() is not None:
                raise RuntimeError(f"handoffd serve exited with {daemon.process.returncode}")
            try:
                status = await query_control(daemon.control)
            except GSSError:
                status = None
            if status is not None and status["listen"]:
                states = [w["state"] for w in status["workers"]]
                busy = sum(w["in_flight"] for w in status["workers"])
                if states.count("ready") == workers and len(states) == workers and not busy:
                    return status
            await trio.sleep(0.1)


async def sample(daemon: Daemon, t0: float) -> dict[str, Any]:
    """One point of the time series (fds read before the status query opens a socket)."""
    acceptor = {"fds": fd_count(daemon.acceptor_pid), "rss_mib": rss_mib(daemon.acceptor_pid)}
    status = await query_control(daemon.control)
    workers = [{"index": w["index"], "pid": w["pid"], "state": w["state"],
                "in_flight": w["in_flight"], "handled": w["handled"],
                "fds": fd_count(w["pid"]), "rss_mib": rss_mib(w["pid"])}
               for w in status["workers"] if w["pid"] is not None]
    return {"t": round(time.monotonic() - t0, 2), "acceptor": acceptor, "workers": workers,
            "key_users": key_users(daemon.acceptor_uid), "totals": status["totals"],
            "handshake_failures": status["handshake_failures"],
            "refused_by_worker": status["refused_by_worker"],
            "loadavg_1m": round(os.getloadavg()[0], 2)}


async def quiet_sample(daemon: Daemon, workers: int, t0: float, gap: float) -> dict[str, Any]:
    """A sample once nothing is in flight, from nine readings ``gap`` seconds apart.

    The lowest acceptor fd count and the lowest key counts win: the key-users line
    counts every key of the uid, so keys that another process of the same uid holds
    for a moment (other test runs on a shared machine) must not read as growth.
    """
    await wait_ready(daemon, workers)
    await trio.sleep(2 * gap)  # dead workers' keys are given back asynchronously
    best = await sample(daemon, t0)
    for _ in range(8):
        await trio.sleep(gap)
        again = await sample(daemon, t0)
        if (again["acceptor"]["fds"] or 0) < (best["acceptor"]["fds"] or 0):
            best["acceptor"] = again["acceptor"]
        if best["key_users"] and again["key_users"]:
            for key in ("nkeys", "qnbytes"):
                best["key_users"][key] = min(best["key_users"][key], again["key_users"][key])
    return best


async def warm_up(daemon: Daemon, connections: int) -> None:
    """A few sessions on every worker before the baseline, so that one-time first-use
    costs (lazy imports, first allocations) do not read as growth."""
    tally = Tally()
    rng = random.Random(2)
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(Session("short", rng).run, daemon.port, daemon.fingerprint,
                               tally)
            await trio.sleep(0.01)


# ---------------------------------------------------------------------- the run

@dataclass
class Faults:
    """The faults the soak injected, with CLOCK_MONOTONIC times."""

    kills: list[tuple[float, int]] = field(default_factory=list)
    rolls: list[float] = field(default_factory=list)


async def inject_faults(daemon: Daemon, settings: Settings, start: float, faults: Faults,
                        rng: random.Random) -> None:
    """SIGKILL a random ready worker every ``kill_every`` s; one SIGHUP half-way."""
    plan: list[tuple[float, str]] = [(settings.seconds / 2, "hup")]
    t = settings.kill_every
    while t < settings.seconds - 1:
        if abs(t - settings.seconds / 2) > min(1.0, settings.kill_every / 4):
            plan.append((t, "kill"))
        t += settings.kill_every
    for at, what in sorted(plan):
        await trio.sleep_until(trio.current_time() + max(0.0, start + at - time.monotonic()))
        if what == "hup":
            faults.rolls.append(time.monotonic())
            os.kill(daemon.pid, signal.SIGHUP)
            continue
        status = await query_control(daemon.control)
        ready = [w["pid"] for w in status["workers"]
                 if w["state"] == "ready" and w["pid"] is not None and not w["external"]]
        if ready:
            victim = rng.choice(ready)
            faults.kills.append((time.monotonic(), victim))
            os.kill(victim, signal.SIGKILL)


async def run_loadgen(daemon: Daemon, settings: Settings, index: int, until: float,
                      results: list[dict[str, Any]]) -> None:
    """One load-generator process; its JSON tally lands in ``results``."""
    done = await trio.run_process(
        [sys.executable, "-m", "soak.loadgen", "--port", str(daemon.port),
         "--fingerprint", daemon.fingerprint, "--rate", str(settings.rate / settings.loadgens),
         "--until", repr(until), "--long-fraction", str(settings.long_fraction),
         "--long-max-pause", str(settings.long_max_pause),
         "--seed", str(index)],
        cwd=REPO, capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator {index} exited with {done.returncode}: "
                           f"{done.stderr.decode()[-2000:]}")
    results.append(json.loads(done.stdout))


async def soak(daemon: Daemon, settings: Settings) -> dict[str, Any]:
    """Baseline, load + faults + sampling, quiet end; the raw material of the report."""
    status = await wait_ready(daemon, settings.workers)
    daemon.port = int(status["listen"][0].rsplit(":", 1)[1])
    daemon.acceptor_pid = status["pid"]
    daemon.acceptor_uid = status["privilege_separation"]["acceptor_uid"]
    t0 = time.monotonic()
    await warm_up(daemon, settings.workers * 8)
    gap = min(0.4, settings.sample_every / 10)
    before = await quiet_sample(daemon, settings.workers, t0, gap)
    start = time.monotonic()
    until = start + settings.seconds
    faults = Faults()
    samples: list[dict[str, Any]] = []
    tallies: list[dict[str, Any]] = []

    async def sampler() -> None:
        while True:
            await trio.sleep(settings.sample_every)
            if daemon.process.poll() is not None:
                raise RuntimeError(f"the daemon died: exit status {daemon.process.returncode}")
            samples.append(await sample(daemon, start))

    async with trio.open_nursery() as outer:
        outer.start_soon(sampler)
        outer.start_soon(inject_faults, daemon, settings, start, faults, random.Random(1))
        async with trio.open_nursery() as load:
            for index in range(settings.loadgens):
                load.start_soon(run_loadgen, daemon, settings, index, until, tallies)
        outer.cancel_scope.cancel()
    load_seconds = time.monotonic() - start
    after = await quiet_sample(daemon, settings.workers, start, gap)
    return {"before": before, "after": after, "samples": samples, "tallies": tallies,
            "faults": faults, "load_seconds": load_seconds, "start": start}


# ---------------------------------------------------------------------- the report

def classify(failures: list[list[Any]], faults: Faults) -> tuple[Counter[str], Counter[str],
                                                                 Counter[str]]:
    """Split failures into killed-after-import (by pid or by timing) and lost (by reason)."""
    killed_at = {pid: at for at, pid in faults.kills}
    kill_times = sorted(killed_at.values())
    lost: Counter[str] = Counter()
    killed: Counter[str] = Counter()
    method: Counter[str] = Counter()
    for _kind, _t_start, t_handshake, pid, t_fail, stage, reason in failures:
        if pid is not None and pid in killed_at and t_fail >= killed_at[pid]:
            killed[reason] += 1
            method["worker_pid"] += 1
        elif pid is None and t_handshake is not None and any(
                t_handshake - 0.05 <= at <= t_fail <= at + TIMING_WINDOW for at in kill_times):
            killed[reason] += 1
            method["timing"] += 1
        else:
            lost[f"{stage}: {reason}"] += 1
    return lost, killed, method


def _mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 2) if values else 0.0


def flatness(raw: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Growth of fds (quiet start vs quiet end), RSS (after warm-up vs end of load), keys."""
    before, after, samples = raw["before"], raw["after"], raw["samples"]

    def worker_max(point: dict[str, Any], key: str) -> float:
        values = [w[key] for w in point["workers"] if w[key] is not None]
        return max(values) if values else 0

    loaded = [s for s in samples if s["t"] >= settings.warmup] or samples
    warm = loaded[:3]
    last = samples[-3:]
    keys_before, keys_after = before["key_users"] or {}, after["key_users"] or {}
    return {
        "fd_growth": {
            "acceptor": (after["acceptor"]["fds"] or 0) - (before["acceptor"]["fds"] or 0),
            "worker": int(worker_max(after, "fds") - worker_max(before, "fds")),
        },
        "rss_growth_mib": {
            "acceptor": round(_mean([s["acceptor"]["rss_mib"] for s in last])
                              - _mean([s["acceptor"]["rss_mib"] for s in warm]), 2),
            "worker": round(_mean([worker_max(s, "rss_mib") for s in last])
                            - _mean([worker_max(s, "rss_mib") for s in warm]), 2),
        },
        "keyring_growth": {
            "keys": keys_after.get("nkeys", 0) - keys_before.get("nkeys", 0),
            "bytes": keys_after.get("qnbytes", 0) - keys_before.get("qnbytes", 0),
        },
        "rss_baseline_mib": {"acceptor": _mean([s["acceptor"]["rss_mib"] for s in warm]),
                             "worker": _mean([worker_max(s, "rss_mib") for s in warm])},
        "fds": {"before": {"acceptor": before["acceptor"]["fds"],
                           "worker": worker_max(before, "fds")},
                "after": {"acceptor": after["acceptor"]["fds"],
                          "worker": worker_max(after, "fds")}},
        "key_users": {"before": before["key_users"], "after": after["key_users"]},
        # Informative, not checked: under load (same tolerance idea as RSS) ...
        "fds_under_load": {
            "acceptor": {"after_warmup": _mean([s["acceptor"]["fds"] for s in warm]),
                         "end": _mean([s["acceptor"]["fds"] for s in last])},
            "worker": {"after_warmup": _mean([worker_max(s, "fds") for s in warm]),
                       "end": _mean([worker_max(s, "fds") for s in last])}},
        # ... and the lower envelope of the key count: other processes' keys only add.
        "keyring_lower_envelope": {"first_half_min": _min_keys(loaded[:len(loaded) // 2]),
                                   "second_half_min": _min_keys(loaded[len(loaded) // 2:])},
    }


def _min_keys(points: list[dict[str, Any]]) -> int | None:
    counts = [p["key_users"]["nkeys"] for p in points if p["key_users"]]
    return min(counts) if counts else None


def report(raw: dict[str, Any], settings: Settings, exit_status: int | None,
           machine_info: dict[str, Any], log: Path) -> dict[str, Any]:
    """The JSON document written to ``latest.json``."""
    tallies = raw["tallies"]
    failures = [f for t in tallies for f in t["failures"]]
    attempted = sum(t["attempted"] for t in tallies)
    completed_short = sum(t["completed"]["short"] for t in tallies)
    completed_long = sum(t["completed"]["long"] for t in tallies)
    completed = completed_short + completed_long
    lost_reasons, killed_reasons, method = classify(failures, raw["faults"])
    killed = sum(killed_reasons.values())
    flat = flatness(raw, settings)
    totals = raw["after"]["totals"]
    log_text = log.read_text(errors="replace")
    log_counts = {"error_lines": sum(" ERROR " in line or "CRITICAL" in line
                                     for line in log_text.splitlines()),
                  "tracebacks": log_text.count("Traceback")}
    lost = attempted - completed - killed
    checks = {
        "connections_at_least_target": (attempted, settings.min_connections,
                                        attempted >= settings.min_connections),
        "nothing_lost": (lost, 0, lost == 0),
        "daemon_lost_zero": (totals["lost"], 0, totals["lost"] == 0),
        "every_connection_accounted": (completed + len(failures), attempted,
                                       completed + len(failures) == attempted),
        "worker_kills_injected": (len(raw["faults"].kills), 1, len(raw["faults"].kills) >= 1),
        "sighup_roll_injected": (len(raw["faults"].rolls), 1, len(raw["faults"].rolls) == 1),
        "daemon_clean_exit_on_sigterm": (exit_status, 0, exit_status == 0),
        "no_tracebacks_in_daemon_log": (log_counts["tracebacks"], 0,
                                        log_counts["tracebacks"] == 0),
        "fd_growth_acceptor": (flat["fd_growth"]["acceptor"], TOLERANCES["fd_growth_acceptor"],
                               flat["fd_growth"]["acceptor"] <= TOLERANCES["fd_growth_acceptor"]),
        "fd_growth_worker": (flat["fd_growth"]["worker"], TOLERANCES["fd_growth_worker"],
                             flat["fd_growth"]["worker"] <= TOLERANCES["fd_growth_worker"]),
        "rss_growth_acceptor_mib": (
            flat["rss_growth_mib"]["acceptor"], TOLERANCES["rss_growth_acceptor_mib"],
            flat["rss_growth_mib"]["acceptor"] <= TOLERANCES["rss_growth_acceptor_mib"]),
        "rss_growth_worker_mib": (
            flat["rss_growth_mib"]["worker"], TOLERANCES["rss_growth_worker_mib"],
            flat["rss_growth_mib"]["worker"] <= TOLERANCES["rss_growth_worker_mib"]),
        "keyring_growth_keys": (
            flat["keyring_growth"]["keys"], TOLERANCES["keyring_growth_keys"],
            flat["keyring_growth"]["keys"] <= TOLERANCES["keyring_growth_keys"]),
    }
    start = raw["start"]
    machine_info = {**machine_info, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "other_pytest_processes_at_end": other_test_processes(),
                    "loadavg_1m_mean": _mean([s["loadavg_1m"] for s in raw["samples"]])}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "make soak",
        "passed": all(ok for _, _, ok in checks.values()),
        "attempted": attempted,
        "completed": completed,
        "completed_by_kind": {"short": completed_short, "long": completed_long},
        "lost": lost,
        "failed_by_reason": dict(lost_reasons.most_common()),
        "killed_after_import": killed,
        "killed_after_import_by_reason": dict(killed_reasons.most_common()),
        "killed_after_import_by_method": dict(method),
        "fd_growth": flat["fd_growth"],
        "rss_growth_mib": flat["rss_growth_mib"],
        "keyring_growth": flat["keyring_growth"],
        "worker_kills": len(raw["faults"].kills),
        "sighup_rolls": len(raw["faults"].rolls),
        "seconds": round(raw["load_seconds"], 1),
        "start_window_s": settings.seconds,
        "connections_per_s": round(attempted / settings.seconds, 1),
        "echoes": sum(t["echoes"] for t in tallies),
        "late_starts": sum(t["late_starts"] for t in tallies),
        "close_errors": sum(t["close_errors"] for t in tallies),
        "worker_pids_seen": len({pid for t in tallies for pid in t["workers_seen"]}),
        "daemon_totals": totals,
        "daemon_handshake_failures": raw["after"]["handshake_failures"],
        "daemon_refused_by_worker": raw["after"]["refused_by_worker"],
        "daemon_exit_status": exit_status,
        "daemon_log": log_counts,
        "checks": {name: {"value": value, "limit": limit, "ok": ok}
                   for name, (value, limit, ok) in checks.items()},
        "tolerances": TOLERANCES,
        "flatness": flat,
        "faults": {"kills": [{"t": round(at - start, 2), "pid": pid}
                             for at, pid in raw["faults"].kills],
                   "sighup": [round(at - start, 2) for at in raw["faults"].rolls]},
        "settings": {"seconds": settings.seconds, "min_connections": settings.min_connections,
                     "rate_per_s": round(settings.rate, 1), "workers": settings.workers,
                     "loadgens": settings.loadgens, "kill_every": settings.kill_every,
                     "sample_every": settings.sample_every, "warmup": settings.warmup,
                     "long_fraction": settings.long_fraction,
                     "long_max_pause": settings.long_max_pause},
        "machine": machine_info,
        "samples": raw["samples"],
    }


def summary(result: dict[str, Any]) -> str:
    """A few readable lines."""
    fd, rss, keys = result["fd_growth"], result["rss_growth_mib"], result["keyring_growth"]
    lines = [
        f"soak         {result['seconds']:.0f}s, {result['attempted']} connections "
        f"({result['connections_per_s']:.0f}/s), {result['echoes']} echoes, "
        f"{result['settings']['workers']} workers",
        f"completed    {result['completed']} (short {result['completed_by_kind']['short']}, "
        f"long {result['completed_by_kind']['long']})",
        f"killed       {result['killed_after_import']} connections whose worker we SIGKILLed "
        f"after import ({result['worker_kills']} kills, {result['sighup_rolls']} SIGHUP roll)",
        f"lost         {result['lost']}" + "".join(
            f"\n  {n} x {reason}" for reason, n in result["failed_by_reason"].items()),
        f"daemon       redelivered {result['daemon_totals']['redelivered']} (never queued), "
        f"died with their worker {result['daemon_totals'].get('died_after_claim', 0)} "
        f"claimed + {result['daemon_totals'].get('died_unclaimed', 0)} unclaimed, "
        f"lost {result['daemon_totals']['lost']}, exit {result['daemon_exit_status']}",
        f"flat         fds acceptor {fd['acceptor']:+d} worker {fd['worker']:+d}; "
        f"RSS acceptor {rss['acceptor']:+.1f} MiB worker {rss['worker']:+.1f} MiB; "
        f"keys {keys['keys']:+d} ({keys['bytes']:+d} bytes)",
        f"machine      {result['machine']['cores']} cores, load avg "
        f"{result['machine']['loadavg_1m_mean']} (mean 1 min), "
        f"{result['machine']['other_pytest_processes_at_start']} other pytest processes "
        "at start",
    ]
    failed = [name for name, check in result["checks"].items() if not check["ok"]]
    lines.append("soak         " + ("PASSED" if result["passed"] else
                                    "FAILED: " + ", ".join(failed)))
    return "\n".join(lines)


def main() -> int:
    """Run the soak; write the JSON; print the summary; 0 only if every check passed."""
    settings = Settings()
    machine_info = machine()
    print(f"soak: {settings.seconds:g}s, >= {settings.min_connections} connections "
          f"({settings.rate:.0f}/s from {settings.loadgens} processes), SIGKILL every "
          f"{settings.kill_every:g}s, SIGHUP at {settings.seconds / 2:g}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="handoffd-soak-") as tmp:
        daemon = start_daemon(Path(tmp), settings.workers)
        exit_status: int | None = None
        try:
            raw = trio.run(soak, daemon, settings)
        finally:
            daemon.process.send_signal(signal.SIGTERM)
            try:
                exit_status = daemon.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()
        result = report(raw, settings, exit_status, machine_info, Path(tmp) / "daemon.log")
        if not result["passed"]:
            tail = (Path(tmp) / "daemon.log").read_text(errors="replace").splitlines()[-40:]
            print("daemon log (last lines):\n" + "\n".join(tail), file=sys.stderr)
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "latest.json").write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    print(f"wrote {settings.out / 'latest.json'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
