"""handoffd's peer verification against real SELinux labels (guest only).

``read_peer_label`` / ``read_peer_identity`` must return what the kernel really reports
for the connecting process, normalised (no trailing NUL), and ``PeerPolicy`` must refuse
a root process in the wrong domain that SELinux itself lets through.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lsm_support import (
    ACCEPTOR,
    EXTERNAL_WORKER,
    IMPOSTOR,
    LONG,
    connect_and_wait,
    fork_as,
    observe,
    raw_peer_label,
    seqpacket_listener,
    wait_ok,
)

from handoffd.kernel.peer import PeerPolicy, read_peer_identity, read_peer_label
from handoffd.minor import Minor
from handoffd.status import GSS_S_UNAUTHORIZED, GSSError


@contextmanager
def accepted_from(directory: Path, label: bytes) -> Iterator[tuple[socket.socket, int]]:
    """A seqpacket connection accepted from a child running in ``label``, and its pid."""
    listener, path = seqpacket_listener(directory)
    part: Callable[[], None] = connect_and_wait(path)
    pid = fork_as(label, part)
    try:
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(1) == b"!"
            yield conn, pid
    finally:
        listener.close()
        wait_ok(pid)


def test_read_peer_label_is_the_kernel_label_without_nul(tmp_path: Path) -> None:
    """The normalised label equals the raw SO_PEERSEC value with its NUL stripped."""
    with accepted_from(tmp_path, ACCEPTOR) as (conn, _):
        raw = raw_peer_label(conn)
        label = read_peer_label(conn)
        required = read_peer_label(conn, require=True)
    observe("read_peer_label-raw", raw)
    assert raw.endswith(b"\0")  # what SELinux returns; the man page allows both forms
    assert label == required == raw.rstrip(b"\0") == ACCEPTOR


def test_read_peer_identity_names_the_connecting_process(tmp_path: Path) -> None:
    """pid, uid, gid and label all describe the child that connected."""
    with accepted_from(tmp_path, EXTERNAL_WORKER) as (conn, pid):
        identity = read_peer_identity(conn)
    assert (identity.pid, identity.uid, identity.gid) == (pid, 0, 0)
    assert identity.label == EXTERNAL_WORKER


@pytest.mark.parametrize("allowed", [ACCEPTOR, ACCEPTOR + b"\0"], ids=["bare", "nul"])
def test_label_policy_accepts_the_acceptor(tmp_path: Path, allowed: bytes) -> None:
    """A label allow-list matches with or without the trailing NUL."""
    policy = PeerPolicy(labels=frozenset({allowed}))
    with accepted_from(tmp_path, ACCEPTOR) as (conn, _):
        policy.check(read_peer_identity(conn))


def test_label_policy_refuses_a_root_impostor(tmp_path: Path) -> None:
    """Same uid (root), SELinux lets it connect, handoffd's label check refuses it."""
    policy = PeerPolicy(labels=frozenset({ACCEPTOR}), require_label=True)
    with accepted_from(tmp_path, IMPOSTOR) as (conn, _):
        identity = read_peer_identity(conn)
    assert identity.uid == 0
    assert identity.label == IMPOSTOR
    with pytest.raises(GSSError) as refused:
        policy.check(identity)
    assert refused.value.major == GSS_S_UNAUTHORIZED
    assert refused.value.minor == Minor.PEER_LABEL_NOT_ALLOWED
    assert b"\0" not in (refused.value.detail or "").encode()


def test_long_label_is_read_through_the_erange_retry(tmp_path: Path) -> None:
    """A context longer than NAME_MAX comes back whole (ERANGE, then a bigger buffer)."""
    with accepted_from(tmp_path, LONG) as (conn, _):
        with pytest.raises(OSError):
            raw_peer_label(conn, 256)  # the first attempt's size fails here
        label = read_peer_label(conn, require=True)
        identity = read_peer_identity(conn)
    assert label == LONG
    assert identity.label == LONG
    PeerPolicy(labels=frozenset({LONG})).check(identity)
