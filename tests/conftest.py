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

# tmp_path in a root of this run's own, not the shared /tmp/pytest-of-<user>: another
# pytest run resets that directory to 0700 while a daemon of ours (acceptor and workers
# under other uids) must traverse it.
# Short (Unix socket paths under tmp_path stay within 107 bytes) and this run's own.
_TEMP_ROOT = Path(tempfile.gettempdir()) / f"hd{os.getpid()}"
try:
    _TEMP_ROOT.mkdir(mode=0o755, exist_ok=True)
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(_TEMP_ROOT))
except OSError:  # no writable temp dir: pytest's default
    pass


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_DEBUG_TEMPROOT") == str(_TEMP_ROOT):
        shutil.rmtree(_TEMP_ROOT, ignore_errors=True)

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
