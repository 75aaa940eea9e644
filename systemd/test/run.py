"""``make test-systemd``: README's systemd install, run as written in a real systemd.

A Debian 12 (bookworm) root file system (debootstrap, cached under
``.systemd-test/``) is copied, this checkout's tracked files are put in ``/root/handoffd``,
and the copy is booted with ``systemd-nspawn --boot``: systemd 252 as PID 1 of the
container.  Then, inside it, as root:

1. README's block marked ``systemd-install`` runs **verbatim** in ``/root/handoffd``
   (``bash -euo pipefail``): venv in /opt, symlink, units, sysusers, tmpfiles, config, key,
   ``systemctl enable --now``, and its own ``handoffd connect`` echo;
2. checks: both units active; the journal has the acceptor's fingerprint line, the same
   fingerprint as ``/etc/handoffd/server.key.pub``; the ExecStartPre check passed;
   the acceptor runs as ``handoffd`` and the workers under uids from 70000-70255;
3. clients in a loop (4 at a time) through ``systemctl reload``, ``systemctl restart``
   and ``systemctl kill -s USR2 --kill-whom=main`` (with a session left open across it,
   which goes on): zero failures, the workers replaced each time;
4. README's stop line: nothing listens on 7443 afterwards and no process of the
   acceptor's or a worker's uid is left.

Nothing is substituted in README's block.  The container shares the host's network (the
venv's ``pip install`` reaches PyPI, trusting the host's CA bundle, copied in as ``make
test-docker`` does; port 7443 must be free on the host) and is allowed
the keyring syscalls that systemd-nspawn filters by default (the unit's key parking).
Needs root, Debian's ``systemd-container`` and ``debootstrap`` (installed if missing) and
Debian's mirror.  Prints PASS/FAIL lines and exits 1 on any failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".systemd-test"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,iproute2,procps,ca-certificates"
MIRROR = "http://deb.debian.org/debian"
MARKER = "<!-- systemd-install: make test-systemd runs the next block verbatim -->"
STOP_LINE = "systemctl stop handoffd.socket handoffd.service"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
FAILURES: list[str] = []


def say(text: str) -> None:
    print(f"test-systemd: {text}", flush=True)


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}",
          flush=True)
    if not ok:
        FAILURES.append(name)


def readme_block() -> str:
    """The shell block right after README's marker, exactly as written."""
    text = (ROOT / "README.md").read_text()
    after = text.split(MARKER, 1)[1]
    match = re.match(r"\s*```sh\n(.*?)```", after, re.DOTALL)
    if match is None:
        raise SystemExit("README.md: no ```sh block after the systemd-install marker")
    if STOP_LINE not in after.split("##", 1)[0]:
        raise SystemExit(f"README.md: the stop line {STOP_LINE!r} is not after the block")
    return match[1]


def ensure_tools() -> None:
    missing = [p for p, tool in (("systemd-container", "systemd-nspawn"),
                                 ("debootstrap", "debootstrap")) if not shutil.which(tool)]
    if missing:
        say(f"installing {', '.join(missing)} (Debian packages)")
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                       check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def rootfs() -> Path:
    """The cached pristine bookworm root (built once per package list)."""
    key = hashlib.sha256(f"{PACKAGES} {MIRROR}".encode()).hexdigest()[:12]
    cached = CACHE / f"rootfs-{key}"
    if cached.is_dir():
        return cached
    CACHE.mkdir(exist_ok=True)
    building = CACHE / f"building-{key}"
    shutil.rmtree(building, ignore_errors=True)
    say(f"debootstrap bookworm into {cached} (once; a few minutes)")
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                    str(building), MIRROR], check=True, stdout=subprocess.DEVNULL)
    # A fresh Debian machine has package lists: README's apt-get line needs them.
    subprocess.run(["chroot", str(building), "apt-get", "update"], check=True,
                   stdout=subprocess.DEVNULL)
    building.rename(cached)
    return cached


