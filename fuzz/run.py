"""Run every fuzz target for a bounded time and summarise; non-zero exit on any crash.

Usage (from the repository root; ``make fuzz`` does this)::

    FUZZ_SECONDS=60 .venv/bin/python fuzz/run.py [target ...]

Each target ``fuzz/fuzz_<name>.py`` runs as ``python -m fuzz.fuzz_<name>``
under libFuzzer with ``-max_total_time=FUZZ_SECONDS`` on its seed corpus
``fuzz/corpus/<name>/`` (minus the reproducers listed in
``fuzz/known_open.txt``; read-only: new inputs go to the git-ignored
``fuzz/artifacts/work/<name>/``).  Crashing inputs land in
``fuzz/artifacts/crash-<name>-*`` with the target's log next to them in
``fuzz/artifacts/<name>.log``.  libFuzzer stops a target at its first crash.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
ARTIFACTS = FUZZ_DIR / "artifacts"


@dataclass
class Result:
    """What one target's run reported."""

    target: str
    runs: int = 0
    coverage: int = 0
    features: int = 0
    corpus: int = 0
    crashes: tuple[str, ...] = ()
    seconds: float = 0.0
    returncode: int = 0


def targets() -> list[str]:
    """Every target in ``fuzz/``, by name (``fuzz_window.py`` -> ``window``)."""
    return sorted(p.stem.removeprefix("fuzz_") for p in FUZZ_DIR.glob("fuzz_*.py"))


def _last_int(pattern: str, log: str) -> int:
    found = re.findall(pattern, log)
    return int(found[-1]) if found else 0


def known_open() -> set[str]:
    """``<target>/<file>`` names of reproducers whose bug is reported but not fixed."""
    lines = (FUZZ_DIR / "known_open.txt").read_text().splitlines()
    return {line.split()[0] for line in lines if line.strip() and not line.startswith("#")}


def _seeds_without_open_crashes(target: str) -> Path:
    """A copy of the target's corpus minus known-open reproducers, which would stop
    libFuzzer at once and hide every other bug."""
    source = FUZZ_DIR / "corpus" / target
    seeds = ARTIFACTS / "seeds" / target
    shutil.rmtree(seeds, ignore_errors=True)
    seeds.mkdir(parents=True)
    skip = known_open()
    for path in sorted(source.glob("*")) if source.is_dir() else []:
        if f"{target}/{path.name}" not in skip:
            shutil.copyfile(path, seeds / path.name)
    return seeds


def run_target(target: str, seconds: int) -> Result:
    """Fuzz one target for ``seconds``; parse libFuzzer's statistics from its log."""
    work = ARTIFACTS / "work" / target
    work.mkdir(parents=True, exist_ok=True)
    seeds = _seeds_without_open_crashes(target)
    prefix = ARTIFACTS / f"crash-{target}-"
    before = set(ARTIFACTS.glob(f"crash-{target}-*"))
    command = [
        sys.executable, "-m", f"fuzz.fuzz_{target}", str(work), str(seeds),
        f"-max_total_time={seconds}", f"-artifact_prefix={prefix}", "-timeout=20",
        "-rss_limit_mb=2048", "-print_final_stats=1", "-max_len=8192",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    # A hang past the budget is a finding too, but never let one target stall the run.
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              errors="replace", timeout=seconds + 120)
        log, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout or b""
        err = expired.stderr or b""
        log = (out if isinstance(out, str) else out.decode(errors="replace")) + (
            err if isinstance(err, str) else err.decode(errors="replace"))
        log += "\nrun.py: target exceeded its time budget and was killed\n"
        returncode = -9
    elapsed = time.monotonic() - started
    (ARTIFACTS / f"{target}.log").write_text(log)
    crashes = tuple(sorted(str(p.relative_to(ROOT)) for p in
                           set(ARTIFACTS.glob(f"crash-{target}-*")) - before))
    return Result(
        target=target,
        runs=max(_last_int(r"stat::number_of_executed_units: (\d+)", log),
                 _last_int(r"Done (\d+) runs", log), _last_int(r"#(\d+)\s", log)),
        coverage=_last_int(r"cov: (\d+)", log),
        features=_last_int(r"ft: (\d+)", log),
        corpus=_last_int(r"corp: (\d+)/", log),
        crashes=crashes,
        seconds=elapsed,
        returncode=returncode,
    )


def summary(results: list[Result]) -> str:
    """The table printed at the end (also pasted into fuzz/README.md)."""
    lines = [f"{'target':14} {'runs':>10} {'cov':>6} {'ft':>7} {'corpus':>7} {'secs':>6}  crashes",
             "-" * 72]
    for r in results:
        failed = bool(r.crashes) or r.returncode != 0
        crash = ", ".join(r.crashes) if r.crashes else (f"exit {r.returncode}" if failed else "0")
        lines.append(f"{r.target:14} {r.runs:>10} {r.coverage:>6} {r.features:>7} "
                     f"{r.corpus:>7} {r.seconds:>6.0f}  {crash}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run the named targets (default: all); 1 if any crashed or failed to run."""
    seconds = int(os.environ.get("FUZZ_SECONDS", "60"))
    chosen = argv or targets()
    unknown = sorted(set(chosen) - set(targets()))
    if unknown:
        print(f"unknown targets: {', '.join(unknown)}; known: {', '.join(targets())}")
        return 2
    ARTIFACTS.mkdir(exist_ok=True)
    results = []
    for target in chosen:
        print(f"fuzzing {target} for {seconds} s ...", flush=True)
        result = run_target(target, seconds)
        results.append(result)
        for crash in result.crashes:
            print(f"  CRASH {crash} (log: fuzz/artifacts/{target}.log)", flush=True)
    print(summary(results))
    failed = [r.target for r in results if r.crashes or r.returncode != 0]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}; reproduce with "
              f"`.venv/bin/python -m fuzz.fuzz_<target> <crash file>`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
