"""The GSS status layer: RFC 2744 values, the macros, the display loop, GSSError."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handoffd import status as s
from handoffd.minor import Minor
from handoffd.status import GSSError, display_status, status_messages

# Values exactly as in RFC 2744 §3.9.1 / MIT gssapi.h.
RFC2744 = {
    "GSS_S_COMPLETE": 0,
    "GSS_S_CALL_INACCESSIBLE_READ": 0x01000000,
    "GSS_S_CALL_INACCESSIBLE_WRITE": 0x02000000,
    "GSS_S_CALL_BAD_STRUCTURE": 0x03000000,
    "GSS_S_BAD_MECH": 0x00010000,
    "GSS_S_BAD_NAME": 0x00020000,
    "GSS_S_BAD_NAMETYPE": 0x00030000,
    "GSS_S_BAD_BINDINGS": 0x00040000,
    "GSS_S_BAD_STATUS": 0x00050000,
    "GSS_S_BAD_SIG": 0x00060000,
    "GSS_S_BAD_MIC": 0x00060000,
    "GSS_S_NO_CRED": 0x00070000,
    "GSS_S_NO_CONTEXT": 0x00080000,
    "GSS_S_DEFECTIVE_TOKEN": 0x00090000,
    "GSS_S_DEFECTIVE_CREDENTIAL": 0x000A0000,
    "GSS_S_CREDENTIALS_EXPIRED": 0x000B0000,
    "GSS_S_CONTEXT_EXPIRED": 0x000C0000,
    "GSS_S_FAILURE": 0x000D0000,
    "GSS_S_BAD_QOP": 0x000E0000,
    "GSS_S_UNAUTHORIZED": 0x000F0000,
    "GSS_S_UNAVAILABLE": 0x00100000,
    "GSS_S_DUPLICATE_ELEMENT": 0x00110000,
    "GSS_S_NAME_NOT_MN": 0x00120000,
    "GSS_S_CONTINUE_NEEDED": 0x1,
    "GSS_S_DUPLICATE_TOKEN": 0x2,
    "GSS_S_OLD_TOKEN": 0x4,
    "GSS_S_UNSEQ_TOKEN": 0x8,
    "GSS_S_GAP_TOKEN": 0x10,
}

CALLING = [s.GSS_S_CALL_INACCESSIBLE_READ, s.GSS_S_CALL_INACCESSIBLE_WRITE,
           s.GSS_S_CALL_BAD_STRUCTURE]
ROUTINE = [v << 16 for v in range(1, 19)]
SUPPLEMENTARY = [1, 2, 4, 8, 16]


@pytest.mark.parametrize(("name", "value"), sorted(RFC2744.items()))
def test_constant_has_rfc2744_value(name: str, value: int) -> None:
    assert getattr(s, name) == value
    assert name in s.__all__


def test_masks_and_offsets() -> None:
    assert s.GSS_CALLING_ERROR_MASK == 0xFF000000
    assert s.GSS_ROUTINE_ERROR_MASK == 0x00FF0000
    assert s.GSS_SUPPLEMENTARY_INFO_MASK == 0x0000FFFF
    assert (s.GSS_CALLING_ERROR_OFFSET, s.GSS_ROUTINE_ERROR_OFFSET,
            s.GSS_SUPPLEMENTARY_INFO_OFFSET) == (24, 16, 0)


statuses = st.builds(
    lambda c, r, sup: c | r | sup,
    st.sampled_from([0, *CALLING]),
    st.sampled_from([0, *ROUTINE]),
    st.integers(0, 31),
)


@given(statuses)
def test_macros_extract_each_field(value: int) -> None:
    assert s.GSS_CALLING_ERROR(value) == value & 0xFF000000
    assert s.GSS_ROUTINE_ERROR(value) == value & 0x00FF0000
    assert s.GSS_SUPPLEMENTARY_INFO(value) == value & 0xFFFF
    assert bool(s.GSS_ERROR(value)) == bool(value & 0xFFFF0000)
    # Field values compare directly with the GSS_S_ symbols of their kind.
    assert s.GSS_CALLING_ERROR(value) in (0, *CALLING)
    assert s.GSS_ROUTINE_ERROR(value) in (0, *ROUTINE)


def test_macros_on_a_combined_value() -> None:
    combined = (s.GSS_S_CALL_BAD_STRUCTURE | s.GSS_S_DEFECTIVE_TOKEN
                | s.GSS_S_DUPLICATE_TOKEN | s.GSS_S_GAP_TOKEN)
    assert s.GSS_CALLING_ERROR(combined) == s.GSS_S_CALL_BAD_STRUCTURE
    assert s.GSS_ROUTINE_ERROR(combined) == s.GSS_S_DEFECTIVE_TOKEN
    assert s.GSS_SUPPLEMENTARY_INFO(combined) == s.GSS_S_DUPLICATE_TOKEN | s.GSS_S_GAP_TOKEN
    assert s.GSS_ERROR(combined)
    # Supplementary bits alone are not an error.
    assert not s.GSS_ERROR(s.GSS_S_CONTINUE_NEEDED | s.GSS_S_OLD_TOKEN)


class CountingInt(int):
    """An int that counts how often the macros read it."""

    reads = 0

    def __and__(self, other: int) -> int:
        CountingInt.reads += 1
        return int(self) & other


@pytest.mark.parametrize("macro", [s.GSS_ERROR, s.GSS_CALLING_ERROR, s.GSS_ROUTINE_ERROR,
                                   s.GSS_SUPPLEMENTARY_INFO])
def test_macros_evaluate_argument_once(macro: object) -> None:
    CountingInt.reads = 0
    assert callable(macro)
    macro(CountingInt(0x00090002))
    assert CountingInt.reads == 1


def run_loop(value: int, kind: int = s.GSS_C_GSS_CODE) -> list[str]:
    """The seed's example program, in Python."""
    out, context = [], 0
    while True:
        message, context = display_status(value, kind, context)
        out.append(message)
        if context == 0:
            return out


