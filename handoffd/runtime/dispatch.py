"""The acceptor's handoffs in flight: a connection handed to a worker and not yet
acknowledged (:class:`Pending`), and one waiting in a worker's outbox to be sent
(:class:`Outgoing`).  See ``docs/HANDOFF.md`` for the rules they keep."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from handoffd.mech import NOISE
from handoffd.status import GSSError

MECH_NOISE = NOISE.seal_id


@dataclass
class Pending:
    """A connection handed to a worker and not yet acknowledged."""

    handoff_id: int
    stream: trio.SocketStream
    inner: bytes
    handshake_done: float
    peer: str
    mech: int = MECH_NOISE  # seal id of the exported context's mechanism (handoffd.mech)
    key_ref: bytes = b""
    deliveries: int = 0
    sent_at: float = 0.0  # trio.current_time() of the last delivery (the ACK watchdog's clock)
    sent: bool = False  # the kernel queued the HANDOFF: it never goes to another worker


@dataclass
class Outgoing:
    """A HANDOFF waiting in a worker's outbox; ``done`` once sent, or not (``error``)."""

    pending: Pending
    message: bytes
    done: trio.Event = field(default_factory=trio.Event)
    error: GSSError | None = None
