"""Key parking (handoffd.kernel.parking) with real worker processes and the real kernel.

Workers are spawned the way the daemon spawns them: a subprocess started with
the grant's environment and ``pass_fds``, which adopts the grant and then
answers commands over a pipe (``claim <ref>``, ``read <serial>``, ``fds``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from handoffd.kernel import keyring
from handoffd.kernel.parking import AcceptorParking, WorkerGrant, WorkerParking
from handoffd.minor import Minor
from handoffd.status import GSS_S_UNAVAILABLE, GSSError
from tests.throwaway import throwaway_user

ROOT = Path(__file__).resolve().parents[1]
SLOTS = 4
User = tuple[int, int]


def _keyctl_works() -> bool:
    try:
        return keyring.probe() is keyring.KeyringStatus.AVAILABLE
    except GSSError:
        return False


KEYCTL = _keyctl_works()
needs_keyctl = pytest.mark.skipif(not KEYCTL, reason="keyctl refused on this host")
MODES = [pytest.param("keyring", marks=needs_keyctl), "fallback"]

WORKER = r"""
import os, sys
from handoffd.kernel import keyring
from handoffd.kernel.parking import WorkerParking
from handoffd.status import GSSError
parking = WorkerParking.adopt(os.environ)
print("adopted", parking.mode, flush=True)
for line in sys.stdin:
    command, _, argument = line.strip().partition(" ")
    try:
        if command == "claim":
            print("OK", parking.claim(bytes.fromhex(argument)).hex(), flush=True)
        elif command == "read":
            print("OK", keyring.read(int(argument)).hex(), flush=True)
        elif command == "fds":
            print("OK", " ".join(sorted(os.listdir("/proc/self/fd"))), flush=True)
    except GSSError as error:
        print("ERR", int(error.minor), error.detail, flush=True)
"""

PLAIN_CHILD = r"""
import sys
from handoffd.kernel import keyring
from handoffd.status import GSSError
try:
    keyring.read(int(sys.argv[1]))
    print("readable")
except GSSError as error:
    print(error.detail)
