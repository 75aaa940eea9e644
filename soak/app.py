"""The soak's worker application: the echo demo's handler behind a one-line pid greeting.

The greeting tells each client which worker process imported its connection, so a
connection that breaks later can be matched against the workers the soak SIGKILLed
(docs/SOAK.md, "lost or killed after import").  Everything after the greeting is
``examples.echo.app.handler`` unchanged.
"""

from __future__ import annotations

import os

from examples.echo import app as echo
from handoffd.runtime.stream import SecureStream


async def handler(stream: SecureStream) -> None:
    """Send ``b"<pid>\\n"``, then echo until the client closes."""
    await stream.send_all(f"{os.getpid()}\n".encode())
    await echo.handler(stream)
