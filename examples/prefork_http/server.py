"""A pre-fork HTTP/1.1 server whose workers take their connections from handoffd.

This is how an existing pre-fork server embeds handoffd's worker side: the
master forks N workers *before* any event loop starts; each worker registers
with a running ``handoffd serve`` over its registration socket
(``[workers] register_socket``), and serves every connection handed to it
with h11.  handoffd holds the server key and runs the handshakes; this server
never sees a long-term key.

    python -m examples.prefork_http.server --register /run/handoffd/register.sock --workers 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

import trio

from examples.prefork_http.http import serve_http
from handoffd.logs import setup_logging
from handoffd.status import GSSError
from handoffd.worker import HandoffReceiver, serve


async def worker_main(register: str, drain_timeout: float,
                      acceptor_uids: frozenset[int] | None) -> None:
    receiver = await HandoffReceiver.register(register, acceptor_uids=acceptor_uids)
    try:
        await serve(receiver, serve_http, drain_timeout=drain_timeout)
    finally:
        receiver.close()


def run_worker(register: str, drain_timeout: float, acceptor_uids: frozenset[int] | None) -> int:
    try:
        trio.run(worker_main, register, drain_timeout, acceptor_uids)
    except GSSError as error:
        print(f"prefork_http worker {os.getpid()}: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pre-fork HTTP/1.1 server behind handoffd")
    parser.add_argument("--register", required=True, help="handoffd's registration socket")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--acceptor-uid", type=int, action="append",
                        help="uid the acceptor runs as ([server] user; repeatable); default: "
                        "this process's uid or root")
    args = parser.parse_args(argv)
    acceptor_uids = frozenset(args.acceptor_uid) if args.acceptor_uid else None
    setup_logging("info", "text", role="http-master")

    children: dict[int, float] = {}
    stopping = False

    def spawn() -> None:
        pid = os.fork()  # before any event loop: the classic pre-fork model
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            setup_logging("info", "text", role="http-worker")
            os._exit(run_worker(args.register, args.drain_timeout, acceptor_uids))
        children[pid] = time.monotonic()

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    for _ in range(args.workers):
        spawn()
    print(f"prefork_http master {os.getpid()} with {args.workers} workers", flush=True)
    failures = 0
    while children:
        try:
            pid, _status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, time.monotonic())
        if stopping:
            continue
        failures = failures + 1 if time.monotonic() - started < 1 else 0
        if failures >= 5:
            print("prefork_http: workers keep failing; giving up", file=sys.stderr)
            on_term(signal.SIGTERM, None)
            return 1
        time.sleep(min(0.1 * 2 ** failures, 2))
        spawn()
    return 0


if __name__ == "__main__":
    sys.exit(main())
