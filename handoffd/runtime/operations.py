"""The acceptor's operations side: what ``handoffd status`` and the metrics show
(:func:`snapshot`, merged over an acceptor set by :func:`gathered_snapshot`), the
sockets that serve them (:func:`serve_operations`: control, metrics, and external
workers' registrations) and systemd's watchdog and status line.  It reads the daemon
and changes nothing in it (but taking its status socket to acceptor 0, once)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import trio

from handoffd.core.admission import Stage
from handoffd.runtime import control
from handoffd.runtime.acceptor_stats import merge_snapshots
from handoffd.runtime.binding import show_address
from handoffd.runtime.pool import WorkerState

if TYPE_CHECKING:
    from handoffd.runtime.daemon import Daemon


def snapshot(daemon: Daemon) -> dict[str, Any]:
    """This acceptor's part of what ``handoffd status`` shows, as plain data (all of
    it with one acceptor; see :func:`gathered_snapshot`)."""
    workers = [*daemon.pool.workers.values(), *daemon.pool.retiring,
               *daemon.pool.external.values(), *daemon.pool.guests.values()]
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.time() - daemon.stats.started, 3),
        "state": "stopping" if daemon.pool.stopping else "running",
        "key_parking": daemon.parking.mode if daemon.parking else None,
        "privilege_separation": daemon.privsep,
        "listen": [show_address(h, p) for h, p in daemon.addresses],
        "tls_listen": [show_address(h, p) for h, p in daemon.tls_addresses],
        "workers": [
            {
                "index": w.index,
                "pid": w.pid,
                "uid": getattr(w.process, "uid", None),
                "state": w.state.value,
                "in_flight": len(w.in_flight),
                "handled": w.handled,
                "active": w.active,
                "restarts": daemon.pool.restarts[w.index],
                "external": w.external,
                "guest": w.guest,
                "acceptor": daemon.acceptor_index,
            }
            for w in sorted(workers, key=lambda w: (w.index, w.started))
        ],
        "totals": {
            "accepted": daemon.stats.accepted,
            "handshakes_ok": daemon.stats.handshakes_ok,
            "handoffs": daemon.stats.handoffs,
            "handoff_batches": daemon.stats.handoff_batches,
            "batched_handoffs": daemon.stats.batched_handoffs,
            "ack_batches": daemon.stats.ack_batches,
            "acked": daemon.stats.acked,
            "redelivered": daemon.stats.redelivered,
            "died_after_claim": daemon.stats.died_after_claim,
            "died_unclaimed": daemon.stats.died_unclaimed,
            "lost": daemon.stats.lost,
            "worker_restarts": daemon.stats.worker_restarts,
            "accept_errors": daemon.stats.accept_errors,
            "registrations_refused": daemon.registrations.refused,
            "shed": daemon.stats.shed,
            "control_busy_refused": daemon.control_stats.busy_refused,
            "control_accept_errors": daemon.control_stats.accept_errors,
            "metrics_busy_refused": daemon.metrics_stats.busy_refused,
            "metrics_accept_errors": daemon.metrics_stats.accept_errors,
            "refused_per_source": daemon.stats.refused_per_source,
            "evicted": daemon.stats.evicted,
            "first_token_timeouts": daemon.stats.first_token_timeouts,
            "unavailable": daemon.stats.unavailable,
            "sessions_closed": daemon.stats.sessions_ended["closed"],
            "sessions_app_error": daemon.stats.sessions_ended["app_error"],
            "sessions_peer_error": daemon.stats.sessions_ended["peer_error"],
            "sessions_cut_at_drain": daemon.stats.sessions_ended["cut_at_drain"],
            "sessions_lost_with_worker": daemon.stats.sessions_ended["lost_with_worker"],
            "session_reports_refused": daemon.stats.session_reports_refused,
        },
        "sessions_active": sum(w.active for w in workers if w.state is not WorkerState.DEAD),
        "handshake_slots": {
            "capacity": daemon.admission.capacity,
            "first_token": daemon.admission.count(Stage.FIRST_TOKEN),
            "handshake": daemon.admission.count(Stage.HANDSHAKE),
            "waiting_for_worker": daemon.admission.count(Stage.WAITING_FOR_WORKER),
        },
        "waiting_for_worker": daemon.dispatcher.waiting,
        "handshake_failures": dict(daemon.stats.handshake_failures),
        "refused_by_worker": dict(daemon.stats.refused_by_worker),
        "handoff_latency_us": daemon.stats.latency_quantiles(),
        "handoff_latency_seconds": daemon.stats.latency_summary(),
    }


async def gathered_snapshot(daemon: Daemon) -> dict[str, Any]:
    """What ``handoffd status`` and the metrics show: this acceptor's
    :func:`snapshot`, and with several acceptors (this one is acceptor 0) every
    other's, asked over the supervisor's socketpairs and merged
    (:func:`merge_snapshots`).  An acceptor that does not answer within a second
    (starting, dead, stuck) is listed as ``unreachable`` and counted in nothing."""
    own = snapshot(daemon)
    others = await daemon.peers.gather()
    return merge_snapshots(own, list(daemon.stats.latencies), others)


def peer_report(daemon: Daemon) -> dict[str, Any]:
    """What this acceptor (index > 0) answers acceptor 0: its snapshot and its recent
    handoff latencies."""
    return {"snapshot": snapshot(daemon),
            "latencies_us": [round(x * 1e6, 1) for x in daemon.stats.latencies]}


def status_line(daemon: Daemon) -> str:
    """The one-line status systemd shows."""
    ready = sum(1 for w in daemon.pool.workers.values() if w.state is WorkerState.READY)
    return (f"{ready}/{daemon.pool.target_count} workers ready, {daemon.stats.acked} handoffs, "
            f"{sum(daemon.stats.handshake_failures.values())} handshake failures")


async def serve_operations(daemon: Daemon, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
    """Acceptor 0: the registration, control and metrics sockets, until the hand-over
    (``operations_scope``).  Another acceptor: answer acceptor 0's asks for figures."""
    assert daemon.bound is not None
    with daemon.operations_scope:
        async with trio.open_nursery() as nursery:
            if daemon.acceptor_index != 0:
                # Acceptor 0 serves these sockets for the whole set and asks this one
                # for its figures over the supervisor's socketpair.
                if daemon.peer_fd is not None:
                    nursery.start_soon(daemon.peers.answer, daemon.peer_fd,
                                       lambda: peer_report(daemon))
                    daemon.peer_fd = None
                task_status.started()
                return
            if daemon.bound.register is not None:
                await nursery.start(daemon.registrations.serve, daemon.bound.register)
            if daemon.bound.control is not None:
                await nursery.start(control.serve_control, daemon, daemon.bound.control,
                                    daemon.control_stats)
            if daemon.bound.metrics is not None:
                await nursery.start(control.serve_metrics, daemon, daemon.bound.metrics,
                                    daemon.metrics_stats)
            task_status.started()


async def systemd_watchdog(daemon: Daemon, period: float) -> None:
    """systemd's watchdog ping and status line, every ``period`` seconds."""
    assert daemon.notifier is not None
    while True:
        daemon.notifier.watchdog()
        daemon.notifier.status(status_line(daemon))
        await trio.sleep(period)
