"""``handoffd doctor``'s kTLS line tells what the kernel really does (it tries the ULP on a
loopback connection): here, with no ``tls`` ULP, it must say so; in a kernel that has
one (Debian's, in the LSM VM) it must say available."""

from __future__ import annotations

import os
from pathlib import Path

from handoffd.doctor import _check_ktls


def _kernel_has_tls_ulp() -> bool:
    available = Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split()
    if "tls" in available:
        return True
    release = os.uname().release
    return (
        any(Path(f"/lib/modules/{release}").rglob("tls.ko*"))
        if Path(f"/lib/modules/{release}").exists()
        else False
    )


def test_the_ktls_check_agrees_with_the_kernel() -> None:
    check = _check_ktls()
    assert check.name == "kTLS"
    assert check.ok == _kernel_has_tls_ulp(), check
    assert check.consequence
