"""Fuzz ``parse_config`` on whatever ``tomllib.loads`` makes of the input.

Input: UTF-8 TOML text.  Text that is not UTF-8 or not TOML never reaches
handoffd here (``fuzz_config_file`` covers those paths through
``load_config``), so this target spends its time inside the validation.
"""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path

from fuzz._harness import instrumented, main, no_fd_leak

with instrumented(__name__):
    from handoffd.config import parse_config
    from handoffd.status import GSSError

_BASE = Path("/nonexistent/fuzz")


def TestOneInput(data: bytes) -> None:
    """One input: see the module docstring."""
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return  # not handoffd's code; fuzz_config_file checks load_config's handling
    with no_fd_leak(), contextlib.suppress(GSSError):
        parse_config(document, base=_BASE)


if __name__ == "__main__":
    main(TestOneInput)
