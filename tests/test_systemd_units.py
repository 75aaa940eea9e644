"""The shipped systemd units, checked by systemd's own tools.

``systemd-analyze verify`` fails a unit whose ExecStart= binary does not exist,
and the units name ``/usr/bin/handoffd`` (where a distribution package puts it),
which this checkout does not have. So the units are verified as a copy in a
temporary directory in which exactly that path, and nothing else, is replaced by
this virtualenv's real ``handoffd``: every other line is the shipped one.
Anything verify prints, warning or error, fails the test.

``systemd-analyze security --offline=true`` scores the hardening without a
running systemd. Measured with systemd 252 (Debian 12): handoffd.service 1.4
("OK"), handoffd-worker@.service 0.7 ("SAFE"). The thresholds below are those
scores, so any loosening fails here first.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from handoffd.config import WorkersConfig

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
HANDOFFD = Path(sys.executable).with_name("handoffd")
ANALYZE = shutil.which("systemd-analyze")
SHIPPED_BINARY = "/usr/bin/handoffd"

# systemd-analyze security --threshold compares against exposure x 10.
SERVICE_EXPOSURE_MAX = 14  # 1.4 measured
WORKER_EXPOSURE_MAX = 7  # 0.7 measured

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing: make deps-debian")


def _rewritten_units(target: Path) -> dict[str, Path]:
    """Copy every unit to ``target`` with /usr/bin/handoffd pointed at the venv."""
    assert HANDOFFD.exists(), HANDOFFD
    copies = {}
    for unit in sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".socket")):
        original = unit.read_text()
        rewritten = original.replace(SHIPPED_BINARY, str(HANDOFFD))
        changed = [
            (a, b) for a, b in zip(original.splitlines(), rewritten.splitlines(), strict=True)
            if a != b
        ]
        assert all(a.startswith("ExecStart=") for a, _ in changed), changed
        copies[unit.name] = target / unit.name
        copies[unit.name].write_text(rewritten)
    return copies


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60)


def test_every_unit_verifies_without_a_single_warning(tmp_path: Path) -> None:
    copies = _rewritten_units(tmp_path)
    assert set(copies) == {"handoffd.socket", "handoffd.service", "handoffd-worker@.service"}
    instance = tmp_path / "handoffd-worker@web.service"  # a template verifies as an instance
    result = _verify(copies["handoffd.socket"], copies["handoffd.service"], instance)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_verify_does_report_problems(tmp_path: Path) -> None:
    """The check above can fail: an unknown key and a missing binary are reported."""
    copies = _rewritten_units(tmp_path)
    service = copies["handoffd.service"]
    service.write_text(service.read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=x"))
    result = _verify(service)
    assert "Unknown key 'KilMode'" in result.stderr
    shipped = _verify(UNITS / "handoffd.service")
    assert "/usr/bin/handoffd is not executable" in shipped.stderr or (
        Path(SHIPPED_BINARY).exists() and shipped.returncode == 0)


@pytest.mark.parametrize(("unit", "maximum"), [
    ("handoffd.service", SERVICE_EXPOSURE_MAX),
    ("handoffd-worker@web.service", WORKER_EXPOSURE_MAX),
])
def test_security_exposure(tmp_path: Path, unit: str, maximum: int) -> None:
    _rewritten_units(tmp_path)
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", f"--threshold={maximum}",
         str(tmp_path / unit)],
        capture_output=True, text=True, timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert score is not None, result.stdout + result.stderr
    assert result.returncode == 0, f"exposure {score.group(1)} > {maximum / 10}"


def _settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_service_protocol_settings() -> None:
    service = _settings("handoffd.service")
    expected = {
        "Type": ["notify"], "NotifyAccess": ["main"], "KillMode": ["mixed"],
        "KeyringMode": ["private"], "RuntimeDirectory": ["handoffd"], "User": ["handoffd"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    }
    assert {key: service.get(key) for key in expected} == expected
    socket_unit = _settings("handoffd.socket")
    assert socket_unit["FileDescriptorName"] == ["handoffd"]
    assert socket_unit["Backlog"] == ["1024"]


def test_stop_timeout_outlasts_the_drain() -> None:
    """systemd's SIGKILL must not cut the drain the daemon promises its workers."""
    for unit in ("handoffd.service", "handoffd-worker@.service"):
        (stop,) = _settings(unit)["TimeoutStopSec"]
        assert float(stop) > WorkersConfig().drain_timeout, unit
    (watchdog,) = _settings("handoffd.service")["WatchdogSec"]
    assert float(watchdog) > 0


