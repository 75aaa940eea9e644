"""GSS-API major status codes, the status macros and ``display_status``.

The numeric layout is RFC 2744 §3.9.1 (and MIT's ``gssapi.h``), as the seed
``gss_status_codes.txt`` draws it::

    bits 24-31  calling error     (GSS_S_CALL_*, shifted 24)
    bits 16-23  routine error     (GSS_S_BAD_MECH ... GSS_S_NAME_NOT_MN, shifted 16)
    bits  0-15  supplementary     (GSS_S_CONTINUE_NEEDED ... GSS_S_GAP_TOKEN, bits 0-4)

A status is an unsigned 32-bit word.  Several conditions can be present at
once, so :func:`display_status` is called in a loop, one message per call, as
the seed's example program does.  Minor statuses are handoffd's own, defined in
:mod:`handoffd.minor`; :class:`GSSError` carries both halves.
"""

from __future__ import annotations

from typing import Final

from handoffd import minor as _minor

__all__ = [
    "GSS_CALLING_ERROR",
    "GSS_CALLING_ERROR_MASK",
    "GSS_CALLING_ERROR_OFFSET",
    "GSS_C_GSS_CODE",
    "GSS_C_MECH_CODE",
    "GSS_ERROR",
    "GSS_ROUTINE_ERROR",
    "GSS_ROUTINE_ERROR_MASK",
    "GSS_ROUTINE_ERROR_OFFSET",
    "GSS_SUPPLEMENTARY_INFO",
    "GSS_SUPPLEMENTARY_INFO_MASK",
    "GSS_SUPPLEMENTARY_INFO_OFFSET",
    "GSS_S_BAD_BINDINGS",
    "GSS_S_BAD_MECH",
    "GSS_S_BAD_MIC",
    "GSS_S_BAD_NAME",
    "GSS_S_BAD_NAMETYPE",
    "GSS_S_BAD_QOP",
    "GSS_S_BAD_SIG",
    "GSS_S_BAD_STATUS",
    "GSS_S_CALL_BAD_STRUCTURE",
    "GSS_S_CALL_INACCESSIBLE_READ",
    "GSS_S_CALL_INACCESSIBLE_WRITE",
    "GSS_S_COMPLETE",
    "GSS_S_CONTEXT_EXPIRED",
    "GSS_S_CONTINUE_NEEDED",
    "GSS_S_CREDENTIALS_EXPIRED",
    "GSS_S_DEFECTIVE_CREDENTIAL",
    "GSS_S_DEFECTIVE_TOKEN",
    "GSS_S_DUPLICATE_ELEMENT",
    "GSS_S_DUPLICATE_TOKEN",
    "GSS_S_FAILURE",
    "GSS_S_GAP_TOKEN",
    "GSS_S_NAME_NOT_MN",
    "GSS_S_NO_CONTEXT",
    "GSS_S_NO_CRED",
    "GSS_S_OLD_TOKEN",
    "GSS_S_UNAUTHORIZED",
    "GSS_S_UNAVAILABLE",
    "GSS_S_UNSEQ_TOKEN",
    "GSSError",
    "display_status",
    "status_messages",
]

# --- field layout (RFC 2744 §3.9.1) ------------------------------------------------

GSS_C_CALLING_ERROR_OFFSET: Final = 24
GSS_C_ROUTINE_ERROR_OFFSET: Final = 16
GSS_C_SUPPLEMENTARY_OFFSET: Final = 0
GSS_C_CALLING_ERROR_MASK: Final = 0o377
GSS_C_ROUTINE_ERROR_MASK: Final = 0o377
GSS_C_SUPPLEMENTARY_MASK: Final = 0o177777

