"""One acceptor against two (issue 18): connections/s of ``handoffd serve`` with
``[server] acceptors`` = 1 and = 2, the same workers, the same load.

Two configurations, interleaved over the repeats (1, 2, 1, 2, ...):

* ``capped`` (acceptor-bound): each acceptor process is put in a cgroup of its own
  (cgroup v1 ``cpu`` controller, or v2 ``cpu.max``) whose CPU quota is ``--quota`` of
  one core (default 0.15): each acceptor runs as on a slow core of its own, while the
  workers, the supervisor and the load generators are not capped.  The acceptors are
  then the bottleneck by construction (the cores are far from busy), which is what a
  many-core machine looks like once one acceptor's core is full; the ratio of 2 to 1
  acceptors is how well a second acceptor scales the handshake capacity (ideal 2.0).
* ``uncapped``: no cgroup; on a 2-core machine the load generators, workers and
  acceptors share the cores, so this shows whether a second acceptor pays off on
  *this* machine (it decides the default, 1).

Per run: connections/s completed in the window (``bench.run.run_load``: the same load
generator as ``make bench``), server CPU µs per connection (all server processes),
the acceptors' CPU µs per handshake (their CPU over the load / handshakes they
completed), each acceptor's share of the handshakes, and ``machine_busy``.

``python -m bench.acceptors [--quota 0.15] [--repeats 3] [--duration 6] [--workers 4]``
prints JSON (``make bench`` puts it under ``acceptors``).  Needs root (the daemon runs
separated, as shipped; the cgroups are root's); without a writable cgroup ``capped`` is
reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds
from bench.run import Server, Settings, median, run_load, snapshot, start_handoffd
from examples.echo.demo import DEMO_ACCEPTOR_UID, DEMO_WORKER_UIDS
from handoffd import keyfiles
from handoffd.core.credentials import StaticKeyPair

ACCEPTOR_UID = 69699
WORKER_UIDS = (69700, 69763)
"""Uids of this bench's daemons when run as root: beside the demo's 69799/69800-69863
and the example configs' ranges, used by nothing else handoffd ships."""

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000
DEFAULT_QUOTA = 0.15
"""Cores per acceptor in the capped runs: low enough that two capped acceptors, their
workers and the load generators leave a 2-core machine headroom (so the acceptors, not
the machine, are the bound), high enough for a few hundred connections/s."""


class CpuCap:
    """One cgroup per acceptor with a CPU quota of ``quota`` cores; removed on exit."""

    def __init__(self, quota: float) -> None:
        self.quota = quota
        self.groups: list[Path] = []
        if (_V1 / "cpu.cfs_quota_us").exists():
            self.root, self.v2 = _V1, False
        elif (_V2 / "cgroup.controllers").exists():
            self.root, self.v2 = _V2, True
        else:
            raise OSError("no cgroup cpu controller")

    @staticmethod
    def available() -> str | None:
        """None if cgroups can be made here, else why not."""
        try:
            cap = CpuCap(0.5)
            group = cap._make("probe")
        except OSError as error:
            return str(error)
        cap.groups.append(group)
        cap.close()
        return None

    def _make(self, name: str) -> Path:
        group = self.root / f"handoffd-bench-{os.getpid()}-{name}"
        group.mkdir()
        quota = str(int(self.quota * _PERIOD_US))
        if self.v2:
            (group / "cpu.max").write_text(f"{quota} {_PERIOD_US}\n")
        else:
            (group / "cpu.cfs_period_us").write_text(f"{_PERIOD_US}\n")
            (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        return group

    def cap(self, pid: int) -> None:
        """Move ``pid`` (every thread of it) into a cgroup of its own."""
        group = self._make(str(pid))
        self.groups.append(group)
        (group / "cgroup.procs").write_text(f"{pid}\n")

    def close(self) -> None:
        """Move everything back to the root group and remove the groups."""
        for group in self.groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.root / "cgroup.procs").write_text(pid + "\n")
            with contextlib.suppress(OSError):
                group.rmdir()
        self.groups.clear()


@contextlib.contextmanager
def daemon_with(directory: Path, acceptors: int, workers: int) -> Iterator[Server]:
    def configure(config: Path) -> None:
        text = config.read_text().replace("[server]\n",
                                          f"[server]\nacceptors = {acceptors}\n", 1)
        if os.geteuid() == 0:
            # A uid block of this bench's own: the demo's (make bench, make soak) may be
            # in use by another run on this machine, and a supervisor kills every
            # process of a worker uid it frees.
            text = text.replace(f'user = "{DEMO_ACCEPTOR_UID}"', f'user = "{ACCEPTOR_UID}"')
            text = text.replace(f"uid_range = [{DEMO_WORKER_UIDS[0]}, {DEMO_WORKER_UIDS[1]}]",
                                f"uid_range = [{WORKER_UIDS[0]}, {WORKER_UIDS[1]}]")
            for name in ("server.key", "server.key.pub"):
                if (directory / name).exists():
                    os.chown(directory / name, ACCEPTOR_UID, ACCEPTOR_UID)
        config.write_text(text)

    server = start_handoffd(directory, workers, configure=configure)
    try:
        deadline = time.monotonic() + 30
        while len(acceptor_pids(server)) < acceptors and time.monotonic() < deadline:
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


