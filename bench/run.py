"""``make bench``: handoffd measured against its alternatives, in one run, on one machine.

``python -m bench.run [--quick] [--out bench/results]`` writes ``latest.json``
and ``latest.png`` there and prints a table (ratios included).  What each
number means and how it is measured: ``docs/BENCHMARKS.md``.

All load comes from separate processes over loopback; every loop is bounded by
a count and a deadline; the whole run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography
import trio

from bench import wrap
from bench.common import children, cpu_seconds, fd_count, rss_mib
from examples.echo.demo import DEMO_ACCEPTOR_UID, write_config
from handoffd import keyfiles
from handoffd.core.credentials import StaticKeyPair
from handoffd.runtime.control import query_control
from handoffd.status import GSSError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Settings:
    """How much to measure: the full run, or tiny counts for the smoke test."""

    workers: int
    load_processes: int
    concurrency: int
    warmup: float
    duration: float
    repeats: int
    max_connections: int
    handoff_contexts: int
    handoff_rounds: int
    latency_count: int
    wrap_seconds: float

    @classmethod
    def full(cls) -> Settings:
        cores = os.cpu_count() or 1
        return cls(workers=cores, load_processes=cores, concurrency=16, warmup=1.0,
                   duration=6.0, repeats=3, max_connections=200_000, handoff_contexts=2000,
                   handoff_rounds=5, latency_count=2000, wrap_seconds=0.4)

    @classmethod
    def from_env(cls, base: Settings, environ: dict[str, str] | None = None) -> Settings:
        """``base`` with the ``BENCH_*`` knobs of the environment applied (see ENV_KNOBS)."""
        env = dict(os.environ if environ is None else environ)
        values = vars(base).copy()
        for name, field_name in ENV_KNOBS.items():
            if env.get(name):
                kind = type(values[field_name])
                try:
                    values[field_name] = kind(env[name])
                except ValueError:
                    raise SystemExit(f"{name}={env[name]!r} is not a {kind.__name__}") from None
        return cls(**values)

    @classmethod
    def quick(cls) -> Settings:
        return cls(workers=2, load_processes=1, concurrency=4, warmup=0.2, duration=0.5,
                   repeats=1, max_connections=500, handoff_contexts=40, handoff_rounds=1,
                   latency_count=40, wrap_seconds=0.02)


ENV_KNOBS = {
    "BENCH_WORKERS": "workers",
    "BENCH_LOAD_PROCESSES": "load_processes",
    "BENCH_CONCURRENCY": "concurrency",
    "BENCH_WARMUP": "warmup",
    "BENCH_DURATION": "duration",
    "BENCH_REPEATS": "repeats",
    "BENCH_HANDOFF_CONTEXTS": "handoff_contexts",
    "BENCH_HANDOFF_ROUNDS": "handoff_rounds",
    "BENCH_LATENCY_COUNT": "latency_count",
}
"""Environment variables that override a ``Settings`` field (``make bench BENCH_REPEATS=5``)."""

READY_TIMEOUT = 60.0
"""Seconds a server under test may take to start."""


# ---------------------------------------------------------------------------- set-up


def make_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for ``localhost`` / 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- servers


class Server:
    """A running server under test: its pids (for CPU, RSS) and its port."""

    def __init__(self, processes: list[subprocess.Popen[bytes]], port: int,
                 control: Path | None = None) -> None:
        self.processes = processes
        self.port = port
        self.control = control

    def pids(self) -> list[int]:
        pids = [p.pid for p in self.processes]
        if self.control is not None:  # handoffd: supervisor, acceptor and workers
            pids += children(self.processes[0].pid)
        return pids

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_handoffd(directory: Path, workers: int,
                   configure: Callable[[Path], None] | None = None,
                   tls: tuple[Path, Path] | None = None) -> Server:
    """``handoffd serve`` on the demo's config (log level warning), once N workers are
    ready; ``configure`` may edit the config file before the daemon starts.  ``tls``
    (certificate, key): also a ``[tls]`` listener, and the server's port is that one."""
    config = write_config(directory, workers, log_level="warning")
    if tls is not None:
        if os.geteuid() == 0:  # only the acceptor reads the key, as shipped
            for path in tls:
                os.chown(path, DEMO_ACCEPTOR_UID, DEMO_ACCEPTOR_UID)
        with config.open("a") as f:
            f.write(f'[tls]\nlisten = ["127.0.0.1:0"]\ncertificate = "{tls[0]}"\n'
                    f'key = "{tls[1]}"\n')
    if configure is not None:
        configure(config)
    process = subprocess.Popen([PY, "-m", "handoffd", "serve", "--config", str(config)],
                               cwd=REPO)
    control = directory / "control.sock"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"handoffd serve did not start (exit {process.returncode})")
        try:
            status = trio.run(query_control, control)
            ready = [w for w in status["workers"] if w["state"] == "ready"]
            if status["listen"] and len(ready) >= workers:
                break
        except GSSError:
            pass
        time.sleep(0.05)
    port = int(status["tls_listen" if tls else "listen"][0].rsplit(":", 1)[1])
    return Server([process], port, control)


