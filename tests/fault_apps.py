"""A worker application for fault tests: ``tests.fault_apps:pid_echo`` with pause points.

Nothing of this is in the product.  The worker process loads its application
*after* it adopted its key grant and *before* it runs ``serve``, so importing this
module can wrap the worker library's steps for the rest of the process's life:

``HANDOFFD_TEST_FAULT``
    ``before-receive`` (a handoff is queued on the channel, unread), ``before-claim``
    (received and checked, key not claimed), ``after-claim`` (key claimed and burned,
    no ACK sent), ``after-ack`` (ACK sent, no byte read from the client): the worker
    stops itself (SIGSTOP) there, so that a test can SIGKILL it at that exact point.
``HANDOFFD_TEST_FAULT_ONCE``
    a path: only the one worker that creates it (``O_EXCL``) pauses, once; it writes
    its pid there, so the test knows whom to kill.  Replacement workers run normally.
``HANDOFFD_TEST_CLOCK_FILE``
    a path holding a number of seconds added to the worker's clock (missing: 0): lets a
    test jump the worker's clock past context lifetimes without faketime.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from handoffd.core.handoff import Ack
from handoffd.kernel.parking import WorkerParking
from handoffd.runtime import worker
from tests.apps import pid_echo

__all__ = ["pid_echo"]

FAULT = os.environ.get("HANDOFFD_TEST_FAULT", "")
ONCE = os.environ.get("HANDOFFD_TEST_FAULT_ONCE", "")
CLOCK_FILE = os.environ.get("HANDOFFD_TEST_CLOCK_FILE", "")
POINTS = ("before-receive", "before-claim", "after-claim", "after-ack")


def _pause(point: str) -> None:
    """Stop this process at ``point`` if it is the configured one and nobody paused yet."""
    if point != FAULT or not ONCE:
        return
    try:
        fd = os.open(ONCE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGSTOP)


def _test_clock() -> float:
    try:
        with open(CLOCK_FILE) as file:
            offset = float(file.read() or 0)
    except FileNotFoundError:
        offset = 0.0
    return time.time() + offset


def _install() -> None:
    original_receive: Callable[..., Awaitable[Any]] = worker._receive
    original_claim = WorkerParking.claim
    original_ack = worker.HandoffReceiver._ack
    original_accept = worker.HandoffReceiver._accept_group

    async def receive(channel: Any, acceptor_process: int | None) -> Any:
        if FAULT == "before-receive":
            await trio.lowlevel.wait_readable(channel.fileno())
            _pause("before-receive")
        return await original_receive(channel, acceptor_process)

    def claim(self: WorkerParking, key_ref: bytes) -> bytes:
        _pause("before-claim")
        key = original_claim(self, key_ref)
        _pause("after-claim")
        return key

    async def ack(self: worker.HandoffReceiver, message: Ack) -> None:
        await original_ack(self, message)
        if message.major == 0:
            _pause("after-ack")

    async def accept(self: worker.HandoffReceiver, group: Any) -> Any:
        self.clock = _test_clock
        return await original_accept(self, group)

    if FAULT:
        worker._receive = receive  # type: ignore[assignment]
        WorkerParking.claim = claim  # type: ignore[method-assign]
        worker.HandoffReceiver._ack = ack  # type: ignore[method-assign]
    if CLOCK_FILE:
        worker.HandoffReceiver._accept_group = accept  # type: ignore[method-assign]


_install()
