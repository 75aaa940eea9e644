"""The real daemon under real SELinux labels (guest only): ``handoffd serve`` as shipped.

Each test starts ``handoffd serve`` (the product's own entry point, no special build) as
root in a domain chosen with ``/proc/self/attr/exec`` (setexeccon: a shell writes it, then
execs Python).  That process is the **supervisor** (uid 0): it binds every socket and
execs the **acceptor** under ``[server] user`` and each **worker** under a uid of its own
from ``[workers] uid_range``.  Started as ``handoffd_supervisor_t``, the policy's
``typetransition`` puts what the supervisor execs into ``handoffd_acceptor_t``: the
acceptor and, since the supervisor execs them with the same interpreter, its workers too.
Started as the impostor, every process of the daemon stays the impostor.  Clients are real
handoffd clients over loopback TCP; other parties (an impostor, external workers) are
forked children in their own domains (lsm_support).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from lsm_support import (
    ACCEPTOR,
    EXTERNAL_WORKER,
    IMPOSTOR,
    SUPERVISOR,
    fork_as,
    observe,
    raw_peer_label,
    wait_ok,
)

from examples.echo.demo import separation_lines
from handoffd import keyfiles
from handoffd.core.credentials import StaticKeyPair, fingerprint
from handoffd.core.handoff import FD_KINDS, Kind
from handoffd.kernel.channel import Channel
from handoffd.minor import Minor
from handoffd.runtime.client import connect
from handoffd.runtime.control import query_control
from handoffd.runtime.stream import SecureStream
from handoffd.runtime.worker import HandoffReceiver, serve
from handoffd.status import GSS_S_UNAUTHORIZED, GSSError
from tests.apps import pid_echo

REPO = Path(__file__).resolve().parents[2]
ONLY_THE_ACCEPTOR = f'acceptor_labels = ["{ACCEPTOR.decode()}"]'
SYS_PIDFD_GETFD = 438
SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", 30)


@dataclass
class LabelledDaemon:
    """A ``handoffd serve`` process started in a given SELinux domain.

    ``process`` is the supervisor; the control socket is answered by the acceptor, whose
    pid is ``status()["pid"]``."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    fingerprint: str
    control: Path
    log: Path

    @property
    def supervisor_pid(self) -> int:
        return self.process.pid

    def acceptor_pid(self) -> int:
        pid: int = self.status()["pid"]
        return pid

    async def connect(self, **kw: Any) -> SecureStream:
        return await connect(self.host, self.port, server_fingerprint=self.fingerprint, **kw)

    def status(self) -> dict[str, Any]:
        return trio.run(query_control, self.control)

    def ready_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.status()["workers"] if w["state"] == "ready"]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


LSM_ACCEPTOR_UID = 1_800_000_000
LSM_WORKER_UIDS = (1_800_000_001, 1_800_000_064)


def write_config(directory: Path, *, workers: int, extra: str) -> Path:
    """A config like tests/daemon_harness's, with the key made in this process (each Python
    start costs seconds in the TCG guest) and ``extra`` lines appended to their sections."""
    keyfiles.save_private_key(directory / "server.key", StaticKeyPair.generate(os.urandom))
    # The shipped process model: the supervisor (root, in the launch label) runs the
    # acceptor and the workers under uids of their own (their domain: module docstring).
    server, worker = separation_lines(directory, LSM_ACCEPTOR_UID, LSM_WORKER_UIDS)
    sections: dict[str, list[str]] = {
        "server": ['listen = ["127.0.0.1:0"]', 'key = "server.key"', *server.split("\n")],
        "workers": ['app = "tests.apps:pid_echo"', f"count = {workers}",
                    f"pythonpath = [{str(REPO)!r}]", *worker.split("\n")],
        "control": ['socket = "control.sock"'],
    }
    section = ""
    for line in extra.strip().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
            sections.setdefault(section, [])
        elif line:
            sections[section].append(line)
    config = directory / "handoffd.toml"
    config.write_text("".join(f"[{name}]\n" + "\n".join(lines) + "\n"
                              for name, lines in sections.items()))
    return config


