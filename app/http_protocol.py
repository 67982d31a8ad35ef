"""uvicorn's httptools protocol with bounds on the request head (request line and headers):
its size, and the time it may take to arrive.

httptools buffers a header line until it ends and uvicorn sets no limit of its own, so before
this a client could hold 10 MB of unfinished headers per connection, unauthenticated: 20 such
connections added 220 MB to the server's memory, which it kept after they closed. Past
`MAX_HEAD_BYTES` of head the connection now gets 431 and is closed. nginx's default allows 8 KB
per header line and 32 KB in all; 64 KB leaves room for long tokens and cookies.

uvicorn also never times out a connection that has not sent a whole request head: neither a
new one that sends nothing nor one that trickles its headers (slowloris). Each held a file
descriptor for good (measured: both still open after 90 s), so one client could take them all.
A head must now arrive within `head_timeout_s` (PNEUMOSCAN_HEAD_TIMEOUT_S, 30 s; nginx's
client_header_timeout is 60 s), counted from the connection's start or from the first byte of
a kept-alive connection's next request: the connection then gets 408 and is closed (a silent
one is just closed). Idle kept-alive connections keep uvicorn's own timeout; a slow body, the
app's upload deadline.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
# At shutdown, how long an idle keep-alive connection may still bring one last request.
IDLE_GRACE_S = 1.0
STATUS_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
BODY_431 = json.dumps(
    {
        "error": {
            "code": "headers_too_large",
            "message": f"The request line and headers exceed {MAX_HEAD_BYTES} bytes.",
        }
    }
).encode()
STATUS_408 = b"HTTP/1.1 408 Request Timeout\r\n"
BODY_408 = json.dumps(
    {
        "error": {
            "code": "request_head_timeout",
            "message": "The request line and headers did not arrive in time.",
        }
    }
).encode()

logger = logging.getLogger("pneumoscan")


class BoundedHeadHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes that arrive while a request's head is incomplete, from the connection's
    start or the end of the previous request (the chunk that ends a head may carry body bytes
    too, which is why the check runs after the parser has seen it)."""

    head_timeout_s = 30.0  # set from the settings by `pneumoscan serve`

    def connection_made(self, transport: Any) -> None:
        self._head_bytes = 0
        self._in_head = True
        self._idle_close: Any = None  # the pending close of an idle connection at shutdown
        self._head_deadline: Any = None
        super().connection_made(transport)
        self._start_head_deadline()

    def _start_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(STATUS_408, BODY_408)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().on_headers_complete()
        if self._idle_close is not None:  # the last request of a connection being shut down
            self._idle_close.cancel()
            self._idle_close = None
            self.cycle.keep_alive = False  # answered with Connection: close, then closed

    def shutdown(self) -> None:
        """uvicorn closes an idle keep-alive connection at once when it shuts down, and a
        request its client had just sent on it is reset unanswered (`python -m
        benchmarks.graceful_shutdown`: 1 to 5 lost answers in about half the runs). An idle
        connection here gets `IDLE_GRACE_S` for a last request, answered with `Connection:
        close`; only a connection that stays silent that long is closed under its client."""
        if self.cycle is None or self.cycle.response_complete:
            if self._idle_close is None and not self.transport.is_closing():
                self._idle_close = self.loop.call_later(IDLE_GRACE_S, self.transport.close)
        else:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        # what arrives next on a kept-alive connection is the next request's head
        self._head_bytes = 0
        self._in_head = True
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._head_deadline is None:  # the first byte of a kept-alive connection's next
                self._start_head_deadline()  # request: its head has the same time to arrive
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            if not self.transport.is_closing():
                self._refuse_head()

    def _refuse_head(self) -> None:
        logger.warning("request head over %d bytes: 431, connection closed", MAX_HEAD_BYTES)
        self._refuse(STATUS_431, BODY_431)

    def _refuse(self, status: bytes, body: bytes) -> None:
        """Answer `status` with the JSON error `body` and close the connection."""
        content = [status]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
