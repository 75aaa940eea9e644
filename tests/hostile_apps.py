"""A hostile worker application for ``tests/test_privsep_hostile.py``.

Nothing of this is in the product.  ``tests.hostile_apps:hostile`` is the application
code of a compromised worker: it runs inside a real worker process, under the worker's
uid, and attacks what privilege separation must keep out of its reach (the server key
file, the acceptor's and the supervisor's memory, fds and ptrace, another worker's
memory and key slots).  Every attack is a raw system call; its outcome is reported as
the errno's name (``"EACCES"``) or what it obtained, so the test asserts on what the
kernel actually did.

Protocol over the client stream: the app first sends a JSON line about itself (pid,
uids, the acceptor pid its environment names and the channel's ``SO_PEERCRED``, its
parent, its keyring and slot serials); then it answers each JSON line command with one
JSON line (see :func:`_run`).

Importing this module also arms, from the environment (the way a malicious dependency
runs at import time, before any handoff):

``HANDOFFD_TEST_WITHHOLD_DIR``
    a directory every worker uid may write: the first worker to receive a handoff
    (``O_EXCL`` on ``withheld``) forks a detached grandchild (fork, setsid, fork) that
    keeps every fd, the client's connection among them, writes its pid to
    ``grandchild.pid`` and sleeps; the worker itself never sends the ACK.  Replacement
    workers run normally.

and the ``trap`` command makes this worker stop itself (SIGSTOP) on its next handoff,
after the acceptor armed the key slot and before the worker claims it: a test can then
show that a sibling cannot read the armed slot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from handoffd.core.handoff import Ack
from handoffd.kernel.parking import WorkerParking
from handoffd.runtime import worker
from handoffd.runtime.stream import SecureStream

WITHHOLD_DIR = os.environ.get("HANDOFFD_TEST_WITHHOLD_DIR", "")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

# x86_64 / aarch64 share none of these numbers; the tests run on x86_64.
SYS_KEYCTL = 250
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206

KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_UPDATE = 2
KEYCTL_REVOKE = 3
KEYCTL_SETPERM = 5
KEYCTL_DESCRIBE = 6
KEYCTL_LINK = 8
KEYCTL_READ = 11
KEY_SPEC_PROCESS_KEYRING = -2

_trap_next_claim = False


def _errno_name(number: int) -> str:
    return errno.errorcode.get(number, str(number))


def _keyctl(command: int, *args: int | bytes | None) -> tuple[int, str | None]:
    """``(result, None)`` or ``(-1, errno name)``."""
    converted: list[Any] = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    converted += [ctypes.c_long(0)] * (4 - len(converted))
    ctypes.set_errno(0)
    result = _libc.syscall(ctypes.c_long(SYS_KEYCTL), ctypes.c_long(command), *converted)
    if result < 0:
        return -1, _errno_name(ctypes.get_errno())
    return result, None


def _keyctl_read(serial: int, size: int = 4096) -> tuple[bytes | None, str | None]:
    buffer = ctypes.create_string_buffer(size)
    result, error = _keyctl(KEYCTL_READ, serial, ctypes.addressof(buffer), size)
    if error is not None:
        return None, error
    return buffer.raw[:min(result, size)], None


def _keyctl_describe(serial: int) -> tuple[str | None, str | None]:
    buffer = ctypes.create_string_buffer(512)
    result, error = _keyctl(KEYCTL_DESCRIBE, serial, ctypes.addressof(buffer), 512)
    if error is not None:
        return None, error
    return buffer.raw[:max(result - 1, 0)].decode(errors="replace"), None


def _own_keyring() -> dict[str, Any]:
    """This worker's parking keyring (from its grant) and the slot serials it holds."""
    ring = int(os.environ.get("HANDOFFD_PARKING_KEYRING", "0"))
    info: dict[str, Any] = {"keyring": ring, "slots": [], "own_describe": None,
                            "worker_id": os.environ.get("HANDOFFD_PARKING_WORKER", "")}
    if ring:
        members, error = _keyctl_read(ring)
        if members is not None:
            info["slots"] = list(struct.unpack(f"={len(members) // 4}i", members))
        info["own_describe"] = error or _keyctl_describe(ring)[0]
        if info["slots"]:
            description, error = _keyctl_describe(info["slots"][0])
            info["own_slot_describe"] = error or description
    return info


def _proc_keys() -> list[int]:
    """Serials of the keys ``/proc/keys`` shows this process (those it may view)."""
    with open("/proc/keys") as keys:
        return [int(line.split()[0], 16) for line in keys if line.strip()]


def _channel_peer() -> int | None:
    fd = os.environ.get(worker.ENV_CHANNEL_FD)
    if fd is None:
        return None
    sock = socket.socket(fileno=os.dup(int(fd)))
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    finally:
        sock.close()
    return int(struct.unpack("3i", creds)[0])


def _hello() -> dict[str, Any]:
    acceptor = os.environ.get(worker.ENV_ACCEPTOR_PID)
    return {"pid": os.getpid(), "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "ppid": os.getppid(), "acceptor_pid_env": int(acceptor) if acceptor else None,
            "channel_peer_pid": _channel_peer(), **_own_keyring()}


# --- attacks ---------------------------------------------------------------------------------


def _open_paths(paths: list[str]) -> dict[str, str]:
    """Open each path (a directory is listed): "readable" or the errno name."""
    found = {}
    for path in paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.listdir(path)
            else:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.read(fd, 1)  # /proc/PID/mem at offset 0 is unmapped: EIO is fine
                except OSError:
                    pass
                finally:
                    os.close(fd)
            found[path] = "readable"
        except OSError as error:
            found[path] = _errno_name(error.errno or 0)
    return found


