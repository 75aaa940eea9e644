"""Worker applications of the Kerberos tests (loaded as ``tests.krb5_apps:NAME``)."""

from __future__ import annotations

import contextlib
import errno
import json
import os

from handoffd.runtime.stream import SecureStream


async def keytab_probe(stream: SecureStream) -> None:
    """Report what this worker knows of Kerberos acceptor keys, then echo.

    The first line is JSON: the worker's pid, its KRB5_* environment, the files
    it has open and the GSS status of trying to get acceptor credentials
    (which needs a keytab), its uid, and whether it can open the file named by
    ``HANDOFFD_TEST_KEYTAB`` (errno name, or "readable").
    """
    import gssapi
    import gssapi.raw.misc

    try:
        gssapi.Credentials(usage="accept").lifetime  # noqa: B018 - forces acquisition
        acquire = [0, 0]
    except gssapi.raw.misc.GSSError as error:
        acquire = [int(error.maj_code), int(error.min_code)]
    open_files = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
    keytab = os.environ.get("HANDOFFD_TEST_KEYTAB")
    keytab_open = None
    if keytab:
        try:
            with open(keytab, "rb"):
                keytab_open = "readable"
        except OSError as error:
            keytab_open = errno.errorcode.get(error.errno or 0, str(error.errno))
    report = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "keytab_open": keytab_open,
        "env": {k: v for k, v in os.environ.items() if k.startswith("KRB5")},
        "open_files": open_files,
        "acquire_accept_creds": acquire,
        "peer_name": stream.info.get("peer_name"),
        "mechanism": stream.info.get("mechanism"),
    }
    await stream.send_all(json.dumps(report).encode() + b"\n")
    async for data in stream:
        await stream.send_all(data)
