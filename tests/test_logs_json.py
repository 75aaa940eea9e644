"""The JSON log format: one object per line, with peer and status as top-level keys."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from handoffd.logs import _JsonFormatter, _TextFormatter, status_fields
from handoffd.minor import Minor
from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSSError


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, logging.StreamHandler[io.StringIO]]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(_JsonFormatter("acceptor"))
    logger = logging.getLogger("handoffd.test-json")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, out, handler
    logger.removeHandler(handler)


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_extra_peer_and_status_become_top_level_keys(
        logged: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, out, _ = logged
    logger.warning("handshake from %s failed", "192.0.2.7:4242",
                   extra={"peer": "192.0.2.7:4242", "major": GSS_S_DEFECTIVE_TOKEN,
                          "minor": Minor.TOKEN_TRUNCATED, "minor_name": "TOKEN_TRUNCATED"})
    (entry,) = _lines(out)
    assert entry["msg"] == "handshake from 192.0.2.7:4242 failed"
    assert entry["peer"] == "192.0.2.7:4242"
    assert entry["major"] == GSS_S_DEFECTIVE_TOKEN == 0x90000
    assert entry["minor"] == 200 and type(entry["minor"]) is int
    assert entry["minor_name"] == "TOKEN_TRUNCATED"
    assert {"ts", "level", "role", "pid", "logger"} <= set(entry)
    assert entry["level"] == "warning" and entry["role"] == "acceptor"


def test_only_the_fields_given_appear(
        logged: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, out, _ = logged
    logger.info("plain line")
    logger.info("a peer only", extra={"peer": ("::1", 7443)})
    plain, peer_only = _lines(out)
    assert not {"peer", "major", "minor", "minor_name"} & set(plain)
    assert peer_only["peer"] == "('::1', 7443)"  # not JSON-native: its str, never a crash
    assert not {"major", "minor", "minor_name"} & set(peer_only)


def test_status_fields_of_a_gss_error(
        logged: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, out, _ = logged
    error = GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.CHANNEL_BAD_PAYLOAD, "HELLO payload")
    logger.warning("refused: %s", error, extra=status_fields(error, peer="worker 3"))
    (entry,) = _lines(out)
    assert (entry["major"], entry["minor"], entry["minor_name"], entry["peer"]) == (
        0x90000, 513, "CHANNEL_BAD_PAYLOAD", "worker 3")
    assert entry["msg"] == f"refused: {error}"
    assert "peer" not in status_fields(error)


def test_text_lines_are_unchanged_by_the_fields() -> None:
    record = logging.LogRecord("handoffd", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.peer = "192.0.2.1:1"
    assert _TextFormatter("worker").format(record).endswith(" hello you")
