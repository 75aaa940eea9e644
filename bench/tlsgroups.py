"""Restrict an ``ssl.SSLContext`` to named key-exchange groups (``X25519``, ``prime256v1``).

``SSLContext.set_ecdh_curve`` maps its name to an EC curve in some Python builds
(Debian's 3.11.2: ``UNKNOWN_GROUP`` for X25519), so where it refuses, the group list is
set on the context's ``SSL_CTX`` with OpenSSL's own ``SSL_CTX_set1_groups_list``
(``SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, list)``).  ``bench.run`` proves the
result with real handshakes (X25519 must succeed, P-256 must fail), so a mistake here
shows up as a failed benchmark, not as a wrong figure.
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl

_SSL_CTRL_SET_GROUPS_LIST = 92


def set_groups(context: ssl.SSLContext, groups: str) -> None:
    """Offer or accept only ``groups`` (colon-separated OpenSSL names)."""
    try:
        context.set_ecdh_curve(groups)
        return
    except ssl.SSLError:
        pass
    ctrl = ctypes.CDLL(_ssl.__file__).SSL_CTX_ctrl  # resolved in the libssl _ssl uses
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ctrl.restype = ctypes.c_long
    # PySSLContext starts with PyObject_HEAD (refcount, type) and then its SSL_CTX *.
    ctx = ctypes.c_void_p.from_address(id(context) + 2 * ctypes.sizeof(ctypes.c_void_p))
    if ctrl(ctx.value, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        raise ssl.SSLError(f"cannot restrict the key exchange to {groups}")
