"""Several acceptors (``[server] acceptors``): config, the supervisor's PEER message, the
merged status, and a real ``handoffd serve`` run as shipped with two acceptors on the
same listening sockets: both take clients (Noise and TLS), each under the acceptor uid
and undumpable, each feeding workers of its own that accept handoffs from it only;
SIGKILL to one loses no session already handed off and the daemon keeps serving; a
reload and a restart keep serving with no client failing."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from handoffd.config import MAX_ACCEPTORS, parse_config, worker_share
from handoffd.core import supervision
from handoffd.minor import Minor
from handoffd.runtime.daemon import merge_snapshots
from handoffd.runtime.supervisor import process_plan
from handoffd.status import GSSError
from tests.daemon_harness import (
    REPO,
    RunningDaemon,
    echo_on,
    echo_session,
    owner_of,
    read_line,
    separated_uids,
    start_daemon,
)
from tests.test_restart import _wait_log, clients_looping
from tests.test_tls_daemon import _write_pki

supervised = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: several acceptors need the supervisor")
TWO = "[server]\nacceptors = 2\n"


# ---------------------------------------------------------------------- configuration

@pytest.mark.parametrize("value, count, why", [
    (0, 4, "must be from 1 to 64"),
    (-1, 4, "must be from 1 to 64"),
    (MAX_ACCEPTORS + 1, 100, "must be from 1 to 64"),
    (3, 2, "need at least as many spawned workers"),
    (2, 0, "need at least as many spawned workers"),
])
def test_acceptors_must_be_from_1_to_64_and_at_most_the_workers(
        tmp_path: Path, value: int, count: int, why: str) -> None:
    data: dict[str, Any] = {"server": {"acceptors": value}, "workers": {"count": count}}
    if count == 0:
        data["workers"]["register_socket"] = "register.sock"
        data["policy"] = {"worker_uids": [1000]}
    with pytest.raises(GSSError) as caught:
        parse_config(data, base=tmp_path)
    assert caught.value.minor == Minor.CONFIG_INVALID
    assert "[server] acceptors" in (caught.value.detail or "")
    assert why in (caught.value.detail or "")


@pytest.mark.parametrize("value", ["two", 1.5, True])
def test_acceptors_must_be_a_whole_number(tmp_path: Path, value: object) -> None:
    with pytest.raises(GSSError) as caught:
        parse_config({"server": {"acceptors": value}}, base=tmp_path)
    assert "[server] acceptors" in (caught.value.detail or "")


def test_the_default_is_one_acceptor_and_64_are_accepted(tmp_path: Path) -> None:
    assert parse_config({}, base=tmp_path).server.acceptors == 1
    config = parse_config({"server": {"acceptors": 64}, "workers": {"count": 64}},
                          base=tmp_path)
    assert config.server.acceptors == 64


@pytest.mark.parametrize("count, acceptors", [(4, 1), (4, 2), (5, 2), (7, 3), (64, 64)])
def test_worker_shares_are_equal_within_one_and_add_up(count: int, acceptors: int) -> None:
    shares = [worker_share(count, index, acceptors) for index in range(acceptors)]
    assert sum(shares) == count
    assert max(shares) - min(shares) <= 1 and min(shares) >= 1


def test_several_acceptors_need_the_supervisor(tmp_path: Path) -> None:
    config = parse_config({"server": {"acceptors": 2},
                           "workers": {"insecure_same_uid": True}}, base=tmp_path)
    with pytest.raises(GSSError) as caught:
        process_plan(config, privileged=False)
    assert caught.value.minor == Minor.PRIVSEP_NOT_PERMITTED
    assert "acceptors" in (caught.value.detail or "")


def test_the_key_quota_counts_every_acceptor_s_keys_for_every_worker() -> None:
    """Every acceptor parks keys for every worker (the shared pool), all charged to the
    one acceptor uid: 22 workers of 8 slots fit one acceptor's 200-key quota (199 keys),
    and 11 fit two acceptors' (2 x 100)."""
    from handoffd.kernel.keyring import read_key_users
    from handoffd.kernel.parking import check_quota, quota_needed

    assert quota_needed(4, 8, 2) == (74, 3658)
    assert quota_needed(22, 8, 1)[0] == 199 and quota_needed(22, 8, 2)[0] == 398
    assert quota_needed(11, 8, 2)[0] == 200
    nobody = 65534
    if read_key_users(nobody).maxkeys != 200:
        pytest.skip("this host's non-root key quota is not 200 keys")
    with pytest.raises(GSSError) as caught:
        check_quota(22, 8, nobody, acceptors=3)
    assert caught.value.minor == Minor.KEYRING_QUOTA


