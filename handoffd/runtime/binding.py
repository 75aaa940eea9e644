"""Every socket the daemon listens on, bound before any process is started.

The supervisor (root) binds the client listeners (or takes systemd's), the control
socket, the metrics port and the registration socket, then passes them to the
acceptor, which has no privilege to bind a low port or to create files in a root
directory.  Binding first also means a port in use is one line at start-up, not a
half-started daemon.

Unix socket files are created without following symlinks: a stale file or a planted
symlink is unlinked (``unlink`` removes the link itself), ``bind`` never follows one
(an existing path is EADDRINUSE), the mode comes from the umask at bind time, and the
group is set with ``lchown``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from handoffd import environment
from handoffd.config import Config, parse_address
from handoffd.kernel.systemd import listen_fds
from handoffd.minor import Minor
from handoffd.status import GSS_S_FAILURE, GSSError

ENV_BOUND = environment.BOUND
"""``role=fd,...`` (roles ``listen``, ``tls``, ``control``, ``metrics``, ``register``), set
by the supervisor for the acceptor."""

TLS_FD_NAME_SUFFIX = "tls"
"""A socket systemd passes with a ``FileDescriptorName=`` ending in this is a ``[tls]``
listener (``handoffd-tls``); every other passed socket serves Noise/krb5."""


_BIND_HINTS = {
    errno.EADDRINUSE: "another process listens there (ss -ltnp / ss -lxp shows which)",
    errno.EADDRNOTAVAIL: "no interface of this host has that address",
    errno.EACCES: "no permission (a port below 1024 needs root or CAP_NET_BIND_SERVICE; a "
                  "socket directory must be writable by the user serve starts as)",
    errno.ENOENT: "the directory does not exist (create it, or RuntimeDirectory= in the unit)",
    errno.EROFS: "the file system is read-only (under ProtectSystem=strict: use /run/handoffd)",
}


def _bind_error(what: str, error: OSError) -> GSSError:
    hint = _BIND_HINTS.get(error.errno or 0)
    why = os.strerror(error.errno) if error.errno else str(error)  # "AF_UNIX path too long"
    return GSSError(GSS_S_FAILURE, Minor.BIND_FAILED,
                    f"{what}: {why}" + (f": {hint}" if hint else ""))


def show_address(host: str, port: int) -> str:
    """``host:port``, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class BoundSockets:
    """The daemon's listening sockets; ``paths`` are Unix socket files to remove at exit."""

    listeners: list[socket.socket] = field(default_factory=list)
    tls_listeners: list[socket.socket] = field(default_factory=list)
    control: socket.socket | None = None
    metrics: socket.socket | None = None
    register: socket.socket | None = None
    paths: list[Path] = field(default_factory=list)
    activated: bool = False

    def roles(self) -> list[tuple[str, socket.socket]]:
        found = [("listen", s) for s in self.listeners]
        found += [("tls", s) for s in self.tls_listeners]
        for role, sock in (("control", self.control), ("metrics", self.metrics),
                           ("register", self.register)):
            if sock is not None:
                found.append((role, sock))
        return found

    def fds(self) -> tuple[int, ...]:
        return tuple(sock.fileno() for _, sock in self.roles())

    def environ_value(self) -> str:
        return ",".join(f"{role}={sock.fileno()}" for role, sock in self.roles())

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> BoundSockets | None:
        """The sockets the supervisor passed, or None when it passed none."""
        value = environ.get(ENV_BOUND)
        if value is None:
            return None
        bound = cls()
        for item in filter(None, value.split(",")):
            role, _, number = item.partition("=")
            sock = socket.socket(fileno=int(number))
            sock.set_inheritable(False)
            if role == "listen":
                bound.listeners.append(sock)
            elif role == "tls":
                bound.tls_listeners.append(sock)
            elif role in ("control", "metrics", "register"):
                setattr(bound, role, sock)
            else:
                raise GSSError(GSS_S_FAILURE, Minor.SUPERVISOR_LINK, f"unknown role {role!r}")
        return bound

    def close(self, *, unlink: bool = False) -> None:
        for _, sock in self.roles():
            sock.close()
        if unlink:
            for path in self.paths:
                with contextlib.suppress(OSError):
                    path.unlink()


def bind_tcp(address: str, backlog: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``[v6]:port`` is IPv6-only)."""
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise _bind_error(show_address(host, port), error) from None
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _creating_as_group(group: int | None) -> Iterator[bool]:
    """Files created inside get ``group``: by the effective gid where this process may
    switch it (the supervisor: CAP_SETGID, but no CAP_CHOWN under the shipped unit);
    otherwise yields True and the caller chowns afterwards."""
    if group is None or os.getegid() == group:
        yield False
        return
    try:
        os.setegid(group)
    except PermissionError:
        yield True
        return
    try:
        yield False
    finally:
        os.setegid(os.getgid())


def bind_unix(path: Path, kind: int, *, mode: int, group: int | None = None) -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode`` (and ``group``), symlink-safe."""
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o777 & ~mode)
        try:
            with _creating_as_group(group) as needs_chown:
                sock.bind(str(path))
        finally:
            os.umask(old)
        if group is not None and needs_chown:
            os.chown(path, -1, group, follow_symlinks=False)
        sock.listen(64)
    except OSError as error:
        sock.close()
        raise _bind_error(str(path), error) from None
    sock.setblocking(False)
    return sock


def bind_all(config: Config, *, register_group: int | None = None) -> BoundSockets:
    """Bind everything ``config`` listens on; on any failure close what was bound."""
    bound = BoundSockets()
    try:
        activated = listen_fds()
        if activated:
            bound.activated = True
            for entry in activated:
                sock = socket.socket(fileno=entry.fd)
                sock.setblocking(False)
                if entry.name.endswith(TLS_FD_NAME_SUFFIX):
                    bound.tls_listeners.append(sock)
                else:
                    bound.listeners.append(sock)
        else:
            for address in config.server.listen:
                bound.listeners.append(bind_tcp(address, config.server.backlog))
            for address in config.tls.listen:
                bound.tls_listeners.append(bind_tcp(address, config.server.backlog))
        if config.control.socket is not None:
            bound.control = bind_unix(config.control.socket, socket.SOCK_STREAM, mode=0o600)
            bound.paths.append(config.control.socket)
        if config.control.metrics is not None:
            bound.metrics = bind_tcp(config.control.metrics, 16)
        if config.workers.register_socket is not None:
            bound.register = bind_unix(config.workers.register_socket, socket.SOCK_SEQPACKET,
                                       mode=0o660, group=register_group)
            bound.paths.append(config.workers.register_socket)
    except BaseException:
        bound.close(unlink=True)
        raise
    return bound