"""


class Worker:
    """A worker process spawned with a grant, driven line by line."""

    def __init__(self, grant: WorkerGrant) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER], env={**os.environ, **grant.env},
            pass_fds=grant.pass_fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=ROOT)
        for fd in grant.pass_fds:  # as the daemon does once the worker is spawned
            os.close(fd)
        self.grant = grant

    def adopted(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        assert line[0] == "adopted", line
        return line[1]

    def ask(self, command: str) -> list[str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().split(" ", 2)

    def claim(self, ref: bytes) -> bytes:
        answer = self.ask(f"claim {ref.hex()}")
        assert answer[0] == "OK", answer
        return bytes.fromhex(answer[1].strip())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


Spawn = Callable[[WorkerGrant], Worker]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    workers: list[Worker] = []

    def start(grant: WorkerGrant) -> Worker:
        workers.append(Worker(grant))
        return workers[-1]

    yield start
    for w in workers:
        w.close()


@pytest.fixture(params=MODES)
def parking(request: pytest.FixtureRequest) -> Iterator[AcceptorParking]:
    p = AcceptorParking.open(slots_per_worker=SLOTS, mode=request.param)
    yield p
    p.close()


def new_worker(parking: AcceptorParking,
               spawn: Callable[[WorkerGrant], Worker]) -> tuple[bytes, Worker]:
    worker_id = secrets.token_bytes(16)
    w = spawn(parking.add_worker(worker_id))
    assert w.adopted() == parking.mode
    parking.worker_adopted(worker_id)
    return worker_id, w


def slot_serial(ref: bytes) -> int:
    return int.from_bytes(ref[1:5], "big")


# --- both modes ------------------------------------------------------------------------------


def test_park_claim_round_trip_in_a_real_worker(parking: AcceptorParking, spawn: Spawn) -> None:
    worker_id, w = new_worker(parking, spawn)
    keys = set()
    for _ in range(3 * SLOTS):
        ref, key = parking.park(worker_id)
        assert len(key) == 32 and key not in keys
        keys.add(key)
        assert w.claim(ref) == key
        parking.release(worker_id, ref)


def test_replay_fails(parking: AcceptorParking, spawn: Spawn) -> None:
    worker_id, w = new_worker(parking, spawn)
    ref, key = parking.park(worker_id)
    assert w.claim(ref) == key
    assert w.ask(f"claim {ref.hex()}")[:2] == ["ERR", str(int(Minor.PARKING_KEY_CLAIMED))]
    # The slot is re-armed for a later handoff: the old reference stays dead.
    parking.release(worker_id, ref)
    refs = [parking.park(worker_id) for _ in range(SLOTS)]
    assert w.ask(f"claim {ref.hex()}")[:2] == ["ERR", str(int(Minor.PARKING_KEY_CLAIMED))]
    for new_ref, new_key in refs:
        assert w.claim(new_ref) == new_key


def test_a_token_sent_to_another_worker_is_useless(parking: AcceptorParking, spawn: Spawn) -> None:
    first, a = new_worker(parking, spawn)
    _, b = new_worker(parking, spawn)
    ref, key = parking.park(first)
    answer = b.ask(f"claim {ref.hex()}")
    if parking.mode == "keyring":  # not one of b's slots: a foreign reference, not a replay
        assert answer[:2] == ["ERR", str(int(Minor.PARKING_BAD_REFERENCE))]
    else:  # another worker's secret derives another key: the seal will not open
        assert answer[0] == "OK" and bytes.fromhex(answer[1].strip()) != key
    assert a.claim(ref) == key  # the foreign attempt did not burn it


def test_a_malformed_reference_is_not_reported_as_a_claimed_key(
        parking: AcceptorParking, spawn: Spawn) -> None:
    worker_id, w = new_worker(parking, spawn)
    ref, key = parking.park(worker_id)
    other_tag = (b"F" if parking.mode == "keyring" else b"K") + ref[1:]
    for bad in (ref[:-1], ref + b"\x00", other_tag):
        answer = w.ask(f"claim {bad.hex()}")
        assert answer[:2] == ["ERR", str(int(Minor.PARKING_BAD_REFERENCE))], answer
        assert "malformed key reference" in answer[2]
    assert w.claim(ref) == key  # nothing was burned
    with pytest.raises(GSSError) as caught:
        parking.release(worker_id, ref[:-1])
    assert caught.value.minor == Minor.PARKING_BAD_REFERENCE


def test_slots_bound_the_handoffs_in_flight(parking: AcceptorParking) -> None:
    worker_id = secrets.token_bytes(16)
    grant = parking.add_worker(worker_id)
    for fd in grant.pass_fds:
        os.close(fd)
    refs = [parking.park(worker_id)[0] for _ in range(SLOTS)]
    with pytest.raises(GSSError) as caught:
        parking.park(worker_id)
    assert (caught.value.major, caught.value.minor) == (
        GSS_S_UNAVAILABLE, Minor.PARKING_SLOTS_EXHAUSTED)
    # A bad release changes nothing.
    for bad in (b"", b"x" * 13, refs[0][:-1] + bytes([refs[0][-1] ^ 1])):
        with pytest.raises(GSSError):
            parking.release(worker_id, bad)
    assert parking.slots_in_flight(worker_id) == SLOTS
    parking.release(worker_id, refs[0])
    with pytest.raises(GSSError):
        parking.release(worker_id, refs[0])  # twice
    parking.park(worker_id)
    parking.remove_worker(worker_id)
    parking.release(worker_id, refs[1])  # after removal: a no-op


def test_bad_calls(parking: AcceptorParking) -> None:
    with pytest.raises(GSSError) as caught:
        parking.park(b"\0" * 16)
    assert caught.value.minor == Minor.WORKER_NOT_REGISTERED
    with pytest.raises(GSSError):
        parking.add_worker(b"short")
    worker_id = secrets.token_bytes(16)
    for fd in parking.add_worker(worker_id).pass_fds:
        os.close(fd)
    with pytest.raises(GSSError):
        parking.add_worker(worker_id)
    with pytest.raises(GSSError):
        AcceptorParking.open(slots_per_worker=0)
    with pytest.raises(GSSError):
        AcceptorParking.open(slots_per_worker=1, mode="bogus")


def test_adopt_refuses_a_missing_or_bad_grant() -> None:
    for env in ({}, {"HANDOFFD_PARKING_MODE": "keyring"},
                {"HANDOFFD_PARKING_MODE": "nope", "HANDOFFD_PARKING_SLOTS": "1",
                 "HANDOFFD_PARKING_WORKER": "00" * 16}):
        with pytest.raises(GSSError) as caught:
            WorkerParking.adopt(env)
        assert caught.value.minor == Minor.KEYRING_BAD_ARGUMENT


# --- fallback specifics ------------------------------------------------------------------------


def test_fallback_grant_fd_is_closed_by_the_worker_and_never_in_env(spawn: Spawn) -> None:
    parking = AcceptorParking.open(slots_per_worker=2, mode="fallback",
                                   random=lambda n: b"\x01" * n)
    try:
        worker_id = secrets.token_bytes(16)
        grant = parking.add_worker(worker_id)
        (fd,) = grant.pass_fds
        assert (b"\x01" * 32).hex() not in json.dumps(grant.env)
        w = spawn(grant)
        w.adopted()
        assert str(fd) not in w.ask("fds")[1].split()
    finally:
        parking.close()


# --- keyring specifics (verified against the kernel) --------------------------------------------


@needs_keyctl
def test_possession_before_and_after_adoption(spawn: Spawn) -> None:
    """What a same-uid process gets from keyctl_read(serial), before and after the move.

    Before ``worker_adopted`` the worker keyring sits in the acceptor's session
    keyring, so *any* process the acceptor spawns possesses it; afterwards it sits in
    the acceptor's process keyring, which nothing inherits: EACCES.
    """
    parking = AcceptorParking.open(slots_per_worker=2, mode="keyring")
    try:
        worker_id = secrets.token_bytes(16)
        w = spawn(parking.add_worker(worker_id))
        w.adopted()
        ref, _ = parking.park(worker_id)
        serial = slot_serial(ref)

        def child() -> str:
            return subprocess.run([sys.executable, "-c", PLAIN_CHILD, str(serial)], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.strip()

        assert child() == "readable"
        parking.worker_adopted(worker_id)
        assert child() == "keyctl_read: EACCES"
        assert keyring.describe(serial).permissions == keyring.KEY_POS_ALL
    finally:
        parking.close()


@needs_keyctl
def test_siblings_spawned_together_cannot_read_each_other(spawn: Spawn) -> None:
    """Both spawned while both keyrings were in the session keyring: after adopting
    (fresh session keyring each) the kernel refuses the sibling's slots."""
    parking = AcceptorParking.open(slots_per_worker=2, mode="keyring")
    try:
        ids = [secrets.token_bytes(16) for _ in range(2)]
        workers = [spawn(parking.add_worker(i)) for i in ids]
        for worker_id, w in zip(ids, workers, strict=True):
            w.adopted()
            parking.worker_adopted(worker_id)
        ref, key = parking.park(ids[0])
        assert workers[1].ask(f"read {slot_serial(ref)}") == [
            "ERR", str(int(Minor.KEYRING_DENIED)), "keyctl_read: EACCES\n"]
        assert workers[0].claim(ref) == key
    finally:
        parking.close()


