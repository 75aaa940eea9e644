"""The minor status table: every code has an operator-readable text."""

from __future__ import annotations

import pytest

from handoffd import minor
from handoffd.minor import Minor


@pytest.mark.parametrize("code", list(Minor))
def test_every_minor_has_a_text(code: Minor) -> None:
    text = minor.text(code)
    assert text is not None
    assert (text[0].isupper() or text[0] == '"') and not text.endswith(".")
    assert minor.name(code) == code.name


def test_blocks_are_grouped_by_subsystem() -> None:
    assert Minor.HANDSHAKE_DECRYPT_FAILED // 100 == 1
    assert Minor.TOKEN_TRUNCATED // 100 == 2
    assert Minor.KEYRING_QUOTA // 100 == 3
    assert Minor.PEER_UID_NOT_ALLOWED // 100 == 4
    assert Minor.CHANNEL_NO_FD // 100 == 5
    assert Minor.CONFIG_INVALID // 100 == 6


def test_unknown_minor() -> None:
    assert minor.text(77777) is None
    assert minor.name(77777) == "77777"


def test_codes_split_from_double_meanings_issue_19() -> None:
    """Each of these used to share a code with something else (see issue 19)."""
    assert (Minor.KEY_FILE_EXISTS, Minor.KEY_FILE_IS_PUBLIC) == (122, 123)
    assert Minor.PARKING_BAD_REFERENCE == 313 != Minor.PARKING_KEY_CLAIMED == 311
    assert Minor.CHANNEL_BAD_PAYLOAD == 513 != Minor.CHANNEL_BAD_HEADER == 506
    assert Minor.MECHANISM_UNKNOWN == 625 != Minor.TOKEN_BAD_MECH_OID == 206
    assert (Minor.USAGE_INVALID, Minor.SERVER_KEY_NOT_PINNED) == (623, 624)
    assert "malformed" in (minor.text(Minor.PARKING_BAD_REFERENCE) or "")
    assert "payload" in (minor.text(Minor.CHANNEL_BAD_PAYLOAD) or "")


def test_operator_errors_are_config_and_usage_codes() -> None:
    expected = {Minor.CONFIG_INVALID, Minor.CONFIG_UNREADABLE, Minor.USAGE_INVALID,
                Minor.SERVER_KEY_NOT_PINNED, Minor.MECHANISM_UNKNOWN, Minor.KEY_FILE_EXISTS,
                # start-up: one line naming the address, path or key (issue 19)
                Minor.BIND_FAILED, Minor.PRIVSEP_SAME_UID, Minor.PRIVSEP_NOT_PERMITTED,
                Minor.BAD_KEY_FILE, Minor.KEY_FILE_PERMISSIONS, Minor.KEY_FILE_IS_PUBLIC,
                Minor.TLS_CERTIFICATE_INVALID, Minor.PREFLIGHT_FAILED}
    assert expected == minor.OPERATOR_ERRORS


def test_operator_line_of_config_errors_and_not_of_others() -> None:
    from handoffd.status import GSS_S_DEFECTIVE_TOKEN, GSS_S_FAILURE, GSSError

    error = GSSError(GSS_S_FAILURE, Minor.CONFIG_INVALID, "/etc/h.toml: [log] level: why")
    assert error.operator_line() == "/etc/h.toml: [log] level: why (CONFIG_INVALID, minor 600)"
    assert str(error).startswith("Unspecified GSS failure")  # logs: every message, as ever
    assert GSSError(GSS_S_FAILURE, Minor.USAGE_INVALID).operator_line() == (
        "The command or call was given invalid arguments (USAGE_INVALID, minor 623)")
    assert GSSError(GSS_S_DEFECTIVE_TOKEN, Minor.TOKEN_TRUNCATED, "x").operator_line() is None
