"""``python -m handoffd.runtime.acceptor_process``: the acceptor, as the supervisor runs it.

It starts under ``[server] user`` with no capabilities, makes itself undumpable
before it reads the key (no core file, no ptrace or /proc/PID/mem by processes of its
uid), takes the sockets the supervisor bound and the supervisor link from its
environment, and runs the :class:`~handoffd.runtime.daemon.Daemon` with workers
started through the supervisor.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import trio

from handoffd.config import load_config
from handoffd.kernel.privileges import die_with_parent, effective_capabilities, make_undumpable
from handoffd.logs import setup_logging
from handoffd.runtime.binding import BoundSockets
from handoffd.runtime.daemon import Daemon
from handoffd.runtime.spawner import LinkNotifier, SupervisedSpawner
from handoffd.runtime.supervisor import (
    ENV_SUPERVISOR_ACCEPTOR,
    ENV_SUPERVISOR_FD,
    ENV_SUPERVISOR_PEER_FD,
    ENV_SUPERVISOR_PID,
    ENV_WATCHDOG_USEC,
    process_plan,
)
from handoffd.runtime.supervisor_link import SupervisorLink
from handoffd.status import GSSError


def main(argv: list[str] | None = None) -> int:
    """Run the acceptor; exit 1 with one GSS status line on a start-up failure."""
    make_undumpable()  # first: nothing secret is in memory yet
    # A supervisor that dies takes the acceptor with it: an orphaned acceptor would go on
    # accepting on the inherited listeners with nobody to start or reap its workers.
    supervisor = int(os.environ.get(ENV_SUPERVISOR_PID, "0"))
    if not die_with_parent(signal.SIGKILL, supervisor):
        return 1
    parser = argparse.ArgumentParser(prog="handoffd-acceptor")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    log = logging.getLogger("handoffd.acceptor")
    try:
        config = load_config(args.config)
        index = os.environ.get(ENV_SUPERVISOR_ACCEPTOR, "0/1").partition("/")[0]
        setup_logging(config.log.level, config.log.format,
                      role="acceptor" if index == "0" else f"acceptor-{index}")
        if effective_capabilities() != 0:
            log.error("the acceptor holds capabilities (CapEff %#x): refusing to run",
                      effective_capabilities())
            return 1
        link = SupervisorLink.from_fd(int(os.environ.pop(ENV_SUPERVISOR_FD)))
        bound = BoundSockets.from_environ(os.environ)
        watchdog = os.environ.pop(ENV_WATCHDOG_USEC, None)
        index, _, count = os.environ.pop(ENV_SUPERVISOR_ACCEPTOR, "0/1").partition("/")
        peer_fd = os.environ.pop(ENV_SUPERVISOR_PEER_FD, None)
        plan = process_plan(config, privileged=True)
        daemon = Daemon(config, bound=bound, spawner=SupervisedSpawner(link),
                        notifier=LinkNotifier(link), join_session=False,
                        watchdog_period=int(watchdog) / 2e6 if watchdog else None,
                        privsep=plan.describe(), acceptor_index=int(index),
                        acceptors=int(count),
                        peer=None if peer_fd is None else int(peer_fd))
        trio.run(daemon.run)
    except GSSError as error:
        log.error("acceptor cannot run: %s (major %#010x, minor %d)", error, error.major,
                  error.minor)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
