"""The operator commands against a real daemon: keygen, connect, status, doctor."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest
import trio

from handoffd import keyfiles
from handoffd.config import load_config
from handoffd.minor import Minor
from handoffd.runtime.client import connect
from handoffd.status import GSS_S_BAD_MECH, GSS_S_FAILURE, GSSError
from tests.daemon_harness import REPO, RunningDaemon, start_daemon

HANDOFFD = [sys.executable, "-m", "handoffd"]


async def handoffd(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None
                   ) -> trio.Process:
    """Run ``handoffd ARGS`` to completion; the result has stdout/stderr."""
    with trio.fail_after(30):
        result: trio.Process = await trio.run_process(
            [*HANDOFFD, *args], stdin=stdin, capture_stdout=True, capture_stderr=True,
            check=False, cwd=REPO, env={**os.environ, **(env or {})})
    return result


def _text(process: trio.Process) -> str:
    out = process.stdout or b""  # type: ignore[attr-defined]
    err = process.stderr or b""  # type: ignore[attr-defined]
    return out.decode() + err.decode()


async def test_keygen_writes_a_private_key_only_we_can_read(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    result = await handoffd("keygen", "--out", str(key))
    assert result.returncode == 0, _text(result)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pair = keyfiles.load_private_key(key)
    assert keyfiles.load_public_key(tmp_path / "client.key.pub") == pair.public_bytes
    assert pair.fingerprint in _text(result)
    again = await handoffd("keygen", "--out", str(key))
    assert again.returncode == 1, "never overwrite a key"
    # Issue 19: not "not in the handoffd key format ... File exists".
    assert again.stderr.decode() == (  # type: ignore[attr-defined]
        f"handoffd: {key} already exists; keygen never overwrites a key (remove it first or "
        "choose another --out) (KEY_FILE_EXISTS, minor 122)\n")
    assert keyfiles.load_private_key(key) == pair


async def _connect(daemon: RunningDaemon, *args: str, stdin: bytes = b"hello\n",
                   home: Path | None = None) -> trio.Process:
    env = {"HOME": str(home)} if home else None
    return await handoffd("connect", f"{daemon.host}:{daemon.port}", *args, stdin=stdin,
                          env=env)


async def test_connect_copies_stdin_and_pins_the_server_key(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=1)
    try:
        pub = str(tmp_path / "server.key.pub")
        result = await _connect(daemon, "--server-key", pub, stdin=b"hello\nworld\n")
        assert result.returncode == 0, _text(result)
        pid_line, *echo = result.stdout.decode().splitlines()  # type: ignore[attr-defined]
        assert int(pid_line) in await daemon.worker_pids()
        assert echo == ["hello", "world"]

        by_fingerprint = await _connect(daemon, "--fingerprint", daemon.fingerprint)
        assert by_fingerprint.returncode == 0, _text(by_fingerprint)

        # Pinned to another key: refused before any byte of stdin is sent.
        other = tmp_path / "other.key"
        await handoffd("keygen", "--out", str(other))
        wrong = await _connect(daemon, "--server-key", f"{other}.pub")
        assert wrong.returncode != 0
        assert "server key" in _text(wrong).lower()

        # No pin and no --tofu: refused with a hint.
        unpinned = await _connect(daemon, home=tmp_path)
        assert unpinned.returncode != 0 and "--tofu" in _text(unpinned)
        assert "does not match" not in _text(unpinned)

        # Trust on first use: remembered, then checked.
        known = tmp_path / "known_servers"
        first = await _connect(daemon, "--tofu", "--known-servers", str(known))
        assert first.returncode == 0, _text(first)
        assert daemon.fingerprint in known.read_text()
        second = await _connect(daemon, "--known-servers", str(known))
        assert second.returncode == 0, _text(second)
        server = f"{daemon.host}:{daemon.port}"
        known.write_text(f"{server} SHA256:{'A' * 43}\n")
        changed = await _connect(daemon, "--tofu", "--known-servers", str(known))
        assert changed.returncode != 0
    finally:
        assert await daemon.stop() == 0


async def test_client_keys_are_authorized_by_the_allow_list(tmp_path: Path) -> None:
    listed, unlisted = tmp_path / "alice.key", tmp_path / "mallory.key"
    for key in (listed, unlisted):
        assert (await handoffd("keygen", "--out", str(key))).returncode == 0
    alice = keyfiles.load_private_key(listed)
    (tmp_path / "clients").write_text(
        "# name the clients that may connect\n"
        + keyfiles.public_key_line(alice.public_bytes, "alice") + "\n")
    daemon = await start_daemon(tmp_path, workers=1, extra=(
        f'[server]\nallowed_clients = "{tmp_path / "clients"}"\nallow_anonymous = false'))
    try:
        ok = await _connect(daemon, "--fingerprint", daemon.fingerprint, "--key", str(listed))
        assert ok.returncode == 0, _text(ok)
        refused = await _connect(daemon, "--fingerprint", daemon.fingerprint,
                                 "--key", str(unlisted))
        assert refused.returncode != 0
        # GSS_S_UNAUTHORIZED with PEER_KEY_NOT_ALLOWED, as the acceptor reported it.
        assert "major 0x000f0000, minor 103" in _text(refused), _text(refused)
        assert "not on the allow-list" in _text(refused)
        anonymous = await _connect(daemon, "--fingerprint", daemon.fingerprint)
        assert anonymous.returncode != 0
        status = await daemon.status()
        assert sum(status["handshake_failures"].values()) >= 2
    finally:
        assert await daemon.stop() == 0


async def test_status_shows_workers_and_totals(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, workers=2)
    try:
        served = await _connect(daemon, "--fingerprint", daemon.fingerprint)
        assert served.returncode == 0
        text = await handoffd("status", "--control", str(daemon.control))
        assert text.returncode == 0, _text(text)
        for pid in await daemon.worker_pids():
            assert str(pid) in _text(text)
        as_json = await handoffd("status", "--control", str(daemon.control), "--json")
        snapshot = json.loads(as_json.stdout)  # type: ignore[attr-defined]
        assert snapshot["totals"]["acked"] >= 1
        assert snapshot["pid"] == daemon.pid
        missing = await handoffd("status", "--control", str(tmp_path / "nope.sock"))
        assert missing.returncode != 0 and "major" in _text(missing)
    finally:
        assert await daemon.stop() == 0


async def test_doctor_reports_this_host() -> None:
    result = await handoffd("doctor", "--json")
    assert result.returncode == 0, _text(result)
    report = json.loads(result.stdout)  # type: ignore[attr-defined]
    names = json.dumps(report).lower()
    for facility in ("keyring", "pidfd", "lsm"):
        assert facility in names, f"doctor says nothing about {facility}: {report}"


async def test_serve_check_validates_without_starting(tmp_path: Path) -> None:
    from tests.daemon_harness import write_config

    config = write_config(tmp_path, workers=2)
    ok = await handoffd("serve", "--config", str(config), "--check")
    assert ok.returncode == 0, _text(ok)
    assert "OK" in _text(ok) and "SHA256:" in _text(ok)
    assert not (tmp_path / "control.sock").exists(), "--check must not start the daemon"
    (tmp_path / "server.key").chmod(0o644)
    loose = await handoffd("serve", "--config", str(config), "--check")
    assert loose.returncode == 1 and "chmod 600" in _text(loose)
    (tmp_path / "server.key").chmod(0o600)
    config.write_text(config.read_text().replace("tests.apps:pid_echo", "tests.apps:nothing"))
    no_app = await handoffd("serve", "--config", str(config), "--check")
    assert no_app.returncode == 1 and "no attribute" in _text(no_app)


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_refused_connection_is_reported_as_refused_not_timed_out(tmp_path: Path
                                                                         ) -> None:
    port = _closed_port()
    result = await handoffd("connect", f"127.0.0.1:{port}", "--fingerprint", "SHA256:x")
    assert result.returncode == 1
    err = result.stderr.decode()  # type: ignore[attr-defined]
    assert "minor 609" in err and "Could not connect to the server" in err
    assert f"127.0.0.1:{port}: connection refused" in err
    assert "timed out" not in err
    # The library says the same: CONNECT_FAILED, the address, the reason.
    with pytest.raises(GSSError) as caught:
        await connect("127.0.0.1", port, server_fingerprint=None)
    assert (caught.value.major, caught.value.minor) == (GSS_S_FAILURE, Minor.CONNECT_FAILED)
    assert caught.value.detail == f"127.0.0.1:{port}: connection refused"


async def test_a_public_key_given_as_the_private_key_is_named_as_such(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    assert (await handoffd("keygen", "--out", str(key))).returncode == 0
    pub = tmp_path / "client.key.pub"
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    result = await handoffd("connect", f"127.0.0.1:{_closed_port()}", "--fingerprint",
                            "SHA256:x", "--key", str(pub))
    assert result.returncode == 1
    err = result.stderr.decode()  # type: ignore[attr-defined]
    assert f"{pub} is a public key (noise-x25519); give the private key file, probably {key}" \
        in err
    assert "minor 123" in err and "chmod" not in err


async def test_connect_without_a_pin_says_how_to_give_one(tmp_path: Path) -> None:
    known = tmp_path / "known_servers"
    result = await handoffd("connect", f"127.0.0.1:{_closed_port()}", "--known-servers",
                            str(known))
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, lines
    assert lines[0].startswith("handoffd: connect: no key pinned for 127.0.0.1:")
    assert f"none for it in {known}" in lines[0]
    for option in ("--server-key", "--fingerprint", "--tofu"):
        assert option in lines[0]
    assert lines[0].endswith("(SERVER_KEY_NOT_PINNED, minor 624)")
    assert "does not match" not in lines[0]


async def test_a_config_error_is_one_line_naming_file_section_and_key(tmp_path: Path) -> None:
    config = tmp_path / "handoffd.toml"
    config.write_text('[workers]\nkeyring = "sometimes"\n')
    result = await handoffd("serve", "--config", str(config), "--check")
    assert result.returncode == 1
    assert result.stderr.decode() == (  # type: ignore[attr-defined]
        f"handoffd: {config}: [workers] keyring: expected one of auto, keyring, fallback "
        "(CONFIG_INVALID, minor 600)\n")
    missing = await handoffd("serve", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1
    assert missing.stderr.decode() == (  # type: ignore[attr-defined]
        f"handoffd: {tmp_path / 'nope.toml'}: cannot read it: No such file or directory "
        "(CONFIG_UNREADABLE, minor 601)\n")
    # Logs keep the full status: str() of the error is unchanged.
    with pytest.raises(GSSError) as caught:
        load_config(config)
    assert str(caught.value).startswith("Unspecified GSS failure")
    assert str(caught.value).endswith(f"{config}: [workers] keyring: expected one of auto, "
                                      "keyring, fallback")


async def test_version_prints_the_version_and_exits_0() -> None:
    from importlib import metadata

    result = await handoffd("--version")
    assert result.returncode == 0, _text(result)
    assert result.stdout.decode() == (  # type: ignore[attr-defined]
        f"handoffd {metadata.version('handoffd')}\n")


async def test_an_unknown_mechanism_name_is_not_reported_as_a_token_oid() -> None:
    with pytest.raises(GSSError) as caught:
        await connect("127.0.0.1", _closed_port(), server_fingerprint=None, mech="spnego")
    assert (caught.value.major, caught.value.minor) == (GSS_S_BAD_MECH, Minor.MECHANISM_UNKNOWN)
    assert caught.value.detail == "unknown mechanism 'spnego' (known: noise, krb5)"
