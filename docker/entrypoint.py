#!/usr/bin/env python3
"""The container's entry point: make sure a server key exists, then exec handoffd.

``handoffd-entrypoint serve --config FILE`` (the image's default command) reads
``[server] key`` from FILE; if no key is there — none was mounted and this is the
first start — it runs ``handoffd keygen`` to create one (0600, plus the ``.pub``
clients pin; the fingerprint goes to the log). It then replaces itself with
``handoffd serve --config FILE`` (exec, not a child process), so handoffd is the
container's PID 1 and receives ``docker stop``'s SIGTERM (drain) directly.

Any other command (``doctor``, ``status``, ``keygen``) is passed to handoffd
unchanged. ``--dry-run`` as the first argument, or HANDOFFD_ENTRYPOINT_DRY_RUN=1,
stops before the exec and prints the command instead (used by the tests).
"""

from __future__ import annotations

import os
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


def _key_path(config: Path) -> Path | None:
    """``[server] key`` resolved like handoffd does (relative to the config file), or
    None when the file cannot be read: ``handoffd serve`` then reports why."""
    try:
        settings = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    key = settings.get("server", {}).get("key", "server.key")
    return config.parent / key if isinstance(key, str) else None


def ensure_server_key(args: list[str]) -> None:
    """Generate the server key named by ``serve --config FILE`` if it does not exist."""
    config = _config_path(args)
    key = _key_path(config) if config is not None else None
    if key is None or key.exists():
        return
    print(f"handoffd-entrypoint: no server key at {key}: generating one", file=sys.stderr)
    subprocess.run([HANDOFFD, "keygen", "--out", str(key)], check=True,
                   stdout=sys.stderr)


def main(argv: list[str]) -> int:
    """Entry point; ``argv`` excludes the program name."""
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
