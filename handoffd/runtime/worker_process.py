"""Entry point of a worker process spawned by the supervisor.

``python -m handoffd.runtime.worker_process --app module:callable`` (or ``--asgi``,
``--wsgi`` with ``module:app``); the
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
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--app", help="module:callable, async def handler(stream)")
    which.add_argument("--asgi", help="module:app, an ASGI application (hypercorn)")
    which.add_argument("--wsgi", help="module:app, a WSGI application (hypercorn)")
    parser.add_argument("--pythonpath", action="append", default=[])
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    # [policy] acceptor_labels: LSM contexts the channel and its messages must come from.
    parser.add_argument("--acceptor-label", action="append", default=[])
    # [tls] ktls: whether TLS sessions move into the kernel (docs/TLS.md).
    parser.add_argument("--ktls", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format, role="worker")
    log = logging.getLogger("handoffd.worker")
    try:
        # Adopt the key grant first: nothing else runs with the acceptor's session keyring.
        receiver = HandoffReceiver.inherited(acceptor_labels=args.acceptor_label,
                                             ktls=args.ktls)
        if args.app is not None:
            handler = load_app(args.app, pythonpath=args.pythonpath)
            run = partial(serve, receiver, handler, drain_timeout=args.drain_timeout)
        else:
            from handoffd.runtime.web import load_web_app, serve_web

            kind = "asgi" if args.asgi is not None else "wsgi"
            web_app = load_web_app(args.asgi or args.wsgi, pythonpath=args.pythonpath)
            run = partial(serve_web, receiver, web_app, kind=kind,
                          drain_timeout=args.drain_timeout)
    except GSSError as error:
        log.error("worker could not start: %s", error)
        return EXIT_BOOT_FAILED
    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
