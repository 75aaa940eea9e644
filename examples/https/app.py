"""A small HTTP/1.1 app for TLS handoffs: one request per connection, answered with the
serving worker's pid and what the handoff told it (ALPN, SNI, client certificate)."""

from __future__ import annotations

import html
import os

from handoffd.worker import SecureStream


async def handler(stream: SecureStream) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = await stream.receive_some()
        if not chunk or len(request) > 65536:
            return
        request += chunk
    info = stream.info
    facts = ", ".join(
        f"{key}={html.escape(str(info.get(key, '')))}"
        for key in ("mechanism", "alpn", "sni", "peer_name")
    )
    body = (
        "<!doctype html><html><head><title>handoffd</title></head>"
        f'<body style="background:#{os.getpid() % 0xFFFFFF:06x}">'
        f"<h1>served by worker {os.getpid()}</h1><p>{facts}</p></body></html>\n"
    ).encode()
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
