#!/usr/bin/env python3
"""``make test-docker``: the shipped Docker image, built and run with a real engine.

The repository's ``Dockerfile`` is built as README and docs/DEPLOY.md say
(``docker build .``, the classic builder) and the image is run the ways they show:
Docker's default seccomp profile (fallback key parking, logged),
``--security-opt seccomp=docker/seccomp-keyring.json`` (keyring mode) and DEPLOY.md's
``--cap-drop ALL --cap-add SETUID --cap-add SETGID --cap-add KILL``, with a volume on
``/var/lib/handoffd``.  Each run is checked from the outside: the process model
(``docker top``), an echo through ``handoffd connect`` from the host, the
HEALTHCHECK, a worker uid refused the key, ``docker stop``, the key kept by the
volume.  See docs/DOCKER-TEST.md.

Set-up, all done here: Debian's ``docker.io`` and ``debootstrap`` are installed if
missing; ``dockerd`` is started if none answers (and stopped at the end).  No image
registry is assumed: unless the Dockerfile's base image is already present (a real
one is used as is), a stand-in is built with debootstrap (Debian bookworm, python3,
pip, CA certificates) and imported under the base's name; its root file system is
cached as a tarball (``HANDOFFD_DOCKER_CACHE``, default
``~/.cache/handoffd-docker-test``: outside the checkout, because the build context
is the checkout and ``.dockerignore`` is not ours to extend).

Everything this run creates (containers, volumes, the image, the stand-in base tag)
is removed at the end unless ``HANDOFFD_DOCKER_KEEP=1``.  The last line is
``N passed, M failed``; the exit status is 0 only when M is 0 and every step ran.

Environment: HANDOFFD_DOCKER_CACHE, HANDOFFD_DOCKER_KEEP, HANDOFFD_DOCKER_TIMEOUT
(seconds for the whole suite, default 900), HANDOFFD_DOCKER_MIRROR (debootstrap's
mirror, default http://deb.debian.org/debian), HANDOFFD_DOCKER_PULL=1 (try
``docker pull`` of the real base before building a stand-in).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# Debian's client (docker.io) first: another, newer client may come first on PATH.
DOCKER = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else "docker"
DOCKERD = "/usr/sbin/dockerd"
VENV_HANDOFFD = ROOT / ".venv" / "bin" / "handoffd"
CACHE = Path(os.environ.get("HANDOFFD_DOCKER_CACHE")
             or Path.home() / ".cache" / "handoffd-docker-test")
KEEP = os.environ.get("HANDOFFD_DOCKER_KEEP") == "1"
TIMEOUT = float(os.environ.get("HANDOFFD_DOCKER_TIMEOUT", "900"))
MIRROR = os.environ.get("HANDOFFD_DOCKER_MIRROR", "http://deb.debian.org/debian")
PULL = os.environ.get("HANDOFFD_DOCKER_PULL") == "1"

SUITE = "bookworm"
INCLUDE = "python3,python3-pip,ca-certificates"
# Bump when the stand-in recipe below changes: it names the cached tarball.
RECIPE = f"v1 debootstrap --variant=minbase --include={INCLUDE} {SUITE} {MIRROR}"
STANDIN_LABEL = "io.handoffd.test.standin"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")

CONFIG = ROOT / "docker" / "handoffd.toml"
SECCOMP = "docker/seccomp-keyring.json"   # relative, as the docs write it (cwd = ROOT)
ACCEPTOR_UID = 10443
KEY = "/var/lib/handoffd/server.key"
STOP_LIMIT = 10.0        # seconds: docker stop of an idle daemon (no sessions to drain)
HEALTH_LIMIT = 75.0      # seconds: interval 30s + start period; first probe at ~30s
FALLBACK_LOG = "key parking in fallback mode"
CAP_SETGID, CAP_SETUID, CAP_KILL = 6, 7, 5
SUPERVISOR_CAPS = (1 << CAP_SETGID) | (1 << CAP_SETUID) | (1 << CAP_KILL)

RUN_ID = f"{os.getpid()}-{int(time.time())}"
IMAGE = f"handoffd-test:{RUN_ID}"
START = time.monotonic()


def say(message: str) -> None:
    print(f"test-docker: {message}", flush=True)


class Abort(Exception):
    """A set-up step failed: the checks after it cannot run."""


@dataclass
class Results:
    passed: int = 0
    failed: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {name}", flush=True)
        else:
            self.failed.append(name)
            print(f"FAIL {name}" + (f": {detail}" if detail else ""), flush=True)
        return ok


RESULTS = Results()


def remaining() -> float:
    left = TIMEOUT - (time.monotonic() - START)
    if left <= 0:
        raise Abort(f"suite time limit of {TIMEOUT:.0f}s reached (HANDOFFD_DOCKER_TIMEOUT)")
    return left


def run(args: list[str], *, timeout: float = 120, check: bool = False,
        input: str | None = None, env: dict[str, str] | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; bounded by ``timeout`` and the suite's."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, input=input,
                                timeout=min(timeout, remaining()), env=env, cwd=cwd)
    except subprocess.TimeoutExpired as error:
        raise Abort(f"timed out after {error.timeout:.0f}s: {' '.join(args)}") from None
    if check and result.returncode != 0:
        raise Abort(f"{' '.join(args)} exited {result.returncode}:\n"
                    f"{(result.stdout + result.stderr).strip()[-3000:]}")
    return result


def docker(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    return run([DOCKER, *args], env=env, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- set-up


def ensure_packages() -> None:
    missing = []
    if not os.access("/usr/bin/docker", os.X_OK) or not os.access(DOCKERD, os.X_OK):
        missing.append("docker.io")
    if shutil.which("debootstrap") is None and not os.access("/usr/sbin/debootstrap", os.X_OK):
        missing.append("debootstrap")
    if not missing:
        return
    if os.geteuid() != 0:
        raise Abort(f"not root: install Debian's {' '.join(missing)} first (apt-get install)")
    if shutil.which("apt-get") is None:
        raise Abort(f"apt-get not found: install {' '.join(missing)}")
    say(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], timeout=300, check=True, env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        timeout=600, check=True, env=env)
    global DOCKER
    DOCKER = "/usr/bin/docker"


class Daemon:
    """dockerd: the one already answering, or one started here (stopped at the end)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None

    def answering(self) -> bool:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=20).returncode == 0

    def ensure(self) -> None:
        if self.answering():
            version = docker("version", "--format", "{{.Server.Version}}").stdout.strip()
            say(f"using the running dockerd ({version})")
            return
        if os.geteuid() != 0:
            raise Abort("no dockerd answers and this is not root: start dockerd first")
        handle, name = tempfile.mkstemp(prefix="handoffd-dockerd-", suffix=".log")
        self.log = Path(name)
        say(f"starting {DOCKERD} (log: {self.log})")
        self.process = subprocess.Popen([DOCKERD], stdout=handle, stderr=handle,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        os.close(handle)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Abort(f"dockerd exited {self.process.returncode}:\n{self.tail()}")
            if self.answering():
                return
            time.sleep(0.5)
        raise Abort(f"dockerd did not answer within 60s:\n{self.tail()}")

    def tail(self) -> str:
        if self.log is None:
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        say("stopping the dockerd started here")
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.log is not None:
            self.log.unlink(missing_ok=True)


def base_image_name() -> str:
    """The Dockerfile's FROM image, as it is written."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        match = re.match(r"\s*FROM\s+(?:--platform=\S+\s+)?(\S+)", line, re.IGNORECASE)
        if match:
            return match.group(1)
    raise Abort("no FROM line in Dockerfile")


def image_labels(name: str) -> dict[str, str] | None:
    result = docker("image", "inspect", "--format", "{{json .Config.Labels}}", name)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip() or "null") or {}


def standin_identity() -> str:
    """What the stand-in is made of: the recipe and the host's CA bundle."""
    digest = hashlib.sha256(RECIPE.encode())
    digest.update(HOST_CA.read_bytes() if HOST_CA.exists() else b"")
    return digest.hexdigest()[:16]


def rootfs_tarball() -> Path:
    """The stand-in's root file system: debootstrap once, then from the cache."""
    tarball = CACHE / f"base-{SUITE}-{hashlib.sha256(RECIPE.encode()).hexdigest()[:12]}.tar.gz"
    if tarball.exists():
        say(f"base root file system from the cache: {tarball}")
        return tarball
    if os.geteuid() != 0:
        raise Abort("building the stand-in base needs root (debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="handoffd-base-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        say(f"debootstrap --variant=minbase --include={INCLUDE} {SUITE} ({MIRROR}); "
            "about a minute")
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        run([debootstrap, "--variant=minbase", f"--include={INCLUDE}", SUITE, str(rootfs),
             MIRROR], timeout=600, check=True)
        # As in the official python image: pip installs into the system, no PEP 668
        # marker; no package caches or lists.
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        for junk in ("var/cache/apt", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        partial = tarball.with_suffix(".partial")
        with open(partial, "wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                                   stdout=subprocess.PIPE)
            gzip = subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=out,
                                  timeout=min(300, remaining()))
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0 or gzip.returncode != 0:
                raise Abort("packing the base root file system failed")
        partial.rename(tarball)
    say(f"cached {tarball} ({tarball.stat().st_size // 2**20} MiB)")
    return tarball


def ensure_base(cleanup: list[list[str]]) -> None:
    """The Dockerfile's base image: a real one if present, else the local stand-in."""
    name = base_image_name()
    if "@" in name:
        raise Abort(f"the Dockerfile pins {name}: a digest cannot be given to a locally "
                    "built image, so no stand-in can substitute for it here; make a "
                    "registry reachable (HANDOFFD_DOCKER_PULL=1) or load that image first")
    identity = standin_identity()
    labels = image_labels(name)
    if labels is not None and STANDIN_LABEL not in labels:
        say(f"base {name}: the real image, already present")
        return
    if labels is None and PULL:
        say(f"docker pull {name}")
        if docker("pull", name, timeout=300).returncode == 0:
            return
        say("pull failed: building the stand-in")
    if not KEEP:
        cleanup.append(["rmi", name])
    if labels is not None and labels.get(STANDIN_LABEL) == identity:
        say(f"base {name}: the local stand-in, already imported")
        return
    tarball = rootfs_tarball()
    raw = f"handoffd-test-rootfs:{identity}"
    say(f"importing the stand-in base as {name}")
    with open(tarball, "rb") as stream:
        result = subprocess.run(
            [DOCKER, "import", "--change", 'CMD ["python3"]',
             "--change", "ENV LANG=C.UTF-8", "-", raw],
            stdin=stream, capture_output=True, text=True, timeout=min(300, remaining()))
    if result.returncode != 0:
        raise Abort(f"docker import failed: {result.stderr.strip()}")
    # The host's CA bundle, so that pip inside `docker build` reaches PyPI through
    # whatever this host's pip trusts (nothing of the host enters a build otherwise).
    with tempfile.TemporaryDirectory(prefix="handoffd-base-ctx-") as context:
        if HOST_CA.exists():
            shutil.copy(HOST_CA, Path(context) / "ca-certificates.crt")
            copy = "COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n"
        else:
            copy = ""
        (Path(context) / "Dockerfile").write_text(
            f"FROM {raw}\n{copy}LABEL {STANDIN_LABEL}={identity}\n")
        docker("build", "--force-rm", "-q", "-t", name, context, timeout=300, check=True,
               cwd=Path(context))
    docker("rmi", raw)   # untags; the layer stays as the stand-in's parent


def build_image(cleanup: list[list[str]]) -> None:
    say(f"docker build -t {IMAGE} .   (the repository's Dockerfile, classic builder)")
    began = time.monotonic()
    result = docker("build", "--force-rm", "-t", IMAGE, ".", timeout=600)
    cleanup.append(["rmi", IMAGE])
    if result.returncode != 0:
        raise Abort("docker build failed:\n" + (result.stdout + result.stderr)[-4000:])
    size = docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()
    say(f"built in {time.monotonic() - began:.0f}s, {int(size or 0) // 10**6} MB")


# ---------------------------------------------------------------- helpers for the runs


def fingerprint_of(pub_line: str) -> str:
    """``SHA256:...`` of a ``server.key.pub`` line (``noise-x25519 <base64> [comment]``),
    as handoffd.core.credentials.fingerprint computes it."""
    public = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")


def worker_settings() -> tuple[int, int, int]:
    """``count`` and ``uid_range`` from docker/handoffd.toml (the config the image runs)."""
    import tomllib

    workers = tomllib.loads(CONFIG.read_text())["workers"]
    low, high = workers["uid_range"]
    return int(workers["count"]), int(low), int(high)


# Run inside the container (python3 is in the image): every process's uids, effective
# capabilities and command line, from /proc: what `ps` would show, and CapEff too.
PROC_SNAPSHOT = r"""
import json, os
out = []
for pid in sorted(int(p) for p in os.listdir('/proc') if p.isdigit()):
    try:
        status = open(f'/proc/{pid}/status').read().splitlines()
        args = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\0')
    except OSError:
        continue
    fields = dict(line.split(':\t', 1) for line in status if ':\t' in line)
    out.append({'pid': pid, 'uids': [int(u) for u in fields['Uid'].split()],
                'cap_eff': int(fields['CapEff'], 16),
                'args': ' '.join(a.decode(errors='replace') for a in args if a)})
print(json.dumps(out))
"""

OPEN_KEY = r"""
import errno, sys
try:
    open(sys.argv[1], 'rb').close()
except OSError as error:
    print(errno.errorcode.get(error.errno, error.errno))
else:
    print('OK')
"""

STAT_KEY = r"""
import json, os, sys
print(json.dumps({p: [os.stat(p).st_uid, os.stat(p).st_gid, oct(os.stat(p).st_mode & 0o7777)]
                  for p in sys.argv[1:]}))
"""


@dataclass
class Scenario:
    name: str
    doc: str                 # where the command comes from
    options: list[str]       # docker run options besides -d/--name/-p
    mode: str                # key parking expected: "fallback" or "keyring"
    new_key: bool            # the entrypoint must generate the key (fresh volume)
    capdrop: bool            # DEPLOY.md's --cap-drop ALL --cap-add SETUID/SETGID/KILL
    health: bool = True      # wait for the HEALTHCHECK to report healthy
    extras: bool = False     # once: wrong fingerprint refused, DEPLOY's `docker exec ps`


class Container:
    def __init__(self, scenario: Scenario, cleanup: list[list[str]]) -> None:
        self.scenario = scenario
        self.name = f"handoffd-test-{RUN_ID}-{scenario.name}"
        self.cleanup = cleanup
        self.port: int | None = None
        self.started = 0.0

    def logs(self) -> str:
        result = docker("logs", self.name, timeout=30)
        return result.stdout + result.stderr

    def exec(self, *args: str, user: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return docker("exec", *(["-u", user] if user else []), self.name, *args,
                      timeout=timeout)

    def python(self, code: str, *args: str, user: str | None = None) -> str:
        result = self.exec("python3", "-c", code, *args, user=user)
        if result.returncode != 0:
            raise RuntimeError(f"docker exec python3 failed ({result.returncode}): "
                               f"{result.stderr.strip()[-500:]}")
        return result.stdout.strip()

    def start(self) -> None:
        command = ["run", "-d", "--name", self.name, "-p", "127.0.0.1::7443",
                   *self.scenario.options, IMAGE]
        say(f"[{self.scenario.name}] docker {' '.join(command)}   ({self.scenario.doc})")
        self.cleanup.append(["rm", "-f", "-v", self.name])
        self.started = time.monotonic()
        docker(*command, timeout=60, check=True)
        mapping = docker("port", self.name, "7443/tcp", check=True).stdout.split()
        self.port = int(mapping[0].rsplit(":", 1)[1])

    def wait_ready(self, limit: float = 45) -> bool:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            logs = self.logs()
            if re.search(r"acceptor\[\d+\] ready: \d+ workers", logs):
                return True
            state = docker("inspect", "--format", "{{.State.Running}}", self.name)
            if state.stdout.strip() != "true":
                return False
            time.sleep(0.5)
            remaining()
        return False

    def health(self) -> tuple[str, float]:
        deadline = self.started + HEALTH_LIMIT
        status = ""
        while time.monotonic() < deadline:
            status = docker("inspect", "--format", "{{.State.Health.Status}}",
                            self.name).stdout.strip()
            if status in ("healthy", "unhealthy"):
                break
            time.sleep(1)
            remaining()
        return status, time.monotonic() - self.started

    def echo(self, pin: list[str], message: str) -> subprocess.CompletedProcess[str]:
        return run([str(VENV_HANDOFFD), "connect", f"127.0.0.1:{self.port}", *pin,
                    "--timeout", "10"], input=message, timeout=30)


def explain(container: Container) -> None:
    """The container's log, indented, after a failure."""
    tail = container.logs().strip().splitlines()[-25:]
    print("    --- container log (last 25 lines) ---")
    for line in tail:
        print(f"    {line}")


# ---------------------------------------------------------------- one run


def run_scenario(scenario: Scenario, cleanup: list[list[str]],
                 known: dict[str, str]) -> None:
    """Start the image one way, check it, stop it.  ``known`` carries the volume's
    fingerprint from run to run."""
    check = RESULTS.check
    count, low, high = worker_settings()
    tag = f"[{scenario.name}]"
    box = Container(scenario, cleanup)
    failures_before = len(RESULTS.failed)
    box.start()
    ready = box.wait_ready()
    check(f"{tag} the daemon starts and reports its {count} workers ready", ready,
          "no 'acceptor ready' line in the log (the log follows the run's checks)")
    logs = box.logs()

    # The key: generated on the first start as the acceptor's user, kept by the volume.
    pub = box.exec("cat", "/var/lib/handoffd/server.key.pub", user=str(ACCEPTOR_UID))
    fingerprint = fingerprint_of(pub.stdout) if pub.returncode == 0 and pub.stdout else ""
    generated = "generating one" in logs
    if scenario.new_key:
        logged = re.search(r"^fingerprint (SHA256:\S+)", logs, re.MULTILINE)
        check(f"{tag} first start: the entrypoint generates the key and logs its "
              "fingerprint", generated and bool(logged) and logged.group(1) == fingerprint,
              f"generated={generated}, logged={logged and logged.group(1)}, "
              f"server.key.pub={fingerprint or pub.stderr.strip()}")
    else:
        check(f"{tag} restart with the same volume: no new key, same fingerprint",
              not generated and fingerprint == known.get("volume"),
              f"generated={generated}, before={known.get('volume')}, now={fingerprint}")
    if scenario.new_key and "-v" in scenario.options:
        known["volume"] = fingerprint
    try:
        # As the owner: with --cap-drop ALL root cannot look into the 0700 volume.
        modes = json.loads(box.python(STAT_KEY, "/var/lib/handoffd", KEY,
                                      user=f"{ACCEPTOR_UID}:{ACCEPTOR_UID}"))
        expected = {"/var/lib/handoffd": [ACCEPTOR_UID, ACCEPTOR_UID, "0o700"],
                    KEY: [ACCEPTOR_UID, ACCEPTOR_UID, "0o600"]}
        check(f"{tag} the key is 0600 in a 0700 volume, both owned by uid {ACCEPTOR_UID}",
              modes == expected, f"got {modes}")
    except RuntimeError as error:
        check(f"{tag} the key is 0600 in a 0700 volume, both owned by uid {ACCEPTOR_UID}",
              False, str(error))

    # Key parking: the log and `handoffd status`.
    fallback_logged = FALLBACK_LOG in logs
    status = box.exec("handoffd", "status", "--control", "/run/handoffd/control.sock",
                      "--json")
    try:
        report = json.loads(status.stdout)
    except ValueError:
        report = {}
    parking = report.get("key_parking")
    if scenario.mode == "fallback":
        check(f"{tag} default seccomp profile: fallback key parking, logged as a warning",
              fallback_logged and parking == "fallback",
              f"warning logged={fallback_logged}, status key_parking={parking!r}")
    else:
        check(f"{tag} seccomp-keyring.json: keyring key parking, no fallback warning",
              not fallback_logged and parking == "keyring",
              f"warning logged={fallback_logged}, status key_parking={parking!r}")
    doctor = box.exec("handoffd", "doctor")
    keyring_line = next((line for line in doctor.stdout.splitlines()
                         if "kernel keyring" in line), "")
    advice = doctor.stdout.split(keyring_line, 1)[1].split("\n[", 1)[0] if keyring_line else ""
    if scenario.mode == "fallback":
        check(f"{tag} `docker exec C handoffd doctor` flags the keyring and points to "
              "docker/seccomp-keyring.json",
              keyring_line.startswith(("[warn]", "[fail]"))
              and "docker/seccomp-keyring.json" in advice,
              f"rc={doctor.returncode}: {keyring_line!r} {advice.strip()!r}")
    else:
        check(f"{tag} `docker exec C handoffd doctor`: kernel keyring ok",
              keyring_line.startswith("[ok"), f"rc={doctor.returncode}: {keyring_line!r}")
    workers = report.get("workers", [])
    check(f"{tag} `handoffd status`: {count} workers ready, separated",
          status.returncode == 0 and len(workers) == count
          and all(w.get("state") == "ready" for w in workers)
          and report.get("privilege_separation", {}).get("separated") is True,
          f"rc={status.returncode}: {(status.stdout + status.stderr).strip()[-400:]}")

    # The process model, from the host (docker top) and from inside (/proc).
    top = docker("top", box.name, "-eo", "uid,pid,ppid,args")
    rows = [line.split(None, 3) for line in top.stdout.splitlines()[1:] if line.strip()]
    init_pid = docker("inspect", "--format", "{{.State.Pid}}", box.name).stdout.strip()
    supervisors = [r for r in rows if r[1] == init_pid]
    acceptors = [r for r in rows if "handoffd.runtime.acceptor_process" in r[3]]
    worker_rows = [r for r in rows if "handoffd.runtime.worker_process" in r[3]]
    worker_uids = [int(r[0]) for r in worker_rows]
    others = [r for r in rows if r not in supervisors + acceptors + worker_rows]
    sup_pid = supervisors[0][1] if supervisors else "?"
    check(f"{tag} docker top: the supervisor is PID 1, root, `handoffd serve`",
          len(supervisors) == 1 and supervisors[0][0] == "0"
          and "handoffd serve" in supervisors[0][3], top.stdout.strip() or top.stderr.strip())
    check(f"{tag} docker top: the acceptor runs as uid {ACCEPTOR_UID}, child of the supervisor",
          len(acceptors) == 1 and acceptors[0][0] == str(ACCEPTOR_UID)
          and acceptors[0][2] == sup_pid, f"acceptors: {acceptors}")
    check(f"{tag} docker top: {count} workers, each under its own uid from {low}-{high}",
          len(worker_rows) == count and len(set(worker_uids)) == count
          and all(low <= uid <= high for uid in worker_uids)
          and all(r[2] == sup_pid for r in worker_rows),
          f"worker uids {worker_uids}")
    check(f"{tag} docker top: no other process in the container", not others,
          f"also running: {others}")
    try:
        procs = json.loads(box.python(PROC_SNAPSHOT))
        by_role = {"supervisor": [p for p in procs if p["pid"] == 1],
                   "acceptor": [p for p in procs if "acceptor_process" in p["args"]],
                   "worker": [p for p in procs if "worker_process" in p["args"]]}
        # Only the Uid line's four ids all equal: no saved root uid to go back to.
        setuid_ok = all(len(set(p["uids"])) == 1 for p in by_role["acceptor"] + by_role["worker"])
        unprivileged = all(p["cap_eff"] == 0 for p in by_role["acceptor"] + by_role["worker"])
        check(f"{tag} /proc: acceptor and workers have no capabilities and no saved uid 0",
              bool(by_role["acceptor"]) and len(by_role["worker"]) == count
              and setuid_ok and unprivileged,
              json.dumps(by_role["acceptor"] + by_role["worker"]))
        if scenario.capdrop:
            caps = by_role["supervisor"][0]["cap_eff"] if by_role["supervisor"] else None
            check(f"{tag} /proc: the supervisor holds exactly SETUID, SETGID, KILL",
                  caps == SUPERVISOR_CAPS, f"CapEff {caps and hex(caps)}, "
                  f"expected {hex(SUPERVISOR_CAPS)}")
    except (RuntimeError, ValueError, KeyError, IndexError) as error:
        check(f"{tag} /proc: acceptor and workers have no capabilities and no saved uid 0",
              False, str(error))

    # A worker uid cannot read the key; the acceptor's can (so EACCES is not ENOENT).
    worker_uid = worker_uids[0] if worker_uids else low
    try:
        as_worker = box.python(OPEN_KEY, KEY, user=f"{worker_uid}:{worker_uid}")
        as_acceptor = box.python(OPEN_KEY, KEY, user=f"{ACCEPTOR_UID}:{ACCEPTOR_UID}")
        check(f"{tag} docker exec -u {worker_uid}: opening {KEY} fails with EACCES "
              f"(uid {ACCEPTOR_UID} opens it)", as_worker == "EACCES" and as_acceptor == "OK",
              f"worker uid: {as_worker}, acceptor uid: {as_acceptor}")
    except RuntimeError as error:
        check(f"{tag} docker exec -u {worker_uid}: opening {KEY} fails with EACCES",
              False, str(error))

    # An echo from the host through the published port, the server pinned.
    message = f"hello from the host, {scenario.name}\n"
    if fingerprint:
        echo = box.echo(["--fingerprint", fingerprint], message)
        check(f"{tag} host: handoffd connect 127.0.0.1:{box.port} --fingerprint ... echoes",
              echo.returncode == 0 and echo.stdout == message,
              f"rc={echo.returncode}, stdout={echo.stdout!r}, "
              f"stderr={echo.stderr.strip()[-300:]!r}")
    else:
        check(f"{tag} host: handoffd connect --fingerprint ... echoes", False,
              "no fingerprint: server.key.pub unreadable")
    if scenario.extras:
        wrong = "SHA256:" + base64.b64encode(bytes(32)).decode().rstrip("=")
        refused = box.echo(["--fingerprint", wrong], message)
        check(f"{tag} host: a client pinning another fingerprint is refused, no echo",
              refused.returncode != 0 and message.strip() not in refused.stdout,
              f"rc={refused.returncode}, stdout={refused.stdout!r}")
        # The command DEPLOY.md gives for seeing the uids (the slim image has no ps).
        ps = docker("top", box.name, "-eo", "uid,pid,args")
        check(f"{tag} DEPLOY.md's `docker top CONTAINER -eo uid,pid,args` shows the acceptor",
              ps.returncode == 0 and str(ACCEPTOR_UID) in ps.stdout,
              f"rc={ps.returncode}: {(ps.stderr or ps.stdout).strip()[-300:]}")

    if scenario.health:
        health, after = box.health()
        check(f"{tag} HEALTHCHECK reports healthy", health == "healthy",
              f"{health or 'no status'} after {after:.0f}s: " + docker(
                  "inspect", "--format", "{{json .State.Health.Log}}", box.name
              ).stdout.strip()[-600:])

    # docker stop: SIGTERM to the supervisor, forwarded; the idle daemon exits 0 at once.
    began = time.monotonic()
    stop = docker("stop", box.name, timeout=60)
    took = time.monotonic() - began
    state = docker("inspect", "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}",
                   box.name).stdout.split()
    check(f"{tag} docker stop: done in {took:.1f}s (limit {STOP_LIMIT:.0f}s), exit status 0",
          stop.returncode == 0 and took <= STOP_LIMIT and state[:1] == ["0"],
          f"docker stop rc={stop.returncode}, container exit code/OOM {state}")
    if len(RESULTS.failed) > failures_before:
        explain(box)
    docker("rm", "-v", box.name)


# ---------------------------------------------------------------- main


def scenarios(volume: str) -> list[Scenario]:
    keep = ["--stop-timeout", "40", "-v", f"{volume}:/var/lib/handoffd"]
    caps = ["--cap-drop", "ALL", "--cap-add", "SETUID", "--cap-add", "SETGID",
            "--cap-add", "KILL"]
    seccomp = ["--security-opt", f"seccomp={SECCOMP}"]
    return [
        Scenario("default-seccomp", "DEPLOY.md: without the profile, fallback key mode",
                 keep, "fallback", new_key=True, capdrop=False, extras=True),
        Scenario("keyring-capdrop", "DEPLOY.md: keyring, only the capabilities needed",
                 [*keep[:2], *caps, *seccomp, *keep[2:]], "keyring", new_key=False,
                 capdrop=True),
        Scenario("readme-keyring", "README: the keyring profile, the image's own volume",
                 ["--stop-timeout", "40", *seccomp], "keyring", new_key=True,
                 capdrop=False),
        Scenario("no-new-privileges", "DEPLOY.md: `--security-opt no-new-privileges` "
                 "is compatible", [*keep[:2], *caps, *seccomp,
                                   "--security-opt", "no-new-privileges", *keep[2:]],
                 "keyring", new_key=False, capdrop=True, health=False),
    ]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    os.chdir(ROOT)
    cleanup: list[list[str]] = []
    daemon = Daemon()
    complete = False
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        if not VENV_HANDOFFD.exists():
            raise Abort(f"{VENV_HANDOFFD} missing: run `make venv` (make test-docker does)")
        phase = time.monotonic()
        ensure_packages()
        daemon.ensure()
        ensure_base(cleanup)
        say(f"base ready in {time.monotonic() - phase:.0f}s")
        build_image(cleanup)
        volume = f"handoffd-test-keys-{RUN_ID}"
        docker("volume", "create", volume, check=True)
        cleanup.append(["volume", "rm", "-f", volume])
        known: dict[str, str] = {}
        for scenario in scenarios(volume):
            run_scenario(scenario, cleanup, known)
        complete = True
    except Abort as error:
        RESULTS.check("set-up and runs complete", False, str(error))
    except KeyboardInterrupt:
        RESULTS.check("set-up and runs complete", False, "interrupted")
    finally:
        if KEEP:
            say("HANDOFFD_DOCKER_KEEP=1: left in place: "
                + ", ".join(command[-1] for command in cleanup))
        else:
            for command in reversed(cleanup):
                with contextlib.suppress(Exception):
                    subprocess.run([DOCKER, *command], capture_output=True, timeout=120)
        daemon.stop()
    failed = len(RESULTS.failed)
    verdict = ("all checks passed" if not failed and complete
               else "FAILED: " + "; ".join(RESULTS.failed))
    say(f"{verdict} ({time.monotonic() - START:.0f}s)")
    print(f"{RESULTS.passed} passed, {failed} failed", flush=True)
    return 0 if complete and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
