"""Gate for tests/lsm: these tests need real SELinux labels and run only inside the VM.

``make test-lsm`` boots a qemu guest with SELinux enforcing (see lsm/run.sh) and runs this
directory there.  On any other machine the stdlib-only module is collected and skipped
with the reason below, and the modules that import the project's kernel adapters are not
even imported, so a plain ``pytest`` never breaks because of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ENFORCE = Path("/sys/fs/selinux/enforce")
SKIP_REASON = (
    "needs SELinux enforcing (/sys/fs/selinux/enforce = 1): run `make test-lsm`, "
    "which boots a VM for these tests"
)


def _selinux_enforcing() -> bool:
    try:
        return ENFORCE.read_text().strip() == "1"
    except OSError:
        return False


IN_GUEST = _selinux_enforcing()

# Modules that import handoffd's kernel adapters are only imported in the guest.
collect_ignore_glob = [] if IN_GUEST else ["test_lsm_handoffd_*.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test of this directory unless SELinux is enforcing."""
    if IN_GUEST:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """In the guest, print one ``LSM-CASE <outcome> <nodeid>`` line per test for the host."""
    if not IN_GUEST:
        return
    for outcome in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if outcome == "passed" and getattr(report, "when", "call") != "call":
                continue
            terminalreporter.write_line(f"LSM-CASE {outcome} {nodeid}")
    from lsm_support import observed_labels

    for who, raw in observed_labels():
        terminalreporter.write_line(f"LSM-LABEL {who} {raw!r}")