def start_prefork(kind: str, workers: int, key: Path, cert: Path | None) -> Server:
    # Hold the port with SO_REUSEPORT (not listening) while the workers bind it.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    argv = [PY, "-m", "bench.servers", "--kind", kind, "--port", str(port), "--key", str(key)]
    if cert is not None:
        argv += ["--cert", str(cert)]
    processes = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE)
                 for _ in range(workers)]
    server = Server(processes, port)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        for p in processes:
            assert p.stdout is not None
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready or p.stdout.readline().strip() != b"ready":
                server.stop()
                raise SystemExit(f"bench.servers --kind {kind} did not start")
    finally:
        holder.close()
    return server


def tls_probe(port: int, cafile: Path, *, x25519_only: bool = True) -> dict[str, Any]:
    """Prove what the TLS contender negotiates: TLS 1.3, X25519, an ECDSA P-256 certificate.

    One handshake offering only X25519 must succeed with TLS 1.3 and a P-256 key in the
    certificate; one offering only P-256 key exchange must be refused, so every load
    connection (whose clients offer X25519 only) used X25519.  Exits otherwise.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from bench.loadgen import tls_client_context

    def handshake(group: str) -> tuple[str | None, str, bytes | None]:
        context = tls_client_context(str(cafile), group)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            cipher = tls.cipher()
            return tls.version(), cipher[0] if cipher else "", tls.getpeercert(binary_form=True)

    version, cipher, der = handshake("X25519")
    key = x509.load_der_x509_certificate(der).public_key() if der else None
    if version != "TLSv1.3":
        raise SystemExit(f"TLS contender negotiated {version}, not TLSv1.3")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SystemExit(f"TLS contender's certificate key is {key!r}, not ECDSA P-256")
    if not x25519_only:  # handoffd keeps OpenSSL's groups; the load clients offer X25519 only
        return {"version": version, "cipher": cipher, "group": "X25519 (offered alone)",
                "certificate": "ECDSA P-256 (secp256r1)"}
    try:
        handshake("prime256v1")
    except (ssl.SSLError, ConnectionError):  # no common group: the server ends the handshake
        pass
    else:
        raise SystemExit("TLS contender accepted a P-256 key exchange: X25519 is not enforced")
    return {"version": version, "cipher": cipher, "group": "X25519",
            "certificate": "ECDSA P-256 (secp256r1)", "p256_key_exchange_refused": True}


def snapshot(server: Server) -> dict[str, Any]:
    assert server.control is not None
    return trio.run(query_control, server.control)


# ---------------------------------------------------------------------------- load


def run_load(server: Server, kind: str, client_arg: list[str], s: Settings,
             rate: float | None = None) -> dict[str, Any]:
    """The multi-process load generator against ``server``; rate and server CPU per conn."""
    start_at = time.monotonic() + 1.0  # every generator imported and waiting
    argv = [PY, "-m", "bench.loadgen", "--kind", kind, "--port", str(server.port),
            *client_arg, "--concurrency", str(s.concurrency),
            "--max-connections", str(s.max_connections // s.load_processes),
            "--start-at", repr(start_at), "--warmup", str(s.warmup),
            "--duration", str(s.duration)]
    if rate is not None:
        argv += ["--rate", str(rate / s.load_processes)]
    generators = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE)
                  for _ in range(s.load_processes)]
    pids = server.pids()
    clients = [g.pid for g in generators]
    time.sleep(max(0.0, start_at + s.warmup - time.monotonic()))
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    client_before = sum(cpu_seconds(pid) for pid in clients)
    machine_before = machine_busy_seconds()
    time.sleep(max(0.0, start_at + s.warmup + s.duration - time.monotonic()))
    cpu_after = sum(cpu_seconds(pid) for pid in pids)
    client_after = sum(cpu_seconds(pid) for pid in clients)
    machine_after = machine_busy_seconds()
    results = []
    for g in generators:
        out, _ = g.communicate(timeout=s.warmup + s.duration + 60)
        results.append(json.loads(out))
    completed = sum(r["completed"] for r in results)
    errors = sum(r["errors"] for r in results)
    samples = [e for r in results for e in r["error_samples"]]
    if errors:
        print(f"  {kind}: {errors} client errors, e.g. {samples[:2]}", file=sys.stderr)
    return {
        "conn_per_s": completed / s.duration,
        "server_cpu_us_per_conn": (cpu_after - cpu_before) / completed * 1e6
        if completed else None,
        "client_cpu_us_per_conn": (client_after - client_before) / completed * 1e6
        if completed else None,
        # Share of all cores busy during the window (anyone's processes): near 1.0 means
        # the machine, not one process, was the bottleneck.
        "machine_busy": (machine_after - machine_before) / s.duration / (os.cpu_count() or 1),
        "errors": errors,
        "conn_ms_p50": sorted(r["conn_ms_p50"] or 0 for r in results)[len(results) // 2],
    }


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy (not idle or iowait) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - fields[3] - fields[4]) / ticks


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def e2e(s: Settings, directory: Path) -> dict[str, Any]:
    """The three servers, same N, same load generator, interleaved over the repeats."""
    server_key = directory / "server.key"
    keyfiles.save_private_key(server_key, StaticKeyPair.generate(os.urandom))
    fingerprint = keyfiles.load_private_key(server_key).fingerprint
    cert, tls_key = make_tls_cert(directory)
    noise_arg = ["--fingerprint", fingerprint]
    runs: dict[str, list[dict[str, Any]]] = {
        "handoffd": [], "inprocess": [], "tls_prefork": [], "tls_handoffd": []}
    out: dict[str, Any] = {}
    for _ in range(s.repeats):
        daemon = start_handoffd(directory, s.workers)
        try:
            acceptor = snapshot(daemon)["pid"]  # the key holder (run as root: not the
            fds_before = fd_count(acceptor)    # supervisor that serve's pid names)
            runs["handoffd"].append(run_load(daemon, "noise", noise_arg, s))
            status = snapshot(daemon)
            deadline = time.monotonic() + 10
            while (sum(w["in_flight"] for w in status["workers"]) and
                   time.monotonic() < deadline):
                time.sleep(0.05)
                status = snapshot(daemon)
            time.sleep(0.2)  # sessions finish; the acceptor closed its copies at the acks
            out["handoff_latency_daemon_saturated_us"] = status["handoff_latency_us"]
            out["fd_count_before"] = fds_before
            out["fd_count_after"] = fd_count(acceptor)
            out["rss_mib"] = {
                "acceptor": rss_mib(acceptor),
                "worker": max(rss_mib(w["pid"]) for w in status["workers"]),
            }
            out["daemon_totals"] = status["totals"]
        finally:
            daemon.stop()
        prefork = start_prefork("noise", s.workers, server_key, None)
        try:
            runs["inprocess"].append(run_load(prefork, "noise", noise_arg, s))
        finally:
            prefork.stop()
        prefork = start_prefork("tls", s.workers, tls_key, cert)
        try:
            out["tls_negotiated"] = tls_probe(prefork.port, cert)
            runs["tls_prefork"].append(run_load(prefork, "tls", ["--cafile", str(cert)], s))
        finally:
            prefork.stop()
        daemon = start_handoffd(directory, s.workers, tls=(cert, tls_key))
        try:
            out["tls_handoffd_negotiated"] = tls_probe(daemon.port, cert, x25519_only=False)
            runs["tls_handoffd"].append(run_load(daemon, "tls", ["--cafile", str(cert)], s))
        finally:
            daemon.stop()
    out["e2e_conn_per_s"] = {k: median([r["conn_per_s"] for r in v]) for k, v in runs.items()}
    out["e2e_conn_per_s_runs"] = {k: [r["conn_per_s"] for r in v] for k, v in runs.items()}
    out["server_cpu_us_per_conn"] = {
        k: median([r["server_cpu_us_per_conn"] or 0.0 for r in v]) for k, v in runs.items()}
    out["client_cpu_us_per_conn"] = {
        k: median([r["client_cpu_us_per_conn"] or 0.0 for r in v]) for k, v in runs.items()}
    out["machine_busy"] = {k: median([r["machine_busy"] for r in v]) for k, v in runs.items()}
    out["client_errors"] = {k: sum(r["errors"] for r in v) for k, v in runs.items()}
    # The daemon's own latency figure (handshake done -> ACK processed by the acceptor)
    # on a fresh daemon at moderate load: half the saturated connection rate, paced.
    daemon = start_handoffd(directory, s.workers)
    try:
        moderate = out["e2e_conn_per_s"]["handoffd"] * 0.5
        run_load(daemon, "noise", noise_arg, s, rate=moderate)
        out["handoff_latency_daemon_moderate_us"] = snapshot(daemon)["handoff_latency_us"]
        out["moderate_conn_per_s"] = moderate
    finally:
        daemon.stop()
    return out


# ---------------------------------------------------------------------------- sections


def handoff_path(s: Settings, moderate_per_s: float) -> dict[str, Any]:
    """The handoff path alone; the headline latency is paced at ``moderate_per_s``."""
    argv = [PY, "-m", "bench.handoff_path", "--workers", str(s.workers),
            "--contexts", str(s.handoff_contexts), "--rounds", str(s.handoff_rounds),
            "--latency-count", str(s.latency_count), "--latency-rate", repr(moderate_per_s)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, check=True, timeout=300)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def wakeup_floor(s: Settings, rate: float) -> dict[str, Any]:
    """``bench.wakeup`` at ``rate``: one-way process wake-up latency, the handoff's floor."""
    argv = [PY, "-m", "bench.wakeup", "--rate", repr(rate), "--count", str(s.latency_count)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, check=True, timeout=120)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def under_attack_section(quick: bool) -> dict[str, Any]:
    """``bench/under_attack.py``'s scenario (``--quick``: its tiny counts)."""
    from bench import under_attack

    scenario = under_attack.Scenario.quick() if quick else under_attack.Scenario.full()
    with tempfile.TemporaryDirectory(prefix="handoffd-bench-attack-") as tmp:
        return under_attack.run(scenario, Path(tmp))


