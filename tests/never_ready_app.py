"""A worker application whose import never finishes: the worker never says HELLO."""

import time

time.sleep(3600)


async def handler(stream: object) -> None:  # pragma: no cover - never reached
    pass
