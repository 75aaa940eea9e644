"""Structured logging: ``key=value`` text or one JSON object per line.

Log lines carry GSS statuses as text, peers and ids — never key material: the
only bytes that reach a log are names, fingerprints and status texts.

A JSON line has ``ts``, ``level``, ``role``, ``pid``, ``logger`` and ``msg``, plus
``exc`` for a traceback.  A record logged with ``extra={"peer": ..., "major": ...,
"minor": ..., "minor_name": ...}`` (any of them; :func:`status_fields` builds them
from a :class:`GSSError`) also gets those as top-level keys, so a log pipeline can
filter on a peer or a status without parsing ``msg``.  Text lines ignore them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from handoffd.status import GSSError

STRUCTURED_FIELDS: Final = ("peer", "major", "minor", "minor_name")
"""``extra=`` keys the JSON format emits as top-level keys when a record has them."""


def status_fields(error: GSSError, peer: object = None) -> dict[str, object]:
    """``extra=`` for a log call about ``error``: its major, minor, minor name (and peer)."""
    from handoffd import minor

    fields: dict[str, object] = {"major": error.major, "minor": error.minor,
                                 "minor_name": minor.name(error.minor)}
    if peer is not None:
        fields["peer"] = str(peer)
    return fields


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)  # a Minor (IntEnum): its number
    if isinstance(value, float):
        return float(value)
    return str(value)  # an address tuple, a Path: never fail a log line over a type


class _JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "role": self.role,
            "pid": os.getpid(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in STRUCTURED_FIELDS:
            if key in record.__dict__:
                entry[key] = _json_value(record.__dict__[key])
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():7s} "
                f"{self.role}[{os.getpid()}] {record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "text", *, role: str = "acceptor") -> None:
    """Configure the root logger for a handoffd process (stderr; journald picks it up)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter(role) if fmt == "json" else _TextFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class ThrottledLog:
    """At most one line per key and ``interval`` seconds; the rest are counted.

    Floods (accept() failing for lack of fds, refused connections) must not turn into
    a line each: the first event of a key is logged at once, further events with that
    key within ``interval`` seconds of the last line are only counted, and the next
    event after the interval logs its own line with ``" (N more like this in the last
    Ts)"`` appended (N > 0 only).  :meth:`flush` logs what is still counted (at
    shutdown).  Not thread-safe: one trio thread uses it.  ``clock`` is injectable.
    """

    _MAX_KEYS = 1024
    """Keys remembered at most; beyond, the ones whose interval has passed are flushed
    and forgotten (a key per peer cannot grow without bound)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` at ``level`` unless ``key`` was logged less than
        ``interval`` seconds ago; then only count it."""
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window.start < self.interval:
            window.suppressed += 1
            window.last = (level, msg, args)
            return
        if window is None and len(self._windows) >= self._MAX_KEYS:
            self._forget_expired(now)
        suffix = "" if window is None else _more(window.suppressed, now - window.start)
        self._windows[key] = _Window(start=now)
        self.logger.log(level, msg + suffix, *args)

    def suppressed(self, key: str) -> int:
        """Events of ``key`` counted but not yet logged."""
        window = self._windows.get(key)
        return 0 if window is None else window.suppressed

    def flush(self) -> None:
        """Log every pending count now (with the last counted event's text) and start
        each key afresh."""
        now = self.clock()
        for key in list(self._windows):
            self._flush(key, now)
        self._windows.clear()

    def _flush(self, key: str, now: float) -> None:
        window = self._windows[key]
        if window.suppressed and window.last is not None:
            level, msg, args = window.last
            self.logger.log(level, msg + _more(window.suppressed, now - window.start), *args)
        window.suppressed = 0

    def _forget_expired(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            if now - window.start >= self.interval:
                self._flush(key, now)
                del self._windows[key]


@dataclass
class _Window:
    start: float
    suppressed: int = 0
    last: tuple[int, str, tuple[object, ...]] | None = None


def _more(count: int, elapsed: float) -> str:
    # No "%" in it: safe to append to a msg whether or not it has args.
    if not count:
        return ""
    seconds = f"{elapsed:.0f}" if elapsed >= 10 else f"{elapsed:.1f}"
    return f" ({count} more like this in the last {seconds}s)"
