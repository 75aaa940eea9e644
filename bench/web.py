"""The ASGI example through handoffd against the same app under plain hypercorn (issue 17).

Both serve ``examples.asgi.app:app`` (``GET /whoami``, a JSON answer) over TLS 1.3 with
the same ECDSA P-256 certificate and N workers:

* ``handoffd``: ``handoffd serve`` with ``[workers] asgi`` and a ``[tls]`` listener (the
  acceptor runs the handshakes, each session is handed off to a worker running hypercorn);
* ``hypercorn``: ``hypercorn --workers N --worker-class trio --certfile --keyfile``, the
  handshakes in its workers.

The load (``bench/loadgen.py --kind https``): L processes x C tasks, each connection a
TLS handshake then 10 keep-alive ``GET /whoami`` (h11), checked for 200.  Figures:
requests/s (connections completed in the window x 10), server CPU µs per request, and
the ratio handoffd / hypercorn.  ``python -m bench.web`` runs it alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import REQUESTS_PER_CONNECTION
from bench.run import PY, REPO, Server, Settings, make_tls_cert, run_load, start_handoffd
from handoffd import keyfiles
from handoffd.core.credentials import StaticKeyPair


def start_hypercorn(workers: int, cert: Path, key: Path) -> Server:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [PY, "-m", "hypercorn", "--workers", str(workers), "--worker-class", "trio",
         "--certfile", str(cert), "--keyfile", str(key), "--bind", f"127.0.0.1:{port}",
         "--log-level", "warning", "examples.asgi.app:app"], cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(1.0)  # every worker up, not only the first
            return _Hypercorn([process], port)
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("hypercorn did not start")


class _Hypercorn(Server):
    def pids(self) -> list[int]:
        from bench.common import children

        return [self.processes[0].pid, *children(self.processes[0].pid)]


def run(s: Settings, directory: Path) -> dict[str, Any]:
    keyfiles.save_private_key(directory / "server.key", StaticKeyPair.generate(os.urandom))
    cert, key = make_tls_cert(directory)
    out: dict[str, list[dict[str, Any]]] = {"handoffd": [], "hypercorn": []}

    def asgi(config: Path) -> None:
        line = '[workers]\nasgi = "examples.asgi.app:app"\n'
        config.write_text(config.read_text().replace("[workers]\n", line, 1))

    for _ in range(s.repeats):
        daemon = start_handoffd(directory, s.workers, configure=asgi, tls=(cert, key))
        try:
            out["handoffd"].append(run_load(daemon, "https", ["--cafile", str(cert)], s))
        finally:
            daemon.stop()
        plain = start_hypercorn(s.workers, cert, key)
        try:
            out["hypercorn"].append(run_load(plain, "https", ["--cafile", str(cert)], s))
        finally:
            plain.stop()

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    per_s = {k: median([r["conn_per_s"] for r in v]) * REQUESTS_PER_CONNECTION
             for k, v in out.items()}
    cpu = {k: median([(r["server_cpu_us_per_conn"] or 0.0) for r in v])
           / REQUESTS_PER_CONNECTION for k, v in out.items()}
    return {
        "what": "examples.asgi.app GET /whoami over TLS 1.3, 10 keep-alive requests per "
                "connection, N workers each",
        "requests_per_s": per_s,
        "server_cpu_us_per_request": cpu,
        "handoffd_over_hypercorn": per_s["handoffd"] / per_s["hypercorn"],
        "client_errors": {k: sum(r["errors"] for r in v) for k, v in out.items()},
        "runs_requests_per_s": {k: [r["conn_per_s"] * REQUESTS_PER_CONNECTION for r in v]
                                for k, v in out.items()},
    }


def main() -> None:
    quick = "--quick" in sys.argv
    s = Settings.from_env(Settings.quick() if quick else Settings.full())
    with tempfile.TemporaryDirectory(prefix="handoffd-bench-web-") as tmp:
        os.chmod(tmp, 0o755)
        print(json.dumps(run(s, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