def test_peer_message_round_trips_and_never_names_acceptor_0() -> None:
    assert supervision.decode(supervision.Peer(3).encode()) == supervision.Peer(3)
    for body in (b"", b"\x00", b"\x00\x00", b"\x00\x01\x02"):
        with pytest.raises(GSSError) as caught:
            supervision.decode(bytes([supervision.SigKind.PEER]) + body)
        assert caught.value.minor == Minor.SUPERVISOR_LINK


async def test_a_peer_without_its_fd_or_a_spawned_with_one_is_refused() -> None:
    from handoffd.runtime.supervisor_link import SupervisorLink

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender, receiver = SupervisorLink(a), SupervisorLink(b)
    spare_r, spare_w = os.pipe()
    try:
        await sender.send(supervision.Peer(1))
        with pytest.raises(GSSError, match="PEER without its one fd"):
            await receiver.receive()
        await sender.send(supervision.Spawned(bytes(16), 1, 2), (spare_r,))
        with pytest.raises(GSSError, match="fds on a message"):
            await receiver.receive()
        await sender.send(supervision.Peer(1), (spare_r,))
        incoming = await receiver.receive()
        assert incoming.message == supervision.Peer(1) and len(incoming.fds) == 1
        os.close(incoming.fds[0])
    finally:
        sender.close()
        receiver.close()
        os.close(spare_r)
        os.close(spare_w)


