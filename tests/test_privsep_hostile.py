"""A compromised worker against the privilege-separated process model (DESIGN.md §4b).

Real ``handoffd serve`` runs as root: a supervisor (root), an acceptor under its own
uid (holds the key, non-dumpable) and one uid per worker.  The application code in a
worker is hostile (``tests.hostile_apps:hostile``): from inside a real worker it tries
every way at the key, the acceptor, the supervisor and its siblings that processes of
one uid have on each other (file modes, /proc/PID/mem, ptrace, pidfd_getfd, keyctl,
core files, a detached child outliving its worker, the registration socket).  Each
attack must fail with the errno the kernel gives, and the daemon must go on serving.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from handoffd.minor import Minor
from handoffd.runtime.stream import SecureStream
from handoffd.status import GSSError
from tests.daemon_harness import (
    REPO,
    SITE_PACKAGES,
    SYSTEM_PYTHON,
    RunningDaemon,
    read_line,
    start_daemon,
    write_config,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: serve runs separated uids"),
]

APP = "tests.hostile_apps:hostile"
DENIED = {"EACCES", "EPERM"}


# --- helpers ----------------------------------------------------------------------------------


async def _command(stream: SecureStream, op: str, **args: Any) -> dict[str, Any]:
    """Send the hostile app one command; its JSON answer."""
    await stream.send_all(json.dumps({"op": op, **args}).encode() + b"\n")
    answer: dict[str, Any] = json.loads(await read_line(stream))
    return answer


async def _session(daemon: RunningDaemon) -> tuple[SecureStream, dict[str, Any]]:
    """A client connection to a hostile worker, and what that worker says of itself."""
    stream = await daemon.connect()
    try:
        hello: dict[str, Any] = json.loads(await read_line(stream))
    except BaseException:
        await stream.aclose()
        raise
    return stream, hello


async def _still_serving(daemon: RunningDaemon) -> int:
    """A new client is handed off and answered by a worker: that worker's pid."""
    stream, hello = await _session(daemon)
    async with stream:
        assert (await _command(stream, "open", paths=["/proc/self/status"]))["access"] == {
            "/proc/self/status": "readable"}
    return int(hello["pid"])


def _uid_of(pid: int) -> int:
    """The real uid of ``pid`` (its /proc/PID/status ``Uid:`` line)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _state_of(pid: int) -> str:
    """The one-letter state of ``pid``; "gone" once it has no /proc entry."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("State:"):
                    return line.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return "gone"


def _fds_of(pid: int, limit: int = 6) -> list[int]:
    """Some fd numbers ``pid`` really has open (listed as root), so that an attacker's
    EPERM cannot be an EBADF in disguise."""
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))[:limit]


async def _ready(daemon: RunningDaemon, count: int) -> dict[str, Any]:
    while True:
        status = await daemon.status()
        if sum(1 for w in status["workers"] if w["state"] == "ready") >= count:
            return status
        await trio.sleep(0.05)


def _log(tmp_path: Path) -> Path:
    return tmp_path / "daemon.log"


# --- the key file, the acceptor and the supervisor ------------------------------------------


