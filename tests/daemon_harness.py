"""Start a real ``handoffd serve`` process for end-to-end tests, and talk to it."""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from examples.echo.demo import separation_lines
from handoffd.core.context import InitiatorContext
from handoffd.core.framing import FrameDecoder, FrameType, encode_frame, wrap_first_token
from handoffd.runtime.client import connect
from handoffd.runtime.control import query_control
from handoffd.runtime.stream import SecureStream
from handoffd.runtime.wire import read_frame
from handoffd.status import GSSError

REPO = Path(__file__).resolve().parents[1]
# To run a daemon or its workers as another user: the venv's interpreter lives under
# /root, which no other user can enter; Debian's python3.11 with the venv's packages can.
SYSTEM_PYTHON = "/usr/bin/python3.11"
SITE_PACKAGES = REPO / ".venv" / "lib" / "python3.11" / "site-packages"

# Run as root (CI), ``serve`` keeps a supervisor and runs the acceptor and each worker
# under uids of their own: numeric uids with no passwd entry, a block per daemon so
# that two daemons of one test never share a worker uid.  Far from every range a host
# uses (regular, DynamicUser, subuid, nspawn's up to 0x6FFFFFFF, the shipped configs'):
# the supervisor kills every process of a worker uid when it frees it.
# The blocks start at a place drawn per test run: two runs on one machine (two checkouts,
# CI beside a developer) must not share a worker uid, or one supervisor kills the other's
# workers when it frees the uid.
_UID_BLOCKS = itertools.count(secrets.randbelow(20_000) * 1000)


def separated_uids() -> tuple[int, tuple[int, int]]:
    """A fresh ``(acceptor uid, (first, last) worker uids)`` block."""
    base = 1_900_000_000 + 100 * (next(_UID_BLOCKS) % 20_000_000)  # < 2^32 - 2
    return base, (base + 1, base + 64)


def privsep_extra(directory: Path, acceptor_uid: int | None = None) -> str:
    """Config lines for the process model ``serve`` will run in: separated uids when the
    tests run as root, else the explicit same-uid opt-in (see the demo's
    :func:`~examples.echo.demo.separation_lines`)."""
    acceptor, workers = separated_uids()
    server, worker = separation_lines(directory, acceptor_uid or acceptor, workers)
    return f"[server]\n{server}[workers]\n{worker}"


@dataclass
class RunningDaemon:
    process: trio.Process
    directory: Path
    host: str
    port: int
    fingerprint: str
    control: Path

    acceptor_pid: int = 0

    @property
    def pid(self) -> int:
        """The acceptor's pid (the key holder; the supervisor is ``process.pid``)."""
        return self.acceptor_pid or self.process.pid

    async def status(self) -> dict[str, Any]:
        return await query_control(self.control)

    async def connect(self, **kw: Any) -> SecureStream:
        return await connect(self.host, self.port, server_fingerprint=self.fingerprint, **kw)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def worker_pids(self) -> list[int]:
        return [w["pid"] for w in (await self.status())["workers"] if w["state"] == "ready"]

    async def stop(self, timeout: float = 30) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            return await self.process.wait()


def write_config(directory: Path, *, workers: int = 4, app: str = "tests.apps:pid_echo",
                 extra: str = "", separated: bool = True,
                 acceptor_uid: int | None = None) -> Path:
    """``directory/handoffd.toml`` and a fresh key; ``extra`` lines override the
    defaults.  ``separated``: add the process model's uids (:func:`privsep_extra`)."""
    subprocess.run([sys.executable, "-m", "handoffd", "keygen", "--out",
                    str(directory / "server.key")], check=True, capture_output=True)
    if separated:
        extra = privsep_extra(directory, acceptor_uid) + "\n" + extra
    config = directory / "handoffd.toml"
    sections: dict[str, list[str]] = {
        "server": ['listen = ["127.0.0.1:0"]', 'key = "server.key"'],
        "workers": [f'app = "{app}"', f"count = {workers}", f"pythonpath = [{str(REPO)!r}]"],
        "control": ['socket = "control.sock"'],
    }
    section = None
    for line in extra.strip().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
            sections.setdefault(section, [])
        elif line and section:
            # A key given in ``extra`` replaces the harness default of the same name
            # (a shared ``[workers] user`` replaces the per-worker ``uid_range``).
            key = line.split("=", 1)[0].strip()
            replaced = {key, "uid_range"} if (section, key) == ("workers", "user") else {key}
            sections[section] = [kept for kept in sections[section]
                                 if kept.split("=", 1)[0].strip() not in replaced]
            sections[section].append(line)
    config.write_text("".join(f"[{name}]\n" + "\n".join(lines) + "\n"
                              for name, lines in sections.items()))
    return config


