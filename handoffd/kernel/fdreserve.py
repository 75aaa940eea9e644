"""Staying alive at the fd limit: a reserve of fds, and RLIMIT_NOFILE sized to the config.

When ``accept()`` fails with ``EMFILE`` (or ``ENFILE``) the pending connection stays in
the listen backlog and the listening socket stays readable: a trio accept loop that
retries wakes at once, fails again, and spins; waiting instead leaves the connection
(and everyone behind it) hanging.  :class:`FdReserve` holds a few fds open on
``/dev/null`` for that moment: :meth:`FdReserve.shed` closes them, accepts one pending
connection and closes it at once (its client sees EOF, or ECONNRESET if it had sent
bytes), then takes the reserve back.  The daemon thus keeps its listener drained while it
has no fd to spare, without a busy loop.

:func:`nofile_needed` is what the daemon may hold at its configured limits and
:func:`raise_nofile` lifts the soft ``RLIMIT_NOFILE`` to it (never above the hard limit,
which only a privileged process may raise).
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handoffd.config import Config

SHED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
"""accept() errors :meth:`FdReserve.shed` is for: out of fds, in the process or the system."""
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept() errors that mean "out of resources" (fds, memory): an accept loop logs, sheds
or waits, and goes on; any other error is raised."""

NOFILE_MARGIN = 32
"""Fds :func:`nofile_needed` adds for what does not scale with the config: stdio, the
trio event loop (epoll, its wake-up socketpair), the supervisor link, key parking, the
log, /dev/urandom, :class:`FdReserve` reserves, the systemd notify socket, and slack."""


class FdReserve:
    """``count`` fds held open on ``/dev/null`` (``O_RDONLY|O_CLOEXEC``) to spend when
    the process is out of fds.  Not thread-safe; :meth:`close` gives them back."""

    def __init__(self, count: int = 1) -> None:
        if count < 1:
            raise ValueError("an FdReserve holds at least one fd")
        self.count = count
        self._fds: list[int] = []
        self._refill()

    @property
    def held(self) -> int:
        """Fds currently held (fewer than ``count`` only if the process is at its limit
        and a refill failed; the next :meth:`shed` tries again)."""
        return len(self._fds)

    def shed(self, sock: socket.socket) -> bool:
        """Drop one pending connection of the listening ``sock`` after an ``accept()``
        failed with EMFILE/ENFILE: release the reserve, accept, close the connection at
        once, retake the reserve.  True if a connection was shed; False if none was
        pending or the accept failed anyway (its errors are never raised)."""
        if sock.getblocking() and not _readable(sock):
            return False  # a blocking accept() would wait here
        self._release()
        try:
            conn, _ = sock.accept()
        except OSError:  # EAGAIN (nothing pending), ECONNABORTED, still EMFILE, ...
            return False
        else:
            conn.close()
            return True
        finally:
            self._refill()

    def close(self) -> None:
        """Give the reserve back (idempotent)."""
        self._release()
        self.count = 0

    def _release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def _refill(self) -> None:
        while len(self._fds) < self.count:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def __enter__(self) -> FdReserve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()  # poll(2) needs no fd of its own (epoll would)
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def nofile_needed(config: Config) -> int:
    """The fds the acceptor may hold at once at the limits ``config`` sets."""
    server, workers, control = config.server, config.workers, config.control
    listeners = (
        len(server.listen)                         # client listening sockets
        + (control.socket is not None)             # control socket
        + (control.metrics is not None)            # metrics listener
        + (workers.register_socket is not None)    # external workers' registrations
    )
    return (
        server.max_handshakes                          # a socket per handshake in progress
        + workers.count * (workers.max_unacked + 2)    # per worker: the connections it has
                                                       # not acknowledged (kept until it
                                                       # does), its channel and its pidfd
        + 2 * control.max_connections                  # control and metrics connections
        + listeners
        + NOFILE_MARGIN
    )


def raise_nofile(needed: int) -> str | None:
    """Raise the soft ``RLIMIT_NOFILE`` to ``needed`` if it is lower (to the hard limit
    if that is lower still; an unprivileged process can go no further).  Never lowers it.
    Returns a warning text if the limit stays below ``needed``, else None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as error:
            return (f"RLIMIT_NOFILE is {soft} and could not be raised to {target} "
                    f"({getattr(error, 'strerror', None) or error}); the configured limits "
                    f"need {needed}: lower [server] max_handshakes or [workers] count")
    if target < needed:
        return (f"RLIMIT_NOFILE hard limit is {hard}, below the {needed} fds the configured "
                f"limits need (soft limit now {target}): raise it (LimitNOFILE= in the unit, "
                "ulimit -Hn) or lower [server] max_handshakes, [workers] count or "
                "max_unacked")
    return None