def launch(directory: Path, label: bytes, *, workers: int, extra: str) -> subprocess.Popen[bytes]:
    """Start ``handoffd serve`` in ``label``: sh sets its exec context, then execs Python."""
    config = write_config(directory, workers=workers, extra=extra)
    with (directory / "daemon.log").open("ab") as log:
        return subprocess.Popen(
            ["/bin/sh", "-c", 'printf %s "$0" > /proc/self/attr/exec && exec "$@"',
             label.decode(), sys.executable, "-m", "handoffd", "serve", "--config", str(config)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def wait_ready(directory: Path, process: subprocess.Popen[bytes], workers: int,
               timeout: float = 120) -> LabelledDaemon:
    """Wait until the daemon listens with ``workers`` ready workers."""
    control = directory / "control.sock"
    log = directory / "daemon.log"
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"handoffd serve exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"handoffd serve not ready:\n{log.read_text()}"
        try:
            status = trio.run(query_control, control)
            ready = [w for w in status["workers"] if w["state"] == "ready"]
            if status["listen"] and len(ready) >= workers:
                break
        except (GSSError, trio.BrokenResourceError):
            # Not answering yet, or reset: the daemon is going down (the poll above
            # then reports its exit with the log).
            pass
        time.sleep(0.1)
    host, port = status["listen"][0].rsplit(":", 1)
    key = keyfiles.load_public_key(directory / "server.key.pub")
    return LabelledDaemon(process, host, int(port), fingerprint(key), control, log)


@contextmanager
def labelled_daemon(directory: Path, label: bytes, *, workers: int = 1,
                    extra: str = "") -> Iterator[LabelledDaemon]:
    """``handoffd serve`` in ``label``, stopped (SIGTERM, then SIGKILL) afterwards."""
    process = launch(directory, label, workers=workers, extra=extra)
    try:
        yield wait_ready(directory, process, workers)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def label_of(pid: int) -> bytes:
    """A process's SELinux context, as /proc/<pid>/attr/current reports it."""
    return Path(f"/proc/{pid}/attr/current").read_bytes().rstrip(b"\0")


def uid_of(pid: int) -> int:
    """A process's real uid, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def listener_label(path: Path) -> bytes:
    """SO_PEERSEC seen by a process connecting to the Unix stream listener ``path``: the
    label of the listening socket, i.e. of the process that created (bound) it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        return raw_peer_label(sock)


def echo(daemon: LabelledDaemon) -> int:
    """One real client session (pid line, then an echo); returns the serving worker's pid."""

    async def session() -> int:
        with trio.fail_after(60):
            return await exchange()

    async def exchange() -> int:
        stream = await daemon.connect()
        async with stream:
            line = b""
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(1)
                assert chunk, "closed before the pid line"
                line += chunk
            await stream.send_all(b"labelled hello")
            got = b""
            while len(got) < len(b"labelled hello"):
                chunk = await stream.receive_some(100)
                assert chunk, "closed before the echo"
                got += chunk
            assert got == b"labelled hello"
        return int(line)

    return trio.run(session)


def status_text(major: int, minor: int) -> list[str]:
    """The display texts a log line carries for this status (``str(GSSError)``)."""
    return GSSError(major, minor).messages()


def log_lines(daemon_log: str, marker: str) -> list[str]:
    """The lines of the daemon's (and its workers') log that contain ``marker``."""
    return [line for line in daemon_log.splitlines() if marker in line]


@pytest.fixture(scope="module")
def acceptor_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelledDaemon]:
    """One daemon started as the supervisor, one worker accepting only the acceptor's
    label, shared by cases 1 and 2 (every daemon and worker start costs seconds under
    TCG)."""
    directory = tmp_path_factory.mktemp("acceptor")
    with labelled_daemon(directory, SUPERVISOR,
                         extra=f"[policy]\n{ONLY_THE_ACCEPTOR}") as daemon:
        yield daemon


def test_worker_accepts_and_serves_a_handoff_from_the_acceptor_label(
    acceptor_daemon: LabelledDaemon,
) -> None:
    """Case 1: the supervisor (root) runs as the supervisor, the acceptor it execs (under
    [server] user) as the acceptor, and so does the worker it execs (under a uid of its
    own): one interpreter, one exec transition.  The worker accepts only the acceptor's
    label ([policy] acceptor_labels), which its channel (made by the acceptor) carries,
    and a real client gets its echo from that worker.  The sockets the supervisor bound
    (here the control socket) carry the supervisor's label."""
    daemon = acceptor_daemon
    [worker] = daemon.ready_workers()
    status = daemon.status()
    acceptor = status["pid"]
    assert acceptor != daemon.supervisor_pid
    separation = status["privilege_separation"]
    assert separation["separated"] and separation["acceptor_uid"] == LSM_ACCEPTOR_UID
    roles = {"supervisor": daemon.supervisor_pid, "acceptor": acceptor,
             "spawned-worker": worker["pid"]}
    for role, pid in roles.items():
        observe(f"daemon-{role} uid={uid_of(pid)}", label_of(pid))
    assert uid_of(daemon.supervisor_pid) == 0
    assert uid_of(acceptor) == LSM_ACCEPTOR_UID
    assert LSM_WORKER_UIDS[0] <= uid_of(worker["pid"]) <= LSM_WORKER_UIDS[1]
    assert worker["uid"] == uid_of(worker["pid"])
    assert label_of(daemon.supervisor_pid) == SUPERVISOR
    assert label_of(acceptor) == ACCEPTOR
    # Not handoffd_worker_t: the supervisor execs acceptor and workers alike (docs/LSM.md).
    assert label_of(worker["pid"]) == ACCEPTOR
    control_label = listener_label(daemon.control)
    observe("control-socket-bound-by-supervisor", control_label)
    assert control_label.rstrip(b"\0") == SUPERVISOR
    acked = daemon.status()["totals"]["acked"]
    refused = len(log_lines(daemon.log_text(), "refused"))
    assert echo(daemon) == worker["pid"]
    assert echo(daemon) == worker["pid"]
    assert daemon.status()["totals"]["acked"] == acked + 2
    assert len(log_lines(daemon.log_text(), "refused")) == refused


def steal_and_send(acceptor_pid: int, report: Path) -> None:
    """Impostor's part: take the acceptor's end of a worker channel with pidfd_getfd(2),
    send a HANDOFF carrying a live TCP socket, and see the worker close it.

    The acceptor runs under its own uid and is undumpable (its /proc entries belong to
    root); this root impostor still gets its fds because root has CAP_SYS_PTRACE and the
    test policy allows ``process ptrace`` (handleunknown)."""
    libc = ctypes.CDLL(None, use_errno=True)
    found: dict[str, Any] = {
        "acceptor_uid": uid_of(acceptor_pid),
        "proc_fd_owner": os.stat(f"/proc/{acceptor_pid}/fd").st_uid,
    }
    pidfd = os.pidfd_open(acceptor_pid)
    stolen: socket.socket | None = None
    for entry in os.listdir(f"/proc/{acceptor_pid}/fd"):
        try:
            if not os.readlink(f"/proc/{acceptor_pid}/fd/{entry}").startswith("socket:"):
                continue
        except OSError:
            continue
        fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(entry), 0)
        assert fd >= 0, os.strerror(ctypes.get_errno())
        candidate = socket.socket(fileno=fd)
        creds = candidate.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if (candidate.family == socket.AF_UNIX and candidate.type == socket.SOCK_SEQPACKET
                and not candidate.getsockopt(socket.SOL_SOCKET, SO_ACCEPTCONN)
                and struct.unpack("3i", creds)[0] == acceptor_pid):
            assert stolen is None, "more than one worker channel in the acceptor"
            stolen = candidate
        else:
            candidate.close()
    os.close(pidfd)
    assert stolen is not None, "no worker channel found in the acceptor"
    found["own_label"] = os.getxattr(stolen.fileno(), "security.selinux").decode()
    found["peer_label"] = raw_peer_label(stolen).decode()

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()

    async def send() -> None:
        channel = Channel(trio.socket.from_stdlib_socket(stolen), fd_kinds=FD_KINDS,
                          validate_fd=None)
        await channel.send(Kind.HANDOFF, b"\0" * 64, fd=accepted.fileno())
        # Only our copy of the acceptor's end: closing it leaves the daemon's untouched.
        channel.close()

    trio.run(send)
    accepted.close()  # now the worker holds the only copy of the handed-off socket
    client.settimeout(60)
    found["client_saw"] = "eof" if client.recv(1) == b"" else "data"
    client.close()
    report.write_text(json.dumps(found))


