"""ThrottledLog: one line per key and interval, the rest counted and reported."""

from __future__ import annotations

import logging

import pytest

from handoffd.logs import ThrottledLog

LOGGER = "handoffd.test.throttle"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def throttled(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> ThrottledLog:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return ThrottledLog(logging.getLogger(LOGGER), interval=10.0, clock=clock)


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_first_event_is_logged_at_once(
    throttled: ThrottledLog, caplog: pytest.LogCaptureFixture
) -> None:
    throttled.log(logging.ERROR, "accept", "accept: %s", "Too many open files")
    assert lines(caplog) == [(logging.ERROR, "accept: Too many open files")]
    assert throttled.suppressed("accept") == 0


def test_events_within_the_interval_are_only_counted(
    throttled: ThrottledLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    throttled.log(logging.ERROR, "accept", "accept: %s", "EMFILE")
    for _ in range(143):
        clock.now += 0.05
        throttled.log(logging.ERROR, "accept", "accept: %s", "EMFILE")
    assert len(lines(caplog)) == 1
    assert throttled.suppressed("accept") == 143


def test_next_event_after_the_interval_carries_the_count(
    throttled: ThrottledLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    throttled.log(logging.WARNING, "busy", "busy: %d open", 8)
    clock.now += 1
    throttled.log(logging.WARNING, "busy", "busy: %d open", 9)
    clock.now += 1
    throttled.log(logging.WARNING, "busy", "busy: %d open", 10)
    clock.now += 10  # 12 s after the first line
    throttled.log(logging.WARNING, "busy", "busy: %d open", 11)
    assert lines(caplog) == [
        (logging.WARNING, "busy: 8 open"),
        (logging.WARNING, "busy: 11 open (2 more like this in the last 12s)"),
    ]
    assert throttled.suppressed("busy") == 0


def test_a_new_interval_starts_at_each_logged_line(
    throttled: ThrottledLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    throttled.log(logging.ERROR, "k", "one")
    clock.now += 10.0  # exactly the interval: a new line, nothing counted in between
    throttled.log(logging.ERROR, "k", "two")
    clock.now += 9.9  # within the second line's interval
    throttled.log(logging.ERROR, "k", "three")
    clock.now += 0.1
    throttled.log(logging.ERROR, "k", "four")
    assert [m for _, m in lines(caplog)] == [
        "one", "two", "four (1 more like this in the last 10s)"]


def test_no_suffix_when_nothing_was_suppressed(
    throttled: ThrottledLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        throttled.log(logging.INFO, "rare", "rare event")
        clock.now += 60
    assert [m for _, m in lines(caplog)] == ["rare event"] * 3


def test_keys_are_throttled_independently(
    throttled: ThrottledLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    throttled.log(logging.ERROR, "control", "control accept failed")
    throttled.log(logging.ERROR, "metrics", "metrics accept failed")
    throttled.log(logging.ERROR, "control", "control accept failed")
    assert [m for _, m in lines(caplog)] == ["control accept failed", "metrics accept failed"]
    assert throttled.suppressed("control") == 1
    assert throttled.suppressed("metrics") == 0
    assert throttled.suppressed("never seen") == 0


def test_short_elapsed_times_show_a_decimal(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    throttled = ThrottledLog(logging.getLogger(LOGGER), interval=0.5, clock=clock)
    throttled.log(logging.ERROR, "k", "x")
    clock.now += 0.25
    throttled.log(logging.ERROR, "k", "x")
    clock.now += 0.5
    throttled.log(logging.ERROR, "k", "x")
    assert [m for _, m in lines(caplog)] == ["x", "x (1 more like this in the last 0.8s)"]


def test_flush_logs_pending_counts_with_the_last_counted_text(
    throttled: ThrottledLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    throttled.log(logging.ERROR, "a", "accept: %s", "EMFILE")
    clock.now += 1
    throttled.log(logging.ERROR, "a", "accept: %s", "ENFILE")
    clock.now += 2
    throttled.log(logging.WARNING, "b", "quiet")  # logged, nothing pending
    throttled.flush()
    assert lines(caplog) == [
        (logging.ERROR, "accept: EMFILE"),
        (logging.WARNING, "quiet"),
        (logging.ERROR, "accept: ENFILE (1 more like this in the last 3.0s)"),
    ]
    assert throttled.suppressed("a") == 0
    # After a flush every key starts afresh: its next event is logged at once.
    throttled.log(logging.ERROR, "a", "again")
    assert lines(caplog)[-1] == (logging.ERROR, "again")
    throttled.flush()  # nothing pending: nothing logged
    assert len(lines(caplog)) == 4


def test_a_message_with_a_percent_sign_and_no_args_survives_the_suffix(
    throttled: ThrottledLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    throttled.log(logging.ERROR, "p", "disk 100% full")
    throttled.log(logging.ERROR, "p", "disk 100% full")
    clock.now += 11
    throttled.log(logging.ERROR, "p", "disk 100% full")
    assert [m for _, m in lines(caplog)] == [
        "disk 100% full", "disk 100% full (1 more like this in the last 11s)"]


def test_the_logger_level_still_filters(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    throttled = ThrottledLog(logging.getLogger(LOGGER), clock=clock)
    throttled.log(logging.INFO, "i", "below the level")
    assert lines(caplog) == []


def test_many_keys_are_forgotten_once_their_interval_passed(
    throttled: ThrottledLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limit = ThrottledLog._MAX_KEYS
    for i in range(limit):
        throttled.log(logging.DEBUG, f"peer {i}", "peer %d", i)
    throttled.log(logging.DEBUG, "peer 0", "peer %d", 0)  # counted, pending
    clock.now += 11
    throttled.log(logging.DEBUG, "one more", "one more")
    assert len(throttled._windows) == 1  # the expired ones went
    messages = [m for _, m in lines(caplog)]
    # ... but the pending count was not lost: it was logged as they went.
    assert "peer 0 (1 more like this in the last 11s)" in messages
    assert messages[-1] == "one more"
