"""The acceptor's edges: several addresses and IPv6, pipelined bytes, registration
impostors, the metrics endpoint, and logs that never carry key material."""

from __future__ import annotations

import base64
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from handoffd import keyfiles
from handoffd.core.framing import FrameType, encode_frame
from handoffd.runtime.client import connect
from handoffd.status import GSSError
from tests.daemon_harness import REPO, pipelined_client, read_line, start_daemon


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_listens_on_several_addresses_ipv4_and_ipv6(tmp_path: Path) -> None:
    v4, v6 = _free_port(), _free_port("::1")
    daemon = await start_daemon(tmp_path, workers=2, extra=(
        f'[server]\nlisten = ["127.0.0.1:{v4}", "[::1]:{v6}"]'))
    try:
        status = await daemon.status()
        assert sorted(status["listen"]) == sorted([f"127.0.0.1:{v4}", f"[::1]:{v6}"])
        for host, port in (("127.0.0.1", v4), ("::1", v6)):
            stream = await connect(host, port, server_fingerprint=daemon.fingerprint)
            async with stream:
                line = await stream.receive_some()
                await stream.send_all(b"ping")
                assert await stream.receive_some() == b"ping"
                assert int(line) in await daemon.worker_pids()
    finally:
        assert await daemon.stop() == 0


async def test_bytes_pipelined_after_the_last_handshake_message_reach_the_worker(
    tmp_path: Path,
) -> None:
    """The client's first message rides in the same segment as its last handshake token:
    the acceptor read it before exporting, and it must arrive at the worker."""
    daemon = await start_daemon(tmp_path, workers=1)
    try:
        stream = await pipelined_client(daemon, [b"sent before the handshake was even answered\n",
                                                 b"and a second one\n"])
        async with stream:
            received = b""
            expected = b"sent before the handshake was even answered\nand a second one\n"
            with trio.fail_after(10):
                while not received.endswith(expected):
                    chunk = await stream.receive_some()
                    assert chunk, received
                    received += chunk
            pid, echoed = received.split(b"\n", 1)
            assert echoed == expected and int(pid) in await daemon.worker_pids()
    finally:
        assert await daemon.stop() == 0


# Started as root so that the interpreter (under /root here) loads, then it drops to
# nobody before it knocks: the acceptor sees uid 65534 in SO_PEERCRED.
_REGISTER = """
import os, sys, trio
from handoffd.runtime.worker import HandoffReceiver
from handoffd.status import GSSError
os.setgroups([]); os.setgid(65534); os.setuid(65534)
async def main():
    try:
        await HandoffReceiver.register(sys.argv[1], acceptor_uids=frozenset({0}))
    except GSSError as error:
        print(f"refused {error.major:#x} {error.minor}")
        return
    print("registered")
trio.run(main)
"""


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another uid")
async def test_a_process_of_another_uid_cannot_register_as_a_worker(tmp_path: Path) -> None:
    """An impostor reaching the registration socket (its group may connect: the socket
    is 0660 with ``register_group``) is refused by the uid policy, and no worker is
    added."""
    rundir = Path(tempfile.mkdtemp(prefix="handoffd-reg-", dir="/tmp"))
    rundir.chmod(0o755)  # let the impostor reach the socket: the policy must stop it
    register = rundir / "register.sock"
    daemon = await start_daemon(tmp_path, workers=1,
                                extra=f'[workers]\nregister_socket = "{register}"\n'
                                      'register_group = "65534"\n'
                                      '[policy]\nworker_uids = [64999]')
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        impostor = await trio.run_process(
            [sys.executable, "-c", _REGISTER, str(register)], capture_stdout=True,
            capture_stderr=True, check=False, env=env, cwd="/")
        out = impostor.stdout.decode()
        assert out.startswith("refused"), out + impostor.stderr.decode()
        assert out.split()[2] == "400", out  # PEER_UID_NOT_ALLOWED
        status = await daemon.status()
        assert not [w for w in status["workers"] if w["external"]]
        assert status["totals"]["registrations_refused"] == 1
    finally:
        assert await daemon.stop() == 0
        for leftover in rundir.iterdir():
            leftover.unlink()
        rundir.rmdir()


