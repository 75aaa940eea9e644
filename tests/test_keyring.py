"""The keyring adapter (handoffd.kernel.keyring) against the real kernel."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from handoffd.kernel import keyring
from handoffd.minor import Minor
from handoffd.status import GSS_S_UNAVAILABLE, GSSError

ROOT = Path(__file__).resolve().parents[1]


def _keyctl_works() -> bool:
    try:
        return keyring.probe() is keyring.KeyringStatus.AVAILABLE
    except GSSError:
        return False


pytestmark = pytest.mark.skipif(not _keyctl_works(), reason="keyctl refused on this host")


@pytest.fixture
def ring() -> Iterator[int]:
    """A throwaway keyring in this thread's process keyring, revoked afterwards."""
    serial = keyring.add_keyring("handoffd-test", keyring.KEY_SPEC_PROCESS_KEYRING)
    yield serial
    with contextlib.suppress(GSSError):
        keyring.revoke(serial)
    with contextlib.suppress(GSSError):
        keyring.unlink(serial, keyring.KEY_SPEC_PROCESS_KEYRING)


def minor_of(call: object) -> int:
    assert callable(call)
    with pytest.raises(GSSError) as caught:
        call()
    return caught.value.minor


def test_read_with_size_hint_returns_the_whole_payload(ring: int) -> None:
    key = keyring.add_key("hinted", b"a payload of 27 bytes......", ring)
    assert keyring.read(key, size_hint=27) == b"a payload of 27 bytes......"
    assert keyring.read(key, size_hint=64) == b"a payload of 27 bytes......"  # hint too large
    assert keyring.read(key, size_hint=4) == b"a payload of 27 bytes......"  # too small: re-read


def test_add_read_update_describe(ring: int) -> None:
    key = keyring.add_key("k1", b"first payload", ring)
    assert keyring.read(key) == b"first payload"
    keyring.update(key, b"second, longer payload")
    assert keyring.read(key) == b"second, longer payload"
    description = keyring.describe(key)
    assert (description.key_type, description.uid, description.description) == (
        "user", os.getuid(), "k1")
    assert keyring.keyring_members(ring) == [key]
    assert keyring.describe(ring).key_type == "keyring"


def test_add_key_with_same_name_updates_in_place(ring: int) -> None:
    key = keyring.add_key("same", b"a", ring)
    assert keyring.add_key("same", b"b", ring) == key
    assert keyring.read(key) == b"b"


def test_setperm_is_reported_by_describe(ring: int) -> None:
    key = keyring.add_key("p", b"x", ring)
    keyring.setperm(key, keyring.KEY_POS_ALL)
    assert keyring.describe(key).permissions == keyring.KEY_POS_ALL


def test_revoke_then_read_is_ekeyrevoked(ring: int) -> None:
    key = keyring.add_key("r", b"x", ring)
    keyring.revoke(key)
    with pytest.raises(GSSError) as caught:
        keyring.read(key)
    assert caught.value.minor == Minor.KEYRING_KEY_REVOKED
    assert caught.value.detail == "keyctl_read: EKEYREVOKED"


def test_unlink_link_clear(ring: int) -> None:
    key = keyring.add_key("u", b"x", ring)
    other = keyring.add_keyring("other", ring)
    keyring.link(key, other)
    assert key in keyring.keyring_members(other)
    keyring.unlink(key, ring)
    assert key not in keyring.keyring_members(ring)
    assert keyring.read(key) == b"x"  # still possessed through `other`
    keyring.clear(other)
    assert keyring.keyring_members(other) == []
    # Unlinked everywhere: the key is no longer possessed (and soon destroyed).
    assert minor_of(lambda: keyring.read(key)) in (Minor.KEYRING_DENIED,
                                                   Minor.KEYRING_KEY_NOT_FOUND)


def test_move_between_keyrings(ring: int) -> None:
    key = keyring.add_key("m", b"x", ring)
    target = keyring.add_keyring("target", ring)
    keyring.move(key, ring, target)
    assert key not in keyring.keyring_members(ring)
    assert keyring.keyring_members(target) == [key]
    # Moving again from where it no longer is: ENOENT from the kernel.
    assert minor_of(lambda: keyring.move(key, ring, target)) == Minor.KEYRING_FAILED


