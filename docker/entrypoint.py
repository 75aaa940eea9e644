#!/usr/bin/env python3
"""The container's entry point: make sure a server key exists, then exec handoffd.

``handoffd-entrypoint serve --config FILE`` (the image's default command) reads
``[server] key`` from FILE; if no key is there — none was mounted and this is the
first start — it runs ``handoffd keygen`` to create one (0600, plus the ``.pub``
clients pin; the fingerprint goes to the log). It then replaces itself with
``handoffd serve --config FILE`` (exec, not a child process), so handoffd's
supervisor is the container's PID 1 and receives ``docker stop``'s SIGTERM (drain)
directly.

The container starts as root, but the key belongs to the acceptor, ``[server] user``
(``handoffd``): started as root, the entrypoint looks for the key and runs keygen
*as that user* (setgroups/setgid/setuid: the SETUID and SETGID capabilities the
supervisor needs anyway), so the key is created owned by the acceptor, mode 0600,
in the volume the acceptor owns (0700). Root needs neither CAP_CHOWN nor
CAP_DAC_OVERRIDE for it (``--cap-drop ALL --cap-add SETUID --cap-add SETGID
--cap-add KILL`` is enough), and never reads the key.

Any other command (``doctor``, ``status``, ``keygen``) is passed to handoffd
unchanged. ``--dry-run`` as the first argument, or HANDOFFD_ENTRYPOINT_DRY_RUN=1,
stops before the exec and prints the command instead (used by the tests).
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

HANDOFFD = os.environ.get("HANDOFFD", "handoffd")


def _config_path(args: list[str]) -> Path | None:
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            return Path(args[index + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def _settings(config: Path) -> dict[str, object] | None:
    """The parsed config, or None when it cannot be read: ``handoffd serve`` then
    reports why."""
    try:
        return tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None


def _server(settings: dict[str, object]) -> dict[str, object]:
    server = settings.get("server", {})
    return server if isinstance(server, dict) else {}


def _key_path(config: Path, settings: dict[str, object]) -> Path | None:
    """``[server] key`` resolved like handoffd does (relative to the config file)."""
    key = _server(settings).get("key", "server.key")
    return config.parent / key if isinstance(key, str) else None


def acceptor_ids(settings: dict[str, object]) -> tuple[int, int] | None:
    """``(uid, gid)`` of ``[server] user``/``group`` like handoffd resolves them (a
    bare number with no passwd entry is its own gid), or None when unset or unknown
    (``handoffd serve`` then reports the config error)."""
    server = _server(settings)
    user, group = server.get("user"), server.get("group")
    if not isinstance(user, str):
        return None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not user.isdigit():
            return None
        uid = gid = int(user)
    if isinstance(group, str):
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            return None
    return uid, gid


def make_key(key: Path) -> None:
    """``handoffd keygen --out key`` unless ``key`` exists (run as the key's owner)."""
    if key.exists():
        return
    print(f"handoffd-entrypoint: no server key at {key}: generating one", file=sys.stderr)
    subprocess.run([HANDOFFD, "keygen", "--out", str(key)], check=True, stdout=sys.stderr)


def ensure_server_key(args: list[str]) -> None:
    """Generate the server key named by ``serve --config FILE`` if it does not exist:
    as ``[server] user`` when started as root, else as this process's own user."""
    config = _config_path(args)
    settings = _settings(config) if config is not None else None
    if config is None or settings is None:
        return
    key = _key_path(config, settings)
    if key is None:
        return
    ids = acceptor_ids(settings) if os.geteuid() == 0 else None
    if ids is None:
        make_key(key)
        return
    uid, gid = ids
    # This script again, as the acceptor: it alone can look into its 0700 volume.
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-key", str(key)],
                   check=True, user=uid, group=gid, extra_groups=[], cwd="/")


def main(argv: list[str]) -> int:
    """Entry point; ``argv`` excludes the program name."""
    if argv[:1] == ["--make-key"] and len(argv) == 2:  # internal: ensure_server_key
        try:
            make_key(Path(argv[1]))
        except subprocess.CalledProcessError as error:
            return error.returncode or 1
        return 0
    dry_run = os.environ.get("HANDOFFD_ENTRYPOINT_DRY_RUN") == "1"
    if argv[:1] == ["--dry-run"]:
        dry_run, argv = True, argv[1:]
    if argv[:1] == ["serve"]:
        try:
            ensure_server_key(argv)
        except subprocess.CalledProcessError as error:
            print(f"handoffd-entrypoint: handoffd keygen failed ({error.returncode})",
                  file=sys.stderr)
            return 1
    command = [HANDOFFD, *argv]
    if dry_run:
        print(shlex.join(command))
        return 0
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