# Short aliases matching the macro names used in the seed.
GSS_CALLING_ERROR_OFFSET: Final = GSS_C_CALLING_ERROR_OFFSET
GSS_ROUTINE_ERROR_OFFSET: Final = GSS_C_ROUTINE_ERROR_OFFSET
GSS_SUPPLEMENTARY_INFO_OFFSET: Final = GSS_C_SUPPLEMENTARY_OFFSET
GSS_CALLING_ERROR_MASK: Final = GSS_C_CALLING_ERROR_MASK << GSS_C_CALLING_ERROR_OFFSET
GSS_ROUTINE_ERROR_MASK: Final = GSS_C_ROUTINE_ERROR_MASK << GSS_C_ROUTINE_ERROR_OFFSET
GSS_SUPPLEMENTARY_INFO_MASK: Final = GSS_C_SUPPLEMENTARY_MASK << GSS_C_SUPPLEMENTARY_OFFSET

# --- status types for display_status -------------------------------------------------

GSS_C_GSS_CODE: Final = 1
GSS_C_MECH_CODE: Final = 2

# --- the codes -----------------------------------------------------------------------

GSS_S_COMPLETE: Final = 0

# Table B-1: calling errors.
GSS_S_CALL_INACCESSIBLE_READ: Final = 1 << GSS_C_CALLING_ERROR_OFFSET
GSS_S_CALL_INACCESSIBLE_WRITE: Final = 2 << GSS_C_CALLING_ERROR_OFFSET
GSS_S_CALL_BAD_STRUCTURE: Final = 3 << GSS_C_CALLING_ERROR_OFFSET

# Table B-2: routine errors.
GSS_S_BAD_MECH: Final = 1 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_BAD_NAME: Final = 2 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_BAD_NAMETYPE: Final = 3 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_BAD_BINDINGS: Final = 4 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_BAD_STATUS: Final = 5 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_BAD_SIG: Final = 6 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_BAD_MIC: Final = GSS_S_BAD_SIG
GSS_S_NO_CRED: Final = 7 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_NO_CONTEXT: Final = 8 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_DEFECTIVE_TOKEN: Final = 9 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_DEFECTIVE_CREDENTIAL: Final = 10 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_CREDENTIALS_EXPIRED: Final = 11 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_CONTEXT_EXPIRED: Final = 12 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_FAILURE: Final = 13 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_BAD_QOP: Final = 14 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_UNAUTHORIZED: Final = 15 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_UNAVAILABLE: Final = 16 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_DUPLICATE_ELEMENT: Final = 17 << GSS_C_ROUTINE_ERROR_OFFSET
GSS_S_NAME_NOT_MN: Final = 18 << GSS_C_ROUTINE_ERROR_OFFSET

# Table B-3: supplementary information bits.
GSS_S_CONTINUE_NEEDED: Final = 1 << (GSS_C_SUPPLEMENTARY_OFFSET + 0)
GSS_S_DUPLICATE_TOKEN: Final = 1 << (GSS_C_SUPPLEMENTARY_OFFSET + 1)
GSS_S_OLD_TOKEN: Final = 1 << (GSS_C_SUPPLEMENTARY_OFFSET + 2)
GSS_S_UNSEQ_TOKEN: Final = 1 << (GSS_C_SUPPLEMENTARY_OFFSET + 3)
GSS_S_GAP_TOKEN: Final = 1 << (GSS_C_SUPPLEMENTARY_OFFSET + 4)

_STATUS_WORD: Final = 0xFFFFFFFF


# --- macros: each evaluates its argument exactly once (they are functions) -----------


def GSS_CALLING_ERROR(x: int) -> int:
    """The calling-error field of ``x``, still in place (compare with GSS_S_CALL_*)."""
    return x & GSS_CALLING_ERROR_MASK


def GSS_ROUTINE_ERROR(x: int) -> int:
    """The routine-error field of ``x``, still in place (compare with GSS_S_BAD_* etc.)."""
    return x & GSS_ROUTINE_ERROR_MASK


