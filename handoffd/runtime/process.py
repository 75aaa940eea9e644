"""Child processes spawned from the trio thread itself, awaited through a pidfd.

Why not ``trio.lowlevel.open_process``: it runs ``subprocess.Popen`` in a
worker thread, and on Linux the session and process keyrings belong to each
*thread*.  A thread that existed before the acceptor joined its fresh session
keyring would spawn workers that cannot see their key grant (see
docs/KEYRING.md).  ``Popen`` is fork+exec in C with no Python code in the
child, so calling it here, in the trio thread, is safe and takes a few ms.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Self

import trio


class ChildProcess:
    """A spawned process: ``pid``, ``returncode``, ``await wait()``, signals."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)
        self.returncode: int | None = None

    @classmethod
    def spawn(cls, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              pass_fds: Sequence[int] = (), cwd: str | None = None,
              credentials: tuple[int, int] | None = None,
              new_session: bool = False) -> Self:
        """Start ``argv`` from the calling thread (keyrings are per thread).

        ``credentials`` ``(uid, gid)``: the child drops to them (and to no
        supplementary groups) between fork and exec; needs root.  ``new_session``:
        the child leads a session and process group of its own (``setsid``).
        """
        if credentials is None:
            return cls(subprocess.Popen(list(argv), env=env, pass_fds=tuple(pass_fds),
                                        cwd=cwd, start_new_session=new_session))
        uid, gid = credentials
        return cls(subprocess.Popen(list(argv), env=env, pass_fds=tuple(pass_fds), cwd=cwd,
                                    user=uid, group=gid, extra_groups=[],
                                    start_new_session=new_session))

    async def wait(self) -> int:
        """Wait for the exit without blocking trio; returns the exit status."""
        while self.returncode is None:
            if self._popen.poll() is not None:
                self.returncode = self._popen.returncode
                break
            await trio.lowlevel.wait_readable(self._pidfd)
        self._close_pidfd()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal the child through its pidfd: never a recycled pid."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
