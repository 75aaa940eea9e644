"""The daemon's TOML configuration: every setting, its default and its validation.

A missing file, a TOML syntax error, an unknown key or a value of the wrong
type is a :class:`GSSError` (``GSS_S_FAILURE`` with ``Minor.CONFIG_UNREADABLE``
or ``Minor.CONFIG_INVALID``) whose detail names the file and the key,
``<path>: [section] key: why`` (:func:`load_config`; :func:`parse_config` has no
path and leaves it out): a typo never passes silently.  Relative paths are
resolved against the config file's directory.

The reference of every key lives in the README ("Configuration") and in
``examples/echo/handoffd.toml``.
"""

from __future__ import annotations

import grp
import math
import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from handoffd.minor import Minor
from handoffd.status import GSS_S_FAILURE, GSSError


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: the listening side and the long-term identity."""

    listen: tuple[str, ...] = ("127.0.0.1:7443",)
    """host:port addresses (``[::1]:7443`` for IPv6); ignored under socket activation."""
    key: Path = Path("server.key")
    """The server's private key file (``handoffd keygen``); must not be group/other readable."""
    allowed_clients: Path | None = None
    """Allow-list of client public keys with names; None accepts no client key (anonymous only)."""
    allow_anonymous: bool = True
    """Accept clients without a long-term key (they are named ``anonymous``)."""
    handshake_timeout: float = 10.0
    """Seconds a client has to finish the handshake."""
    max_handshakes: int = 256
    """Handshake slots: connections between accept() and the worker taking them.  When
    every slot is taken, the one that has gone longest without progress is evicted for a
    newcomer; only when every slot holds a finished handshake waiting for a worker do
    new connections wait in the listen backlog."""
    max_handshakes_per_source: int = 32
    """A source's share of the slots (addresses grouped by ``source_prefix_v4`` /
    ``source_prefix_v6``).  While slots are free it limits nobody; once all are taken,
    a connection from a source holding this many is closed at once, and sources over
    it lose their stalled handshakes first.  0: no per-source limit."""
    source_prefix_v4: int = 32
    """IPv4 prefix length that makes one source (32: each address)."""
    source_prefix_v6: int = 64
    """IPv6 prefix length that makes one source (64: one subnet, what one host gets)."""
    first_token_timeout: float = 3.0
    """Seconds from accept() to the client's whole first token (separate from, and
    shorter than, ``handshake_timeout``): a connection that sends nothing is gone soon."""
    context_lifetime: float = 3600.0
    """Seconds a security context stays valid; clients re-handshake after."""
    backlog: int = 1024
    mechanisms: tuple[str, ...] = ("noise",)
    """Mechanisms offered (``noise``, ``krb5``); the client's first token picks one."""
    user: str | None = None
    """The acceptor's user (name or uid).  ``serve`` started as root (or with
    CAP_SETUID/CAP_SETGID/CAP_KILL) stays a small supervisor and runs the acceptor,
    which holds the key, as this user; required then, and never root."""
    group: str | None = None
    """The acceptor's group (name or gid); None: ``user``'s primary group (or gid =
    uid for a uid with no passwd entry)."""
    acceptors: int = 1
    """Acceptor processes accepting on the same listening sockets (1 to
    :data:`MAX_ACCEPTORS`), each under ``user``, each starting and managing its own
    share of ``[workers] count`` (so at most ``count``) and handing off to every worker
    (the shared pool); more than 1 needs the supervisor (``serve`` as root).
    ``max_handshakes`` counts per acceptor.  Applied at a restart (SIGUSR2), not a
    reload.  docs/PRIVSEP.md, "Several acceptors"."""


@dataclass(frozen=True)
class Krb5Config:
    """``[krb5]``: the Kerberos mechanism (``handoffd[krb5]``, ``docs/KRB5.md``)."""

    keytab: Path | None = None
    """The acceptor's keytab; only the acceptor may read it (workers never need it)."""
    service: str | None = None
    """Acceptor principal as ``service@host`` (e.g. ``host@example.org``); None: any
    principal of the keytab."""
    allowed_principals: tuple[str, ...] = ()
    """Client principals admitted (``user@REALM``); empty: any the KDC vouches for."""


