"""HTTP hardening (docs/serving.md, "Limits"): what stands between a socket and the app.

- `Guard`, an ASGI middleware, checks the API key on the headers before any body is read, caps the body size (413)
  and the time to receive it (408);
- `http_protocol()`, a uvicorn protocol subclass, gives each connection a time limit to send its request headers
  (slowloris), caps the header size (431) and the number of open connections (503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nanoseek.serving.protocol import error_body

if TYPE_CHECKING:
    from nanoseek.serving.server import Server

READ_TIMEOUT = 15.0  # seconds a client has to send a request's headers, and again its body
MAX_CONNECTIONS = 512  # open HTTP connections; more are answered 503 at once
MAX_HEADER_BYTES = 64 * 1024  # request line + headers; more is answered 431
MIN_BODY_BYTES = 1 << 20  # the default body limit is max(1 MiB, BODY_BYTES_PER_TOKEN x max_seq_len)
BODY_BYTES_PER_TOKEN = 256


class Guard:
    """Pure ASGI middleware in front of the app: the API key is checked on the headers, before any of the body is
    read (401 whatever the body or the path); the body is read here, at most `max_body_bytes` (413 from the
    Content-Length header, or as soon as a chunked body grows past it) within `read_timeout` seconds (408), and
    handed to the app in one piece. Every refusal closes the connection, so an unread body is never read."""

    def __init__(self, app: Any, server: Server, max_body_bytes: int, read_timeout: float, open_paths: frozenset[str]):
        self.app, self.server = app, server
        self.max_body_bytes, self.read_timeout, self.open_paths = max_body_bytes, read_timeout, open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if scope["path"] not in self.open_paths and not self.server.authorized(headers):
            await self._refuse(send, 401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                               "authentication_error", "invalid_api_key")
            return
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._refuse(send, 413, f"the body is larger than this server's limit of {self.max_body_bytes} "
                               "bytes (serve --max-body-bytes)", "invalid_request_error", "body_too_large")
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.read_timeout)
        except asyncio.TimeoutError:
            await self._refuse(send, 408, f"the body did not arrive within {self.read_timeout:g} s",
                               "invalid_request_error", "request_timeout")
            return
        except ConnectionError:  # the client left while sending
            return
        if body is None:
            await self._refuse(send, 413, f"the body is larger than this server's limit of {self.max_body_bytes} "
                               "bytes (serve --max-body-bytes)", "invalid_request_error", "body_too_large")
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)

    async def _read(self, receive: Callable) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, send: Callable, status: int, message: str, type: str, code: str) -> None:
        self.server.metrics.errors[status] = self.server.metrics.errors.get(status, 0) + 1
        body = error_body(message, type, None, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = error_body(message, "server_error" if status >= 500 else "invalid_request_error", None, code)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{'retry-after: 1' + chr(13) + chr(10) if status == 503 else ''}connection: close\r\n\r\n").encode() + body


def http_protocol(read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                  max_header_bytes: int = MAX_HEADER_BYTES) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) with connection-level limits it lacks: uvicorn arms no timer on
    a new connection and cancels its keep-alive timer on every byte received, so a client that sends its headers a
    byte at a time (or never) holds the connection forever. Here a connection must deliver complete request headers
    within `read_timeout` seconds of opening or of its previous response (else it is closed, with 408 if it had
    started a request), at most `max_header_bytes` of them (431), and a connection beyond `max_connections` open
    ones gets 503 at once. The body's own limits are Guard's."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedHTTP(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _in_headers = True  # between requests: bytes received are request line and headers
        _header_bytes = 0
        _tail = b""  # the last 3 bytes scanned, for a CRLF CRLF split across two reads

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_raw_response(503, "Service Unavailable", f"more than {max_connections} open "
                                              "connections (serve --max-connections); retry later",
                                              "too_many_connections"))
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._in_headers, self._header_bytes, self._tail = True, 0, b""
            self._timer = self.loop.call_later(read_timeout, self._headers_timed_out)

        def _headers_timed_out(self) -> None:
            self._timer = None
            # no request whose headers are complete is being served: close (408 if one had started to arrive)
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                if self._header_bytes:
                    self.transport.write(_raw_response(408, "Request Timeout", "the request headers did not arrive "
                                                       f"within {read_timeout:g} s", "request_timeout"))
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._in_headers:  # count up to the blank line that ends the headers (what follows is the body)
                k = (self._tail + data).find(b"\r\n\r\n")
                size = self._header_bytes + (len(data) if k < 0 else k + 4 - len(self._tail))
                if size > max_header_bytes:
                    self.transport.write(_raw_response(431, "Request Header Fields Too Large", "the request line "
                                                       f"and headers exceed {max_header_bytes} bytes",
                                                       "headers_too_large"))
                    self.transport.close()
                    return
                self._header_bytes, self._in_headers = size, k < 0
                self._tail = (self._tail + data)[-3:]
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

    return GuardedHTTP