def GSS_SUPPLEMENTARY_INFO(x: int) -> int:
    """The supplementary bits of ``x`` (compare with GSS_S_CONTINUE_NEEDED etc.)."""
    return x & GSS_SUPPLEMENTARY_INFO_MASK


def GSS_ERROR(x: int) -> int:
    """Non-zero when ``x`` holds a calling or a routine error, zero otherwise."""
    return x & (GSS_CALLING_ERROR_MASK | GSS_ROUTINE_ERROR_MASK)


# --- display texts --------------------------------------------------------------------

_CALLING_ERROR_TEXT: Final[dict[int, str]] = {
    GSS_S_CALL_INACCESSIBLE_READ: "A required input parameter could not be read",
    GSS_S_CALL_INACCESSIBLE_WRITE: "A required output parameter could not be written",
    GSS_S_CALL_BAD_STRUCTURE: "A parameter was malformed",
}

_ROUTINE_ERROR_TEXT: Final[dict[int, str]] = {
    GSS_S_BAD_MECH: "An unsupported mechanism was requested",
    GSS_S_BAD_NAME: "An invalid name was supplied",
    GSS_S_BAD_NAMETYPE: "A supplied name was of an unsupported type",
    GSS_S_BAD_BINDINGS: "Incorrect channel bindings were supplied",
    GSS_S_BAD_STATUS: "An invalid status code was supplied",
    GSS_S_BAD_SIG: "A token had an invalid Message Integrity Check (MIC)",
    GSS_S_NO_CRED: "No credentials were supplied, or the credentials were unavailable "
    "or inaccessible",
    GSS_S_NO_CONTEXT: "No context has been established",
    GSS_S_DEFECTIVE_TOKEN: "Invalid token was supplied",
    GSS_S_DEFECTIVE_CREDENTIAL: "Invalid credential was supplied",
    GSS_S_CREDENTIALS_EXPIRED: "The referenced credentials have expired",
    GSS_S_CONTEXT_EXPIRED: "The referenced context has expired",
    GSS_S_FAILURE: "Unspecified GSS failure.  Minor code may provide more information",
    GSS_S_BAD_QOP: "The quality-of-protection (QOP) requested could not be provided",
    GSS_S_UNAUTHORIZED: "The operation is forbidden by local security policy",
    GSS_S_UNAVAILABLE: "The operation or option is not available or unsupported",
    GSS_S_DUPLICATE_ELEMENT: "The requested credential element already exists",
    GSS_S_NAME_NOT_MN: "The provided name was not a mechanism name",
}

_SUPPLEMENTARY_TEXT: Final[dict[int, str]] = {
    GSS_S_CONTINUE_NEEDED: "The routine must be called again to complete its function",
    GSS_S_DUPLICATE_TOKEN: "The token was a duplicate of an earlier token",
    GSS_S_OLD_TOKEN: "The token's validity period has expired",
    GSS_S_UNSEQ_TOKEN: "A later token has already been processed",
    GSS_S_GAP_TOKEN: "An expected per-message token was not received",
}

_COMPLETE_TEXT: Final = "The routine completed successfully"

