"""The worker side, for embedding handoffd in a pre-fork server (public API).

A worker receives handed-off, already-secured connections from a running
``handoffd serve``: spawned by it (:meth:`HandoffReceiver.inherited`, first thing in
the process) or registering itself over the registration socket
(:meth:`HandoffReceiver.register`).  Each connection is a :class:`SecureStream`, a
``trio.abc.Stream`` whose ``stream.info`` names the authenticated peer.  Failures are
:class:`GSSError` (a GSS major and minor status with display text).

Everything here is re-exported from ``handoffd.runtime``, whose layout may change;
import from this module.  ``tests/test_public_api.py`` checks that every name listed in
``__all__`` is here, documented, and that README's examples use only public modules.
"""

from handoffd.minor import Minor as Minor
from handoffd.runtime.stream import SecureStream as SecureStream
from handoffd.runtime.worker import HandoffReceiver as HandoffReceiver
from handoffd.runtime.worker import WorkerIdentity as WorkerIdentity
from handoffd.runtime.worker import serve as serve
from handoffd.status import GSSError as GSSError

__all__ = ["GSSError", "HandoffReceiver", "Minor", "SecureStream", "WorkerIdentity", "serve"]
