"""Replay the fuzz corpus through the fuzz targets, without atheris, so fixed bugs stay fixed.

Every file in ``fuzz/corpus/<target>/`` (the generated ``seed-*`` inputs and
any ``crash-*`` reproducers) goes through ``fuzz.fuzz_<target>.TestOneInput``,
the very function libFuzzer calls: it raises unless the parser returned or
raised ``GSSError`` and left no descriptor open.  Reproducers of bugs that
are reported but not fixed yet are listed in ``fuzz/known_open.txt`` and run
as strict xfails: they show in the summary, and the day the fix lands the
XPASS tells you to delete the line.
"""

from __future__ import annotations

import builtins
import importlib
from collections.abc import Callable
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"


def _known_open() -> dict[str, tuple[type[BaseException], str]]:
    """``known_open.txt``: reproducer name -> (the exception it must still raise, why)."""
    known = {}
    for line in (FUZZ / "known_open.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, exception, reason = line.split(maxsplit=2)
            known[name] = (getattr(builtins, exception), reason)
    return known


KNOWN_OPEN = _known_open()
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py"))


def _cases() -> list[object]:
    cases: list[object] = []
    for target in TARGETS:
        for path in sorted((FUZZ / "corpus" / target).glob("*")):
            name = f"{target}/{path.name}"
            marks = []
            if name in KNOWN_OPEN:
                raises, reason = KNOWN_OPEN[name]
                marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=reason))
            cases.append(pytest.param(target, path, id=name, marks=marks))
    return cases


def _target(name: str) -> Callable[[bytes], None]:
    module = importlib.import_module(f"fuzz.fuzz_{name}")
    test_one_input: Callable[[bytes], None] = module.TestOneInput
    return test_one_input


def test_every_target_has_seeds() -> None:
    """A target without a corpus would replay nothing here."""
    assert TARGETS
    for target in TARGETS:
        assert any(p.name.startswith("seed-") for p in (FUZZ / "corpus" / target).glob("*")), target


def test_known_open_entries_exist() -> None:
    """A stale known_open.txt line would silently excuse nothing."""
    for name in KNOWN_OPEN:
        assert (FUZZ / "corpus" / name).is_file(), name


@pytest.mark.parametrize(("target", "path"), _cases())
def test_corpus_input_keeps_the_invariant(target: str, path: Path) -> None:
    """Only GSSError may escape the parser, and no descriptor may leak."""
    _target(target)(path.read_bytes())