# Short names, used in logs and metrics labels.
_NAMES: Final[dict[int, str]] = {
    GSS_S_CALL_INACCESSIBLE_READ: "CALL_INACCESSIBLE_READ",
    GSS_S_CALL_INACCESSIBLE_WRITE: "CALL_INACCESSIBLE_WRITE",
    GSS_S_CALL_BAD_STRUCTURE: "CALL_BAD_STRUCTURE",
    GSS_S_BAD_MECH: "BAD_MECH",
    GSS_S_BAD_NAME: "BAD_NAME",
    GSS_S_BAD_NAMETYPE: "BAD_NAMETYPE",
    GSS_S_BAD_BINDINGS: "BAD_BINDINGS",
    GSS_S_BAD_STATUS: "BAD_STATUS",
    GSS_S_BAD_SIG: "BAD_MIC",
    GSS_S_NO_CRED: "NO_CRED",
    GSS_S_NO_CONTEXT: "NO_CONTEXT",
    GSS_S_DEFECTIVE_TOKEN: "DEFECTIVE_TOKEN",
    GSS_S_DEFECTIVE_CREDENTIAL: "DEFECTIVE_CREDENTIAL",
    GSS_S_CREDENTIALS_EXPIRED: "CREDENTIALS_EXPIRED",
    GSS_S_CONTEXT_EXPIRED: "CONTEXT_EXPIRED",
    GSS_S_FAILURE: "FAILURE",
    GSS_S_BAD_QOP: "BAD_QOP",
    GSS_S_UNAUTHORIZED: "UNAUTHORIZED",
    GSS_S_UNAVAILABLE: "UNAVAILABLE",
    GSS_S_DUPLICATE_ELEMENT: "DUPLICATE_ELEMENT",
    GSS_S_NAME_NOT_MN: "NAME_NOT_MN",
    GSS_S_CONTINUE_NEEDED: "CONTINUE_NEEDED",
    GSS_S_DUPLICATE_TOKEN: "DUPLICATE_TOKEN",
    GSS_S_OLD_TOKEN: "OLD_TOKEN",
    GSS_S_UNSEQ_TOKEN: "UNSEQ_TOKEN",
    GSS_S_GAP_TOKEN: "GAP_TOKEN",
}


def _major_messages(status_value: int) -> list[str]:
    """Every message a major status holds, calling error first, then routine, then bits.

    Raises ``GSSError(GSS_S_BAD_STATUS)`` for a value that is not a valid status word.
    """
    if not 0 <= status_value <= _STATUS_WORD:
        raise GSSError(GSS_S_BAD_STATUS, _minor.Minor.BAD_STATUS_VALUE)
    if status_value == GSS_S_COMPLETE:
        return [_COMPLETE_TEXT]
    messages: list[str] = []
    calling = GSS_CALLING_ERROR(status_value)
    routine = GSS_ROUTINE_ERROR(status_value)
    supplementary = GSS_SUPPLEMENTARY_INFO(status_value)
    if calling:
        if calling not in _CALLING_ERROR_TEXT:
            raise GSSError(GSS_S_BAD_STATUS, _minor.Minor.BAD_STATUS_VALUE)
        messages.append(_CALLING_ERROR_TEXT[calling])
    if routine:
        if routine not in _ROUTINE_ERROR_TEXT:
            raise GSSError(GSS_S_BAD_STATUS, _minor.Minor.BAD_STATUS_VALUE)
        messages.append(_ROUTINE_ERROR_TEXT[routine])
    bit = 1
    while supplementary:
        if supplementary & bit:
            if bit not in _SUPPLEMENTARY_TEXT:
                raise GSSError(GSS_S_BAD_STATUS, _minor.Minor.BAD_STATUS_VALUE)
            messages.append(_SUPPLEMENTARY_TEXT[bit])
            supplementary &= ~bit
        bit <<= 1
    return messages


def _messages(status_value: int, status_type: int) -> list[str]:
    if status_type == GSS_C_GSS_CODE:
        return _major_messages(status_value)
    if status_type == GSS_C_MECH_CODE:
        text = _minor.text(status_value)
        if text is None:
            raise GSSError(GSS_S_BAD_STATUS, _minor.Minor.BAD_STATUS_VALUE)
        return [text]
    raise GSSError(GSS_S_BAD_STATUS, _minor.Minor.BAD_STATUS_TYPE)