def test_impostor_with_the_acceptors_channel_end_is_refused(
    acceptor_daemon: LabelledDaemon, tmp_path: Path,
) -> None:
    """Case 2: a root process in the impostor domain takes the acceptor's end of the
    worker's channel with pidfd_getfd(2) (the acceptor is undumpable and under its own
    uid, which stops everything but CAP_SYS_PTRACE; root has it) and sends a handoff
    carrying a TCP socket.  The
    worker refuses it (GSS_S_UNAUTHORIZED), closes the socket (the impostor's client
    sees EOF) and goes on serving real clients.

    The label the message carries is the *sending socket's* (the acceptor's, fixed when
    the daemon made the socketpair), so what names the thief is its SCM_CREDENTIALS pid:
    PEER_PID_MISMATCH.  A channel made in another domain is refused by label: see
    test_worker_refuses_a_channel_made_in_another_domain."""
    daemon = acceptor_daemon
    [worker] = daemon.ready_workers()
    acceptor = daemon.acceptor_pid()
    acked = daemon.status()["totals"]["acked"]
    earlier = len(log_lines(daemon.log_text(), "refused"))
    report = tmp_path / "impostor.json"
    wait_ok(fork_as(IMPOSTOR, lambda: steal_and_send(acceptor, report)))
    found = json.loads(report.read_text())
    observe("stolen-acceptor-end", found["own_label"].encode())
    assert found["acceptor_uid"] == LSM_ACCEPTOR_UID
    assert found["proc_fd_owner"] == 0  # undumpable: /proc/<acceptor> belongs to root
    assert found["own_label"].rstrip("\0") == ACCEPTOR.decode()
    assert found["peer_label"].rstrip("\0") == ACCEPTOR.decode()
    assert found["client_saw"] == "eof"
    refusals = log_lines(daemon.log_text(), "refused")[earlier:]
    assert len(refusals) == 1, refusals
    assert all(text in refusals[0]
               for text in status_text(GSS_S_UNAUTHORIZED, Minor.PEER_PID_MISMATCH))
    assert daemon.ready_workers() == [worker]
    assert echo(daemon) == worker["pid"]
    assert daemon.status()["totals"]["acked"] == acked + 1


