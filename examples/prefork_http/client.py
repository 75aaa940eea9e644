"""Make HTTP requests to the pre-fork example over a handoffd secure channel.

    python -m examples.prefork_http.client 127.0.0.1:7443 --fingerprint SHA256:... GET /whoami
    python -m examples.prefork_http.client 127.0.0.1:7443 --server-key server.key.pub \\
        POST /echo 'hello'
"""

from __future__ import annotations

import argparse
import sys

import trio

from examples.prefork_http.http import HTTPClient
from handoffd.client import connect, fingerprint, load_public_key
from handoffd.config import parse_address
from handoffd.status import GSSError


async def request(server: str, pinned: str, method: str, target: str, body: bytes,
                  repeat: int) -> list[tuple[int, bytes]]:
    """``repeat`` keep-alive requests on one secure connection; (status, body) of each."""
    host, port = parse_address(server)
    stream = await connect(host, port, server_fingerprint=pinned)
    async with stream:
        client = HTTPClient(stream, host=server)
        return [await client.request(method, target, body) for _ in range(repeat)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP over handoffd to examples.prefork_http")
    parser.add_argument("server", help="handoffd's address, host:port")
    pin = parser.add_mutually_exclusive_group(required=True)
    pin.add_argument("--fingerprint", help="the server key's fingerprint (SHA256:...)")
    pin.add_argument("--server-key", help="the server's public key file")
    parser.add_argument("--repeat", type=int, default=1, help="requests on one connection")
    parser.add_argument("method", nargs="?", default="GET")
    parser.add_argument("target", nargs="?", default="/")
    parser.add_argument("body", nargs="?", default="")
    args = parser.parse_intermixed_args(argv)
    try:
        pinned = args.fingerprint or fingerprint(load_public_key(args.server_key))
        answers = trio.run(request, args.server, pinned, args.method, args.target,
                           args.body.encode(), args.repeat)
    except GSSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for status, body in answers:
        print(status, body.decode(errors="replace"), sep="\n", end="" if body.endswith(b"\n")
              else "\n")
    return 0 if all(status < 400 for status, _ in answers) else 1


if __name__ == "__main__":
    sys.exit(main())
