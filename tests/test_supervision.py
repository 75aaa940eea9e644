"""The supervisor-acceptor link and the process plan: codec, fds over a real socketpair,
and which uid runs what (or why ``serve`` refuses to start)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from handoffd.config import Config, PolicyConfig, ServerConfig, WorkersConfig, parse_config
from handoffd.core import supervision
from handoffd.minor import Minor
from handoffd.runtime.supervisor import process_plan
from handoffd.runtime.supervisor_link import SupervisorLink
from handoffd.status import GSSError

WID = bytes(range(16))


@pytest.mark.parametrize("message", [
    supervision.Spawn(WID, {"HANDOFFD_PARKING_MODE": "keyring", "HANDOFFD_PARKING_SLOTS": "8"}),
    supervision.Spawned(WID, 1234, 70001),
    supervision.SpawnFailed(WID, 0xD0000, Minor.SUPERVISOR_UIDS_EXHAUSTED, "no uid"),
    supervision.Exited(WID, -9),
    supervision.Signal(WID, 15),
    supervision.Notify(("READY=1", "STATUS=4/4 workers ready")),
    supervision.Attach(WID),
    supervision.Guest(WID, {"HANDOFFD_PARKING_MODE": "fallback",
                            "HANDOFFD_PARKING_SLOTS": "8"}),
    supervision.Guest(WID, {}),
])
def test_every_message_round_trips(message: supervision.Message) -> None:
    assert supervision.decode(message.encode()) == message


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (b"\x63", "unknown kind"),
    (bytes([supervision.SigKind.SPAWN]) + WID + b'{"PATH": "/tmp"}', "HANDOFFD_PARKING_"),
    (bytes([supervision.SigKind.SPAWN]) + WID + b'{"HANDOFFD_PARKING_MODE": 1}', "strings"),
    (bytes([supervision.SigKind.SPAWN]) + WID + b"not json", "JSON"),
    (bytes([supervision.SigKind.SIGNAL]) + WID + bytes([19]), "TERM or KILL"),
    (bytes([supervision.SigKind.NOTIFY]) + b"MAINPID=1", "not allowed"),
    (bytes([supervision.SigKind.NOTIFY]) + b"FDSTORE=1", "not allowed"),
    (bytes([supervision.SigKind.SPAWNED]) + WID, "malformed"),
    (bytes([supervision.SigKind.GUEST]) + WID + b'{"LD_PRELOAD": "/tmp/x.so"}',
     "HANDOFFD_PARKING_"),
    (bytes([supervision.SigKind.GUEST]) + WID[:8], "too short"),
    (bytes([supervision.SigKind.ATTACH]) + WID + b"x", "malformed"),
])
def test_a_malformed_or_overreaching_message_is_refused(data: bytes, why: str) -> None:
    """What a compromised acceptor could ask beyond its due is refused: other
    environment variables, signals other than TERM/KILL, systemd fields like MAINPID."""
    with pytest.raises(GSSError) as caught:
        supervision.decode(data)
    assert caught.value.minor == Minor.SUPERVISOR_LINK
    assert why in (caught.value.detail or "")


@given(st.binary(max_size=64))
def test_decode_never_raises_anything_but_a_gss_error(data: bytes) -> None:
    try:
        supervision.decode(data)
    except GSSError as error:
        assert error.minor == Minor.SUPERVISOR_LINK


async def test_spawn_carries_two_fds_and_other_kinds_none() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours, theirs = SupervisorLink(a), SupervisorLink(b)
    r, w = os.pipe()
    try:
        await ours.send(supervision.Spawn(WID, {}), (r, w))
        incoming = await theirs.receive()
        assert incoming.message == supervision.Spawn(WID, {}) and len(incoming.fds) == 2
        for fd in incoming.fds:
            os.close(fd)
        # An fd on a kind that carries none is closed on arrival, and the link goes on.
        before = len(os.listdir("/proc/self/fd"))
        await ours.send(supervision.Exited(WID, 0), (r,))
        with pytest.raises(GSSError, match="carries none"):
            await theirs.receive()
        assert len(os.listdir("/proc/self/fd")) == before
        await ours.send(supervision.Signal(WID, 9))
        assert (await theirs.receive()).message == supervision.Signal(WID, 9)
        ours.close()
        with pytest.raises(GSSError, match="closed"):
            with trio.fail_after(5):
                await theirs.receive()
    finally:
        os.close(r)
        os.close(w)
        theirs.close()


async def test_a_guest_carries_its_channel_and_grant_pipe_and_a_decline_carries_none() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours, theirs = SupervisorLink(a), SupervisorLink(b)
    r, w = os.pipe()
    try:
        guest = supervision.Guest(WID, {"HANDOFFD_PARKING_MODE": "fallback"})
        await ours.send(guest, (r, w))
        incoming = await theirs.receive()
        assert incoming.message == guest and len(incoming.fds) == 2
        for fd in incoming.fds:
            os.close(fd)
        await ours.send(supervision.Guest(WID, {}))
        incoming = await theirs.receive()
        assert isinstance(incoming.message, supervision.Guest)
        assert incoming.message.declined and incoming.fds == []
        with pytest.raises(GSSError, match="carries none"):  # an ATTACH has no fd
            await ours.send(supervision.Attach(WID), (r,))
            await theirs.receive()
    finally:
        os.close(r)
        os.close(w)
        ours.close()
        theirs.close()


class _Recorder:
    """A worker process as far as ``Supervisor._signal`` sees one: what it was sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


