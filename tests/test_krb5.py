"""The Kerberos V5 mechanism against a real MIT KDC (k5test), through the real daemon.

A throwaway realm (``KRBTEST.COM``) runs MIT's ``krb5kdc``; the user principal
has a real ticket in a credential cache, the service ``host/localhost`` a key
in a keytab that only the acceptor is configured with.  Needs ``gssapi`` and
``k5test`` (the ``krb5`` extra) and MIT's KDC (``make deps-krb5``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

gssapi = pytest.importorskip("gssapi", reason="the krb5 extra (gssapi) is not installed")
k5test = pytest.importorskip("k5test", reason="k5test (krb5 extra tests) is not installed")
if shutil.which("krb5kdc") is None and not Path("/usr/sbin/krb5kdc").exists():
    pytest.skip("MIT krb5kdc is not installed (make deps-krb5)", allow_module_level=True)

from examples.echo.demo import open_to  # noqa: E402
from handoffd.core.framing import FrameDecoder, FrameType, encode_frame  # noqa: E402
from handoffd.core.handoff import Ack, Hello, Kind  # noqa: E402
from handoffd.kernel.parking import AcceptorParking  # noqa: E402
from handoffd.mech import (  # noqa: E402
    KRB5,
    AcceptorFactory,
    AcceptorHandshake,
    import_session,
)
from handoffd.mech.krb5 import Krb5AcceptorFactory  # noqa: E402
from handoffd.minor import Minor  # noqa: E402
from handoffd.runtime.client import connect, open_krb5_stream  # noqa: E402
from handoffd.runtime.daemon import prepare_handoff, spawn_worker  # noqa: E402
from handoffd.runtime.stream import SecureStream  # noqa: E402
from handoffd.runtime.wire import accept_any_handshake  # noqa: E402
from handoffd.status import (  # noqa: E402
    GSS_ROUTINE_ERROR,
    GSS_S_BAD_MECH,
    GSS_S_DUPLICATE_TOKEN,
    GSS_S_NO_CRED,
    GSSError,
)
from tests.daemon_harness import (  # noqa: E402
    SITE_PACKAGES,
    SYSTEM_PYTHON,
    RunningDaemon,
    read_line,
    separated_uids,
    start_daemon,
)

REPO = Path(__file__).resolve().parents[1]
SERVICE = "host@localhost"
KRB5_ACCEPTOR_UID = separated_uids()[0]
# What the client process needs (config, its ticket cache); never the keytab.
_CLIENT_ENV = ("KRB5_CONFIG", "KRB5_KDC_PROFILE", "KRB5CCNAME", "KRB5RCACHEDIR")


@dataclass
class Realm:
    k5: Any
    keytab: Path  # a copy for the acceptor only, mode 0600

    @property
    def env(self) -> dict[str, str]:
        return {k: v for k, v in self.k5.env.items() if k in _CLIENT_ENV}


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    # A random port base: another test run on the machine may hold the default ports.
    k5 = k5test.K5Realm(portbase=random.randrange(61000, 64000, 10))
    try:
        k5.addprinc("other/localhost")  # in the KDC, not in the acceptor's keytab
        keytab = tmp_path_factory.mktemp("acceptor") / "acceptor.keytab"
        shutil.copyfile(k5.keytab, keytab)
        os.chmod(keytab, 0o600)
        os.unlink(k5.keytab)  # the only copy is the acceptor's
        if os.geteuid() == 0:
            # The acceptor runs under its own uid: it owns its keytab, reads the realm's
            # krb5.conf and writes its replay cache.
            os.chown(keytab, KRB5_ACCEPTOR_UID, KRB5_ACCEPTOR_UID)
            open_to(keytab.parent)
            open_to(Path(k5.env["KRB5_CONFIG"]).parent)
            rcache = k5.env.get("KRB5RCACHEDIR")
            if rcache:
                os.chmod(rcache, 0o1777)
        saved = {k: os.environ.get(k) for k in (*_CLIENT_ENV, "KRB5_KTNAME",
                                               "KRB5_CLIENT_KTNAME")}
        os.environ.update({k: v for k, v in k5.env.items() if k in _CLIENT_ENV})
        for k in ("KRB5_KTNAME", "KRB5_CLIENT_KTNAME"):
            os.environ.pop(k, None)
        try:
            yield Realm(k5, keytab)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        k5.stop()


async def start_krb5_daemon(*args: Any, **kw: Any) -> RunningDaemon:
    """``start_daemon`` with the acceptor under the uid that owns the realm's keytab."""
    return await start_daemon(*args, acceptor_uid=KRB5_ACCEPTOR_UID, **kw)


