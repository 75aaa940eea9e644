"""A real browser through the TLS mechanism: headless Chromium (Debian's ``chromium``)
loads a page from ``handoffd serve``'s ``[tls]`` listener, answered by a worker running
``examples.https.app`` (a stream handler) or ``examples.asgi.app`` (Starlette under
hypercorn); its screenshot is checked for that worker's answer (the page's background
colour is the serving worker's pid), and its DOM for the text.

Chromium trusts the throwaway certificate by its public key only
(``--ignore-certificate-errors-spki-list``), the way Chromium's own tests pin a server.
``.ci/run`` installs Chromium (``make deps-chromium``); without it this test skips.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.daemon_harness import RunningDaemon, start_daemon, tls_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make deps-chromium)"
)


@pytest.fixture(params=["handler", "asgi"])
async def https_daemon(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[RunningDaemon, str, str]]:
    """handoffd with a [tls] listener serving examples/https (a stream handler) or
    examples/asgi (Starlette under hypercorn, [workers] asgi): both paint the page in the
    serving worker's colour."""
    extra, pki, acceptor_uid = tls_config(tmp_path, alpn='["http/1.1"]')
    if request.param == "asgi":
        extra += '[workers]\nasgi = "examples.asgi.app:app"\n'
    daemon = await start_daemon(
        tmp_path, workers=2, app="examples.https.app:handler", extra=extra,
        acceptor_uid=acceptor_uid,
    )  # fmt: skip
    cert = x509.load_pem_x509_certificate(pki["cert"].read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    try:
        (address,) = (await daemon.status())["tls_listen"]
        yield daemon, f"https://localhost:{address.rsplit(':', 1)[1]}/", pin
    finally:
        await daemon.stop()


async def chromium(url: str, pin: str, profile: Path, *args: str) -> bytes:
    assert CHROMIUM is not None
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}",
        f"--ignore-certificate-errors-spki-list={pin}", "--window-size=400,300", *args, url,
    ]  # fmt: skip
    with trio.fail_after(60):
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return bytes(result.stdout)


def png_pixel(png: bytes, x: int, y: int) -> tuple[int, int, int]:
    """The RGB of one pixel of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        body = png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, _height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 4 if color == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * bpp
    previous = bytearray(stride)
    for row in range(y + 1):  # unfilter rows up to y (PNG filters 0-4)
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            corner = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        previous = line
    r, g, b = previous[x * bpp : x * bpp + 3]
    return r, g, b


def colour_of(pid: int) -> tuple[int, int, int]:
    value = pid % 0xFFFFFF  # examples/https/app.py's and examples/asgi/app.py's background
    return value >> 16, (value >> 8) & 0xFF, value & 0xFF


async def test_a_browser_page_is_served_by_a_worker(
    https_daemon: tuple[RunningDaemon, str, str], tmp_path: Path
) -> None:
    daemon, url, pin = https_daemon
    workers = await daemon.worker_pids()
    dom = (await chromium(url, pin, tmp_path / "profile-dom", "--dump-dom")).decode()
    match = re.search(r"served by worker (\d+)</h1>", dom)
    assert match, dom
    assert re.search(r"mechanism(=|: )tls", dom) and "http/1.1" in dom, dom
    assert int(match[1]) in workers and int(match[1]) != daemon.pid

    shot = tmp_path / "page.png"
    await chromium(url, pin, tmp_path / "profile-shot", f"--screenshot={shot}")
    pixel = png_pixel(shot.read_bytes(), 5, 290)  # below the text: the page's background
    assert pixel in {colour_of(pid) for pid in workers}, (pixel, workers)