def copy_checkout(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            destination = target / name.decode()
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


class Container:
    """A booted copy of the root file system; ``run`` executes inside it."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--directory", str(root), "--register=no",
             "--keep-unit", "--resolv-conf=copy-host", "--boot",
             "--system-call-filter=add_key keyctl request_key",
             "--machine=handoffd-test"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.leader = self._leader()

    def _leader(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"systemd-nspawn exited ({self.process.returncode}); see "
                                 f"{self.log.name}")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            time.sleep(0.2)
        raise SystemExit("the container's systemd did not start")

    def run(self, script: str, *, timeout: float = 600, cwd: str = "/root/handoffd"
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "--target", str(self.leader), "--all", "--",
             "/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
             "/sbin:/bin", "HOME=/root", "LANG=C.UTF-8", "bash", "-c",
             f"cd {cwd} && {script}"],
            capture_output=True, text=True, timeout=timeout, check=False)

    def wait_booted(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = self.run("systemctl is-system-running", cwd="/").stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise SystemExit("the container never finished booting")

    def stop(self) -> None:
        self.run("systemctl poweroff --no-block", cwd="/")
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


CLIENT_LOOP = r"""
import sys, threading, time, trio
from handoffd.client import connect, fingerprint, load_public_key
pin = fingerprint(load_public_key("/etc/handoffd/server.key.pub"))
ok = failed = 0
errors = []
stop_at = time.monotonic() + float(sys.argv[1])
async def client():
    global ok, failed
    while time.monotonic() < stop_at:
        try:
            with trio.fail_after(10):
                stream = await connect("127.0.0.1", 7443, server_fingerprint=pin)
                async with stream:
                    await stream.send_all(b"ping")
                    got = b""
                    while len(got) < 4:
                        got += await stream.receive_some()
                    assert got == b"ping", got
            ok += 1
        except Exception as error:
            failed += 1
            errors.append(repr(error))
async def main():
    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(client)
trio.run(main)
print(f"ok={ok} failed={failed} {errors[:3]}")
"""


IDLE_SESSION = r"""
import sys, trio
from handoffd.client import connect, fingerprint, load_public_key
pin = fingerprint(load_public_key("/etc/handoffd/server.key.pub"))
async def echo(stream, data):
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        got += await stream.receive_some()
    assert got == data, got
async def main():
    stream = await connect("127.0.0.1", 7443, server_fingerprint=pin)
    async with stream:
        await echo(stream, b"before")
        await trio.sleep(float(sys.argv[1]))
        await echo(stream, b"after")
    print("idle session ok")
trio.run(main)
"""


def status_of(box: Container) -> dict[str, Any]:
    result = box.run("handoffd status --json --control /run/handoffd/control.sock")
    try:
        status: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        return {"error": result.stderr}
    return status


def clients_through(box: Container, command: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """4 client loops for 12 s, ``command`` run 3 s in; their summary and its result."""
    loop = subprocess.Popen(
        ["nsenter", "--target", str(box.leader), "--all", "--", "/opt/handoffd/bin/python",
         "/tmp/loop.py", "12"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    result = box.run(command)
    out, _ = loop.communicate(timeout=60)
    time.sleep(1)  # the new workers report ready
    return out, result


def inside_checks(box: Container) -> None:
    units = box.run("systemctl is-active handoffd.socket handoffd.service").stdout.split()
    check("both units active after README's block", units == ["active", "active"], str(units))
    pub = box.run("cat /etc/handoffd/server.key.pub").stdout.split()
    journal = box.run("journalctl -u handoffd.service --no-pager -o cat").stdout
    pinned = box.run("/opt/handoffd/bin/python -c 'import sys; from handoffd.client import "
                     "fingerprint, load_public_key; print(fingerprint(load_public_key("
                     "\"/etc/handoffd/server.key.pub\")))'").stdout.strip()
    check("the journal shows the acceptor's fingerprint", bool(pub) and pinned != ""
          and f"fingerprint {pinned}" in journal, journal[-1500:])
    check("ExecStartPre's serve --check passed", "config /etc/handoffd/handoffd.toml: OK"
          in journal, journal[-1500:])
    status = status_of(box)
    worker_uids = [w["uid"] for w in status.get("workers", [])]
    check("workers run under uids 70000-70255", len(worker_uids) == 4
          and all(70000 <= uid <= 70255 for uid in worker_uids), str(status)[-800:])
    acceptor_user = box.run(f"ps -o user= -p {status.get('pid', 0)}").stdout.strip()
    check("the acceptor runs as the user handoffd", acceptor_user == "handoffd", acceptor_user)

    before = {w["pid"] for w in status.get("workers", [])}
    box.run(f"cat > /tmp/loop.py <<'EOF'\n{CLIENT_LOOP}\nEOF", cwd="/")
    for command in ("systemctl reload handoffd.service", "systemctl restart handoffd.service"):
        out, result = clients_through(box, command)
        served = re.search(r"ok=(\d+) failed=(\d+)", out)
        check(f"clients in a loop through {command}: zero failures",
              result.returncode == 0 and served is not None and int(served[1]) > 0
              and served[2] == "0", out + result.stderr)
        after = {w["pid"] for w in status_of(box).get("workers", []) if w["state"] == "ready"}
        check(f"{command} replaced the workers", len(after) == 4 and not before & after,
              f"{before} -> {after}")
        before = after

    # SIGUSR2 to the main pid with a session open across it (README, Operations)
    box.run(f"cat > /tmp/idle.py <<'EOF'\n{IDLE_SESSION}\nEOF", cwd="/")
    idle = subprocess.Popen(
        ["nsenter", "--target", str(box.leader), "--all", "--", "/opt/handoffd/bin/python",
         "/tmp/idle.py", "14"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1)
    command = "systemctl kill -s USR2 --kill-whom=main handoffd.service"
    out, result = clients_through(box, command)
    served = re.search(r"ok=(\d+) failed=(\d+)", out)
    check("clients in a loop through SIGUSR2 with a session open: zero failures",
          result.returncode == 0 and served is not None and int(served[1]) > 0
          and served[2] == "0", out + result.stderr)
    idle_out, _ = idle.communicate(timeout=60)
    check("the session open across SIGUSR2 goes on and ends cleanly", "idle session ok"
          in idle_out, idle_out)
    after = {w["pid"] for w in status_of(box).get("workers", []) if w["state"] == "ready"}
    check("SIGUSR2 replaced the workers", len(after) == 4 and not before & after,
          f"{before} -> {after}")

    stop = box.run(STOP_LINE)
    time.sleep(1)
    listening = box.run("ss -Hltn 'sport = :7443'").stdout.strip()
    left = box.run("ps -eo uid= | awk '$1 >= 70000 && $1 <= 70255' | wc -l; "
                   "ps -u handoffd -o pid= | wc -l").stdout.split()
    check("README's stop line leaves nothing listening or running",
          stop.returncode == 0 and not listening and left == ["0", "0"],
          f"{stop.stderr} listening={listening!r} left={left}")


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("test-systemd needs root (systemd-nspawn)")
    started = time.monotonic()
    block = readme_block()
    ensure_tools()
    pristine = rootfs()
    with tempfile.TemporaryDirectory(prefix="handoffd-systemd-", dir=CACHE) as work:
        root = Path(work) / "root"
        say("copying the root file system and this checkout")
        subprocess.run(["cp", "-a", "--reflink=auto", str(pristine), str(root)], check=True)
        copy_checkout(root / "root" / "handoffd")
        if HOST_CA.exists():
            # As make test-docker does: pip in the container trusts what this host's pip
            # trusts (a proxy's CA here); on an open network the bundles are the same.
            shutil.copy(HOST_CA, root / "etc/ssl/certs/ca-certificates.crt")
        box = Container(root, CACHE / "boot.log")
        try:
            box.wait_booted()
            say("booted; running README's systemd block as written")
            result = box.run(f"bash -euo pipefail <<'README'\n{block}README\n")
            check("README's systemd block runs verbatim", result.returncode == 0,
                  (result.stdout + result.stderr)[-3000:])
            check("its handoffd connect echoed", "hello" in result.stdout,
                  result.stdout[-500:])
            if result.returncode == 0:
                inside_checks(box)
        finally:
            box.stop()
    say(f"{'all checks passed' if not FAILURES else f'{len(FAILURES)} failed'} "
        f"({time.monotonic() - started:.0f}s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
