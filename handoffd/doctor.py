"""``handoffd doctor``: what this host offers and which mode the daemon would run in.

Each check tries the real facility (a throwaway key, a socketpair) rather than
guessing from versions, and says what follows from the answer.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
from dataclasses import asdict, dataclass
from importlib import metadata

from handoffd.kernel import keyring, ktls, peer
from handoffd.status import GSSError


@dataclass(frozen=True)
class Check:
    """One finding of ``handoffd doctor``: what was checked, whether it is fine, what it means."""
    name: str
    ok: bool
    finding: str
    consequence: str


def _check_keyring() -> Check:
    status = keyring.probe()
    if status is keyring.KeyringStatus.AVAILABLE:
        return Check("kernel keyring", True, "add_key/keyctl work",
                     "handoff keys are parked in the kernel keyring (mode: keyring)")
    return Check("kernel keyring", False, f"refused: {status.name}",
                 "the daemon runs in the weaker fallback key mode: handoff keys live in "
                 "process memory (see docs/KEYRING.md); for Docker use "
                 "docker/seccomp-keyring.json")


def _check_quota() -> Check:
    uid = os.getuid()
    try:
        users = keyring.read_key_users(uid)
    except (GSSError, OSError) as error:
        return Check("key quota", False, f"cannot read /proc/key-users: {error}",
                     "quota use cannot be monitored")
    if users is None:
        return Check("key quota", True, f"uid {uid} holds no keys yet", "full quota available")
    return Check("key quota", users.qnkeys < users.maxkeys,
                 f"uid {uid}: {users.qnkeys}/{users.maxkeys} keys, "
                 f"{users.qnbytes}/{users.maxbytes} bytes",
                 "each worker needs max_unacked + 1 keys; a full quota stalls handoffs")


def _check_pidfd() -> Check:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pidfd = peer.open_peer_pidfd(a)
    finally:
        a.close()
        b.close()
    if pidfd is None:
        return Check("SO_PEERPIDFD", False, "not supported by this kernel",
                     "sender liveness falls back to pid + uid checks")
    os.close(pidfd)
    return Check("SO_PEERPIDFD", True, "supported", "senders are identified by pidfd")


def _check_ktls() -> Check:
    """Try the kernel's TLS ULP on real loopback connections: every TLS 1.3 suite both
    ways, and a second key (rekey); say what ``[tls] ktls`` does with that."""
    support = ktls.probe()
    if not support.ulp:
        return Check("kTLS", False, f"no kernel TLS: {support.detail}",
                     "TLS sessions are continued in userspace by the worker (docs/TLS.md)")
    if not support.suites:
        return Check("kTLS", False, support.detail,
                     "TLS sessions are continued in userspace by the worker")
    if support.rekey:
        consequence = ('ktls = "auto" (the default) moves TLS sessions into the kernel; '
                       "KeyUpdate installs the new keys there")
    else:
        consequence = ('ktls = "auto" keeps TLS sessions in userspace (a KeyUpdate could '
                       'not be served in the kernel); ktls = "on" moves them, and a '
                       "KeyUpdate then ends the session with internal_error")
    return Check("kTLS", True, support.detail, consequence)


def _check_labels() -> Check:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        label = peer.read_peer_label(a)
    except GSSError as error:
        return Check("LSM labels", False, str(error), "label policies cannot be enforced")
    finally:
        a.close()
        b.close()
    try:
        with open("/sys/kernel/security/lsm") as f:
            lsms = f.read().strip()
    except OSError:
        lsms = "unknown"
    if label is None:
        return Check("LSM labels", True, f"no LSM labels sockets (active LSMs: {lsms})",
                     "policies with require_label = true refuse every sender")
    return Check("LSM labels", True, f"sockets are labelled, e.g. {label.decode(errors='replace')}",
                 "worker_labels policies are enforced by SO_PEERSEC")


def _check_nofile() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return Check("open files", soft >= 4096, f"RLIMIT_NOFILE {soft} (hard {hard})",
                 "each connection holds one fd in the acceptor until its handoff is "
                 "acknowledged; raise LimitNOFILE= for heavy load" if soft < 4096
                 else "enough for heavy load")


def _versions() -> Check:
    parts = [f"python {platform.python_version()}", f"kernel {platform.release()}"]
    for package in ("trio", "cryptography"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:  # pragma: no cover
            parts.append(f"{package} missing")
    return Check("versions", True, ", ".join(parts), "")


def _check_separation(config_path: str | None) -> Check:
    """Which uid would run what: the process plan ``serve`` makes from the config."""
    from handoffd.kernel.privileges import can_switch_users

    privileged = can_switch_users()
    if config_path is None:
        return Check("privilege separation", privileged,
                     "this process can run the acceptor and workers under their own uids"
                     if privileged else f"uid {os.getuid()} cannot switch uids",
                     "" if privileged else "serve must start as root (or with CAP_SETUID, "
                     "CAP_SETGID, CAP_KILL) to separate; give --config to check a config")
    from handoffd.config import load_config
    from handoffd.runtime.supervisor import process_plan

    try:
        plan = process_plan(load_config(config_path), privileged=privileged)
    except GSSError as error:
        return Check("privilege separation", False, f"serve would refuse to start: {error}",
                     "see docs/PRIVSEP.md")
    described = plan.describe()
    if described["insecure_same_uid"]:
        return Check("privilege separation", False,
                     f"INSECURE: workers run as {described['workers']}",
                     "a compromised worker can read the server key from the acceptor's memory")
    return Check("privilege separation", True,
                 f"acceptor uid {described['acceptor_uid']}, workers: {described['workers']}", "")


def run_doctor(*, json_output: bool = False, config: str | None = None) -> int:
    """Print the checks; exit status 0 even with warnings (the daemon still runs)."""
    checks = [_versions(), _check_keyring(), _check_quota(), _check_pidfd(), _check_labels(),
              _check_nofile(), _check_ktls(), _check_separation(config)]
    mode = "keyring" if checks[1].ok else "fallback"
    if json_output:
        print(json.dumps({"mode": mode, "checks": [asdict(c) for c in checks]}, indent=2))
        return 0
    for check in checks:
        mark = "ok  " if check.ok else "warn"
        print(f"[{mark}] {check.name}: {check.finding}")
        if check.consequence:
            print(f"       -> {check.consequence}")
    print(f"handoffd would run with key parking mode: {mode}")
    return 0
