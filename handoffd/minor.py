"""handoffd's own minor status codes and their display texts.

A major status (RFC 2744) says *what kind* of failure happened; the minor
status says *which* one, for an operator reading a log line.  Codes are
grouped by subsystem in blocks of 100 so a number alone tells where to look:

====  =====================================================
  1+  the status layer itself
100+  the Noise mechanism and the security context
200+  token codecs (first token, per-message, export, seal)
300+  the kernel keyring and key parking
400+  peer verification (credentials, pidfd, LSM label)
500+  the SCM_RIGHTS handoff channel
600+  daemon, worker library, client, configuration
====  =====================================================

Codes are stable once released: never renumber, only add.  Every member has
a text; ``tests/test_minor.py`` checks that.
"""

from __future__ import annotations

from enum import IntEnum, unique
from typing import Final


@unique
class Minor(IntEnum):
    """Minor status codes (``GSS_C_MECH_CODE`` values for :func:`display_status`)."""

    NONE = 0

    # status layer
    BAD_STATUS_VALUE = 1
    BAD_STATUS_TYPE = 2
    BAD_MESSAGE_CONTEXT = 3

    # Noise mechanism and security context
    HANDSHAKE_DECRYPT_FAILED = 100
    HANDSHAKE_UNEXPECTED_TOKEN = 101
    HANDSHAKE_OUT_OF_ORDER = 102
    PEER_KEY_NOT_ALLOWED = 103
    SERVER_KEY_MISMATCH = 104
    ANONYMOUS_NOT_ALLOWED = 105
    CONTEXT_NOT_ESTABLISHED = 106
    CONTEXT_EXPORTED = 107
    CONTEXT_LIFETIME_OVER = 108
    CONTEXT_DELETED = 109
    SEQUENCE_EXHAUSTED = 110
    MESSAGE_TAMPERED = 111
    MESSAGE_REFLECTED = 112
    MESSAGE_TOO_LARGE = 113
    CONFIDENTIALITY_UNAVAILABLE = 114
    BAD_KEY_FILE = 115
    KEY_FILE_PERMISSIONS = 116
    BAD_ALLOW_LIST = 117
    WEAK_PUBLIC_KEY = 118
    BAD_QOP_REQUESTED = 119
    WRONG_ROLE = 120
    CHANNEL_BINDINGS_MISMATCH = 121
    KEY_FILE_EXISTS = 122
    KEY_FILE_IS_PUBLIC = 123
    PROTECTION_BAD_PARAMETER = 150

    # token codecs
    TOKEN_TRUNCATED = 200
    TOKEN_TRAILING_BYTES = 201
    TOKEN_BAD_VERSION = 202
    TOKEN_BAD_TYPE = 203
    TOKEN_BAD_FIELD = 204
    TOKEN_TOO_LARGE = 205
    TOKEN_BAD_MECH_OID = 206
    TOKEN_BAD_FRAMING = 207
    EXPORT_TOKEN_INVALID = 208
    EXPORT_TOKEN_EXPIRED = 209
    EXPORT_TOKEN_WRONG_WORKER = 210
    EXPORT_TOKEN_REPLAYED = 211

    # kernel keyring and key parking
    KEYRING_UNAVAILABLE = 300
    KEYRING_DENIED = 301
    KEYRING_QUOTA = 302
    KEYRING_KEY_NOT_FOUND = 303
    KEYRING_KEY_REVOKED = 304
    KEYRING_KEY_EXPIRED = 305
    KEYRING_BAD_ARGUMENT = 306
    KEYRING_NO_MEMORY = 307
    KEYRING_FAILED = 308
    KEYRING_INTERRUPTED = 309
    PARKING_SLOTS_EXHAUSTED = 310
    PARKING_KEY_CLAIMED = 311
    PARKING_FALLBACK_MODE = 312
    PARKING_BAD_REFERENCE = 313

    # peer verification
    PEER_UID_NOT_ALLOWED = 400
    PEER_GID_NOT_ALLOWED = 401
    PEER_LABEL_NOT_ALLOWED = 402
    PEER_LABEL_REQUIRED = 403
    PEER_PID_MISMATCH = 404
    PEER_GONE = 405
    PEER_CREDENTIALS_UNAVAILABLE = 406
    PEER_LABEL_UNREADABLE = 407
    ATTRS_NOT_ENABLED = 408
    ATTRS_DAEMON_MISSING = 409

    # SCM_RIGHTS channel
    CHANNEL_CLOSED = 500
    CHANNEL_TRUNCATED = 501
    CHANNEL_CONTROL_TRUNCATED = 502
    CHANNEL_NO_FD = 503
    CHANNEL_TOO_MANY_FDS = 504
    CHANNEL_UNEXPECTED_CONTROL = 505
    CHANNEL_BAD_HEADER = 506
    CHANNEL_FD_NOT_TCP = 507
    CHANNEL_FD_NOT_CONNECTED = 508
    CHANNEL_MESSAGE_TOO_LARGE = 509
    CHANNEL_SEND_FAILED = 510
    CHANNEL_FD_NOT_ALLOWED = 511
    CHANNEL_NOT_SEQPACKET = 512
    CHANNEL_BAD_PAYLOAD = 513

    # daemon, worker library, client, configuration
    CONFIG_INVALID = 600
    CONFIG_UNREADABLE = 601
    HANDSHAKE_TIMEOUT = 602
    HANDSHAKE_LIMIT = 603
    NO_WORKER_AVAILABLE = 604
    WORKER_DIED = 605
    WORKER_BOOT_FAILED = 606
    HANDOFF_NOT_ACKNOWLEDGED = 607
    PEER_CLOSED = 608
    CONNECT_FAILED = 609
    APP_LOAD_FAILED = 610
    CONTROL_UNAVAILABLE = 611
    SYSTEMD_ACTIVATION_INVALID = 612
    SHUTTING_DOWN = 613
    WORKER_NOT_REGISTERED = 614
    REGISTRATION_REFUSED = 615
    MESSAGE_OUT_OF_SEQUENCE = 616
    STREAM_TRUNCATED = 617
    BIND_FAILED = 618
    HANDSHAKE_SOURCE_LIMIT = 619
    HANDSHAKE_EVICTED = 620
    FIRST_TOKEN_TIMEOUT = 621
    CONTROL_BUSY = 622
    USAGE_INVALID = 623
    SERVER_KEY_NOT_PINNED = 624
    MECHANISM_UNKNOWN = 625
    PREFLIGHT_FAILED = 626
    APP_FAILED = 627
    SESSION_DRAINED = 628
    # privilege separation: supervisor, acceptor and worker uids (650+)
    PRIVSEP_SAME_UID = 650
    PRIVSEP_NOT_PERMITTED = 651
    SUPERVISOR_LINK = 652
    SUPERVISOR_SPAWN_FAILED = 653
    SUPERVISOR_UIDS_EXHAUSTED = 654
    ACCEPTOR_DIED = 655
    # systemd adapter (680+)
    SYSTEMD_NOTIFY_SOCKET_INVALID = 680
    SYSTEMD_WATCHDOG_INVALID = 681
    SYSTEMD_NOTIFY_FIELD_INVALID = 682

    # Kerberos V5 mechanism (handoffd.mech.krb5); MIT's own minor goes in the detail
    KRB5_UNAVAILABLE = 1100
    KRB5_EXPORT_INVALID = 1101
    KRB5_NOT_ESTABLISHED = 1102
    KRB5_PRINCIPAL_NOT_ALLOWED = 1103
    KRB5_LIBRARY_ERROR = 1104

    # TLS 1.3 mechanism: the record layer a worker continues (handoffd.core.tls_record)
    TLS_SUITE_UNSUPPORTED = 1200
    TLS_STATE_INVALID = 1201
    TLS_BAD_RECORD_MAC = 1202
    TLS_RECORD_OVERFLOW = 1203
    TLS_UNEXPECTED_MESSAGE = 1204
    TLS_DECODE_ERROR = 1205
    TLS_ILLEGAL_PARAMETER = 1206
    TLS_ALERT_RECEIVED = 1207
    TLS_SESSION_CLOSED = 1208
    TLS_HANDSHAKE_FAILED = 1209
    TLS_CLIENT_NOT_ALLOWED = 1210
    TLS_NOT_TLS = 1211
    TLS_CERTIFICATE_INVALID = 1212
    TLS_KTLS_FAILED = 1213
    TLS_KTLS_NO_REKEY = 1214


