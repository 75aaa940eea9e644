"""Worker app for ``bench.receive_steps``: ``bench.apps:stamp`` with every receive step timed.

Nothing of this is in the product.  The worker process loads its application after
it adopted its key grant and before it runs ``serve`` (as ``tests/fault_apps.py``
relies on), so importing this module wraps the worker library's synchronous
receive steps for the rest of the process's life.  Each wrapper reads
``time.thread_time_ns`` (this thread's CPU time: a step preempted by another
process is not charged for the wait) before and after the step.  At exit the
samples (ns) go to ``$HANDOFFD_RECEIVE_STEPS_DIR/<pid>.json``.

Wrappers are installed for what exists, so the same module times the code before
and after a change of the receive path; a step whose function is gone is absent
from the output.  Nested steps are both recorded (``import_total`` contains
``claim``, ``open_sealed``, ...; ``decode_batch`` contains its entries' ``decode``).

``Channel.receive`` is replaced by its synchronous core: wait until the channel is
readable (not timed), then ``receive_nowait`` (timed: ``recvmsg`` + parse +
attributes, as ``channel_receive``; a call that finds nothing queued, as the worker's
look for more after each message does, is ``channel_receive_empty``).  trio's own
``recvmsg`` wrapper adds one scheduler pass, a run-loop cost outside this table.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import time
import types
from collections.abc import Callable
from typing import Any

import trio

from bench.apps import stamp
from handoffd.core import handoff as _handoff
from handoffd.kernel.attrs import AttributeReceiver
from handoffd.kernel.channel import Channel
from handoffd.kernel.parking import WorkerParking
from handoffd.runtime import worker

__all__ = ["stamp"]

OUT_DIR = os.environ.get("HANDOFFD_RECEIVE_STEPS_DIR", "")
SAMPLES: dict[str, list[int]] = {}
_now = time.thread_time_ns


def _record(step: str, ns: int) -> None:
    SAMPLES.setdefault(step, []).append(ns)


def _timed(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = _now()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(step, _now() - t0)
    return wrapper


def _wrap(owner: Any, name: str, step: str) -> None:
    original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if original is None:
        return
    if isinstance(original, classmethod):
        setattr(owner, name, classmethod(_timed(step, original.__func__)))
    elif isinstance(original, staticmethod):
        setattr(owner, name, staticmethod(_timed(step, original.__func__)))
    else:
        setattr(owner, name, _timed(step, original))


def _install() -> None:
    receiver = worker.HandoffReceiver
    original_nowait = Channel.receive_nowait

    def receive_nowait(self: Channel) -> Any:
        t0 = _now()
        message = original_nowait(self)
        _record("channel_receive" if message is not None else "channel_receive_empty",
                _now() - t0)
        return message

    Channel.receive_nowait = receive_nowait  # type: ignore[method-assign]
    _wrap(Channel, "_received", "channel_parse")
    _wrap(Channel, "_parse", "header_parse")
    _wrap(AttributeReceiver, "report", "attributes")
    _wrap(worker, "_checked", "pidfd_check")
    _wrap(receiver, "_verify_sender", "sender_check")
    _wrap(_handoff.Handoff, "decode", "decode")
    _wrap(worker, "decode_handoff_batch", "decode_batch")
    _wrap(receiver, "_entries", "entries_total")
    _wrap(worker, "tcp_stream_socket", "tcp_stream_socket")
    _wrap(WorkerParking, "claim", "claim")
    _wrap(worker, "sealed_mechanism", "sealed_mechanism")
    _wrap(worker, "open_sealed", "open_sealed")
    _wrap(worker, "import_session", "import_session")
    _wrap(receiver, "_import", "import_total")
    _wrap(receiver, "_stream", "stream_total")
    _wrap(trio.socket, "from_stdlib_socket", "from_stdlib_socket")

    async def receive(self: Channel) -> Any:
        while True:
            await trio.lowlevel.wait_readable(self.fileno())
            message = self.receive_nowait()
            if message is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return message

    Channel.receive = receive  # type: ignore[method-assign]

    original_send = receiver._send
    ack_kinds = (_handoff.Kind.ACK, _handoff.Kind.ACK_BATCH)

    async def send(self: worker.HandoffReceiver, kind: Any, payload: bytes) -> None:
        if kind not in ack_kinds:
            return await original_send(self, kind, payload)
        t0 = _now()  # sends without a wait when the channel has room: no other task runs
        try:
            return await original_send(self, kind, payload)
        finally:
            _record("ack_send", _now() - t0)

    receiver._send = send  # type: ignore[method-assign]

    # trio.SocketStream is final: the worker module gets a copy of trio's namespace whose
    # SocketStream is a timed factory (trio itself, isinstance checks untouched).
    worker_trio = types.ModuleType("trio")
    worker_trio.__dict__.update(trio.__dict__)
    worker_trio.SocketStream = _timed("socket_stream", trio.SocketStream)  # type: ignore[attr-defined]
    worker.trio = worker_trio  # type: ignore[attr-defined]

    class SecureStream(worker.SecureStream):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            t0 = _now()
            super().__init__(*args, **kwargs)
            _record("secure_stream", _now() - t0)

    worker.SecureStream = SecureStream  # type: ignore[misc]


def _dump() -> None:
    if OUT_DIR:
        with open(os.path.join(OUT_DIR, f"{os.getpid()}.json"), "w") as file:
            json.dump(SAMPLES, file)


_install()
atexit.register(_dump)