def _expand(groups: list[str]) -> set[str]:
    """Syscall names of filter groups and names, as systemd itself expands them."""
    assert ANALYZE is not None
    names: set[str] = set()
    for item in groups:
        if not item.startswith("@"):
            names.add(item)
            continue
        listing = subprocess.run([ANALYZE, "syscall-filter", "--no-pager", item],
                                 capture_output=True, text=True, check=True).stdout
        members = [line.strip() for line in listing.splitlines()[1:]
                   if line.strip() and not line.strip().startswith("#")]
        names |= _expand(members)
    return names


@pytest.mark.parametrize("unit", ["handoffd.service", "handoffd-worker@.service"])
def test_syscall_filter_allows_the_keyring_and_the_handoff(unit: str) -> None:
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in _settings(unit)["SystemCallFilter"]:
        if line.startswith("~"):
            denied |= _expand(line[1:].split())
        else:
            allowed |= _expand(line.split())
    needed = {
        "add_key", "keyctl", "request_key",  # key parking
        "socketpair", "sendmsg", "recvmsg", "accept4", "getsockopt",  # SCM_RIGHTS handoff
        "pidfd_open", "pidfd_send_signal", "wait4", "execve", "clone", "clone3",  # workers
        "epoll_wait", "epoll_ctl", "eventfd2",  # trio
        "prlimit64",  # os.sysconf("SC_OPEN_MAX") in listen_fds
    }
    assert needed <= allowed - denied, sorted(needed - (allowed - denied))


def test_memory_deny_write_execute_suits_python(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes, reproduced with the kernel's own switch
    (PR_SET_MDWE, which newer systemd uses too): CPython, cryptography, trio and the
    CLI run with W+X mappings refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(66, 0, 0, 0, 0) < 0:  # PR_GET_MDWE
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    program = (
        "import ctypes, mmap, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.prctl(65, 1, 0, 0, 0) == 0\n"  # PR_SET_MDWE, REFUSE_EXEC_GAIN
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    sys.exit('W+X mapping was allowed')\n"
        "except PermissionError:\n"
        "    pass\n"
        "import trio\n"
        "from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey\n"
        "from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305\n"
        "a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()\n"
        "ChaCha20Poly1305(a.exchange(b.public_key())).encrypt(bytes(12), b'x', b'')\n"
        "trio.run(trio.sleep, 0)\n"
        "import os\n"
        # MDWE survives execve: the real CLI, started like ExecStart=, runs under it.
        "os.execv(sys.argv[1], [sys.argv[1], 'display-status', '0x90000'])\n"
    )
    result = subprocess.run([sys.executable, "-c", program, str(HANDOFFD)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "Invalid token was supplied" in result.stdout


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_sysusers_creates_the_two_users(tmp_path: Path) -> None:
    """In a scratch root: the daemon's user, the worker user, and the worker in group
    handoffd (to reach /run/handoffd) but not the other way round."""
    (tmp_path / "etc").mkdir()
    sysusers = shutil.which("systemd-sysusers")
    assert sysusers is not None
    subprocess.run([sysusers, f"--root={tmp_path}", str(UNITS / "handoffd.sysusers")],
                   capture_output=True, text=True, check=True, timeout=60)
    users = {line.split(":")[0] for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {fields[0]: fields[3] for fields in
              (line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines())}
    assert users == {"handoffd", "handoffd-worker"}
    assert groups == {"handoffd": "handoffd-worker", "handoffd-worker": ""}
