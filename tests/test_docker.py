"""What of the Docker image can be checked without a Docker engine.

* docker/seccomp-keyring.json is Docker's default profile plus exactly one rule
  allowing add_key, keyctl and request_key, which the default denies with EPERM;
  the checked-in script regenerates it byte for byte.
* The image's entry command (ENTRYPOINT + CMD, read from the Dockerfile) run
  directly with the real handoffd: it generates a server key on first start,
  keeps an existing one, and stops before serving (dry run).
* The HEALTHCHECK command is a real CLI sub-command with arguments it accepts.
* docker/handoffd.toml passes handoffd's own config validation.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from handoffd.config import load_config
from handoffd.minor import Minor

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
HANDOFFD = Path(sys.executable).with_name("handoffd")
KEYRING_SYSCALLS = {"add_key", "keyctl", "request_key"}


def _dockerfile_instruction(name: str) -> str:
    """The (continuation-joined) argument of the one Dockerfile instruction ``name``."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    found = [line.split(None, 1)[1] for line in text.splitlines()
             if line.split(None, 1)[:1] == [name]]
    assert len(found) == 1, (name, found)
    return found[0]


def _exec_form(argument: str) -> list[str]:
    value = json.loads(argument)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


# --------------------------------------------------------------------------- seccomp


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DOCKER / name).read_text())
    return data


def _rule_names(rule: dict[str, Any]) -> set[str]:
    return set(rule.get("names", [])) | ({rule["name"]} if "name" in rule else set())


def test_the_default_profile_denies_the_keyring_with_eperm() -> None:
    """Why the image needs its own profile: no default rule allows the keyring calls,
    so the default action applies, an error with errno 1 (EPERM)."""
    default = _load("seccomp-default.upstream.json")
    assert default["defaultAction"] == "SCMP_ACT_ERRNO"
    assert default["defaultErrnoRet"] == 1
    assert not any(_rule_names(rule) & KEYRING_SYSCALLS for rule in default["syscalls"])


def test_profile_is_the_default_plus_exactly_the_keyring() -> None:
    default = _load("seccomp-default.upstream.json")
    ours = _load("seccomp-keyring.json")
    *upstream_rules, added = ours["syscalls"]
    assert {**ours, "syscalls": upstream_rules} == default
    assert set(added) == {"names", "action", "comment"}
    assert set(added["names"]) == KEYRING_SYSCALLS and len(added["names"]) == 3
    assert added["action"] == "SCMP_ACT_ALLOW"


def test_profile_records_its_upstream_commit() -> None:
    added = _load("seccomp-keyring.json")["syscalls"][-1]
    script = (DOCKER / "make-seccomp-profile.py").read_text()
    commits = [line.split('"')[1] for line in script.splitlines()
               if line.startswith("UPSTREAM_COMMIT = ")]
    assert len(commits) == 1 and len(commits[0]) == 40
    assert f"moby/profiles seccomp/default.json at commit {commits[0]}" in added["comment"]


