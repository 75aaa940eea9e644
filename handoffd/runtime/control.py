"""Operations endpoints: the control socket (``handoffd status``) and Prometheus metrics.

Control protocol: connect to the Unix stream socket, send one JSON line
``{"command": "status"}``, read one JSON line back, done.  The socket is
created mode 0600: status is for the daemon's own user (and root).

Metrics: a minimal HTTP/1.0 responder on ``[control] metrics`` serving the
Prometheus text exposition format on ``/metrics`` (and ``/``); other paths are 404,
methods other than GET and HEAD 405.

Both endpoints stay out of the clients' way under a local flood: each serves at most
``[control] max_connections`` connections at once (one more is accepted and closed at
once with a short "busy" answer, counted in :class:`EndpointStats`), each connection has
``[control] timeout`` seconds for its request and answer, and when accept() fails for
lack of fds a reserved fd (:class:`~handoffd.kernel.fdreserve.FdReserve`) sheds the
pending connection instead of leaving it in the backlog.  Both are logged at most once
per 10 s with a count (:class:`~handoffd.logs.ThrottledLog`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import resource
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from handoffd import __version__
from handoffd.kernel.fdreserve import CAPACITY_ERRNOS, SHED_ERRNOS, FdReserve
from handoffd.logs import ThrottledLog
from handoffd.minor import Minor
from handoffd.runtime.pool import WorkerState
from handoffd.status import GSS_S_UNAVAILABLE, GSSError

if TYPE_CHECKING:
    from handoffd.runtime.daemon import Daemon

_MAX_REQUEST = 4096
_CAPACITY_WAIT = 0.1
"""Seconds to wait after an accept() failure that shedding could not relieve."""
_LOG_INTERVAL = 10.0
_LINGER_BYTES = 65536
"""Bytes of an unread request read off before closing after an error answer."""

log = logging.getLogger("handoffd.acceptor")


@dataclass
class EndpointStats:
    """Counters of one operations endpoint (control socket or metrics), for the
    daemon's snapshot."""

    busy_refused: int = 0
    """Connections closed at once because ``max_connections`` were being served."""
    accept_errors: int = 0
    """accept() failures for lack of resources (EMFILE, ENFILE, ENOMEM, ENOBUFS)."""


_CONTROL_BUSY = (json.dumps({"error": "busy: [control] max_connections reached",
                             "minor": int(Minor.CONTROL_BUSY)}) + "\n").encode()


