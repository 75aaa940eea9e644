"""Fuzz ``load_config`` on raw bytes written to a real file.

Input: the file's bytes, whatever they are.  Reading, decoding, TOML syntax
and validation must all end in a ``GSSError`` (``CONFIG_INVALID`` or
``CONFIG_UNREADABLE``) or a config, with no descriptor left open.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from fuzz._harness import instrumented, main, no_fd_leak

with instrumented(__name__, include=("handoffd", "tomllib")):
    from handoffd.config import load_config
    from handoffd.minor import Minor
    from handoffd.status import GSSError

_DIR = Path(tempfile.mkdtemp(prefix="handoffd-fuzz-config-"))
atexit.register(shutil.rmtree, _DIR, True)
_FILE = _DIR / "handoffd.toml"


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    _FILE.write_bytes(data)
    with no_fd_leak():
        try:
            load_config(_FILE)
        except GSSError as error:
            if error.minor not in (Minor.CONFIG_INVALID, Minor.CONFIG_UNREADABLE):
                raise AssertionError(f"config error with minor {error.minor}") from None


if __name__ == "__main__":
    main(TestOneInput)