def krb5_config(realm: Realm, mechanisms: str = '["krb5", "noise"]') -> str:
    return (f"[server]\nmechanisms = {mechanisms}\n"
            f"[krb5]\nkeytab = {str(realm.keytab)!r}\nservice = {SERVICE!r}\n")


async def krb5_connect(daemon: RunningDaemon, service: str = SERVICE) -> SecureStream:
    return await connect(daemon.host, daemon.port, server_fingerprint=None, mech="krb5",
                         service=service, timeout=20)


async def test_client_with_a_ticket_is_served_by_a_worker_without_the_keytab(
        realm: Realm, tmp_path: Path) -> None:
    daemon = await start_krb5_daemon(tmp_path, workers=2, app="tests.krb5_apps:keytab_probe",
                                extra=krb5_config(realm))
    try:
        stream = await krb5_connect(daemon)
        async with stream:
            # MIT names the target with the referral (empty) realm on the initiator side.
            assert str(stream.info["peer_name"]).startswith("host/localhost@")
            report = json.loads(await read_line(stream))
            assert report["pid"] in await daemon.worker_pids()
            assert report["mechanism"] == "krb5"
            assert report["peer_name"] == "user@KRBTEST.COM"
            # The worker knows no keytab and cannot get acceptor credentials; it never
            # had the acceptor's keytab open.
            assert "KRB5_KTNAME" not in report["env"]
            assert str(realm.keytab) not in report["open_files"]
            assert report["acquire_accept_creds"][0] == GSS_S_NO_CRED, report
            for payload in (b"kerberos echo", b"x" * 40000):
                await stream.send_all(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = await stream.receive_some()
                    assert chunk
                    got += chunk
                assert got == payload
        # The same daemon, the same code paths, the other mechanism.
        noise = await daemon.connect()
        async with noise:
            first = json.loads(await read_line(noise))
            assert first["mechanism"] == "noise" and first["peer_name"] == "anonymous"
        status = await daemon.status()
        assert status["totals"]["acked"] == 2 and status["totals"]["lost"] == 0
    finally:
        await daemon.stop()


@pytest.mark.root
async def test_workers_of_another_user_cannot_read_the_keytab(
        realm: Realm, tmp_path: Path, worker_user: tuple[str, int, int],
        open_dir: Path) -> None:
    """``[workers] user``: the acceptor (its own uid) reads its 0600 keytab, its workers
    run as a throwaway user that gets EACCES opening it, and still serve the Kerberos
    client."""
    name, uid, _ = worker_user
    # In a directory the workers may traverse, as under /etc: the keytab (0600, root),
    # krb5.conf (0644; MIT's import reads it) and a replay-cache directory (1777).
    keytab = open_dir / "acceptor.keytab"
    shutil.copyfile(realm.keytab, keytab)
    os.chmod(keytab, 0o600)
    os.chown(keytab, KRB5_ACCEPTOR_UID, KRB5_ACCEPTOR_UID)
    profile = open_dir / "krb5.conf"
    shutil.copyfile(realm.k5.env["KRB5_CONFIG"], profile)
    os.chmod(profile, 0o644)
    rcache = open_dir / "rcache"
    rcache.mkdir()
    os.chmod(rcache, 0o1777)
    extra = (f'[server]\nmechanisms = ["krb5", "noise"]\n'
             f"[krb5]\nkeytab = {str(keytab)!r}\nservice = {SERVICE!r}\n"
             f'[workers]\nuser = "{name}"\n')
    daemon = await start_krb5_daemon(
        tmp_path, workers=2, app="tests.krb5_apps:keytab_probe", extra=extra,
        env={"PYTHONPATH": f"{SITE_PACKAGES}:{REPO}", "KRB5_CONFIG": str(profile),
             "KRB5RCACHEDIR": str(rcache), "HANDOFFD_TEST_KEYTAB": str(keytab)},
        python=SYSTEM_PYTHON)
    try:
        stream = await krb5_connect(daemon)
        async with stream:
            report = json.loads(await read_line(stream))
            assert report["uid"] == uid and report["peer_name"] == "user@KRBTEST.COM"
            assert report["keytab_open"] == "EACCES", report
            await stream.send_all(b"echo across uids")
            got = b""
            while len(got) < 16:
                chunk = await stream.receive_some()
                assert chunk
                got += chunk
            assert got == b"echo across uids"
    finally:
        await daemon.stop()


async def test_a_replayed_wrap_token_after_the_handoff_is_a_duplicate(
        realm: Realm, tmp_path: Path) -> None:
    daemon = await start_krb5_daemon(tmp_path, workers=1, app="tests.apps:pid_echo",
                                     extra=krb5_config(realm))
    try:
        stream = await krb5_connect(daemon)
        await read_line(stream)
        # Sequence numbers continue across the handoff: the worker's imported context
        # takes the client's next token, and detects the same token sent again.
        token = stream.context.wrap(b"once")
        frame = encode_frame(FrameType.MESSAGE, token)
        await stream.transport.send_all(frame)
        assert await stream.receive_some() == b"once"
        await stream.transport.send_all(frame)
        with pytest.raises(GSSError) as caught:
            with trio.fail_after(10):
                await stream.receive_some()
        assert caught.value.major & GSS_S_DUPLICATE_TOKEN, caught.value
        await stream.transport.aclose()
    finally:
        await daemon.stop()


async def test_a_client_without_a_ticket_is_refused(realm: Realm, tmp_path: Path) -> None:
    daemon = await start_krb5_daemon(tmp_path, workers=1, extra=krb5_config(realm))
    saved = os.environ["KRB5CCNAME"]
    os.environ["KRB5CCNAME"] = f"FILE:{tmp_path / 'empty.ccache'}"
    try:
        with pytest.raises(GSSError) as caught:
            await krb5_connect(daemon)
        # MIT's own status, unchanged: no credentials (and its text says so).
        expected = expected_status(lambda: gssapi.SecurityContext(
            name=gssapi.Name(SERVICE, gssapi.NameType.hostbased_service),
            usage="initiate").step())
        # MIT's major unchanged; its minor named as MIT's (the minor field is handoffd's).
        assert (caught.value.major, caught.value.minor) == (expected[0],
                                                            Minor.KRB5_LIBRARY_ERROR)
        assert f"MIT krb5 minor {expected[1]}:" in (caught.value.detail or "")
        assert "credentials" in (caught.value.detail or "").lower()
    finally:
        os.environ["KRB5CCNAME"] = saved
        await daemon.stop()


def expected_status(call: Any) -> tuple[int, int]:
    """(major, minor) the library itself reports for ``call`` (computed, not hard-coded)."""
    try:
        call()
    except gssapi.raw.misc.GSSError as error:
        return int(error.maj_code), int(error.min_code) & 0xFFFFFFFF
    raise AssertionError("the library did not fail")


async def test_a_ticket_for_another_service_is_refused_by_the_acceptor(
        realm: Realm, tmp_path: Path) -> None:
    daemon = await start_krb5_daemon(tmp_path, workers=1, extra=krb5_config(realm))
    try:
        # other/localhost exists in the KDC, so the client gets a ticket, but the
        # acceptor has no key for it: the acceptor's refusal comes back as an ERROR frame.
        with pytest.raises(GSSError) as caught:
            await krb5_connect(daemon, service="other@localhost")
        assert GSS_ROUTINE_ERROR(caught.value.major) != 0
        assert caught.value.detail == "reported by the peer"
        status = await daemon.status()
        assert sum(status["handshake_failures"].values()) == 1
        assert status["totals"]["handoffs"] == 0
        # A service the KDC does not know fails on the client, before any byte is sent.
        with pytest.raises(GSSError) as unknown:
            await krb5_connect(daemon, service="nosuch@localhost")
        assert GSS_ROUTINE_ERROR(unknown.value.major) != 0
        assert "not found" in (unknown.value.detail or "").lower()
    finally:
        await daemon.stop()


async def test_a_krb5_client_is_bad_mech_where_only_noise_is_enabled(
        realm: Realm, tmp_path: Path) -> None:
    daemon = await start_krb5_daemon(tmp_path, workers=1)
    try:
        with pytest.raises(GSSError) as caught:
            await krb5_connect(daemon)
        assert caught.value.major == GSS_S_BAD_MECH
        assert caught.value.minor == Minor.TOKEN_BAD_MECH_OID
    finally:
        await daemon.stop()


async def _handshake_in_process(realm: Realm) -> tuple[
        SecureStream, trio.SocketStream, AcceptorFactory, AcceptorHandshake, FrameDecoder]:
    """A krb5 client with a ticket and the acceptor's side of its handshake, both in this
    process over loopback TCP: (client stream, the acceptor's end of the connection, the
    mechanism picked by OID, its established context, the decoder holding what was read
    past the handshake)."""
    factory = Krb5AcceptorFactory(keytab=realm.keytab, service=SERVICE)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    transport = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
    server_side = await listener.accept()
    await listener.aclose()
    client: SecureStream | None = None

    async def run_client() -> None:
        nonlocal client
        client = await open_krb5_stream(transport, service=SERVICE)

    decoder = FrameDecoder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_client)
        mechanism, context = await accept_any_handshake(
            server_side, {factory.info.oid_der: factory}, decoder)
    assert client is not None
    return client, server_side, mechanism, context, decoder


