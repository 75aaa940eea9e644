"""Throwaway system users for tests that need a second, unprivileged uid (root only)."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def throwaway_user(prefix: str) -> Iterator[tuple[str, int, int]]:
    """A new system user ``(name, uid, gid)`` with no home and no shell, deleted after.

    Skips the test when not root (``useradd`` needs it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a throwaway user (useradd)")
    name = f"{prefix}{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield name, entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
