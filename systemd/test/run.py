"""``make test-systemd``: README's systemd install, run as written in a real systemd.

A Debian 12 (bookworm) root file system (debootstrap ``--variant=minbase`` with systemd,
no Python: README's own ``apt-get`` line installs it; cached under ``.systemd-test/``) is
copied, this checkout's tracked files are put in ``/root/handoffd``, and the copy is
booted with ``systemd-nspawn --boot``: systemd 252 as PID 1 of the container.  Then,
inside it, as root:

1. README's block marked ``systemd-install`` runs **verbatim** in ``/root/handoffd``
   (``bash -euo pipefail``): packages, venv in /opt, symlink, units, sysusers, tmpfiles,
   config, key, ``systemctl enable --now``, and its own ``handoffd connect`` echo;
2. checks: both units active; the journal has the acceptor's fingerprint line, the same
   fingerprint as ``/etc/handoffd/server.key.pub``; the ExecStartPre check passed; the
   acceptor runs as ``handoffd``, the workers under uids from 70000-70255, keys parked in
   the kernel keyring (the unit's system call filter allows it);
3. clients in a loop (4 at a time) through ``systemctl reload``, ``systemctl restart``
   and ``systemctl kill -s USR2 --kill-whom=main`` (with a session left open across it,
   which goes on): zero failures, the workers replaced each time;
4. socket activation: the service stopped alone, the socket still listens, README's
   connect line starts the service again and is echoed (why README stops both units);
5. README's stop line (the backquoted ``systemctl stop ...`` after the block): nothing
   listens on 7443 afterwards and no process of the acceptor's or a worker's uid is left;
6. the container is booted again: both units are up at boot (``enable``) and serve.

Then a second fresh copy runs docs/DEPLOY.md's walk-through (marked the same way)
verbatim: its echo, its ``systemctl status`` showing the workers ready, its ``handoffd
status``, and nothing left after its last line (the stop).

Nothing is substituted in either block.  The container shares the host's network (the
venv's ``pip install`` reaches PyPI, trusting the host's CA bundle, copied in as ``make
test-docker`` does; port 7443 must be free on the host: waited for) and is allowed the
keyring syscalls that systemd-nspawn filters by default (the unit's key parking).  Needs
root, Debian's ``systemd-container`` and ``debootstrap`` (installed if missing) and
Debian's mirror.  Prints PASS/FAIL lines and ``N passed, M failed``; exits 1 on any
failure.  Bounded by HANDOFFD_SYSTEMD_TIMEOUT seconds (default 900) as a whole.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".systemd-test"
# No python3 here: README's apt-get line must bring it, as on a minimal Debian install.
PACKAGES = "systemd,systemd-sysv,dbus,iproute2,procps,ca-certificates"
MIRROR = "http://deb.debian.org/debian"
MARKER = "<!-- systemd-install: make test-systemd runs the next block verbatim -->"
PORT = 7443
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
TIMEOUT = float(os.environ.get("HANDOFFD_SYSTEMD_TIMEOUT", "900"))
PORT_WAIT = float(os.environ.get("HANDOFFD_SYSTEMD_PORT_WAIT", "300"))
PASSED: list[str] = []
FAILURES: list[str] = []


class Abort(Exception):
    """A step that the remaining checks cannot go on without failed (or time ran out)."""


STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"test-systemd: [{time.monotonic() - STARTED:3.0f} s] {text}", flush=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}",
          flush=True)
    (PASSED if ok else FAILURES).append(name)
    return ok


def marked_block(document: Path) -> tuple[str, str]:
    """The ``sh`` block right after ``document``'s marker, exactly as written, and the
    text that follows it up to the next heading."""
    text = document.read_text()
    if text.count(MARKER) != 1:
        raise Abort(f"{document.name}: expected the marker {MARKER!r} exactly once")
    after = text.split(MARKER, 1)[1]
    match = re.match(r"\s*```sh\n(.*?)```", after, re.DOTALL)
    if match is None:
        raise Abort(f"{document.name}: no ```sh block after the systemd-install marker")
    return match[1], after[match.end():].split("\n#", 1)[0]


def readme_commands() -> tuple[str, str, str]:
    """README's block, its stop command (the one backquoted ``systemctl stop`` in the
    prose after it) and its client line (the block's ``handoffd connect`` line)."""
    block, prose = marked_block(ROOT / "README.md")
    stops = re.findall(r"`(systemctl stop [^`]+)`", prose)
    if len(stops) != 1:
        raise Abort(f"README.md: expected one `systemctl stop ...` after the block: {stops}")
    clients = [line for line in block.splitlines() if "handoffd connect" in line]
    if len(clients) != 1:
        raise Abort(f"README.md: expected one handoffd connect line in the block: {clients}")
    return block, stops[0], clients[0]


def port_in_use() -> bool:
    probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::", PORT))
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        return True
    finally:
        probe.close()
    return False


def take_host_lock() -> int:
    """One run of this suite per host at a time (they would share port 7443); the lock
    goes with the process.  Waiting for it is bounded by the suite's SIGALRM."""
    fd = os.open("/run/lock/handoffd-test-systemd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say("another make test-systemd runs on this host; waiting for it")
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def wait_port_free() -> None:
    """The container shares the host's network: 7443 must be free here.  Another run of
    this suite (or anything else) holding it is waited for, up to PORT_WAIT seconds."""
    deadline = time.monotonic() + PORT_WAIT
    if port_in_use():
        say(f"port {PORT} is in use on this host; waiting up to {PORT_WAIT:.0f} s for it")
    while port_in_use():
        if time.monotonic() > deadline:
            raise Abort(f"port {PORT} is still in use on this host (ss -ltnp 'sport = "
                        f":{PORT}'); the container shares the host's network, so README's "
                        "socket cannot bind")
        time.sleep(2)


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
    say(f"debootstrap bookworm into {cached} (once; a minute or two)")
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                    str(building), MIRROR], check=True, stdout=subprocess.DEVNULL,
                   timeout=TIMEOUT)
    building.rename(cached)
    for old in CACHE.glob("rootfs-*"):
        if old != cached:
            shutil.rmtree(old, ignore_errors=True)
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


