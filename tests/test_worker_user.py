"""``[workers] user``: spawned workers run as another user than the root acceptor.

Real processes: a throwaway system user is created (root only), the daemon runs as
root and spawns its workers as that user.  The workers still claim their parked keys
(possession does not depend on the uid), serve clients, and cannot open the
acceptor's server key (mode 0600, root) -- permissions now keep it out of their reach.
The daemon runs on Debian's python3.11 with the venv's packages on ``PYTHONPATH``,
because the venv's interpreter lives under /root, which the worker's user cannot enter.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
from pathlib import Path

import pytest

from handoffd.config import WorkersConfig, worker_credentials
from handoffd.minor import Minor
from handoffd.status import GSSError
from tests.daemon_harness import (
    REPO,
    SITE_PACKAGES,
    SYSTEM_PYTHON,
    _read_exactly,
    read_line,
    start_daemon,
)


def _spawn_env() -> dict[str, str]:
    return {"PYTHONPATH": f"{SITE_PACKAGES}:{REPO}"}


@pytest.mark.root
async def test_workers_run_as_the_configured_user_and_cannot_read_the_server_key(
    tmp_path: Path, worker_user: tuple[str, int, int], open_dir: Path
) -> None:
    name, uid, gid = worker_user
    # Copies in a directory the workers may traverse: a 0600 one they must not open
    # (the server key), a 0644 one they may (so EACCES is the file's mode, not the path).
    secret = open_dir / "server.key"
    public = open_dir / "server.key.pub"
    daemon = await start_daemon(
        tmp_path, workers=2, app="tests.apps:identity_probe",
        extra=f'[workers]\nuser = "{name}"',
        env={**_spawn_env(), "HANDOFFD_TEST_FILES": f"{secret}:{public}"},
        python=SYSTEM_PYTHON)
    shutil.copyfile(tmp_path / "server.key", secret)
    os.chmod(secret, 0o600)
    shutil.copyfile(tmp_path / "server.key.pub", public)
    os.chmod(public, 0o644)
    try:
        for _ in range(3):
            stream = await daemon.connect()
            async with stream:
                report = json.loads(await read_line(stream))
                await stream.send_all(b"still echoed")
                assert await _read_exactly(stream, 12) == b"still echoed"
            assert (report["uid"], report["euid"], report["gid"]) == (uid, uid, gid)
            assert report["groups"] == [], "no supplementary groups of the acceptor"
            assert report["access"] == {str(secret): "EACCES", str(public): "readable"}
        status = await daemon.status()
        assert status["totals"]["acked"] == 3 and status["totals"]["lost"] == 0
        for pid in await daemon.worker_pids():
            assert os.stat(f"/proc/{pid}").st_uid == uid
        assert os.stat(f"/proc/{daemon.process.pid}").st_uid == 0
    finally:
        await daemon.stop()


def test_worker_credentials_from_config() -> None:
    assert worker_credentials(WorkersConfig()) is None
    root = pwd.getpwuid(0)
    if os.geteuid() == 0:
        assert worker_credentials(WorkersConfig(user=root.pw_name)) == (0, root.pw_gid)
        assert worker_credentials(WorkersConfig(user="0", group="0")) == (0, 0)
    for bad in (WorkersConfig(user="no-such-user-hd"), WorkersConfig(group="no-such-group-hd")):
        with pytest.raises(GSSError) as error:
            worker_credentials(bad)
        assert error.value.minor == Minor.CONFIG_INVALID
