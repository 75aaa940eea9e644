"""``make demo-https``: HTTPS through handoffd to pre-forked workers, end to end.

1. make a throwaway CA and a certificate for localhost in a temporary directory;
2. start ``handoffd serve`` with a ``[tls]`` listener and 4 workers running
   ``examples.https.app`` (the acceptor holds the key; the workers never see it);
3. fetch the page with curl (Python's ``ssl`` if curl is not installed), many at once,
   trusting only the throwaway CA;
4. print which worker pids answered, stop the daemon (SIGTERM) and exit 0 — or 1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from examples.echo.demo import (
    DEMO_ACCEPTOR_UID,
    REPO,
    keygen,
    stop_daemon,
    wait_ready,
    write_config,
)
from examples.https.pki import make_pki

ANSWER = re.compile(rb"served by worker (\d+)</h1><p>mechanism=tls, alpn=([^,]*),")


def fetch_with_curl(url: str, ca: Path) -> bytes:
    result = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca), url], capture_output=True, timeout=30, check=False
    )
    if result.returncode:
        raise OSError(result.stderr.decode(errors="replace").strip())
    return result.stdout


def fetch_with_python(url: str, ca: Path) -> bytes:
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["http/1.1"])
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data


async def fetch_all(url: str, ca: Path, count: int) -> tuple[list[bytes], list[str]]:
    fetch = fetch_with_curl if shutil.which("curl") else fetch_with_python
    pages: list[bytes] = []
    failures: list[str] = []
    limiter = trio.CapacityLimiter(8)

    async def one() -> None:
        try:
            pages.append(await trio.to_thread.run_sync(fetch, url, ca, limiter=limiter))
        except (OSError, subprocess.SubprocessError, ssl.SSLError) as error:
            failures.append(str(error))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return pages, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="handoffd-https-") as tmp:
        directory = Path(tmp)
        handoffd = [sys.executable, "-m", "handoffd"]
        keygen(directory)  # the Noise listener's key, which every config has
        pki = make_pki(directory)
        config = write_config(directory, args.workers, app="examples.https.app:handler")
        if os.geteuid() == 0:  # the acceptor (not root, not a worker) must read the key
            for path in (pki["cert"], pki["key"]):
                os.chown(path, DEMO_ACCEPTOR_UID, DEMO_ACCEPTOR_UID)
        with config.open("a") as f:
            f.write(
                f'[tls]\nlisten = ["127.0.0.1:0"]\ncertificate = "{pki["cert"]}"\n'
                f'key = "{pki["key"]}"\nalpn = ["http/1.1"]\n'
            )
        print(f"certificate  localhost, issued by a throwaway CA ({pki['ca']})")
        daemon = subprocess.Popen([*handoffd, "serve", "--config", str(config)], cwd=REPO)
        try:
            status = trio.run(wait_ready, directory / "control.sock", daemon)
            port = str(status["tls_listen"][0]).rsplit(":", 1)[1]  # type: ignore[index]
            url = f"https://localhost:{port}/"
            acceptor = int(status["pid"])  # type: ignore[call-overload]
            print(f"daemon       supervisor pid {daemon.pid}, acceptor pid {acceptor}, "
                  f"HTTPS on {url}")
            client = "curl" if shutil.which("curl") else "Python's ssl (curl not installed)"
            print(f"client       {client}: curl --cacert {pki['ca']} {url}")
            pages, failures = trio.run(fetch_all, url, pki["ca"], args.requests)
        finally:
            exit_status = stop_daemon(daemon)

    answers = [ANSWER.search(page) for page in pages]
    pids = sorted({int(m[1]) for m in answers if m})
    print(
        f"requests     {args.requests}: {sum(1 for m in answers if m)} answered by a worker, "
        f"{len(failures)} failed"
    )
    print(
        f"workers      {', '.join(f'pid {pid}' for pid in pids)} (the acceptor is not one "
        "of them: it ran the handshakes and handed each session off)"
    )
    print(f"shutdown     SIGTERM -> exit status {exit_status}")
    for failure in failures[:5]:
        print(f"  {failure}")
    ok = not failures and all(answers) and exit_status == 0 and acceptor not in pids
    print("demo-https   " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