def fresh_copy(pristine: Path, root: Path) -> None:
    """A copy of the cached root with this checkout in /root/handoffd."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(pristine), str(root)], check=True)
    copy_checkout(root / "root" / "handoffd")
    if HOST_CA.exists():
        # As make test-docker does: pip in the container trusts what this host's pip
        # trusts (a proxy's CA here); on an open network the bundles are the same.
        shutil.copy(HOST_CA, root / "etc/ssl/certs/ca-certificates.crt")


class Container:
    """A booted root directory; ``run`` executes inside it."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--directory", str(root), "--register=no",
             "--keep-unit", "--resolv-conf=copy-host", "--boot",
             "--system-call-filter=add_key keyctl request_key",
             "--machine=handoffd-test"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.leader = self._leader()
        self._wait_booted()

    def _leader(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Abort(f"systemd-nspawn exited ({self.process.returncode}); see "
                            f"{self.log.name}")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            time.sleep(0.2)
        raise Abort("the container's systemd did not start")

    def run(self, script: str, *, timeout: float = 600, cwd: str = "/root/handoffd"
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "--target", str(self.leader), "--all", "--",
             "/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
             "/sbin:/bin", "HOME=/root", "LANG=C.UTF-8", "bash", "-c",
             f"cd {cwd} && {script}"],
            capture_output=True, text=True, timeout=timeout, check=False)

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = self.run("systemctl is-system-running", cwd="/").stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise Abort("the container never finished booting")

    def stop(self) -> None:
        try:
            self.run("systemctl poweroff --no-block", cwd="/", timeout=30)
            self.process.wait(timeout=60)
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


def units(box: Container) -> list[str]:
    return box.run("systemctl is-active handoffd.socket handoffd.service").stdout.split()


def listening(box: Container) -> str:
    return box.run(f"ss -Hltn 'sport = :{PORT}'").stdout.strip()


def nothing_left(box: Container, name: str, stop: subprocess.CompletedProcess[str]) -> None:
    time.sleep(1)
    port = listening(box)
    left = box.run("ps -eo uid= | awk '$1 >= 70000 && $1 <= 70255' | wc -l; "
                   "ps -u handoffd -o pid= | wc -l").stdout.split()
    check(name, stop.returncode == 0 and not port and left == ["0", "0"]
          and units(box) == ["inactive", "inactive"],
          f"{stop.stderr} listening={port!r} left={left} units={units(box)}")


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


def block_failure(box: Container, result: subprocess.CompletedProcess[str]) -> str:
    """The end of a failed block's output and of the service's journal (pip's progress
    would bury why the unit did not start)."""
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-8:])
    journal = box.run("journalctl -u handoffd.service --no-pager -o cat -n 12").stdout
    return f"{tail}\n--- journalctl -u handoffd.service:\n{journal}"


def installed_checks(box: Container) -> None:
    check("both units active after README's block", units(box) == ["active", "active"],
          str(units(box)))
    journal = box.run("journalctl -u handoffd.service --no-pager -o cat").stdout
    pinned = box.run("/opt/handoffd/bin/python -c 'from handoffd.client import "
                     "fingerprint, load_public_key; print(fingerprint(load_public_key("
                     "\"/etc/handoffd/server.key.pub\")))'").stdout.strip()
    check("the journal shows the acceptor's fingerprint, the installed key's",
          pinned.startswith("SHA256:") and f"fingerprint {pinned}" in journal,
          journal[-1500:])
    check("ExecStartPre's serve --check passed", "config /etc/handoffd/handoffd.toml: OK"
          in journal, journal[-1500:])
    status = status_of(box)
    worker_uids = [w["uid"] for w in status.get("workers", [])]
    check("workers run under uids 70000-70255", len(worker_uids) == 4
          and all(70000 <= uid <= 70255 for uid in worker_uids), str(status)[-800:])
    acceptor_user = box.run(f"ps -o user= -p {status.get('pid', 0)}").stdout.strip()
    check("the acceptor runs as the user handoffd", acceptor_user == "handoffd", acceptor_user)
    check("keys are parked in the kernel keyring under the unit's filter",
          status.get("key_parking") == "keyring", str(status.get("key_parking")))


