"""uvicorn's h11 HTTP protocol with a bound on how long a connection may take to send its request headers.

uvicorn bounds idle keep-alive connections but not a client that connects and sends its headers a
byte at a time (or nothing at all): each such connection would be held open forever. Its 400 for a
malformed request (or headers over --max-header-bytes) and its 503 beyond --max-connections (uvicorn's
limit_concurrency) get the API's JSON error shape, the 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

BAD_REQUEST = "invalid HTTP request: malformed, or its request line and headers are over --max-header-bytes"
BUSY = ("server busy: more than {limit} connections are open, or {limit} requests are already being handled "
        "(--max-connections)")
V2_PREFIX = "/v2"  # the Open Inference Protocol's routes, whose errors are {"error": ...}


def error_payload(path: str, message: str) -> dict[str, str]:
    """The JSON body of an error on path, its message on one line: {"error": ...} under /v2, else {"detail": ...}."""
    key = "error" if path == V2_PREFIX or path.startswith(V2_PREFIX + "/") else "detail"
    return {key: " ".join(message.split())}


class HeaderTimeoutProtocol(H11Protocol):
    """One HTTP/1.1 connection: uvicorn's, plus the header timeout and JSON 400/503 answers."""

    header_timeout = 30.0  # seconds; header_timeout_protocol makes a subclass with the server's own
    _header_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn answers over its limit_concurrency with its own plain-text 503: the same limit is
        # checked here instead (uvicorn's check off), in front of the app, to answer in the API's shape.
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        self.api_app, self.app = self.app, self._app_unless_busy

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers."""
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        """Start the clock for the next request's headers on this keep-alive connection."""
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the header clock."""
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A JSON 400 for a malformed request or headers over --max-header-bytes, then close."""
        body = json.dumps({"detail": BAD_REQUEST}).encode()  # the request line may not even have a path
        headers = _closing_json_headers(body)
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    async def _app_unless_busy(self, scope: Any, receive: Any, send: Any) -> None:
        """The app, or a JSON 503 + Retry-After (then close) over --max-connections."""
        limit = self.max_connections
        # This request's own task is already in self.tasks (uvicorn counted before adding it).
        if limit is None or (len(self.connections) <= limit and len(self.tasks) <= limit):
            return await self.api_app(scope, receive, send)
        self.logger.warning("Exceeded --max-connections %d.", limit)
        body = json.dumps(error_payload(scope.get("path", ""), BUSY.format(limit=limit))).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [*_closing_json_headers(body), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = None
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # the headers arrived and a request is being handled: the app bounds its body
        if not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class uvicorn is given: closes a connection whose next request headers take over seconds."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})


def _closing_json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    """Headers of a JSON error body after which the connection is closed."""
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]
