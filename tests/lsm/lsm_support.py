"""Helpers for the guest-only LSM tests: domains, forked parties and raw SO_PEERSEC.

The policy (lsm/policy.cil) lets every test domain switch to any other with
``process dyntransition``; a forked child switches by writing its context to
``/proc/self/attr/current`` (a child is single-threaded, which SELinux requires for an
unbounded dyntransition) and then plays its part.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path

from handoffd.kernel.attrs import SO_PASSCRED

RUNNER = b"u:r:handoffd_runner_t"
SUPERVISOR = b"u:r:handoffd_supervisor_t"
ACCEPTOR = b"u:r:handoffd_acceptor_t"
WORKER = b"u:r:handoffd_worker_t"
IMPOSTOR = b"u:r:handoffd_impostor_t"
EXTERNAL_WORKER = b"u:r:handoffd_extworker_t"
OUTSIDER = b"u:r:handoffd_outsider_t"
LONG = b"u:r:handoffd_long_label_domain" + b"_padding" * 32 + b"_t"

SO_PEERSEC = getattr(socket, "SO_PEERSEC", 31)
SO_PASSSEC = getattr(socket, "SO_PASSSEC", 34)
NAME_MAX = 255

_observed: list[tuple[str, bytes]] = []


def observe(who: str, raw: bytes) -> None:
    """Remember a label exactly as the kernel returned it, for the run's summary."""
    if (who, raw) not in _observed:
        _observed.append((who, raw))


def observed_labels() -> list[tuple[str, bytes]]:
    """Labels recorded with :func:`observe`, in order."""
    return list(_observed)


def current_label() -> bytes:
    """This process's context as /proc/self/attr/current reports it (NUL stripped)."""
    return Path("/proc/self/attr/current").read_bytes().rstrip(b"\0")


def switch_label(label: bytes) -> None:
    """Move this (single-threaded) process into another domain."""
    with open("/proc/self/attr/current", "wb", buffering=0) as attr:
        attr.write(label)


def raw_peer_label(sock: socket.socket, size: int = NAME_MAX + 1) -> bytes:
    """The peer's label exactly as getsockopt(SO_PEERSEC) returns it (NUL included)."""
    return sock.getsockopt(socket.SOL_SOCKET, SO_PEERSEC, size)


def fork_as(label: bytes, part: Callable[[], None]) -> int:
    """Fork a child that enters ``label`` and runs ``part``; exit 0 means it succeeded."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            switch_label(label)
            part()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return pid


def wait_ok(pid: int) -> None:
    """Wait for a child from :func:`fork_as` and fail the test if its part failed."""
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child {pid} failed (see its traceback)"


def seqpacket_listener(directory: Path, name: str = "channel") -> tuple[socket.socket, str]:
    """A listening AF_UNIX SOCK_SEQPACKET socket in ``directory`` and its path."""
    path = str(directory / name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Accepted sockets inherit these; set only after accept(), a message the peer sends
    # in between would arrive with no credentials (pid 0) and no label.
    listener.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
    listener.setsockopt(socket.SOL_SOCKET, SO_PASSSEC, 1)
    listener.bind(path)
    listener.listen(8)
    return listener, path


def connect_and_wait(path: str, kind: int = socket.SOCK_SEQPACKET) -> Callable[[], None]:
    """A child's part: connect to ``path``, send one byte, wait until the server hangs up."""

    def part() -> None:
        with socket.socket(socket.AF_UNIX, kind) as sock:
            sock.connect(path)
            sock.sendall(b"!")
            sock.recv(1)

    return part
