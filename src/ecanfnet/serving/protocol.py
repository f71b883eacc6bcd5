"""uvicorn's h11 HTTP protocol with a bound on how long a connection may take to send its request headers.

uvicorn bounds idle keep-alive connections but not a client that connects and sends its headers a
byte at a time (or nothing at all): each such connection would be held open forever. Its 400 for a
malformed request (or headers over --max-header-bytes) gets the API's JSON error shape.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

BAD_REQUEST = "invalid HTTP request: malformed, or its request line and headers are over --max-header-bytes"


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """An H11Protocol class that closes a connection whose next request headers are not complete within seconds."""

    class HeaderTimeoutProtocol(H11Protocol):
        header_timeout = seconds
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()  # the clock of the next request on this keep-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"detail": BAD_REQUEST}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

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

    return HeaderTimeoutProtocol
