"""Suite-wide settings.

Hypothesis: no per-example deadline and no "input generation is slow" health check.
CI runs on 2 shared cores next to real processes; timing belongs to ``make bench``,
never to a unit test's verdict.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.daemon_harness import SITE_PACKAGES, SYSTEM_PYTHON

settings.register_profile(
    "handoffd", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("handoffd")


@pytest.fixture
def worker_user() -> Iterator[tuple[str, int, int]]:
    """A throwaway system user (name, uid, gid) for ``[workers] user``; root only."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a throwaway user (useradd) for the workers")
    if not os.access(SYSTEM_PYTHON, os.X_OK) or not SITE_PACKAGES.is_dir():
        pytest.skip("needs Debian's python3.11 beside a python3.11 venv")
    name = f"hdw{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield name, entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may traverse (0711, under /tmp): files put there are kept
    from another user by their own mode alone (pytest's tmp_path sits in a 0700 tree)."""
    path = Path(tempfile.mkdtemp(prefix="handoffd-test-", dir="/tmp"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
