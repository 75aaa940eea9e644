"""Operations endpoints: the control socket (``handoffd status``) and Prometheus metrics.

Control protocol: connect to the Unix stream socket, send one JSON line
``{"command": "status"}``, read one JSON line back, done.  The socket is
created mode 0600: status is for the daemon's own user (and root).

Metrics: a minimal HTTP/1.0 responder on ``[control] metrics`` serving the
Prometheus text exposition format on any path.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from handoffd.minor import Minor
from handoffd.status import GSS_S_UNAVAILABLE, GSSError

if TYPE_CHECKING:
    from handoffd.runtime.daemon import Daemon

_MAX_REQUEST = 4096
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

log = logging.getLogger("handoffd.acceptor")


async def serve_control(
    daemon: Daemon, bound: socket.socket, *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer status requests on the bound Unix socket (mode 0600) until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(bound))
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:
                    # Out of fds (or memory) is the moment an operator asks for status:
                    # wait for capacity like the client accept loop, never die of it.
                    if error.errno not in _CAPACITY_ERRNOS:
                        raise
                    log.error("control accept: %s; waiting for capacity",
                              os.strerror(error.errno or 0))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(_answer, daemon, stream)
    finally:
        await listener.aclose()


async def _answer(daemon: Daemon, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            with trio.fail_after(5):
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
                    reply = daemon.snapshot()
                else:
                    reply = {"error": "unknown command; try {\"command\": \"status\"}"}
                await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.TooSlowError, trio.BrokenResourceError, OSError):
            pass


async def query_control(path: Path | str, command: str = "status") -> dict[str, Any]:
    """Client side of the control socket (used by ``handoffd status``)."""
    try:
        with trio.fail_after(5):
            stream = await trio.open_unix_socket(str(path))
            async with stream:
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
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise GSSError(GSS_S_UNAVAILABLE, Minor.CONTROL_UNAVAILABLE,
                       f"{path}: malformed reply") from None
    return reply


def render_metrics(snapshot: dict[str, Any]) -> str:
    """Prometheus text exposition of a status snapshot."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP handoffd_{name} {help_text}")
        lines.append(f"# TYPE handoffd_{name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            lines.append(f"handoffd_{name}{{{label_text}}} {value}" if label_text
                         else f"handoffd_{name} {value}")

    totals = snapshot["totals"]
    for key, help_text in [
        ("accepted", "TCP connections accepted"),
        ("handshakes_ok", "Handshakes completed"),
        ("handoffs", "Handoffs sent to workers"),
        ("acked", "Handoffs acknowledged by workers"),
        ("redelivered", "Handoffs sent again because the kernel never queued them"),
        ("died_after_claim", "Handoffs whose worker died after claiming the key, not "
         "redelivered"),
        ("died_unclaimed", "Handoffs sent to a worker that died before it burned the key "
         "slot, not redelivered (it may have read the key)"),
        ("lost", "Connections dropped after a successful handshake"),
        ("worker_restarts", "Workers restarted after dying"),
        ("accept_errors", "accept() failures for lack of resources"),
    ]:
        metric(f"{key}_total", "counter", help_text, [({}, totals[key])])
    metric("handshake_failures_total", "counter", "Failed handshakes by GSS status",
           [({"status": k}, v) for k, v in sorted(snapshot["handshake_failures"].items())])
    metric("workers", "gauge", "Workers by state",
           [({"state": state}, sum(1 for w in snapshot["workers"] if w["state"] == state))
            for state in ("starting", "ready", "draining")])
    metric("in_flight", "gauge", "Handoffs awaiting acknowledgement",
           [({}, sum(w["in_flight"] for w in snapshot["workers"]))])
    quantiles = snapshot["handoff_latency_us"]
    metric("handoff_latency_microseconds", "summary",
           "Handshake completion to worker acknowledgement",
           [({"quantile": q}, quantiles[key]) for q, key in (("0.5", "p50"), ("0.99", "p99"))
            if quantiles[key] is not None])
    return "\n".join(lines) + "\n"


async def serve_metrics(
    daemon: Daemon, bound: socket.socket, *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve Prometheus metrics over HTTP/1.0 on the bound TCP socket."""
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(bound))]
    task_status.started()

    async def respond(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(5):
                    request = bytearray()
                    while b"\r\n\r\n" not in request and len(request) < _MAX_REQUEST:
                        chunk = await stream.receive_some(_MAX_REQUEST)
                        if not chunk:
                            return
                        request += chunk
                    body = render_metrics(daemon.snapshot()).encode()
                    head = (b"HTTP/1.0 200 OK\r\n"
                            b"Content-Type: text/plain; version=0.0.4\r\n"
                            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
                    await stream.send_all(head + body)
            except (trio.TooSlowError, trio.BrokenResourceError, OSError):
                pass

    await trio.serve_listeners(respond, listeners)
