#!/usr/bin/env python3
"""``make test-docker``: the shipped Docker image, built and run with a real engine.

The repository's ``Dockerfile`` is built as README and docs/DEPLOY.md say
(``docker build .``, the classic builder), with README's by-hand key
``examples/echo/server.key`` present in the checkout (the image must hold no key), and
the image is run with the ``docker run`` lines of README and DEPLOY.md, read from
those files and run as written but for the host port, volume and image names
(``as_run``): Docker's default seccomp profile (fallback key parking, logged),
``--security-opt seccomp=docker/seccomp-keyring.json`` (keyring mode) and DEPLOY.md's
``--cap-drop ALL --cap-add SETUID --cap-add SETGID --cap-add KILL``, each with a named
volume on ``/var/lib/handoffd``.  Each run is checked from the outside: the process
model (``docker top``: tini as PID 1, the supervisor its child), an echo through
``handoffd connect`` from the host, the HEALTHCHECK, a worker uid refused the key,
``docker stop`` (once draining an open session), the key and its logged fingerprint
kept by the volume.  See docs/DOCKER-TEST.md.

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
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
FINGERPRINT_LOG = re.compile(r"server key (\S+), fingerprint (SHA256:\S+)")
TINI = "/usr/bin/tini"
# README's by-hand steps make this key in the checkout; the image must never hold it.
PLANTED_KEY = ROOT / "examples" / "echo" / "server.key"
DRAIN_HOLD = 3.0         # seconds a session stays open after docker stop began
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


@contextlib.contextmanager
def planted_key() -> Iterator[None]:
    """README's by-hand key, ``handoffd keygen --out examples/echo/server.key``, present
    in the checkout while the image is built (made here if missing, and then removed
    again, unless someone replaced it meanwhile); git must ignore it."""
    pub = PLANTED_KEY.with_name(PLANTED_KEY.name + ".pub")
    made: dict[Path, bytes] = {}
    if PLANTED_KEY.exists():
        say(f"{PLANTED_KEY.relative_to(ROOT)} already present: used, left as it is")
    else:
        say(f"handoffd keygen --out {PLANTED_KEY.relative_to(ROOT)}   (README's by-hand "
            "step; removed after the build)")
        existed_pub = pub.exists()
        run([str(VENV_HANDOFFD), "keygen", "--out", str(PLANTED_KEY)], timeout=60,
            check=True)
        made = {PLANTED_KEY: PLANTED_KEY.read_bytes()}
        if not existed_pub and pub.exists():
            made[pub] = pub.read_bytes()
    try:
        for path in (PLANTED_KEY, pub):
            ignored = run(["git", "check-ignore", "-q", str(path.relative_to(ROOT))],
                          timeout=30)
            RESULTS.check(f"git ignores {path.relative_to(ROOT)} (.gitignore)",
                          ignored.returncode == 0, f"git check-ignore exited "
                          f"{ignored.returncode} {ignored.stderr.strip()}")
        yield
    finally:
        for path, data in made.items():
            with contextlib.suppress(OSError):
                if path.read_bytes() == data:
                    path.unlink()


def check_no_key_in_image() -> None:
    """Built with examples/echo/server.key in the tree: no key in the image."""
    found = docker("run", "--rm", "--entrypoint", "sh", IMAGE, "-c",
                   'find / -name "*.key" -xdev', timeout=120)
    keys = [line for line in found.stdout.splitlines() if line.strip()]
    RESULTS.check("image built with examples/echo/server.key in the tree: `find / -name "
                  "'*.key' -xdev` in it finds none from examples",
                  found.returncode == 0 and not [k for k in keys if "examples" in k],
                  f"rc={found.returncode}: {keys} {found.stderr.strip()[-300:]}")
    RESULTS.check("the image holds no *.key file at all", found.returncode == 0 and not keys,
                  f"found {keys}")


def check_build_refuses_a_key() -> None:
    """Should a key get past .dockerignore (another build context, an edited ignore
    file), the Dockerfile refuses to build: the same files the Dockerfile copies, a
    key made in examples/echo/ of that copy, and no .dockerignore."""
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.key", "*.key.pub")
    with tempfile.TemporaryDirectory(prefix="handoffd-leak-ctx-") as scratch:
        context = Path(scratch)
        for name in ("Dockerfile", "pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, context / name)
        for name in ("handoffd", "examples", "docker"):
            shutil.copytree(ROOT / name, context / name, ignore=ignore)
        key = context / "examples" / "echo" / "server.key"
        run([str(VENV_HANDOFFD), "keygen", "--out", str(key)], timeout=60, check=True)
        leaked = docker("build", "--force-rm", "-t", f"handoffd-test-leak:{RUN_ID}", ".",
                        timeout=600, cwd=context)
    output = leaked.stdout + leaked.stderr
    # The steps that did succeed are cached images (the COPY one holds the throwaway
    # key): remove the last, and with it its untagged parents not shared with IMAGE.
    layers = re.findall(r"^ ---> ([0-9a-f]{12})$", output, re.MULTILINE)
    if layers:
        docker("rmi", layers[-1])
    if leaked.returncode == 0:
        docker("rmi", f"handoffd-test-leak:{RUN_ID}")
    RESULTS.check("without .dockerignore, a key in examples/ makes the build fail "
                  "(`refusing to build: private key(s) ...`), no image",
                  leaked.returncode != 0
                  and "refusing to build: private key(s) in the build context" in output
                  and "/opt/handoffd/examples/echo/server.key" in output,
                  f"docker build exited {leaked.returncode}: {output.strip()[-600:]}")


# ---------------------------------------------------------------- the docs' commands

DOC_IMAGE = "handoffd"          # the image name in the docs' commands
DOC_VOLUME = "handoffd-keys"    # the named volume they mount on /var/lib/handoffd


def doc_commands(path: Path, heading: str) -> list[list[str]]:
    """The ``docker run`` commands of the first ``sh`` block after ``heading`` in
    ``path``, as written there (continuation lines joined, comments dropped)."""
    text = path.read_text()
    at = text.find(heading)
    block = re.search(r"```sh\n(.*?)```", text[at:], re.DOTALL) if at >= 0 else None
    if block is None:
        raise Abort(f"{path.relative_to(ROOT)}: no sh block after {heading!r}")
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:2] == ["docker", "run"]:
            commands.append(argv)
    return commands


def pick(commands: list[list[str]], where: str, *, keyring: bool) -> list[str]:
    """The one command with (or without) the keyring seccomp profile."""
    found = [c for c in commands if (f"seccomp={SECCOMP}" in c) == keyring]
    if len(found) != 1:
        raise Abort(f"{where}: expected one `docker run` line "
                    f"{'with' if keyring else 'without'} seccomp={SECCOMP}, found {found}")
    return found[0]


def as_run(argv: list[str], volume: str) -> list[str]:
    """A docs command's options as this suite runs them: every option exactly as
    written (``--rm`` too) except three substitutions: the host port becomes
    ``127.0.0.1::7443`` (a free one: another daemon may hold 7443 here), the volume
    ``handoffd-keys`` this run's own, and the image (last) this run's; Container.start
    adds ``-d --name``."""
    args = argv[2:]
    if args[-1:] != [DOC_IMAGE]:
        raise Abort(f"`{shlex.join(argv)}`: expected the image {DOC_IMAGE!r} last")
    options: list[str] = []
    body = iter(args[:-1])
    for arg in body:
        if arg in ("-p", "--publish"):
            published = next(body, "")
            options += [arg, "127.0.0.1::7443" if published.endswith(":7443") else published]
        elif arg in ("-v", "--volume"):
            mount = next(body, "")
            if mount.startswith(f"{DOC_VOLUME}:"):
                mount = volume + mount[len(DOC_VOLUME):]
            options += [arg, mount]
        else:
            options.append(arg)
    return options


def check_docs() -> None:
    """What the docs say that is checked against the image rather than by running it."""
    readme = doc_commands(ROOT / "README.md", "**With Docker**")
    mounted = [any(a.startswith(f"{DOC_VOLUME}:/var/lib/handoffd") for a in c)
               for c in readme]
    RESULTS.check("README's `docker run` lines mount the named volume handoffd-keys "
                  "on /var/lib/handoffd", bool(readme) and all(mounted),
                  f"{[shlex.join(c) for c in readme]}")
    deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
    base = base_image_name()
    RESULTS.check(f"DEPLOY.md names the Dockerfile's base image {base}", base in deploy,
                  "not mentioned")
    entrypoint = docker("image", "inspect", "--format", "{{json .Config.Entrypoint}}",
                        IMAGE).stdout.strip()
    RESULTS.check("the image's ENTRYPOINT starts tini", json.loads(entrypoint or "[]")[:2]
                  == [TINI, "--"], entrypoint)


def read_until(stream: object, want: bytes, limit: float) -> bytes:
    """Bytes from a child's unbuffered pipe until ``want`` arrives, EOF or ``limit``."""
    fd = stream.fileno()  # type: ignore[attr-defined]
    got = b""
    deadline = time.monotonic() + limit
    while want not in got:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        got += chunk
    return got


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