async def test_hostile_worker_cannot_read_the_server_key_file(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    daemon = await start_daemon(tmp_path, workers=1, app=APP, log=_log(tmp_path),
                                env={"HANDOFFD_TEST_KEY": str(key)})
    try:
        with trio.fail_after(60):
            acceptor_uid = _uid_of(daemon.pid)
            info = key.stat()
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (acceptor_uid, 0o600)
            stream, hello = await _session(daemon)
            async with stream:
                stolen = await _command(stream, "key_file")
                # Control: the directory is open to the worker, the public key is
                # readable: the EACCES is the private key's own mode.
                public = await _command(stream, "open", paths=[f"{key}.pub"])
            assert hello["uid"] not in (0, acceptor_uid)
            assert stolen["access"] == {str(key): "EACCES"}
            assert public["access"] == {f"{key}.pub": "readable"}
            await _still_serving(daemon)
    finally:
        await daemon.stop()


async def test_hostile_worker_cannot_read_acceptor_memory_or_environ(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=1, app=APP, log=_log(tmp_path))
    try:
        with trio.fail_after(60):
            acceptor, supervisor = daemon.pid, daemon.process.pid
            stream, hello = await _session(daemon)
            # The worker learns the acceptor's pid by itself: its environment and the
            # SO_PEERCRED of its channel both name it; its parent is the supervisor.
            assert hello["acceptor_pid_env"] == acceptor
            assert hello["channel_peer_pid"] == acceptor
            assert hello["ppid"] == supervisor
            targets = [f"/proc/{pid}/{name}" for pid in (acceptor, supervisor)
                       for name in ("mem", "environ", "maps", "fd")]
            controls = ["/proc/self/mem", "/proc/self/environ", "/proc/self/maps"]
            async with stream:
                answer = await _command(stream, "open", paths=targets + controls)
            access = answer["access"]
            for path in targets:
                assert access[path] in DENIED, (path, access[path])
            # Control: the same calls work on the worker's own process.
            assert {access[path] for path in controls} == {"readable"}
            # Why: the acceptor is non-dumpable, so the kernel treats its /proc files as
            # root's, though it runs under its own, unprivileged uid.
            assert _uid_of(acceptor) not in (0, hello["uid"])
            assert os.stat(f"/proc/{acceptor}/mem").st_uid == 0
            assert os.stat(f"/proc/{hello['pid']}/mem").st_uid == hello["uid"]
            await _still_serving(daemon)
    finally:
        await daemon.stop()


async def test_hostile_worker_cannot_ptrace_the_acceptor_or_supervisor(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=1, app=APP, log=_log(tmp_path))
    try:
        with trio.fail_after(60):
            acceptor, supervisor = daemon.pid, daemon.process.pid
            stream, _ = await _session(daemon)
            async with stream:
                answer = await _command(stream, "ptrace", pids=[acceptor, supervisor])
            assert answer["ptrace"] == {str(acceptor): "EPERM", str(supervisor): "EPERM"}
            for pid in (acceptor, supervisor):
                assert _state_of(pid) in ("S", "R"), "not stopped by a tracer"
            await _still_serving(daemon)
    finally:
        await daemon.stop()


async def test_hostile_worker_cannot_pidfd_getfd_from_acceptor_or_supervisor(
        tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=1, app=APP, log=_log(tmp_path))
    try:
        with trio.fail_after(60):
            acceptor, supervisor = daemon.pid, daemon.process.pid
            targets = [[pid, fd] for pid in (acceptor, supervisor) for fd in _fds_of(pid)]
            stream, _ = await _session(daemon)
            async with stream:
                answer = await _command(stream, "pidfd_getfd", targets=targets)
            # pidfd_open itself needs no permission; copying an fd out needs
            # PTRACE_MODE_ATTACH_REALCREDS over the target, which the worker lacks.
            assert answer["pidfd_getfd"] == {f"{pid}:{fd}": "EPERM" for pid, fd in targets}
            await _still_serving(daemon)
    finally:
        await daemon.stop()


# --- another worker --------------------------------------------------------------------------


async def test_hostile_worker_cannot_read_another_workers_memory(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=2, app=APP, log=_log(tmp_path))
    try:
        with trio.fail_after(60):
            victim, victim_hello = await _session(daemon)
            attacker, attacker_hello = await _session(daemon)
            other = victim_hello["pid"]
            assert other != attacker_hello["pid"], "two clients, two workers"
            assert victim_hello["uid"] != attacker_hello["uid"], "one uid per worker"
            paths = [f"/proc/{other}/{name}" for name in ("mem", "environ", "maps", "fd")]
            async with victim, attacker:
                access = (await _command(attacker, "open", paths=paths))["access"]
                traced = (await _command(attacker, "ptrace", pids=[other]))["ptrace"]
                copied = (await _command(attacker, "pidfd_getfd", targets=[
                    [other, fd] for fd in _fds_of(other)]))["pidfd_getfd"]
                # The victim is untouched and still answers its own client.
                assert (await _command(victim, "open", paths=["/proc/self/maps"]))[
                    "access"] == {"/proc/self/maps": "readable"}
            assert access == {path: "EACCES" for path in paths}
            assert traced == {str(other): "EPERM"}
            assert set(copied.values()) == {"EPERM"}
            await _still_serving(daemon)
    finally:
        await daemon.stop()


async def test_hostile_worker_cannot_reach_another_workers_key_slots(tmp_path: Path) -> None:
    # A long ack_timeout: the victim sits stopped on an armed slot while it is attacked.
    daemon = await start_daemon(tmp_path, workers=2, app=APP, log=_log(tmp_path),
                                extra="[workers]\nack_timeout = 60")
    streams: list[SecureStream] = []
    stopped: list[int] = []
    try:
        with trio.fail_after(90):
            status = await daemon.status()
            if status["key_parking"] != "keyring":
                pytest.skip(f"key parking is {status['key_parking']!r}, not the keyring")
            victim, victim_hello = await _session(daemon)
            attacker, attacker_hello = await _session(daemon)
            streams += [victim, attacker]
            other = victim_hello["pid"]
            assert other != attacker_hello["pid"]
            assert victim_hello["uid"] != attacker_hello["uid"]
            # Control: each worker can see and read its own keyring and slots.
            ring, slots = victim_hello["keyring"], victim_hello["slots"]
            assert ring and slots
            for hello in (victim_hello, attacker_hello):
                assert hello["own_describe"].startswith("keyring;")
                assert hello["own_slot_describe"].startswith("user;")
            # Arm one of the victim's slots: it stops itself on its next handoff, after
            # the acceptor parked a key for it and before it claims that key.
            await _command(victim, "trap")
            stopped.append(other)
            armed = False
            for _ in range(3):
                third = await daemon.connect()
                streams.append(third)
                with trio.move_on_after(5):
                    while not armed:
                        workers = {w["pid"]: w for w in (await daemon.status())["workers"]}
                        armed = workers[other]["in_flight"] == 1 and _state_of(other) == "T"
                        await trio.sleep(0.05)
                if armed:
                    break
                third_hello = json.loads(await read_line(third))  # the attacker served it
                assert third_hello["pid"] == attacker_hello["pid"]
            assert armed, "the victim never got a handoff to sit on"
            attack = await _command(attacker, "keys", serials=[ring, *slots],
                                    worker_id=victim_hello["worker_id"])
            for serial, outcome in attack["keys"].items():
                assert outcome == {"read": "EACCES", "describe": "EACCES", "link": "EACCES",
                                   "update": "EACCES", "setperm": "EACCES",
                                   "revoke": "EACCES"}, (serial, outcome)
            # Joining a session keyring by the victim's keyring name makes a new one: the
            # name lookup only finds keyrings the caller owns and may search.
            assert isinstance(attack["joined_by_name"], int)
            assert attack["joined_by_name"] not in (ring, *slots)
            # /proc/keys shows only what the caller may view: none of the victim's keys.
            assert not set(attack["visible"]) & {ring, *slots}
            assert set(attacker_hello["slots"]) <= set(attack["visible"])
            # The armed slot survived the attack: resumed, the victim claims its key,
            # imports the context and serves the client it was stopped on.
            os.kill(other, signal.SIGCONT)
            assert json.loads(await read_line(streams[-1]))["pid"] == other
            await _still_serving(daemon)
            totals = (await daemon.status())["totals"]
            assert totals["died_after_claim"] + totals["died_unclaimed"] == 0
    finally:
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
        for pid in stopped:  # a failed test must not leave a stopped worker to drain
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        await daemon.stop()


# --- a withheld ACK and a detached child --------------------------------------------------


async def test_withheld_ack_with_detached_child_never_gets_a_second_import(
        tmp_path: Path, open_dir: Path) -> None:
    drop = open_dir / "drop"
    drop.mkdir()
    drop.chmod(0o1777)  # worker uids write their pid files here
    daemon = await start_daemon(tmp_path, workers=2, app=APP, log=_log(tmp_path),
                                extra="[workers]\nack_timeout = 1.0",
                                env={"HANDOFFD_TEST_WITHHOLD_DIR": str(drop)})
    try:
        with trio.fail_after(60):
            stream = await daemon.connect()
            seen: dict[str, int] = {}

            async def watch_grandchild() -> None:
                pid_file = drop / "grandchild.pid"
                while not pid_file.exists():
                    await trio.sleep(0.01)
                seen["grandchild"] = int(pid_file.read_text())
                seen["worker"] = int((drop / "withheld").read_text())
                with contextlib.suppress(AssertionError, OSError):
                    seen["grandchild_uid"] = _uid_of(seen["grandchild"])
                    seen["worker_uid"] = _uid_of(seen["worker"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_grandchild)
                # The worker that got the handoff never ACKs; no worker ever answers.
                with pytest.raises((GSSError, EOFError)) as ended:
                    await read_line(stream)
            await stream.aclose()
            if isinstance(ended.value, GSSError):
                assert ended.value.minor == Minor.STREAM_TRUNCATED
            worker, grandchild = seen["worker"], seen["grandchild"]
            # The grandchild ran in a session of its own, under the worker's uid,
            # holding the client's connection: the supervisor killed it with the uid.
            assert seen["grandchild_uid"] == seen["worker_uid"]
            while _state_of(grandchild) not in ("gone", "Z"):
                await trio.sleep(0.05)
            assert _state_of(worker) in ("gone", "Z")
            while True:
                totals = (await daemon.status())["totals"]
                if totals["died_after_claim"] + totals["died_unclaimed"] >= 1:
                    break
                await trio.sleep(0.05)
            assert totals["redelivered"] == 0
            assert totals["died_after_claim"] == 1, "the worker claimed the key, then stalled"
            served_by = await _still_serving(daemon)
            assert served_by != worker
            status = await _ready(daemon, 2)
            assert status["totals"]["redelivered"] == 0
            assert worker not in [w["pid"] for w in status["workers"]]
    finally:
        await daemon.stop()


# --- the registration socket -------------------------------------------------------------

_REGISTER = """
import errno, json, socket, sys
import trio
from handoffd.minor import Minor
from handoffd.runtime.worker import HandoffReceiver
from handoffd.status import GSSError

path, acceptor_uid = sys.argv[1], int(sys.argv[2])
raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    raw.connect(path)
    connect = "connected"
except OSError as error:
    connect = errno.errorcode[error.errno]
raw.close()

async def register():
    try:
        receiver = await HandoffReceiver.register(path, acceptor_uids=frozenset({acceptor_uid}))
    except GSSError as error:
        return Minor(error.minor).name
    receiver.close()
    return "registered"

print(json.dumps({"connect": connect, "register": trio.run(register)}))
"""


async def _try_register(path: Path, acceptor_uid: int, uid: int, groups: list[int]
                        ) -> dict[str, str]:
    """Run as ``uid`` (with ``groups``): a raw connect to ``path``, then a registration
    that accepts the listener's uid ``acceptor_uid``; the errno and the GSS minor."""
    result = await trio.run_process(
        [SYSTEM_PYTHON, "-c", _REGISTER, str(path), str(acceptor_uid)],
        capture_stdout=True, capture_stderr=True,
        env={"PYTHONPATH": f"{SITE_PACKAGES}:{REPO}", "PATH": os.environ.get("PATH", "")},
        user=uid, group=uid, extra_groups=groups, cwd="/")
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


async def test_registration_refused_by_default_from_acceptor_and_worker_uids(
        tmp_path: Path, open_dir: Path) -> None:
    if not os.access(SYSTEM_PYTHON, os.X_OK) or not SITE_PACKAGES.is_dir():
        pytest.skip("needs Debian's python3.11 beside a python3.11 venv")
    # 1. A register_socket with nobody named in [policy]: serve refuses to start.
    refused = tmp_path / "refused"
    refused.mkdir()
    config = write_config(refused, workers=1, app=APP,
                          extra='[workers]\nregister_socket = "register.sock"')
    with trio.fail_after(60):
        run = await trio.run_process(
            [sys.executable, "-m", "handoffd", "serve", "--config", str(config)], cwd=REPO,
            capture_stdout=True, capture_stderr=True, check=False)
    assert run.returncode == 1
    assert b"minor 600" in run.stderr and b"worker_uids" in run.stderr
    assert not (refused / "register.sock").exists()

    # 2. [policy] names some other uid: neither the acceptor's nor a worker's uid gets in.
    # The socket sits in a directory every uid may traverse (open_dir): only its own
    # mode and owner keep anyone out.
    listed = 61999
    served = tmp_path / "served"
    served.mkdir()
    socket_path = open_dir / "register.sock"
    daemon = await start_daemon(
        served, workers=1, app=APP, log=_log(tmp_path),
        extra=f'[workers]\nregister_socket = "{socket_path}"\n'
              f'[policy]\nworker_uids = [{listed}]')
    try:
        with trio.fail_after(90):
            info = socket_path.stat()
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o660
            assert (info.st_uid, info.st_gid) == (0, 0)
            status = await daemon.status()
            acceptor_uid = _uid_of(daemon.pid)
            worker_uid = status["workers"][0]["uid"]
            assert len({acceptor_uid, worker_uid, listed, 0}) == 4
            for uid in (acceptor_uid, worker_uid):
                # The socket's mode keeps them out before the acceptor sees them.
                assert await _try_register(socket_path, acceptor_uid, uid, []) == {
                    "connect": "EACCES", "register": "CONNECT_FAILED"}, uid
            assert (await daemon.status())["totals"]["registrations_refused"] == 0
            for uid in (acceptor_uid, worker_uid):
                # Even given the socket's group, the acceptor refuses them by [policy].
                assert await _try_register(socket_path, acceptor_uid, uid, [0]) == {
                    "connect": "connected", "register": "PEER_UID_NOT_ALLOWED"}, uid
            totals = (await daemon.status())["totals"]
            assert totals["registrations_refused"] == 4  # a connect and a register, each
            log = _log(tmp_path).read_text()
            # Logged rate-limited: the first refusal now, the next three as a count with
            # the next line of its kind (or at shutdown).
            assert log.count("registration refused") == 1
            assert "uid is not allowed by policy" in log
            # Control: the uid [policy] names, given the same group, does register: the
            # refusals above are the policy's, not a broken socket.
            assert await _try_register(socket_path, acceptor_uid, listed, [0]) == {
                "connect": "connected", "register": "registered"}
            assert (await daemon.status())["totals"]["registrations_refused"] == 4
            assert f"uid {listed} registered" in _log(tmp_path).read_text()
            await _still_serving(daemon)
            assert not [w for w in (await daemon.status())["workers"] if w["external"]]
    finally:
        await daemon.stop()


# --- a crashed acceptor and core files ------------------------------------------------------

_CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")

_DUMPABLE_KEY_HOLDER = """
import base64, os, resource, signal, sys
text = open(sys.argv[1]).read()
key = base64.b64decode(text.split()[1])
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
os.kill(os.getpid(), signal.SIGSEGV)
"""


def _files_holding(root: Path, needles: list[bytes], skip: set[Path]) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path in skip or not path.is_file() or path.is_symlink():
            continue
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append(path)
    return found


async def test_crashed_acceptor_leaves_no_key_on_disk(tmp_path: Path, open_dir: Path) -> None:
    key_file = tmp_path / "server.key"
    saved_pattern = _CORE_PATTERN.read_text()
    daemon = await start_daemon(tmp_path, workers=1, app=APP, log=_log(tmp_path))
    # Cores land where every uid may write (open_dir, not pytest's 0700 tree).
    cores = open_dir / "cores"
    cores.mkdir()
    cores.chmod(0o1777)
    text = key_file.read_text().split()[1]
    needles = [base64.b64decode(text), text.encode()]
    try:
        _CORE_PATTERN.write_text(f"{cores}/core.%p\n")
        with trio.fail_after(120):
            acceptor = daemon.pid
            acceptor_uid = _uid_of(acceptor)
            # Control: a dumpable process of the acceptor's uid that holds the same key
            # and crashes leaves it in a core file, where this test finds it.
            copy = open_dir / "server.key"
            shutil.copyfile(key_file, copy)
            os.chown(copy, acceptor_uid, acceptor_uid)
            copy.chmod(0o600)
            control = await trio.run_process(
                [sys.executable, "-c", _DUMPABLE_KEY_HOLDER, str(copy)], check=False,
                user=acceptor_uid, group=acceptor_uid, extra_groups=[], cwd="/")
            assert control.returncode == -signal.SIGSEGV
            control_cores = list(cores.iterdir())
            assert len(control_cores) == 1, "the core pattern must catch a dumpable crash"
            assert _files_holding(cores, needles, set()) == control_cores

            # The acceptor: RLIMIT_CORE 0/0 and non-dumpable (its /proc files are root's).
            with open(f"/proc/{acceptor}/limits") as limits:
                core_line = next(line for line in limits if line.startswith("Max core"))
            assert core_line.split()[4:6] == ["0", "0"], core_line
            assert os.stat(f"/proc/{acceptor}/mem").st_uid == 0 != acceptor_uid
            try:  # root lacks CAP_SYS_RESOURCE here: it cannot raise the limit back
                resource.prlimit(acceptor, resource.RLIMIT_CORE,
                                 (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            except PermissionError as error:
                assert error.errno == errno.EPERM
            os.kill(acceptor, signal.SIGSEGV)
            while _state_of(acceptor) not in ("gone", "Z"):
                await trio.sleep(0.05)
            # The supervisor starts a new acceptor, which serves clients again.
            while True:
                with contextlib.suppress(GSSError):
                    status = await daemon.status()
                    if status["pid"] != acceptor and any(
                            w["state"] == "ready" for w in status["workers"]):
                        break
                await trio.sleep(0.05)
            assert daemon.process.returncode is None
            daemon.acceptor_pid = status["pid"]
            stream, hello = await _session(daemon)
            async with stream:
                assert hello["acceptor_pid_env"] == status["pid"]
            assert list(cores.iterdir()) == control_cores, "the acceptor wrote no core"
            leaked = [*_files_holding(tmp_path, needles, {key_file}),
                      *_files_holding(open_dir, needles, {copy, *control_cores})]
            assert leaked == []
    finally:
        _CORE_PATTERN.write_text(saved_pattern)
        await daemon.stop()