async def serve_control(
    daemon: Daemon, bound: socket.socket, stats: EndpointStats | None = None, *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer status requests on the bound Unix socket (mode 0600) until cancelled.

    ``stats`` (positional, so ``nursery.start`` can pass it): counters to update; a
    private one if omitted."""
    await _serve("control", daemon, bound, stats, _answer, _CONTROL_BUSY, task_status)


async def _serve(
    endpoint: str, daemon: Daemon, bound: socket.socket, stats: EndpointStats | None,
    handle: Callable[[Daemon, trio.SocketStream], Awaitable[None]], busy: bytes,
    task_status: trio.TaskStatus[None],
) -> None:
    """Accept on ``bound`` and run ``handle`` for each connection, at most
    ``max_connections`` at once, each within ``timeout`` seconds, until cancelled."""
    if stats is None:
        stats = EndpointStats()
    limit = daemon.config.control.max_connections
    timeout = daemon.config.control.timeout
    throttled = ThrottledLog(log, _LOG_INTERVAL)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(bound))
    reserve = FdReserve(1)
    # One token per connection being served: taken here when accepted, given back by
    # the connection's task when it ends (its only owner).
    active = trio.CapacityLimiter(limit)

    async def run(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                with trio.move_on_after(timeout):
                    with contextlib.suppress(trio.BrokenResourceError,
                                             trio.ClosedResourceError, OSError):
                        await handle(daemon, stream)
        finally:
            active.release_on_behalf_of(stream)

    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:
                    # Out of fds (or memory) is the moment an operator asks for status:
                    # never die of it, never spin on a backlog we cannot take from.
                    if error.errno not in CAPACITY_ERRNOS:
                        raise
                    stats.accept_errors += 1
                    shed = error.errno in SHED_ERRNOS and reserve.shed(bound)
                    throttled.log(logging.ERROR, "accept", "%s accept: %s; %s", endpoint,
                                  os.strerror(error.errno or 0),
                                  "shedding connections until fds are free" if shed
                                  else "waiting for capacity")
                    await trio.sleep(0 if shed else _CAPACITY_WAIT)
                    continue
                try:
                    active.acquire_on_behalf_of_nowait(stream)
                except trio.WouldBlock:
                    stats.busy_refused += 1
                    _refuse(stream, busy)
                    throttled.log(logging.WARNING, "busy",
                                  "%s: %d connections open ([control] max_connections): "
                                  "closed a new one", endpoint, active.borrowed_tokens)
                    await trio.sleep(0)
                    continue
                nursery.start_soon(run, stream)
    finally:
        throttled.flush()
        reserve.close()
        await listener.aclose()


def _refuse(stream: trio.SocketStream, answer: bytes) -> None:
    """Close a connection over the limit at once: a best-effort short answer (the
    socket is fresh, its send buffer empty), what already arrived read off so that the
    close is more likely a FIN than a reset, no await."""
    fd = stream.socket.fileno()
    try:
        os.write(fd, answer)
        os.read(fd, _MAX_REQUEST)  # the socket is non-blocking (trio's)
    except OSError:
        pass
    stream.socket.close()


async def _answer(daemon: Daemon, stream: trio.SocketStream) -> None:
    request = bytearray()
    while b"\n" not in request and len(request) < _MAX_REQUEST:
        chunk = await stream.receive_some(_MAX_REQUEST)
        if not chunk:
            break
        request += chunk
    reply: dict[str, Any]
    try:
        command = json.loads(request.decode() or "{}").get("command", "status")
    except (ValueError, AttributeError):
        command = None
    if command == "status":
        reply = await daemon.gathered_snapshot()
    else:
        reply = {"error": "unknown command; try {\"command\": \"status\"}"}
    await stream.send_all(json.dumps(reply).encode() + b"\n")


async def query_control(path: Path | str, command: str = "status") -> dict[str, Any]:
    """Client side of the control socket (used by ``handoffd status``)."""
    try:
        with trio.fail_after(5):
            stream = await trio.open_unix_socket(str(path))
            async with stream:
                # Refused before it read the request, the busy answer may still be there.
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    await stream.send_all(json.dumps({"command": command}).encode() + b"\n")
                data = bytearray()
                while not data.endswith(b"\n"):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as error:
        raise GSSError(GSS_S_UNAVAILABLE, Minor.CONTROL_UNAVAILABLE,
                       f"{path}: {getattr(error, 'strerror', None) or error}") from None
    if not data:
        raise GSSError(GSS_S_UNAVAILABLE, Minor.CONTROL_UNAVAILABLE,
                       f"{path}: closed without an answer")
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise GSSError(GSS_S_UNAVAILABLE, Minor.CONTROL_UNAVAILABLE,
                       f"{path}: malformed reply") from None
    if isinstance(reply, dict) and reply.get("minor") == Minor.CONTROL_BUSY:
        raise GSSError(GSS_S_UNAVAILABLE, Minor.CONTROL_BUSY, str(path))
    return reply


_Sample = tuple[str, dict[str, str], float]
"""One sample line: (full metric name, labels, value)."""


def _escape_help(text: str) -> str:
    """A HELP text as the text format wants it: backslash and newline escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """A sample value: integers as such, floats round-tripping, NaN and +Inf/-Inf
    spelled the way Prometheus parses them."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[_Sample]) -> list[str]:
    """One metric family: its HELP and TYPE lines, then its samples."""
    lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]
    for sample_name, labels, value in samples:
        label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
        lines.append(f"{sample_name}{{{label_text}}} {_number(value)}" if label_text
                     else f"{sample_name} {_number(value)}")
    return lines


def _read_proc(path: str) -> str | None:
    """A /proc file's text (latin-1: a command name may hold any byte), None if unreadable."""
    try:
        with open(path, encoding="latin-1") as file:
            return file.read()
    except OSError:
        return None


def process_stats() -> dict[str, float]:
    """This process's figures as Prometheus' client libraries export them (``process_*``),
    from /proc/self (in the daemon: the acceptor, which serves the metrics).  Reading
    /proc/self/stat, /proc/stat and the /proc/self/fd listing takes an fd each, briefly: a
    figure that cannot be read (out of fds, no /proc) is left out rather than failing
    the answer."""
    stats: dict[str, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    stat = _read_proc("/proc/self/stat")
    if stat is not None:
        # The fields after the command name, which is in parentheses and may hold spaces.
        fields = stat.rpartition(")")[2].split()
        stats["cpu_seconds_total"] = (int(fields[11]) + int(fields[12])) / ticks
        stats["virtual_memory_bytes"] = int(fields[20])
        stats["resident_memory_bytes"] = int(fields[21]) * resource.getpagesize()
        boot = _read_proc("/proc/stat")
        btime = [line.split()[1] for line in (boot or "").splitlines()
                 if line.startswith("btime ")]
        if btime:
            stats["start_time_seconds"] = int(btime[0]) + int(fields[19]) / ticks
    with contextlib.suppress(OSError):
        # listdir's own fd is in the listing; client libraries count it too.
        stats["open_fds"] = len(os.listdir("/proc/self/fd"))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    stats["max_fds"] = math.inf if soft == resource.RLIM_INFINITY else soft
    return stats


_PROCESS_METRICS = [
    # (name without "process_", type, HELP as client_python writes it)
    ("cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds."),
    ("virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
    ("resident_memory_bytes", "gauge", "Resident memory size in bytes."),
    ("start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds."),
    ("open_fds", "gauge", "Number of open file descriptors."),
    ("max_fds", "gauge", "Maximum number of open file descriptors."),
]


def render_metrics(snapshot: dict[str, Any],
                   process: Mapping[str, float] | None = None) -> str:
    """Prometheus text exposition (format 0.0.4) of a status snapshot, with build info
    and the ``process_*`` figures of ``process`` (default: :func:`process_stats` of this
    process).  Clean under ``promtool check metrics``: base units, ``_total`` counters,
    the latency summary with ``_sum`` and ``_count``."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        full = f"handoffd_{name}"
        lines.extend(_family(full, kind, help_text,
                             ((full, labels, value) for labels, value in samples)))

    metric("build_info", "gauge", "Always 1: the running handoffd's version and Python",
           [({"version": __version__, "python": platform.python_version()}, 1)])
    totals = snapshot["totals"]
    for key, help_text in [
        ("accepted", "TCP connections accepted"),
        ("handshakes_ok", "Handshakes completed"),
        ("handoffs", "Handoffs sent to workers"),
        ("handoff_batches", "HANDOFF_BATCH messages sent: several handoffs ready for one "
         "worker at once, in one message"),
        ("batched_handoffs", "Handoffs sent within a HANDOFF_BATCH"),
        ("ack_batches", "ACK_BATCH messages received: a worker's verdicts on several "
         "handoffs in one message"),
        ("acked", "Handoffs acknowledged by workers"),
        ("redelivered", "Handoffs sent again because the kernel never queued them"),
        ("died_after_claim", "Handoffs whose worker died after claiming the key, not "
         "redelivered"),
        ("died_unclaimed", "Handoffs sent to a worker that died before it burned the key "
         "slot, not redelivered (it may have read the key)"),
        ("lost", "Connections dropped after a successful handshake"),
        ("worker_restarts", "Workers restarted after dying"),
        ("accept_errors", "accept() failures for lack of resources"),
        ("shed", "Connections closed at once by the fd reserve while out of fds"),
        ("refused_per_source", "Connections refused at once: every handshake slot taken and "
         "their source at its share ([server] max_handshakes_per_source)"),
        ("evicted", "Stalled handshakes evicted for a newer connection (every slot taken)"),
        ("first_token_timeouts", "Connections closed for sending no whole first token within "
         "[server] first_token_timeout"),
        ("unavailable", "Clients told UNAVAILABLE: no worker took them within [workers] "
         "wait_timeout"),
    ]:
        metric(f"{key}_total", "counter", help_text, [({}, totals[key])])
    metric("sessions_ended_total", "counter", "Sessions ended in workers, by outcome: closed "
           "(the app returned), app_error (the app raised; the client got APP_FAILED), "
           "peer_error (the client's bytes, a GSS failure or a lost connection), "
           "cut_at_drain (open at drain_timeout), lost_with_worker (its worker died)",
           [({"outcome": outcome}, totals[f"sessions_{outcome}"])
            for outcome in ("closed", "app_error", "peer_error", "cut_at_drain",
                            "lost_with_worker")])
    metric("sessions_active", "gauge", "Sessions imported by workers and not yet ended",
           [({}, snapshot.get("sessions_active", 0))])
    for key, help_text in [
        ("busy_refused", "Connections closed at once: [control] max_connections were open"),
        ("accept_errors", "accept() failures for lack of resources"),
    ]:
        metric(f"endpoint_{key}_total", "counter", f"Operations endpoints: {help_text}",
               [({"endpoint": endpoint}, totals[f"{endpoint}_{key}"])
                for endpoint in ("control", "metrics")])
    metric("handshake_failures_total", "counter", "Failed handshakes by GSS status",
           [({"status": k}, v) for k, v in sorted(snapshot["handshake_failures"].items())])
    metric("workers", "gauge", "Workers by state",
           [({"state": state}, sum(1 for w in snapshot["workers"] if w["state"] == state))
            for state in (WorkerState.STARTING.value, WorkerState.READY.value,
                          WorkerState.DRAINING.value)])
    slots = snapshot["handshake_slots"]
    metric("handshake_slots", "gauge", "Handshake slots in use by stage (capacity: "
           "[server] max_handshakes)",
           [({"stage": stage}, slots[stage])
            for stage in ("first_token", "handshake", "waiting_for_worker")])
    metric("waiting_for_worker", "gauge", "Connections whose handshake finished, waiting "
           "for a worker to take them", [({}, snapshot["waiting_for_worker"])])
    metric("in_flight", "gauge", "Handoffs awaiting acknowledgement",
           [({}, sum(w["in_flight"] for w in snapshot["workers"]))])
    acceptors = [a for a in snapshot.get("acceptors", []) if a.get("state") != "unreachable"]
    if acceptors:
        metric("acceptors", "gauge", "Acceptor processes answering ([server] acceptors; "
               "one that did not answer acceptor 0 within a second is left out)",
               [({}, len(acceptors))])
        for key, kind, help_text in [
            ("accepted_total", "counter", "TCP connections accepted, by acceptor"),
            ("handshakes_ok_total", "counter", "Handshakes completed, by acceptor"),
            ("handoffs_total", "counter", "Handoffs sent to workers, by acceptor"),
            ("workers", "gauge", "Ready workers each acceptor spawned"),
            ("feeds", "gauge", "Ready workers each acceptor hands off to (its own and, in "
             "the shared pool, the other acceptors')"),
            ("in_flight", "gauge", "Handoffs awaiting acknowledgement, by acceptor"),
        ]:
            field = key.removesuffix("_total")
            metric(f"acceptor_{key}", kind, help_text,
                   [({"acceptor": str(a["index"])}, a.get(field, 0)) for a in acceptors])
    latency = snapshot["handoff_latency_seconds"]
    name = "handoffd_handoff_latency_seconds"
    lines.extend(_family(
        name, "summary", "Handshake completion to worker acknowledgement, in seconds "
        "(quantiles: of the most recent handoffs, NaN before the first)",
        [*((name, {"quantile": q}, math.nan if latency[key] is None else latency[key])
           for q, key in (("0.5", "p50"), ("0.99", "p99"))),
         (f"{name}_sum", {}, latency["sum"]), (f"{name}_count", {}, latency["count"])]))
    figures = process_stats() if process is None else process
    for key, kind, help_text in _PROCESS_METRICS:
        if key in figures:
            lines.extend(_family(f"process_{key}", kind, help_text,
                                 [(f"process_{key}", {}, figures[key])]))
    return "\n".join(lines) + "\n"


async def serve_metrics(
    daemon: Daemon, bound: socket.socket, stats: EndpointStats | None = None, *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve Prometheus metrics over HTTP/1.0 on the bound TCP socket until cancelled.

    ``stats``: as for :func:`serve_control`."""
    await _serve("metrics", daemon, bound, stats, _respond,
                 _http(503, "Service Unavailable", b"busy: [control] max_connections "
                       b"reached\n", extra=b"Retry-After: 1\r\n"), task_status)


async def _respond(daemon: Daemon, stream: trio.SocketStream) -> None:
    request = bytearray()
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        if len(request) >= _MAX_REQUEST:
            await _answer_error(stream, _http(400, "Bad Request", b"request too large\n"))
            return
        chunk = await stream.receive_some(_MAX_REQUEST)
        if not chunk:
            return
        request += chunk
    request_line = request.split(b"\n", 1)[0].rstrip(b"\r").split()
    if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/"):
        await _answer_error(stream, _http(400, "Bad Request", b"malformed request line\n"))
        return
    method, target = bytes(request_line[0]), bytes(request_line[1])
    if method not in (b"GET", b"HEAD"):
        await _answer_error(stream, _http(405, "Method Not Allowed", b"GET or HEAD only\n",
                                          extra=b"Allow: GET, HEAD\r\n"))
        return
    if target.split(b"?", 1)[0] not in (b"/metrics", b"/"):
        response = _http(404, "Not Found", b"metrics are at /metrics\n")
    else:
        response = _http(200, "OK", render_metrics(await daemon.gathered_snapshot()).encode(),
                         content_type=b"text/plain; version=0.0.4; charset=utf-8")
    if method == b"HEAD":
        response = response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    await stream.send_all(response)


async def _answer_error(stream: trio.SocketStream, response: bytes) -> None:
    """Send an error answer to a request that may not have been read whole, then close
    gently: closing with unread bytes would reset the connection and could destroy the
    answer before the client reads it.  Bounded by the connection's timeout and
    ``_LINGER_BYTES``."""
    await stream.send_all(response)
    await stream.send_eof()
    drained = 0
    while drained < _LINGER_BYTES and (chunk := await stream.receive_some(_MAX_REQUEST)):
        drained += len(chunk)


def _http(code: int, reason: str, body: bytes, *, extra: bytes = b"",
          content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    """One whole HTTP/1.0 response; the connection closes after it."""
    return (f"HTTP/1.0 {code} {reason}\r\n".encode()
            + b"Content-Type: " + content_type + b"\r\n"
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            + b"Connection: close\r\n" + extra + b"\r\n" + body)
