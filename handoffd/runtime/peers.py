"""The acceptors of one ``[server] acceptors`` set talking about their figures.

Acceptor 0 answers ``status`` and the metrics for the whole set: it asks each other
acceptor for its snapshot over a socketpair the supervisor made (its end reaches acceptor
0 as a PEER message on the supervisor link, ``docs/PRIVSEP.md``) and merges the answers
(:func:`handoffd.runtime.acceptor_stats.merge_snapshots`).  The others answer on theirs.
An ask is ``b"status?"`` and an 8-byte tag; the answer is the tag and the report as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger("handoffd.acceptor")

_PEER_ASK = b"status?"
_PEER_MAX = 4 << 20
_PEER_TIMEOUT = 1.0


@dataclass
class _Peer:
    """Acceptor 0's socket to another acceptor of its set (status and metrics)."""

    sock: trio.socket.SocketType
    lock: trio.Lock = field(default_factory=trio.Lock)
    sequence: int = 0


class AcceptorPeers:
    """Acceptor 0's sockets to the other ``acceptors - 1`` (:meth:`add`, :meth:`gather`),
    or another acceptor's answers (:meth:`answer`)."""

    def __init__(self, acceptors: int) -> None:
        self.acceptors = acceptors
        self._peers: dict[int, _Peer] = {}

    def add(self, index: int, fd: int) -> None:
        """The supervisor's PEER: the socket to ask acceptor ``index`` for its figures
        (a replacement acceptor's replaces the dead one's)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET \
                or not 0 < index < self.acceptors:
            log.error("supervisor sent an unusable status socket for acceptor %d", index)
            sock.close()
            return
        old = self._peers.pop(index, None)
        if old is not None:
            old.sock.close()
        self._peers[index] = _Peer(trio.socket.from_stdlib_socket(sock))

    async def gather(self) -> dict[int, dict[str, Any] | None]:
        """Every other acceptor's report, asked at once, by index (None: no answer
        within a second, or no socket to it)."""
        others: dict[int, dict[str, Any] | None] = {
            index: None for index in range(1, self.acceptors)}
        if self.acceptors > 1:
            async with trio.open_nursery() as nursery:
                async def ask(index: int) -> None:
                    others[index] = await self.ask(index)

                for index in others:
                    nursery.start_soon(ask, index)
        return others

    async def ask(self, index: int) -> dict[str, Any] | None:
        """Acceptor ``index``'s report, or None."""
        peer = self._peers.get(index)
        if peer is None:
            return None
        async with peer.lock:
            peer.sequence += 1
            tag = peer.sequence.to_bytes(8, "big")
            with trio.move_on_after(_PEER_TIMEOUT):
                try:
                    await peer.sock.send(_PEER_ASK + tag)
                    while True:
                        data = await peer.sock.recv(_PEER_MAX)
                        if not data:
                            return None
                        if data[:8] == tag:  # an answer to an earlier, abandoned ask: skip
                            report: dict[str, Any] = json.loads(data[8:])
                            return report
                except (OSError, ValueError, trio.ClosedResourceError):
                    return None
        return None

    @staticmethod
    async def answer(fd: int, report: Callable[[], dict[str, Any]]) -> None:
        """Acceptor ``index`` > 0: answer acceptor 0's asks on ``fd`` with ``report()``
        (this one's snapshot and recent handoff latencies), until the socket ends or the
        operations stop."""
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        with sock:
            while True:
                try:
                    data = await sock.recv(64)
                except OSError:
                    return
                if not data:
                    return
                if len(data) != len(_PEER_ASK) + 8 or not data.startswith(_PEER_ASK):
                    continue
                with contextlib.suppress(OSError):
                    await sock.send(data[len(_PEER_ASK):] + json.dumps(report()).encode())
