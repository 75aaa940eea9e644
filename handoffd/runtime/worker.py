"""The worker library: receive handed-off, already-secured connections.

Any pre-forked worker process embeds this.  A worker spawned by handoffd
inherits its channel and key grant (:meth:`HandoffReceiver.inherited`); each
handoff it receives is checked and turned into a :class:`SecureStream`:

1. the sender is verified: the channel's peer (``SO_PEERCRED``) and the
   per-message sender credentials (``SCM_CREDENTIALS``, ``SCM_PIDFD``, label)
   must name the acceptor process; anything else is refused and its fd closed;
2. the key that opens the sealed token is claimed from the kernel keyring
   (and burned: a replayed token cannot be opened again);
3. the token is opened (bound to this worker and an expiry) and the context
   imported, with the bytes the acceptor had already read from the client;
4. the import is acknowledged *before* any byte is read from or written to the
   client, so a worker that dies before its ACK never used the context and the
   acceptor may safely redeliver the connection to another worker.

Typical use inside a pre-fork server's worker::

    receiver = HandoffReceiver.inherited()          # before trio.run: joins the key grant
    async def main():
        async with trio.open_nursery() as nursery:
            async for stream in receiver:            # SecureStream per connection
                nursery.start_soon(handle, stream)
    trio.run(main)

With several acceptors (the shared pool) a spawned worker also has a channel from each
other acceptor (:attr:`HandoffReceiver.guests`): :func:`serve` and
:func:`receive_streams` read them all; iterating the receiver reads its own only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import trio

from handoffd import environment
from handoffd.core.framing import FrameDecoder
from handoffd.core.handoff import (
    BATCH_KINDS,
    FD_KINDS,
    MAX_BATCH,
    Ack,
    Handoff,
    Hello,
    Kind,
    Outcome,
    Refused,
    Registered,
    SessionEnd,
    decode_handoff_batch,
    encode_ack_batch,
)
from handoffd.core.seal import open_sealed
from handoffd.core.tls_export import TlsExport
from handoffd.kernel import ktls
from handoffd.kernel.channel import Channel, Received, tcp_stream_socket
from handoffd.kernel.parking import ENV_FD, WorkerParking
from handoffd.kernel.peer import PeerIdentity, PeerPolicy, open_peer_pidfd
from handoffd.mech import TLS, Session, import_session, sealed_mechanism
from handoffd.mech import noise as _noise  # noqa: F401  # up front: see _accept_handoff
from handoffd.minor import Minor
from handoffd.runtime.ktls_stream import KernelTlsStream, KtlsMode, kernel_wanted
from handoffd.runtime.stream import SecureStream
from handoffd.runtime.tls_stream import TlsStream, session_from_export
from handoffd.status import GSS_S_FAILURE, GSS_S_UNAUTHORIZED, GSS_S_UNAVAILABLE, GSSError

log = logging.getLogger("handoffd.worker")

ENV_CHANNEL_FD = environment.CHANNEL_FD
ENV_WORKER_ID = environment.WORKER_ID
ENV_ACCEPTOR_PID = environment.ACCEPTOR_PID
ENV_GUESTS = environment.GUESTS

GUEST_DRAIN_TIMEOUT = 5.0
"""Seconds the other acceptors get to answer DRAINED once the worker's own acceptor is
gone (what they sent before it still arrives first, and is served)."""

_HANDOFF_KINDS = frozenset({Kind.HANDOFF, Kind.HANDOFF_BATCH})

Handler = Callable[[SecureStream | TlsStream], Awaitable[None]]


@dataclass(frozen=True)
class WorkerIdentity:
    """What a worker knows about itself and about who may send it handoffs."""

    worker_id: bytes
    acceptor_pid: int
    acceptor_uid: int
    acceptor_labels: frozenset[bytes] | None = None
    """LSM contexts the acceptor may have (channel peer and every message); None: any."""


@dataclass
class _Imported:
    """One handoff imported and acknowledged-to-be: what its stream is made of."""

    handoff_id: int
    sock: socket.socket
    tls: TlsExport | None
    context: Session | None = None
    unread: bytes = b""
    mechanism: str = ""


class HandoffReceiver:
    """The receiving end of one worker's handoff channel.

    Iterate it (``async for stream in receiver``) to get one
    :class:`SecureStream` per handed-off connection.  Refused handoffs are
    logged with their GSS status and never raise out of the iterator: a worker
    does not die on a peer's bytes.
    """

    def __init__(
        self,
        channel: Channel,
        parking: WorkerParking,
        identity: WorkerIdentity,
        *,
        clock: Callable[[], float] = time.time,
        ktls: KtlsMode = "auto",
    ) -> None:
        self.channel = channel
        self.ktls: KtlsMode = ktls  # [tls] ktls: TLS sessions' records in the kernel
        self.parking = parking
        self.identity = identity
        self.clock = clock
        self.refused = 0
        self.accepted = 0
        self._hello_sent = False
        self._draining = False
        self._sending = False  # a send is under way: see _send
        self._sent: trio.Event | None = None  # made by a send that has to wait for one
        self.ended: Counter[Outcome] = Counter()  # sessions ended here, by outcome
        self._policy = PeerPolicy(
            uids=frozenset({identity.acceptor_uid}), pid=identity.acceptor_pid,
            labels=identity.acceptor_labels,
        )
        # The acceptor's process as its pidfd names it (pidfs inode): a pid can be
        # recycled after the acceptor dies, a pidfd identity cannot.
        self._acceptor_process = _peer_process(channel)
        self.guests: list[HandoffReceiver] = []
        """The shared pool (``[server] acceptors`` > 1): a receiver per other acceptor of
        the set, each with its own channel, key grant and sender check; this one's
        acceptor spawned the worker.  :func:`receive_streams` serves them all."""

    @classmethod
    def inherited(cls, environ: Mapping[str, str] | None = None, *,
                  acceptor_labels: Iterable[bytes | str] | None = None,
                  ktls: KtlsMode = "auto") -> HandoffReceiver:
        """Set up a worker spawned by handoffd: adopt the key grant, open the channel.

        Call it before ``trio.run`` is fine, and it must run before the
        process reads any key: adopting joins a fresh session keyring so the
        worker stops possessing the acceptor's and its siblings' keys.
        ``ktls`` (``[tls] ktls``): whether TLS sessions move into the kernel.
        ``acceptor_labels`` (``[policy] acceptor_labels``): the LSM contexts the
        channel's creator and every message's sender must have; a non-empty set
        refuses an unlabelled one (``GSS_S_UNAUTHORIZED``, ``PEER_LABEL_*``).
        ``HANDOFFD_GUESTS`` (several acceptors): the other acceptors' channels and
        grants, each checked against its own acceptor pid, become :attr:`guests`; every
        grant is adopted before the session keyring is left.
        """
        env = os.environ if environ is None else environ
        try:
            fd = int(env[ENV_CHANNEL_FD])
            worker_id = bytes.fromhex(env[ENV_WORKER_ID])
            acceptor_pid = int(env[ENV_ACCEPTOR_PID])
        except (KeyError, ValueError):
            raise GSSError(GSS_S_UNAUTHORIZED, Minor.WORKER_NOT_REGISTERED,
                           "not started by handoffd (HANDOFFD_* environment missing)") from None
        guests = _guest_grants(env.get(ENV_GUESTS))
        parkings = WorkerParking.adopt_all([env, *(grant for _, _, grant in guests)])
        labels = _label_set(acceptor_labels)
        receivers: list[HandoffReceiver] = []
        try:
            for (channel_fd, pid), parking in zip(
                    [(fd, acceptor_pid), *((g_fd, g_pid) for g_fd, g_pid, _ in guests)],
                    parkings, strict=True):
                receivers.append(cls._on_channel(channel_fd, parking, worker_id, pid,
                                                 labels, ktls))
        except GSSError:
            for receiver in receivers:
                receiver.close()
            raise
        home = receivers[0]
        home.guests = receivers[1:]
        return home

    @classmethod
    def _on_channel(cls, fd: int, parking: WorkerParking, worker_id: bytes,
                    acceptor_pid: int, labels: frozenset[bytes] | None,
                    ktls: KtlsMode) -> HandoffReceiver:
        """A receiver on the inherited channel ``fd``, refused unless the channel's creator
        (``SO_PEERCRED``) is ``acceptor_pid``."""
        channel = Channel.from_fd(fd, fd_kinds=FD_KINDS, batch_kinds=BATCH_KINDS,
                                  validate_fd=None)
        identity = channel.peer_identity()
        receiver = cls(channel, parking,
                       WorkerIdentity(worker_id, acceptor_pid, identity.uid, labels), ktls=ktls)
        try:
            receiver._verify_channel_peer(identity)
        except GSSError:
            receiver.close()
            raise
        return receiver

    @classmethod
    async def register(cls, path: str, *, acceptor_uids: frozenset[int] | None = None,
                       acceptor_labels: Iterable[bytes | str] | None = None
                       ) -> HandoffReceiver:
        """Register an external worker (not spawned by handoffd) over the Unix socket.

        The acceptor checks this process against its ``[policy]``; this side
        checks that whoever listens on ``path`` runs as one of
        ``acceptor_uids`` and, if given, has one of ``acceptor_labels`` (LSM contexts;
        checked again on every message).  Under privilege separation (``serve`` as
        root) the listener is the acceptor, under ``[server] user``: pass that uid.
        The default, our own uid or root, fits only an acceptor that shares ours.
        Raises the acceptor's refusal as a ``GSSError``.
        """
        labels = _label_set(acceptor_labels)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel = Channel(sock, fd_kinds=FD_KINDS, batch_kinds=BATCH_KINDS, validate_fd=None)
        # Credentials must be switched on before the acceptor's first message is sent.
        channel.enable_extended_attributes(keep_pidfds=False)
        try:
            await sock.connect(path)
        except OSError as error:
            channel.close()
            raise GSSError(GSS_S_UNAVAILABLE, Minor.CONNECT_FAILED,
                           f"{path}: {error.strerror}") from None
        try:
            identity = channel.peer_identity()
            uids = acceptor_uids if acceptor_uids is not None else frozenset({os.getuid(), 0})
            PeerPolicy(uids=uids, labels=labels).check(identity)
            message = await _receive(channel, _peer_process(channel))
            if message.kind == Kind.REFUSED:
                refused = Refused.decode(message.payload)
                raise GSSError(refused.major, refused.minor,
                               "registration refused by the acceptor")
            if message.kind != Kind.REGISTERED or message.fd is None:
                _close_fd(message.fd)
                raise GSSError(GSS_S_FAILURE, Minor.REGISTRATION_REFUSED,
                               "unexpected answer to registration")
            try:
                _check_sender(message, PeerPolicy(uids=frozenset({identity.uid}),
                                                  pid=identity.pid, labels=labels))
                registered = Registered.decode(message.payload)
            except GSSError:
                os.close(message.fd)
                raise
            grant = dict(registered.grant)
            grant[ENV_FD] = str(message.fd)
            parking = WorkerParking.adopt(grant)
        except BaseException:
            channel.close()
            raise
        return cls(channel, parking,
                   WorkerIdentity(registered.worker_id, identity.pid, identity.uid, labels))

    def _verify_channel_peer(self, identity: PeerIdentity) -> None:
        # SO_PEERCRED names whoever created the socketpair: it must be the acceptor.
        self._policy.check(identity)

    async def hello(self) -> None:
        """Announce this worker to the acceptor, and to each guest's (done by the first
        iteration if not before)."""
        for receiver in (self, *self.guests):
            if not receiver._hello_sent:
                receiver.channel.enable_extended_attributes(keep_pidfds=False)
                await receiver._send(Kind.HELLO,
                                     Hello(receiver.identity.worker_id, os.getpid()).encode())
                receiver._hello_sent = True

    async def drain(self) -> None:
        """Stop taking handoffs, from every acceptor: each answers DRAINED and its
        iterator ends."""
        for receiver in (self, *self.guests):
            if not receiver._draining:
                receiver._draining = True
                try:
                    await receiver._send(Kind.DRAINING, b"")
                except GSSError as error:
                    if receiver is self:
                        raise
                    log.debug("guest acceptor %d gone: %s", receiver.identity.acceptor_pid,
                              error)

    def __aiter__(self) -> AsyncIterator[SecureStream | TlsStream]:
        return self._streams()

    async def _streams(self) -> AsyncIterator[SecureStream | TlsStream]:
        if not self._hello_sent:
            await self.hello()
        deferred: Received | None = None  # read while draining a group, handled next
        while True:
            if deferred is not None:
                message, deferred = deferred, None
            else:
                try:
                    message = await _receive(self.channel, self._acceptor_process)
                except GSSError as error:
                    if error.minor == Minor.CHANNEL_CLOSED:
                        return
                    self.refused += 1
                    log.warning("handoff message refused: %s", error)
                    continue
            if message.kind == Kind.DRAINED:
                message.close_fds()
                return
            if message.kind not in _HANDOFF_KINDS:
                message.close_fds()
                log.warning("unexpected %s message on the handoff channel ignored",
                            _kind_name(message.kind))
                continue
            # Under load more handoffs are already queued behind this one: take them now
            # (no wait) and answer them all with one ACK_BATCH.
            group = [message]
            taken = max(1, len(message.fds))  # handoffs in the group so far
            while deferred is None and taken < MAX_BATCH:
                try:
                    queued = self.channel.receive_nowait()
                except GSSError as error:
                    if error.minor != Minor.CHANNEL_CLOSED:
                        self.refused += 1
                        log.warning("handoff message refused: %s", error)
                    break
                if queued is None:
                    break
                try:
                    queued = _checked(queued, self._acceptor_process)
                except GSSError as error:
                    self.refused += 1
                    log.warning("handoff message refused: %s", error)
                    continue
                if queued.kind in _HANDOFF_KINDS:
                    group.append(queued)
                    taken += max(1, len(queued.fds))
                else:
                    deferred = queued
            for stream in await self._accept_group(group):
                yield stream

    async def _accept_group(self, group: list[Received]) -> list[SecureStream | TlsStream]:
        """Handoffs received together: each imported (or refused) on its own, then one
        ACK (or ACK_BATCH for several) before any of the connections is touched."""
        imported: list[tuple[_Imported, Received]] = []
        acks: list[Ack] = []
        for message in group:
            for handoff, fd in self._entries(message):
                session, ack = self._import(handoff, fd)
                acks.append(ack)
                if session is not None:
                    imported.append((session, message))
        # The ACK goes out before any I/O on the client socket: see the module docstring.
        if len(acks) == 1:
            await self._ack(acks[0])
        elif acks:
            try:
                await self._send(Kind.ACK_BATCH, encode_ack_batch(acks))
            except GSSError as error:
                log.warning("could not acknowledge %d handoffs: %s", len(acks), error)
        return [self._stream(session, message) for session, message in imported]

    def _entries(self, message: Received) -> list[tuple[Handoff, int]]:
        """The handoffs a HANDOFF or HANDOFF_BATCH carries, each with its fd; none (every
        fd closed, no ACK) when the sender is not the acceptor or the message is not one
        it could have sent."""
        fds = message.fds if message.kind == Kind.HANDOFF_BATCH else (message.fd,)
        try:
            self._verify_sender(message)
            if message.kind == Kind.HANDOFF_BATCH:
                handoffs = decode_handoff_batch(message.payload, len(message.fds))
            else:
                handoffs = [Handoff.decode(message.payload)]
        except GSSError as error:
            message.close_fds()
            self.refused += len(fds)
            if error.major == GSS_S_UNAUTHORIZED:
                log.warning("handoff from an unauthorized sender refused: %s", error)
            else:
                log.warning("handoff message of %d refused: %s", len(fds), error)
            return []
        return [(handoff, fd) for handoff, fd in zip(handoffs, fds, strict=True)
                if fd is not None]

    def _import(self, handoff: Handoff, fd: int) -> tuple[_Imported | None, Ack]:
        """Claim the key, open and import one handoff (no I/O): the verdict to ACK, and
        what the session needs once it is sent.  ``fd`` is owned from here on."""
        handoff_id = handoff.handoff_id
        sock: socket.socket | None = None
        try:
            # From the acceptor, so it waits for an ACK even if the fd is unusable: a
            # client that reset its connection after the handshake leaves one that is no
            # longer connected, and without an ACK the acceptor would kill this worker.
            sock = tcp_stream_socket(fd)  # owns fd from here on
            key = self.parking.claim(handoff.key_ref)
            # The mechanism the header claims picks the import; open_sealed checks the
            # claim once the tag verifies (the header is authenticated data).
            mechanism = sealed_mechanism(handoff.sealed)
            inner = open_sealed(key, handoff.sealed, worker_id=self.identity.worker_id,
                                now=self.clock(), mech=mechanism.seal_id)
            if mechanism is TLS:
                imported = _Imported(handoff_id, sock, TlsExport.decode(inner))
            else:
                # Noise's module is imported at start-up, not lazily here: an import opens
                # files, and a worker at its fd limit died of that OSError with all its
                # sessions.
                context, unread = import_session(mechanism, inner, clock=self.clock)
                imported = _Imported(handoff_id, sock, None, context, unread, mechanism.name)
        except GSSError as error:
            if sock is not None:
                sock.close()
            else:
                os.close(fd)
            self.refused += 1
            log.warning("handoff %d refused: %s", handoff_id, error)
            return None, Ack(handoff_id, error.major, error.minor)
        self.accepted += 1
        return imported, Ack(handoff_id)

    def _stream(self, imported: _Imported, message: Received) -> SecureStream | TlsStream:
        transport = trio.SocketStream(trio.socket.from_stdlib_socket(imported.sock))
        handoff_id = imported.handoff_id
        if imported.tls is not None:
            return self._tls_stream(transport, imported.tls, handoff_id, message)
        context = imported.context
        assert context is not None
        if log.isEnabledFor(logging.DEBUG):  # its arguments cost more than the disabled call
            log.debug("handoff %d imported: peer %s, flags %s, context %s", handoff_id,
                      context.peer_name, int(context.flags), context.context_id)
        decoder = FrameDecoder()
        if imported.unread:
            decoder.feed(imported.unread)
        info: dict[str, object] = {
            "peer_name": context.peer_name,
            "peer_fingerprint": context.peer_fingerprint,
            "flags": context.flags,
            "anonymous": context.anonymous,
            "handoff_id": handoff_id,
            "context_id": context.context_id,
            "mechanism": imported.mechanism,
            "sender": message.attributes,
            "worker_pid": os.getpid(),
        }
        return SecureStream(transport, context, decoder=decoder, info=info)

    def _tls_stream(self, transport: trio.SocketStream, export: TlsExport, handoff_id: int,
                    message: Received) -> TlsStream:
        """A TLS session continued here (docs/TLS.md): the app sees ``SecureStream``'s
        surface, with ALPN, SNI and the client certificate's identity in ``info``."""
        peer = export.peer
        log.debug("handoff %d imported: TLS %s, ALPN %r, SNI %r, context %s", handoff_id,
                  hex(export.suite), export.alpn.decode(errors="replace"), export.sni,
                  export.context_id.hex())
        info: dict[str, object] = {
            "peer_name": str(peer.get("name", "anonymous")),
            "peer": peer,
            "anonymous": not peer,
            "alpn": export.alpn.decode(errors="replace"),
            "sni": export.sni,
            "handoff_id": handoff_id,
            "context_id": export.context_id.hex(),
            "mechanism": TLS.name,
            "sender": message.attributes,
            "worker_pid": os.getpid(),
        }
        session = session_from_export(export)
        support = ktls.probe() if self.ktls != "off" else None
        if support is not None and kernel_wanted(self.ktls, export.suite, support):
            return KernelTlsStream(transport, session, support=support,
                                   unread=export.unread, expiry=export.expiry, info=info)
        info["ktls"] = False
        return TlsStream(transport, session, unread=export.unread, expiry=export.expiry,
                         info=info)

    def _verify_sender(self, message: Received) -> None:
        _check_sender(message, self._policy)

    async def _send(self, kind: Kind, payload: bytes) -> None:
        """One send at a time.  ACKs, DRAINING and every session's SESSION_END go out from
        tasks of their own; when the channel is full (the acceptor not reading) each would
        wait for it to drain, and a second task waiting on one trio socket raises
        BusyResourceError, which no caller expects: the worker would die with all its
        sessions.  Not a trio.Lock: that costs two scheduler passes per ACK even when no
        one else is sending; and no Event either unless someone has to wait (nearly
        always no one does: the send goes out at once)."""
        while self._sending:
            if self._sent is None:
                self._sent = trio.Event()
            await self._sent.wait()
        self._sending = True
        try:
            await self.channel.send(kind, payload)
        finally:
            self._sending = False
            sent, self._sent = self._sent, None
            if sent is not None:
                sent.set()  # every waiter wakes; the first to run sends, the others wait again

    async def _ack(self, ack: Ack) -> None:
        try:
            await self._send(Kind.ACK, ack.encode())
        except GSSError as error:
            log.warning("could not acknowledge handoff %d: %s", ack.handoff_id, error)

    async def session_ended(self, handoff_id: int, outcome: Outcome,
                            error: GSSError | None = None) -> None:
        """Tell the acceptor a session ended and how (its status and metrics count them).

        Best effort: a channel already gone (the acceptor stopped) loses the report."""
        self.ended[outcome] += 1
        report = SessionEnd(handoff_id, outcome, error.major if error else 0,
                            error.minor if error else 0)
        try:
            await self._send(Kind.SESSION_END, report.encode())
        except GSSError as failure:
            log.debug("could not report the end of session %d: %s", handoff_id, failure)

    def close(self) -> None:
        """Close the channel (and the guests'); the acceptors see this worker leave."""
        for receiver in (self, *self.guests):
            receiver.channel.close()

    @property
    def sessions_ended(self) -> Counter[Outcome]:
        """Sessions ended here by outcome, whichever acceptor handed them off."""
        total = Counter(self.ended)
        for guest in self.guests:
            total.update(guest.ended)
        return total