_TEXT: Final[dict[Minor, str]] = {
    Minor.NONE: "No further information",
    Minor.BAD_STATUS_VALUE: "The status value is not a valid status code",
    Minor.BAD_STATUS_TYPE: "The status type is neither GSS_C_GSS_CODE nor GSS_C_MECH_CODE",
    Minor.BAD_MESSAGE_CONTEXT: "The message context does not belong to this status value",
    Minor.HANDSHAKE_DECRYPT_FAILED: "A handshake message failed authentication "
    "(corrupted, or from a different session)",
    Minor.HANDSHAKE_UNEXPECTED_TOKEN: "A handshake token arrived when none was expected",
    Minor.HANDSHAKE_OUT_OF_ORDER: "The handshake step was called out of order",
    Minor.PEER_KEY_NOT_ALLOWED: "The client's static key is not on the allow-list",
    Minor.SERVER_KEY_MISMATCH: "The server's static key does not match the pinned fingerprint",
    Minor.ANONYMOUS_NOT_ALLOWED: "Anonymous clients are not allowed by this server",
    Minor.CONTEXT_NOT_ESTABLISHED: "The security context is not yet fully established",
    Minor.CONTEXT_EXPORTED: "The security context was exported and is no longer usable here",
    Minor.CONTEXT_LIFETIME_OVER: "The security context's lifetime is over; re-run the handshake",
    Minor.CONTEXT_DELETED: "The security context was deleted",
    Minor.SEQUENCE_EXHAUSTED: "The message sequence number space is exhausted; "
    "re-run the handshake",
    Minor.MESSAGE_TAMPERED: "A per-message token failed authentication "
    "(tampered, truncated or from another context)",
    Minor.MESSAGE_REFLECTED: "A per-message token was sent by this side (reflected back)",
    Minor.MESSAGE_TOO_LARGE: "The message exceeds the per-message size limit",
    Minor.CONFIDENTIALITY_UNAVAILABLE: "Confidentiality was not negotiated for this context",
    Minor.BAD_KEY_FILE: "The key file is not in the handoffd key format",
    Minor.KEY_FILE_PERMISSIONS: "The private key file is readable by group or others; "
    "chmod 600 it",
    Minor.BAD_ALLOW_LIST: "A line of the allow-list file is malformed",
    Minor.WEAK_PUBLIC_KEY: "A public key is a low-order point and gives no security",
    Minor.BAD_QOP_REQUESTED: "Only the default quality of protection (0) is supported",
    Minor.WRONG_ROLE: "The call does not fit this side's role (initiator or acceptor)",
    Minor.CHANNEL_BINDINGS_MISMATCH: "The channel bindings (prologue) differ between the peers",
    Minor.KEY_FILE_EXISTS: "The key file already exists; keygen never overwrites a key",
    Minor.KEY_FILE_IS_PUBLIC: "The file is a public key file where a private key was expected",
    Minor.PROTECTION_BAD_PARAMETER: "The per-message protection parameters are invalid "
    "(key length, sequence number or window flags)",
    Minor.TOKEN_TRUNCATED: "The token is shorter than its structure requires",
    Minor.TOKEN_TRAILING_BYTES: "The token has bytes after its end",
    Minor.TOKEN_BAD_VERSION: "The token version is not supported",
    Minor.TOKEN_BAD_TYPE: "The token type is not valid here",
    Minor.TOKEN_BAD_FIELD: "A field of the token has an invalid value",
    Minor.TOKEN_TOO_LARGE: "The token exceeds the size limit",
    Minor.TOKEN_BAD_MECH_OID: "The token names a mechanism OID this server does not offer",
    Minor.TOKEN_BAD_FRAMING: "The token framing (length or tag) is malformed",
    Minor.EXPORT_TOKEN_INVALID: "The handoff token could not be opened "
    "(corrupted, or sealed for another key)",
    Minor.EXPORT_TOKEN_EXPIRED: "The handoff token has expired",
    Minor.EXPORT_TOKEN_WRONG_WORKER: "The handoff token was sealed for a different worker",
    Minor.EXPORT_TOKEN_REPLAYED: "The handoff token was already imported once (replay)",
    Minor.KEYRING_UNAVAILABLE: "The kernel keyring is not available (keyctl returned ENOSYS)",
    Minor.KEYRING_DENIED: "Access to the kernel keyring was denied (EPERM or EACCES; "
    "a seccomp profile or key permissions)",
    Minor.KEYRING_QUOTA: "The kernel key quota is exhausted (EDQUOT); "
    "see /proc/key-users and /proc/sys/kernel/keys",
    Minor.KEYRING_KEY_NOT_FOUND: "The key does not exist or is not possessed (ENOKEY)",
    Minor.KEYRING_KEY_REVOKED: "The key was revoked (EKEYREVOKED)",
    Minor.KEYRING_KEY_EXPIRED: "The key has expired (EKEYEXPIRED)",
    Minor.KEYRING_BAD_ARGUMENT: "The keyring call was given an invalid argument (EINVAL)",
    Minor.KEYRING_NO_MEMORY: "The kernel could not allocate memory for the key (ENOMEM)",
    Minor.KEYRING_FAILED: "A keyring call failed unexpectedly",
    Minor.KEYRING_INTERRUPTED: "A keyring call was interrupted (EINTR)",
    Minor.PARKING_SLOTS_EXHAUSTED: "Every key parking slot of the worker is in use",
    Minor.PARKING_KEY_CLAIMED: "The parked key was already claimed",
    Minor.PARKING_FALLBACK_MODE: "The kernel keyring is refused here; "
    "running in the weaker in-memory key mode",
    Minor.PARKING_BAD_REFERENCE: "A key reference is malformed or names no key slot of "
    "this worker",
    Minor.PEER_UID_NOT_ALLOWED: "The peer's uid is not allowed by policy",
    Minor.PEER_GID_NOT_ALLOWED: "The peer's gid is not allowed by policy",
    Minor.PEER_LABEL_NOT_ALLOWED: "The peer's LSM label is not allowed by policy",
    Minor.PEER_LABEL_REQUIRED: "Policy requires an LSM label but the peer has none",
    Minor.PEER_PID_MISMATCH: "The peer is not the expected process",
    Minor.PEER_GONE: "The peer process has exited",
    Minor.PEER_CREDENTIALS_UNAVAILABLE: "The peer's credentials could not be read",
    Minor.PEER_LABEL_UNREADABLE: "The peer's LSM label could not be read",
    Minor.ATTRS_NOT_ENABLED: "\"New attributes only\" needs extended attributes switched on "
    "first (EINVAL)",
    Minor.ATTRS_DAEMON_MISSING: "The attribute source is not available (ENOSYS)",
    Minor.CHANNEL_CLOSED: "The handoff channel's peer has gone (EPIPE, ECONNRESET or EOF)",
    Minor.CHANNEL_TRUNCATED: "A handoff message was truncated (MSG_TRUNC)",
    Minor.CHANNEL_CONTROL_TRUNCATED: "A handoff message's control data was truncated "
    "(MSG_CTRUNC)",
    Minor.CHANNEL_NO_FD: "A handoff message carried no file descriptor",
    Minor.CHANNEL_TOO_MANY_FDS: "A handoff message carried more than one file descriptor",
    Minor.CHANNEL_UNEXPECTED_CONTROL: "A handoff message carried unexpected control data",
    Minor.CHANNEL_BAD_HEADER: "A handoff message header is malformed",
    Minor.CHANNEL_FD_NOT_TCP: "The received descriptor is not a TCP stream socket",
    Minor.CHANNEL_FD_NOT_CONNECTED: "The received socket is not connected",
    Minor.CHANNEL_MESSAGE_TOO_LARGE: "The handoff message exceeds the channel's size limit",
    Minor.CHANNEL_SEND_FAILED: "Sending on the handoff channel failed",
    Minor.CHANNEL_FD_NOT_ALLOWED: "A handoff message of a kind without a descriptor carried one",
    Minor.CHANNEL_NOT_SEQPACKET: "The channel descriptor is not an AF_UNIX SOCK_SEQPACKET socket",
    Minor.CHANNEL_BAD_PAYLOAD: "A handoff message's payload is malformed for its kind "
    "(its header was well-formed)",
    Minor.CONFIG_INVALID: "The configuration is invalid",
    Minor.CONFIG_UNREADABLE: "The configuration file could not be read",
    Minor.HANDSHAKE_TIMEOUT: "The client did not finish the handshake in time",
    Minor.HANDSHAKE_LIMIT: "Every handshake slot holds a finished "
    "handshake waiting for a worker; new connections wait in the listen backlog",
    Minor.NO_WORKER_AVAILABLE: "No worker is available to take the connection",
    Minor.WORKER_DIED: "The worker died before acknowledging the handoff",
    Minor.WORKER_BOOT_FAILED: "Workers keep failing at start-up",
    Minor.HANDOFF_NOT_ACKNOWLEDGED: "The worker did not acknowledge the handoff in time",
    Minor.PEER_CLOSED: "The peer closed the connection",
    Minor.CONNECT_FAILED: "Could not connect to the server",
    Minor.APP_LOAD_FAILED: "The application (module:callable) could not be loaded",
    Minor.CONTROL_UNAVAILABLE: "The daemon's control socket is not reachable",
    Minor.SYSTEMD_ACTIVATION_INVALID: "The systemd socket-activation environment is invalid",
    Minor.SHUTTING_DOWN: "The daemon is shutting down",
    Minor.WORKER_NOT_REGISTERED: "The worker has not registered with the acceptor",
    Minor.REGISTRATION_REFUSED: "The acceptor refused the worker's registration",
    Minor.MESSAGE_OUT_OF_SEQUENCE: "A per-message token arrived out of sequence on a stream "
    "(replayed, dropped or reordered on the way)",
    Minor.STREAM_TRUNCATED: "The connection ended without the peer's authenticated CLOSE, "
    "so what arrived may have been cut short",
    Minor.PRIVSEP_SAME_UID: "Workers would run under the acceptor's uid, which lets a "
    "compromised worker read the server key (set [workers] insecure_same_uid to allow it)",
    Minor.PRIVSEP_NOT_PERMITTED: "Running the acceptor and workers under their own uids "
    "needs root or CAP_SETUID, CAP_SETGID and CAP_KILL",
    Minor.SUPERVISOR_LINK: "A message between the supervisor and the acceptor is malformed "
    "or the link is gone",
    Minor.SUPERVISOR_SPAWN_FAILED: "The supervisor could not start a process",
    Minor.SUPERVISOR_UIDS_EXHAUSTED: "Every uid of [workers] uid_range is in use",
    Minor.ACCEPTOR_DIED: "The acceptor process died",
    Minor.BIND_FAILED: "Could not bind a listening address or socket path",
    Minor.HANDSHAKE_SOURCE_LIMIT: "Too many handshakes in progress from this client's "
    "address ([server] max_handshakes_per_source); connection closed",
    Minor.HANDSHAKE_EVICTED: "Every handshake slot was taken: this stalled handshake was "
    "evicted for a newer connection",
    Minor.FIRST_TOKEN_TIMEOUT: "The client did not send its first token in time "
    "([server] first_token_timeout)",
    Minor.CONTROL_BUSY: "The control or metrics endpoint is at its connection limit "
    "([control] max_connections)",
    Minor.USAGE_INVALID: "The command or call was given invalid arguments",
    Minor.SERVER_KEY_NOT_PINNED: "No server key was pinned: give --server-key, --fingerprint "
    "or --tofu (trust on first use)",
    Minor.MECHANISM_UNKNOWN: "No security mechanism of that name (known: noise, krb5)",
    Minor.PREFLIGHT_FAILED: "A check of serve --check run under the acceptor's or a worker's "
    "uid failed",
    Minor.APP_FAILED: "The server's application failed while serving this session (its "
    "log has the error)",
    Minor.SESSION_DRAINED: "The server stopped: the session was still open at [workers] "
    "drain_timeout",
    Minor.SYSTEMD_NOTIFY_SOCKET_INVALID: "NOTIFY_SOCKET is neither an absolute path "
    "nor an abstract @name",
    Minor.SYSTEMD_WATCHDOG_INVALID: "WATCHDOG_USEC or WATCHDOG_PID is malformed",
    Minor.SYSTEMD_NOTIFY_FIELD_INVALID: "A systemd notification field is not one "
    "KEY=VALUE line",
    Minor.KRB5_UNAVAILABLE: "The Kerberos mechanism needs the gssapi package "
    "(pip install handoffd[krb5]) and MIT krb5",
    Minor.KRB5_EXPORT_INVALID: "A Kerberos export token inside a handoff is malformed",
    Minor.KRB5_NOT_ESTABLISHED: "The Kerberos context is not established",
    Minor.KRB5_PRINCIPAL_NOT_ALLOWED: "The client's Kerberos principal is not in "
    "[krb5] allowed_principals",
    Minor.KRB5_LIBRARY_ERROR: "MIT krb5 reported a failure (its minor code and text follow)",
    Minor.TLS_SUITE_UNSUPPORTED: "The TLS cipher suite is not one of TLS 1.3's AEAD suites "
    "handoffd continues (AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305)",
    Minor.TLS_STATE_INVALID: "The exported TLS session state is malformed",
    Minor.TLS_BAD_RECORD_MAC: "A TLS record failed authentication (bad_record_mac)",
    Minor.TLS_RECORD_OVERFLOW: "A TLS record exceeds the size limit (record_overflow)",
    Minor.TLS_UNEXPECTED_MESSAGE: "A TLS record or message arrived that the session cannot "
    "accept now (unexpected_message)",
    Minor.TLS_DECODE_ERROR: "A TLS message is malformed (decode_error)",
    Minor.TLS_ILLEGAL_PARAMETER: "A TLS message field has a value the protocol forbids "
    "(illegal_parameter)",
    Minor.TLS_ALERT_RECEIVED: "The TLS peer ended the session with a fatal alert",
    Minor.TLS_SESSION_CLOSED: "The TLS session was already closed by this side",
    Minor.TLS_HANDSHAKE_FAILED: "The TLS handshake failed (OpenSSL's reason follows; a "
    "TLS 1.2-only client gets protocol_version)",
    Minor.TLS_CLIENT_NOT_ALLOWED: "The client certificate is not on [tls] allowed_clients",
    Minor.TLS_NOT_TLS: "The first bytes on a TLS port are not a TLS handshake record",
    Minor.TLS_CERTIFICATE_INVALID: "The TLS certificate, key or CA bundle cannot be loaded",
    Minor.TLS_KTLS_FAILED: "The kernel's TLS (kTLS) refused a key or a record operation",
    Minor.TLS_KTLS_NO_REKEY: "A KeyUpdate reached a TLS session in the kernel, which cannot "
    "take a new key on this kernel (Linux < 6.14)",
}


