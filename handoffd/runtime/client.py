"""The client: connect, run the handshake, get a :class:`SecureStream`.

The server is authenticated by its key's fingerprint (pinning).  Trust on
first use is opt-in: :class:`KnownServers` records the fingerprint a server
showed the first time and refuses a different one later, like ssh's
known_hosts.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import trio

from handoffd.core.context import Flags, InitiatorContext
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.framing import FrameDecoder
from handoffd.minor import Minor
from handoffd.runtime.stream import SecureStream
from handoffd.runtime.wire import initiate_handshake
from handoffd.status import GSS_S_BAD_MECH, GSS_S_FAILURE, GSS_S_UNAUTHORIZED, GSSError

DEFAULT_FLAGS = Flags.MUTUAL | Flags.REPLAY | Flags.SEQUENCE | Flags.CONF | Flags.INTEG


async def open_secure_stream(
    transport: trio.abc.Stream,
    *,
    server_fingerprint: str | None,
    static_key: StaticKeyPair | None = None,
    lifetime: float = 3600.0,
    clock: Callable[[], float] = time.time,
) -> SecureStream:
    """Run the initiator handshake over an open transport and return the secure stream.

    ``server_fingerprint`` None accepts any server key: only for trust on first
    use, where the caller checks ``stream.info["peer_fingerprint"]`` itself.
    ``static_key`` None connects anonymously (a throwaway key).
    """
    context = InitiatorContext(
        static_key=static_key,
        server_fingerprint=server_fingerprint,
        req_flags=DEFAULT_FLAGS | (Flags.ANON if static_key is None else Flags(0)),
        lifetime=lifetime,
        clock=clock,
        random=os.urandom,
    )
    decoder = FrameDecoder()
    await initiate_handshake(transport, context, decoder)
    info: dict[str, object] = {
        "peer_name": context.peer_name,
        "peer_fingerprint": context.peer_fingerprint,
        "flags": context.flags,
    }
    return SecureStream(transport, context, decoder=decoder, info=info)


async def open_krb5_stream(transport: trio.abc.Stream, *, service: str,
                           lifetime: float | None = None) -> SecureStream:
    """The Kerberos initiator handshake (``handoffd[krb5]``) over an open transport.

    ``service`` is the acceptor's host-based name, ``service@host``; the ticket
    comes from the user's credential cache (``kinit``).  Mutual authentication,
    replay and sequence detection, confidentiality and integrity are requested.
    """
    from handoffd.mech.krb5 import Krb5Initiator

    context = Krb5Initiator(service, lifetime=lifetime)
    decoder = FrameDecoder()
    await initiate_handshake(transport, context, decoder, frame_first=False)
    info: dict[str, object] = {
        "peer_name": context.peer_name,
        "peer_fingerprint": None,
        "flags": context.flags,
        "mechanism": "krb5",
    }
    return SecureStream(transport, context, decoder=decoder, info=info)


async def connect(
    host: str,
    port: int,
    *,
    server_fingerprint: str | None,
    static_key: StaticKeyPair | None = None,
    timeout: float = 10.0,
    lifetime: float = 3600.0,
    mech: str = "noise",
    service: str | None = None,
) -> SecureStream:
    """Open a TCP connection to handoffd and return an established :class:`SecureStream`.

    ``mech="krb5"`` authenticates with Kerberos to ``service`` (``service@host``;
    default ``host@<host>``) instead of Noise; ``server_fingerprint`` and
    ``static_key`` are then unused.
    """
    if mech not in ("noise", "krb5"):
        raise GSSError(GSS_S_BAD_MECH, Minor.MECHANISM_UNKNOWN,
                       f"unknown mechanism {mech!r} (known: noise, krb5)")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with trio.fail_after(timeout):
            transport = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise GSSError(GSS_S_FAILURE, Minor.CONNECT_FAILED,
                       f"{address}: timed out after {timeout:g}s") from None
    except OSError as error:
        raise GSSError(GSS_S_FAILURE, Minor.CONNECT_FAILED,
                       f"{address}: {connect_error_text(error)}") from None
    try:
        with trio.fail_after(timeout):
            if mech == "krb5":
                return await open_krb5_stream(transport, service=service or f"host@{host}",
                                              lifetime=lifetime)
            return await open_secure_stream(transport, server_fingerprint=server_fingerprint,
                                            static_key=static_key, lifetime=lifetime)
    except trio.TooSlowError:
        await transport.aclose()
        raise GSSError(GSS_S_FAILURE, Minor.HANDSHAKE_TIMEOUT, f"{host}:{port}") from None
    except (trio.BrokenResourceError, OSError):
        await transport.aclose()
        raise GSSError(GSS_S_FAILURE, Minor.PEER_CLOSED, f"{host}:{port}") from None
    except BaseException:
        await transport.aclose()
        raise


def connect_error_text(error: OSError) -> str:
    """Why a TCP connect failed, e.g. ``connection refused``.

    ``trio.open_tcp_stream`` raises an errno-less OSError ("all attempts to connect
    ... failed") caused by a group of one OSError per address tried: the reasons are
    in that group.
    """
    reasons: list[str] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        elif isinstance(exc, OSError) and (exc.errno or exc.strerror):
            # trio's strerror reads "error connecting to (...): Connection refused":
            # the errno's own text, for an errno from the kernel (not getaddrinfo's EAI_*).
            text = (os.strerror(exc.errno) if exc.errno and not isinstance(exc, socket.gaierror)
                    else str(exc.strerror))
            reason = text[:1].lower() + text[1:]
            if reason not in reasons:
                reasons.append(reason)

    collect(error)
    if not reasons and error.__cause__ is not None:
        collect(error.__cause__)
    return "; ".join(reasons) or str(error)


class KnownServers:
    """A known-servers file: one ``host:port fingerprint`` per line (trust on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lookup(self, server: str) -> str | None:
        """The fingerprint remembered for ``server`` (``host:port``), or None."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            fields = line.split()
            if len(fields) == 2 and fields[0] == server:
                return fields[1]
        return None

    def check_or_remember(self, server: str, fingerprint: str) -> bool:
        """True if newly remembered; raises if the server shows a different key."""
        known = self.lookup(server)
        if known is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(f"{server} {fingerprint}\n")
            return True
        if known != fingerprint:
            raise GSSError(GSS_S_UNAUTHORIZED, Minor.SERVER_KEY_MISMATCH,
                           f"{server} now shows {fingerprint}, {self.path} has {known}")
        return False


def default_known_servers() -> Path:
    """``$XDG_CONFIG_HOME/handoffd/known_servers`` (``~/.config`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "handoffd" / "known_servers"