def test_set_timeout(ring: int) -> None:
    key = keyring.add_key("t", b"x", ring)
    keyring.set_timeout(key, 3600)
    assert keyring.read(key) == b"x"
    keyring.set_timeout(key, 0)  # 0 clears the timeout
    assert keyring.read(key) == b"x"
    keyring.revoke(key)
    assert minor_of(lambda: keyring.set_timeout(key, 1)) == Minor.KEYRING_KEY_REVOKED


def test_invalidate(ring: int) -> None:
    key = keyring.add_key("i", b"x", ring)
    keyring.invalidate(key)
    assert minor_of(lambda: keyring.read(key)) in (Minor.KEYRING_KEY_NOT_FOUND,
                                                   Minor.KEYRING_DENIED)


def test_enokey_for_a_serial_that_does_not_exist() -> None:
    with pytest.raises(GSSError) as caught:
        keyring.read(0x7FFFFFF0)
    assert caught.value.minor == Minor.KEYRING_KEY_NOT_FOUND
    assert caught.value.detail == "keyctl_read: ENOKEY"


def test_einval_for_an_empty_user_payload_and_a_bad_special_id(ring: int) -> None:
    assert minor_of(lambda: keyring.add_key("e", b"", ring)) == Minor.KEYRING_BAD_ARGUMENT
    # The kernel's own EINVAL: update of a keyring (no update op gives EOPNOTSUPP), so use
    # an unknown special keyring id instead.
    with pytest.raises(GSSError) as caught:
        keyring.get_keyring_id(-100)
    assert caught.value.minor == Minor.KEYRING_BAD_ARGUMENT
    assert caught.value.detail == "keyctl_get_keyring_id: EINVAL"


