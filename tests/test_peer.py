"""Peer identity, pidfds, labels and policy (handoffd.kernel.peer) against the real kernel.

Forks happen in plain sync tests, never inside ``trio.run``.  No LSM labels sockets
on this kernel (SO_PEERSEC -> ENOPROTOOPT), so label *values* are produced by an
injected getsockopt in the tests marked ``injected``; tests/lsm covers real labels.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from handoffd.kernel.peer import (
    NAME_MAX,
    SO_PEERSEC,
    OptionTooLong,
    PeerIdentity,
    PeerPolicy,
    open_peer_pidfd,
    pidfd_alive,
    pidfd_pid,
    read_peer_identity,
    read_peer_label,
)
from handoffd.minor import Minor
from handoffd.status import GSS_S_UNAUTHORIZED, GSSError

NOBODY = 65534


def fork(part: Callable[[], None]) -> int:
    """Fork a child that runs ``part`` and exits 0 if it returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            part()
            status = 0
        finally:
            os._exit(status)
    return pid


def wait_ok(pid: int) -> None:
    """Reap ``pid`` and require exit status 0."""
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@contextmanager
def accepted_from_child(
    directory: Path, before_connect: Callable[[], None] = lambda: None
) -> Iterator[tuple[socket.socket, int]]:
    """A seqpacket connection accepted from a forked child, and the child's pid.

    The child connects, sends one byte and waits until we hang up.
    """
    # Abstract address: a child that dropped privileges needs no directory access.
    path = f"\0handoffd-test-peer-{os.getpid()}-{directory.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(10)  # a child that failed before connecting must not hang us

        def child() -> None:
            before_connect()
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.connect(path)
                sock.send(b"!")
                sock.recv(1)

        pid = fork(child)
        try:
            conn, _ = listener.accept()
            with conn:
                assert conn.recv(1) == b"!"
                yield conn, pid
        finally:
            wait_ok(pid)


def test_peer_credentials_name_the_connecting_child(tmp_path: Path) -> None:
    """SO_PEERCRED after accept(): the child's pid and our uid/gid (it inherited them)."""
    with accepted_from_child(tmp_path) as (conn, pid):
        identity = read_peer_identity(conn)
    assert pid != os.getpid()
    assert (identity.pid, identity.uid, identity.gid) == (pid, os.getuid(), os.getgid())


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch the child to nobody")
def test_peer_credentials_follow_the_childs_uid_and_gid(tmp_path: Path) -> None:
    """A child that became nobody:nogroup before connecting is reported as such."""

    def become_nobody() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    with accepted_from_child(tmp_path, become_nobody) as (conn, pid):
        identity = read_peer_identity(conn)
    assert (identity.pid, identity.uid, identity.gid) == (pid, NOBODY, NOBODY)
    with pytest.raises(GSSError) as refused:
        PeerPolicy(uids=frozenset({0})).check(identity)
    assert refused.value.minor == Minor.PEER_UID_NOT_ALLOWED


def test_peercred_names_the_socketpair_creator_not_a_later_writer() -> None:
    """The end handed to a child keeps reporting its creator (us), although the child
    is the one writing; per-message SCM_CREDENTIALS tell the truth."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def child() -> None:
        ours.close()
        seen = read_peer_identity(theirs)  # the child sees the creator too
        theirs.send(str(seen.pid).encode())

    pid = fork(child)
    theirs.close()
    try:
        message, ancillary, _, _ = ours.recvmsg(64, socket.CMSG_SPACE(12))
        identity = read_peer_identity(ours)
    finally:
        wait_ok(pid)
        ours.close()
    assert identity.pid == os.getpid() != pid
    assert int(message) == os.getpid()
    [(_, kind, creds)] = ancillary
    assert kind == socket.SCM_CREDENTIALS
    assert int.from_bytes(creds[:4], "little") == pid


def test_unconnected_socket_has_no_peer_credentials() -> None:
    """No peer: SO_PEERCRED reports pid 0, which is refused rather than trusted."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as lonely:
        with pytest.raises(GSSError) as missing:
            read_peer_identity(lonely)
        assert missing.value.minor == Minor.PEER_CREDENTIALS_UNAVAILABLE
        with pytest.raises(GSSError) as no_pidfd:
            open_peer_pidfd(lonely)
        assert no_pidfd.value.minor == Minor.PEER_CREDENTIALS_UNAVAILABLE


