"""The ``handoffd`` command line: one sub-command per job.

Every failure is reported as a GSS status: the display texts of the major
and minor status, one per line on stderr, and exit status 1.  A config or usage
error (:data:`handoffd.minor.OPERATOR_ERRORS`) is one line instead,
``handoffd: <path>: [section] key: why (CONFIG_INVALID, minor 600)``, also exit 1;
errors argparse finds exit with 2 (its convention).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from handoffd import status
from handoffd.minor import Minor
from handoffd.status import GSSError

if TYPE_CHECKING:
    from handoffd.config import Config

Handler = Callable[[argparse.Namespace], int]


def _parse_code(text: str) -> int:
    """Accept decimal, 0x-hex and 0o-octal status words, as operators paste them."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a status code: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"status codes are unsigned: {text!r}")
    return value


def _cmd_display_status(args: argparse.Namespace) -> int:
    if args.major is None and args.minor is None:
        raise GSSError(status.GSS_S_CALL_INACCESSIBLE_READ, Minor.USAGE_INVALID,
                       "display-status: give a major status, --minor N, or both")
    if args.major is not None:
        for message in status.status_messages(args.major, status.GSS_C_GSS_CODE):
            print(message)
    if args.minor is not None:
        for message in status.status_messages(args.minor, status.GSS_C_MECH_CODE):
            print(message)
    return 0


def _add_display_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "display-status",
        help="print the messages of a GSS major status and/or a handoffd minor status",
        description="Print every message of a status, one per line, like the "
        "gss_display_status loop. Example: handoffd display-status 0x90000",
    )
    p.add_argument("major", nargs="?", type=_parse_code, help="major status (e.g. 0x90000)")
    p.add_argument("--minor", type=_parse_code, help="handoffd minor status code")
    p.set_defaults(handler=_cmd_display_status)


def _cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from handoffd.config import load_config
    from handoffd.kernel.privileges import make_undumpable
    from handoffd.logs import setup_logging
    from handoffd.runtime.daemon import Daemon
    from handoffd.runtime.supervisor import Supervisor, process_plan

    config = load_config(args.config)
    if args.check:
        return _check_config(config, activated=args.activated)
    plan = process_plan(config)
    if plan.separated:
        # Root (or CAP_SETUID/SETGID/KILL): this process stays the supervisor, and the
        # acceptor and workers run under their own uids.
        setup_logging(config.log.level, config.log.format, role="supervisor")
        return trio.run(Supervisor(config, plan).run)
    # Unseparated, workers share our uid: being undumpable still keeps them (and any
    # process of the uid) from ptrace, /proc/PID/mem and pidfd_getfd on the key holder,
    # though not from the key file.
    make_undumpable()
    setup_logging(config.log.level, config.log.format, role="acceptor")
    trio.run(Daemon(config, privsep=plan.describe()).run)
    return 0


