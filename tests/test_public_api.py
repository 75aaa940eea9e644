"""The public API: ``handoffd``, ``handoffd.worker`` and ``handoffd.client`` re-export
what embedders use, explicitly (as trio does), and the documentation imports only those."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ("handoffd", "handoffd.worker", "handoffd.client")


@pytest.mark.parametrize("name", PUBLIC)
def test_all_lists_exactly_the_public_names_and_each_is_documented(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__)
    defined = {n for n in vars(module) if not n.startswith("_")} - {"annotations"}
    submodules = {n for n in defined if type(vars(module)[n]).__name__ == "module"}
    assert exported == defined - submodules | ({"__version__"} & exported)
    assert module.__all__ == sorted(module.__all__, key=str)
    for item in exported - {"__version__"}:
        assert getattr(module, item).__doc__, f"{name}.{item} has no docstring"


@pytest.mark.parametrize("name", ["handoffd.worker", "handoffd.client"])
def test_re_exports_are_explicit(name: str) -> None:
    # "from x import y as y": a type checker treats only these as re-exports (PEP 484)
    source = (ROOT / (name.replace(".", "/") + ".py")).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                assert alias.asname == alias.name, f"{name}: import {alias.name} without 'as'"


def test_the_readme_and_examples_import_only_public_modules() -> None:
    texts = [ROOT / "README.md", *sorted((ROOT / "examples").rglob("*.py"))]
    private = re.compile(r"^\s*(from|import) handoffd\.(runtime|core|kernel|mech)\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in texts if private.search(p.read_text())]
    allowed = {"examples/echo/demo.py"}  # drives the daemon's control socket, as the CLI does
    assert set(offenders) <= allowed, offenders
