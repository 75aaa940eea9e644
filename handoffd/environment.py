"""The environment variables handoffd's processes pass each other, in one place.

The supervisor, the acceptor and the workers are separate programs (exec'd, each under
a uid of its own); what one tells the next at start-up travels in these variables, next
to the fds they name.  A child's environment is scrubbed of every one of them it was
not meant to get (:func:`handoffd.runtime.spawner.child_environment`).
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "HANDOFFD_"

# supervisor -> acceptor
SUPERVISOR_FD: Final = "HANDOFFD_SUPERVISOR_FD"  # the acceptor's end of the supervisor link
SUPERVISOR_PID: Final = "HANDOFFD_SUPERVISOR_PID"
SUPERVISOR_ACCEPTOR: Final = "HANDOFFD_SUPERVISOR_ACCEPTOR"  # this acceptor's index in its set
SUPERVISOR_PEER_FD: Final = "HANDOFFD_SUPERVISOR_PEER_FD"  # acceptor 0's status links
WATCHDOG_USEC: Final = "HANDOFFD_WATCHDOG_USEC"  # systemd's watchdog, for the acceptor
BOUND: Final = "HANDOFFD_BOUND"  # the listening sockets the supervisor bound (fd numbers)

# acceptor (via the supervisor) -> worker
CHANNEL_FD: Final = "HANDOFFD_CHANNEL_FD"  # the worker's end of its handoff channel
WORKER_ID: Final = "HANDOFFD_WORKER_ID"
ACCEPTOR_PID: Final = "HANDOFFD_ACCEPTOR_PID"
GUESTS: Final = "HANDOFFD_GUESTS"  # the shared pool: other acceptors' channels and grants
PARKING_MODE: Final = "HANDOFFD_PARKING_MODE"  # the key grant (docs/KEYRING.md)
PARKING_KEYRING: Final = "HANDOFFD_PARKING_KEYRING"
PARKING_FD: Final = "HANDOFFD_PARKING_FD"
PARKING_SLOTS: Final = "HANDOFFD_PARKING_SLOTS"
PARKING_WORKER: Final = "HANDOFFD_PARKING_WORKER"

# an operator -> a gunicorn worker class (handoffd.gunicorn)
REGISTER_SOCKET: Final = "HANDOFFD_REGISTER_SOCKET"
ACCEPTOR_UID: Final = "HANDOFFD_ACCEPTOR_UID"
