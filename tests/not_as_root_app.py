"""An app that refuses to be imported as root: ``serve --check`` must import apps under
a worker's uid (tests/test_startup_errors.py)."""

from __future__ import annotations

import os

from handoffd.worker import SecureStream

if os.geteuid() == 0:
    raise RuntimeError("application code imported as root")


async def handler(stream: SecureStream) -> None:
    async for data in stream:
        await stream.send_all(data)
