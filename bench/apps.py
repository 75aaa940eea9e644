"""Worker applications used by the benchmarks (``--app bench.apps:...``)."""

from __future__ import annotations

import struct
import time

from handoffd.runtime.stream import SecureStream

STAMP = struct.Struct("<Q")


async def stamp(stream: SecureStream) -> None:
    """Write ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, shared by all processes) raw
    on the transport the moment the worker's application holds the imported context,
    then end the session.  The benchmark reads it on the client end."""
    now = time.perf_counter_ns()
    await stream.transport.send_all(STAMP.pack(now))
