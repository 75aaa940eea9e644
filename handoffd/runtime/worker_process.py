"""Entry point of a worker process spawned by the supervisor.

``python -m handoffd.runtime.worker_process --app module:callable``; the
channel fd, worker id, acceptor pid and key grant come in the environment
(see :mod:`handoffd.runtime.worker`).  Exit status 3 means the worker could not
start (the supervisor counts those as boot failures).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial

import trio

from handoffd.logs import setup_logging
from handoffd.runtime.app import load_app
from handoffd.runtime.worker import HandoffReceiver, serve
from handoffd.status import GSSError

EXIT_BOOT_FAILED = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a worker spawned by ``handoffd serve`` (exit 3 if it cannot boot)."""
    parser = argparse.ArgumentParser(prog="handoffd-worker")
    parser.add_argument("--app", required=True)
    parser.add_argument("--pythonpath", action="append", default=[])
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    # [policy] acceptor_labels: LSM contexts the channel and its messages must come from.
    parser.add_argument("--acceptor-label", action="append", default=[])
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format, role="worker")
    log = logging.getLogger("handoffd.worker")
    try:
        # Adopt the key grant first: nothing else runs with the acceptor's session keyring.
        receiver = HandoffReceiver.inherited(acceptor_labels=args.acceptor_label)
        handler = load_app(args.app, pythonpath=args.pythonpath)
    except GSSError as error:
        log.error("worker could not start: %s", error)
        return EXIT_BOOT_FAILED
    try:
        trio.run(partial(serve, receiver, handler, drain_timeout=args.drain_timeout))
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
