"""The acceptor's counters and handoff latencies (:class:`Stats`), and how acceptor 0
folds the other acceptors' snapshots into the one ``status`` shows
(:func:`merge_snapshots`)."""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any


class LatencyWindow(deque[float]):
    """The most recent handoff latencies (seconds, at most ``maxlen``) for the quantiles,
    and the running ``total`` and ``observed`` (sum and number) of every latency ever
    appended, a Prometheus summary's ``_sum`` and ``_count``.  Only :meth:`append` keeps
    them (``deque.count`` is the deque's own method)."""

    def __init__(self, maxlen: int) -> None:
        super().__init__((), maxlen)
        self.total = 0.0
        self.observed = 0

    def append(self, latency: float) -> None:
        super().append(latency)
        self.total += latency
        self.observed += 1


class Stats:
    """Counters and a latency sample for status and metrics."""

    def __init__(self) -> None:
        self.started = time.time()
        self.accepted = 0
        self.handshakes_ok = 0
        self.handshake_failures: Counter[str] = Counter()
        self.handoffs = 0
        self.handoff_batches = 0  # HANDOFF_BATCH messages (each carrying several handoffs)
        self.batched_handoffs = 0  # handoffs sent in them
        self.ack_batches = 0  # ACK_BATCH messages received (a worker answered several)
        self.acked = 0
        self.refused_by_worker: Counter[str] = Counter()
        self.redelivered = 0
        self.died_after_claim = 0
        self.died_unclaimed = 0
        self.lost = 0
        self.worker_restarts = 0
        self.accept_errors = 0
        self.shed = 0
        self.refused_per_source = 0
        self.evicted = 0
        self.first_token_timeouts = 0
        self.unavailable = 0
        self.sessions_ended: Counter[str] = Counter()  # by Outcome name, lower case
        self.session_reports_refused = 0
        self.latencies = LatencyWindow(maxlen=4096)

    def latency_quantiles(self, scale: float = 1e6) -> dict[str, float | None]:
        """p50 and p99 of the recent handoff latencies, in microseconds (``scale``: what a
        second counts as; 1.0 for seconds)."""
        return self.quantiles_of(self.latencies, scale)

    @staticmethod
    def quantiles_of(latencies: Iterable[float], scale: float = 1e6
                     ) -> dict[str, float | None]:
        """p50 and p99 of ``latencies`` (seconds), times ``scale``."""
        sample = sorted(latencies)
        if not sample:
            return {"p50": None, "p99": None}

        def q(p: float) -> float:
            return sample[min(len(sample) - 1, int(p * len(sample)))] * scale

        return {"p50": q(0.50), "p99": q(0.99)}

    def latency_summary(self) -> dict[str, float | None]:
        """The handoff latency as a summary, in seconds: the running ``sum`` and ``count``
        of every handoff since start, p50 and p99 of the recent ones (None: none yet)."""
        return {"sum": self.latencies.total, "count": self.latencies.observed,
                **self.latency_quantiles(1.0)}


_SUMMED = ("sessions_active", "waiting_for_worker")
_MERGED_COUNTERS = ("handshake_failures", "refused_by_worker")