def test_a_guest_acceptor_may_kill_a_worker_it_feeds_but_not_drain_it() -> None:
    """The shared pool: an acceptor attached to another's worker may ask for SIGKILL
    (its ACK watchdog: the worker holds a handoff of its own), never SIGTERM (draining
    is the spawning acceptor's call); an acceptor attached to nothing may ask nothing."""
    import signal
    import types

    from handoffd.runtime.supervisor import ProcessPlan, Supervised, Supervisor

    child = subprocess_sleeper()
    try:
        supervisor = Supervisor(_config(), ProcessPlan(True, (1, 1), worker_shared=(2, 2)))
        recorder = _Recorder(child.pid)
        supervisor.workers[WID] = Supervised(WID, recorder, 2, False,  # type: ignore[arg-type]
                                             acceptor=1, guests=(2,))
        home, guest, stranger = (types.SimpleNamespace(serial=n) for n in (1, 2, 3))
        for asker in (stranger, guest):
            supervisor._signal(asker, supervision.Signal(WID, signal.SIGTERM))  # type: ignore[arg-type]
        supervisor._signal(stranger, supervision.Signal(WID, signal.SIGKILL))  # type: ignore[arg-type]
        assert recorder.signals == []
        supervisor._signal(home, supervision.Signal(WID, signal.SIGTERM))  # type: ignore[arg-type]
        supervisor._signal(guest, supervision.Signal(WID, signal.SIGKILL))  # type: ignore[arg-type]
        assert recorder.signals == [signal.SIGTERM, signal.SIGKILL]
        assert child.wait(timeout=10) == -signal.SIGKILL, "its process group was killed"
    finally:
        child.kill()
        child.wait()


def subprocess_sleeper() -> Any:
    """A process in a process group of its own, as a shared-uid worker runs."""
    import subprocess

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)


def _config(server: ServerConfig | None = None, workers: WorkersConfig | None = None
            ) -> Config:
    return Config(server=server or ServerConfig(), workers=workers or WorkersConfig())


def test_unprivileged_serve_refuses_same_uid_workers_without_the_opt_in() -> None:
    with pytest.raises(GSSError) as caught:
        process_plan(_config(), privileged=False)
    assert caught.value.minor == Minor.PRIVSEP_SAME_UID
    plan = process_plan(_config(workers=WorkersConfig(insecure_same_uid=True)),
                        privileged=False)
    assert not plan.separated and plan.describe()["insecure_same_uid"]


def test_privileged_serve_needs_an_acceptor_user_and_worker_uids() -> None:
    with pytest.raises(GSSError) as caught:
        process_plan(_config(), privileged=True)
    assert caught.value.minor == Minor.PRIVSEP_NOT_PERMITTED  # no [server] user
    with pytest.raises(GSSError) as caught:
        process_plan(_config(ServerConfig(user="70999")), privileged=True)
    assert caught.value.minor == Minor.PRIVSEP_SAME_UID  # no worker uids
    with pytest.raises(GSSError) as caught:
        process_plan(_config(ServerConfig(user="70999"), WorkersConfig(user="70999")),
                     privileged=True)
    assert caught.value.minor == Minor.PRIVSEP_SAME_UID
    with pytest.raises(GSSError) as caught:
        process_plan(_config(ServerConfig(user="70001"),
                             WorkersConfig(uid_range=(70000, 70010))), privileged=True)
    assert caught.value.minor == Minor.PRIVSEP_SAME_UID  # the range holds the acceptor
    plan = process_plan(_config(ServerConfig(user="70999"),
                                WorkersConfig(uid_range=(70000, 70010))), privileged=True)
    assert plan.separated and plan.acceptor == (70999, 70999)
    assert plan.worker_range == (70000, 70010)
    assert not plan.describe()["insecure_same_uid"]