async def test_mit_export_imports_twice_but_a_handoff_imports_once(
        realm: Realm, tmp_path: Path) -> None:
    """The acceptor's export replayed: MIT alone takes it twice; handoffd's sealed
    handoff is refused by a second worker and by the same worker again."""
    client, server_side, mechanism, context, decoder = await _handshake_in_process(realm)
    assert mechanism.info is KRB5
    inner = context.export(unread=decoder.unread())
    # MIT's token: two live copies, no complaint.
    first, _ = import_session(KRB5, inner, clock=trio.current_time)
    second, _ = import_session(KRB5, inner, clock=trio.current_time)
    assert first.peer_name == second.peer_name == "user@KRBTEST.COM"
    first.delete()
    second.delete()

    parking = AcceptorParking.open(slots_per_worker=2)
    workers = []
    try:
        for _ in range(2):
            worker_id = os.urandom(16)
            process, channel = spawn_worker(parking, worker_id, "tests.apps:pid_echo",
                                            ["--pythonpath", str(REPO)])
            workers.append((worker_id, process, channel))
            with trio.fail_after(20):
                hello = Hello.decode((await channel.receive()).payload)
            assert hello.worker_id == worker_id
            parking.worker_adopted(worker_id)
        (a_id, a_process, a_channel), (_, _, b_channel) = workers
        import time

        _, message = prepare_handoff(parking, a_id, 1, inner, time.time(), mech=KRB5.seal_id)
        fd = server_side.socket.fileno()
        # Replayed to the second worker: it cannot open a token parked for the first.
        spare = socket.socket(fileno=os.dup(fd))
        await b_channel.send(Kind.HANDOFF, message, fd=spare.fileno())
        spare.close()
        with trio.fail_after(20):
            refused = Ack.decode((await b_channel.receive()).payload)
        assert refused.handoff_id == 1 and refused.major != 0
        # The genuine delivery imports and serves the client.
        await a_channel.send(Kind.HANDOFF, message, fd=fd)
        with trio.fail_after(20):
            assert Ack.decode((await a_channel.receive()).payload) == Ack(1)
        assert int(await read_line(client)) == a_process.pid
        await client.send_all(b"after handoff")
        assert await client.receive_some() == b"after handoff"
        # The same token again, even to its own worker: the parked key is burned.
        spare = socket.socket(fileno=os.dup(fd))
        await a_channel.send(Kind.HANDOFF, message, fd=spare.fileno())
        spare.close()
        with trio.fail_after(20):
            again = Ack.decode((await a_channel.receive()).payload)
        assert again.major != 0
        server_side.socket.close()
        await client.aclose()
    finally:
        for _, process, channel in workers:
            process.kill()
            await process.wait()
            channel.close()
        parking.close()


