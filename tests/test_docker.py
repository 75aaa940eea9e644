"""What of the Docker image can be checked without a Docker engine.

No engine runs in this suite (none is installed on the test machines, no
registry is reachable, and building a base image with debootstrap takes minutes; the
engine runs in ``make test-docker``, docs/DOCKER-TEST.md), so the image is checked
through its parts, each run for real where it can be:

* docker/seccomp-keyring.json is Docker's default profile plus exactly one rule
  allowing add_key, keyctl and request_key, which the default denies with EPERM;
  the checked-in script regenerates it byte for byte.
* The image's entry command (ENTRYPOINT + CMD, read from the Dockerfile) run
  directly with the real handoffd: it generates a server key on first start (as
  root: owned by the acceptor's user, 0600, even with only the SETUID/SETGID/KILL
  capabilities), keeps an existing one, and stops before serving (dry run).
* As root, that command serves for real with ``--cap-drop ALL --cap-add SETUID
  --cap-add SETGID --cap-add KILL`` reproduced by ``setpriv``: the supervisor is
  root with exactly those capabilities, the acceptor runs as ``[server] user``,
  each worker under a uid of the range, an echo client works, and the HEALTHCHECK
  command reports healthy.
* The HEALTHCHECK command is a real CLI sub-command with arguments it accepts.
* docker/handoffd.toml passes handoffd's own config validation; the Dockerfile has
  no USER (the supervisor starts as root) and the config names the image's user
  and a worker uid range; .dockerignore keeps keys, .git, .venv and caches out.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from examples.echo.demo import open_to
from handoffd.config import load_config, parse_config
from handoffd.kernel.privileges import CAP_KILL, CAP_SETGID, CAP_SETUID, effective_capabilities
from handoffd.minor import Minor
from handoffd.runtime.client import connect
from handoffd.runtime.control import query_control
from handoffd.status import GSSError
from tests.daemon_harness import _fingerprint, echo_back, owner_of, separated_uids

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
HANDOFFD = Path(sys.executable).with_name("handoffd")
KEYRING_SYSCALLS = {"add_key", "keyctl", "request_key"}
IMAGE_USER, IMAGE_UID = "handoffd", 10443
IMAGE_CAPABILITIES = ("SETUID", "SETGID", "KILL")  # docs/DEPLOY.md: --cap-add each
SETPRIV = shutil.which("setpriv")


def _dockerfile_instructions(name: str) -> list[str]:
    """The (continuation-joined) arguments of every Dockerfile instruction ``name``."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines()
            if line.split(None, 1)[:1] == [name]]


def _dockerfile_instruction(name: str) -> str:
    """The argument of the one Dockerfile instruction ``name``."""
    found = _dockerfile_instructions(name)
    assert len(found) == 1, (name, found)
    return found[0]


def _with_image_capabilities(argv: list[str]) -> list[str]:
    """``argv`` as ``docker run --cap-drop ALL --cap-add SETUID --cap-add SETGID
    --cap-add KILL`` starts it as root: those three as the bounding (and so
    effective) set, nothing inheritable or ambient."""
    assert SETPRIV is not None
    caps = ",".join(["-all", *(f"+{c.lower()}" for c in IMAGE_CAPABILITIES)])
    return [SETPRIV, f"--bounding-set={caps}", "--inh-caps=-all", "--ambient-caps=-all",
            "--", *argv]


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


@dataclass
class Container:
    """docker/handoffd.toml moved into a test directory, with ownership as in the image."""

    config: Path
    volume: Path
    acceptor_uid: int
    """``[server] user``'s uid: the image's handoffd when not root (unused then), else a
    harness uid (this host has no user handoffd)."""
    worker_uids: tuple[int, int]


@pytest.fixture
def container(tmp_path: Path) -> Container:
    """docker/handoffd.toml with its volume path moved into tmp_path. As root, also the
    user handoffd and the worker range replaced by a harness block, and the volume
    owned 0700 by that uid, as the Dockerfile makes /var/lib/handoffd."""
    text = (DOCKER / "handoffd.toml").read_text()
    assert '"/var/lib/handoffd/server.key"' in text
    config = tmp_path / "etc" / "handoffd.toml"
    config.parent.mkdir()
    volume = tmp_path / "volume"
    volume.mkdir()
    text = text.replace("/var/lib/handoffd/", f"{volume}/")
    acceptor, workers = IMAGE_UID, (80000, 80255)
    if os.geteuid() == 0:
        acceptor, workers = separated_uids()
        for old, new in ((f'user = "{IMAGE_USER}"', f'user = "{acceptor}"'),
                         ("uid_range = [80000, 80255]",
                          f"uid_range = [{workers[0]}, {workers[1]}]")):
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        open_to(tmp_path)
        os.chown(volume, acceptor, acceptor)
        os.chmod(volume, 0o700)
    config.write_text(text)
    return Container(config, volume, acceptor, workers)


