"""Helpers shared by the benchmark modules: contexts made in memory, quantiles, /proc readings."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from handoffd.core.context import AcceptorContext, InitiatorContext
from handoffd.core.credentials import StaticKeyPair

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def established_pair(server_key: StaticKeyPair) -> tuple[InitiatorContext, AcceptorContext]:
    """A Noise XX handshake run in memory (no I/O): both ends established."""
    initiator = InitiatorContext(static_key=None, server_fingerprint=server_key.fingerprint,
                                 clock=time.time, random=os.urandom)
    acceptor = AcceptorContext(static_key=server_key, allow_list=None, allow_anonymous=True,
                               clock=time.time, random=os.urandom)
    _, token1 = initiator.step(None)
    _, token2 = acceptor.step(token1)
    _, token3 = initiator.step(token2)
    acceptor.step(token3)
    return initiator, acceptor


def quantile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank quantile of an already sorted, non-empty sequence."""
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    """Resident set size in MiB."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE / 2**20


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """Direct child pids of a process."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