def acceptors_section(s: Settings, quick: bool) -> dict[str, Any]:
    """``bench/acceptors.py``: conn/s with ``[server] acceptors`` = 1 and 2."""
    from bench import acceptors

    return acceptors.run(s, quick=quick)


def web_section(s: Settings) -> dict[str, Any]:
    """``bench/web.py``: requests/s of examples.asgi through handoffd and plain hypercorn."""
    from bench import web

    with tempfile.TemporaryDirectory(prefix="handoffd-bench-web-") as tmp:
        os.chmod(tmp, 0o755)
        return web.run(s, Path(tmp))


def micro() -> dict[str, Any]:
    """``bench/micro.py``'s per-operation costs, if that module exists."""
    try:
        from bench import micro as micro_module
    except ImportError:
        return {"note": "bench/micro.py is not there yet: no per-operation costs in this run"}
    result: dict[str, Any] = micro_module.run()
    return result


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "cryptography": cryptography.__version__,
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "kernel": platform.release(),
        "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratios(r: dict[str, Any]) -> dict[str, float]:
    e2e = r["e2e_conn_per_s"]
    w = r["wrap_mib_s"]
    cpu = r["server_cpu_us_per_conn"]
    return {
        "handoffd_over_inprocess": e2e["handoffd"] / e2e["inprocess"],
        "handoffd_over_tls_prefork": e2e["handoffd"] / e2e["tls_prefork"],
        "inprocess_over_tls_prefork": e2e["inprocess"] / e2e["tls_prefork"],
        "tls_handoffd_over_tls_prefork": e2e["tls_handoffd"] / e2e["tls_prefork"],
        "cpu_handoffd_over_inprocess": cpu["handoffd"] / cpu["inprocess"]
        if cpu["inprocess"] else 0.0,
        "raw_aead_over_handoffd_wrap_16k": w["raw_aead_16k"] / w["handoffd_16k"],
        "raw_aead_over_handoffd_wrap_1k": w["raw_aead_1k"] / w["handoffd_1k"],
        "raw_aesgcm_over_tls_record_16k": w["raw_aesgcm_16k"] / w["tls_record_16k"],
    }


