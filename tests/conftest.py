"""Suite-wide settings.

Hypothesis: no per-example deadline and no "input generation is slow" health check.
CI runs on 2 shared cores next to real processes; timing belongs to ``make bench``,
never to a unit test's verdict.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.daemon_harness import SITE_PACKAGES, SYSTEM_PYTHON
from tests.throwaway import throwaway_user

# tmp_path under this checkout, not the shared /tmp/pytest-of-<user>: another pytest run
# resets that directory to 0700 while a daemon of ours (acceptor and workers under other
# uids) must traverse it.
_TEMP_ROOT = Path(__file__).resolve().parents[1] / ".pytest-tmp"
try:
    _TEMP_ROOT.mkdir(exist_ok=True)
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(_TEMP_ROOT))
except OSError:  # a read-only checkout (the LSM VM's 9p share): pytest's default
    pass

settings.register_profile(
    "handoffd", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("handoffd")


@pytest.fixture
def worker_user() -> Iterator[tuple[str, int, int]]:
    """A throwaway system user (name, uid, gid) to run workers or the daemon as; root only,
    with Debian's python3.11 (the venv's interpreter lives where that user cannot read)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK) or not SITE_PACKAGES.is_dir():
        pytest.skip("needs Debian's python3.11 beside a python3.11 venv")
    with throwaway_user("hdw") as user:
        yield user


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