def _guest_grants(value: str | None) -> list[tuple[int, int, dict[str, str]]]:
    """``HANDOFFD_GUESTS`` (set by the supervisor): ``[{"channel_fd", "acceptor_pid",
    "grant"}, ...]`` as ``(fd, pid, grant)``; none when unset."""
    if not value:
        return []
    try:
        entries = json.loads(value)
        guests = [(int(e["channel_fd"]), int(e["acceptor_pid"]),
                   {str(k): str(v) for k, v in e["grant"].items()}) for e in entries]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise GSSError(GSS_S_UNAUTHORIZED, Minor.WORKER_NOT_REGISTERED,
                       f"{ENV_GUESTS} malformed") from None
    return guests


async def receive_streams(
        receiver: HandoffReceiver,
        start: Callable[[HandoffReceiver, SecureStream | TlsStream], None]) -> None:
    """``start(source, stream)`` for every stream handed off to ``receiver`` or one of
    its :attr:`~HandoffReceiver.guests` (``source``: the receiver it came through, which
    its SESSION_END goes back to), until each has ended.

    The worker belongs to its own acceptor's share: when that channel ends (drained, or
    the acceptor gone) the worker takes nothing more from the others either; they get
    DRAINING and :data:`GUEST_DRAIN_TIMEOUT` to answer.  A guest's channel ending (that
    acceptor gone) ends only its part.
    """
    async def each(source: HandoffReceiver) -> None:
        async for stream in source:
            start(source, stream)

    async with trio.open_nursery() as nursery:
        for guest in receiver.guests:
            nursery.start_soon(each, guest)
        await each(receiver)
        for guest in receiver.guests:  # the home channel said DRAINED, or closed
            with contextlib.suppress(GSSError):
                await guest.drain()
        nursery.cancel_scope.deadline = trio.current_time() + GUEST_DRAIN_TIMEOUT