OPERATOR_ERRORS: Final[frozenset[Minor]] = frozenset({
    Minor.CONFIG_INVALID,
    Minor.CONFIG_UNREADABLE,
    Minor.USAGE_INVALID,
    Minor.SERVER_KEY_NOT_PINNED,
    Minor.MECHANISM_UNKNOWN,
    Minor.KEY_FILE_EXISTS,
    Minor.BIND_FAILED,
    Minor.PRIVSEP_SAME_UID,
    Minor.PRIVSEP_NOT_PERMITTED,
    Minor.BAD_KEY_FILE,
    Minor.KEY_FILE_PERMISSIONS,
    Minor.KEY_FILE_IS_PUBLIC,
    Minor.TLS_CERTIFICATE_INVALID,
    Minor.PREFLIGHT_FAILED,
})
"""Config, usage and start-up errors: the operator's own input or host is wrong and the
detail says where
(``<path>: [section] key: why``, the option to give).  The CLI prints them as that one
line with the minor's name and number, not the major's generic text
(:meth:`handoffd.status.GSSError.operator_line`)."""


def text(code: int) -> str | None:
    """Display text of a minor code, or None if handoffd does not define it."""
    try:
        return _TEXT[Minor(code)]
    except ValueError:
        return None


def name(code: int) -> str:
    """Symbolic name of a minor code (``"TOKEN_TRUNCATED"``), or the number itself."""
    try:
        return Minor(code).name
    except ValueError:
        return str(code)


# Module-level aliases used by the status layer.
BAD_STATUS_VALUE: Final = Minor.BAD_STATUS_VALUE
BAD_STATUS_TYPE: Final = Minor.BAD_STATUS_TYPE
BAD_MESSAGE_CONTEXT: Final = Minor.BAD_MESSAGE_CONTEXT