def display_status(status_value: int, status_type: int, message_context: int) -> tuple[str, int]:
    """Translate one condition of a status code into text, ``gss_display_status`` style.

    Call first with ``message_context=0``; each call returns ``(message,
    next_context)``.  While ``next_context`` is non-zero another condition is
    waiting: call again with it.  ``status_type`` is ``GSS_C_GSS_CODE`` for a
    major status or ``GSS_C_MECH_CODE`` for one of handoffd's minor statuses.

    Raises ``GSSError(GSS_S_BAD_STATUS)`` for an unknown status value or type, or
    a message context that does not belong to this status.
    """
    messages = _messages(status_value, status_type)
    if not 0 <= message_context < len(messages):
        raise GSSError(GSS_S_BAD_STATUS, _minor.Minor.BAD_MESSAGE_CONTEXT)
    following = message_context + 1
    return messages[message_context], following if following < len(messages) else 0


def status_messages(status_value: int, status_type: int = GSS_C_GSS_CODE) -> list[str]:
    """All messages of a status: the display loop run to its end."""
    out: list[str] = []
    context = 0
    while True:
        message, context = display_status(status_value, status_type, context)
        out.append(message)
        if context == 0:
            return out


def status_name(major: int) -> str:
    """A short, stable name for a major status, e.g. ``"DEFECTIVE_TOKEN|GAP_TOKEN"``.

    Used for log fields and metric labels; unknown fields show as hex.
    """
    if major == GSS_S_COMPLETE:
        return "COMPLETE"
    parts = []
    for field in (GSS_CALLING_ERROR(major), GSS_ROUTINE_ERROR(major)):
        if field:
            parts.append(_NAMES.get(field, f"0x{field:08x}"))
    supplementary = GSS_SUPPLEMENTARY_INFO(major)
    bit = 1
    while supplementary:
        if supplementary & bit:
            parts.append(_NAMES.get(bit, f"0x{bit:x}"))
            supplementary &= ~bit
        bit <<= 1
    return "|".join(parts)


class GSSError(Exception):
    """A failure, reported the GSS way: a major status, a minor status and their texts.

    ``major`` is an RFC 2744 status word; ``minor`` is one of handoffd's minor
    codes (:mod:`handoffd.minor`); ``detail`` is optional context for operators
    (a path, an errno name, a peer).  ``detail`` must never hold key material.
    ``str()`` lists every message of both statuses, as the seed's display loop
    would print them.
    """

    def __init__(self, major: int, minor: int = 0, detail: str | None = None) -> None:
        super().__init__(major, minor, detail)
        self.major = major
        self.minor = minor
        self.detail = detail

    def messages(self) -> list[str]:
        """Every display text: the major's conditions, then the minor's, then the detail."""
        try:
            out = status_messages(self.major, GSS_C_GSS_CODE)
        except GSSError:
            out = [f"Unknown major status 0x{self.major:08x}"]
        if self.minor:
            try:
                out.extend(status_messages(self.minor, GSS_C_MECH_CODE))
            except GSSError:
                out.append(f"Unknown minor status {self.minor}")
        if self.detail:
            out.append(self.detail)
        return out

    def __str__(self) -> str:
        return "; ".join(self.messages())

    def operator_line(self) -> str | None:
        """One line for a config or usage error (minor in :data:`handoffd.minor.OPERATOR_ERRORS`):
        ``<detail> (<MINOR_NAME>, minor <n>)``; None for any other error.

        Their major is a generic one (``GSS_S_FAILURE``: "Unspecified GSS failure...")
        that tells an operator nothing; the detail names the file, key or option.
        ``str()`` is unchanged, so log lines keep listing every message.
        """
        if self.minor not in _minor.OPERATOR_ERRORS:
            return None
        why = self.detail or _minor.text(self.minor) or ""
        return f"{why} ({_minor.name(self.minor)}, minor {self.minor})"

    def __repr__(self) -> str:
        return (
            f"GSSError(major=0x{self.major:08x} {status_name(self.major)}, "
            f"minor={self.minor} {_minor.name(self.minor)}, detail={self.detail!r})"
        )

    def __reduce__(self) -> tuple[type[GSSError], tuple[int, int, str | None]]:
        return (GSSError, (self.major, self.minor, self.detail))
