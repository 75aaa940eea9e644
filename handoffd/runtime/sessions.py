"""Session accounting: how many sessions are open, and how each one ended.

A worker keeps a :class:`SessionTally` and sends it whole (a SESSIONS message,
``docs/HANDOFF.md``) whenever it changes; the acceptor keeps each worker's latest
report and, through :class:`SessionLedger`, the counts of workers that are gone.
Reports are cumulative, so one that is lost, coalesced or cut off by the worker's
death costs nothing the next one does not repair.

A worker reports only on its own sessions, and the acceptor checks every report
against what it knows: no count may go down, and a worker cannot have more
sessions (open plus ended) than handoffs it acknowledged.  A report that fails is
refused (``SESSION_REPORT_INVALID``), counted and logged, never fatal: a
compromised worker can misreport how its own sessions ended, nothing more.
"""

from __future__ import annotations

from collections import Counter

import trio

from handoffd.core.handoff import OUTCOMES, Sessions
from handoffd.minor import Minor
from handoffd.status import GSS_S_FAILURE, GSSError

DIED_WITH_WORKER = "died_with_worker"
"""Sessions still open in a worker's last report when it died (acceptor-side only)."""

ENDED_OUTCOMES = (*OUTCOMES, DIED_WITH_WORKER)
"""Every outcome ``handoffd status`` and the metrics count, in display order."""


class SessionTally:
    """The worker's side: counts updated synchronously (a session cancelled at drain
    still counts), ``changed`` set for the task that sends them."""

    def __init__(self) -> None:
        self.active = 0
        self.ended: Counter[str] = Counter()
        self.changed = trio.Event()

    def start(self) -> None:
        """A session began (its handoff was acknowledged)."""
        self.active += 1
        self.changed.set()

    def end(self, outcome: str) -> None:
        """A session ended with ``outcome`` (one of :data:`OUTCOMES`)."""
        assert outcome in OUTCOMES, outcome
        self.active -= 1
        self.ended[outcome] += 1
        self.changed.set()

    def snapshot(self) -> Sessions:
        """The tally as a SESSIONS payload; re-arms ``changed``."""
        if self.changed.is_set():
            self.changed = trio.Event()
        return Sessions(self.active, *(self.ended[outcome] for outcome in OUTCOMES))


def check_report(previous: Sessions | None, report: Sessions, acknowledged: int) -> None:
    """Refuse a report that cannot be true of a worker that acknowledged
    ``acknowledged`` handoffs and reported ``previous`` before."""
    total = report.active + sum(report.ended().values())
    if total > acknowledged:
        raise GSSError(GSS_S_FAILURE, Minor.SESSION_REPORT_INVALID,
                       f"{total} sessions reported, {acknowledged} handoffs acknowledged")
    if previous is not None:
        fell = [o for o, n in report.ended().items() if n < previous.ended()[o]]
        if fell:
            raise GSSError(GSS_S_FAILURE, Minor.SESSION_REPORT_INVALID,
                           f"{', '.join(fell)} went down")


class SessionLedger:
    """The acceptor's side: what workers that are gone reported last, and how many
    reports were refused."""

    def __init__(self) -> None:
        self.retired: Counter[str] = Counter()
        self.refused_reports = 0

    def worker_gone(self, last: Sessions | None) -> int:
        """Fold a dead worker's last report in; returns its sessions that were still
        open (they ended with the worker)."""
        if last is None:
            return 0
        self.retired.update(last.ended())
        self.retired[DIED_WITH_WORKER] += last.active
        return last.active

    def totals(self, reports: list[Sessions | None]) -> dict[str, object]:
        """Open and ended sessions of the live workers' ``reports`` and the retired ones."""
        ended = Counter(self.retired)
        active = 0
        for report in reports:
            if report is not None:
                active += report.active
                ended.update(report.ended())
        return {"active": active,
                "ended": {outcome: ended[outcome] for outcome in ENDED_OUTCOMES},
                "reports_refused": self.refused_reports}