async def test_handoffd_connect_cli_speaks_krb5(realm: Realm, tmp_path: Path) -> None:
    import sys

    daemon = await start_krb5_daemon(tmp_path, workers=1, extra=krb5_config(realm, '["krb5"]'))
    try:
        with trio.fail_after(30):
            result = await trio.run_process(
                [sys.executable, "-m", "handoffd", "connect", "--mech", "krb5", "--service",
                 SERVICE, f"{daemon.host}:{daemon.port}"],
                stdin=b"over kerberos\n", capture_stdout=True, capture_stderr=True, cwd=REPO,
                check=False)
        assert result.returncode == 0, result.stderr
        pid, echoed = result.stdout.decode().splitlines()
        assert int(pid) in await daemon.worker_pids()
        assert echoed == "over kerberos"
    finally:
        await daemon.stop()


async def test_serve_check_acquires_the_keytab_credentials(realm: Realm, tmp_path: Path) -> None:
    import sys

    from tests.daemon_harness import write_config

    async def check(extra: str) -> trio.CompletedProcess[bytes]:
        directory = tmp_path / str(len(list(tmp_path.iterdir())))
        directory.mkdir()
        # --check reads the keytab as the acceptor's uid, which owns it
        config = write_config(directory, workers=1, extra=extra, acceptor_uid=KRB5_ACCEPTOR_UID)
        return await trio.run_process(
            [sys.executable, "-m", "handoffd", "serve", "--config", str(config), "--check"],
            capture_stdout=True, capture_stderr=True, cwd=REPO, check=False)

    ok = await check(krb5_config(realm))
    assert ok.returncode == 0, ok.stderr
    assert f"krb5: keytab {realm.keytab}" in ok.stdout.decode()
    missing = await check(krb5_config(realm).replace(str(realm.keytab),
                                                     str(tmp_path / "absent.keytab")))
    # MIT's status and text for a keytab that is not there, unchanged.
    assert missing.returncode == 1, missing.stderr
    expected = expected_status(lambda: gssapi.Credentials(
        name=gssapi.Name(SERVICE, gssapi.NameType.hostbased_service), usage="accept",
        store={"keytab": str(tmp_path / "elsewhere.keytab")}))
    assert f"(major 0x{expected[0]:08x}, minor {int(Minor.KRB5_LIBRARY_ERROR)})" in \
        missing.stderr.decode()
    assert f"MIT krb5 minor {expected[1]}:" in missing.stderr.decode()


