"""Issue 15: the control socket and the metrics endpoint stay available under a local
flood, and never take the fds the clients need.  A real ``handoffd serve``, real sockets:
idle connections are capped (``[control] max_connections``) and cut
(``[control] timeout``); at the fd limit a flood of metrics connections is shed through
the reserved fd, logged a few times with a count, and clients are served once it stops."""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path
from typing import Any

import trio

from handoffd.minor import Minor
from handoffd.status import GSSError
from tests.daemon_harness import RunningDaemon, echo_session, set_nofile, start_daemon
from tests.test_faults_handoff import settled_fds

MAX_CONNECTIONS = 4
TIMEOUT = 1.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _limits(port: int, *, max_connections: int = MAX_CONNECTIONS,
            timeout: float = TIMEOUT) -> str:
    return (f'[control]\nmetrics = "127.0.0.1:{port}"\n'
            f"max_connections = {max_connections}\ntimeout = {timeout}")


async def _http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.0 exchange: (status code, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    assert status_line.startswith("HTTP/1.0 "), status_line
    headers = {k.strip().lower(): v.strip()
               for k, v in (line.split(":", 1) for line in header_lines)}
    if "content-length" in headers and not request.startswith(b"HEAD "):
        assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode()


async def _status_when_free(daemon: RunningDaemon) -> tuple[dict[str, Any], int]:
    """daemon.status(), retried while the control socket answers busy (bounded):
    (the status, how many busy answers came first)."""
    for busy in range(200):
        try:
            return await daemon.status(), busy
        except GSSError as error:
            assert error.minor in (Minor.CONTROL_BUSY, Minor.CONTROL_UNAVAILABLE), error
            await trio.sleep(0.05)
    raise AssertionError("the control socket never answered")


async def _metrics_when_free(port: int) -> tuple[bytes, int]:
    for busy in range(200):
        try:
            code, headers, body = await _http(port, _get("/metrics"))
        except (OSError, trio.BrokenResourceError):  # refused before the request was read
            code = 503
        if code == 200:
            assert headers["content-type"].startswith("text/plain; version=0.0.4")
            return body, busy
        assert code == 503, code
        await trio.sleep(0.05)
    raise AssertionError("the metrics endpoint never answered")


def _idle_tcp(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def _idle_unix(path: Path, count: int) -> list[socket.socket]:
    idle = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(path))
        idle.append(sock)
    return idle


async def _closed_by_daemon(sock: socket.socket) -> bytes:
    """What an idle connection reads until the daemon closes it: b'' at once (or its
    busy answer), a reset counts as closed.  Waits in a thread, bounded by its timeout."""
    def read_all() -> bytes:
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        return data
    return await trio.to_thread.run_sync(read_all)


async def test_idle_connections_neither_block_status_metrics_nor_clients(
    tmp_path: Path,
) -> None:
    """3 x max_connections idle connections on each endpoint: the ones over the cap are
    closed at once (with a busy answer), the others when their timeout runs out; a
    status query, a metrics GET and an echo client are all served meanwhile (the
    first two at the latest once the timeout freed a slot)."""
    port = _free_port()
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=2, log=log, extra=_limits(port))
    idle: list[socket.socket] = []
    try:
        await echo_session(daemon, messages=1)
        opened = time.monotonic()
        idle_metrics = _idle_tcp(port, 3 * MAX_CONNECTIONS)
        idle_control = _idle_unix(daemon.control, 3 * MAX_CONNECTIONS)
        idle = idle_metrics + idle_control
        results: dict[str, float] = {}

        async def echo() -> None:
            await echo_session(daemon, messages=3)
            results["echo"] = time.monotonic() - opened

        async def status() -> None:
            snapshot, _busy = await _status_when_free(daemon)
            assert snapshot["state"] == "running"
            results["status"] = time.monotonic() - opened

        async def metrics() -> None:
            body, _busy = await _metrics_when_free(port)
            assert b"handoffd_acked_total" in body
            results["metrics"] = time.monotonic() - opened

        closed: list[bytes] = []

        async def watch(sock: socket.socket) -> None:
            closed.append(await _closed_by_daemon(sock))

        with trio.fail_after(TIMEOUT + 10):
            async with trio.open_nursery() as nursery:
                for sock in idle:
                    nursery.start_soon(watch, sock)
                nursery.start_soon(echo)
                nursery.start_soon(status)
                nursery.start_soon(metrics)
        # Every idle connection was closed by the daemon: those over the cap at once,
        # the rest by the timeout; none was left to hold an fd.
        assert len(closed) == len(idle)
        busy_control = sum(1 for data in closed if b'"minor": 622' in data)
        busy_metrics = sum(1 for data in closed if data.startswith(b"HTTP/1.0 503 "))
        assert busy_control >= MAX_CONNECTIONS, closed
        assert busy_metrics >= MAX_CONNECTIONS, closed
        # All three served within the nursery's deadline (TIMEOUT + 10 s): how soon is
        # measured, not asserted.
        assert set(results) == {"echo", "status", "metrics"}, results
        # And with the flood gone, both answer at the first try.
        assert (await _status_when_free(daemon))[1] == 0
        assert (await _metrics_when_free(port))[1] == 0
    finally:
        for sock in idle:
            sock.close()
        assert await daemon.stop() == 0
    text = log.read_text()
    # The refusals are logged, rate-limited: a line each endpoint (plus the count at
    # shutdown), never one per refused connection.
    for endpoint in ("control", "metrics"):
        lines = [line for line in text.splitlines()
                 if f"{endpoint}: " in line and "max_connections" in line]
        assert 1 <= len(lines) <= 2, lines
    assert "more like this" in text