@pytest.mark.parametrize("document, needle", [
    ({"server": {"user": "0"}}, "never runs as root"),
    ({"workers": {"uid_range": [5]}}, "[first, last]"),
    ({"workers": {"uid_range": [9, 3]}}, "[first, last]"),
    ({"workers": {"uid_range": [70000, 70001], "count": 4}}, "2 uids for 4 workers"),
    ({"workers": {"uid_range": [70000, 70100], "user": "70200"}}, "not both"),
    ({"workers": {"register_socket": "r.sock"}}, "nobody is admitted by default"),
])
def test_identity_settings_are_validated(document: dict[str, object], needle: str) -> None:
    with pytest.raises(GSSError) as caught:
        parse_config(document, base=Path("/etc/handoffd"))
    assert caught.value.minor == Minor.CONFIG_INVALID
    assert needle in str(caught.value)


def test_registration_socket_with_a_named_policy_is_accepted() -> None:
    config = parse_config({"workers": {"register_socket": "r.sock"},
                           "policy": {"worker_uids": [70500]}}, base=Path("/etc/handoffd"))
    assert config.policy == PolicyConfig(worker_uids=(70500,))


def test_key_quota_arithmetic_refuses_a_pool_a_non_root_acceptor_cannot_hold() -> None:
    """200 keys for a non-root uid: 22 workers of 8 slots fit (1 + 22 x 9 = 199), 23 do
    not; a pool that fits once but not twice (a SIGHUP roll) is a warning."""
    from handoffd.kernel.keyring import read_key_users
    from handoffd.kernel.parking import check_quota, quota_needed

    assert quota_needed(4, 8) == (37, 1829)  # measured: 37 keys, 1789 bytes (5-digit pids)
    nobody = 65534
    limits = read_key_users(nobody)
    if limits.maxkeys != 200:
        pytest.skip(f"this host's non-root key quota is {limits.maxkeys} keys, not 200")
    assert check_quota(4, 8, nobody) is None
    assert "SIGHUP roll" in (check_quota(20, 8, nobody) or "")
    with pytest.raises(GSSError) as caught:
        check_quota(23, 8, nobody)
    assert caught.value.minor == Minor.KEYRING_QUOTA and "kernel.keys.maxkeys" in str(
        caught.value)
    assert check_quota(1000, 8, 0) is None  # root's quota is a million keys


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the acceptor runs under its own uid")
async def test_keys_charged_to_the_acceptor_uid_match_the_quota_arithmetic(
    tmp_path: Path,
) -> None:
    """The real charge of a separated daemon's key parking on the acceptor uid's quota:
    exactly ``1 + workers x (slots + 1)`` keys, and no more bytes than estimated."""
    from handoffd.kernel.keyring import read_key_users
    from handoffd.kernel.parking import quota_needed
    from tests.daemon_harness import start_daemon

    daemon = await start_daemon(tmp_path, workers=3, extra="[workers]\nmax_unacked = 5")
    try:
        status = await daemon.status()
        uid = status["privilege_separation"]["acceptor_uid"]
        assert status["key_parking"] == "keyring"
        used = read_key_users(uid)
        keys, nbytes = quota_needed(3, 5)
        assert used.nkeys == keys and used.qnbytes <= nbytes
        assert {w["uid"] for w in status["workers"]}.isdisjoint({uid})
        assert len({w["uid"] for w in status["workers"]}) == 3  # one uid per worker
    finally:
        assert await daemon.stop() == 0