def test_eacces_when_not_possessed_and_no_user_bits(ring: int) -> None:
    """A child that joins a fresh session keyring no longer possesses our keys."""
    key = keyring.add_key("a", b"secret-payload", keyring.KEY_SPEC_SESSION_KEYRING)
    try:
        keyring.setperm(key, keyring.KEY_POS_ALL)
        code = (
            "from handoffd.kernel import keyring as k\n"
            f"print(k.read({key}).decode())\n"
            "k.join_session_keyring(None)\n"
            "try:\n"
            f"    k.read({key})\n"
            "except Exception as e:\n"
            "    print(e.minor, e.detail)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout.splitlines()
        assert out == ["secret-payload", f"{Minor.KEYRING_DENIED} keyctl_read: EACCES"]
    finally:
        keyring.revoke(key)
        keyring.unlink(key, keyring.KEY_SPEC_SESSION_KEYRING)


def test_join_session_keyring_affects_only_the_calling_thread() -> None:
    """Measured fact the parking design depends on: the session and the process keyring
    live in each thread's credentials; a thread started earlier sees neither change."""
    code = (
        "import threading\n"
        "from handoffd.kernel import keyring as k\n"
        "s = {}\n"
        "ev = threading.Event()\n"
        "def t():\n"
        "    ev.wait()\n"
        "    s['ses'] = k.get_keyring_id(k.KEY_SPEC_SESSION_KEYRING, create=True)\n"
        "    try:\n"
        "        s['proc'] = k.get_keyring_id(k.KEY_SPEC_PROCESS_KEYRING)\n"
        "    except Exception as e:\n"
        "        s['proc'] = e.detail\n"
        "th = threading.Thread(target=t); th.start()\n"
        "new = k.join_session_keyring(None)\n"
        "proc = k.get_keyring_id(k.KEY_SPEC_PROCESS_KEYRING, create=True)\n"
        "ev.set(); th.join()\n"
        "print(new != s['ses'], proc != s['proc'], s['proc'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    # A fresh interpreter has no process keyring until one is created: the older
    # thread does not see the one the main thread created.
    assert out == "True True keyctl_get_keyring_id: ENOKEY"


def test_errno_mapping_table() -> None:
    for err, minor in [(errno.EPERM, Minor.KEYRING_DENIED),
                       (errno.ENOSYS, Minor.KEYRING_UNAVAILABLE),
                       (errno.EDQUOT, Minor.KEYRING_QUOTA),
                       (errno.ENOMEM, Minor.KEYRING_NO_MEMORY),
                       (errno.EKEYEXPIRED, Minor.KEYRING_KEY_EXPIRED),
                       (errno.EINTR, Minor.KEYRING_INTERRUPTED),
                       (errno.EBADMSG, Minor.KEYRING_FAILED)]:
        error = keyring.error_for("keyctl_x", err)
        assert error.minor == minor
        assert error.detail == f"keyctl_x: {errno.errorcode[err]}"
    assert keyring.error_for("add_key", errno.EPERM).major == GSS_S_UNAVAILABLE


def test_probe_is_available_and_leaves_nothing_behind() -> None:
    process = keyring.get_keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING, create=True)
    before = keyring.keyring_members(process)
    assert keyring.probe() is keyring.KeyringStatus.AVAILABLE
    assert keyring.keyring_members(process) == before


# A child installs a two-rule seccomp filter (the real kernel answers add_key and
# keyctl with the chosen errno, as Docker's default profile does with EPERM and some
# LXC profiles with ENOSYS), then runs the rest of its code.
SECCOMP_PRELUDE = """
import ctypes, struct
from handoffd.kernel import keyring as k
def deny_keyring(err):
    add_key, keyctl = k._sys.add_key_nr, k._sys.keyctl_nr
    insns = [(0x20, 0, 0, 0), (0x15, 2, 0, add_key), (0x15, 1, 0, keyctl),
             (0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, 0x00050000 | err)]
    raw = b"".join(struct.pack("HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(raw)
    prog = struct.pack("HxxxxxxP", len(insns), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.c_char_p(prog), 0, 0) == 0, ctypes.get_errno()
"""


@pytest.mark.parametrize(("err", "status"), [(errno.EPERM, "DENIED"),
                                             (errno.ENOSYS, "UNAVAILABLE")])
def test_probe_classifies_a_refusing_seccomp_filter(err: int, status: str) -> None:
    code = SECCOMP_PRELUDE + (
        f"deny_keyring({err})\n"
        "print(k.probe().name)\n"
        "try:\n"
        "    k.add_keyring('x', k.KEY_SPEC_PROCESS_KEYRING)\n"
        "except Exception as e:\n"
        "    print(e.minor.__int__(), e.detail)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.splitlines()
    minor = Minor.KEYRING_DENIED if err == errno.EPERM else Minor.KEYRING_UNAVAILABLE
    assert out == [status, f"{int(minor)} add_key: {errno.errorcode[err]}"]


def test_auto_parking_falls_back_under_seccomp_and_logs_one_warning() -> None:
    code = SECCOMP_PRELUDE + (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, format='%(name)s %(levelname)s %(message)s')\n"
        f"deny_keyring({errno.EPERM})\n"
        "from handoffd.kernel.parking import AcceptorParking\n"
        "p = AcceptorParking.open(slots_per_worker=2)\n"
        "print(p.mode)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.splitlines()
    assert out[-1] == "fallback"
    warnings = [line for line in out if line.startswith("handoffd.keyring WARNING")]
    assert len(warnings) == 1 and "PARKING_FALLBACK_MODE" in warnings[0]
    assert str(int(Minor.PARKING_FALLBACK_MODE)) in warnings[0]


def test_keyring_mode_refuses_to_fall_back() -> None:
    code = SECCOMP_PRELUDE + (
        f"deny_keyring({errno.ENOSYS})\n"
        "from handoffd.kernel.parking import AcceptorParking\n"
        "try:\n"
        "    AcceptorParking.open(slots_per_worker=2, mode='keyring')\n"
        "except Exception as e:\n"
        "    print(int(e.minor))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == str(int(Minor.KEYRING_UNAVAILABLE))


def test_read_key_users_for_this_uid_and_an_unknown_uid() -> None:
    mine = keyring.read_key_users(os.getuid())
    assert mine.nkeys >= 1 and mine.maxkeys > 0 and mine.maxbytes > 0
    nobody = keyring.read_key_users(0x7FFF_FFF0)
    assert (nobody.nkeys, nobody.qnkeys, nobody.qnbytes) == (0, 0, 0)
    assert nobody.maxkeys == int(Path("/proc/sys/kernel/keys/maxkeys").read_text())


def test_read_key_users_parses_the_format(tmp_path: Path) -> None:
    sample = tmp_path / "key-users"
    sample.write_text("    0:    73 72/71 46/1000000 1137/25000000\n"
                      " 1000:     5 4/4 4/200 98/20000\n")
    assert keyring.read_key_users(1000, path=str(sample)) == keyring.KeyUsers(
        5, 4, 4, 4, 200, 98, 20000)
    sample.write_text(" 1000: garbage\n")
    with pytest.raises(GSSError):
        keyring.read_key_users(1000, path=str(sample))
