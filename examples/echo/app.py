"""The echo application: what a worker runs for each handed-off connection.

``handler`` receives a :class:`handoffd.runtime.stream.SecureStream` whose
context was established by the acceptor and imported by this worker; it sends
back every byte it receives until the client closes.
"""

from __future__ import annotations

from handoffd.worker import SecureStream


async def handler(stream: SecureStream) -> None:
    async for data in stream:
        await stream.send_all(data)