async def start_daemon(directory: Path, *, workers: int = 4, app: str = "tests.apps:pid_echo",
                       extra: str = "", timeout: float = 60, log: Path | None = None,
                       env: dict[str, str] | None = None, python: str = sys.executable,
                       user: tuple[int, int] | None = None,
                       nofile: int | None = None,
                       acceptor_uid: int | None = None) -> RunningDaemon:
    """Start ``handoffd serve`` and wait until it listens with ``workers`` ready workers.

    ``log``: a file that receives the daemon's (and its workers') stderr.  ``env``: added
    to the daemon's environment (its workers inherit it).  ``python``/``user``: the
    interpreter and the (uid, gid) to run as (fault tests run it unprivileged).
    ``nofile``: RLIMIT_NOFILE (soft and hard) set before exec (root here lacks
    CAP_SYS_RESOURCE, so it cannot ``prlimit`` a process of another user afterwards; the
    hard limit too, or the daemon would raise its soft limit to what its config needs).
    ``acceptor_uid``: run as root, the acceptor's uid (default: a fresh one), for files it must own.
    """
    if user is not None:  # an unprivileged serve: workers can only share its uid
        extra = "[workers]\ninsecure_same_uid = true\n" + extra
    config = write_config(directory, workers=workers, app=app, extra=extra,
                          separated=user is None, acceptor_uid=acceptor_uid)
    fingerprint = _fingerprint(directory / "server.key.pub")
    if user is not None:  # the daemon's user must own its directory, key and config
        for path in (directory, *directory.iterdir()):
            os.chown(path, *user)
    stderr = log.open("ab") if log is not None else None
    try:
        identity: dict[str, Any] = ({} if user is None else
                                    {"user": user[0], "group": user[1], "extra_groups": []})
        limit = [] if nofile is None else ["prlimit", f"--nofile={nofile}:{nofile}"]
        process = await trio.lowlevel.open_process(
            [*limit, python, "-m", "handoffd", "serve", "--config", str(config)], cwd=REPO,
            stderr=stderr, env=None if env is None else {**os.environ, **env}, **identity)
    finally:
        if stderr is not None:
            stderr.close()
    control = directory / "control.sock"
    with trio.fail_after(timeout):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"handoffd serve exited with {process.returncode}")
            try:
                status = await query_control(control)
                ready = [w for w in status["workers"] if w["state"] == "ready"]
                if status["listen"] and len(ready) >= workers:
                    break
            except GSSError:
                pass
            await trio.sleep(0.05)
    host, port = status["listen"][0].rsplit(":", 1)
    return RunningDaemon(process, directory, host.strip("[]"), int(port), fingerprint, control,
                         acceptor_pid=status["pid"])


def _fingerprint(public_key: Path) -> str:
    from handoffd import keyfiles
    from handoffd.core.credentials import fingerprint

    return fingerprint(keyfiles.load_public_key(public_key))


async def echo_session(daemon: RunningDaemon, messages: int = 5) -> int:
    """One client: read the worker pid line, then verify ``messages`` echoes. Returns the pid."""
    stream = await daemon.connect()
    async with stream:
        pid_line = await read_line(stream)
        for i in range(messages):
            payload = f"message {i} ".encode() * (i + 1)
            await stream.send_all(payload)
            assert await _read_exactly(stream, len(payload)) == payload
    return int(pid_line)


