"""SIGHUP re-reads the configuration (and the allow-list and key it names) and rolls the
workers, against a real ``handoffd serve`` run as shipped (supervisor, acceptor and
workers under uids of their own): clients looping through the reload all succeed, a
session open across it keeps working, and a broken config changes nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from handoffd import keyfiles
from handoffd.core.credentials import StaticKeyPair
from handoffd.minor import Minor
from handoffd.status import GSSError
from tests.daemon_harness import (
    RunningDaemon,
    echo_back,
    echo_session,
    read_line,
    start_daemon,
)


async def _session_as(daemon: RunningDaemon, key: StaticKeyPair) -> None:
    stream = await daemon.connect(static_key=key)
    async with stream:
        await read_line(stream)  # the worker's pid
        assert await echo_back(stream, b"hello") == b"hello"


async def _wait_log(log: Path, text: str, count: int = 1) -> None:
    with trio.fail_after(20):
        while log.read_text().count(text) < count:
            await trio.sleep(0.05)


async def test_reload_applies_the_allow_list_without_failing_a_client(tmp_path: Path) -> None:
    alice, bob = StaticKeyPair.generate(os.urandom), StaticKeyPair.generate(os.urandom)
    clients = tmp_path / "clients"
    clients.write_text(keyfiles.public_key_line(alice.public_bytes, "alice") + "\n")
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=2, log=log, extra=(
        f'[server]\nallowed_clients = "{clients}"\nallow_anonymous = false'))
    try:
        with pytest.raises(GSSError) as refused:
            await _session_as(daemon, bob)
        assert refused.value.minor == Minor.PEER_KEY_NOT_ALLOWED
        old_workers = set(await daemon.worker_pids())
        long_lived = await daemon.connect(static_key=alice)
        served = failures = 0

        async def loop(stop: trio.Event) -> None:
            nonlocal served, failures
            while not stop.is_set():
                try:
                    await _session_as(daemon, alice)
                    served += 1
                except (GSSError, OSError, trio.BrokenResourceError) as error:
                    failures += 1
                    print("client failed:", error)

        async with long_lived:
            with trio.fail_after(60):
                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(loop, stop)
                    while served < 10:
                        await trio.sleep(0.01)
                    clients.write_text(clients.read_text() + keyfiles.public_key_line(
                        bob.public_bytes, "bob") + "\n")
                    before = served
                    os.kill(daemon.process.pid, signal.SIGHUP)
                    await _wait_log(log, "reloaded")
                    while not (set(await daemon.worker_pids()) - old_workers) or \
                            served < before + 30:
                        await trio.sleep(0.05)
                    stop.set()
            # The session opened before the reload still works (its worker drains).
            await read_line(long_lived)
            assert await echo_back(long_lived, b"still here") == b"still here"
        assert failures == 0, f"{failures} clients failed through the reload"
        await _session_as(daemon, bob)  # on the re-read allow-list now
        assert not set(await daemon.worker_pids()) & old_workers  # rolled
        text = log.read_text()
        assert "fingerprint" in text.split("reloaded")[1]  # the key was re-read too
    finally:
        assert await daemon.stop() == 0


async def test_a_broken_config_on_reload_changes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log)
    try:
        workers = await daemon.worker_pids()
        config = tmp_path / "handoffd.toml"
        config.write_text(config.read_text().replace("count = 1", "count = 'many'"))
        os.kill(daemon.process.pid, signal.SIGHUP)
        await _wait_log(log, "reload failed, nothing changed")
        assert "[workers] count: expected a number" in log.read_text().split("reload failed")[1]
        assert await daemon.worker_pids() == workers  # not rolled either
        assert await echo_session(daemon, messages=1) in workers
    finally:
        assert await daemon.stop() == 0


async def test_settings_that_need_a_restart_are_named_and_kept(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log)
    try:
        config = tmp_path / "handoffd.toml"
        text = config.read_text().replace("[server]\n", "[server]\nbacklog = 7\n"
                                          "first_token_timeout = 2.5\n", 1)
        config.write_text(text)
        os.kill(daemon.process.pid, signal.SIGHUP)
        await _wait_log(log, "reloaded")
        after = log.read_text().split("received SIGHUP")[1]
        assert "[server] backlog changed but take effect at the next restart" in after
        assert "[server] first_token_timeout" in after.split("reloaded")[1]
        await echo_session(daemon, messages=1)
    finally:
        assert await daemon.stop() == 0
