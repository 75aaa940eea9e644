"""Every environment variable handoffd's processes pass each other is named once, in
``handoffd.environment``: no module spells a ``HANDOFFD_*`` name of its own."""

from __future__ import annotations

import re
from pathlib import Path

from handoffd import environment

PACKAGE = Path(environment.__file__).parent
PREFIXES = {"HANDOFFD_PARKING_", "HANDOFFD_SUPERVISOR"}  # scrubbed as families (spawner)


def test_no_module_spells_a_handoffd_variable_of_its_own() -> None:
    names = {value for key, value in vars(environment).items()
             if key.isupper() and isinstance(value, str)}
    assert all(name.startswith(environment.PREFIX) for name in names)
    for path in PACKAGE.rglob("*.py"):
        if path == Path(environment.__file__):
            continue
        for literal in re.findall(r'"(HANDOFFD_[A-Z_]*)"', path.read_text()):
            assert literal in PREFIXES, f"{path}: {literal} (name it in handoffd.environment)"
    for prefix in PREFIXES:
        assert any(name.startswith(prefix) for name in names)