async def test_allowed_principals_admits_only_the_listed_clients(
        realm: Realm, tmp_path: Path) -> None:
    from handoffd.status import GSS_S_UNAUTHORIZED

    (tmp_path / "only").mkdir()
    (tmp_path / "user").mkdir()
    only_other = await start_krb5_daemon(
        tmp_path / "only", workers=1,
        extra=krb5_config(realm) + 'allowed_principals = ["other@KRBTEST.COM"]\n')
    try:
        with pytest.raises(GSSError) as caught:
            await krb5_connect(only_other)
        assert (caught.value.major, caught.value.minor) == (
            GSS_S_UNAUTHORIZED, Minor.KRB5_PRINCIPAL_NOT_ALLOWED)
        status = await only_other.status()
        assert status["totals"]["handoffs"] == 0
    finally:
        await only_other.stop()
    listed = await start_krb5_daemon(
        tmp_path / "user", workers=1,
        extra=krb5_config(realm) + 'allowed_principals = ["user@KRBTEST.COM"]\n')
    try:
        stream = await krb5_connect(listed)
        async with stream:
            assert int(await read_line(stream)) in await listed.worker_pids()
    finally:
        await listed.stop()


async def test_imported_session_mic_and_a_tampered_token_keep_the_library_status(
        realm: Realm) -> None:
    from handoffd.status import GSS_S_BAD_SIG, GSS_S_NO_CONTEXT

    client, server_side, _, context, _ = await _handshake_in_process(realm)
    inner = context.export()
    with pytest.raises(GSSError) as dead:
        context.export()
    assert dead.value.major == GSS_S_NO_CONTEXT  # exported: the acceptor's copy is gone
    worker, unread = import_session(KRB5, inner, clock=trio.current_time)
    assert unread == b""
    mic = worker.get_mic(b"signed")
    initiator = client.context
    assert initiator.verify_mic(b"signed", mic) == 0
    token = bytearray(initiator.wrap(b"secret"))
    assert worker.unwrap(bytes(token)).data == b"secret"
    token = bytearray(initiator.wrap(b"secret"))
    token[-1] ^= 1
    with pytest.raises(GSSError) as caught:
        worker.unwrap(bytes(token))
    # MIT's verdict as it gave it, with its own text rather than one of ours.
    assert caught.value.major == GSS_S_BAD_SIG
    assert caught.value.detail and "Minor" in caught.value.detail
    worker.delete()
    with pytest.raises(GSSError) as gone:
        worker.wrap(b"x")
    assert gone.value.major == GSS_S_NO_CONTEXT
    await client.transport.aclose()
    await server_side.aclose()