def test_peer_pidfd_sees_the_child_die(tmp_path: Path) -> None:
    """SO_PEERPIDFD names the child; once it is killed the pidfd reports it gone."""
    path = str(tmp_path / "pidfd.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(10)

        def child() -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.connect(path)
            signal.pause()

        pid = fork(child)
        conn, _ = listener.accept()
    with conn:
        pidfd = open_peer_pidfd(conn)
    if pidfd is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.skip("SO_PEERPIDFD not supported by this kernel")
    try:
        assert pidfd_pid(pidfd) == pid
        assert pidfd_alive(pidfd)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        assert not pidfd_alive(pidfd)
    finally:
        os.close(pidfd)
    with pytest.raises(GSSError):
        pidfd_alive(pidfd)  # closed: a caller bug, not "dead"


def test_no_lsm_label_on_this_kernel_means_none() -> None:
    """Real SO_PEERSEC: ENOPROTOOPT (no LSM labels sockets) is "no label"; with
    require=True it is refused.  Where an LSM does label sockets, the label is returned
    normalised."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        try:
            raw: bytes | None = left.getsockopt(socket.SOL_SOCKET, SO_PEERSEC, NAME_MAX)
        except OSError as error:
            assert error.errno == errno.ENOPROTOOPT
            raw = None
        label = read_peer_label(left)
        identity = read_peer_identity(left)
        if raw is None:
            assert label is None and identity.label is None
            with pytest.raises(GSSError) as required:
                read_peer_label(left, require=True)
            assert required.value.major == GSS_S_UNAUTHORIZED
            assert required.value.minor == Minor.PEER_LABEL_REQUIRED
        else:
            assert label == identity.label == raw.rstrip(b"\0")


# --- labels this kernel cannot produce: injected getsockopt ---------------------------


class FakePeerSec:
    """A getsockopt that answers SO_PEERSEC like an LSM would, recording requested sizes."""

    def __init__(self, label: bytes, *, report_size: bool = True) -> None:
        self.label = label
        self.report_size = report_size
        self.sizes: list[int] = []

    def __call__(self, sock: socket.socket, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.SOL_SOCKET, SO_PEERSEC)
        self.sizes.append(size)
        if len(self.label) > size:
            if self.report_size:
                raise OptionTooLong(len(self.label))
            raise OSError(errno.ERANGE, "Numerical result out of range")
        return self.label


def failing(err: int) -> Callable[[socket.socket, int, int, int], bytes]:
    """A getsockopt that fails with ``err``."""

    def get(sock: socket.socket, level: int, option: int, size: int) -> bytes:
        raise OSError(err, os.strerror(err))

    return get


@pytest.fixture
def pair() -> Iterator[socket.socket]:
    """One end of a connected socketpair (the injected getsockopt ignores it)."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        yield left


LABEL = b"system_u:system_r:handoffd_t:s0"


@pytest.mark.injected
@pytest.mark.parametrize("raw", [LABEL, LABEL + b"\0"], ids=["bare", "nul"])
def test_label_with_or_without_nul_reads_the_same(pair: socket.socket, raw: bytes) -> None:
    """Injected: the man page allows both forms; they normalise to one label."""
    fake = FakePeerSec(raw)
    assert read_peer_label(pair, getsockopt=fake) == LABEL
    assert fake.sizes == [NAME_MAX]


@pytest.mark.injected
def test_long_label_is_retried_with_the_size_the_kernel_returned(pair: socket.socket) -> None:
    """Injected: ERANGE with optlen 700 -> one retry with exactly 700 bytes."""
    long_label = b"u:r:" + b"x" * 694 + b"\0"
    fake = FakePeerSec(long_label)
    assert read_peer_label(pair, getsockopt=fake, require=True) == long_label[:-1]
    assert fake.sizes == [NAME_MAX, len(long_label)]


@pytest.mark.injected
def test_erange_without_a_size_grows_the_buffer(pair: socket.socket) -> None:
    """Injected: an ERANGE that gives no size doubles the buffer until the label fits."""
    fake = FakePeerSec(b"y" * 600, report_size=False)
    assert read_peer_label(pair, getsockopt=fake) == b"y" * 600
    assert fake.sizes == [NAME_MAX, 2 * NAME_MAX, 4 * NAME_MAX]


@pytest.mark.injected
@pytest.mark.parametrize(
    "getsockopt",
    [
        failing(errno.EINVAL),
        failing(errno.EBADF),
        FakePeerSec(b"z" * 70000),  # ERANGE asking for more than any real label
        FakePeerSec(b"u:r:a\0b:s0"),  # NUL inside: not a context string
    ],
    ids=["EINVAL", "EBADF", "implausible-size", "inner-nul"],
)
def test_unreadable_label_is_refused_not_treated_as_unlabelled(
    pair: socket.socket, getsockopt: Callable[[socket.socket, int, int, int], bytes]
) -> None:
    """Injected: any failure other than ENOPROTOOPT fails closed."""
    with pytest.raises(GSSError) as unreadable:
        read_peer_label(pair, getsockopt=getsockopt)
    assert unreadable.value.minor == Minor.PEER_LABEL_UNREADABLE


@pytest.mark.injected
def test_injected_enoprotoopt_and_empty_label_are_no_label(pair: socket.socket) -> None:
    """Injected: ENOPROTOOPT and an empty (or NUL-only) answer both mean "no label"."""
    assert read_peer_label(pair, getsockopt=failing(errno.ENOPROTOOPT)) is None
    assert read_peer_label(pair, getsockopt=FakePeerSec(b"\0")) is None
    with pytest.raises(GSSError) as required:
        read_peer_label(pair, getsockopt=FakePeerSec(b""), require=True)
    assert required.value.minor == Minor.PEER_LABEL_REQUIRED


@pytest.mark.injected
def test_identity_combines_real_credentials_with_the_injected_label(pair: socket.socket) -> None:
    """Injected label only: pid/uid/gid still come from the real SO_PEERCRED."""
    identity = read_peer_identity(pair, getsockopt=FakePeerSec(LABEL + b"\0"))
    assert identity == PeerIdentity(os.getpid(), os.getuid(), os.getgid(), LABEL)


# --- policy ----------------------------------------------------------------------------

ME = PeerIdentity(pid=4242, uid=1000, gid=100, label=LABEL)


@pytest.mark.parametrize(
    ("policy", "identity", "minor", "named"),
    [
        (PeerPolicy(uids=frozenset({0})), ME, Minor.PEER_UID_NOT_ALLOWED, "1000"),
        (PeerPolicy(gids=frozenset({0, 5})), ME, Minor.PEER_GID_NOT_ALLOWED, "100"),
        (PeerPolicy(labels=frozenset({b"u:r:other_t"})), ME, Minor.PEER_LABEL_NOT_ALLOWED,
         "handoffd_t"),
        (PeerPolicy(require_label=True), PeerIdentity(1, 1, 1, None),
         Minor.PEER_LABEL_REQUIRED, "pid 1"),
        (PeerPolicy(labels=frozenset({LABEL})), PeerIdentity(1, 1, 1, None),
         Minor.PEER_LABEL_REQUIRED, "pid 1"),
        (PeerPolicy(pid=4243), ME, Minor.PEER_PID_MISMATCH, "4242"),
    ],
    ids=["uid", "gid", "label", "require-label", "labels-need-a-label", "pid"],
)
def test_policy_refuses_each_field(
    policy: PeerPolicy, identity: PeerIdentity, minor: Minor, named: str
) -> None:
    """Each field refuses on its own, with its own minor and the offending value named."""
    with pytest.raises(GSSError) as refused:
        policy.check(identity)
    assert refused.value.major == GSS_S_UNAUTHORIZED
    assert refused.value.minor == minor
    assert named in (refused.value.detail or "")


@pytest.mark.parametrize(
    "policy",
    [
        PeerPolicy(),
        PeerPolicy(uids=frozenset({1000, 0}), gids=frozenset({100}), pid=4242),
        PeerPolicy(labels=frozenset({LABEL}), require_label=True),
        PeerPolicy(labels=frozenset({LABEL + b"\0"})),
    ],
    ids=["open", "uid-gid-pid", "label", "label-with-nul"],
)
def test_policy_accepts_a_matching_peer(policy: PeerPolicy) -> None:
    """Matching fields pass (a NUL-terminated allow-list entry matches the bare label)."""
    policy.check(ME)
    policy.check(PeerIdentity(ME.pid, ME.uid, ME.gid, LABEL + b"\0"))


def test_policy_against_a_real_peer(tmp_path: Path) -> None:
    """The identity read from a real child passes a policy built from it and fails
    one that expects another pid."""
    with accepted_from_child(tmp_path) as (conn, pid):
        identity = read_peer_identity(conn)
    PeerPolicy(uids=frozenset({os.getuid()}), gids=frozenset({os.getgid()}), pid=pid).check(
        identity
    )
    with pytest.raises(GSSError) as refused:
        PeerPolicy(pid=os.getpid()).check(identity)
    assert refused.value.minor == Minor.PEER_PID_MISMATCH