def merge_snapshots(own: dict[str, Any], own_latencies: list[float],
                    others: dict[int, dict[str, Any] | None]) -> dict[str, Any]:
    """Acceptor 0's snapshot ``own`` with the other acceptors' reports folded in.

    Everything a single acceptor reports keeps its key and meaning for the whole set:
    totals, handshake slots (capacity: ``max_handshakes`` per acceptor, summed), the
    per-outcome counters and gauges are summed; ``workers`` lists every worker once
    (:func:`merge_worker_rows`: under the acceptor that spawned it, with what every
    acceptor handed it summed); the handoff latency's p50 and p99 are taken over every
    acceptor's recent handoffs, its sum and count summed.  ``pid``, ``uptime_s`` and
    ``state`` stay acceptor 0's.  ``acceptors`` lists each acceptor's own figures:
    ``{"index", "pid", "state", "workers", "feeds", "accepted", "handshakes_ok",
    "handoffs", "acked", "in_flight", "sessions_active"}`` (``workers``: its own ready
    ones; ``feeds``: every ready worker it hands off to, its own and the guests), or
    ``{"index", "state": "unreachable"}``.
    """
    merged: dict[str, Any] = json.loads(json.dumps(own))  # a deep copy of plain data
    samples = list(own_latencies)
    rows = [_acceptor_row(0, own)]
    for index in sorted(others):
        report = others[index]
        snapshot = report.get("snapshot") if isinstance(report, dict) else None
        if not isinstance(snapshot, dict):
            rows.append({"index": index, "state": "unreachable"})
            continue
        rows.append(_acceptor_row(index, snapshot))
        merged["workers"] = [*merged["workers"], *snapshot.get("workers", [])]
        for key, value in snapshot.get("totals", {}).items():
            merged["totals"][key] = merged["totals"].get(key, 0) + value
        for key, value in snapshot.get("handshake_slots", {}).items():
            merged["handshake_slots"][key] = merged["handshake_slots"].get(key, 0) + value
        for key in _SUMMED:
            merged[key] = merged.get(key, 0) + snapshot.get(key, 0)
        for key in _MERGED_COUNTERS:
            counter = Counter(merged.get(key, {}))
            counter.update(snapshot.get(key, {}))
            merged[key] = dict(counter)
        latency = snapshot.get("handoff_latency_seconds", {})
        merged["handoff_latency_seconds"]["sum"] += latency.get("sum", 0.0)
        merged["handoff_latency_seconds"]["count"] += latency.get("count", 0)
        samples.extend(x / 1e6 for x in report.get("latencies_us", ()))  # type: ignore[union-attr]
    if len(rows) > 1:
        quantiles = Stats.quantiles_of(samples, 1.0)
        merged["handoff_latency_seconds"].update(quantiles)
        merged["handoff_latency_us"] = Stats.quantiles_of(samples, 1e6)
    merged["workers"] = merge_worker_rows(merged["workers"])
    merged["acceptors"] = rows
    return merged


_PER_CHANNEL = ("in_flight", "handled", "active")
_BY_ACCEPTOR = ("in_flight", "handled")


def merge_worker_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each worker once.  In the shared pool every acceptor reports every worker: its
    own (``guest`` false) and the others' (``guest`` true), each with what *it* handed
    that worker.  The row kept is the spawning acceptor's, with ``in_flight``,
    ``handled`` and ``active`` summed over every acceptor and ``in_flight_by_acceptor``
    and ``handled_by_acceptor`` added (keyed by acceptor index); a guest row stands
    alone only while its own acceptor does not answer."""
    own: dict[object, dict[str, Any]] = {}
    guests: list[dict[str, Any]] = []
    merged: list[dict[str, Any]] = []
    for row in rows:
        if row.get("guest"):
            guests.append(row)
            continue
        row = dict(row)
        for key in _BY_ACCEPTOR:
            row[f"{key}_by_acceptor"] = {str(row.get("acceptor", 0)): row.get(key, 0)}
        merged.append(row)
        if row.get("pid") is not None:
            own[row["pid"]] = row
    for guest in guests:
        target = own.get(guest.get("pid"))
        if target is None:
            target = dict(guest, **{f"{key}_by_acceptor": {} for key in _BY_ACCEPTOR})
            for key in _PER_CHANNEL:
                target[key] = 0
            merged.append(target)
            own[guest.get("pid")] = target
        for key in _PER_CHANNEL:
            target[key] = target.get(key, 0) + guest.get(key, 0)
        for key in _BY_ACCEPTOR:
            target[f"{key}_by_acceptor"][str(guest.get("acceptor", 0))] = guest.get(key, 0)
    return merged


def _acceptor_row(index: int, snapshot: dict[str, Any]) -> dict[str, Any]:
    totals = snapshot.get("totals", {})
    workers = snapshot.get("workers", [])
    return {"index": index, "pid": snapshot.get("pid"), "state": snapshot.get("state"),
            "workers": sum(1 for w in workers if w.get("state") == "ready"
                           and not w.get("guest")),
            "feeds": sum(1 for w in workers if w.get("state") == "ready"),
            **{key: totals.get(key, 0) for key in ("accepted", "handshakes_ok", "handoffs",
                                                     "acked")},
            "in_flight": sum(w.get("in_flight", 0) for w in workers),
            "sessions_active": snapshot.get("sessions_active", 0)}
