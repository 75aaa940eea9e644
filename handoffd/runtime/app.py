"""Load the application a worker serves: ``module:callable``."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Sequence

from handoffd.minor import Minor
from handoffd.runtime.worker import Handler
from handoffd.status import GSS_S_FAILURE, GSSError


def load_app(spec: str, *, pythonpath: Sequence[str] = ()) -> Handler:
    """Import ``module:callable`` and check it is an ``async def handler(stream)``."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise GSSError(GSS_S_FAILURE, Minor.APP_LOAD_FAILED,
                       f"{spec!r}: expected module:callable")
    for path in reversed(pythonpath):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise GSSError(GSS_S_FAILURE, Minor.APP_LOAD_FAILED,
                       f"{spec!r}: import failed: {type(error).__name__}: {error}") from None
    target: object = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise GSSError(GSS_S_FAILURE, Minor.APP_LOAD_FAILED,
                           f"{spec!r}: {module_name} has no attribute {attribute}")
    if not inspect.iscoroutinefunction(target):
        raise GSSError(GSS_S_FAILURE, Minor.APP_LOAD_FAILED,
                       f"{spec!r}: not an async function")
    handler: Handler = target
    return handler
