"""Profile one contender under the benchmark's own load: py-spy top frames per server process.

``python -m bench.profile [handoffd|inprocess|tls] [--seconds 6] [--out DIR]``

Starts the server as ``make bench`` does (same N, same load generator), runs
``py-spy record`` (raw collapsed stacks; trio's epoll wait dropped as idle) on every server
process for the load window, and prints each process's top frames by self
time, with its CPU per connection read from ``/proc``.  Needs ``py-spy`` (the
``bench`` extra) and ptrace rights over the servers (root, or
``kernel.yama.ptrace_scope`` = 0).

py-spy samples wall clock: on a saturated machine a process that is runnable
but preempted is still sampled where it stands, typically in the syscall that
woke another process (``sendmsg``, ``send``).  Read the per-process CPU
figures beside the frames.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import run as bench_run
from bench.common import cpu_seconds
from handoffd import keyfiles
from handoffd.core.credentials import StaticKeyPair

SAMPLE_RATE = 300
IDLE_FRAME = "EpollIOManager.get_events (trio/_core/_io_epoll.py)"
"""trio's epoll_wait: with --nonblocking py-spy cannot tell idle from busy, so it is dropped."""


def top_frames(raw: Path, count: int) -> tuple[int, list[tuple[float, str]]]:
    """Samples in a py-spy raw file and its ``count`` top frames by self share."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")
                  if not f.startswith("process ")]
        if frames and frames[-1] == IDLE_FRAME:
            continue  # waiting for I/O
        total += int(samples)
        if frames:
            own[frames[-1]] += int(samples)
    return total, [(n / total, frame) for frame, n in own.most_common(count)] if total else []


def main(argv: list[str] | None = None) -> int:
    """Run the load against one contender under py-spy and print the top frames."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("handoffd", "inprocess", "tls"), nargs="?",
                        default="handoffd")
    parser.add_argument("--seconds", type=float, default=6.0, help="load window")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, help="keep the raw py-spy files here")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    s = bench_run.Settings.from_env(bench_run.Settings.full())
    s.duration, s.repeats = args.seconds, 1
    with tempfile.TemporaryDirectory(prefix="handoffd-profile-") as tmp:
        directory = Path(tmp)
        out = args.out or directory
        out.mkdir(parents=True, exist_ok=True)
        key = directory / "server.key"
        keyfiles.save_private_key(key, StaticKeyPair.generate(os.urandom))
        load = ["--fingerprint", keyfiles.load_private_key(key).fingerprint]
        if args.kind == "handoffd":
            server, load_kind = bench_run.start_handoffd(directory, s.workers), "noise"
        elif args.kind == "inprocess":
            server, load_kind = bench_run.start_prefork("noise", s.workers, key, None), "noise"
        else:
            cert, tls_key = bench_run.make_tls_cert(directory)
            server, load_kind = bench_run.start_prefork("tls", s.workers, tls_key, cert), "tls"
            load = ["--cafile", str(cert)]
        try:
            pids = server.pids()
            window = s.warmup + s.duration + 2
            spies = [subprocess.Popen(
                [spy, "record", "--nonblocking", "-r", str(SAMPLE_RATE), "-f", "raw",
                 "-d", str(int(window)), "-p", str(pid), "-o", str(out / f"{pid}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]
            before = {pid: cpu_seconds(pid) for pid in pids}
            result = bench_run.run_load(server, load_kind, load, s)
            after = {pid: cpu_seconds(pid) for pid in pids}
            for process in spies:
                process.wait(timeout=window + 60)
        finally:
            server.stop()
        connections = result["conn_per_s"] * s.duration
        print(f"{args.kind}: {result['conn_per_s']:.0f} conn/s, server CPU "
              f"{result['server_cpu_us_per_conn']:.0f} us/conn in the window")
        for pid in pids:
            total, frames = top_frames(out / f"{pid}.txt", args.top)
            share = (after[pid] - before[pid]) / connections * 1e6 if connections else 0.0
            print(f"\npid {pid}: {share:.0f} us CPU per connection (whole run), "
                  f"{total} busy samples; top frames by self share of those:")
            for fraction, frame in frames:
                print(f"  {100 * fraction:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