async def read_line(stream: SecureStream) -> bytes:
    """Plaintext up to and including the next newline; EOFError at the peer's CLOSE."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise EOFError("closed before a full line")
        data += chunk
    return data


async def _read_exactly(stream: SecureStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError("closed early")
        data += chunk
    return data


async def pipelined_client(daemon: RunningDaemon, early: list[bytes]) -> SecureStream:
    """A client whose first messages ride in the segment of its last handshake token."""
    transport = await trio.open_tcp_stream(daemon.host, daemon.port)
    context = InitiatorContext(static_key=None, server_fingerprint=daemon.fingerprint,
                               clock=time.time, random=os.urandom)
    decoder = FrameDecoder()
    _, first = context.step(None)
    await transport.send_all(encode_frame(FrameType.HANDSHAKE, wrap_first_token(first)))
    second = await read_frame(transport, decoder)
    _, third = context.step(second.body)
    await transport.send_all(encode_frame(FrameType.HANDSHAKE, third) + b"".join(
        encode_frame(FrameType.MESSAGE, context.wrap(data)) for data in early))
    return SecureStream(transport, context, decoder=decoder)


def owner_of(pid: int) -> tuple[int, int]:
    """The real ``(uid, gid)`` of a running process."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def set_nofile(pid: int, soft: int, hard: int | None = None) -> tuple[int, int]:
    """Set ``pid``'s RLIMIT_NOFILE; returns the old ``(soft, hard)``.

    Root here lacks CAP_SYS_RESOURCE, so a process of another uid (the acceptor, a
    worker) is changed by ``prlimit`` run as that process's own uid and gid."""
    import resource

    with open(f"/proc/{pid}/limits") as limits:  # prlimit() reads need the same rights
        line = next(row for row in limits if row.startswith("Max open files"))
    old = (int(line.split()[3]), int(line.split()[4]))
    hard = old[1] if hard is None else hard
    uid, gid = owner_of(pid)
    if uid == os.getuid():
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    else:
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True,
                       user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True)
    return old


def drop_dir(directory: Path) -> Path:
    """``directory/drop``, writable by every uid (sticky): for files the workers write."""
    path = directory / "drop"
    path.mkdir(exist_ok=True)
    os.chmod(path, 0o1777)
    return path


async def echo_back(stream: SecureStream, message: bytes) -> bytes:
    """Send ``message`` and read as many bytes back (an echo app's answer), then close."""
    async with stream:
        return await echo_on(stream, message)


async def echo_on(stream: Any, message: bytes) -> bytes:
    """Send ``message`` on an open session and read as many bytes back; it stays open."""
    await stream.send_all(message)
    echoed = b""
    while len(echoed) < len(message):
        chunk = await stream.receive_some(64)
        assert chunk, "closed before the echo came back"
        echoed += chunk
    return echoed


def tls_config(directory: Path, alpn: str = '["h2", "http/1.1"]') -> tuple[str, dict[str, Path],
                                                                          int | None]:
    """A throwaway CA and a localhost certificate in ``directory`` (examples.https.pki),
    the key owned by the acceptor uid it picks when root; the ``[tls]`` lines listening on
    a free port, the PKI's paths, and that uid (for ``start_daemon``'s ``acceptor_uid``)."""
    from examples.https.pki import make_pki

    acceptor_uid = separated_uids()[0] if os.geteuid() == 0 else None
    os.chmod(directory, 0o755)
    pki = make_pki(directory)
    if acceptor_uid is not None:
        for path in (pki["cert"], pki["key"]):
            os.chown(path, acceptor_uid, acceptor_uid)
    lines = (f'[tls]\nlisten = ["127.0.0.1:0"]\ncertificate = "{pki["cert"]}"\n'
             f'key = "{pki["key"]}"\nalpn = {alpn}\n')
    return lines, pki, acceptor_uid


async def start_forwarder(daemon: RunningDaemon, *pin: str) -> tuple[trio.Process, int]:
    """``handoffd connect --listen 127.0.0.1:0`` to ``daemon``; the process and its port
    (read from its "forwarding ..." line).  ``pin``: the pinning options."""
    import re

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "handoffd", "connect", "--listen", "127.0.0.1:0",
         f"{daemon.host}:{daemon.port}", *pin], cwd=REPO, stderr=subprocess.PIPE)
    assert process.stderr is not None
    seen = b""
    with trio.fail_after(20):
        while not (match := re.search(rb"forwarding 127\.0\.0\.1:(\d+) to", seen)):
            chunk = await process.stderr.receive_some()
            assert chunk, seen
            seen += chunk
    return process, int(match[1])
