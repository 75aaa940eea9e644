"""``gunicorn -k handoffd.gunicorn.HandoffWorker``: the real gunicorn's workers register with a
running handoffd and serve examples/flask on the connections it hands them; gunicorn's
HUP, TTIN, TTOU, graceful_timeout and max_requests behave as gunicorn users expect."""

from __future__ import annotations

import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.daemon_harness import REPO, RunningDaemon, start_daemon, tls_config

pytest.importorskip("gunicorn")


async def external_workers(daemon: RunningDaemon) -> set[int]:
    status = await daemon.status()
    return {w["pid"] for w in status["workers"] if w["external"] and w["state"] == "ready"}


async def wait_workers(daemon: RunningDaemon, count: int, *,
                       not_in: frozenset[int] | set[int] = frozenset()) -> set[int]:
    with trio.fail_after(40):
        while True:
            pids = await external_workers(daemon)
            if len(pids) == count and not pids & not_in:
                return pids
            await trio.sleep(0.1)


@pytest.fixture
async def gunicorn(tmp_path: Path) -> AsyncIterator[tuple[RunningDaemon, trio.Process, str, Path]]:
    tls, pki, acceptor_uid = tls_config(tmp_path)
    register = tmp_path / "register.sock"
    daemon = await start_daemon(
        tmp_path, workers=0, acceptor_uid=acceptor_uid,
        extra=(f'[workers]\nregister_socket = "{register}"\n'
               f"[policy]\nworker_uids = [{os.getuid()}]\n" + tls))
    status = await daemon.status()
    port = status["tls_listen"][0].rsplit(":", 1)[1]
    master = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gunicorn", "-k", "handoffd.gunicorn.HandoffWorker", "-w", "2",
         "-b", "127.0.0.1:0", "--graceful-timeout", "5", "--max-requests", "6",
         "examples.flask.app:app"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO),
                       "HANDOFFD_REGISTER_SOCKET": str(register),
                       "HANDOFFD_ACCEPTOR_UID": str(status["privilege_separation"]
                                                    ["acceptor_uid"])})
    try:
        yield daemon, master, f"https://localhost:{port}/", pki["ca"]
    finally:
        master.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await master.wait()
        await daemon.stop()


async def get(url: str, ca: Path) -> int:
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca))) as client:
        response = await client.get(url)
    assert response.status_code == 200
    pid: int = response.json()["worker_pid"]
    return pid


async def test_gunicorn_workers_serve_handed_off_connections_and_obey_gunicorn(
    gunicorn: tuple[RunningDaemon, trio.Process, str, Path],
) -> None:
    daemon, master, url, ca = gunicorn
    first = await wait_workers(daemon, 2)
    assert {await get(url, ca) for _ in range(4)} <= first

    master.send_signal(signal.SIGTTIN)  # one more worker
    grown = await wait_workers(daemon, 3)
    assert first < grown

    master.send_signal(signal.SIGTTOU)  # one fewer: the one gunicorn stops drains first
    shrunk = await wait_workers(daemon, 2)
    assert shrunk < grown

    # gunicorn's reload: every worker replaced, and the count back to the configured -w 2;
    # a request in progress on an old worker finishes (graceful_timeout 5 s).
    async with trio.open_nursery() as nursery:
        slow: list[int] = []

        async def slow_request() -> None:
            slow.append(await get(url + "slow?seconds=2", ca))

        nursery.start_soon(slow_request)
        await trio.sleep(0.5)
        master.send_signal(signal.SIGHUP)
        rolled = await wait_workers(daemon, 2, not_in=shrunk)
    assert slow and slow[0] in shrunk  # served to the end by a worker the reload replaced
    assert await get(url, ca) in rolled

    # max_requests 6 (gunicorn adds no jitter here): a worker that served 6 requests
    # drains, and gunicorn's arbiter starts another, which registers anew.
    seen: set[int] = set()
    for _ in range(30):
        seen.add(await get(url, ca))
    assert seen - rolled, "no worker was replaced after max_requests"
    assert (await daemon.status())["totals"]["lost"] == 0
