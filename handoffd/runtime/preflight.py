"""``handoffd serve --check``: what ``serve`` would fail on, found without starting it.

As ``nginx -t`` does, it binds every TCP address and creates every Unix socket the
config names, then releases them: a port in use or a socket directory that is missing or
read-only fails here with the same one-line error ``serve`` gives (``BIND_FAILED``).
Under socket activation (``--activated``, what ``systemd/handoffd.service``'s
``ExecStartPre=`` runs) the client listeners are systemd's and are not bound.

Started as root with separated uids, it reads nothing as root that ``serve`` would not:
the server key (and TLS key) are opened by a child running as the acceptor's uid, and
the app is imported by a child running as a worker's uid, so a check never runs
application code with privilege.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from handoffd.config import Config
from handoffd.minor import Minor
from handoffd.runtime.binding import bind_tcp, bind_unix
from handoffd.runtime.supervisor import ProcessPlan
from handoffd.status import GSS_S_FAILURE, GSSError


def check_sockets(config: Config, *, activated: bool) -> list[str]:
    """Bind and release what ``serve`` binds; the first failure raises ``BIND_FAILED``."""
    checked: list[str] = []
    addresses = [] if activated else [*config.server.listen, *config.tls.listen]
    if config.control.metrics is not None:
        addresses.append(config.control.metrics)
    for address in addresses:
        bind_tcp(address, 1).close()
        checked.append(address)
    paths = [p for p in (config.control.socket, config.workers.register_socket) if p is not None]
    for path in paths:
        checked.append(str(_check_unix_path(path)))
    return checked


def _check_unix_path(path: Path) -> Path:
    """``serve`` replaces a stale socket file; anything else there is an error, and the
    directory must take a new socket (tried under a temporary name, then removed)."""
    if path.is_symlink() or (path.exists() and not path.is_socket()):
        raise GSSError(GSS_S_FAILURE, Minor.BIND_FAILED,
                       f"{path}: exists and is not a socket (serve replaces only a stale "
                       "socket)")
    if not path.parent.is_dir():
        raise GSSError(GSS_S_FAILURE, Minor.BIND_FAILED,
                       f"{path}: the directory {path.parent} does not exist")
    probe = path.parent / f".handoffd-check-{os.getpid()}"
    try:
        bind_unix(probe, socket.SOCK_STREAM, mode=0o600).close()
    except GSSError as error:
        why = (error.detail or "").removeprefix(f"{probe}: ")
        raise GSSError(error.major, error.minor, f"{path}: {why}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return path


def run_as(credentials: tuple[int, int], code: str, *args: str) -> str:
    """Run ``code`` in a child Python under ``credentials``; returns what it printed, or
    raises the GSSError it reported (one line on its stderr)."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD + code, *args], user=credentials[0],
        group=credentials[1], extra_groups=[], capture_output=True, text=True, check=False,
        cwd="/", env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    if result.returncode == 0:
        return result.stdout
    major, minor, detail = _parse_child_error(result.stderr)
    raise GSSError(major, minor, detail)


_CHILD = """
import sys
from handoffd.status import GSSError
def _fail(e):
    print(f"GSSERROR {e.major} {e.minor} {e.detail or ''}", file=sys.stderr)
    sys.exit(1)
try:
"""


def _parse_child_error(stderr: str) -> tuple[int, int, str]:
    for line in stderr.splitlines():
        if line.startswith("GSSERROR "):
            _, major, minor, *detail = line.split(" ", 3)
            return int(major), int(minor), " ".join(detail)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    return GSS_S_FAILURE, Minor.PREFLIGHT_FAILED, last


def _body(statement: str) -> str:
    return f"    {statement}\nexcept GSSError as e:\n    _fail(e)\n"


def check_keys_as_acceptor(config: Config, plan: ProcessPlan) -> str:
    """The server key's fingerprint, read as the acceptor's uid reads it; the TLS
    certificate and key and the krb5 keytab too, where configured."""
    code = _body("from handoffd import keyfiles; "
                 "print(keyfiles.load_private_key(sys.argv[1]).fingerprint)")
    fingerprint = run_as(plan.acceptor, code, str(config.server.key)).strip()
    loaders = []
    if config.tls.listen:
        loaders.append("from handoffd.mech.tls import TlsAcceptorFactory as F; "
                       "F.from_config(load_config(sys.argv[1]))")
    if "krb5" in config.server.mechanisms:
        loaders.append("from handoffd.mech.krb5 import Krb5AcceptorFactory as F; "
                       "F.from_config(load_config(sys.argv[1]))")
    for loader in loaders:
        run_as(plan.acceptor, _body(f"from handoffd.config import load_config; {loader}"),
               str(config.path))
    return fingerprint


def check_app_as_worker(config: Config, plan: ProcessPlan) -> None:
    """Import the app under a worker's uid: a check never runs app code as root."""
    worker = plan.worker_shared or (
        (plan.worker_range[0], plan.worker_group if plan.worker_group is not None
         else plan.worker_range[0]) if plan.worker_range else plan.acceptor)
    code = _body(f"from handoffd.runtime.{_loader(config)}; "
                 "load(sys.argv[1], pythonpath=sys.argv[2:])")
    run_as(worker, code, app_spec(config), *config.workers.pythonpath)


def app_spec(config: Config) -> str:
    """What the workers run: ``[workers] asgi``, ``wsgi`` or ``app``."""
    workers = config.workers
    return workers.asgi or workers.wsgi or workers.app


def _loader(config: Config) -> str:
    if config.workers.asgi or config.workers.wsgi:
        return "web import load_web_app as load"
    return "app import load_app as load"


def load_app_here(config: Config) -> None:
    """The app loaded in this process (unprivileged ``--check``)."""
    if config.workers.asgi or config.workers.wsgi:
        from handoffd.runtime.web import load_web_app

        load_web_app(app_spec(config), pythonpath=config.workers.pythonpath)
    else:
        from handoffd.runtime.app import load_app

        load_app(config.workers.app, pythonpath=config.workers.pythonpath)
