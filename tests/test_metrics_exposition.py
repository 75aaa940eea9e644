"""Issue 19: the Prometheus exposition is clean under the real ``promtool check metrics``
(Debian's ``prometheus`` package; ``make deps-prometheus``): base units, ``_total``
counters, the latency summary with ``_sum`` and ``_count``, build info, the acceptor's
``process_*`` figures, HELP texts and label values escaped per the text format."""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import handoffd
from handoffd.runtime.control import process_stats, render_metrics
from tests.daemon_harness import RunningDaemon, echo_session, start_daemon
from tests.test_fdreserve import at_fd_limit

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: Debian's prometheus package "
    "(make deps-prometheus) checks the exposition")

_PROCESS = ("process_cpu_seconds_total", "process_virtual_memory_bytes",
            "process_resident_memory_bytes", "process_start_time_seconds",
            "process_open_fds", "process_max_fds")
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _promtool(text: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)


def _assert_promtool_clean(text: str) -> None:
    """Exit 0 and not a word on stdout or stderr (each lint problem is a line)."""
    checked = _promtool(text)
    problems = (checked.stdout + checked.stderr).strip()
    assert checked.returncode == 0 and not problems, (checked.returncode, problems)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample line: (name, labels) -> value.  Fails on a line that is neither a
    comment nor a sample."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        samples[(name, frozenset((k, _unescape(v))
                                 for k, v in _LABEL.findall(labels or "")))] = float(value)
    return samples


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _metrics(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 "), head
    return body.decode()


async def _daemon(tmp_path: Path) -> tuple[RunningDaemon, int]:
    port = _free_port()
    daemon = await start_daemon(tmp_path, workers=1,
                                extra=f'[control]\nmetrics = "127.0.0.1:{port}"')
    return daemon, port


async def _acked(daemon: RunningDaemon, count: int) -> None:
    with trio.fail_after(10):
        while (await daemon.status())["totals"]["acked"] < count:
            await trio.sleep(0.05)


def _acceptor_start_and_fd_limit(pid: int) -> tuple[float, float]:
    """What /proc shows from outside: the process's start time (seconds since the epoch)
    and its soft fd limit."""
    with open(f"/proc/{pid}/stat") as stat:
        start_ticks = int(stat.read().rpartition(")")[2].split()[19])
    with open("/proc/stat") as boot:
        btime = next(int(line.split()[1]) for line in boot if line.startswith("btime "))
    with open(f"/proc/{pid}/limits") as limits:
        soft = next(line for line in limits if line.startswith("Max open files")).split()[3]
    return btime + start_ticks / os.sysconf("SC_CLK_TCK"), float(soft)


def _snapshot(**changes: Any) -> dict[str, Any]:
    """A status snapshot as :meth:`Daemon.snapshot` has it, only what metrics read."""
    totals = ["accepted", "handshakes_ok", "handoffs", "handoff_batches", "batched_handoffs",
              "ack_batches", "acked", "redelivered",
              "died_after_claim", "died_unclaimed", "lost", "worker_restarts",
              "accept_errors", "shed", "refused_per_source", "evicted",
              "first_token_timeouts", "unavailable", "control_busy_refused",
              "control_accept_errors", "metrics_busy_refused", "metrics_accept_errors",
              "sessions_closed", "sessions_app_error", "sessions_peer_error",
              "sessions_cut_at_drain", "sessions_lost_with_worker"]
    snapshot: dict[str, Any] = {
        "totals": dict.fromkeys(totals, 0),
        "handshake_failures": {},
        "workers": [{"state": "ready", "in_flight": 0}],
        "handshake_slots": {"first_token": 0, "handshake": 0, "waiting_for_worker": 0},
        "waiting_for_worker": 0,
        "handoff_latency_seconds": {"sum": 0.0, "count": 0, "p50": None, "p99": None},
    }
    snapshot.update(changes)
    return snapshot


@needs_promtool
async def test_promtool_accepts_the_daemons_metrics(tmp_path: Path) -> None:
    """A real daemon after one echo client: what GET /metrics answers passes
    ``promtool check metrics`` without a single complaint."""
    daemon, port = await _daemon(tmp_path)
    try:
        await echo_session(daemon, messages=1)
        await _acked(daemon, 1)
        body = await _metrics(port)
    finally:
        assert await daemon.stop() == 0
    assert "# TYPE handoffd_handoff_latency_seconds summary" in body
    assert "microseconds" not in body
    _assert_promtool_clean(body)
    # The exposition before any handoff (NaN quantiles, no failures yet) too.
    _assert_promtool_clean(render_metrics(_snapshot()))


async def test_summary_moves_and_build_and_process_info(tmp_path: Path) -> None:
    """A handoff moves the latency summary's ``_count`` by one and its ``_sum`` up; build
    info names this handoffd and Python; the ``process_*`` figures are the acceptor's
    (its start time and fd limit as /proc shows them from outside)."""
    daemon, port = await _daemon(tmp_path)
    try:
        before = _samples(await _metrics(port))
        await echo_session(daemon, messages=1)
        await _acked(daemon, 1)
        after = _samples(await _metrics(port))
        status = await daemon.status()
        started, soft = _acceptor_start_and_fd_limit(daemon.acceptor_pid)
    finally:
        assert await daemon.stop() == 0
    name = "handoffd_handoff_latency_seconds"
    assert _value(after, f"{name}_count") == _value(before, f"{name}_count") + 1
    assert _value(after, f"{name}_sum") > _value(before, f"{name}_sum")
    # The summary and the status agree, in seconds and microseconds.
    seconds = status["handoff_latency_seconds"]
    assert seconds["count"] == _value(after, f"{name}_count")
    assert seconds["p50"] == _value(after, name, quantile="0.5")
    assert seconds["p99"] is not None and seconds["p99"] <= seconds["sum"]
    assert math.isclose(status["handoff_latency_us"]["p50"], seconds["p50"] * 1e6)
    assert 0 < _value(after, name, quantile="0.5") <= _value(after, name, quantile="0.99")
    assert _value(after, "handoffd_build_info", version=handoffd.__version__,
                  python=platform.python_version()) == 1
    for process_metric in _PROCESS:
        assert _value(after, process_metric) >= 0, process_metric
    assert 0 < _value(after, "process_open_fds") <= _value(after, "process_max_fds")
    assert _value(after, "process_resident_memory_bytes") > 1 << 20
    # The acceptor's own figures, not the supervisor's.
    assert _value(after, "process_start_time_seconds") == pytest.approx(started)
    assert started <= time.time()
    assert _value(after, "process_max_fds") == soft


def test_help_and_label_values_are_escaped() -> None:
    """A label value with a backslash, a quote and a newline is written escaped, and
    reads back the same; HELP texts escape backslash and newline."""
    odd = 'back\\slash "quoted"\nnext line'
    text = render_metrics(_snapshot(handshake_failures={odd: 2}),
                          process={"max_fds": math.inf, "open_fds": 3})
    assert 'handoffd_handshake_failures_total{status="back\\\\slash \\"quoted\\"\\nnext line"} 2' \
        in text.splitlines()
    assert _value(_samples(text), "handoffd_handshake_failures_total", status=odd) == 2
    assert "process_max_fds +Inf" in text.splitlines()
    assert "process_cpu_seconds_total" not in text  # a figure not given is left out
    from handoffd.runtime.control import _escape_help
    assert _escape_help("a\\b\nc") == "a\\\\b\\nc"
    for line in text.splitlines():
        assert "\n" not in line
    if PROMTOOL is not None:
        _assert_promtool_clean(text)


def test_counters_end_in_total_and_the_summary_is_whole() -> None:
    """Every counter's name ends in ``_total``; every family has HELP and TYPE before its
    samples; the summary has its quantiles (NaN before the first handoff), ``_sum`` and
    ``_count``."""
    text = render_metrics(_snapshot(), process=process_stats())
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    helps = set(re.findall(r"^# HELP (\S+) \S", text, re.MULTILINE))
    assert set(types) == helps
    assert {n for n, kind in types.items() if kind == "counter"} == \
        {n for n in types if n.endswith("_total")}
    assert not [n for n in types if "microseconds" in n]
    assert set(_PROCESS) <= set(types)
    samples = _samples(text)
    for name, _labels in samples:
        family = re.sub(r"_(sum|count)$", "", name) if name not in types else name
        assert family in types, name
    name = "handoffd_handoff_latency_seconds"
    assert types[name] == "summary"
    assert math.isnan(_value(samples, name, quantile="0.5"))
    assert _value(samples, f"{name}_sum") == 0 and _value(samples, f"{name}_count") == 0
    latency = {"sum": 0.75, "count": 3, "p50": 0.25, "p99": 0.5}
    samples = _samples(render_metrics(_snapshot(handoff_latency_seconds=latency), process={}))
    assert _value(samples, name, quantile="0.5") == 0.25
    assert _value(samples, name, quantile="0.99") == 0.5
    assert _value(samples, f"{name}_sum") == 0.75 and _value(samples, f"{name}_count") == 3


def test_process_figures_out_of_fds_are_left_out_not_fatal() -> None:
    """At the fd limit (when an operator most wants metrics) the figures that need an fd
    to read are left out and the rest is still answered."""
    with at_fd_limit(spare=0):
        figures = process_stats()
        text = render_metrics(_snapshot(), process=figures)
    assert "open_fds" not in figures and "resident_memory_bytes" not in figures
    assert figures["max_fds"] > 0
    assert "handoffd_acked_total 0" in text.splitlines()
    assert "process_max_fds " in text


def test_prometheus_client_parses_it() -> None:
    """The reference Python parser reads every family, if it happens to be installed
    (it is not a dependency)."""
    parser = pytest.importorskip("prometheus_client.parser")
    text = render_metrics(_snapshot(handshake_failures={'a"b\\c\nd': 1}))
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    summary = families["handoffd_handoff_latency_seconds"]
    assert summary.type == "summary"
    assert {s.name for s in summary.samples} == {
        "handoffd_handoff_latency_seconds", "handoffd_handoff_latency_seconds_sum",
        "handoffd_handoff_latency_seconds_count"}
    failures = families["handoffd_handshake_failures"]  # the parser drops ``_total``
    assert [s.labels for s in failures.samples] == [{"status": 'a"b\\c\nd'}]
    assert families["handoffd_build_info"].samples[0].labels["version"] == \
        handoffd.__version__
