"""Cost of one channel message carrying one fd: send + receive + validate + close.

Run as a file (``bench/`` is not a package here)::

    .venv/bin/python bench/channel.py [--messages 20000] [--payload 512] [--attributes]

Both ends live in one trio run in one process (one task sends, one receives), so the
figure is the syscall cost of the channel itself: sendmsg with SCM_RIGHTS,
recvmsg with MSG_CMSG_CLOEXEC, validate_tcp_stream on the received socket, and
closing the received fd.  ``--attributes`` adds SO_PASSCRED + SO_PASSPIDFD per
message (a pidfd is installed and closed each time).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handoffd.kernel.channel import Channel

HANDOFF = 1


async def measure(messages: int, payload_size: int, attributes: bool) -> float:
    """Microseconds per message (send + receive + close of the received fd)."""
    sender, receiver = Channel.pair(fd_kinds=frozenset({HANDOFF}))
    if attributes:
        receiver.enable_extended_attributes()
    payload = os.urandom(payload_size)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    with client, accepted:
        fd = accepted.fileno()

        async def send_all() -> None:
            for _ in range(messages):
                await sender.send(HANDOFF, payload, fd=fd)

        async def receive_all() -> None:
            for _ in range(messages):
                message = await receiver.receive()
                assert message.fd is not None
                os.close(message.fd)
                if message.attributes is not None and message.attributes.pidfd is not None:
                    os.close(message.attributes.pidfd)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            nursery.start_soon(receive_all)
        elapsed = time.perf_counter() - started
    await sender.aclose()
    await receiver.aclose()
    return elapsed / messages * 1e6


def main() -> None:
    """Parse arguments, run the measurement a few times and print the best and median."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--payload", type=int, default=512)
    parser.add_argument("--attributes", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    runs = sorted(
        trio.run(measure, args.messages, args.payload, args.attributes)
        for _ in range(args.repeat)
    )
    print(
        f"channel message with one fd ({args.payload}-byte payload"
        f"{', attributes on' if args.attributes else ''}): "
        f"best {runs[0]:.1f} us, median {runs[len(runs) // 2]:.1f} us "
        f"({args.messages} messages x {args.repeat} runs)"
    )


if __name__ == "__main__":
    main()
