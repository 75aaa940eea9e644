"""handoffd: establish a security context once, hand it with the connection to a worker.

The public API is re-exported here; submodules whose names start with an
underscore are private.
"""

from handoffd.minor import Minor
from handoffd.status import GSSError, display_status, status_messages

__all__ = ["GSSError", "Minor", "__version__", "display_status", "status_messages"]

__version__ = "0.1.0"