def _proc_keys_serials() -> set[int]:
    return {int(line.split()[0], 16) for line in Path("/proc/keys").read_text().splitlines()}


def _poll(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@needs_keyctl
def test_keys_of_a_killed_worker_are_cleaned_up(spawn: Spawn) -> None:
    parking = AcceptorParking.open(slots_per_worker=3, mode="keyring")
    try:
        worker_id = secrets.token_bytes(16)
        grant = parking.add_worker(worker_id)
        ring = int(grant.env["HANDOFFD_PARKING_KEYRING"])
        w = spawn(grant)
        w.adopted()
        parking.worker_adopted(worker_id)
        parking.park(worker_id)  # an armed slot too
        ours = {ring, *keyring.keyring_members(ring)}
        assert len(ours) == 4 and ours <= _proc_keys_serials()
        w.process.send_signal(signal.SIGKILL)
        w.process.wait()
        parking.remove_worker(worker_id)
        assert _poll(lambda: not ours & _proc_keys_serials())
    finally:
        parking.close()


# --- other uid, quota soak (root: they create a throwaway user) ---------------------------------


@pytest.fixture(scope="module")
def other_user() -> Iterator[tuple[int, int]]:
    if not KEYCTL:
        pytest.skip("keyctl refused on this host")
    with throwaway_user("hdkt") as (_name, uid, gid):
        yield uid, gid


def run_as(user: tuple[int, int], function: Callable[[], object]) -> object:
    """Run ``function`` in a forked child switched to ``user``; its JSON-able result.

    Forked, not exec'd: the interpreter may live where the throwaway user cannot read.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user[1])
            os.setuid(user[0])
            data = json.dumps({"ok": function()})
        except BaseException as error:
            data = json.dumps({"error": repr(error)})
        os.write(write_end, data.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks))
    assert "error" not in result, result["error"]
    return result["ok"]


@pytest.mark.root
def test_another_uid_cannot_read_parked_keys(other_user: User, spawn: Spawn) -> None:
    parking = AcceptorParking.open(slots_per_worker=2, mode="keyring")
    try:
        worker_id, w = new_worker(parking, spawn)
        ref, key = parking.park(worker_id)

        def attempt() -> str:
            try:
                return keyring.read(slot_serial(ref)).hex()
            except GSSError as error:
                return str(error.detail)

        assert run_as(other_user, attempt) == "keyctl_read: EACCES"
        assert w.claim(ref) == key
    finally:
        parking.close()


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


SOAK_CYCLES = 20_000
SOAK_SLOTS = 8


def _soak() -> dict[str, object]:
    """As an unprivileged user: one acceptor, one forked worker, park+claim at full speed."""
    uid = os.getuid()

    def usage() -> tuple[int, int, int]:
        u = keyring.read_key_users(uid)
        return u.nkeys, u.qnkeys, u.qnbytes

    def settled_usage() -> tuple[int, int, int]:
        # Revoked keys (the probe's, say) give their quota back asynchronously: wait
        # until two readings 60 ms apart agree (at most ~1 s).
        previous = usage()
        for _ in range(16):
            time.sleep(0.06)
            current = usage()
            if current == previous:
                break
            previous = current
        return previous

    parking = AcceptorParking.open(slots_per_worker=SOAK_SLOTS, mode="keyring")
    start = settled_usage()
    worker_id = secrets.token_bytes(16)
    grant = parking.add_worker(worker_id)
    refs_r, refs_w = os.pipe()
    keys_r, keys_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the worker
        try:
            os.close(refs_w)
            os.close(keys_r)
            worker = WorkerParking.adopt(grant.env)
            os.write(keys_w, b"!")
            while True:
                batch = os.read(refs_r, 13 * SOAK_SLOTS)
                if not batch:
                    break
                os.write(keys_w, b"".join(worker.claim(batch[i:i + 13])
                                          for i in range(0, len(batch), 13)))
        finally:
            os._exit(0)
    os.close(refs_r)
    os.close(keys_w)
    assert _read_exactly(keys_r, 1) == b"!"
    parking.worker_adopted(worker_id)

    def cycle() -> None:
        parked = [parking.park(worker_id) for _ in range(SOAK_SLOTS)]
        os.write(refs_w, b"".join(ref for ref, _ in parked))
        claimed = _read_exactly(keys_r, 32 * SOAK_SLOTS)
        if claimed != b"".join(key for _, key in parked):
            raise AssertionError("claimed keys differ")
        for ref, _ in parked:
            parking.release(worker_id, ref)

    cycle()
    baseline = settled_usage()
    began = time.perf_counter()
    for _ in range(SOAK_CYCLES // SOAK_SLOTS):
        cycle()
    elapsed = time.perf_counter() - began
    after_load = usage()
    settled = _poll(lambda: usage() == baseline, 1.0)
    os.close(refs_w)
    os.waitpid(pid, 0)
    os.close(keys_r)
    parking.close()
    back = _poll(lambda: usage() == start, 1.0)
    return {"start": start, "baseline": baseline, "after_load": after_load,
            "settled": settled, "back_to_start": back, "end": usage(),
            "maxkeys": keyring.read_key_users(uid).maxkeys, "seconds": elapsed}


@pytest.mark.root
def test_quota_soak_as_an_unprivileged_user(other_user: User) -> None:
    """20,000 park-and-claim cycles as a non-root user: no EDQUOT, no growth."""
    result = run_as(other_user, _soak)
    assert isinstance(result, dict)
    assert result["maxkeys"] == int(Path("/proc/sys/kernel/keys/maxkeys").read_text())
    assert result["settled"], result
    assert result["back_to_start"], result
    print(f"soak: {SOAK_CYCLES} cycles in {result['seconds']:.2f} s", result)


def test_the_fallback_warning_says_why_fallback_was_chosen(
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 19: the external workers' parking warned "forced by configuration" though
    the config said ``auto``; fallback asked for by the caller names who may have asked,
    and a caller that gives its reason is quoted."""
    from handoffd.kernel.parking import EXTERNAL_WORKERS_REASON

    with caplog.at_level("WARNING", logger="handoffd.keyring"):
        AcceptorParking.open(slots_per_worker=1, mode="fallback").close()
        AcceptorParking.open(slots_per_worker=1, mode="fallback",
                             reason=EXTERNAL_WORKERS_REASON).close()
    requested, external = (r.getMessage() for r in caplog.records)
    for message in (requested, external):
        assert "forced by configuration" not in message
        assert "PARKING_FALLBACK_MODE" in message
    assert 'requested: [workers] keyring = "fallback", or the parking for external' in requested
    assert "external workers ([workers] register_socket) cannot inherit a keyring" in external
    assert "whatever [workers] keyring says" in external
