"""The echo application: what a worker runs for each handed-off connection.

``handler`` receives a :class:`handoffd.worker.SecureStream` whose context was
established by the acceptor and imported by this worker; it sends back every byte it
receives until the client closes.  ``[workers] app = "handoffd.apps.echo:handler"``.
"""

from __future__ import annotations

from handoffd.worker import SecureStream


async def handler(stream: SecureStream) -> None:
    """Echo every byte until the client's CLOSE."""
    async for data in stream:
        await stream.send_all(data)
