"""Shared plumbing of the fuzz targets: instrumentation, the invariant, the entry point.

Every target module defines ``TestOneInput(data: bytes) -> None`` which feeds
``data`` to one parser and raises (so libFuzzer records a crash) when the
invariant breaks: the parser may return or raise ``GSSError``, nothing else,
and may leave no file descriptor behind.

The targets are importable without atheris: instrumentation happens only when
a target runs as ``__main__`` (``python -m fuzz.fuzz_window``).  That is how
``tests/test_fuzz_corpus.py`` replays the corpus under plain pytest.  This
module must not import handoffd itself, or the imports would escape
instrumentation.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

INSTRUMENTED_PACKAGES = ("handoffd",)


def instrumented(module_name: str, include: tuple[str, ...] = INSTRUMENTED_PACKAGES) -> Any:
    """Context manager for a target's imports: atheris coverage only when run as a script."""
    if module_name != "__main__":
        return contextlib.nullcontext()
    import atheris  # type: ignore[import-untyped]  # only the fuzzing run needs it

    return atheris.instrument_imports(include=list(include))


def open_fd_count() -> int:
    """How many file descriptors this process has open (listdir's own fd is constant)."""
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def no_fd_leak() -> Iterator[None]:
    """Fail if the body leaves more (or fewer) descriptors open than it found."""
    before = open_fd_count()
    yield
    after = open_fd_count()
    if after != before:
        raise AssertionError(f"file descriptor leak: {before} open before, {after} after")


def u16_chunks(data: bytes) -> Iterator[bytes]:
    """Split ``data`` into length-prefixed pieces: u16 BE length, then that many bytes."""
    offset = 0
    while offset + 2 <= len(data):
        length = int.from_bytes(data[offset : offset + 2], "big")
        offset += 2
        yield data[offset : offset + length]
        offset += length


def u16_join(pieces: list[bytes]) -> bytes:
    """The inverse of :func:`u16_chunks`, for building seeds."""
    return b"".join(len(p).to_bytes(2, "big") + p for p in pieces)


def main(test_one_input: Callable[[bytes], None]) -> None:
    """Run libFuzzer on ``test_one_input`` with the command line's options and corpus dirs."""
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