@dataclass(frozen=True)
class WorkersConfig:
    """``[workers]``: the pre-forked pool."""

    app: str = "examples.echo.app:handler"
    """The application, ``module:callable``: ``async def handler(stream)``."""
    asgi: str | None = None
    """Instead of ``app``: an ASGI application, ``module:app``, served by hypercorn on
    each handed-off stream (``handoffd.runtime.web``; the ``asgi`` extra)."""
    wsgi: str | None = None
    """Instead of ``app``: a WSGI application (Flask, Django...), the same way."""
    count: int = 4
    """Workers handoffd spawns; 0 is allowed when ``register_socket`` is set
    (all workers external, e.g. a pre-fork server embedding the worker library)."""
    max_unacked: int = 8
    """Handoffs in flight per worker (also its number of key slots): backpressure."""
    ack_timeout: float = 5.0
    """Seconds a worker has to acknowledge a handoff before it is redelivered."""
    drain_timeout: float = 30.0
    """Seconds workers get to finish their sessions on SIGTERM before SIGKILL."""
    wait_timeout: float = 10.0
    """Seconds a client whose handshake finished may wait for a worker to take it (all
    busy, none alive or none registered); then it gets an ERROR ``GSS_S_UNAVAILABLE``
    (``NO_WORKER_AVAILABLE``) and is closed."""
    restart_backoff_max: float = 5.0
    boot_failures_max: int = 5
    """Consecutive workers dying before they are ready, after which the daemon gives up."""
    register_socket: Path | None = None
    """Unix socket where external workers register; None disables it."""
    keyring: str = "auto"
    """Key parking mode: ``auto``, ``keyring`` or ``fallback``."""
    pythonpath: tuple[str, ...] = ()
    """Extra import paths for the application (resolved against the config file)."""
    user: str | None = None
    """Run spawned workers as this user (name or uid; the acceptor must be root), so
    the acceptor's own files (server key, krb5 keytab) are out of their reach by
    permissions; None: the acceptor's user."""
    group: str | None = None
    """The spawned workers' group (name or gid); None: ``user``'s primary group (with
    ``uid_range``: gid = the worker's uid)."""
    uid_range: tuple[int, ...] = ()
    """``[first, last]``: one uid per worker from this range (no passwd entries needed),
    so workers cannot read each other's memory either; needs the supervisor (root).
    Excludes ``user``."""
    insecure_same_uid: bool = False
    """Opt in to workers under the acceptor's uid (a compromised worker can then read
    the server key from the acceptor's memory); warned at every start, shown in
    ``status`` and ``doctor``.  Off: ``serve`` refuses to start that way."""
    register_group: str | None = None
    """Group of ``register_socket`` (mode 0660); None: root's / the acceptor's group."""


@dataclass(frozen=True)
class PolicyConfig:
    """``[policy]``: who may register as an external worker (spawned workers are trusted
    by construction: the acceptor created their channel), and which LSM labels workers
    accept handoffs from."""

    worker_uids: tuple[int, ...] = ()
    worker_gids: tuple[int, ...] = ()
    worker_labels: tuple[str, ...] = ()
    require_label: bool = False
    acceptor_labels: tuple[str, ...] = ()
    """LSM contexts spawned workers accept their channel and handoffs from (SO_PEERSEC,
    SCM_SECURITY); empty: no label check.  Non-empty refuses an unlabelled acceptor."""


@dataclass(frozen=True)
class ControlConfig:
    """``[control]``: the status socket and the metrics endpoint."""

    socket: Path | None = Path("handoffd.control")
    metrics: str | None = None
    """host:port for the Prometheus text endpoint, or None."""
    max_connections: int = 8
    """Connections each endpoint (control socket, metrics) serves at once; more are
    closed at once (counted, logged rate-limited), so they never take the fds clients need."""
    timeout: float = 2.0
    """Seconds a control or metrics connection has to send its request and take the answer."""


