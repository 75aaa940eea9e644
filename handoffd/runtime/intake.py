"""The acceptor's client side: accept connections, give each a handshake slot, run
its handshake (Noise or Kerberos framed by handoffd, or TLS 1.3), export the context
and hand it to the :class:`~handoffd.runtime.dispatch.Dispatcher`.

Handshake slots (``[server] max_handshakes``, per-source shares, eviction of the most
stalled handshake, first-token and handshake timeouts) are :mod:`handoffd.core.admission`
and :mod:`handoffd.runtime.pacing`; a connection holds its slot until a worker has it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import trio

from handoffd.config import Config
from handoffd.core.admission import Admission, Slot, SourceFull, Stage, source_of
from handoffd.core.framing import FrameDecoder, FrameType, encode_error, encode_frame
from handoffd.kernel.fdreserve import CAPACITY_ERRNOS, SHED_ERRNOS, FdReserve
from handoffd.logs import ThrottledLog
from handoffd.mech import TLS, AcceptorFactory
from handoffd.mech.tls import TlsAcceptorFactory
from handoffd.minor import Minor
from handoffd.runtime.acceptor_stats import Stats
from handoffd.runtime.changes import Changes
from handoffd.runtime.dispatch import Dispatcher, Pending
from handoffd.runtime.pacing import ConnectionPace, SourceTurns
from handoffd.runtime.tls_stream import accept_tls_handshake
from handoffd.runtime.wire import PeerReportedError, accept_any_handshake, send_error
from handoffd.status import GSS_S_FAILURE, GSS_S_UNAVAILABLE, GSSError, status_name

log = logging.getLogger("handoffd.acceptor")


class Handshakes:
    """Client connections from accept() to the dispatcher.

    ``admission``: the handshake slot table (the daemon's: it resizes it at a reload
    and waits for it to empty at a drain); ``config()``, ``mechanisms()``, ``tls()``:
    the current configuration, mechanisms and TLS factory (a reload replaces them);
    ``acceptors``: how many acceptors share the listening sockets.  The daemon sets
    :attr:`fd_reserve` and :attr:`nursery` once running.  :attr:`slot_freed` is
    notified whenever a slot frees.
    """

    def __init__(self, *, admission: Admission, config: Callable[[], Config],
                 mechanisms: Callable[[], Mapping[bytes, AcceptorFactory]],
                 tls: Callable[[], TlsAcceptorFactory | None], dispatcher: Dispatcher,
                 stats: Stats, throttled: ThrottledLog, acceptors: int) -> None:
        self.admission = admission
        self._config = config
        self._mechanisms = mechanisms
        self._tls = tls
        self._dispatcher = dispatcher
        self._stats = stats
        self._throttled = throttled
        self._acceptors = acceptors
        self.slot_freed = Changes()
        self._paces: dict[Slot, tuple[ConnectionPace, trio.SocketStream]] = {}
        self._turns = SourceTurns()
        self._handoff_ids = itertools.count(1)
        self.fd_reserve: FdReserve | None = None
        self.nursery: trio.Nursery | None = None

    async def out_of_fds(self, what: str, bound: socket.socket, error: OSError) -> None:
        """accept() failed for lack of fds or memory: drop the connection at the head of
        the backlog with the reserved fd (its client sees the connection closed) rather
        than leave everyone behind it hanging, or wait if that cannot help."""
        assert self.fd_reserve is not None
        shed = error.errno in SHED_ERRNOS and self.fd_reserve.shed(bound)
        if shed:
            self._stats.shed += 1
        self._throttled.log(logging.ERROR, f"{what}:{error.errno}",
                            "%s: %s; %s", what, os.strerror(error.errno or 0),
                            "closing new connections until fds are free" if shed
                            else "waiting for capacity")
        await trio.sleep(0 if shed else 0.1)

    async def accept_loop(self, listener: trio.SocketListener, bound: socket.socket,
                           tls: bool = False) -> None:
        assert self.nursery is not None
        while True:
            while self.admission.full:
                # Every slot holds a finished handshake waiting for a worker: nothing to
                # evict.  Newcomers wait in the listen backlog until a slot frees.
                await self.slot_freed.wait()
            while self._acceptors > 1 and self._dispatcher.all_full():
                # Several acceptors take from the same backlog: while every worker of
                # this one holds max_unacked handoffs, leave the next connection to an
                # acceptor whose workers have room.
                await self._dispatcher.capacity.wait()
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno in CAPACITY_ERRNOS:
                    self._stats.accept_errors += 1
                    await self.out_of_fds("accept", bound, error)
                    continue
                raise
            except trio.ClosedResourceError:
                return  # listener closed: we are draining
            self._stats.accepted += 1
            self._admit(stream, tls)

    def _admit(self, stream: trio.SocketStream, tls: bool = False) -> None:
        """Give the connection a slot (evicting the most stalled handshake if all are
        taken), or close it at once if its source holds its share."""
        server = self._config().server
        source = source_of(_peer_host(stream), prefix_v4=server.source_prefix_v4,
                           prefix_v6=server.source_prefix_v6)
        slot, evicted = self.admission.admit(source, trio.current_time())
        if evicted is not None:
            self._stats.evicted += 1
            self._throttled.log(logging.WARNING, "evicted",
                                "every handshake slot taken: evicted a stalled handshake "
                                "from %s for a connection from %s (%s)", evicted.source,
                                source, Minor.HANDSHAKE_EVICTED.name)
            victim, victim_stream = self._paces.pop(evicted)
            victim.evict()
            # Closed now, not when its task runs: the newcomer's fd must not come on top.
            _abandon(victim_stream, GSSError(GSS_S_UNAVAILABLE, Minor.HANDSHAKE_EVICTED))
        if isinstance(slot, SourceFull):
            self._stats.refused_per_source += 1
            self._throttled.log(logging.WARNING, "per-source",
                                "refused a connection from %s: it holds %d handshake slots "
                                "([server] max_handshakes_per_source, %s)", source,
                                slot.limit, Minor.HANDSHAKE_SOURCE_LIMIT.name)
            _abandon(stream, GSSError(GSS_S_UNAVAILABLE, Minor.HANDSHAKE_SOURCE_LIMIT))
            return
        pace = ConnectionPace(self.admission, slot, self._turns,
                              first_token_timeout=server.first_token_timeout,
                              handshake_timeout=server.handshake_timeout)
        self._paces[slot] = (pace, stream)
        assert self.nursery is not None
        self.nursery.start_soon(self._serve_client, stream, pace, tls)

    def _free_slot(self, slot: Slot) -> None:
        self.admission.release(slot)
        self._paces.pop(slot, None)
        self.slot_freed.notify()

    async def _serve_client(self, stream: trio.SocketStream, pace: ConnectionPace,
                            tls: bool = False) -> None:
        """Handshake, then hand off; holds its slot until a worker has it."""
        peer = _peer_text(stream)
        slot = pace.slot
        try:
            try:
                with pace.scope:
                    if tls:
                        mech, inner, peer_name = await self._tls_handshake(stream, pace)
                    else:
                        decoder = FrameDecoder()
                        mechanism, context = await accept_any_handshake(
                            stream, self._mechanisms(), decoder, pace=pace)
                        mech, peer_name = mechanism.info.seal_id, context.peer_name
                        inner = context.export(unread=decoder.unread())
                if pace.scope.cancelled_caught:
                    raise self._handshake_cut_short(slot)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise GSSError(GSS_S_FAILURE, Minor.PEER_CLOSED) from None
            done = time.perf_counter()
            self._stats.handshakes_ok += 1
            pending = Pending(next(self._handoff_ids), stream, inner, done,
                              f"{peer} ({peer_name})", mech=mech)
        except GSSError as error:
            self._free_slot(slot)
            self._stats.handshake_failures[status_name(error.major)] += 1
            self._throttled.log(logging.INFO, f"handshake:{error.minor}",
                                "connection from %s closed: %s", peer, error)
            # A TLS client is told in TLS (OpenSSL's alert, sent by the handshake driver),
            # never with a handoffd ERROR frame it could not parse.
            answer = error.minor not in (Minor.PEER_CLOSED, Minor.HANDSHAKE_EVICTED)
            if answer and not tls and not isinstance(error, PeerReportedError):
                await send_error(stream, error)  # an ERROR is never answered with one
            await stream.aclose()
            return
        self.admission.progress(slot, Stage.WAITING_FOR_WORKER, trio.current_time())
        try:
            await self._dispatcher.dispatch(pending)
        finally:
            self._free_slot(slot)

    async def _tls_handshake(self, stream: trio.SocketStream,
                             pace: ConnectionPace) -> tuple[int, bytes, str]:
        """OpenSSL's TLS 1.3 handshake; the sealed export's mechanism, bytes and peer."""
        tls = self._tls()
        assert tls is not None
        handshake = tls.new_handshake()
        await accept_tls_handshake(stream, handshake, pace=pace)
        export = handshake.export()
        return TLS.seal_id, export.encode(), str(export.peer.get("name", "anonymous"))

    def _handshake_cut_short(self, slot: Slot) -> GSSError:
        server = self._config().server
        if slot.evicted:
            return GSSError(GSS_S_UNAVAILABLE, Minor.HANDSHAKE_EVICTED)
        if slot.stage == Stage.FIRST_TOKEN:
            self._stats.first_token_timeouts += 1
            return GSSError(GSS_S_FAILURE, Minor.FIRST_TOKEN_TIMEOUT,
                            f"{min(server.first_token_timeout, server.handshake_timeout):g}s")
        return GSSError(GSS_S_FAILURE, Minor.HANDSHAKE_TIMEOUT, f"{server.handshake_timeout:g}s")


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown peer"
    return str(address[0]) if isinstance(address, tuple) else str(address)


def _abandon(stream: trio.SocketStream, error: GSSError) -> None:
    """Close a connection now, telling the client why if its socket buffer takes the
    13-byte ERROR frame without waiting (it always does on a fresh connection)."""
    frame = encode_frame(FrameType.ERROR, encode_error(error.major, error.minor))
    with contextlib.suppress(OSError):
        os.write(stream.socket.fileno(), frame)
    stream.socket.close()


def _peer_text(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown peer"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