def _run_entry_command(config: Path, *, env_switch: bool) -> subprocess.CompletedProcess[str]:
    """ENTRYPOINT + CMD from the Dockerfile, with the config path pointed at ``config``."""
    entrypoint = _exec_form(_dockerfile_instruction("ENTRYPOINT"))
    command = _exec_form(_dockerfile_instruction("CMD"))
    # tini is PID 1 (it reaps orphans and forwards docker stop's SIGTERM).
    assert entrypoint == ["/usr/bin/tini", "--", "handoffd-entrypoint"]
    assert "/etc/handoffd/handoffd.toml" in command
    args = [str(config) if a == "/etc/handoffd/handoffd.toml" else a for a in command]
    env = {**os.environ, "HANDOFFD": str(HANDOFFD)}
    if env_switch:
        env["HANDOFFD_ENTRYPOINT_DRY_RUN"] = "1"
    else:
        args.insert(0, "--dry-run")
    return subprocess.run([sys.executable, str(DOCKER / "entrypoint.py"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_first_start_generates_the_key_then_keeps_it(container: Container) -> None:
    """As root (the container's user): the key is made by, and belongs to, the acceptor."""
    key = container.volume / "server.key"
    first = _run_entry_command(container.config, env_switch=True)
    assert first.returncode == 0, first.stderr
    assert shlex.split(first.stdout) == [str(HANDOFFD), "serve", "--config",
                                         str(container.config)]
    assert "generating one" in first.stderr and "fingerprint" in first.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    owner = container.acceptor_uid if os.geteuid() == 0 else os.geteuid()
    assert (key.stat().st_uid, key.with_name("server.key.pub").stat().st_uid) == (owner, owner)
    generated = key.read_bytes()

    second = _run_entry_command(container.config, env_switch=False)
    assert second.returncode == 0, second.stderr
    assert "generating" not in second.stderr
    assert key.read_bytes() == generated


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                    reason="the container's root (setpriv from util-linux)")
def test_keygen_needs_no_chown_or_dac_override(container: Container) -> None:
    """With only SETUID, SETGID and KILL root can neither look into the acceptor's 0700
    volume nor chown: the entrypoint still makes the key, as the acceptor."""
    key = container.volume / "server.key"
    entry = [sys.executable, str(DOCKER / "entrypoint.py"), "--dry-run",
             *_exec_form(_dockerfile_instruction("CMD"))]
    entry = [str(container.config) if a == "/etc/handoffd/handoffd.toml" else a
             for a in entry]
    probe = subprocess.run(_with_image_capabilities(["ls", str(container.volume)]),
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr
    result = subprocess.run(_with_image_capabilities(entry), capture_output=True, text=True,
                            env={**os.environ, "HANDOFFD": str(HANDOFFD)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "fingerprint" in result.stderr
    assert (key.stat().st_uid, stat.S_IMODE(key.stat().st_mode)) == (
        container.acceptor_uid, 0o600)


def test_a_mounted_key_is_used_as_is(container: Container) -> None:
    key = container.volume / "server.key"
    key.write_bytes(b"mounted")  # the entrypoint only checks existence; serve validates
    if os.geteuid() == 0:
        os.chown(key, container.acceptor_uid, container.acceptor_uid)
    result = _run_entry_command(container.config, env_switch=True)
    assert result.returncode == 0, result.stderr
    assert key.read_bytes() == b"mounted"
    assert result.stderr == ""


async def _echo(host: str, port: int, fingerprint: str, message: bytes) -> bytes:
    stream = await connect(host, port, server_fingerprint=fingerprint)
    return await echo_back(stream, message)


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                    reason="the container's root (setpriv from util-linux)")
def test_the_entry_command_serves_separated_with_the_image_capabilities(
    container: Container,
) -> None:
    """ENTRYPOINT + CMD, exec'd as in the container (root, only SETUID/SETGID/KILL),
    with docker/handoffd.toml (volume, uids and a free loopback port moved): what
    ``docker exec ... ps`` would show, an echo, the HEALTHCHECK, and a clean stop."""
    text = container.config.read_text()
    assert text.count('listen = ["0.0.0.0:7443"]') == 1
    container.config.write_text(text.replace('listen = ["0.0.0.0:7443"]',
                                             'listen = ["127.0.0.1:0"]'))
    control = load_config(container.config).control.socket
    assert str(control) == "/run/handoffd/control.sock"
    run_dir = container.config.parent.parent / "run"
    run_dir.mkdir(mode=0o711)  # as the Dockerfile makes /run/handoffd: root's
    text = container.config.read_text().replace("/run/handoffd/", f"{run_dir}/")
    container.config.write_text(text)
    control = run_dir / "control.sock"
    entry = [sys.executable, str(DOCKER / "entrypoint.py"),
             *[str(container.config) if a == "/etc/handoffd/handoffd.toml" else a
               for a in _exec_form(_dockerfile_instruction("CMD"))]]
    env = {**os.environ, "HANDOFFD": str(HANDOFFD), "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(_with_image_capabilities(entry), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        status: dict[str, Any] = {}
        while len([w for w in status.get("workers", []) if w["state"] == "ready"]) < 4:
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
            try:
                status = trio.run(query_control, control)
            except GSSError:  # not up yet: CONTROL_UNAVAILABLE
                status = {}
        # PID 1 (here: the exec'd entrypoint) is the supervisor: root, three capabilities.
        assert owner_of(process.pid)[0] == 0
        assert effective_capabilities(process.pid) == (
            1 << CAP_SETUID | 1 << CAP_SETGID | 1 << CAP_KILL)
        assert owner_of(status["pid"])[0] == container.acceptor_uid
        assert effective_capabilities(status["pid"]) == 0
        first, last = container.worker_uids
        uids = [owner_of(w["pid"])[0] for w in status["workers"]]
        assert len(set(uids)) == 4 and all(first <= uid <= last for uid in uids)

        host, port = status["listen"][0].rsplit(":", 1)
        fingerprint = _fingerprint(container.volume / "server.key.pub")
        assert trio.run(_echo, host, int(port), fingerprint, b"container") == b"container"

        _, _, health = _dockerfile_instruction("HEALTHCHECK").partition("CMD ")
        health_argv = [str(HANDOFFD), *[str(control) if a == "/run/handoffd/control.sock"
                                        else a for a in _exec_form(health)[1:]]]
        healthy = subprocess.run(health_argv, capture_output=True, text=True, timeout=60)
        assert healthy.returncode == 0, healthy.stderr

        process.send_signal(signal.SIGTERM)  # docker stop
        assert process.wait(40) == 0, process.communicate()[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


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


def _container_config() -> Any:
    """docker/handoffd.toml as handoffd validates it (the image's user handoffd is not a
    user of this host: its uid stands in)."""
    text = (DOCKER / "handoffd.toml").read_text()
    text = text.replace(f'user = "{IMAGE_USER}"', f'user = "{IMAGE_UID}"')
    return parse_config(tomllib.loads(text), base=Path("/etc/handoffd"),
                        path=Path("/etc/handoffd/handoffd.toml"))


def test_container_config_passes_validation() -> None:
    config = _container_config()
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
    assert socket_path == str(_container_config().control.socket)
    missing = tmp_path / "control.sock"
    argv = [str(HANDOFFD), *[str(missing) if a == socket_path else a for a in argv[1:]]]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"minor {int(Minor.CONTROL_UNAVAILABLE)}" in result.stderr


def test_image_starts_the_supervisor_as_root_and_separates() -> None:
    """No USER: the container starts as root, so serve keeps a supervisor; the config
    names the image's user (uid 10443) as the acceptor and a worker range clear of it,
    of the host's usual ranges and of the systemd unit's range."""
    assert _dockerfile_instruction("FROM").startswith("python:3.11-slim")
    assert _dockerfile_instructions("USER") == []
    run = " ".join(_dockerfile_instructions("RUN"))
    assert f"useradd --system --uid {IMAGE_UID} --gid {IMAGE_USER}" in " ".join(run.split())
    raw = tomllib.loads((DOCKER / "handoffd.toml").read_text())
    assert raw["server"]["user"] == IMAGE_USER
    assert "insecure_same_uid" not in raw["workers"]
    first, last = raw["workers"]["uid_range"]
    config = _container_config()
    assert config.workers.uid_range == (first, last)
    assert not first <= IMAGE_UID <= last and config.workers.count * 2 <= last - first + 1
    reserved = [(0, 65535), (100000, 2**32 - 2), (70000, 70255)]  # docs/DEPLOY.md
    assert all(last < low or first > high for low, high in reserved)
    # The volume is the acceptor's (0700); the control socket's directory is root's.
    assert "install -d -o handoffd -g handoffd -m 0700 /var/lib/handoffd" in run
    assert "install -d -o root -g root -m 0711 /run/handoffd" in run


def test_dockerignore_keeps_keys_and_local_state_out() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".lsm", "**/__pycache__", ".mypy_cache", ".ruff_cache",
            ".pytest_cache", "**/*.key"} <= patterns
    # Nothing the Dockerfile copies is ignored.
    sources = [arg.split()[:-1] for arg in _dockerfile_instructions("COPY")]
    for source in (s for group in sources for s in group):
        assert source not in patterns and (REPO / source).exists(), source