class FileOpens:
    """fanotify (real kernel) on one file: the pid of every process that opens it."""

    _FAN_CLASS_NOTIF, _FAN_CLOEXEC, _FAN_NONBLOCK = 0, 1, 2
    _FAN_MARK_ADD, _FAN_OPEN, _AT_FDCWD = 1, 0x20, -100
    _EVENT = "IBBHQii"  # fanotify_event_metadata: len, vers, reserved, metadata_len, mask, fd, pid

    def __init__(self, path: Path) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                       ctypes.c_int, ctypes.c_char_p]
        self.fd = libc.fanotify_init(self._FAN_CLASS_NOTIF | self._FAN_CLOEXEC
                                     | self._FAN_NONBLOCK, os.O_RDONLY)
        if self.fd < 0:
            pytest.skip(f"fanotify unavailable here: {os.strerror(ctypes.get_errno())}")
        if libc.fanotify_mark(self.fd, self._FAN_MARK_ADD, self._FAN_OPEN, self._AT_FDCWD,
                              str(path).encode()) != 0:
            os.close(self.fd)
            pytest.skip(f"fanotify_mark failed: {os.strerror(ctypes.get_errno())}")

    def pids(self) -> list[int]:
        import struct

        out: list[int] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            offset = 0
            while offset < len(data):
                length, _, _, _, _, event_fd, pid = struct.unpack_from(self._EVENT, data, offset)
                if event_fd >= 0:
                    os.close(event_fd)
                out.append(pid)
                offset += length

    def close(self) -> None:
        os.close(self.fd)


async def test_only_the_acceptor_ever_opens_the_keytab(realm: Realm, tmp_path: Path) -> None:
    """Workers run as the daemon's uid here, so the file mode alone cannot keep them out;
    the kernel's own record of every open of the keytab shows that no worker opens it."""
    opens = FileOpens(realm.keytab)
    try:
        daemon = await start_krb5_daemon(tmp_path, workers=2, extra=krb5_config(realm))
        try:
            for _ in range(3):
                stream = await krb5_connect(daemon)
                async with stream:
                    served_by = int(await read_line(stream))
                    await stream.send_all(b"x")
                    assert await stream.receive_some() == b"x"
            workers = set(await daemon.worker_pids())
            assert served_by in workers
            openers = opens.pids()
        finally:
            await daemon.stop()
    finally:
        opens.close()
    assert openers, "the acceptor must have read its keytab (else the watch saw nothing)"
    assert set(openers) == {daemon.pid}, (openers, daemon.pid, workers)


async def test_an_asgi_app_behind_krb5_sees_the_clients_principal(
        realm: Realm, tmp_path: Path) -> None:
    """Issue 17: [workers] asgi over Kerberos: hypercorn in the worker serves the ASGI
    example on the handed-off krb5 session, and the app sees the client's principal in
    scope["extensions"]["handoffd.peer"], scheme https."""
    asgi = '[workers]\nasgi = "examples.asgi.app:app"\n'
    daemon = await start_krb5_daemon(tmp_path, workers=1, extra=krb5_config(realm) + asgi)
    try:
        stream = await krb5_connect(daemon)
        async with stream:
            await stream.send_all(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n"
                                  b"Connection: close\r\n\r\n")
            answer = b""
            with trio.fail_after(20):
                while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                    chunk = await stream.receive_some()
                    if not chunk:
                        break
                    answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        who = json.loads(body)
        assert who["peer"]["mechanism"] == "krb5" and who["scheme"] == "https"
        assert who["peer"]["peer_name"] == "user@KRBTEST.COM"
        assert who["worker_pid"] in await daemon.worker_pids()
    finally:
        await daemon.stop()
