"""Process privileges: who may switch uids, and making a key holder undumpable.

Thin wrappers over prctl(2), setrlimit(2) and /proc/self/status, one job each:

* :func:`can_switch_users`: root, or CAP_SETUID + CAP_SETGID + CAP_KILL in the
  effective set (a unit with ``User=root`` and a bounded capability set): what the
  supervisor needs to run the acceptor and the workers under their own uids.
* :func:`make_undumpable`: ``PR_SET_DUMPABLE`` 0 and ``RLIMIT_CORE`` 0, so the key
  holder writes no core file and other processes of its uid cannot read
  ``/proc/PID/mem``, ``environ`` or ``ptrace`` it (the kernel then treats the process as
  owned by root for those checks).
* :func:`effective_capabilities`: the CapEff mask, to check the acceptor has none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from typing import Final

__all__ = [
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "can_switch_users",
    "die_with_parent",
    "effective_capabilities",
    "make_undumpable",
]

CAP_KILL: Final = 5
CAP_SETGID: Final = 6
CAP_SETUID: Final = 7
_PR_SET_PDEATHSIG: Final = 1
_PR_SET_DUMPABLE: Final = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def effective_capabilities(pid: int | str = "self") -> int:
    """The effective capability mask of ``pid`` (``CapEff`` in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0  # pragma: no cover - every Linux since 2.6 has the line


def can_switch_users() -> bool:
    """True when this process can run children under other uids and signal them."""
    if os.geteuid() == 0:
        return True
    needed = (1 << CAP_SETUID) | (1 << CAP_SETGID) | (1 << CAP_KILL)
    return effective_capabilities() & needed == needed


def make_undumpable() -> None:
    """No core file, no same-uid ptrace or /proc/PID/mem: for the process holding keys."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:  # pragma: no cover - never fails
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))



def die_with_parent(signum: int, parent: int) -> bool:
    """Get ``signum`` when the parent ``parent`` dies; False if it is already gone."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:  # pragma: no cover
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return os.getppid() == parent