def _label_set(labels: Iterable[bytes | str] | None) -> frozenset[bytes] | None:
    """Configured labels as bytes; None or empty means "no label check"."""
    if labels is None:
        return None
    encoded = frozenset(
        label.encode() if isinstance(label, str) else bytes(label) for label in labels
    )
    return encoded or None


def _peer_process(channel: Channel) -> int | None:
    """The pidfs inode of the channel peer's process; None where pidfds lack one."""
    try:
        pidfd = open_peer_pidfd(channel)
    except GSSError:
        return None
    if pidfd is None:
        return None
    try:
        return os.fstat(pidfd).st_ino
    finally:
        os.close(pidfd)


async def _receive(channel: Channel, acceptor_process: int | None) -> Received:
    """The next message, its per-message pidfd checked against the acceptor and closed.

    The sender's pidfd must name the very process that is the acceptor (not merely one
    with its pid: pids are recycled); keeping a pidfd per message would cost one fd per
    handoff for nothing, so it is closed at once.  A mismatch closes every fd the
    message carried and raises ``PEER_PID_MISMATCH``.
    """
    return _checked(await channel.receive(), acceptor_process)


def _checked(message: Received, acceptor_process: int | None) -> Received:
    """:func:`_receive`'s check of one message already received."""
    attributes = message.attributes
    if attributes is None:
        return message
    if attributes.pidfd is not None:  # a channel set to keep pidfds; ours closes them on receipt
        os.close(attributes.pidfd)
        attributes = replace(attributes, pidfd=None)
        message = replace(message, attributes=attributes)
    if acceptor_process is None:
        return message
    if attributes.process is None:
        # The kernel sends a negative errno instead of a pidfd it could not install (this
        # worker at its fd limit): fail closed rather than skip the pidfd check.
        message.close_fds()
        raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_PID_MISMATCH,
                       f"no pidfd for pid {attributes.pid} (fd limit?): cannot verify the sender")
    if attributes.process != acceptor_process:
        message.close_fds()
        raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_PID_MISMATCH,
                       f"pid {attributes.pid} is not the acceptor's process (pidfd)")
    return message


