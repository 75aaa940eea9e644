"""HTTP/1.1 over a handed-off secure stream, with h11 (sans-I/O, like handoffd's core)."""

from __future__ import annotations

import json
import os

import h11
import trio

from handoffd.worker import SecureStream

MAX_BODY = 1 << 20


async def _next_event(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some())


def _response(request: h11.Request, body: bytes, info: dict[str, object]) -> tuple[int, bytes]:
    target = request.target.decode("ascii", "replace")
    if target == "/whoami":
        return 200, json.dumps({
            "worker_pid": os.getpid(),
            "peer_name": info.get("peer_name"),
            "anonymous": info.get("anonymous"),
        }).encode()
    if target.startswith("/echo") and request.method == b"POST":
        return 200, body
    if target == "/":
        return 200, b"hello from a pre-forked worker over a handed-off secure channel\n"
    return 404, b"not found\n"


async def _read_request(conn: h11.Connection, stream: SecureStream
                        ) -> tuple[int, bytes, h11.Request | None] | None:
    """The next request and its response, or None when the client is done."""
    try:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            return 400, b"bad request\n", None
        chunks = bytearray()
        while True:
            part = await _next_event(conn, stream)
            if isinstance(part, h11.EndOfMessage):
                break
            if isinstance(part, h11.Data):
                chunks += part.data
                if len(chunks) > MAX_BODY:
                    return 413, b"request body too large\n", None
    except h11.RemoteProtocolError:
        return 400, b"bad request\n", None
    status, body = _response(event, bytes(chunks), stream.info)
    return status, body, event


async def serve_http(stream: SecureStream) -> None:
    """Serve HTTP/1.1 requests (keep-alive) on one handed-off connection."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    while True:
        answer = await _read_request(conn, stream)
        if answer is None:
            return
        status, body, request = answer
        if conn.our_state is not h11.SEND_RESPONSE:
            return  # the client broke the protocol past the point of answering
        headers = [("content-type", "application/json" if body.startswith(b"{")
                    else "text/plain"), ("content-length", str(len(body)))]
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out or b"")
        if request is None or conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


class HTTPClient:
    """A keep-alive HTTP/1.1 client over one secure stream (for the example and its test)."""

    def __init__(self, stream: SecureStream, host: str = "handoffd") -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("host", self.host), ("content-length", str(len(body)))]
        out = self.conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)
        status = 0
        data = bytearray()
        while True:
            event = await _next_event(self.conn, self.stream)
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, bytes(data)
