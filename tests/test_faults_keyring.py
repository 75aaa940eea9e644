"""The daemon's user runs out of kernel keyring quota, against a real ``handoffd serve``.

The daemon runs as a throwaway unprivileged user (root's quota is a million keys; a user's
is ``/proc/sys/kernel/keys/maxkeys``, 200 here), with Debian's python3.11 and the venv's
packages on ``PYTHONPATH`` (the venv's interpreter lives under /root, which that user
cannot read).  A second process of the same user then takes every key the quota has left,
and keeps taking each one that comes back.  Handoffs themselves need no new key (parked
keys update fixed-size slots, docs/KEYRING.md): only a worker (re)spawn does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from tests.daemon_harness import (
    REPO,
    SITE_PACKAGES,
    SYSTEM_PYTHON,
    echo_session,
    start_daemon,
)

# Runs as the daemon's user: fill the quota, say so, keep it full until stdin closes.
_FILLER = """
import select, sys
from handoffd.kernel import keyring
from handoffd.minor import Minor
from handoffd.status import GSSError
ring = keyring.join_session_keyring(None)
count = 0
def fill():
    global count
    while True:
        try:
            keyring.add_key(f"filler:{count}", b"x", ring)
        except GSSError as error:
            if error.minor != Minor.KEYRING_QUOTA:
                raise
            return
        count += 1
fill()
print("full", count, flush=True)
while not select.select([sys.stdin], [], [], 0.001)[0]:
    fill()  # whatever the daemon gives back, take it
"""


@pytest.fixture
def daemon_user(worker_user: tuple[str, int, int]) -> tuple[int, int]:
    """(uid, gid) of a throwaway unprivileged user to run the daemon as."""
    return worker_user[1], worker_user[2]


@pytest.mark.root
async def test_keyring_quota_exhausted_means_backpressure_then_recovery(
    daemon_user: tuple[int, int],
) -> None:
    """Quota full: running workers keep serving; a killed worker cannot be replaced
    (EDQUOT, logged), so a new client waits (backpressure) instead of being dropped, and
    the daemon does not crash.  Once the keys are freed the worker is respawned and the
    waiting client is served; nothing is lost."""
    directory = Path(tempfile.mkdtemp(prefix="handoffd-quota-", dir="/tmp"))
    log = directory.parent / f"{directory.name}.log"
    env = {"PYTHONPATH": f"{SITE_PACKAGES}:{REPO}"}
    daemon = await start_daemon(
        directory, workers=1, log=log, env=env, python=SYSTEM_PYTHON, user=daemon_user,
        extra="[workers]\nmax_unacked = 2\nrestart_backoff_max = 0.2\nboot_failures_max = 100")
    filler: trio.Process | None = None
    try:
        await echo_session(daemon, messages=1)
        filler = await trio.lowlevel.open_process(
            [SYSTEM_PYTHON, "-c", _FILLER], env={**os.environ, **env}, cwd="/",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, user=daemon_user[0],
            group=daemon_user[1], extra_groups=[])
        assert filler.stdout is not None and filler.stdin is not None
        with trio.fail_after(20):
            line = await filler.stdout.receive_some(100)
        assert line.startswith(b"full"), line
        # Handoffs need no new key: the live worker serves as before.
        await echo_session(daemon, messages=1)

        worker = (await daemon.worker_pids())[0]
        os.kill(worker, signal.SIGKILL)
        # A handoff the kernel queued to the dying worker is never redelivered (a second
        # import would be possible), so the client connects once the death is noticed.
        with trio.fail_after(20):
            while b"key quota is exhausted" not in log.read_bytes():
                await trio.sleep(0.05)
        served: list[int] = []

        async def client() -> None:
            served.append(await echo_session(daemon, messages=2))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            with trio.fail_after(20):
                while log.read_bytes().count(b"key quota is exhausted") < 3:
                    await trio.sleep(0.05)
            assert not served, "served with no worker: the quota was not exhausted"
            assert daemon.process.returncode is None
            await filler.stdin.aclose()  # the filler exits: its keys go back to the quota
            with trio.fail_after(30):
                await filler.wait()
        assert len(served) == 1 and served[0] != worker
        status = await daemon.status()
        assert status["totals"]["lost"] == 0
        assert status["totals"]["acked"] == 3
        assert b"cannot spawn worker 0" in log.read_bytes()
    finally:
        if filler is not None and filler.returncode is None:
            filler.kill()
            await filler.wait()
        code = await daemon.stop()
        text = log.read_text(errors="replace")
        for path in sorted(directory.iterdir()):
            path.unlink()
        directory.rmdir()
        log.unlink()
        assert code == 0, text[-3000:]


@pytest.mark.root
async def test_keyring_quota_exhausted_at_start_is_a_clear_error(
    daemon_user: tuple[int, int],
) -> None:
    """No key left in the acceptor user's quota when ``handoffd serve`` starts (as root,
    the acceptor under that user): it cannot park anything, so the acceptor exits 1 with
    the GSS status naming the quota (KEYRING_QUOTA, minor 302), not a traceback, and the
    supervisor exits 1 too instead of restarting it; systemd's ``Restart=`` retries."""
    from tests.daemon_harness import separated_uids, write_config

    directory = Path(tempfile.mkdtemp(prefix="handoffd-quota-", dir="/tmp"))
    os.chmod(directory, 0o711)
    env = {**os.environ, "PYTHONPATH": f"{SITE_PACKAGES}:{REPO}"}
    _, (first, last) = separated_uids()
    config = write_config(directory, workers=1, separated=False, extra=(
        f'[server]\nuser = "{daemon_user[0]}"\n[workers]\nuid_range = [{first}, {last}]'))
    for path in (directory / "server.key", directory / "server.key.pub"):
        os.chown(path, *daemon_user)
    identity = {"user": daemon_user[0], "group": daemon_user[1], "extra_groups": []}
    filler = await trio.lowlevel.open_process(
        [SYSTEM_PYTHON, "-c", _FILLER], env=env, cwd="/", stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, **identity)
    try:
        assert filler.stdout is not None and filler.stdin is not None
        with trio.fail_after(20):
            assert (await filler.stdout.receive_some(100)).startswith(b"full")
        with trio.fail_after(30):
            result = await trio.run_process(
                [SYSTEM_PYTHON, "-m", "handoffd", "serve", "--config", str(config)],
                env=env, cwd=REPO, capture_stderr=True, check=False)
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        assert "minor 302" in stderr and "quota is exhausted" in stderr
        assert "Traceback" not in stderr
    finally:
        if filler.stdin is not None:
            await filler.stdin.aclose()
        with trio.fail_after(30):
            await filler.wait()
        for path in sorted(directory.iterdir()):
            path.unlink()
        directory.rmdir()