def test_profile_regenerates_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, str(DOCKER / "make-seccomp-profile.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=60)
    assert out.read_bytes() == (DOCKER / "seccomp-keyring.json").read_bytes()


def test_generator_refuses_an_upstream_that_already_mentions_the_keyring(
    tmp_path: Path,
) -> None:
    default = _load("seccomp-default.upstream.json")
    default["syscalls"].append({"names": ["keyctl"], "action": "SCMP_ACT_ERRNO"})
    upstream = tmp_path / "upstream.json"
    upstream.write_text(json.dumps(default))
    result = subprocess.run(
        [sys.executable, str(DOCKER / "make-seccomp-profile.py"), "--upstream", str(upstream),
         "--out", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "review it" in result.stderr
    assert not (tmp_path / "out.json").exists()


# --------------------------------------------------------------------------- entry command


@pytest.fixture
def container_config(tmp_path: Path) -> Path:
    """docker/handoffd.toml with its volume path moved into tmp_path."""
    text = (DOCKER / "handoffd.toml").read_text()
    assert '"/var/lib/handoffd/server.key"' in text
    config = tmp_path / "etc" / "handoffd.toml"
    config.parent.mkdir()
    (tmp_path / "volume").mkdir()
    config.write_text(text.replace("/var/lib/handoffd/", f"{tmp_path}/volume/"))
    return config


def _run_entry_command(config: Path, *, env_switch: bool) -> subprocess.CompletedProcess[str]:
    """ENTRYPOINT + CMD from the Dockerfile, with the config path pointed at ``config``."""
    entrypoint = _exec_form(_dockerfile_instruction("ENTRYPOINT"))
    command = _exec_form(_dockerfile_instruction("CMD"))
    assert entrypoint == ["handoffd-entrypoint"]
    assert "/etc/handoffd/handoffd.toml" in command
    args = [str(config) if a == "/etc/handoffd/handoffd.toml" else a for a in command]
    env = {**os.environ, "HANDOFFD": str(HANDOFFD)}
    if env_switch:
        env["HANDOFFD_ENTRYPOINT_DRY_RUN"] = "1"
    else:
        args.insert(0, "--dry-run")
    return subprocess.run([sys.executable, str(DOCKER / "entrypoint.py"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_first_start_generates_the_key_then_keeps_it(container_config: Path) -> None:
    pytest.importorskip("handoffd.keyfiles", reason="handoffd keygen lands with the daemon")
    key = container_config.parent.parent / "volume" / "server.key"
    first = _run_entry_command(container_config, env_switch=True)
    assert first.returncode == 0, first.stderr
    assert shlex.split(first.stdout) == [str(HANDOFFD), "serve", "--config",
                                         str(container_config)]
    assert "generating one" in first.stderr and "fingerprint" in first.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.with_name("server.key.pub").exists()
    generated = key.read_bytes()

    second = _run_entry_command(container_config, env_switch=False)
    assert second.returncode == 0, second.stderr
    assert "generating" not in second.stderr
    assert key.read_bytes() == generated


def test_a_mounted_key_is_used_as_is(container_config: Path) -> None:
    key = container_config.parent.parent / "volume" / "server.key"
    key.write_bytes(b"mounted")  # the entrypoint only checks existence; serve validates
    result = _run_entry_command(container_config, env_switch=True)
    assert result.returncode == 0, result.stderr
    assert key.read_bytes() == b"mounted"
    assert result.stderr == ""


def test_other_commands_pass_through(tmp_path: Path) -> None:
    env = {**os.environ, "HANDOFFD": str(HANDOFFD)}
    dry = subprocess.run([sys.executable, str(DOCKER / "entrypoint.py"), "--dry-run",
                          "doctor", "--json"], capture_output=True, text=True, env=env,
                         timeout=60, cwd=tmp_path)
    assert shlex.split(dry.stdout) == [str(HANDOFFD), "doctor", "--json"]
    real = subprocess.run([sys.executable, str(DOCKER / "entrypoint.py"), "display-status",
                           "0x90000"], capture_output=True, text=True, env=env, timeout=60)
    assert (real.returncode, real.stdout) == (0, "Invalid token was supplied\n")
    assert list(tmp_path.iterdir()) == []


def test_container_config_passes_validation() -> None:
    config = load_config(DOCKER / "handoffd.toml")
    assert config.workers.app == "examples.echo.app:handler"
    assert str(config.server.key) == "/var/lib/handoffd/server.key"
    volume = _exec_form(_dockerfile_instruction("VOLUME"))
    assert volume == [str(config.server.key.parent)]


# --------------------------------------------------------------------------- healthcheck


def test_healthcheck_is_a_real_cli_command(tmp_path: Path) -> None:
    """The HEALTHCHECK argv, run against a socket that is not there, fails the way a
    health check should (exit 1, CONTROL_UNAVAILABLE) rather than as a usage error (2)."""
    options, _, command = _dockerfile_instruction("HEALTHCHECK").partition("CMD ")
    assert "--interval" in options
    argv = _exec_form(command)
    assert argv[0] == "handoffd"
    socket_path = argv[argv.index("--control") + 1]
    assert socket_path == str(load_config(DOCKER / "handoffd.toml").control.socket)
    missing = tmp_path / "control.sock"
    argv = [str(HANDOFFD), *[str(missing) if a == socket_path else a for a in argv[1:]]]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"minor {int(Minor.CONTROL_UNAVAILABLE)}" in result.stderr


def test_image_runs_as_a_dedicated_user() -> None:
    assert _dockerfile_instruction("FROM").startswith("python:3.11-slim")
    assert _dockerfile_instruction("USER") == "handoffd"