def test_worker_refuses_a_channel_made_in_another_domain(tmp_path: Path) -> None:
    """Case 2, by label: the same daemon run by a root process in the impostor domain
    makes the worker's channel; the worker, configured for the acceptor's label, reads
    the impostor's context on it (SO_PEERSEC) and refuses to start: GSS_S_UNAUTHORIZED,
    PEER_LABEL_NOT_ALLOWED.  No worker ever takes a handoff, so the daemon gives up."""
    process = launch(tmp_path, IMPOSTOR, workers=1,
                     extra=f"[policy]\n{ONLY_THE_ACCEPTOR}\n[workers]\nboot_failures_max = 1")
    try:
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "daemon.log").read_text(errors="replace")
    assert status != 0, log
    refusals = log_lines(log, "worker could not start")
    assert refusals, log
    for line in refusals:
        assert all(text in line
                   for text in status_text(GSS_S_UNAUTHORIZED, Minor.PEER_LABEL_NOT_ALLOWED))
        assert IMPOSTOR.decode() in line
    observe("refused-channel-maker", IMPOSTOR)


def test_two_acceptors_feed_each_worker_each_channel_checked_by_label(tmp_path: Path) -> None:
    """The shared pool under SELinux: with ``[server] acceptors = 2`` each worker has its
    own acceptor's channel and a guest channel the other acceptor made (ATTACH/GUEST
    through the supervisor); both acceptors run in the acceptor's domain, so each
    channel's creator (SO_PEERSEC) and each message's sender (SCM_SECURITY) carry the
    label ``[policy] acceptor_labels`` admits.  Every worker serves clients handed off by
    both acceptors, and no handoff is refused."""
    extra = f"[server]\nacceptors = 2\n[policy]\n{ONLY_THE_ACCEPTOR}"
    with labelled_daemon(tmp_path, SUPERVISOR, workers=2, extra=extra) as daemon:
        deadline = time.monotonic() + 60  # each worker says HELLO to the guest last
        while True:
            status = daemon.status()
            if [row.get("feeds") for row in status["acceptors"]] == [2, 2]:
                break
            assert time.monotonic() < deadline, status["acceptors"]
            time.sleep(0.1)
        for row in status["acceptors"]:
            assert label_of(row["pid"]) == ACCEPTOR
        for worker in status["workers"]:
            guests = json.loads(Path(f"/proc/{worker['pid']}/environ").read_bytes()
                                .split(b"HANDOFFD_GUESTS=")[1].split(b"\0")[0])
            assert [g["acceptor_pid"] for g in guests] == [
                row["pid"] for row in status["acceptors"] if row["index"] != worker["acceptor"]]

        def fed_by_both() -> bool:
            return all(len(w["handled_by_acceptor"]) == 2
                       and all(n > 0 for n in w["handled_by_acceptor"].values())
                       for w in daemon.ready_workers())

        async def round_of(clients: int) -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(clients):
                    nursery.start_soon(trio.to_thread.run_sync, echo, daemon)

        for _ in range(20):  # bounded: 20 rounds of 4 clients in parallel
            if fed_by_both():
                break
            trio.run(round_of, 4)
        assert fed_by_both(), daemon.status()["workers"]
        assert not log_lines(daemon.log_text(), "refused"), daemon.log_text()
        observe("shared-pool-acceptors", ACCEPTOR)


