"""The pre-fork HTTP/1.1 example, end to end with real processes.

``handoffd serve`` runs with no workers of its own and a registration socket;
``python -m examples.prefork_http.server`` forks its workers, which register
and receive handed-off connections through the worker library; clients make
HTTP requests over the secure channel (``examples.prefork_http.client``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import trio

from examples.prefork_http.client import main as client_main
from examples.prefork_http.client import request
from tests.daemon_harness import REPO, start_daemon


async def _external_workers(daemon_status: dict[str, object]) -> list[int]:
    workers = daemon_status["workers"]
    assert isinstance(workers, list)
    return [w["pid"] for w in workers if w["external"] and w["state"] == "ready"]


async def test_prefork_http_workers_serve_handed_off_connections(tmp_path: Path) -> None:
    register = tmp_path / "register.sock"
    daemon = await start_daemon(tmp_path, workers=0,
                                extra=f'[workers]\nregister_socket = "{register}"\n'
                                f'[policy]\nworker_uids = [{os.getuid()}]')
    acceptor_uid = (await daemon.status())["privilege_separation"]["acceptor_uid"]
    master = await trio.lowlevel.open_process(
        [sys.executable, "-m", "examples.prefork_http.server", "--register", str(register),
         "--workers", "2", "--acceptor-uid", str(acceptor_uid)], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        with trio.fail_after(30):
            while len(pids := await _external_workers(await daemon.status())) < 2:
                await trio.sleep(0.05)
        server = f"{daemon.host}:{daemon.port}"

        # Keep-alive: several requests on one handed-off connection, one worker.
        answers = await request(server, daemon.fingerprint, "GET", "/whoami", b"", 3)
        assert [status for status, _ in answers] == [200, 200, 200]
        who = [json.loads(body) for _, body in answers]
        assert len({w["worker_pid"] for w in who}) == 1
        assert who[0]["worker_pid"] in pids
        assert who[0]["anonymous"] is True and who[0]["peer_name"] == "anonymous"

        # Both pre-forked workers take connections (fewest in flight, then fewest served).
        served = set()
        for _ in range(6):
            (status, body), = await request(server, daemon.fingerprint, "GET", "/whoami", b"", 1)
            served.add(json.loads(body)["worker_pid"])
        assert served == set(pids)

        payload = os.urandom(40_000)  # several per-message tokens each way
        (status, body), = await request(server, daemon.fingerprint, "POST", "/echo", payload, 1)
        assert (status, body) == (200, payload)
        (status, _), = await request(server, daemon.fingerprint, "GET", "/nowhere", b"", 1)
        assert status == 404

        # The command-line client, as the README shows it.
        code = await trio.to_thread.run_sync(client_main, [
            server, "--fingerprint", daemon.fingerprint, "GET", "/"])
        assert code == 0

        # Workers that go away are dropped by the acceptor; the master replaces them.
        os.kill(pids[0], signal.SIGKILL)
        with trio.fail_after(30):
            while True:
                now = await _external_workers(await daemon.status())
                if pids[0] not in now and len(now) == 2:
                    break
                await trio.sleep(0.05)
        (status, _), = await request(server, daemon.fingerprint, "GET", "/", b"", 1)
        assert status == 200
    finally:
        master.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await master.wait() == 0
        assert await daemon.stop() == 0
