"""``make demo``: the echo server demo, end to end, with no arguments.

1. generate a server key in a temporary directory;
2. start ``handoffd serve`` with 4 pre-forked workers running ``examples.echo.app``;
3. run a batch of concurrent clients that each send messages and check the echoes;
4. print a summary (connections, echoes verified, worker pids, handoff latency);
5. stop the daemon with SIGTERM (it drains) and exit 0 — or 1 if anything failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from handoffd.client import connect
from handoffd.runtime.control import query_control
from handoffd.status import GSSError

REPO = Path(__file__).resolve().parents[2]


DEMO_ACCEPTOR_UID = 69799
DEMO_WORKER_UIDS = (69800, 69863)
"""Run as root, the demo's acceptor and workers get these uids (no passwd entries
needed): the key holder and each worker under a uid of its own.  Apart from the shipped
ranges (systemd/handoffd.toml 70000-70255, the image 80000-80255, the by-hand example
69900-69963): the supervisor kills every process of a worker uid it frees."""


def open_to(directory: Path) -> None:
    """Let other uids traverse ``directory`` and any 0700 directory above it (up to /tmp)."""
    for path in (directory, *directory.parents):
        if str(path) in ("/", "/tmp"):
            break
        mode = os.stat(path).st_mode & 0o7777
        if mode & 0o011 != 0o011:
            os.chmod(path, mode | 0o011)


def separation_lines(directory: Path, acceptor_uid: int = DEMO_ACCEPTOR_UID,
                     worker_uids: tuple[int, int] = DEMO_WORKER_UIDS) -> tuple[str, str]:
    """``([server] lines, [workers] lines)`` for the process model serve can run here.

    As root: the acceptor under ``acceptor_uid`` (it gets the key and traverse rights on
    ``directory``), one uid per worker from ``worker_uids``.  Otherwise workers can only
    share the acceptor's uid: the explicit, warned-about opt-in."""
    if os.geteuid() != 0:
        return "", "insecure_same_uid = true\n"
    open_to(directory)
    for name in ("server.key", "server.key.pub"):
        if (directory / name).exists():
            os.chown(directory / name, acceptor_uid, acceptor_uid)
    return (f'user = "{acceptor_uid}"\n',
            f"uid_range = [{worker_uids[0]}, {worker_uids[1]}]\n")


def write_config(directory: Path, workers: int, *, app: str = "examples.echo.app:handler",
                 log_level: str | None = None) -> Path:
    """``directory/handoffd.toml``: loopback, any free port, anonymous clients, the
    key ``server.key`` (made before) and the control socket ``control.sock`` beside it,
    separated uids where this process can switch uids (also used by ``make bench`` and
    ``make soak``)."""
    server_lines, worker_lines = separation_lines(directory)
    config = directory / "handoffd.toml"
    config.write_text(
        "[server]\n"
        'listen = ["127.0.0.1:0"]\n'
        'key = "server.key"\n'
        "allow_anonymous = true\n"
        + server_lines +
        "[workers]\n"
        f'app = "{app}"\n'
        f"count = {workers}\n"
        f"pythonpath = [{str(REPO)!r}]\n"
        + worker_lines +
        "[control]\n"
        'socket = "control.sock"\n'
        + ("" if log_level is None else f'[log]\nlevel = "{log_level}"\n')
    )
    return config


def keygen(directory: Path) -> str:
    """``handoffd keygen`` a ``server.key`` in ``directory``; its fingerprint."""
    result = subprocess.run([sys.executable, "-m", "handoffd", "keygen", "--out",
                             str(directory / "server.key")],
                            capture_output=True, text=True, check=True)
    return result.stdout.split()[-1]