async def test_metrics_http_answers(tmp_path: Path) -> None:
    """Small, correct HTTP/1.0: /metrics and / answer 200, other paths 404, methods
    other than GET and HEAD 405, garbage 400; HEAD has the headers and no body."""
    port = _free_port()
    daemon = await start_daemon(tmp_path, workers=1, extra=_limits(port))
    try:
        with trio.fail_after(20):
            code, headers, body = await _http(port, _get("/metrics"))
            assert code == 200 and b"# TYPE handoffd_acked_total counter" in body
            assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert (await _http(port, _get("/")))[0] == 200
            assert (await _http(port, _get("/metrics?x=1")))[0] == 200
            code, _, body = await _http(port, _get("/status"))
            assert code == 404 and body
            assert (await _http(port, _get("/metrics/extra")))[0] == 404
            code, headers, body = await _http(
                port, b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            assert code == 405 and headers["allow"] == "GET, HEAD"
            code, headers, body = await _http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
            assert code == 200 and body == b"" and int(headers["content-length"]) > 0
            assert (await _http(port, b"nonsense\r\n\r\n"))[0] == 400
            code, _, _ = await _http(port, b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 1000)
            assert code == 400
            # A bare-LF client is understood too.
            assert (await _http(port, b"GET /metrics HTTP/1.0\n\n"))[0] == 200
    finally:
        assert await daemon.stop() == 0


async def test_a_metrics_flood_at_the_fd_limit_is_shed_and_logged_a_few_times(
    tmp_path: Path,
) -> None:
    """The acceptor's RLIMIT_NOFILE lowered to 3 fds above what it holds; a flood of
    metrics connections then takes those 3 and every accept() after fails with EMFILE:
    each pending connection is shed (accepted on the reserved fd, closed at once: the
    flooder sees EOF or a reset, not a hang), the ERROR line comes once with a count at
    shutdown, not once per failure; once the flood stops a client is served."""
    port = _free_port()
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log,
                                extra=_limits(port, max_connections=8, timeout=1.0))
    flood: list[socket.socket] = []
    try:
        await echo_session(daemon, messages=1)
        baseline = await settled_fds(daemon)
        soft, hard = set_nofile(daemon.pid, baseline + 3)
        shed = 0
        with trio.fail_after(20):
            for _ in range(150):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.setblocking(False)
                flood.append(sock)
                if len(flood) % 10 == 0:
                    await trio.sleep(0.02)
            while b"metrics accept: Too many open files" not in log.read_bytes():
                await trio.sleep(0.05)
            # The connections over the fds are cut at once, not left in the backlog.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                shed = sum(1 for sock in flood if _cut(sock))
                if shed >= len(flood) - 3:
                    break
                await trio.sleep(0.05)
        assert shed >= len(flood) - 3, f"{shed} of {len(flood)} cut"
        assert daemon.process.returncode is None
        for sock in flood:
            sock.close()
        flood.clear()
        # The three it holds end by the timeout; then a real client is served, under
        # the same low limit.
        with trio.fail_after(20):
            while True:  # the held three free their fds as they see the flood close
                try:
                    await echo_session(daemon, messages=2)
                    break
                except GSSError as error:  # shed at accept while they still hold them
                    assert error.minor == Minor.PEER_CLOSED, error
                    await trio.sleep(0.1)
            status, _busy = await _status_when_free(daemon)
        assert status["totals"]["lost"] == 0
        set_nofile(daemon.pid, soft, hard)
    finally:
        for sock in flood:
            sock.close()
        assert await daemon.stop() == 0
    lines = [line for line in log.read_text().splitlines() if "metrics accept:" in line]
    assert 1 <= len(lines) <= 3, lines
    assert any("more like this" in line for line in lines), lines
    counted = sum(int(line.split("(")[-1].split()[0]) for line in lines if "more like" in line)
    assert len(lines) + counted >= 100, lines  # some 150 failures, a few lines


def _cut(sock: socket.socket) -> bool:
    """True if the daemon closed this connection (EOF or reset)."""
    try:
        return sock.recv(4096, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError as error:
        return error.errno in (errno.ECONNRESET, errno.EPIPE)


async def test_metrics_show_the_flood_counters(tmp_path: Path) -> None:
    """What the endpoints refused, and the acceptor's handshake slots, are metrics."""
    port = _free_port()
    daemon = await start_daemon(tmp_path, workers=1, extra=_limits(port))
    idle: list[socket.socket] = []
    try:
        idle = _idle_unix(daemon.control, 2 * MAX_CONNECTIONS)
        with trio.fail_after(TIMEOUT + 10):
            while b'handoffd_endpoint_busy_refused_total{endpoint="control"} 0' in (
                    await _metrics_when_free(port))[0]:
                await trio.sleep(0.05)
            body, _busy = await _metrics_when_free(port)
        text = body.decode()
        assert "# TYPE handoffd_endpoint_busy_refused_total counter" in text
        assert 'handoffd_endpoint_accept_errors_total{endpoint="metrics"} 0' in text
        for name in ("refused_per_source", "evicted", "first_token_timeouts", "unavailable",
                     "shed"):
            assert f"handoffd_{name}_total 0" in text, name
        assert 'handoffd_handshake_slots{stage="first_token"} 0' in text
        assert "handoffd_waiting_for_worker 0" in text
    finally:
        for sock in idle:
            sock.close()
        assert await daemon.stop() == 0