def test_display_complete() -> None:
    assert run_loop(0) == ["The routine completed successfully"]


def test_display_loop_yields_each_condition_in_turn() -> None:
    value = (s.GSS_S_CALL_INACCESSIBLE_READ | s.GSS_S_DEFECTIVE_TOKEN
             | s.GSS_S_CONTINUE_NEEDED | s.GSS_S_UNSEQ_TOKEN | s.GSS_S_GAP_TOKEN)
    messages = run_loop(value)
    assert messages == [
        "A required input parameter could not be read",
        "Invalid token was supplied",
        "The routine must be called again to complete its function",
        "A later token has already been processed",
        "An expected per-message token was not received",
    ]
    # The contexts handed back walk 1, 2, 3, 4 then 0.
    contexts = []
    context = 0
    while True:
        _, context = display_status(value, s.GSS_C_GSS_CODE, context)
        contexts.append(context)
        if not context:
            break
    assert contexts == [1, 2, 3, 4, 0]


@given(statuses)
def test_every_valid_status_displays_one_message_per_condition(value: int) -> None:
    messages = run_loop(value)
    expected = (bool(s.GSS_CALLING_ERROR(value)) + bool(s.GSS_ROUTINE_ERROR(value))
                + bin(s.GSS_SUPPLEMENTARY_INFO(value)).count("1"))
    assert len(messages) == max(expected, 1)
    assert all(m and m[0].isupper() for m in messages)


@pytest.mark.parametrize("value", [
    4 << 24,            # calling error 4 is not defined
    19 << 16,           # routine error 19 is not defined
    0xFF << 16,
    1 << 5,             # supplementary bit 5 is not defined
    1 << 15,
    -1,
    1 << 32,
    s.GSS_S_DEFECTIVE_TOKEN | (1 << 7),
])
def test_unknown_major_gives_bad_status(value: int) -> None:
    with pytest.raises(GSSError) as info:
        display_status(value, s.GSS_C_GSS_CODE, 0)
    assert info.value.major == s.GSS_S_BAD_STATUS
    assert info.value.minor == Minor.BAD_STATUS_VALUE


def test_unknown_type_and_context_give_bad_status() -> None:
    with pytest.raises(GSSError) as info:
        display_status(0, 3, 0)
    assert (info.value.major, info.value.minor) == (s.GSS_S_BAD_STATUS, Minor.BAD_STATUS_TYPE)
    with pytest.raises(GSSError) as info:
        display_status(s.GSS_S_FAILURE, s.GSS_C_GSS_CODE, 1)
    assert info.value.minor == Minor.BAD_MESSAGE_CONTEXT
    with pytest.raises(GSSError):
        display_status(s.GSS_S_FAILURE, s.GSS_C_GSS_CODE, -1)


def test_mech_code_display() -> None:
    assert run_loop(Minor.TOKEN_TRUNCATED, s.GSS_C_MECH_CODE) == [
        "The token is shorter than its structure requires"]
    with pytest.raises(GSSError) as info:
        display_status(99999, s.GSS_C_MECH_CODE, 0)
    assert info.value.major == s.GSS_S_BAD_STATUS


def test_gss_error_lists_every_message() -> None:
    error = GSSError(s.GSS_S_DEFECTIVE_TOKEN | s.GSS_S_GAP_TOKEN, Minor.TOKEN_TRUNCATED,
                     "from 127.0.0.1:5555")
    assert error.messages() == [
        "Invalid token was supplied",
        "An expected per-message token was not received",
        "The token is shorter than its structure requires",
        "from 127.0.0.1:5555",
    ]
    assert str(error) == "; ".join(error.messages())
    assert "DEFECTIVE_TOKEN|GAP_TOKEN" in repr(error)
    assert "TOKEN_TRUNCATED" in repr(error)
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.major, clone.minor, clone.detail) == (error.major, error.minor, error.detail)


def test_gss_error_with_unknown_codes_still_prints() -> None:
    error = GSSError(0x7F000000, 424242)
    assert error.messages() == ["Unknown major status 0x7f000000", "Unknown minor status 424242"]


def test_status_messages_and_names() -> None:
    assert status_messages(s.GSS_S_NO_CONTEXT) == ["No context has been established"]
    assert s.status_name(0) == "COMPLETE"
    assert s.status_name(s.GSS_S_BAD_MIC | s.GSS_S_OLD_TOKEN) == "BAD_MIC|OLD_TOKEN"
    assert s.status_name(s.GSS_S_CALL_BAD_STRUCTURE | (19 << 16) | 64) == (
        "CALL_BAD_STRUCTURE|0x00130000|0x40")