@dataclass(frozen=True)
class LogConfig:
    """``[log]``."""

    level: str = "info"
    format: str = "text"
    """``text`` or ``json`` (one object per line)."""


@dataclass(frozen=True)
class TlsConfig:
    """``[tls]``: TLS 1.3 listeners beside the Noise/krb5 ones (docs/TLS.md); off while
    ``listen`` is empty.  The certificate's key is read by the acceptor only."""

    listen: tuple[str, ...] = ()
    certificate: Path | None = None  # PEM chain, leaf first
    key: Path | None = None  # PEM private key (0600, the acceptor's user)
    alpn: tuple[str, ...] = ("http/1.1",)
    # "<server name> <certificate> <key>" per entry: the certificate for that SNI name
    sni: tuple[tuple[str, Path, Path], ...] = ()
    client_ca: Path | None = None  # PEM bundle: ask for and verify client certificates
    require_client_certificate: bool = False
    # "subject:<RFC 4514 DN>", "san:<DNS|email|URI|IP>:<value>", "spki:<SHA-256 hex>"
    allowed_clients: tuple[str, ...] = ()
    peer_name: str = "subject"  # the peer name a worker sees: subject, san or spki
    # Kernel TLS in the workers (docs/TLS.md): "auto" where the kernel can also rekey,
    # "on" wherever it has the tls ULP (a KeyUpdate then ends the session), "off".
    ktls: str = "auto"


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    krb5: Krb5Config = field(default_factory=Krb5Config)
    tls: TlsConfig = field(default_factory=TlsConfig)
    path: Path | None = None


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "workers": WorkersConfig,
    "policy": PolicyConfig,
    "control": ControlConfig,
    "log": LogConfig,
    "krb5": Krb5Config,
    "tls": TlsConfig,
}

_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("workers", "keyring"): ("auto", "keyring", "fallback"),
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("log", "format"): ("text", "json"),
    ("tls", "peer_name"): ("subject", "san", "spki"),
    ("tls", "ktls"): ("auto", "on", "off"),
}

_POSITIVE: frozenset[tuple[str, str]] = frozenset({
    ("server", "handshake_timeout"), ("server", "max_handshakes"),
    ("server", "context_lifetime"), ("server", "backlog"),
    ("workers", "max_unacked"), ("workers", "ack_timeout"),
    ("workers", "drain_timeout"), ("workers", "restart_backoff_max"),
    ("workers", "boot_failures_max"), ("workers", "wait_timeout"),
    ("server", "source_prefix_v4"), ("server", "source_prefix_v6"),
    ("server", "first_token_timeout"), ("control", "max_connections"), ("control", "timeout"),
})

UID_MAX = 2**32 - 2
MAX_ACCEPTORS = 64
"""The most ``[server] acceptors``: one per core on a large machine, bounded so that a
typo cannot start thousands of key-holding processes."""  # (uid_t)-1 means "unchanged" to setresuid


def _invalid(where: str, why: str) -> GSSError:
    return GSSError(GSS_S_FAILURE, Minor.CONFIG_INVALID, f"{where}: {why}")