def _ptrace(pids: list[int]) -> dict[str, str]:
    found = {}
    for pid in pids:
        ctypes.set_errno(0)
        if _libc.ptrace(PTRACE_SEIZE, pid, None, None) == 0:
            _libc.ptrace(PTRACE_DETACH, pid, None, None)
            found[str(pid)] = "attached"
        else:
            found[str(pid)] = _errno_name(ctypes.get_errno())
    return found


def _pidfd_getfd(targets: list[list[int]]) -> dict[str, str]:
    """``pidfd_open`` then ``pidfd_getfd`` each ``[pid, fd]``: "copied" or the errno name."""
    found = {}
    for pid, target in targets:
        ctypes.set_errno(0)
        pidfd = _libc.syscall(ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_long(pid), ctypes.c_long(0))
        if pidfd < 0:
            found[f"{pid}:{target}"] = "pidfd_open " + _errno_name(ctypes.get_errno())
            continue
        try:
            ctypes.set_errno(0)
            copied = _libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_long(pidfd),
                                   ctypes.c_long(target), ctypes.c_long(0))
            if copied >= 0:
                os.close(copied)
                found[f"{pid}:{target}"] = "copied"
            else:
                found[f"{pid}:{target}"] = _errno_name(ctypes.get_errno())
        finally:
            os.close(pidfd)
    return found


def _attack_keys(serials: list[int], worker_id: str) -> dict[str, Any]:
    """Every way at another worker's keys this process has: read, describe, link into our
    own process keyring, update, setperm, revoke; then join a session keyring by the
    other worker's keyring name.  Each: the errno name, or what it got."""
    per_key: dict[str, dict[str, str]] = {}
    junk = b"\x00" * 41
    for serial in serials:
        outcome: dict[str, str] = {}
        data, error = _keyctl_read(serial)
        outcome["read"] = error or f"read {len(data or b'')} bytes"
        description, error = _keyctl_describe(serial)
        outcome["describe"] = error or f"described {description}"
        _, error = _keyctl(KEYCTL_LINK, serial, KEY_SPEC_PROCESS_KEYRING)
        outcome["link"] = error or "linked"
        _, error = _keyctl(KEYCTL_UPDATE, serial, junk, len(junk))
        outcome["update"] = error or "updated"
        _, error = _keyctl(KEYCTL_SETPERM, serial, 0x3F3F3F3F)
        outcome["setperm"] = error or "set"
        _, error = _keyctl(KEYCTL_REVOKE, serial)
        outcome["revoke"] = error or "revoked"
        per_key[str(serial)] = outcome
    name = f"hd:{worker_id}:{os.environ['HANDOFFD_ACCEPTOR_PID']}"  # parking's keyring name
    joined, error = _keyctl(KEYCTL_JOIN_SESSION_KEYRING, name.encode())
    return {"keys": per_key, "joined_by_name": error or joined, "visible": _proc_keys()}


def _run(command: dict[str, Any]) -> dict[str, Any]:
    op = command["op"]
    if op == "hello":
        return _hello()
    if op == "open":
        return {"access": _open_paths(command["paths"])}
    if op == "key_file":
        return {"access": _open_paths([os.environ["HANDOFFD_TEST_KEY"]])}
    if op == "ptrace":
        return {"ptrace": _ptrace(command["pids"])}
    if op == "pidfd_getfd":
        return {"pidfd_getfd": _pidfd_getfd(command["targets"])}
    if op == "keys":
        return _attack_keys(command["serials"], command["worker_id"])
    if op == "trap":
        global _trap_next_claim
        _trap_next_claim = True
        return {"trap": True}
    return {"error": f"unknown op {op!r}"}


async def hostile(stream: SecureStream) -> None:
    """Say who we are, then run each JSON line command and answer with a JSON line."""
    await stream.send_all(json.dumps(_hello()).encode() + b"\n")
    buffer = b""
    async for data in stream:
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            await stream.send_all(json.dumps(_run(json.loads(line))).encode() + b"\n")


# --- hooks armed at import --------------------------------------------------------------------


def _detach_grandchild(pid_file: str) -> None:
    """fork, setsid, fork: a grandchild in a session of its own, holding every fd."""
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    try:  # the child: trio is not to be touched here, only plain system calls
        os.setsid()
        if os.fork():
            os._exit(0)
        fd = os.open(pid_file + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.rename(pid_file + ".tmp", pid_file)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        os._exit(0)


def _install() -> None:
    original_ack: Callable[..., Awaitable[None]] = worker.HandoffReceiver._ack
    original_claim = WorkerParking.claim

    async def ack(self: worker.HandoffReceiver, message: Ack) -> None:
        if message.major == 0 and WITHHOLD_DIR:
            try:
                fd = os.open(os.path.join(WITHHOLD_DIR, "withheld"),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                _detach_grandchild(os.path.join(WITHHOLD_DIR, "grandchild.pid"))
                await trio.sleep_forever()  # the ACK is never sent
        await original_ack(self, message)

    def claim(self: WorkerParking, key_ref: bytes) -> bytes:
        global _trap_next_claim
        if _trap_next_claim:
            _trap_next_claim = False
            os.kill(os.getpid(), signal.SIGSTOP)
        return original_claim(self, key_ref)

    worker.HandoffReceiver._ack = ack  # type: ignore[method-assign]
    WorkerParking.claim = claim  # type: ignore[method-assign]


_install()