@pytest.mark.root
async def test_an_unprivileged_serve_refuses_same_uid_workers_and_warns_when_allowed(
    worker_user: tuple[str, int, int], open_dir: Path,
) -> None:
    """Run as an ordinary user, ``serve`` cannot give workers their own uids: without
    ``[workers] insecure_same_uid`` it exits 1 with one status line (minor 650), no
    traceback; with it, the daemon serves, warns at start, and ``status`` and ``doctor``
    say INSECURE."""
    import subprocess

    from tests.daemon_harness import (
        REPO,
        SITE_PACKAGES,
        SYSTEM_PYTHON,
        echo_session,
        start_daemon,
        write_config,
    )

    _, uid, gid = worker_user
    env = {**os.environ, "PYTHONPATH": f"{SITE_PACKAGES}:{REPO}"}
    config = write_config(open_dir, workers=1, separated=False)
    for path in (open_dir, *open_dir.iterdir()):
        os.chown(path, uid, gid)
    refused = subprocess.run([SYSTEM_PYTHON, "-m", "handoffd", "serve", "--config",
                              str(config)], env=env, cwd="/", capture_output=True, text=True,
                             user=uid, group=gid, extra_groups=[], timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert "minor 650" in refused.stderr and "insecure_same_uid" in refused.stderr
    assert "Traceback" not in refused.stderr

    serving = open_dir / "serving"
    serving.mkdir()
    os.chmod(serving, 0o711)
    log = open_dir / "daemon.log"
    daemon = await start_daemon(serving, workers=1, log=log, python=SYSTEM_PYTHON,
                                env={"PYTHONPATH": f"{SITE_PACKAGES}:{REPO}"},
                                user=(uid, gid))
    try:
        assert await echo_session(daemon, messages=1)
        assert b"INSECURE: workers run under the acceptor's uid" in log.read_bytes()
        privsep = (await daemon.status())["privilege_separation"]
        assert privsep["insecure_same_uid"] and not privsep["separated"]
        shown = subprocess.run([sys.executable, "-m", "handoffd", "status", "--control",
                                str(daemon.control)], capture_output=True, text=True,
                               check=True, timeout=30)
        assert f"INSECURE: acceptor uid {uid}" in shown.stdout
        # doctor judges the config for the user who runs it, as serve would.
        doctor = subprocess.run([SYSTEM_PYTHON, "-m", "handoffd", "doctor", "--config",
                                 str(daemon.directory / "handoffd.toml")], env=env, cwd="/",
                                user=uid, group=gid, extra_groups=[], capture_output=True,
                                text=True, check=True, timeout=60)
        assert "[warn] privilege separation: INSECURE" in doctor.stdout
    finally:
        assert await daemon.stop() == 0


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the acceptor runs under its own uid")
async def test_status_and_doctor_show_the_separated_uids(tmp_path: Path) -> None:
    import subprocess

    from tests.daemon_harness import start_daemon

    daemon = await start_daemon(tmp_path, workers=2)
    try:
        status = await daemon.status()
        acceptor = status["privilege_separation"]["acceptor_uid"]
        shown = subprocess.run([sys.executable, "-m", "handoffd", "status", "--control",
                                str(daemon.control)], capture_output=True, text=True,
                               check=True, timeout=30)
        assert f"separated: acceptor uid {acceptor}, workers one uid per worker" in shown.stdout
        for worker in status["workers"]:
            assert str(worker["uid"]) in shown.stdout
            assert os.stat(f"/proc/{worker['pid']}").st_uid == worker["uid"]
        assert os.stat(f"/proc/{daemon.pid}").st_uid == acceptor
        assert os.stat(f"/proc/{daemon.process.pid}").st_uid == 0  # the supervisor
        doctor = subprocess.run([sys.executable, "-m", "handoffd", "doctor", "--config",
                                 str(tmp_path / "handoffd.toml")], capture_output=True,
                                text=True, check=True, timeout=60)
        assert f"[ok  ] privilege separation: acceptor uid {acceptor}" in doctor.stdout
    finally:
        assert await daemon.stop() == 0


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the acceptor runs under its own uid")
async def test_fallback_key_parking_works_under_the_supervisor(tmp_path: Path) -> None:
    """Where keyctl is refused (Docker's default seccomp profile), workers get their
    grant pipe from the supervisor: the SPAWN carries the pipe as an fd, never its
    number, and the workers start and serve."""
    from tests.daemon_harness import echo_session, start_daemon

    daemon = await start_daemon(tmp_path, workers=2, extra='[workers]\nkeyring = "fallback"')
    try:
        status = await daemon.status()
        assert status["key_parking"] == "fallback"
        assert await echo_session(daemon, messages=2) in await daemon.worker_pids()
    finally:
        assert await daemon.stop() == 0


async def test_sigterm_before_the_workers_are_ready_stops_the_daemon(tmp_path: Path) -> None:
    """Workers that never become ready (here: an app whose import hangs) must not make
    the daemon deaf: SIGTERM stops it, workers included, with exit status 0."""
    import signal

    from tests.daemon_harness import REPO, write_config

    config = write_config(tmp_path, workers=2, app="tests.never_ready_app:handler")
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "handoffd", "serve", "--config", str(config)], cwd=REPO,
            stderr=out)
    try:
        with trio.fail_after(30):
            while b"acceptor started" not in log.read_bytes() and \
                    b"key parking mode" not in log.read_bytes():
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            assert await process.wait() == 0, log.read_text()
        assert b"before the workers were ready" in log.read_bytes()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_privsep_md_copies_the_link_table_of_the_module_docstring() -> None:
    """docs/PRIVSEP.md says its supervisor-link table is this module's docstring, copied:
    keep it so when a kind is added."""
    docstring = supervision.__doc__ or ""
    table = docstring[docstring.index("====="):].strip()
    privsep = (Path(__file__).parent.parent / "docs" / "PRIVSEP.md").read_text()
    section = privsep[privsep.index("## The supervisor link"):]
    block = section[section.index("```\n") + 4:]
    assert block[:block.index("```")].strip() == table
