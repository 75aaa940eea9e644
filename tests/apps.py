"""Applications the end-to-end tests run in workers (loaded as ``tests.apps:NAME``)."""

from __future__ import annotations

import os

from handoffd.runtime.stream import SecureStream


async def pid_echo(stream: SecureStream) -> None:
    """Say which worker serves the connection, then echo: lets tests see the spread."""
    await stream.send_all(f"{os.getpid()}\n".encode())
    async for data in stream:
        await stream.send_all(data)


async def crash_on_import(stream: SecureStream) -> None:  # pragma: no cover - never loaded
    raise AssertionError("unreachable")