async def test_metrics_endpoint_counts_what_happened(tmp_path: Path) -> None:
    port = _free_port()
    daemon = await start_daemon(tmp_path, workers=2,
                                extra=f'[control]\nmetrics = "127.0.0.1:{port}"')
    try:
        for _ in range(3):
            stream = await daemon.connect()
            async with stream:
                await stream.receive_some()
        garbage = await trio.open_tcp_stream(daemon.host, daemon.port)
        await garbage.send_all(encode_frame(FrameType.HANDSHAKE, b"\x60\x02\x06\x00"))
        await garbage.receive_some()
        await garbage.aclose()
        with trio.fail_after(10):
            while (await daemon.status())["totals"]["acked"] < 3:
                await trio.sleep(0.05)
        metrics = await _http_get("127.0.0.1", port, "/metrics")
        values = {}
        for line in metrics.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        assert values["handoffd_acked_total"] >= 3
        assert values["handoffd_handshakes_ok_total"] >= 3
        assert values["handoffd_lost_total"] == 0
        assert any(k.startswith("handoffd_handshake_failures_total{") and v >= 1
                   for k, v in values.items())
        assert "# TYPE handoffd_acked_total counter" in metrics
    finally:
        assert await daemon.stop() == 0


async def _http_get(host: str, port: int, path: str) -> str:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0] + b" ", head
    return body.decode()


async def test_logs_carry_no_key_material(tmp_path: Path) -> None:
    """At debug level, through handshakes, handoffs, a refused client and a worker death,
    the daemon's and workers' logs never contain the server key (in any encoding)."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=2, extra='[log]\nlevel = "debug"', log=log)
    try:
        for _ in range(4):
            stream = await daemon.connect()
            async with stream:
                await stream.receive_some()
        dead = (await daemon.worker_pids())[0]
        os.kill(dead, 9)
        # A handoff the kernel queued to the dying worker is never redelivered, so the
        # last client connects once the death is noticed (its pid left the status).
        with trio.fail_after(20):
            while dead in await daemon.worker_pids():
                await trio.sleep(0.05)
        stream = await daemon.connect()
        async with stream:
            await stream.receive_some()
    finally:
        assert await daemon.stop() == 0
    text = log.read_bytes()
    assert b"handoff" in text.lower(), "the log captured nothing: the test would prove nothing"
    private = keyfiles.load_private_key(tmp_path / "server.key").private_bytes
    for form in (private, private.hex().encode(), base64.b64encode(private),
                 base64.b64encode(private).rstrip(b"=")):
        assert form not in text


async def test_a_worker_that_never_acknowledges_is_killed_and_its_handoffs_not_redelivered(
    tmp_path: Path,
) -> None:
    """A stopped worker receives handoffs but never acknowledges: after ack_timeout the
    acceptor has it killed.  What it was sent ends with it (never a second worker for a
    context it may have imported); every other client is served by the other worker."""
    daemon = await start_daemon(tmp_path, workers=2, extra="[workers]\nack_timeout = 1.0")
    try:
        stuck, other = await daemon.worker_pids()
        os.kill(stuck, signal.SIGSTOP)
        served: list[int] = []
        cut: list[BaseException] = []

        async def client() -> None:
            try:
                stream = await daemon.connect()
                async with stream:
                    served.append(int(await read_line(stream)))
            except (GSSError, EOFError, ValueError) as error:
                cut.append(error)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(client)
        assert len(served) + len(cut) == 6 and cut, "no handoff went to the stopped worker"
        assert set(served) == {other}
        status = await daemon.status()
        assert status["totals"]["redelivered"] == 0
        assert status["totals"]["died_unclaimed"] == len(cut)
        assert status["totals"]["lost"] == 0
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(stuck, 0)  # reaped by the supervisor once killed
                await trio.sleep(0.05)
    finally:
        assert await daemon.stop() == 0


async def test_every_start_logs_the_server_key_fingerprint(tmp_path: Path) -> None:
    """Clients pin the key's fingerprint: the acceptor logs it at every start (from the
    key it loaded, so a restart that reuses a key shows it too, not only keygen)."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon(tmp_path, workers=1, log=log)
    assert await daemon.stop() == 0
    assert f"fingerprint {daemon.fingerprint}" in log.read_text()