def reload_and_restart(box: Container) -> None:
    """Client loops through systemctl reload, restart and SIGUSR2 (a session open across
    the last), each replacing every worker."""
    before = {w["pid"] for w in status_of(box).get("workers", [])}
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


def socket_activation(box: Container, client: str) -> None:
    """What README's stop sentence says: the socket alone starts the service again."""
    stopped = box.run("systemctl stop handoffd.service")
    alone = units(box)
    check("the service stopped alone leaves the socket listening",
          stopped.returncode == 0 and alone == ["active", "inactive"] and bool(listening(box)),
          f"{stopped.stderr} units={alone}")
    echoed = box.run(client, timeout=60)
    check("README's connect line, sent to the socket alone, starts the service and is echoed",
          echoed.returncode == 0 and "hello" in echoed.stdout
          and units(box) == ["active", "active"],
          f"rc={echoed.returncode} {echoed.stdout[-300:]} {echoed.stderr[-500:]} "
          f"units={units(box)}")


def readme_run(pristine: Path, work: Path, log: Path) -> None:
    block, stop_line, client = readme_commands()
    root = work / "readme"
    say("README: copying the root file system and this checkout")
    fresh_copy(pristine, root)
    box = Container(root, log)
    try:
        say("README: booted; running its systemd block as written")
        result = box.run(f"bash -euo pipefail <<'README'\n{block}README\n")
        if not check("README's systemd block runs verbatim", result.returncode == 0,
                     block_failure(box, result)):
            return
        check("its handoffd connect echoed", "hello" in result.stdout, result.stdout[-500:])
        say("README: its block ran; checking the installed service")
        installed_checks(box)
        say("README: clients through reload, restart and SIGUSR2")
        reload_and_restart(box)
        say("README: socket activation, then README's stop line")
        socket_activation(box, client)
        nothing_left(box, f"README's stop line ({stop_line}) leaves nothing listening or "
                     "running", box.run(stop_line))
    finally:
        box.stop()
    say("README: booting the container again")
    box = Container(root, log)
    try:
        check("both units are up at boot (enabled), before any connection",
              units(box) == ["active", "active"], str(units(box)))
        echoed = box.run(client, timeout=60)
        check("after the reboot README's connect line is echoed", "hello" in echoed.stdout,
              echoed.stdout[-300:] + echoed.stderr[-500:])
    finally:
        box.stop()


def deploy_run(pristine: Path, work: Path, log: Path) -> None:
    block, _ = marked_block(ROOT / "docs" / "DEPLOY.md")
    root = work / "deploy"
    say("DEPLOY.md: a fresh copy; running its walk-through as written")
    fresh_copy(pristine, root)
    box = Container(root, log)
    try:
        result = box.run(f"bash -euo pipefail <<'DEPLOY'\n{block}DEPLOY\n")
        if not check("DEPLOY.md's walk-through runs verbatim", result.returncode == 0,
                     block_failure(box, result)):
            return
        check("its handoffd connect echoed", "hello" in result.stdout, result.stdout[-500:])
        check("its systemctl status shows STATUS= with the workers ready",
              re.search(r"Status: \"4/4 workers ready", result.stdout) is not None,
              result.stdout[-1500:])
        rows = re.findall(r"^ +\d+ +\d+ +(\d+) +ready ", result.stdout, re.MULTILINE)
        check("its handoffd status shows the separation and 4 workers ready under their uids",
              "separated: acceptor uid" in result.stdout and len(rows) == 4
              and all(70000 <= int(uid) <= 70255 for uid in rows), result.stdout[-1500:])
        nothing_left(box, "its last line (the stop) leaves nothing listening or running",
                     result)
    finally:
        box.stop()


def on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Abort(f"HANDOFFD_SYSTEMD_TIMEOUT: {TIMEOUT:.0f} s passed")


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("test-systemd needs root (systemd-nspawn)")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(TIMEOUT))
    try:
        readme_commands()
        marked_block(ROOT / "docs" / "DEPLOY.md")
        take_host_lock()  # first: two runs in one checkout would share the root's build
        ensure_tools()
        pristine = rootfs()
        wait_port_free()
        log = CACHE / "boot.log"
        log.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="handoffd-systemd-", dir=CACHE) as work:
            readme_run(pristine, Path(work), log)
            deploy_run(pristine, Path(work), log)
    except (Abort, subprocess.SubprocessError) as error:
        check("the suite ran to the end", False, str(error))
    finally:
        signal.alarm(0)
    say(f"{len(PASSED)} passed, {len(FAILURES)} failed "
        f"({time.monotonic() - STARTED:.0f} s; containers' console: {CACHE / 'boot.log'})")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
