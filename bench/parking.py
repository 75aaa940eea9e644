"""Cost of one park-and-claim cycle (acceptor park -> worker claim -> acceptor release).

Run as a file (``bench/`` is not a package here)::

    .venv/bin/python bench/parking.py [--cycles 20000] [--batch 1] [--mode keyring|fallback]

The worker is a forked process that adopts its grant; refs and keys cross pipes,
so the figure includes two pipe round trips' worth of syscalls per batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handoffd.kernel.parking import AcceptorParking, WorkerParking

REF_SIZE = 13


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def run(mode: str, cycles: int, batch: int) -> float:
    """Microseconds per park-and-claim cycle."""
    parking = AcceptorParking.open(slots_per_worker=batch, mode=mode)
    worker_id = os.urandom(16)
    grant = parking.add_worker(worker_id)
    refs_r, refs_w = os.pipe()
    keys_r, keys_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(refs_w)
            os.close(keys_r)
            worker = WorkerParking.adopt(grant.env)
            os.write(keys_w, b"!")
            while refs := os.read(refs_r, REF_SIZE * batch):
                os.write(keys_w, b"".join(worker.claim(refs[i:i + REF_SIZE])
                                          for i in range(0, len(refs), REF_SIZE)))
        finally:
            os._exit(0)
    os.close(refs_r)
    os.close(keys_w)
    for fd in grant.pass_fds:
        os.close(fd)
    _read_exactly(keys_r, 1)
    parking.worker_adopted(worker_id)
    began = time.perf_counter()
    for _ in range(cycles // batch):
        parked = [parking.park(worker_id) for _ in range(batch)]
        os.write(refs_w, b"".join(ref for ref, _ in parked))
        if _read_exactly(keys_r, 32 * batch) != b"".join(key for _, key in parked):
            raise SystemExit("claimed keys differ")
        for ref, _ in parked:
            parking.release(worker_id, ref)
    elapsed = time.perf_counter() - began
    os.close(refs_w)
    os.waitpid(pid, 0)
    os.close(keys_r)
    parking.close()
    return elapsed / (cycles // batch * batch) * 1e6


def main() -> None:
    """Print µs per cycle for the chosen mode(s) and batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mode", choices=("keyring", "fallback", "both"), default="both")
    args = parser.parse_args()
    modes = ("keyring", "fallback") if args.mode == "both" else (args.mode,)
    for mode in modes:
        us = run(mode, args.cycles, args.batch)
        print(f"{mode:8} batch={args.batch:<3} {args.cycles} cycles: {us:7.1f} us/cycle")


if __name__ == "__main__":
    main()