def acceptor_pids(server: Server) -> list[int]:
    status = snapshot(server)
    return [a["pid"] for a in status.get("acceptors", [{"pid": status["pid"]}])
            if a.get("pid")]


def one_run(directory: Path, acceptors: int, s: Settings, fingerprint: str,
            quota: float | None) -> dict[str, Any]:
    with daemon_with(directory, acceptors, s.workers) as server:
        pids = acceptor_pids(server)
        cap = CpuCap(quota) if quota is not None else None
        try:
            if cap is not None:
                for pid in pids:
                    cap.cap(pid)
            before = snapshot(server)
            cpu_before = sum(cpu_seconds(pid) for pid in pids)
            load = run_load(server, "noise", ["--fingerprint", fingerprint], s)
            cpu_after = sum(cpu_seconds(pid) for pid in pids)
            after = snapshot(server)
        finally:
            if cap is not None:
                cap.close()
    handshakes = after["totals"]["handshakes_ok"] - before["totals"]["handshakes_ok"]
    rows = after.get("acceptors", [])
    return {
        "acceptors": acceptors,
        "conn_per_s": load["conn_per_s"],
        "server_cpu_us_per_conn": load["server_cpu_us_per_conn"],
        "acceptor_cpu_us_per_handshake": (cpu_after - cpu_before) / handshakes * 1e6
        if handshakes else None,
        "handshake_share": [round(r["handshakes_ok"] / max(1, after["totals"]
                                                            ["handshakes_ok"]), 3)
                            for r in rows],
        "machine_busy": load["machine_busy"],
        "errors": load["errors"],
    }


def measure(s: Settings, quota: float, directory: Path,
            modes: tuple[str, ...] = ("capped", "uncapped")) -> dict[str, Any]:
    server_key = directory / "server.key"
    keyfiles.save_private_key(server_key, StaticKeyPair.generate(os.urandom))
    fingerprint = keyfiles.load_private_key(server_key).fingerprint
    why_not = CpuCap.available()
    out: dict[str, Any] = {"quota_cores_per_acceptor": quota, "workers": s.workers,
                           "load_processes": s.load_processes,
                           "concurrency": s.concurrency, "duration_s": s.duration}
    for mode in modes:
        if mode == "capped" and why_not is not None:
            out[mode] = {"skipped": why_not}
            continue
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for _ in range(s.repeats):
            for acceptors in (1, 2):
                runs[acceptors].append(one_run(directory, acceptors, s, fingerprint,
                                               quota if mode == "capped" else None))
        conn = {n: median([r["conn_per_s"] for r in v]) for n, v in runs.items()}
        out[mode] = {
            "conn_per_s": {str(n): v for n, v in conn.items()},
            "ratio_2_over_1": conn[2] / conn[1] if conn[1] else None,
            "acceptor_cpu_us_per_handshake": {
                str(n): median([r["acceptor_cpu_us_per_handshake"] or 0.0 for r in v])
                for n, v in runs.items()},
            "server_cpu_us_per_conn": {
                str(n): median([r["server_cpu_us_per_conn"] or 0.0 for r in v])
                for n, v in runs.items()},
            "machine_busy": {str(n): median([r["machine_busy"] for r in v])
                             for n, v in runs.items()},
            "errors": sum(r["errors"] for v in runs.values() for r in v),
            "runs": {str(n): v for n, v in runs.items()},
        }
    return out


def run(s: Settings, quota: float = DEFAULT_QUOTA, *, quick: bool = False) -> dict[str, Any]:
    """The section for ``make bench`` (``quick``: one uncapped pair, for the smoke test)."""
    with tempfile.TemporaryDirectory(prefix="handoffd-bench-acceptors-") as tmp:
        os.chmod(tmp, 0o755)
        return measure(s, quota, Path(tmp), ("uncapped",) if quick else
                       ("capped", "uncapped"))


def lines(r: dict[str, Any]) -> list[str]:
    """The table rows ``make bench`` prints."""
    out = []
    for mode in ("capped", "uncapped"):
        m = r.get(mode, {})
        if not m:
            continue
        if "skipped" in m:
            out.append(f"acceptors {mode}: skipped ({m.get('skipped', 'not run')})")
            continue
        cpu = m["acceptor_cpu_us_per_handshake"]
        out.append(f"acceptors {mode}"
                   + (f" ({r['quota_cores_per_acceptor']:g} core each)"
                      if mode == "capped" else "")
                   + f": 1 -> {m['conn_per_s']['1']:.0f}, 2 -> {m['conn_per_s']['2']:.0f} "
                   f"conn/s ({m['ratio_2_over_1']:.2f} x); acceptor CPU "
                   f"{cpu['1']:.0f} / {cpu['2']:.0f} us per handshake; cores busy "
                   f"{m['machine_busy']['1']:.2f} / {m['machine_busy']['2']:.2f}")
    return out


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: daemons stopped, cgroups gone


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quota", type=float, default=DEFAULT_QUOTA,
                        help="CPU of each acceptor in the capped runs, in cores")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    args = parser.parse_args(argv)
    base = Settings.quick() if args.quick else Settings.full()
    s = Settings(**{**vars(Settings.from_env(base)), "workers": args.workers,
                    "repeats": 1 if args.quick else args.repeats,
                    "duration": base.duration if args.quick else args.duration})
    result = run(s, args.quota, quick=args.quick)
    print(json.dumps(result, indent=2))
    print("\n".join(lines(result)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
