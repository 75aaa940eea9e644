"""The client side: connect to a handoffd server and talk to a worker (public API).

:func:`connect` opens a TCP connection, runs the handshake (Noise, the server pinned by
its key's fingerprint, or trust on first use through :class:`KnownServers`) and returns
a :class:`SecureStream`; :func:`open_secure_stream` and :func:`open_krb5_stream` run the
handshake over a transport you opened yourself.  :func:`load_private_key` and
:func:`load_public_key` read handoffd's key files (``handoffd keygen``), and
:func:`fingerprint` gives the ``SHA256:…`` pin of a public key.  Failures are
:class:`GSSError`.

Everything here is re-exported from ``handoffd.runtime`` and ``handoffd.keyfiles``,
whose layout may change; import from this module (``tests/test_public_api.py``).
"""

from handoffd.core.credentials import fingerprint as fingerprint
from handoffd.keyfiles import load_private_key as load_private_key
from handoffd.keyfiles import load_public_key as load_public_key
from handoffd.minor import Minor as Minor
from handoffd.runtime.client import KnownServers as KnownServers
from handoffd.runtime.client import connect as connect
from handoffd.runtime.client import default_known_servers as default_known_servers
from handoffd.runtime.client import open_krb5_stream as open_krb5_stream
from handoffd.runtime.client import open_secure_stream as open_secure_stream
from handoffd.runtime.stream import SecureStream as SecureStream
from handoffd.status import GSSError as GSSError

__all__ = [
    "GSSError",
    "KnownServers",
    "Minor",
    "SecureStream",
    "connect",
    "default_known_servers",
    "fingerprint",
    "load_private_key",
    "load_public_key",
    "open_krb5_stream",
    "open_secure_stream",
]
