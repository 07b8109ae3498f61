"""The admin listener's HTTP/1.1 layer, below its handler (the proxy port has its own,
:mod:`sigproxy.http1`): bounds on what a client can make the process hold before it is
admitted (the whole request head, open connections, the time to send a head), and JSON
answers for requests aiohttp's parser refuses (malformed request lines and headers,
oversized heads, conflicting Content-Length / Transfer-Encoding). Log lines name the
problem without quoting the raw bytes (which may hold query values).

This is the one module that reaches into aiohttp's server protocol (``RequestHandler``'s
message queue); ``tests/test_aiohttp_contract.py`` pins the surface it uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from .config import Limits

log = logging.getLogger("sigproxy.protocol")

Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
_QUEUED_REQUESTS = 2


class HeadTooLarge(HttpProcessingError):
    """A request head over ``limits.max_header_bytes``."""


def describe(exc: BaseException | None) -> tuple[int, str, str]:
    """(status, error code, message) for a parser error; the message has no raw bytes."""
    if isinstance(exc, HeadTooLarge):
        return 431, "headers_too_large", "the request head is over limits.max_header_bytes"
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        if isinstance(line, bytes | bytearray) and line[:1] == b"/":
            return 414, "uri_too_long", "the request target is too long"
        return 431, "headers_too_large", "a request header is too large"
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc.message):
        return 431, "headers_too_large", "too many request headers"
    if isinstance(exc, HttpProcessingError):
        text = str(exc.message or "").strip()
        first = text.splitlines()[0].rstrip(":") if text else "malformed request"
        if "'" in first or '"' in first:  # would quote client bytes
            first = type(exc).__name__
        return 400, "bad_request", f"malformed HTTP request: {first}"
    return 500, "internal_error", "sigproxy failed unexpectedly"


def json_error(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode()


class BoundedRequestHandler(RequestHandler):
    """aiohttp's server protocol with a cap on the whole request head and JSON errors.

    aiohttp bounds each header line (8 KiB) and their number (128), which still lets an
    unauthenticated client park about 1 MB per connection; here the head as a whole is
    held to ``limits.max_header_bytes``, whether it completes or keeps trickling in.
    """

    __slots__ = ("_body", "_head_bytes", "_received", "_refused")

    def __init__(self, manager: BoundedServer, **kwargs: object) -> None:
        super().__init__(manager, **kwargs)  # type: ignore[arg-type]
        self._head_bytes = 0
        self._received = 0
        self._body: StreamReader | None = None
        self._refused = False
        # aiohttp parses and queues up to 32 requests per connection before it stops:
        # 32 pipelined heads just under the cap would park 4 MB. Two at a time (one in
        # hand, one behind it) is what pipelining clients need; the parser then keeps
        # the rest of a read unparsed and reading stops until they are taken.
        self._max_msg_queue_size = _QUEUED_REQUESTS
        self._msg_queue_resume_size = _QUEUED_REQUESTS - 1
        self._parser = HttpRequestParser(
            self,
            self._loop,
            self._read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=False,
            max_msg_queue_size=_QUEUED_REQUESTS,
        )

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        body = self._body
        in_head = body is None or body.is_eof()
        messages = self._messages
        queued = len(messages)
        super().data_received(data)
        limit = self._limits.max_header_bytes
        # Every byte since the last head completed, body bytes and all: the most a head
        # completing now can be. Only past the cap is the head measured exactly.
        received = self._received + len(data)
        if len(messages) == queued:
            self._received = received
            if in_head:  # bytes count towards a head while no body is arriving
                self._head_bytes += len(data)
                if self._head_bytes > limit:
                    self._refuse_head(None)
            return
        for index in range(queued, len(messages)):
            message = messages[index][0]
            if isinstance(message, _ErrInfo):
                if body is not None and not body.is_eof():
                    # The body being read broke its framing (a bad chunk size, trailers
                    # too large): its reader hears it now, not at the body timeout.
                    body.set_exception(message.exc)
                continue
            if received > limit and _head_size(message) > limit:
                self._refuse_head(index)
                return
        self._head_bytes = 0
        # The next head may have begun in this read: its bytes are at most all of it.
        self._received = len(data)
        self._body = messages[-1][1]

    @property
    def _limits(self) -> Limits:
        manager = self._manager
        assert isinstance(manager, BoundedServer)
        return manager.limits

    def _refuse_head(self, index: int | None) -> None:
        """Answer 431 in the place of the message at ``index`` (a head still arriving when
        None), and take nothing more from this connection."""
        self._refused = True
        error = HeadTooLarge(message="request head too large")
        entry = (_ErrInfo(status=431, exc=error, message=str(error.message)), EMPTY_PAYLOAD)
        if index is None:
            self._messages.append(entry)
        else:
            while len(self._messages) > index:
                self._messages.pop()
            self._messages.append(entry)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        manager = self._manager
        if isinstance(manager, BoundedServer):
            manager.open_connections -= 1
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        code_status, code, text = describe(exc)
        if exc is None or not isinstance(exc, HttpProcessingError):
            code_status = status
            if status != 500:
                code, text = "bad_request", f"refused: {status}"
        if code_status >= 500:
            log.error("unexpected error from %s", request.remote, exc_info=exc)
        else:
            log.info("refused a request from %s: %s %s", request.remote, code_status, text)
        resp = web.Response(
            status=code_status,
            body=json_error(code, text),
            content_type="application/json",
        )
        resp.force_close()
        return resp


def _head_size(message: object) -> int:
    raw_headers = getattr(message, "raw_headers", ())
    size = len(getattr(message, "method", "")) + len(getattr(message, "path", "")) + 12
    return size + sum(len(name) + len(value) + 4 for name, value in raw_headers)


_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
)


class _Refuse(asyncio.Protocol):
    """A connection over the listener's cap: told so in one write, then closed."""

    def __init__(self, what: str) -> None:
        self._body = json_error(
            "too_many_connections",
            f"the {what} has limits.max_client_connections connections open; retry shortly",
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        head = _TOO_MANY + b"Content-Length: %d\r\n\r\n" % len(self._body)
        transport.write(head + self._body)
        transport.close()


class BoundedServer(Server):
    """aiohttp's low-level server making :class:`BoundedRequestHandler` connections, at
    most ``limits.max_client_connections`` at once."""

    def __init__(self, handler: Handler, *, limits: Limits, what: str, **kwargs: object) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self.limits = limits
        self.what = what
        # Counted when a connection is accepted, not when aiohttp registers it a loop
        # turn later: a burst of accepts must not slip past the cap.
        self.open_connections = 0
        self._warned = -60.0

    def __call__(self) -> RequestHandler:
        if self.open_connections >= self.limits.max_client_connections:
            now = time.monotonic()
            if now - self._warned >= 60.0:  # a flood must not write a line per connection
                self._warned = now
                log.warning(
                    "%s: refused a connection, %d are open (limits.max_client_connections)",
                    self.what,
                    self.open_connections,
                )
            return _Refuse(self.what)  # type: ignore[return-value]
        self.open_connections += 1
        return BoundedRequestHandler(self, loop=self._loop, **self._kwargs)


class ListenerRunner(web.ServerRunner):
    """Serves one handler on aiohttp's low-level server: every request goes to it whatever
    its target (CONNECT's authority form and ``OPTIONS *`` included), without an
    Application's router and middleware chain."""

    def __init__(
        self,
        handler: Handler,
        *,
        what: str,
        limits: Limits,
        shutdown_timeout: float,
        header_timeout: float,
    ) -> None:
        server = BoundedServer(
            handler,
            limits=limits,
            what=what,
            handler_cancellation=True,
            access_log=None,
            # A connection must send a complete request head within this, and may stay
            # idle between requests this long.
            keepalive_timeout=header_timeout,
            # Request bodies go upstream byte for byte, Content-Encoding and all: the hash
            # is of what is sent, and the function decides what to do with gzip.
            auto_decompress=False,
        )
        super().__init__(server, shutdown_timeout=shutdown_timeout)
