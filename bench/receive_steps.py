"""Each synchronous step of the worker's receive path, timed inside real worker processes.

``python -m bench.receive_steps [--workers 2] [--contexts 2000] [--rounds 3]
[--paced 1000] [--rate 500]`` prints JSON.

The acceptor's side is ``bench.handoff_path``'s (the daemon's building blocks, real
loopback connections, contexts established in memory beforehand); the workers run
``bench.receive_steps_app:stamp``, which wraps each step of the receive path with
``time.thread_time_ns`` (per-thread CPU: the step as it runs between other processes,
with whatever caches it finds) and writes the samples at exit.  Two phases, each with
fresh workers:

* ``saturated``: ``--rounds`` x ``--contexts`` handoffs with every worker's window full,
  batched as the daemon does (``--no-batch``: one HANDOFF per message);
* ``paced``: ``--paced`` handoffs at ``--rate`` per second, round robin: one message at a
  time, each into a worker that was asleep (cold).

Per step: ``calls``, ``median_us``, ``mean_us``, ``p90_us`` per call and ``per_handoff_us``
(the step's total CPU over the phase divided by the handoffs imported: per-message
steps are shared by a batch's handoffs).  ``worker_cpu_us_per_handoff`` is the workers'
whole CPU (``/proc``) over the phase, timing overhead included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench.common import cpu_seconds
from bench.handoff_path import (
    REPO,
    BenchWorker,
    Driver,
    make_connections,
    paced_latencies,
    read_stamps,
    saturate,
)
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.handoff import Hello, Kind
from handoffd.kernel.parking import AcceptorParking
from handoffd.runtime.daemon import spawn_worker

APP = "bench.receive_steps_app:stamp"
ENV_DIR = "HANDOFFD_RECEIVE_STEPS_DIR"
# The order of the table: the path as it runs (nested totals after their parts).
ORDER = ("channel_receive", "channel_receive_empty", "channel_parse", "header_parse",
         "attributes", "pidfd_check", "sender_check", "decode",
         "decode_batch", "entries_total", "tcp_stream_socket", "claim", "sealed_mechanism",
         "open_sealed", "import_session", "import_total", "ack_send", "from_stdlib_socket",
         "socket_stream", "secure_stream", "stream_total")


def summarise(samples: dict[str, list[int]], handoffs: int) -> dict[str, dict[str, float]]:
    """Per-step figures in µs (see the module docstring)."""
    steps = sorted(samples, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))
    out = {}
    for step in steps:
        values = sorted(samples[step])
        out[step] = {
            "calls": len(values),
            "median_us": statistics.median(values) / 1e3,
            "mean_us": statistics.fmean(values) / 1e3,
            "p90_us": values[int(0.9 * (len(values) - 1))] / 1e3,
            "per_handoff_us": sum(values) / 1e3 / max(1, handoffs),
        }
    return out


async def phase(name: str, *, workers: int, rounds: int, contexts: int, paced: int,
                rate: float, batch: bool) -> dict[str, Any]:
    """One phase with fresh workers; their samples merged."""
    server_key = StaticKeyPair.generate(os.urandom)
    parking = AcceptorParking.open(slots_per_worker=8)
    spawned: list[BenchWorker] = []
    with tempfile.TemporaryDirectory(prefix="receive-steps-") as out:
        os.environ[ENV_DIR] = out
        try:
            for _ in range(workers):
                worker_id = os.urandom(16)
                process, channel = spawn_worker(
                    parking, worker_id, APP, ["--pythonpath", str(REPO), "--log-level",
                                              "warning"])
                spawned.append(BenchWorker(worker_id, process, channel))
        finally:
            del os.environ[ENV_DIR]
        try:
            for w in spawned:
                with trio.fail_after(30):
                    message = await w.channel.receive()
                assert message.kind == Kind.HELLO
                assert Hello.decode(message.payload).pid == w.process.pid
                parking.worker_adopted(w.worker_id)
            driver = Driver(parking, spawned)
            handed = 0
            cpu = 0.0
            async with trio.open_nursery() as nursery:
                for w in spawned:
                    nursery.start_soon(driver.read_acks, w)
                if name == "saturated":
                    for _ in range(rounds):
                        connections = make_connections(server_key, contexts)
                        driver.acked, driver.expected = 0, len(connections)
                        driver.all_acked = trio.Event()
                        before = sum(cpu_seconds(w.process.pid) for w in spawned)
                        with trio.fail_after(120):
                            await saturate(driver, spawned, connections, batch)
                        cpu += sum(cpu_seconds(w.process.pid) for w in spawned) - before
                        handed += len(connections)
                        read_stamps(connections)
                else:
                    before = sum(cpu_seconds(w.process.pid) for w in spawned)
                    latencies = await paced_latencies(driver, spawned, server_key, paced, rate,
                                                      time.monotonic() + 120)
                    cpu += sum(cpu_seconds(w.process.pid) for w in spawned) - before
                    handed += len(latencies)
                nursery.cancel_scope.cancel()
            for w in spawned:  # end of channel: each worker drains, exits and writes its file
                w.channel.close()
            with trio.move_on_after(20):
                for w in spawned:
                    await w.process.wait()
        finally:
            for w in spawned:
                if w.process.returncode is None:
                    w.process.kill()
                    await w.process.wait()
                w.channel.close()
            parking.close()
        samples: dict[str, list[int]] = {}
        for file in Path(out).glob("*.json"):
            for step, values in json.loads(file.read_text()).items():
                samples.setdefault(step, []).extend(values)
    imported = len(samples.get("import_total", ())) or handed
    return {"handoffs": handed, "imported": imported,
            "worker_cpu_us_per_handoff": cpu / max(1, handed) * 1e6,
            "steps": summarise(samples, imported)}


async def run(workers: int = 2, contexts: int = 2000, rounds: int = 3, paced: int = 1000,
              rate: float = 500.0, batch: bool = True) -> dict[str, Any]:
    """Both phases; plain data."""
    result: dict[str, Any] = {"workers": workers, "batching": batch}
    for name in ("saturated", "paced"):
        if (name == "saturated" and rounds) or (name == "paced" and paced):
            result[name] = await phase(name, workers=workers, rounds=rounds, contexts=contexts,
                                       paced=paced, rate=rate, batch=batch)
    return result


def table(result: dict[str, Any]) -> str:
    """A Markdown table: median / per-handoff µs per step for each phase."""
    phases = [p for p in ("saturated", "paced") if p in result]
    steps: list[str] = []
    for p in phases:
        steps += [s for s in result[p]["steps"] if s not in steps]
    head = "| step | " + " | ".join(f"{p} median | {p} per handoff" for p in phases) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(phases))]
    lines.append("| worker CPU per handoff (whole process) | " + " | ".join(
        f"- | {result[p]['worker_cpu_us_per_handoff']:.0f}" for p in phases) + " |")
    for step in steps:
        cells = []
        for p in phases:
            figures = result[p]["steps"].get(step)
            cells += ([f"{figures['median_us']:.1f}", f"{figures['per_handoff_us']:.1f}"]
                      if figures else ["-", "-"])
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' results as one: each figure the median over the runs (a noisy,
    shared machine: repeat, take medians)."""
    out: dict[str, Any] = {"runs": len(results)}
    for p in ("saturated", "paced"):
        runs = [r[p] for r in results if p in r]
        if not runs:
            continue
        steps: dict[str, dict[str, float]] = {}
        for step in {s for r in runs for s in r["steps"]}:
            have = [r["steps"][step] for r in runs if step in r["steps"]]
            steps[step] = {k: statistics.median(f[k] for f in have) for k in have[0]}
        out[p] = {"worker_cpu_us_per_handoff":
                  statistics.median(r["worker_cpu_us_per_handoff"] for r in runs),
                  "steps": dict(sorted(steps.items(), key=lambda i: ORDER.index(i[0])
                                       if i[0] in ORDER else len(ORDER)))}
    return out


def main(argv: list[str] | None = None) -> None:
    """Run and print the result as JSON (``--table``: as a Markdown table)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--contexts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paced", type=int, default=1000, help="paced handoffs (0: none)")
    parser.add_argument("--rate", type=float, default=500.0, help="paced handoffs per second")
    parser.add_argument("--no-batch", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="no run: the median over these saved results")
    args = parser.parse_args(argv)
    if args.combine:
        result = combine([json.loads(Path(f).read_text()) for f in args.combine])
        print(table(result) if args.table else json.dumps(result))
        return
    result = trio.run(lambda: run(args.workers, args.contexts, args.rounds, args.paced,
                                  args.rate, batch=not args.no_batch))
    if args.table:
        print(table(result))
    else:
        json.dump(result, sys.stdout)
        print()


if __name__ == "__main__":
    main()
