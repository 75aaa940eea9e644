"""``handoffd connect``: stdin to the server, the server's replies to stdout, like nc; with
``--listen ADDR``, a local forwarder for clients that cannot speak handoffd
(:mod:`handoffd.runtime.forwarder`)."""

from __future__ import annotations

import argparse
import os
import sys

import trio

from handoffd import keyfiles
from handoffd.config import parse_address
from handoffd.core.credentials import fingerprint
from handoffd.minor import Minor
from handoffd.runtime.client import KnownServers, connect, default_known_servers
from handoffd.runtime.stream import SecureStream
from handoffd.status import GSS_S_CALL_INACCESSIBLE_READ, GSS_S_NO_CRED, GSSError


def _pinned_fingerprint(args: argparse.Namespace, server: str) -> str | None:
    if args.server_key:
        return fingerprint(keyfiles.load_public_key(args.server_key))
    if args.fingerprint:
        return str(args.fingerprint)
    store = KnownServers(args.known_servers or default_known_servers())
    known = store.lookup(server)
    if known is None and not args.tofu:
        raise GSSError(GSS_S_NO_CRED, Minor.SERVER_KEY_NOT_PINNED,
                       f"connect: no key pinned for {server} (none given, none for it in "
                       f"{store.path}): give --server-key FILE.pub, --fingerprint SHA256:..., "
                       "or --tofu to remember the key the server shows first")
    return known


async def run_connect(args: argparse.Namespace) -> int:
    """``handoffd connect``: pin or learn the server key, then copy stdin/stdout."""
    try:
        host, port = parse_address(args.server)
    except GSSError as error:
        raise GSSError(GSS_S_CALL_INACCESSIBLE_READ, Minor.USAGE_INVALID,
                       f"connect: {error.detail}") from None
    server = f"{host}:{port}"
    mech = getattr(args, "mech", "noise")
    pinned: str | None = "krb5" if mech == "krb5" else _pinned_fingerprint(args, server)
    static_key = keyfiles.load_private_key(args.key) if args.key and mech != "krb5" else None

    async def open_remote() -> SecureStream:
        nonlocal pinned
        if mech == "krb5":
            # Kerberos authenticates the server by its service principal: no key to pin.
            return await connect(host, port, server_fingerprint=None, mech="krb5",
                                 service=getattr(args, "service", None), timeout=args.timeout)
        stream = await connect(host, port, server_fingerprint=pinned, static_key=static_key,
                               timeout=args.timeout)
        if pinned is None:  # trust on first use: remember, then pin for the next ones
            seen = str(stream.info["peer_fingerprint"])
            store = KnownServers(args.known_servers or default_known_servers())
            if store.check_or_remember(server, seen):
                print(f"handoffd: remembered {server} {seen} in {store.path}", file=sys.stderr)
            pinned = seen
        return stream

    if getattr(args, "listen", None):
        from handoffd.runtime.forwarder import run_forwarder

        return await run_forwarder(args.listen, server, open_remote)
    stream = await open_remote()
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))

    async def upstream() -> None:
        async for data in stdin:
            await stream.send_all(data)
        await stream.send_close()

    async with stream, stdin, stdout, trio.open_nursery() as nursery:
        nursery.start_soon(upstream)
        async for data in stream:
            await stdout.send_all(data)
        nursery.cancel_scope.cancel()
    return 0