# An orphan: a grandchild whose parent exits at once is re-parented to the container's
# PID 1, which must reap it when it exits (else a zombie stays).  Prints its parent
# after the re-parenting and its state 2.5 s after it exited ("gone": reaped).
ORPHAN = r"""
import os, time
r, w = os.pipe()
child = os.fork()
if child == 0:
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(1.0)
        os._exit(0)
    os.write(w, str(grandchild).encode())
    os._exit(0)
os.waitpid(child, 0)
orphan = int(os.read(r, 32))
def stat():
    try:
        return open(f'/proc/{orphan}/stat').read().rsplit(')', 1)[1].split()[:2]
    except FileNotFoundError:
        return ['gone', '-']
time.sleep(0.3)
parent = stat()[1]
time.sleep(3.0)
print(parent, stat()[0])
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
    options: list[str]       # docker run options (the docs', see as_run) besides -d/--name
    volume: str              # the named volume on /var/lib/handoffd ("" for none)
    mode: str                # key parking expected: "fallback" or "keyring"
    new_key: bool            # the entrypoint must generate the key (fresh volume)
    health: bool = True      # wait for the HEALTHCHECK to report healthy
    extras: bool = False     # once: wrong fingerprint refused, docker top, orphans
                             # reaped, docker stop drains an open session

    @property
    def capdrop(self) -> bool:  # DEPLOY.md's --cap-drop ALL --cap-add SETUID/SETGID/KILL
        return "--cap-drop" in self.options


class Container:
    def __init__(self, scenario: Scenario, cleanup: list[list[str]]) -> None:
        self.scenario = scenario
        self.name = f"handoffd-test-{RUN_ID}-{scenario.name}"
        self.cleanup = cleanup
        self.port: int | None = None
        self.started = 0.0
        self.final_logs: str | None = None   # once stopped (--rm removes the container)

    def logs(self) -> str:
        if self.final_logs is not None:
            return self.final_logs
        result = docker("logs", self.name, timeout=30)
        return result.stdout + result.stderr

    def stop(self) -> tuple[subprocess.Popen[str], float, str]:
        """``docker stop`` started (not awaited), the log followed and the exit status
        awaited first, since ``--rm`` removes the container and its log when it exits.
        Returns the stop process, its start time and how to get the exit status."""
        env = dict(os.environ, DOCKER_BUILDKIT="0")
        self._follow = subprocess.Popen([DOCKER, "logs", "-f", self.name], text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env)
        self._wait = subprocess.Popen([DOCKER, "wait", self.name], text=True, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)  # both attached before the container can go away
        began = time.monotonic()
        stop = subprocess.Popen([DOCKER, "stop", self.name], text=True, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return stop, began, self.name

    def stopped(self, limit: float = 60) -> str:
        """After stop(): the exit status docker wait reported; the log kept."""
        try:
            status, _ = self._wait.communicate(timeout=limit)
            logs, _ = self._follow.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._wait.kill()
            self._follow.kill()
            return "timeout"
        self.final_logs = logs
        return status.strip()

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
        command = ["run", "-d", "--name", self.name, *self.scenario.options, IMAGE]
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
              "fingerprint",
              generated and logged is not None and logged.group(1) == fingerprint,
              f"generated={generated}, logged={logged and logged.group(1)}, "
              f"server.key.pub={fingerprint or pub.stderr.strip()}")
    else:
        check(f"{tag} restart with the same volume: no new key, same fingerprint",
              not generated and fingerprint == known.get(scenario.volume),
              f"generated={generated}, before={known.get(scenario.volume)}, "
              f"now={fingerprint}")
    if scenario.new_key and scenario.volume:
        known[scenario.volume] = fingerprint
    # The acceptor logs the key and its fingerprint at every start: what clients pin.
    announced = FINGERPRINT_LOG.findall(logs)
    check(f"{tag} the acceptor logs `server key {KEY}, fingerprint` "
          + ("of the key it generated" if scenario.new_key else "of the volume's key, "
             "the same as the previous run's"),
          announced == [(KEY, fingerprint)] and bool(fingerprint)
          and (scenario.new_key or fingerprint == known.get(scenario.volume)),
          f"logged {announced}, server.key.pub {fingerprint or '?'}, "
          f"previous run {known.get(scenario.volume)}")
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
        # DEPLOY.md: once per process, the acceptor's at start-up, then each worker's.
        sides = re.findall(re.escape(FALLBACK_LOG) + r" \((\w+),", logs)
        for line in dict.fromkeys(re.findall(re.escape(FALLBACK_LOG) + r" \([^)]*\)", logs)):
            say(f"{tag} logged: {line}")
        check(f"{tag} the fallback warning: once by the acceptor, once by each of the "
              f"{count} workers ({count + 1} lines)",
              sides.count("acceptor") == 1 and sides.count("worker") == count
              and len(sides) == count + 1, f"logged by {sides}")
    else:
        check(f"{tag} seccomp-keyring.json: keyring key parking, no fallback warning",
              not fallback_logged and parking == "keyring",
              f"warning logged={fallback_logged}, status key_parking={parking!r}")
    doctor = box.exec("handoffd", "doctor")
    keyring_line = next((line for line in doctor.stdout.splitlines()
                         if "kernel keyring" in line), "")
    advice = doctor.stdout.split(keyring_line, 1)[1].split("\n[", 1)[0] if keyring_line else ""
    if scenario.mode == "fallback":
        say(f"{tag} doctor (exit status {doctor.returncode}): {keyring_line.strip()} | "
            f"{' '.join(advice.split())}")
        check(f"{tag} `docker exec C handoffd doctor`: the keyring check `[warn]`, "
              "exit status 0, pointing to docker/seccomp-keyring.json",
              keyring_line.startswith("[warn]") and doctor.returncode == 0
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
    inits = [r for r in rows if r[1] == init_pid]
    supervisors = [r for r in rows if r[2] == init_pid]
    acceptors = [r for r in rows if "handoffd.runtime.acceptor_process" in r[3]]
    worker_rows = [r for r in rows if "handoffd.runtime.worker_process" in r[3]]
    worker_uids = [int(r[0]) for r in worker_rows]
    others = [r for r in rows if r not in inits + supervisors + acceptors + worker_rows]
    sup_pid = supervisors[0][1] if supervisors else "?"
    check(f"{tag} docker top: PID 1 is tini, root, its one child the supervisor, root, "
          "`handoffd serve`",
          len(inits) == 1 and inits[0][0] == "0" and inits[0][3].startswith(f"{TINI} --")
          and len(supervisors) == 1 and supervisors[0][0] == "0"
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
        by_role = {"supervisor": [p for p in procs if p["pid"] != 1
                                  and "serve --config" in p["args"]],
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
        try:
            parent, state = box.python(ORPHAN).split()
            check(f"{tag} an orphan (left by a docker exec) is re-parented to PID 1, tini, "
                  "and reaped when it exits: no zombie",
                  parent == "1" and state == "gone", f"parent {parent}, then state {state}")
        except (RuntimeError, ValueError) as error:
            check(f"{tag} an orphan is reaped by PID 1", False, str(error))

    if scenario.health:
        health, after = box.health()
        check(f"{tag} HEALTHCHECK reports healthy", health == "healthy",
              f"{health or 'no status'} after {after:.0f}s: " + docker(
                  "inspect", "--format", "{{json .State.Health.Log}}", box.name
              ).stdout.strip()[-600:])

    # docker stop: SIGTERM to tini, forwarded to the supervisor, forwarded to the
    # acceptor: it drains.  Once with a session open (it is still served, and the
    # container waits for it), else idle (exits 0 at once).
    if scenario.extras and fingerprint:
        drain(box, tag, fingerprint)
    else:
        stop, began, _ = box.stop()
        try:
            stop.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            stop.kill()
        took = time.monotonic() - began
        exited = box.stopped()
        check(f"{tag} docker stop: done in {took:.1f}s (limit {STOP_LIMIT:.0f}s), "
              "exit status 0", stop.returncode == 0 and took <= STOP_LIMIT and exited == "0",
              f"docker stop rc={stop.returncode}, container exit status {exited!r}")
    if len(RESULTS.failed) > failures_before:
        explain(box)
    docker("rm", "-v", box.name)   # without --rm; with it the container is gone already


def drain(box: Container, tag: str, fingerprint: str) -> None:
    """docker stop while a client's session is open: SIGTERM reaches the supervisor
    through tini, the acceptor drains, the worker keeps serving the session, the
    container waits for it and exits 0 when the client closes."""
    check = RESULTS.check
    client = subprocess.Popen([str(VENV_HANDOFFD), "connect", f"127.0.0.1:{box.port}",
                               "--fingerprint", fingerprint, "--timeout", "10"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, bufsize=0)
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write(b"before docker stop\n")
        first = read_until(client.stdout, b"before docker stop\n", 15)
        stop, began, _ = box.stop()
        time.sleep(DRAIN_HOLD)
        waiting = stop.poll() is None
        try:
            client.stdin.write(b"while draining\n")
            second = read_until(client.stdout, b"while draining\n", 10)
        except BrokenPipeError:
            second = b""
        client.stdin.close()
        client.wait(timeout=20)
        try:
            stop.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            stop.kill()
        took = time.monotonic() - began
    finally:
        if client.poll() is None:
            client.kill()
    status = box.stopped()
    logs = box.logs()
    check(f"{tag} docker stop with a session open: SIGTERM reaches the supervisor through "
          "tini (`received SIGTERM: the acceptor drains`)",
          "received SIGTERM: the acceptor drains" in logs and first.endswith(b"stop\n"),
          f"first echo {first!r}; log tail {logs.strip().splitlines()[-5:]}")
    check(f"{tag} while draining: the container waits for the open session "
          f"({DRAIN_HOLD:.0f}s) and still echoes on it", waiting and second ==
          b"while draining\n", f"docker stop still waiting={waiting}, echo {second!r}")
    check(f"{tag} the session closed: docker stop returns in {took:.1f}s, exit status 0 "
          "(drained, not killed after --stop-timeout)",
          stop.returncode == 0 and status == "0" and took < DRAIN_HOLD + STOP_LIMIT,
          f"docker stop rc={stop.returncode}, container exit status {status!r}")


# ---------------------------------------------------------------- main


def scenarios(deploy_volume: str, readme_volume: str) -> list[Scenario]:
    """The docs' `docker run` lines, as written (see as_run), in an order that makes
    each named volume's first run generate the key and the next ones reuse it."""
    readme = doc_commands(ROOT / "README.md", "**With Docker**")
    deploy = doc_commands(ROOT / "docs" / "DEPLOY.md", "## Docker")
    deploy_keyring = as_run(pick(deploy, "DEPLOY.md", keyring=True), deploy_volume)
    return [
        Scenario("deploy-default", "DEPLOY.md: without the profile, fallback key mode",
                 as_run(pick(deploy, "DEPLOY.md", keyring=False), deploy_volume),
                 deploy_volume, "fallback", new_key=True, extras=True),
        Scenario("deploy-keyring", "DEPLOY.md: keyring, only the capabilities needed",
                 deploy_keyring, deploy_volume, "keyring", new_key=False),
        Scenario("readme-keyring", "README: the keyring profile, first start",
                 as_run(pick(readme, "README.md", keyring=True), readme_volume),
                 readme_volume, "keyring", new_key=True),
        Scenario("readme-default", "README: the default profile, the same volume again",
                 as_run(pick(readme, "README.md", keyring=False), readme_volume),
                 readme_volume, "fallback", new_key=False, health=False),
        Scenario("no-new-privileges", "DEPLOY.md: `--security-opt no-new-privileges` "
                 "is compatible", [*deploy_keyring, "--security-opt", "no-new-privileges"],
                 deploy_volume, "keyring", new_key=False, health=False),
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
        # What a FROM ...@sha256: pin would need: a registry (manifest) digest.  An
        # imported stand-in has none, and its image id changes with every import.
        base = docker("image", "inspect", "--format", "{{.Id}} {{json .RepoDigests}}",
                      base_image_name()).stdout.strip()
        say(f"base image id and registry digests: {base}")
        with planted_key():
            build_image(cleanup)
        check_no_key_in_image()
        check_build_refuses_a_key()
        check_docs()
        volumes = [f"handoffd-test-{doc}-keys-{RUN_ID}" for doc in ("deploy", "readme")]
        for volume in volumes:
            docker("volume", "create", volume, check=True)
            cleanup.append(["volume", "rm", "-f", volume])
        known: dict[str, str] = {}
        for scenario in scenarios(*volumes):
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