def targets(r: dict[str, Any]) -> dict[str, bool]:
    q = r["ratios"]
    return {
        "e2e_handoffd_at_least_0.9_inprocess": q["handoffd_over_inprocess"] >= 0.9,
        "handoff_p99_under_250us": r["handoff_latency_us"]["p99"] < 250,
        "wrap_16k_within_1.5x_raw_aead": q["raw_aead_over_handoffd_wrap_16k"] <= 1.5,
        "handoffd_at_least_tls_prefork": q["handoffd_over_tls_prefork"] >= 1.0,
        "tls_handoffd_at_least_0.9_tls_prefork": q["tls_handoffd_over_tls_prefork"] >= 0.9,
        "tls_record_16k_within_1.5x_raw_aead": q["raw_aesgcm_over_tls_record_16k"] <= 1.5,
    }


def table(r: dict[str, Any]) -> str:
    e2e, cpu, w, q = (r["e2e_conn_per_s"], r["server_cpu_us_per_conn"], r["wrap_mib_s"],
                      r["ratios"])
    dm, ds = r["handoff_latency_daemon_moderate_us"], r["handoff_latency_daemon_saturated_us"]
    m = r["machine"]
    names = ("handoffd", "inprocess", "tls_prefork")

    def us(d: dict[str, float | None]) -> str:
        return "/".join("-" if d[k] is None else f"{d[k]:.0f}" for k in ("p50", "p99"))

    lines = [
        f"handoffd bench: {m['cores']} cores ({m['cpu']}), Python {m['python']}, trio "
        f"{m['trio']}, cryptography {m['cryptography']}, kernel {m['kernel']}",
        f"N = {r['settings']['workers']} workers, {r['settings']['load_processes']} load "
        f"processes x {r['settings']['concurrency']} connections in flight",
        "",
        f"{'metric':44} {'value':>12}  ratio",
        f"{'e2e conn/s handoffd (handshake+64 B echo)':44} {e2e['handoffd']:12.0f}  "
        f"{q['handoffd_over_inprocess']:.2f} x inprocess, "
        f"{q['handoffd_over_tls_prefork']:.2f} x tls_prefork",
        f"{'e2e conn/s inprocess (Noise in N workers)':44} {e2e['inprocess']:12.0f}  1.00",
        f"{'e2e conn/s tls_prefork (TLS 1.3 in N workers)':44} {e2e['tls_prefork']:12.0f}  "
        f"{q['inprocess_over_tls_prefork']:.2f} (inprocess / tls)",
        f"{'e2e conn/s tls_handoffd (TLS 1.3 handed off)':44} {e2e['tls_handoffd']:12.0f}  "
        f"{q['tls_handoffd_over_tls_prefork']:.2f} x tls_prefork",
        f"{'server CPU us/conn tls_handoffd':44} {cpu['tls_handoffd']:12.0f}",
        f"{'server CPU us/conn handoffd':44} {cpu['handoffd']:12.0f}  "
        f"{q['cpu_handoffd_over_inprocess']:.2f} x inprocess",
        f"{'server CPU us/conn inprocess':44} {cpu['inprocess']:12.0f}",
        f"{'server CPU us/conn tls_prefork':44} {cpu['tls_prefork']:12.0f}",
        f"{'client CPU us/conn hd / inproc / tls':44} "
        + " / ".join(f"{r['client_cpu_us_per_conn'][k]:.0f}" for k in names),
        f"{'cores busy (machine-wide) hd / inproc / tls':44} "
        + " / ".join(f"{r['machine_busy'][k]:.2f}" for k in names),
        f"{'handoffs/s (handoff path alone)':44} {r['handoffs_per_s']:12.0f}",
        *(f"{'handoff us p50/p99 at ' + format(b['load_per_s'], '.0f') + '/s' + note:44} "
          f"{us(b):>12}"
          for b, note in zip(r["handoff_path"]["handoff_latency_by_load"],
                             (" (moderate)", " (1/2 path max)"), strict=False)),
        f"{'  bare process wake-up p50/p99 (floor)':44} {us(r['wakeup_latency_us']):>12}",
        f"{'  daemon figure p50/p99 (to ACK, moderate)':44} {us(dm):>12}",
        f"{'  daemon figure p50/p99 (to ACK, saturated)':44} {us(ds):>12}",
        f"{'wrap MiB/s 16 KiB handoffd / raw AEAD':44} "
        f"{w['handoffd_16k']:5.0f} / {w['raw_aead_16k']:<5.0f} "
        f"raw {q['raw_aead_over_handoffd_wrap_16k']:.2f} x faster",
        f"{'wrap MiB/s 1 KiB handoffd / raw AEAD':44} "
        f"{w['handoffd_1k']:5.0f} / {w['raw_aead_1k']:<5.0f} "
        f"raw {q['raw_aead_over_handoffd_wrap_1k']:.2f} x faster",
        f"{'TLS record MiB/s 16 KiB handoffd / raw AEAD':44} "
        f"{w['tls_record_16k']:5.0f} / {w['raw_aesgcm_16k']:<5.0f} "
        f"raw {q['raw_aesgcm_over_tls_record_16k']:.2f} x faster",
        f"{'RSS MiB acceptor / worker':44} "
        f"{r['rss_mib']['acceptor']:5.1f} / {r['rss_mib']['worker']:<5.1f}",
        f"{'acceptor fds before / after load':44} "
        f"{r['fd_count_before']:5d} / {r['fd_count_after']:<5d}",
        f"TLS contender: {r['tls_negotiated']['version']} {r['tls_negotiated']['group']} "
        f"{r['tls_negotiated']['cipher']}, {r['tls_negotiated']['certificate']} (asserted)",
        *under_attack_lines(r),
        *acceptors_lines(r),
        *web_lines(r),
        "",
        "targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}"
                                for k, v in r["targets"].items()),
    ]
    return "\n".join(lines)