def _check_sender(message: Received, policy: PeerPolicy) -> None:
    """The per-message credentials the kernel attached must satisfy ``policy``."""
    attributes = message.attributes
    if attributes is None:
        raise GSSError(GSS_S_UNAUTHORIZED, Minor.PEER_CREDENTIALS_UNAVAILABLE,
                       "message arrived without sender credentials")
    policy.check(attributes)  # the same pid, uid, gid and (normalised) label fields


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind {kind}"


async def serve(
    receiver: HandoffReceiver,
    handler: Handler,
    *,
    drain_timeout: float = 30.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``handler(stream)`` for every handed-off connection until drained.

    SIGTERM makes the worker drain: it tells the acceptor it takes no more
    handoffs, lets running sessions finish for up to ``drain_timeout``
    seconds, then returns.  A handler's exception is logged and ends only its
    own session.
    """
    import signal

    async def run_session(source: HandoffReceiver, stream: SecureStream | TlsStream) -> None:
        info = stream.info
        handoff_id = int(info.get("handoff_id", 0))  # type: ignore[call-overload]
        name = f"session {handoff_id} ({info.get('peer_name')}, context {info.get('context_id')})"
        outcome, error = Outcome.CLOSED, None
        try:
            try:
                await handler(stream)
            except GSSError as failure:
                # The peer's bytes or the context: an ERROR frame (a TLS alert) tells the
                # client why; a CLOSE would look like a clean end.
                outcome, error = Outcome.PEER_ERROR, failure
                log.info("%s ended: %s", name, failure)
                await stream.abort(failure)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as lost:
                outcome = Outcome.PEER_ERROR
                log.info("%s ended: connection lost: %s", name, lost)
                await stream.abort(GSSError(GSS_S_FAILURE, Minor.PEER_CLOSED))
            except Exception as exc:  # the app's own failure: the client must not see success
                outcome = Outcome.APP_ERROR
                error = GSSError(GSS_S_FAILURE, Minor.APP_FAILED, type(exc).__name__)
                log.error("%s: the application raised %s: %s", name, type(exc).__name__, exc,
                          exc_info=True)
                await stream.abort(error)
            else:
                await stream.aclose()
        except trio.Cancelled:
            outcome, error = Outcome.CUT_AT_DRAIN, await abort_at_drain(stream)
            raise
        finally:
            await report_session_end(source, handoff_id, outcome, error)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as sessions:
            async def on_signal() -> None:
                async for _ in signals:
                    await receiver.drain()
                    sessions.cancel_scope.deadline = trio.current_time() + drain_timeout
                    return

            async with trio.open_nursery() as control:
                control.start_soon(on_signal)
                await receiver.hello()
                task_status.started()
                await receive_streams(receiver, lambda source, stream: sessions.start_soon(
                    run_session, source, stream))
                control.cancel_scope.cancel()
            if not receiver._draining:
                # Channel closed by the acceptor: finish what we have, bounded.
                sessions.cancel_scope.deadline = trio.current_time() + drain_timeout
    log_drained(receiver, drain_timeout)


async def abort_at_drain(stream: SecureStream | TlsStream) -> GSSError:
    """``drain_timeout`` passed with this session still open: tell the client so
    (``SESSION_DRAINED``), even while being cancelled."""
    error = GSSError(GSS_S_UNAVAILABLE, Minor.SESSION_DRAINED)
    with trio.CancelScope(shield=True):
        await stream.abort(error)
    return error


async def report_session_end(receiver: HandoffReceiver, handoff_id: int, outcome: Outcome,
                             error: GSSError | None) -> None:
    """SESSION_END to the acceptor, even while being cancelled, within a second."""
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        await receiver.session_ended(handoff_id, outcome, error)


def log_drained(receiver: HandoffReceiver, drain_timeout: float) -> None:
    """The worker's last line: its sessions by outcome (a warning if any was cut)."""
    ended = receiver.sessions_ended
    cut = ended[Outcome.CUT_AT_DRAIN]
    log.log(logging.WARNING if cut else logging.INFO,
            "drained: %d sessions served (%d closed, %d app errors, %d peer errors), %d cut "
            "at drain_timeout (%gs)", sum(ended.values()), ended[Outcome.CLOSED],
            ended[Outcome.APP_ERROR], ended[Outcome.PEER_ERROR], cut, drain_timeout)