def _check_config(config: Config, *, activated: bool = False) -> int:
    """``serve --check``: everything ``serve`` reads and binds before it starts, without
    starting (``handoffd.runtime.preflight``)."""
    import os

    from handoffd import keyfiles
    from handoffd.runtime import preflight
    from handoffd.runtime.supervisor import process_plan

    plan = process_plan(config)
    clients = (keyfiles.load_allow_list(config.server.allowed_clients)
               if config.server.allowed_clients else None)
    if plan.separated and os.geteuid() == 0:
        # Keys as the acceptor reads them, the app as a worker imports it: never as root.
        fingerprint = preflight.check_keys_as_acceptor(config, plan)
        preflight.check_app_as_worker(config, plan)
    else:
        fingerprint = keyfiles.load_private_key(config.server.key).fingerprint
        preflight.load_app_here(config)
        if "krb5" in config.server.mechanisms:
            from handoffd.mech.krb5 import Krb5AcceptorFactory

            # Acquires the acceptor credentials from the keytab, as serve does at start-up.
            Krb5AcceptorFactory.from_config(config)
        if config.tls.listen:
            from handoffd.mech.tls import TlsAcceptorFactory

            TlsAcceptorFactory.from_config(config)
    bound = preflight.check_sockets(config, activated=activated)
    print(f"config {config.path}: OK")
    print(f"server key {fingerprint}")
    print(f"clients: {len(clients) if clients else 0} named"
          f"{', anonymous allowed' if config.server.allow_anonymous else ''}")
    kind = "an ASGI app" if config.workers.asgi else "a WSGI app" if config.workers.wsgi \
        else "an async handler"
    print(f"app {preflight.app_spec(config)}: {kind}, {config.workers.count} workers")
    if "krb5" in config.server.mechanisms:
        print(f"krb5: keytab {config.krb5.keytab}, service {config.krb5.service or 'any'}")
    print(f"mechanisms: {', '.join(config.server.mechanisms)}"
          f"{', tls' if config.tls.listen else ''}")
    print(f"sockets bound and released: {', '.join(bound) or 'none'}"
          f"{' (client listeners: systemd, --activated)' if activated else ''}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    import os

    from handoffd import keyfiles
    from handoffd.core.credentials import StaticKeyPair, fingerprint

    keypair = StaticKeyPair.generate(os.urandom)
    keyfiles.save_private_key(args.out, keypair)
    print(f"wrote {args.out} and {args.out}.pub")
    print(f"fingerprint {fingerprint(keypair.public_bytes)}")
    return 0


def _control_path(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    from handoffd.config import load_config

    config = load_config(args.config)
    if config.control.socket is None:
        raise GSSError(status.GSS_S_UNAVAILABLE, detail="the config has no [control] socket")
    return str(config.control.socket)


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    import trio

    from handoffd.runtime.control import query_control

    snapshot = trio.run(query_control, _control_path(args))
    if args.json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
        return 0
    totals = snapshot["totals"]
    latency = snapshot["handoff_latency_us"]
    addresses = [*snapshot["listen"], *(f"{a} (TLS)" for a in snapshot.get("tls_listen", []))]
    print(f"handoffd pid {snapshot['pid']} {snapshot['state']}, up {snapshot['uptime_s']:.0f}s, "
          f"key parking: {snapshot['key_parking']}, listening on "
          f"{', '.join(addresses)}")
    privsep = snapshot.get("privilege_separation") or {}
    if privsep:
        print(("INSECURE: " if privsep["insecure_same_uid"] else "separated: ")
              + f"acceptor uid {privsep['acceptor_uid']}, workers {privsep['workers']}")
    acceptors = snapshot.get("acceptors", [])
    several = len(acceptors) > 1
    if several:
        print(f"{'acceptor':>8} {'pid':>8} {'state':>11} {'workers':>7} {'feeds':>5} "
              f"{'accepted':>9} "
              f"{'handshakes':>10} {'handoffs':>9} {'in-flight':>9} {'active':>7}")
        for a in acceptors:
            if a.get("state") == "unreachable":
                print(f"{a['index']:>8} {'-':>8} {'unreachable':>11}")
                continue
            print(f"{a['index']:>8} {a['pid']:>8} {a['state']:>11} {a['workers']:>7} "
                  f"{a.get('feeds', a['workers']):>5} {a['accepted']:>9} "
                  f"{a['handshakes_ok']:>10} {a['handoffs']:>9} "
                  f"{a['in_flight']:>9} {a['sessions_active']:>7}")
    print(f"{'worker':>6} {'pid':>8} {'uid':>7} {'state':>9} {'in-flight':>9} {'handled':>8} "
          f"{'active':>7} {'restarts':>8}" + (f" {'acceptor':>8}" if several else ""))
    for w in snapshot["workers"]:
        print(f"{w['index']:>6} {w['pid'] or '-':>8} {w.get('uid') or '-':>7} {w['state']:>9} "
              f"{w['in_flight']:>9} {w['handled']:>8} {w.get('active', 0):>7} "
              f"{w['restarts']:>8}" + (f" {w.get('acceptor', 0):>8}" if several else ""))
    slots = snapshot.get("handshake_slots", {})
    print(f"sessions: {snapshot.get('sessions_active', 0)} active; ended "
          f"{totals.get('sessions_closed', 0)} closed, {totals.get('sessions_app_error', 0)} "
          f"app errors, {totals.get('sessions_peer_error', 0)} peer errors, "
          f"{totals.get('sessions_cut_at_drain', 0)} cut at drain, "
          f"{totals.get('sessions_lost_with_worker', 0)} lost with their worker")
    used = sum(slots.get(k, 0) for k in ("first_token", "handshake", "waiting_for_worker"))
    print(f"handshakes: {slots.get('first_token', 0) + slots.get('handshake', 0)} in progress, "
          f"{snapshot.get('waiting_for_worker', 0)} waiting for a worker "
          f"(slots {used}/{slots.get('capacity', '-')})")
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    if latency["p50"] is not None:
        print(f"handoff latency: p50 {latency['p50']:.0f} us, p99 {latency['p99']:.0f} us")
    failures = snapshot["handshake_failures"]
    if failures:
        print("handshake failures: " + ", ".join(f"{k} {v}" for k, v in failures.items()))
    return 0


def _cmd_connect(args: argparse.Namespace) -> int:
    import trio

    from handoffd.runtime.connect_cli import run_connect

    return trio.run(run_connect, args)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from handoffd.doctor import run_doctor

    return run_doctor(json_output=args.json, config=args.config)


def _add_daemon_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pathlib import Path

    p = sub.add_parser("serve", help="run the acceptor and its pre-forked workers",
                       description="Run the daemon in the foreground (systemd, Docker or a "
                       "terminal). SIGTERM drains, SIGHUP rolls workers, SIGTTIN/SIGTTOU "
                       "resize the pool.")
    p.add_argument("--config", required=True, type=Path, help="TOML configuration file")
    p.add_argument("--activated", action="store_true",
                   help="with --check: the client listeners come from systemd (socket "
                        "activation); do not test-bind them")
    p.add_argument("--check", action="store_true",
                   help="validate the config, keys, allow-list and app, then exit")
    p.set_defaults(handler=_cmd_serve)

    p = sub.add_parser("keygen", help="generate a static key pair (server or client)")
    p.add_argument("--out", required=True, type=Path,
                   help="private key file to write (mode 0600); the public key goes to OUT.pub")
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("status", help="show workers, totals and failures of a running daemon")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--control", type=Path, help="the daemon's control socket")
    group.add_argument("--config", type=Path, help="read the control socket path from here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("connect", help="connect to a handoffd server, like nc",
                       description="Copy stdin to the server and the server's replies to "
                       "stdout over a secure channel.")
    p.add_argument("server", help="HOST:PORT ([v6]:PORT)")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--server-key", type=Path, help="the server's public key file (.pub)")
    pin.add_argument("--fingerprint", help="the server's key fingerprint (SHA256:...)")
    p.add_argument("--tofu", action="store_true",
                   help="trust on first use: remember the server's key in the known-servers "
                   "file, refuse a different key later")
    p.add_argument("--known-servers", type=Path, help="known-servers file for --tofu")
    p.add_argument("--key", type=Path, help="client private key (default: anonymous)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--mech", choices=("noise", "krb5"), default="noise",
                   help="security mechanism (krb5 needs handoffd[krb5] and a ticket: kinit)")
    p.add_argument("--service", help="krb5: the acceptor's service@host "
                   "(default host@HOST)")
    p.add_argument("--listen", metavar="ADDR",
                   help="forward instead: accept plain TCP on ADDR (e.g. 127.0.0.1:8080) and "
                   "carry each connection to the server over its own secure connection, as "
                   "stunnel's client mode (for curl, browsers)")
    p.set_defaults(handler=_cmd_connect)

    p = sub.add_parser("doctor", help="check this host: keyring, pidfds, LSM labels, limits, "
                       "privilege separation")
    p.add_argument("--json", action="store_true")
    p.add_argument("--config", help="also check which uids serve would run this config under")
    p.set_defaults(handler=_cmd_doctor)


# Sub-command registrars; each adds its parser and sets ``handler``.
_REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_daemon_commands,
    _add_display_status,
]


def version() -> str:
    """The installed distribution's version; ``handoffd.__version__`` when not installed."""
    from importlib import metadata

    try:
        return metadata.version("handoffd")
    except metadata.PackageNotFoundError:
        import handoffd

        return str(getattr(handoffd, "__version__", "unknown"))


def build_parser() -> argparse.ArgumentParser:
    """The ``handoffd`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="handoffd",
        description="Context-handoff daemon for pre-forked servers.",
    )
    parser.add_argument("--version", action="version", version=f"handoffd {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRARS:
        register(sub)
    return parser


def report(error: GSSError) -> None:
    """Print a GSS error the way the seed's display loop does: one message per line.

    A config or usage error is the one line of :meth:`GSSError.operator_line` instead:
    its major's generic text would only hide the detail that names what to fix.
    """
    line = error.operator_line()
    if line is not None:
        print(f"handoffd: {line}", file=sys.stderr)
        return
    print(
        f"handoffd: error (major 0x{error.major:08x}, minor {error.minor}):",
        file=sys.stderr,
    )
    for message in error.messages():
        print(f"  {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; a GSS error is printed as its status messages, exit 1."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except GSSError as error:
        report(error)
        return 1
    except BaseExceptionGroup as group:
        # trio nurseries wrap errors in groups; a group of GSS errors is still a GSS error.
        matched, rest = group.split(GSSError)
        if matched is None or rest is not None:
            raise
        report(_first_leaf(matched))
        return 1
    except KeyboardInterrupt:
        return 130


def _first_leaf(group: BaseExceptionGroup[GSSError]) -> GSSError:
    first = group.exceptions[0]
    return first if isinstance(first, GSSError) else _first_leaf(first)