async def test_a_peer_sent_to_the_supervisor_is_refused_and_its_fd_closed(
        tmp_path: Path) -> None:
    """PEER is the supervisor's to send: one from a (compromised) acceptor is logged and
    its fd closed, and the link keeps working."""
    from handoffd.runtime.supervisor import ProcessPlan, Supervisor, _Acceptor
    from handoffd.runtime.supervisor_link import SupervisorLink

    config = parse_config({}, base=tmp_path)
    plan = ProcessPlan(False, (os.getuid(), os.getgid()))
    supervisor = Supervisor(config, plan)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    acceptor = _Acceptor(child=None, link=SupervisorLink(ours), serial=1,  # type: ignore[arg-type]
                         plan=plan, argv=[], pool=None)
    compromised = SupervisorLink(theirs)
    read_end, write_end = os.pipe()
    before = len(os.listdir("/proc/self/fd"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor._serve_link, acceptor, nursery)
        await compromised.send(supervision.Peer(1), (read_end,))
        await compromised.send(supervision.Notify(("READY=1",)))
        with trio.fail_after(5):
            await acceptor.became_ready.wait()  # read after the PEER: the link works
        assert len(os.listdir("/proc/self/fd")) == before
        compromised.close()
    acceptor.link.close()
    os.close(read_end)
    os.close(write_end)


def _snapshot(pid: int, accepted: int, workers: list[dict[str, Any]],
              latencies: tuple[float, ...] = ()) -> dict[str, Any]:
    totals = {"accepted": accepted, "handshakes_ok": accepted, "handoffs": accepted,
              "acked": accepted, "lost": 0}
    return {"pid": pid, "state": "running", "uptime_s": 1.0, "workers": workers,
            "totals": totals, "sessions_active": len(workers),
            "handshake_slots": {"capacity": 256, "first_token": 1, "handshake": 0,
                                "waiting_for_worker": 0},
            "waiting_for_worker": 0, "handshake_failures": {"GSS_S_FAILURE": 1},
            "refused_by_worker": {},
            "handoff_latency_us": {"p50": None, "p99": None},
            "handoff_latency_seconds": {"sum": sum(latencies), "count": len(latencies),
                                        "p50": None, "p99": None}}


def test_merged_status_sums_every_acceptor_and_lists_each() -> None:
    worker = {"index": 0, "state": "ready", "in_flight": 1}
    own = _snapshot(100, 5, [{**worker, "acceptor": 0}], (0.001,))
    other = _snapshot(200, 7, [{**worker, "acceptor": 1}], (0.003, 0.003))
    merged = merge_snapshots(own, [0.001], {
        1: {"snapshot": other, "latencies_us": [3000.0, 3000.0]}, 2: None})
    assert merged["pid"] == 100
    assert merged["totals"]["accepted"] == 12 and merged["totals"]["lost"] == 0
    assert [w["acceptor"] for w in merged["workers"]] == [0, 1]
    assert merged["handshake_slots"]["capacity"] == 512
    assert merged["sessions_active"] == 2
    assert merged["handshake_failures"] == {"GSS_S_FAILURE": 2}
    assert merged["handoff_latency_seconds"]["count"] == 3
    assert merged["handoff_latency_us"]["p50"] == pytest.approx(3000.0)
    assert merged["acceptors"] == [
        {"index": 0, "pid": 100, "state": "running", "workers": 1, "feeds": 1, "accepted": 5,
         "handshakes_ok": 5, "handoffs": 5, "acked": 5, "in_flight": 1, "sessions_active": 1},
        {"index": 1, "pid": 200, "state": "running", "workers": 1, "feeds": 1, "accepted": 7,
         "handshakes_ok": 7, "handoffs": 7, "acked": 7, "in_flight": 1, "sessions_active": 1},
        {"index": 2, "state": "unreachable"},
    ]
    assert own["totals"]["accepted"] == 5, "the acceptor's own snapshot is not changed"


def test_merged_status_lists_each_shared_worker_once_under_its_own_acceptor() -> None:
    """The shared pool: each acceptor reports its own workers and, as guests, the other's;
    the merge keeps the spawning acceptor's row and sums what each handed the worker."""
    def row(pid: int, acceptor: int, guest: bool, in_flight: int, handled: int
            ) -> dict[str, Any]:
        return {"index": 2000 if guest else 0, "pid": pid, "state": "ready",
                "in_flight": in_flight, "handled": handled, "active": handled,
                "acceptor": acceptor, "guest": guest}

    own = _snapshot(100, 5, [row(11, 0, False, 1, 3), row(22, 0, True, 0, 2)])
    other = _snapshot(200, 7, [row(22, 1, False, 2, 4), row(11, 1, True, 1, 5)])
    merged = merge_snapshots(own, [], {1: {"snapshot": other, "latencies_us": []}})
    by_pid = {w["pid"]: w for w in merged["workers"]}
    assert sorted(by_pid) == [11, 22] and len(merged["workers"]) == 2
    assert by_pid[11]["acceptor"] == 0 and by_pid[22]["acceptor"] == 1
    assert not by_pid[11]["guest"] and not by_pid[22]["guest"]
    assert (by_pid[11]["in_flight"], by_pid[11]["handled"], by_pid[11]["active"]) == (2, 8, 8)
    assert by_pid[11]["in_flight_by_acceptor"] == {"0": 1, "1": 1}
    assert by_pid[22]["handled_by_acceptor"] == {"1": 4, "0": 2}
    assert [(a["workers"], a["feeds"]) for a in merged["acceptors"]] == [(1, 2), (1, 2)]


def test_one_acceptor_keeps_its_snapshot_and_gets_one_row() -> None:
    own = _snapshot(100, 5, [])
    merged = merge_snapshots(own, [], {})
    assert {k: v for k, v in merged.items() if k != "acceptors"} == own
    assert [row["index"] for row in merged["acceptors"]] == [0]


# ---------------------------------------------------------------------- a real daemon

def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as file:
        entries = file.read().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


async def _both_used(daemon: RunningDaemon, rounds: int = 20) -> dict[str, Any]:
    """Clients in parallel until each acceptor has completed a handshake."""
    with trio.fail_after(60):
        for _ in range(rounds):
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(echo_session, daemon, 1)
            status = await daemon.status()
            if all(a["handshakes_ok"] > 0 for a in status["acceptors"]):
                return status
    raise AssertionError(f"an acceptor took no client: {status['acceptors']}")


async def _acceptor_rows(daemon: RunningDaemon) -> list[dict[str, Any]]:
    """``status``'s acceptors; a query cut off by a handover or a dying acceptor 0 is
    retried."""
    with trio.fail_after(30):
        while True:
            try:
                rows: list[dict[str, Any]] = (await daemon.status())["acceptors"]
                return rows
            except GSSError:
                await trio.sleep(0.05)


@supervised
async def test_two_acceptors_share_the_listener_each_separated_with_workers_of_its_own(
        tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    acceptor_uid = separated_uids()[0]
    pki = _write_pki(tmp_path, acceptor_uid)
    metrics_port = _free_port()
    extra = (TWO + "[tls]\nlisten = [\"127.0.0.1:0\"]\n"
             f'certificate = "{pki["cert"]}"\nkey = "{pki["key"]}"\n'
             f"[control]\nmetrics = \"127.0.0.1:{metrics_port}\"\n")
    daemon = await start_daemon(tmp_path, workers=4, app="tests.apps:https_whoami",
                                extra=extra, acceptor_uid=acceptor_uid,
                                log=tmp_path / "daemon.log")
    try:
        status = await daemon.status()
        rows = status["acceptors"]
        assert [row["index"] for row in rows] == [0, 1]
        pids = [row["pid"] for row in rows]
        assert status["pid"] == pids[0] and len(set(pids)) == 2
        for pid in pids:
            assert owner_of(pid) == (acceptor_uid, acceptor_uid)
            # Undumpable: the kernel makes its /proc files root's.
            assert os.stat(f"/proc/{pid}/mem").st_uid == 0
            with open(f"/proc/{pid}/status") as proc_status:
                assert "CapEff:\t0000000000000000" in proc_status.read()
        # Two workers each, each under a uid of its own, each told its own acceptor
        # only: it checks every handoff's sender (SO_PEERCRED, pidfd) against it.
        workers = status["workers"]
        assert sorted(w["acceptor"] for w in workers) == [0, 0, 1, 1]
        assert len({w["uid"] for w in workers}) == 4 and acceptor_uid not in {
            w["uid"] for w in workers}
        for w in workers:
            assert int(_environ(w["pid"])["HANDOFFD_ACCEPTOR_PID"]) == pids[w["acceptor"]]

        # TLS on the shared TLS listener: both acceptors take some.
        (address,) = status["tls_listen"]
        port = int(address.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        async with httpx.AsyncClient(verify=context, http2=False) as client:
            with trio.fail_after(60):
                while True:
                    async with trio.open_nursery() as nursery:
                        for _ in range(16):
                            nursery.start_soon(client.get, f"https://localhost:{port}/")
                    rows = await _acceptor_rows(daemon)
                    if all(row["handshakes_ok"] > 0 for row in rows):
                        break
            response = await client.get(f"https://localhost:{port}/")
            assert b"mechanism=tls" in response.content
        tls_rows = await _acceptor_rows(daemon)

        # Noise on the shared listener: both acceptors take more.
        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(_noise_whoami, daemon)
        status = await daemon.status()
        assert sum(row["handshakes_ok"] for row in status["acceptors"]) >= sum(
            row["handshakes_ok"] for row in tls_rows) + 32
        assert status["totals"]["handshakes_ok"] == sum(
            row["handshakes_ok"] for row in status["acceptors"])
        assert status["totals"]["lost"] == 0

        # handoffd status shows one row per acceptor and whose each worker is.
        shown = await trio.run_process(
            [sys.executable, "-m", "handoffd", "status", "--control", str(daemon.control)],
            capture_stdout=True, cwd=REPO)
        lines = shown.stdout.decode().splitlines()
        header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["acceptor",
                                                                                "pid"])
        assert [line.split()[:2] for line in lines[header + 1:header + 3]] == [
            ["0", str(pids[0])], ["1", str(pids[1])]]
        assert any(line.split()[-1:] == ["acceptor"] for line in lines)

        # Metrics (served by acceptor 0) have each acceptor's figures.
        text = await _metrics(metrics_port)
        assert "handoffd_acceptors 2" in text
        for index in (0, 1):
            assert f'handoffd_acceptor_handshakes_ok_total{{acceptor="{index}"}}' in text
    finally:
        assert await daemon.stop() == 0


async def _noise_whoami(daemon: RunningDaemon) -> None:
    """A Noise client of the https_whoami app: one request line, the status line back."""
    stream = await daemon.connect()
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_line(stream)).startswith(b"HTTP/1.1 200")


async def _metrics(port: int) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    return response.text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _feeds_become(daemon: RunningDaemon, feeds: list[int]) -> dict[str, Any]:
    """``status`` once each acceptor's ``feeds`` (ready workers it hands off to) is
    ``feeds``: a worker says HELLO to its own acceptor first, then to the guests', so a
    status taken the moment the pool is ready may not count the last guests yet."""
    with trio.fail_after(30):
        while True:
            status = await daemon.status()
            if [row.get("feeds") for row in status["acceptors"]] == feeds:
                return status
            await trio.sleep(0.05)


async def _sender_session(daemon: RunningDaemon) -> tuple[int, int, Any]:
    """A ``sender_echo`` client: (worker pid, acceptor pid, the open stream)."""
    stream = await daemon.connect()
    worker, acceptor = (int(x) for x in (await read_line(stream)).split())
    return worker, acceptor, stream


async def _pairs_until(daemon: RunningDaemon, wanted: set[tuple[int, int]],
                       keep: list[Any] | None = None) -> set[tuple[int, int]]:
    """Clients in parallel until every (worker, acceptor) pair of ``wanted`` served one
    (bounded); one stream per wanted pair is kept open in ``keep`` if given, the rest
    closed."""
    seen: set[tuple[int, int]] = set()

    async def one() -> None:
        worker, acceptor, stream = await _sender_session(daemon)
        if keep is not None and (worker, acceptor) in wanted - seen:
            keep.append((worker, acceptor, stream))
        else:
            await stream.aclose()
        seen.add((worker, acceptor))

    with trio.fail_after(60):
        for _ in range(40):
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(one)
            if wanted <= seen:
                return seen
    raise AssertionError(f"never served: {sorted(wanted - seen)}")


@supervised
async def test_the_pool_is_shared_every_acceptor_hands_off_to_every_worker(
        tmp_path: Path) -> None:
    """Each worker has a channel and key slots per acceptor (its own acceptor's, and a
    guest channel of each other's made at its spawn); every acceptor feeds every worker,
    and each handoff's sender is checked against the acceptor of the channel it came
    through."""
    daemon = await start_daemon(tmp_path, workers=4, app="tests.apps:sender_echo",
                                extra=TWO)
    try:
        status = await _feeds_become(daemon, [4, 4])
        acceptors = [row["pid"] for row in status["acceptors"]]
        assert [row["workers"] for row in status["acceptors"]] == [2, 2]
        workers = status["workers"]
        assert sorted(w["acceptor"] for w in workers) == [0, 0, 1, 1], "each listed once"
        for w in workers:
            environ = _environ(w["pid"])
            assert int(environ["HANDOFFD_ACCEPTOR_PID"]) == acceptors[w["acceptor"]]
            (guest,) = json.loads(environ["HANDOFFD_GUESTS"])
            assert guest["acceptor_pid"] == acceptors[1 - w["acceptor"]]
            assert guest["grant"]["HANDOFFD_PARKING_MODE"] == "keyring"
        wanted = {(w["pid"], a) for w in workers for a in acceptors}
        await _pairs_until(daemon, wanted)
        status = await daemon.status()
        for w in status["workers"]:
            assert set(w["in_flight_by_acceptor"]) == {"0", "1"}
            assert all(n > 0 for n in w["handled_by_acceptor"].values())
            assert sum(w["handled_by_acceptor"].values()) == w["handled"]
        assert status["totals"]["lost"] == 0
        assert sum(w["handled"] for w in status["workers"]) == status["totals"]["acked"]
    finally:
        assert await daemon.stop() == 0


@supervised
async def test_a_dead_acceptor_s_sessions_on_shared_workers_go_on_and_its_successor_joins(
        tmp_path: Path) -> None:
    """SIGKILL to acceptor 1: the sessions it had handed to acceptor 0's workers go on
    (those workers take handoffs from acceptor 0 as before), its own workers finish
    theirs and leave, and its replacement's workers are fed by both acceptors.  The
    replacement does not attach to acceptor 0's running workers (docs/PRIVSEP.md)."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=4, app="tests.apps:sender_echo",
                                extra=TWO, log=log)
    try:
        status = await daemon.status()
        survivor, victim = (row["pid"] for row in status["acceptors"])
        survivors_workers = {w["pid"] for w in status["workers"] if w["acceptor"] == 0}
        victims_workers = {w["pid"] for w in status["workers"] if w["acceptor"] == 1}
        sessions: list[Any] = []
        await _pairs_until(daemon, {(w, a) for w in survivors_workers | victims_workers
                                    for a in (survivor, victim)}, keep=sessions)
        os.kill(victim, signal.SIGKILL)
        await _wait_log(log, "ACCEPTOR_DIED")
        for _, _, stream in sessions:
            assert await echo_on(stream, b"after the kill") == b"after the kill"
        for worker, _, stream in sessions:
            if worker in victims_workers:
                await stream.aclose()  # its own workers leave once their sessions end
        with trio.fail_after(60):
            while True:
                rows = await _acceptor_rows(daemon)
                if rows[1].get("pid") not in (None, victim) and rows[1].get("workers") == 2 \
                        and not victims_workers & set(await daemon.worker_pids()):
                    break
                await trio.sleep(0.05)
        successor = rows[1]["pid"]
        status = await _feeds_become(daemon, [4, 2])
        successors_workers = {w["pid"] for w in status["workers"] if w["acceptor"] == 1}
        await _pairs_until(daemon, {(w, a) for w in successors_workers
                                    for a in (survivor, successor)}
                           | {(w, survivor) for w in survivors_workers})
        for worker, _, stream in sessions:
            if worker in survivors_workers:
                assert await echo_on(stream, b"still") == b"still"
                await stream.aclose()
        assert (await daemon.status())["totals"]["lost"] == 0
    finally:
        assert await daemon.stop() == 0


@supervised
@pytest.mark.parametrize("index", [1, 0])
async def test_sigkill_to_one_acceptor_loses_no_handed_off_session_and_it_is_replaced(
        tmp_path: Path, index: int) -> None:
    """Acceptor 1, or acceptor 0 (which answers status: its replacement gets acceptor
    1's status socket from the supervisor again)."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=4, extra=TWO, log=log)
    try:
        status = await _both_used(daemon)
        victim = status["acceptors"][index]["pid"]
        survivor = status["acceptors"][1 - index]["pid"]
        victims_workers = {w["pid"] for w in status["workers"] if w["acceptor"] == index}
        # Sessions open on every worker, so on both acceptors' workers.
        sessions: list[Any] = []

        async def open_one() -> None:
            stream = await daemon.connect()
            sessions.append((stream, await read_line(stream)))

        with trio.fail_after(60):
            while {int(s[1]) for s in sessions} < victims_workers:
                assert len(sessions) < 400, "the victim's workers got no session"
                async with trio.open_nursery() as nursery:
                    for _ in range(8):  # in parallel, so that both acceptors take some
                        nursery.start_soon(open_one)
        os.kill(victim, signal.SIGKILL)
        await _wait_log(log, "ACCEPTOR_DIED")
        # Every session handed off before, on either acceptor's workers, goes on.
        for stream, _ in sessions:
            assert await echo_on(stream, b"after the kill") == b"after the kill"
        # The daemon keeps serving meanwhile and a new acceptor takes the place.
        with trio.fail_after(60):
            for _ in range(8):
                await echo_session(daemon, messages=1)
            while True:
                rows = await _acceptor_rows(daemon)  # waits for a new acceptor 0
                if rows[index].get("pid") not in (None, victim) and all(
                        row.get("workers") == 2 for row in rows):
                    break
                await trio.sleep(0.05)
        status = await _both_used(daemon)
        assert status["acceptors"][1 - index]["pid"] == survivor
        # The dead acceptor's workers still serve their sessions, alone.
        for stream, _ in sessions:
            assert await echo_on(stream, b"still") == b"still"
            await stream.aclose()
        assert status["totals"]["lost"] == 0
    finally:
        assert await daemon.stop() == 0


@supervised
async def test_reload_and_restart_with_two_acceptors_fail_no_client(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=4, extra=TWO, log=log)
    supervisor = daemon.process.pid
    try:
        await _both_used(daemon)
        old = {row["pid"] for row in await _acceptor_rows(daemon)}
        with trio.fail_after(120):
            async with clients_looping(daemon) as clients:
                old_workers = set(await daemon.worker_pids())
                os.kill(supervisor, signal.SIGHUP)
                await _wait_log(log, "reloaded", count=2)  # both acceptors
                while len(set(await daemon.worker_pids()) - old_workers) < 4:
                    await trio.sleep(0.05)
                await clients.more(20)
                os.kill(supervisor, signal.SIGUSR2)
                await _wait_log(log, "restarted: acceptor pid")
                while True:
                    rows = await _acceptor_rows(daemon)
                    if not old & {row.get("pid") for row in rows}:
                        break
                    await trio.sleep(0.05)
                await clients.more(20)
            assert clients.failures == [], f"{len(clients.failures)} clients failed"
        rows = await _acceptor_rows(daemon)
        assert len(rows) == 2 and all(row["state"] == "running" for row in rows)
        assert "ACCEPTOR_DIED" not in log.read_text()
    finally:
        assert await daemon.stop() == 0


@supervised
async def test_the_number_of_acceptors_changes_at_a_restart_not_at_a_reload(
        tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=4, log=log)
    config = tmp_path / "handoffd.toml"
    try:
        assert len(await _acceptor_rows(daemon)) == 1
        config.write_text(config.read_text().replace("[server]\n", TWO, 1))
        os.kill(daemon.process.pid, signal.SIGHUP)
        await _wait_log(log, "[server] acceptors changed but take effect at the next restart")
        assert len(await _acceptor_rows(daemon)) == 1
        os.kill(daemon.process.pid, signal.SIGUSR2)
        await _wait_log(log, "restarted: acceptor pid")
        with trio.fail_after(30):
            while len(rows := await _acceptor_rows(daemon)) != 2 or not all(
                    row.get("workers") == 2 for row in rows):
                await trio.sleep(0.05)
        await _both_used(daemon)
        # And back to one.
        config.write_text(config.read_text().replace("acceptors = 2\n", "", 1))
        os.kill(daemon.process.pid, signal.SIGUSR2)
        await _wait_log(log, "restarted: acceptor pid", count=2)
        with trio.fail_after(30):
            while len(rows := await _acceptor_rows(daemon)) != 1 or rows[0]["workers"] != 4:
                await trio.sleep(0.05)
        await echo_session(daemon, messages=1)
    finally:
        assert await daemon.stop() == 0