def stop_daemon(daemon: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the daemon drains), then its exit status; SIGKILL after 60 s (-9)."""
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        return -9


async def wait_ready(control: Path, process: subprocess.Popen[bytes],
                     timeout: float = 30) -> dict[str, object]:
    with trio.fail_after(timeout):
        while True:
            if process.poll() is not None:
                raise SystemExit(f"handoffd serve exited early with status {process.returncode}")
            if control.exists():
                try:
                    status = await query_control(control)
                    ready = [w for w in status["workers"] if w["state"] == "ready"]
                    if status["listen"] and ready:
                        return status
                except GSSError:
                    pass
            await trio.sleep(0.05)


async def run_clients(host: str, port: int, fingerprint: str, clients: int,
                      messages: int) -> tuple[int, int, list[str]]:
    verified = 0
    failures: list[str] = []
    connections = 0

    async def one(n: int) -> None:
        nonlocal verified, connections
        try:
            stream = await connect(host, port, server_fingerprint=fingerprint)
            connections += 1
            async with stream:
                for i in range(messages):
                    payload = f"client {n} message {i} ".encode() * (1 + i % 4)
                    await stream.send_all(payload)
                    echoed = b""
                    while len(echoed) < len(payload):
                        chunk = await stream.receive_some()
                        if not chunk:
                            raise ConnectionError("server closed early")
                        echoed += chunk
                    if echoed != payload:
                        raise ValueError(f"echo mismatch on message {i}")
                    verified += 1
        except (GSSError, OSError, ValueError, trio.BrokenResourceError) as error:
            failures.append(f"client {n}: {error}")

    async with trio.open_nursery() as nursery:
        for n in range(clients):
            nursery.start_soon(one, n)
    return connections, verified, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--messages", type=int, default=20)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="handoffd-demo-") as tmp:
        directory = Path(tmp)
        handoffd = [sys.executable, "-m", "handoffd"]
        fingerprint = keygen(directory)
        config = write_config(directory, args.workers)
        print(f"server key   {fingerprint}")
        if os.geteuid() == 0:
            print(f"separation   supervisor root, acceptor uid {DEMO_ACCEPTOR_UID}, one uid per "
                  f"worker from {DEMO_WORKER_UIDS[0]}-{DEMO_WORKER_UIDS[1]}")
        else:
            print(f"separation   NONE: not root, so the workers share the acceptor's uid "
                  f"{os.getuid()} and a compromised worker could read the server key; run "
                  "`sudo make demo` to see the acceptor and each worker under its own uid")
        daemon = subprocess.Popen([*handoffd, "serve", "--config", str(config)], cwd=REPO)
        try:
            started = time.perf_counter()
            status = trio.run(wait_ready, directory / "control.sock", daemon)
            listen = str(status["listen"][0])  # type: ignore[index]
            host, port = listen.rsplit(":", 1)
            print(f"daemon       pid {daemon.pid}, listening on {listen}, "
                  f"ready in {time.perf_counter() - started:.2f}s, "
                  f"key parking: {status['key_parking']}")
            t0 = time.perf_counter()
            connections, verified, failures = trio.run(
                run_clients, host, int(port), fingerprint, args.clients, args.messages)
            elapsed = time.perf_counter() - t0
            status = trio.run(query_control, directory / "control.sock")
        finally:
            exit_status = stop_daemon(daemon)

    served = {w["pid"]: w["handled"] for w in status["workers"] if w["handled"]}  # type: ignore[index, union-attr]
    uids = sorted({w["uid"] for w in status["workers"] if w["handled"]})  # type: ignore[index, union-attr]
    latency = status["handoff_latency_us"]
    print(f"clients      {args.clients} concurrent, {args.messages} messages each, "
          f"{elapsed:.2f}s")
    print(f"connections  {connections} established, {len(failures)} failed")
    print(f"echoes       {verified} verified of {args.clients * args.messages}")
    print("workers      " + ", ".join(f"pid {pid}: {n} connections"
                                      for pid, n in sorted(served.items())))
    print(f"worker uids  {', '.join(map(str, uids))}")
    print(f"handoff      p50 {latency['p50']:.0f} µs, p99 {latency['p99']:.0f} µs "  # type: ignore[index]
          "(handshake done -> worker acknowledged the import)")
    print("             all clients start at once, so each handoff queues behind the other\n"
          "             handshakes on the acceptor; `make bench` measures it at a steady rate")
    print(f"shutdown     SIGTERM -> exit status {exit_status}")
    for failure in failures[:10]:
        print(f"  {failure}")
    ok = (not failures and verified == args.clients * args.messages and exit_status == 0
          and len(served) > 1)
    print("demo         " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