def acceptors_lines(r: dict[str, Any]) -> list[str]:
    """The ``acceptors`` rows of the table (none in a result from before it existed)."""
    if "acceptors" not in r:
        return []
    from bench.acceptors import lines

    return lines(r["acceptors"])


def web_lines(r: dict[str, Any]) -> list[str]:
    """The ``web`` rows of the table (none in a result from before it existed)."""
    if "web" not in r:
        return []
    w = r["web"]
    return [
        f"{'web req/s ASGI example, TLS, 10/conn: handoffd':44} "
        f"{w['requests_per_s']['handoffd']:12.0f}  {w['handoffd_over_hypercorn']:.2f} x hypercorn",
        f"{'web req/s same app under plain hypercorn':44} {w['requests_per_s']['hypercorn']:12.0f}",
    ]


def under_attack_lines(r: dict[str, Any]) -> list[str]:
    """The ``under_attack`` rows of the table (none in a result from before it existed)."""
    if "under_attack" not in r:
        return []
    from bench.under_attack import table_lines

    return table_lines(r["under_attack"])


def plot(r: dict[str, Any], path: Path) -> bool:
    """The PNG; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names = ["handoffd", "inprocess", "tls_prefork", "tls_handoffd"]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    ax = axes[0][0]
    ax.bar(names, [r["e2e_conn_per_s"][n] for n in names], color=colors)
    ax.set_title(f"new connections/s (handshake + 64 B echo), N={r['settings']['workers']}")
    ax = axes[0][1]
    ax.bar(names, [r["server_cpu_us_per_conn"][n] for n in names], color=colors)
    ax.set_title("server CPU per connection (µs, all server processes)")
    ax = axes[1][0]
    labels = ["16 KiB", "1 KiB"]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [r["wrap_mib_s"]["handoffd_16k"], r["wrap_mib_s"]["handoffd_1k"]],
           width=0.4, label="handoffd wrap")
    ax.bar([x + 0.2 for x in xs], [r["wrap_mib_s"]["raw_aead_16k"], r["wrap_mib_s"]["raw_aead_1k"]],
           width=0.4, label="raw ChaCha20-Poly1305")
    ax.set_xticks(list(xs), labels)
    ax.set_title("wrap throughput (MiB/s)")
    ax.legend()
    ax = axes[1][1]
    groups = [("handoff path\n(moderate)", r["handoff_latency_us"]),
              ("handoff path\n(1/2 path max)", r["handoff_path"]["handoff_latency_by_load"][-1]),
              ("bare wake-up\n(floor)", r["wakeup_latency_us"]),
              ("daemon to ACK\n(moderate)", r["handoff_latency_daemon_moderate_us"]),
              ("daemon to ACK\n(saturated)", r["handoff_latency_daemon_saturated_us"])]
    xs = range(len(groups))
    ax.bar([x - 0.2 for x in xs], [g[1]["p50"] or 0 for g in groups], width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [g[1]["p99"] or 0 for g in groups], width=0.4, label="p99")
    ax.set_xticks(list(xs), [g[0] for g in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_title("handoff latency (µs, log scale)")
    ax.legend()
    m = r["machine"]
    fig.suptitle(f"handoffd bench — {m['cores']} cores, Python {m['python']}, kernel "
                 f"{m['kernel']}, {r['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run every section, write the JSON and PNG, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    parser.add_argument("--no-micro", action="store_true")
    args = parser.parse_args(argv)
    s = Settings.from_env(Settings.quick() if args.quick else Settings.full())
    started = time.monotonic()
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "make bench" if not args.quick else "python -m bench.run --quick",
        "machine": machine(),
        "settings": vars(s),
    }
    print("wrap throughput ...", flush=True)
    result["wrap_mib_s"] = wrap.run(max_seconds=s.wrap_seconds)
    print("end to end: handoffd, in-process Noise, TLS pre-fork ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="handoffd-bench-") as tmp:
        result.update(e2e(s, Path(tmp)))
    # "Moderate load" for the handoff latency is the handoff rate the daemon itself sees at
    # moderate load (half its saturated connection rate), not half of what the bare
    # handoff path can do (several times more than the daemon ever hands off).
    print("handoff path against real workers ...", flush=True)
    path = handoff_path(s, result["moderate_conn_per_s"])
    result["handoffs_per_s"] = path.pop("handoffs_per_s")
    result["handoff_latency_us"] = path.pop("handoff_latency_us")
    result["handoff_path"] = path
    # The machine's floor for the same hop: a bare process wake-up at the same pace.
    result["wakeup_latency_us"] = wakeup_floor(s, result["moderate_conn_per_s"])
    result["micro"] = {"note": "skipped (--no-micro)"} if args.no_micro else micro()
    # Last, on a fresh daemon: hostile clients beside a legitimate one (bench/under_attack).
    print("under attack: slowloris + replay flood beside a legitimate client ...", flush=True)
    result["under_attack"] = under_attack_section(args.quick)
    # One acceptor against two, acceptor-bound (CPU-capped) and as is (bench/acceptors.py).
    print("acceptors: 1 against 2, capped and uncapped ...", flush=True)
    result["acceptors"] = acceptors_section(s, args.quick)
    # The ASGI example through handoffd against plain hypercorn, TLS both (bench/web.py).
    print("web: the ASGI example through handoffd and under plain hypercorn ...", flush=True)
    result["web"] = web_section(s)
    result["ratios"] = ratios(result)
    result["targets"] = targets(result)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    plotted = plot(result, args.out / "latest.png")
    print()
    print(table(result))
    if "per_message_us" in result["micro"]:
        from bench.micro import table as micro_table

        print("\nper operation (bench/micro.py):\n" + micro_table(result["micro"]))
    print(f"\nwrote {args.out / 'latest.json'}"
          + (f" and {args.out / 'latest.png'}" if plotted else " (no plot: matplotlib missing)")
          + f" in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