def _convert(section: str, key: str, annotation: str, value: object, base: Path) -> object:
    where = f"[{section}] {key}"
    if annotation == "bool":
        if not isinstance(value, bool):
            raise _invalid(where, "expected true or false")
        return value
    if annotation in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(where, "expected a number")
        if annotation == "int" and not isinstance(value, int):
            raise _invalid(where, "expected a whole number")
        if not math.isfinite(value):
            # TOML has nan and inf; "nan <= 0" is false, so they would slip past below.
            raise _invalid(where, "expected a finite number")
        if (section, key) in _POSITIVE and value <= 0:
            raise _invalid(where, "must be greater than zero")
        return int(value) if annotation == "int" else float(value)
    if annotation in ("str", "str | None"):
        if not isinstance(value, str) or not value:
            raise _invalid(where, "expected a non-empty string")
        choices = _CHOICES.get((section, key))
        if choices and value not in choices:
            raise _invalid(where, f"expected one of {', '.join(choices)}")
        return value
    if annotation in ("Path", "Path | None"):
        if not isinstance(value, str) or not value:
            raise _invalid(where, "expected a path")
        return base / value
    if annotation.startswith("tuple[str"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise _invalid(where, "expected a list of strings")
        if key == "pythonpath":
            return tuple(str(base / v) for v in value)
        return tuple(value)
    if annotation.startswith("tuple[tuple[str, Path, Path]"):
        entries = []
        for entry in value if isinstance(value, list) else [None]:
            parts = entry.split() if isinstance(entry, str) else []
            if len(parts) != 3:
                raise _invalid(where, 'expected a list of "<server name> <certificate> <key>"')
            entries.append((parts[0].lower(), base / parts[1], base / parts[2]))
        return tuple(entries)
    if annotation.startswith("tuple[int"):
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            raise _invalid(where, "expected a list of non-negative whole numbers")
        return tuple(value)
    raise AssertionError(f"unhandled annotation {annotation}")  # pragma: no cover


def _section(name: str, raw: object, base: Path) -> object:
    cls = _SECTIONS[name]
    if not isinstance(raw, Mapping):
        raise _invalid(f"[{name}]", "expected a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, object] = {}
    for key, value in raw.items():
        if key not in known:
            raise _invalid(f"[{name}] {key}", f"unknown key (known: {', '.join(sorted(known))})")
        values[key] = _convert(name, key, str(known[key].type), value, base)
    return cls(**values)


def parse_config(data: Mapping[str, object], *, base: Path, path: Path | None = None) -> Config:
    """Validate an already-parsed TOML document; relative paths resolve against ``base``."""
    sections: dict[str, object] = {}
    for name, raw in data.items():
        if name not in _SECTIONS:
            raise _invalid(f"[{name}]", f"unknown section (known: {', '.join(_SECTIONS)})")
        sections[name] = _section(name, raw, base)
    config = Config(path=path, **sections)  # type: ignore[arg-type]
    if config.workers.count < 0:
        raise _invalid("[workers] count", "must not be negative")
    if config.workers.count == 0 and config.workers.register_socket is None:
        raise _invalid("[workers] count",
                       "0 spawned workers needs a register_socket for external workers")
    if config.server.allowed_clients is None and not config.server.allow_anonymous \
            and "noise" in config.server.mechanisms:
        raise _invalid("[server] allow_anonymous",
                       "false with no allowed_clients file would refuse every client")
    _check_mechanisms(config)
    if config.workers.asgi is not None and config.workers.wsgi is not None:
        raise _invalid("[workers] asgi", "set asgi or wsgi, not both")
    _check_tls(config.tls)
    _check_identities(config)
    for address in config.server.listen:
        _check_address("[server] listen", address)
    if config.control.metrics is not None:
        _check_address("[control] metrics", config.control.metrics)
    server = config.server
    if not 1 <= server.acceptors <= MAX_ACCEPTORS:
        raise _invalid("[server] acceptors", f"must be from 1 to {MAX_ACCEPTORS}")
    if server.acceptors > max(1, config.workers.count):
        raise _invalid("[server] acceptors", f"{server.acceptors} acceptors need at least as "
                       f"many spawned workers ([workers] count = {config.workers.count}): each "
                       "acceptor feeds a share of its own")
    if server.source_prefix_v4 > 32 or server.source_prefix_v6 > 128:
        raise _invalid("[server] source_prefix_v4/v6", "at most 32 (IPv4) and 128 (IPv6)")
    if server.max_handshakes_per_source < 0:
        raise _invalid("[server] max_handshakes_per_source", "must not be negative")
    return config


def _check_tls(tls: TlsConfig) -> None:
    for address in tls.listen:
        _check_address("[tls] listen", address)
    if tls.listen and (tls.certificate is None or tls.key is None):
        raise _invalid("[tls] certificate", "TLS listeners need a certificate and its key")
    for protocol in tls.alpn:
        if len(protocol.encode()) > 255:
            raise _invalid("[tls] alpn", f"{protocol!r} is longer than 255 bytes")
    for entry in tls.allowed_clients:
        if entry.partition(":")[0] not in ("subject", "san", "spki") or not entry.partition(":")[2]:
            raise _invalid("[tls] allowed_clients",
                           f"{entry!r}: expected subject:<DN>, san:<type>:<value> or spki:<sha256>")
    if (tls.allowed_clients or tls.require_client_certificate) and tls.client_ca is None:
        raise _invalid("[tls] client_ca", "client certificates need the CA bundle that issues them")


def _check_address(where: str, address: str) -> None:
    try:
        parse_address(address)
    except GSSError as error:
        raise _invalid(where, str(error.detail)) from None


def _check_identities(config: Config) -> None:
    workers, policy = config.workers, config.policy
    if workers.uid_range:
        if len(workers.uid_range) != 2 or not 0 < workers.uid_range[0] <= workers.uid_range[1] \
                or workers.uid_range[1] > UID_MAX:
            raise _invalid("[workers] uid_range", "expected [first, last] with 0 < first <= last")
        if workers.user is not None:
            raise _invalid("[workers] uid_range", "give either user or uid_range, not both")
        size = workers.uid_range[1] - workers.uid_range[0] + 1
        if size < workers.count:
            raise _invalid("[workers] uid_range",
                           f"{size} uids for {workers.count} workers (a draining worker keeps "
                           "its uid: give at least twice count)")
    acceptor_credentials(config.server)
    worker_credentials(workers, check_switch=False)
    if workers.register_socket is not None and not (
            policy.worker_uids or policy.worker_gids or policy.worker_labels):
        raise _invalid("[workers] register_socket",
                       "external registration needs [policy] worker_uids, worker_gids or "
                       "worker_labels naming who may register (nobody is admitted by default)")
    if workers.register_group is not None:
        group_id("[workers] register_group", workers.register_group)


def group_id(where: str, group: str) -> int:
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise _invalid(where, f"no such group {group!r}") from None


def _user_ids(where: str, user: str) -> tuple[int, int]:
    """``(uid, primary gid)``; a number with no passwd entry is its own gid."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if user.isdigit() and int(user) <= UID_MAX:
            return int(user), int(user)
        raise _invalid(where, f"no such user {user!r}") from None
    except OverflowError:
        raise _invalid(where, f"no such user {user!r}") from None
    return entry.pw_uid, entry.pw_gid


def acceptor_credentials(server: ServerConfig) -> tuple[int, int] | None:
    """``(uid, gid)`` the supervisor runs the acceptor as; None when ``user`` is unset."""
    if server.user is None:
        if server.group is not None:
            raise _invalid("[server] group", "needs [server] user")
        return None
    uid, gid = _user_ids("[server] user", server.user)
    if uid == 0:
        raise _invalid("[server] user", "the acceptor never runs as root")
    if server.group is not None:
        gid = group_id("[server] group", server.group)
    return uid, gid


def worker_credentials(workers: WorkersConfig, *,
                       check_switch: bool = True) -> tuple[int, int] | None:
    """``(uid, gid)`` spawned workers run as, from ``[workers] user``/``group``.

    None when neither is set (workers keep the acceptor's credentials, or take theirs
    from ``uid_range``).  Unknown names are config errors; with ``check_switch``, so is
    a switch of user by a process that is not root.
    """
    if workers.user is None and workers.group is None:
        return None
    if workers.user is None:
        uid, gid = os.getuid(), os.getgid()
    else:
        uid, gid = _user_ids("[workers] user", workers.user)
    if workers.group is not None:
        gid = group_id("[workers] group", workers.group)
    if check_switch and os.geteuid() != 0 and (uid, gid) != (os.getuid(), os.getgid()):
        raise _invalid("[workers] user", "switching the workers' user needs a root acceptor")
    return uid, gid


_MECHANISMS = ("noise", "krb5")


def _check_mechanisms(config: Config) -> None:
    names = config.server.mechanisms
    if not names:
        raise _invalid("[server] mechanisms", "expected at least one mechanism")
    for name in names:
        if name not in _MECHANISMS:
            raise _invalid("[server] mechanisms",
                           f"unknown mechanism {name!r} (known: {', '.join(_MECHANISMS)})")
    if len(set(names)) != len(names):
        raise _invalid("[server] mechanisms", "a mechanism is listed twice")
    if "krb5" in names and config.krb5.keytab is None:
        raise _invalid("[krb5] keytab", "the krb5 mechanism needs the acceptor's keytab")


RESTART_ONLY: frozenset[tuple[str, str]] = frozenset({
    ("server", "listen"), ("server", "backlog"), ("server", "user"), ("server", "group"),
    ("server", "acceptors"), ("workers", "register_socket"), ("workers", "register_group"),
    ("workers", "user"), ("workers", "group"), ("workers", "uid_range"),
    ("workers", "insecure_same_uid"), ("workers", "keyring"), ("workers", "max_unacked"),
    ("control", "socket"), ("control", "metrics"), ("log", "format"), ("tls", "listen"),
})
"""Settings a reload (SIGHUP) cannot change: sockets are bound, uids and key slots
allocated, once at start.  Everything else applies on reload."""

BOUND_SOCKETS: frozenset[tuple[str, str]] = frozenset({
    ("server", "listen"), ("server", "backlog"), ("workers", "register_socket"),
    ("workers", "register_group"), ("control", "socket"), ("control", "metrics"),
    ("tls", "listen"),
})
"""What even the zero-downtime restart (SIGUSR2) keeps: its new acceptor generation
takes over the listening sockets the supervisor bound at start."""


def worker_share(count: int, index: int, acceptors: int) -> int:
    """How many of ``count`` spawned workers acceptor ``index`` of ``acceptors`` starts:
    an equal share, the first ``count % acceptors`` acceptors one more."""
    return count // acceptors + (1 if index < count % acceptors else 0)


def merge_reloaded(running: Config, new: Config, *,
                   kept_settings: frozenset[tuple[str, str]] = RESTART_ONLY,
                   ) -> tuple[Config, list[str], list[str]]:
    """``new`` with the ``kept_settings`` (:data:`RESTART_ONLY` by default) kept from
    ``running``.

    Returns ``(config, changed, need_restart)``: the ``[section] key`` names that changed
    and apply now, and those that changed but wait for a restart."""
    changed: list[str] = []
    need_restart: list[str] = []
    sections: dict[str, Any] = {}
    for name in _SECTIONS:
        old_section, new_section = getattr(running, name), getattr(new, name)
        kept: dict[str, Any] = {}
        for f in fields(old_section):
            before, after = getattr(old_section, f.name), getattr(new_section, f.name)
            if before == after:
                continue
            if (name, f.name) in kept_settings:
                need_restart.append(f"[{name}] {f.name}")
                kept[f.name] = before
            else:
                changed.append(f"[{name}] {f.name}")
        sections[name] = replace(new_section, **kept)
    return replace(new, **sections), changed, need_restart


def load_config(path: Path | str) -> Config:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise GSSError(GSS_S_FAILURE, Minor.CONFIG_UNREADABLE,
                       f"{path}: cannot read it: {error.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise GSSError(GSS_S_FAILURE, Minor.CONFIG_INVALID, f"{path}: {error}") from None
    except RecursionError:
        raise GSSError(GSS_S_FAILURE, Minor.CONFIG_INVALID,
                       f"{path}: arrays or tables nested too deeply") from None
    try:
        return parse_config(data, base=path.resolve().parent, path=path)
    except GSSError as error:
        # "<path>: [section] key: why": the operator sees which file, as for syntax errors.
        raise GSSError(error.major, error.minor, f"{path}: {error.detail}") from None


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to ``(host, port)``; a bad one is CONFIG_INVALID."""
    host, sep, port_text = text.rpartition(":")
    # At most 5 digits: int() of thousands of digits is slow and then refused by Python.
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()) \
            or len(port_text) > 5:
        raise _invalid(repr(text), "expected host:port or [ipv6]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise _invalid(repr(text), "write IPv6 addresses in brackets: [::1]:7443")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise _invalid(repr(text), "port out of range")
    return host, port