# Who an external worker sees at registration: the listener is the acceptor's uid (it
# re-listens, so SO_PEERCRED names it), but the socket's label is its creator's, the
# supervisor's, on connect (SO_PEERSEC) and on every message the acceptor sends over the
# accepted socket (SCM_SECURITY).
REGISTRATION_LISTENER: dict[str, Any] = {
    "acceptor_uids": frozenset({LSM_ACCEPTOR_UID}), "acceptor_labels": [SUPERVISOR]}


def register_and_serve(path: str, report: Path) -> None:
    """External worker's part: register (checking the listener's uid and label), record
    what it saw, serve until drained."""

    async def run() -> None:
        receiver = await HandoffReceiver.register(path, **REGISTRATION_LISTENER)
        identity = receiver.channel.peer_identity()
        report.write_text(json.dumps({"pid": identity.pid, "uid": identity.uid,
                                      "label": (identity.label or b"").decode()}))
        try:
            await serve(receiver, pid_echo, drain_timeout=5)
        finally:
            receiver.close()

    trio.run(run)


def register_refused(path: str, report: Path) -> None:
    """Impostor's part: try to register as an external worker; record the refusal."""

    async def run() -> None:
        try:
            receiver = await HandoffReceiver.register(path, **REGISTRATION_LISTENER)
        except GSSError as error:
            report.write_text(json.dumps([error.major, error.minor]))
            return
        receiver.close()
        report.write_text(json.dumps("registered"))

    trio.run(run)


def test_external_worker_registration_by_label(tmp_path: Path) -> None:
    """Case 3: with [policy] worker_labels = [the external worker's label], a root
    process in the impostor domain is refused at registration (PEER_LABEL_NOT_ALLOWED),
    while one in the allowed domain registers and serves a real client.  The external
    workers trust the listener's uid (the acceptor's) and label (the supervisor's, which
    bound the socket: an external worker cannot pin the acceptor's label)."""
    extra = ("[workers]\nregister_socket = \"register.sock\"\n"
             f"[policy]\nworker_labels = [\"{EXTERNAL_WORKER.decode()}\"]")
    with labelled_daemon(tmp_path, SUPERVISOR, workers=0, extra=extra) as daemon:
        path = str(tmp_path / "register.sock")
        report = tmp_path / "refused.json"
        wait_ok(fork_as(IMPOSTOR, lambda: register_refused(path, report)))
        assert json.loads(report.read_text()) == [GSS_S_UNAUTHORIZED,
                                                  Minor.PEER_LABEL_NOT_ALLOWED]
        assert daemon.status()["totals"]["registrations_refused"] == 1
        assert daemon.ready_workers() == []
        refusals = log_lines(daemon.log_text(), "registration refused")
        assert len(refusals) == 1 and IMPOSTOR.decode() in refusals[0], refusals

        seen = tmp_path / "registered.json"
        worker_pid = fork_as(EXTERNAL_WORKER, lambda: register_and_serve(path, seen))
        try:
            deadline = time.monotonic() + 60
            while not daemon.ready_workers():
                assert time.monotonic() < deadline, daemon.log_text()
                time.sleep(0.1)
            [worker] = daemon.ready_workers()
            assert worker["external"] and worker["pid"] == worker_pid
            observe("registered-external-worker", label_of(worker_pid))
            assert label_of(worker_pid) == EXTERNAL_WORKER
            listener = json.loads(seen.read_text())
            observe(f"registration-listener uid={listener['uid']}", listener["label"].encode())
            assert listener["pid"] == daemon.acceptor_pid()
            assert listener["uid"] == LSM_ACCEPTOR_UID
            assert listener["label"].rstrip("\0") == SUPERVISOR.decode()
            assert echo(daemon) == worker_pid
        finally:
            daemon.process.send_signal(signal.SIGTERM)
            daemon.process.wait(timeout=60)
            wait_ok(worker_pid)
        assert daemon.process.returncode == 0, daemon.log_text()
