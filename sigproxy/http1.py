"""The listeners' HTTP/1.1 server (the proxy port and the admin port): an asyncio
protocol on ``httptools`` (llhttp).

One :class:`Connection` per client connection parses requests with llhttp and hands each
one, as a small :class:`Request`, to the handler, which answers through the request
(:meth:`Request.respond` for a whole answer in one write, or :meth:`Request.start`,
:meth:`Request.write` and :meth:`Request.end` to stream). There are no per-request
framework objects: the request holds its head, its body as it arrives and the few
writing methods the proxy needs.

Bounds, all before the handler runs: the whole request head (``limits.max_header_bytes``,
431, also while it trickles in), each line (8190 bytes: 414 for the target, 431 for a
header) and the number of headers (128); two pipelined requests queued per connection
(one in hand, one behind it; what follows waits unparsed, read on up to ``READ_AHEAD``
so that a client leaving is noticed, then reading stops until a request is taken);
64 KiB of an unread body; the time to send a complete head (``header_timeout``, also
the idle time between requests); open connections per listener (503 in one write, then
closed). After it, the time a client may take in nothing of its answer
(``write_timeout``: then a reset). A request the parser refuses gets a JSON answer
naming the problem, never quoting the client's bytes, and the connection closes after
it.

A connection closed while the client may still be sending (a refusal, an answer given
before the body was read) lingers: the answer is followed by a FIN, and what the client
sends on is read and dropped until it closes its side, for at most ``LINGER_SECONDS``
(or the header timeout, when shorter) and ``LINGER_BYTES``. Closed at once, the kernel
would answer the unread bytes with a reset, and a client still sending (Python's
urllib, any client on Windows) reports "connection reset" instead of the answer.

:class:`Http1Server` is the protocol factory :class:`sigproxy.listener.Listener` serves
and stops (``pre_shutdown``, ``shutdown``), plain or TLS, on its own socket or a
supervisor's; :func:`sigproxy.app.make_runner` hands it to an aiohttp runner instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .config import Limits

log = logging.getLogger("sigproxy.protocol")

Handler = Callable[["Request"], Awaitable[None]]

MAX_LINE = 8190  # bytes in the request target or one header field (aiohttp's bound)
MAX_HEADERS = 128
QUEUED_REQUESTS = 2  # per connection: one in the handler's hands, one waiting
BODY_HIGH_WATER = 1 << 16  # unread body bytes before reading stops
# Bytes read on, unparsed, while two requests are queued (reading stops beyond): enough
# for a client's next request or two, and to notice the client leaving.
READ_AHEAD = 1 << 16
_LINGER_ZERO = struct.pack("ii", 1, 0)
LINGER_SECONDS = 10.0  # aiohttp's lingering_time; nginx's lingering_time is 30 s
# Enough for the rest of a body a little over the 6 MB limit; a client sending more was
# never going to be served, and is not given the bandwidth.
LINGER_BYTES = 8 << 20
REFUSED_LINGER_SECONDS = 1.0  # a connection over the cap (Envoy's delayed_close_timeout)
_EMPTY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyError(Exception):
    """The request body's framing broke (a bad chunk size, trailers too large) or the
    client left while it was arriving (then it is a ``ConnectionResetError``)."""


class _Refusal(Exception):
    """A request the connection answers itself: status, error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Stop(Exception):
    """Raised inside llhttp to stop it after a chunked request: nothing after one is
    parsed (its connection closes after the answer)."""


def json_error(code: str, message: str) -> bytes:
    # Hand-built: code and message are sigproxy's own words, never client bytes.
    return b'{"error": "%s", "message": "%s"}' % (code.encode(), message.encode())


class _DateCache:
    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True)
        return self.value


_DATE = _DateCache()

_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    206: "Partial Content", 301: "Moved Permanently", 302: "Found", 303: "See Other",
    304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 410: "Gone",
    411: "Length Required", 413: "Request Entity Too Large", 414: "Request-URI Too Long",
    415: "Unsupported Media Type", 417: "Expectation Failed", 421: "Misdirected Request",
    422: "Unprocessable Entity", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 499: "Client Closed Request",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}  # fmt: skip


def _status_line(version: bytes, status: int) -> bytes:
    # The reason phrase is the standard one (an upstream's own is never passed on).
    return b"HTTP/%s %d %s\r\n" % (version, status, _REASONS.get(status, "").encode())


class Request:
    """One request: its head as it arrived, its body as it arrives, and the answer."""

    __slots__ = (
        "_body",
        "_body_size",
        "_chunked_out",
        "_conn",
        "_done",
        "_error",
        "_waiter",
        "body_exists",
        "close_after",
        "complete",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "started",
        "version",
    )

    def __init__(
        self,
        conn: Connection,
        method: str,
        raw_path: str,
        version: tuple[int, int],
        headers: CIMultiDictProxy[str],
        keep_alive: bool,
        chunked: bool,
        content_length: int | None,
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = None if chunked else content_length
        self.body_exists = chunked or bool(content_length)
        self.complete = not self.body_exists
        """The whole body has arrived (it may still be unread)."""
        self.close_after = False
        self.started = False
        """The answer's head has been written."""
        self._body: collections.deque[bytes] = collections.deque()
        self._body_size = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._chunked_out = False
        self._done = False

    # --- what the handler reads ----------------------------------------------------

    @property
    def remote(self) -> str | None:
        return self._conn.remote

    @property
    def scheme(self) -> str:
        return self._conn.scheme

    @property
    def host(self) -> str:
        """The Host header, or (an HTTP/1.0 request without one) the address the
        connection came to, never a DNS lookup."""
        host = self.headers.get("Host")
        if host is not None:
            return host
        transport = self._conn.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        if isinstance(local, tuple) and len(local) >= 2:
            address = str(local[0])
            return f"[{address}]:{local[1]}" if ":" in address else f"{address}:{local[1]}"
        return "localhost"

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def read_buffered(self) -> bytes:
        """The body bytes that have arrived and are unread."""
        body = self._body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._body_size = 0
        self._conn.body_taken()
        return data

    async def read_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` at its end. Raises :class:`BodyError` when
        its framing broke, ``ConnectionResetError`` when the client left."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        # One piece at a time: the caller joins the pieces once.
        piece = self._body.popleft()
        self._body_size -= len(piece)
        if self._body_size <= BODY_HIGH_WATER:
            self._conn.body_taken()
        return piece

    async def send_continue(self) -> None:
        """``100 Continue``, when the client asked for it and nothing was written yet."""
        if self.version >= (1, 1) and not self.started and "Expect" in self.headers:
            self._conn.write(_CONTINUE)
            await self._conn.drain()

    # --- what the connection feeds -------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._body.append(data)
        self._body_size += len(data)
        self._wake()

    def _end(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self.complete and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the answer --------------------------------------------------------------------

    def force_close(self) -> None:
        """Close the connection after this answer."""
        self.close_after = True

    def _head(self, status: int, headers: Iterable[tuple[str, str]], length: int | None) -> bytes:
        """The answer's head; ``length`` None: chunked (HTTP/1.1) or until close (1.0)."""
        empty = status in _EMPTY_STATUS or status < 200 or self.method == "HEAD"
        keep_alive = self.keep_alive and not self.close_after
        lines = []
        have_date = have_connection = False
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length" or lower == "transfer-encoding":
                continue
            if lower == "date":
                have_date = True
            elif lower == "connection":
                have_connection = True
            lines.append(f"{name}: {value}\r\n")
        if length is not None:
            if not (empty and (status in _EMPTY_STATUS or status < 200)):
                lines.append(f"Content-Length: {length}\r\n")
        elif not empty:
            if self.version >= (1, 1):
                self._chunked_out = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                keep_alive = False  # the body ends when the connection does
        if not have_date:
            lines.append(f"Date: {_DATE.now()}\r\n")
        if not have_connection:
            if keep_alive:
                if self.version == (1, 0):
                    lines.append("Connection: keep-alive\r\n")
            elif self.version >= (1, 1):
                lines.append("Connection: close\r\n")
        if not keep_alive:
            self.close_after = True
        lines.append("\r\n")
        version = b"1.1" if self.version >= (1, 1) else b"1.0"
        head = _status_line(version, status) + "".join(lines).encode("utf-8", "surrogateescape")
        self.started = True
        return head

    async def respond(
        self, status: int, headers: Iterable[tuple[str, str]], body: bytes = b""
    ) -> None:
        """The whole answer in one write."""
        head = self._head(status, headers, len(body))
        empty = self.method == "HEAD" or status in _EMPTY_STATUS or status < 200
        data = head if empty or not body else head + body
        self._done = True
        self._conn.write(data)
        await self._conn.drain()

    async def start(
        self, status: int, headers: Iterable[tuple[str, str]], length: int | None
    ) -> None:
        """Write the head of an answer whose body follows with :meth:`write`."""
        data = self._head(status, headers, length)
        self._conn.write(data)
        await self._conn.drain()

    async def write(self, chunk: bytes) -> None:
        if not chunk or self.method == "HEAD":
            return
        if self._chunked_out:
            chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        self._conn.write(chunk)
        await self._conn.drain()

    async def end(self) -> None:
        self._done = True
        if self._chunked_out and self.method != "HEAD":
            self._conn.write(b"0\r\n\r\n")
            await self._conn.drain()

    def reset(self) -> None:
        """Cut the connection with a reset (RST), which every client reads as an error;
        a plain close (FIN) would end an HTTP/1.0 or close-delimited body as whole."""
        self._conn.reset()


class Connection(asyncio.Protocol):
    """One client connection: parses, queues at most two requests, runs the handler on
    them in order, keeps the connection alive between them."""

    __slots__ = (
        "_after_chunked",
        "_body_left",
        "_body_paused",
        "_closing",
        "_continued",
        "_drain_waiter",
        "_head_bytes",
        "_head_size",
        "_headers",
        "_idle_timer",
        "_in_head",
        "_last",
        "_linger_left",
        "_linger_timer",
        "_lingering",
        "_loop",
        "_parser",
        "_progressed",
        "_queue",
        "_queue_waiter",
        "_reading_paused",
        "_receiving",
        "_refusal",
        "_refused",
        "_server",
        "_stalled",
        "_task",
        "_unparsed",
        "_url",
        "_write_paused",
        "current",
        "remote",
        "scheme",
        "transport",
    )

    def __init__(self, server: Http1Server) -> None:
        self._server = server
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.scheme = "http"
        self._queue: collections.deque[Request | _Refusal] = collections.deque()
        self._queue_waiter: asyncio.Future[None] | None = None
        self._receiving: Request | None = None  # whose body is arriving
        self.current: Request | None = None  # in the handler's hands
        self._task: asyncio.Task[None] | None = None
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # raw bytes received while a head is arriving
        self._head_size = 0  # the head's size as parsed
        self._in_head = True
        self._refused = False
        self._refusal: _Refusal | None = None
        self._unparsed = b""  # the rest of a read, held while the queue is full
        self._body_left = -1  # bytes of a body with a length still to come; -1: chunked
        self._after_chunked = False  # a chunked request was parsed: no other will be
        self._progressed = False  # the last feed gave body bytes or ended a message
        self._stalled = 0  # bytes since the body last progressed
        self._last: Request | None = None  # the request parsed last
        self._continued: Request | None = None  # whose body a new parser reads on
        self._closing = False
        self._lingering = False
        self._linger_left = LINGER_BYTES
        self._linger_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._body_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple | list) and peer:
            self.remote = str(peer[0])
        elif peer is not None:
            self.remote = str(peer)
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self._server.connections.add(self)
        self._arm_idle()
        self._task = self._loop.create_task(self._serve())

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self._server
        if self in server.connections:
            server.connections.discard(self)
            server.open_connections -= 1
        elif self.transport is None:  # never connected (a failed TLS handshake)
            server.open_connections -= 1
        self._closing = True
        self.transport = None
        self._cancel_idle()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        gone = ConnectionResetError("the client closed the connection")
        receiving = self._receiving
        if receiving is not None:
            receiving._fail(gone)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)
        queue_waiter = self._queue_waiter
        if queue_waiter is not None and not queue_waiter.done():
            queue_waiter.set_result(None)
        task = self._task
        if task is not None and not task.done() and self.current is not None:
            # The client is gone: its request (and the upstream's) is abandoned.
            task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._refused or self._closing:
            if self._lingering:
                self._linger_left -= len(data)
                if self._linger_left < 0:
                    self._end_linger()
            return
        if self._unparsed or self._full():
            # The queue is full: held unparsed, in order. Reading goes on up to
            # READ_AHEAD bytes so that a client leaving is still noticed (its EOF or
            # reset), and the request in hand, a silent stream perhaps, is abandoned.
            self._unparsed += data
            self._update_reading()
            return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """Feed ``data`` to llhttp one request at a time, and stop once the queue is
        full: llhttp parses all it is given, and one read of tiny pipelined requests
        would otherwise become thousands of queued ones. The rest waits, unparsed (at
        most one read), until a request is taken. A head is fed up to its end, a body
        with a length up to its end; a chunked body to the end of the read (llhttp stops
        after it: the connection closes after its answer)."""
        limit = self._server.limits.max_header_bytes
        start, size = 0, len(data)
        while start < size:
            if self._full():
                self._unparsed = data[start:]
                self._update_reading()
                return
            if self._in_head:
                # Only within a head's bounds: a scan of a whole body would cost more
                # than parsing it.
                end = data.find(b"\r\n\r\n", start, start + limit + 4)
                stop = size if end < 0 else end + 4
            else:
                left = self._body_left
                stop = size if left < 0 else min(size, start + left)
            chunk = data if start == 0 and stop == size else data[start:stop]
            start = stop
            in_head = self._in_head
            if in_head:
                self._head_bytes += len(chunk)
            self._progressed = False
            try:
                self._parser.feed_data(chunk)
            except httptools.HttpParserUpgrade as exc:
                # What follows the head (an Upgrade request's body included) is parsed
                # on by a new parser, or never (CONNECT).
                data = chunk[exc.args[0] :] + data[start:]
                start, size = 0, len(data)
                if not self._upgraded():
                    return
                continue
            except (httptools.HttpParserError, _Refusal, _Stop) as exc:
                if self._after_chunked:
                    # Stopped after a chunked request: nothing more is read.
                    self._refused = True
                    self._update_reading()
                    return
                # llhttp reports a callback's exception as its own: the refusal it
                # carried is kept here.
                refusal, self._refusal = self._refusal, None
                if refusal is None and self._parser.get_method() == b"PRI":
                    refusal = _Refusal(505, "http_version_not_supported", _NO_HTTP2)
                self._refuse(refusal if refusal is not None else _malformed(exc))
                return
            if self._in_head:
                if self._head_bytes > limit:
                    self._refuse(_head_too_large())
                    return
            elif self._progressed:
                self._stalled = 0
            elif not in_head:
                # Bytes inside a message that gave no body and ended nothing: chunk
                # sizes, extensions and trailers, which llhttp buffers whole. Bounded
                # like a head.
                self._stalled += len(chunk)
                if self._stalled > limit:
                    self._refuse(_Refusal(400, "bad_request", _FRAMING_TOO_LARGE))
                    return

    def _resume_parsing(self) -> None:
        """A request was taken from the queue: parse what waited, then read again."""
        data, self._unparsed = self._unparsed, b""
        if data and not self._refused and not self._closing:
            self._parse(data)
        self._update_reading()

    def eof_received(self) -> bool | None:
        # A half-close ends the requests: answered ones are done, a partial one is lost.
        receiving = self._receiving
        if receiving is not None:
            receiving._fail(BodyError("the client ended the connection during the body"))
        return None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- llhttp callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._after_chunked:
            raise _Stop
        self._in_head = True
        self._url = []
        self._headers = []
        self._head_size = 0
        self._stalled = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_size += len(url)
        if self._head_size > MAX_LINE:
            raise self._stop(414, "uri_too_long", "the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(name) > MAX_LINE or len(value) > MAX_LINE:
            raise self._stop(431, "headers_too_large", "a request header is too large")
        if len(headers) >= MAX_HEADERS:
            raise self._stop(431, "headers_too_large", "too many request headers")
        # llhttp strips the whitespace before a value, not after it (RFC 9110 5.5: not
        # part of the value either).
        value = value.rstrip(b" \t")
        headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._server.limits.max_header_bytes:
            raise self._stop(431, "headers_too_large", _HEAD_TOO_LARGE)

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        self._head_bytes = 0
        self._progressed = True
        continued = self._continued
        if continued is not None:  # the framing head _upgraded() made: the body follows
            self._continued = None
            self._receiving = continued
            return
        self._cancel_idle()
        raw = self._headers
        # Bytes that are not UTF-8 stay as surrogate escapes, as aiohttp decodes them.
        headers: CIMultiDict[str] = CIMultiDict(
            [(n.decode("utf-8", _ESCAPE), v.decode("utf-8", _ESCAPE)) for n, v in raw]
        )
        chunked = False
        length: int | None = None
        hosts = 0
        for name, value in raw:
            lower = name.lower()
            if lower == b"host":
                hosts += 1
            elif lower == b"content-length":
                if not value.isdigit():
                    raise self._stop(400, "bad_request", _MALFORMED + "invalid Content-Length")
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = True
        if hosts > 1:
            raise self._stop(400, "bad_request", _MALFORMED + "duplicate Host header")
        method = parser.get_method().decode("ascii", "surrogateescape")
        version = parser.get_http_version()
        if version not in _VERSIONS:  # llhttp takes 0.9 (no version at all) and 2.0
            raise self._stop(505, "http_version_not_supported", _VERSIONS_SERVED % version)
        major, _, minor = version.partition(".")
        url = b"".join(self._url) if len(self._url) != 1 else self._url[0]
        request = Request(
            self,
            method,
            url.decode("utf-8", "surrogateescape"),
            (int(major or 1), int(minor or 1)),
            CIMultiDictProxy(headers),
            parser.should_keep_alive(),
            chunked,
            length,
        )
        if chunked:
            # Trailers are never passed on, and a connection that carried a chunked
            # request is not trusted with the next one: it closes after the answer.
            request.close_after = True
        self._body_left = -1 if chunked else (length or 0)
        self._receiving = self._last = request
        self._queue.append(request)
        self._wake_queue()
        self._update_reading()

    def on_body(self, body: bytes) -> None:
        self._progressed = True
        if self._body_left > 0:
            self._body_left -= len(body)
        request = self._receiving
        if request is not None:
            request._feed(body)
            # A reader waiting takes it at once; else the unread body is bounded.
            if request._body_size > BODY_HIGH_WATER and request._waiter is None:
                self._body_paused = True
                self._update_reading()

    def on_chunk_header(self) -> None:
        self._progressed = True

    def on_message_complete(self) -> None:
        self._progressed = True
        request = self._receiving
        if request is not None:
            self._receiving = None
            request._end()
            if request.content_length is None and request.body_exists:
                # Chunked: its connection closes after the answer, so what llhttp would
                # parse after it is never wanted; stop it here.
                self._after_chunked = True
        self._in_head = True
        self._head_bytes = 0

    def _stop(self, status: int, code: str, message: str) -> _Refusal:
        self._refusal = _Refusal(status, code, message)
        return self._refusal

    # --- flow ----------------------------------------------------------------------------

    def body_taken(self) -> None:
        if self._body_paused:
            self._body_paused = False
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None:
            return
        pause = not self._lingering and (
            self._body_paused
            or (self._full() and (self.current is None or len(self._unparsed) >= READ_AHEAD))
            or self._refused
        )
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _full(self) -> bool:
        """Two requests are taken: one in the handler's hands (or waiting for them) and
        one waiting. A client that does not pipeline never fills it."""
        return len(self._queue) + (self.current is not None) >= QUEUED_REQUESTS

    def _wake_queue(self) -> None:
        waiter = self._queue_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)

    async def drain(self) -> None:
        if not self._write_paused:
            return
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self._drain_waiter = self._loop.create_future()
        timeout = self._server.write_timeout
        timer = self._loop.call_later(timeout, self._write_stalled) if timeout else None
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None
            if timer is not None:
                timer.cancel()

    def _write_stalled(self) -> None:
        """The client took in nothing of its answer for ``write_timeout`` seconds: cut."""
        seconds = self._server.write_timeout
        log.info(
            "cut a connection from %s: it took in nothing of its answer for %gs "
            "(client_timeouts.write)",
            self.remote,
            seconds,
        )
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                ConnectionResetError(f"the client took in nothing for {seconds:g}s")
            )
        self.reset()

    def reset(self) -> None:
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()

    def close(self) -> None:
        """Close once the answer in hand (if any) is written."""
        self._closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self._wake_queue()

    def _linger(self) -> None:
        """Close once the answer is written, without resetting a client that is still
        sending: FIN after the answer, then read and drop until the client closes its
        side (``eof_received``), for at most the linger time and ``LINGER_BYTES``. A
        stop, or another :meth:`close`, ends it at once."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._closing = True
        self._wake_queue()
        self._lingering = True
        self._cancel_idle()  # its close would end the linger early, with a reset
        if transport.can_write_eof():
            transport.write_eof()
        timeout = self._server.header_timeout
        seconds = min(LINGER_SECONDS, timeout) if timeout else LINGER_SECONDS
        self._linger_timer = self._loop.call_later(seconds, self._end_linger)
        self._update_reading()  # what arrives now is dropped (data_received)

    def _end_linger(self) -> None:
        # Aborted, not closed: a close waits for the answer to be written, and a client
        # that reads nothing would keep its place for ever.
        transport = self.transport
        if transport is not None:
            transport.abort()

    def _arm_idle(self) -> None:
        self._cancel_idle()
        timeout = self._server.header_timeout
        if timeout:
            self._idle_timer = self._loop.call_later(timeout, self._idle)

    def _cancel_idle(self) -> None:
        timer = self._idle_timer
        if timer is not None:
            timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if self.current is None and not self._queue:
            # No complete head within the time: a slow (or silent) client's place goes.
            self.close()

    # --- refusals ------------------------------------------------------------------------

    def _refuse(self, refusal: _Refusal) -> None:
        """Answer ``refusal`` after the requests already queued, then close; nothing
        more is read from this connection."""
        self._refused = True
        receiving = self._receiving
        if receiving is not None and not receiving.complete:
            # The body being read broke its framing: its reader hears it now.
            receiving._fail(BodyError(refusal.message))
            self._receiving = None
            if receiving is self.current or receiving in self._queue:
                self._update_reading()
                if receiving is not self.current:
                    # Not started yet: answered as the framing error it is.
                    index = self._queue.index(receiving)
                    del self._queue[index]
                    self._queue.insert(index, refusal)
                self._wake_queue()
                return
        self._queue.append(refusal)
        self._wake_queue()
        self._update_reading()

    def _upgraded(self) -> bool:
        """llhttp stopped after a CONNECT or an Upgrade request, whose head is queued.
        After CONNECT what follows is a tunnel's bytes: nothing more is read, and the
        connection closes after the answer. sigproxy never switches protocols, so after
        an Upgrade request HTTP/1.1 goes on, on a new parser; httptools skipped the
        body such a request declared, so the new parser is first given a head with its
        framing, and reads the body on. Returns whether to go on parsing."""
        request = self._last
        self._parser = httptools.HttpRequestParser(self)
        if request is None or request.method == "CONNECT":
            self._refused = True
            if request is not None:
                request.close_after = True
            self._update_reading()
            return False
        if request.body_exists:
            request.complete = False
            self._after_chunked = False  # its body was not read yet: it is now
            self._receiving = self._continued = request
            framing = (
                b"Content-Length: %d" % request.content_length
                if request.content_length is not None
                else b"Transfer-Encoding: chunked"
            )
            self._parser.feed_data(b"POST / HTTP/1.1\r\n%s\r\n\r\n" % framing)
        return True

    # --- the handler loop -------------------------------------------------------------

    async def _serve(self) -> None:
        handler = self._server.handler
        queue = self._queue
        try:
            while True:
                while not queue:
                    if self._closing or self.transport is None:
                        return
                    self._queue_waiter = self._loop.create_future()
                    try:
                        await self._queue_waiter
                    finally:
                        self._queue_waiter = None
                item = queue.popleft()
                if isinstance(item, _Refusal):
                    await self._answer_refusal(item)
                    return
                self.current = item
                self._resume_parsing()
                try:
                    await handler(item)
                finally:
                    self.current = None
                if self.transport is None:
                    return
                if not item._done:  # the handler wrote no whole answer: nothing to keep
                    self.reset()
                    return
                if item.close_after or not item.keep_alive or not item.complete:
                    if item.complete and not self._reading_paused and not self._unparsed:
                        self.close()
                    else:
                        # A body not read to its end is never drained, nor are requests
                        # behind it answered: the connection goes once the client
                        # stops sending.
                        self._linger()
                    return
                if self._closing:
                    self.close()
                    return
                if not queue:
                    self._arm_idle()
        except asyncio.CancelledError:
            # Cut short (the grace period ran out): a reset, so that an answer cut
            # midway is never taken for a whole one (an HTTP/1.0 client's body ends
            # when the connection does).
            self.reset()
        except Exception:
            log.exception("unexpected error serving a connection from %s", self.remote)
            self.reset()

    async def _answer_refusal(self, refusal: _Refusal) -> None:
        # Every refusal here is the client's doing (a 505 too): not an error of ours.
        log.info("refused a request from %s: %s %s", self.remote, refusal.status, refusal.message)
        if self._server.on_refusal is not None:
            self._server.on_refusal(refusal.code)
        body = json_error(refusal.code, refusal.message)
        head = (
            _status_line(b"1.1", refusal.status)
            + b"Content-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n"
            b"Connection: close\r\n\r\n" % (len(body), _DATE.now().encode())
        )
        with contextlib.suppress(ConnectionError):
            self.write(head + body)
        self._linger()

    async def shutdown(self, grace: float | None) -> None:
        """Finish the request in hand within ``grace`` seconds (then cancel it); close."""
        self._closing = True
        task = self._task
        if self.current is None:
            self.close()
        if task is None or task.done():
            return
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.close()


_HEAD_TOO_LARGE = "the request head is over limits.max_header_bytes"
_MALFORMED = "malformed HTTP request: "
_FRAMING_TOO_LARGE = (
    "the request body's chunk sizes, extensions or trailers are over limits.max_header_bytes"
)
_ESCAPE = "surrogateescape"
_VERSIONS = frozenset({"1.1", "1.0"})
_VERSIONS_SERVED = "HTTP/%s is not served: sigproxy speaks HTTP/1.1 and HTTP/1.0"
_NO_HTTP2 = (
    "HTTP/2 is not served: sigproxy speaks HTTP/1.1 and HTTP/1.0 (drop --http2-prior-knowledge)"
)


def _head_too_large() -> _Refusal:
    return _Refusal(431, "headers_too_large", _HEAD_TOO_LARGE)


def _malformed(exc: Exception) -> _Refusal:
    text = str(exc).strip()
    first = text.splitlines()[0].rstrip(":") if text else "malformed request"
    if "'" in first or '"' in first:  # would quote client bytes
        first = type(exc).__name__
    return _Refusal(400, "bad_request", _MALFORMED + first)


_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
)


class _RefuseConnection(asyncio.Protocol):
    """A connection over the listener's cap: told so in one write, then closed. Like a
    refused request it lingers, so that a client whose request is already on its way
    reads the 503, not a reset; but only for ``REFUSED_LINGER_SECONDS``, and only as
    many at once as the cap (more are closed at once): these are over the cap."""

    def __init__(self, server: Http1Server) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._left = LINGER_BYTES

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        server = self._server
        if server.on_refusal is not None:
            server.on_refusal("too_many_connections")
        transport.write(server.too_many)
        if server.refused_lingering >= server.limits.max_client_connections:
            transport.close()
            return
        server.refused_lingering += 1
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = server.loop.call_later(REFUSED_LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        self._left -= len(data)  # dropped
        if self._left < 0 and self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._server.refused_lingering -= 1
        self._transport = None


class Http1Server:
    """Makes a :class:`Connection` per accepted connection, at most
    ``limits.max_client_connections`` at once; stops them gracefully. ``on_refusal`` is
    told the code of each answer the server gives itself, without a handler (a head
    refused by the parser, a connection over the cap)."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits,
        what: str,
        header_timeout: float,
        write_timeout: float | None = None,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.handler = handler
        self.write_timeout = write_timeout
        self.on_refusal = on_refusal
        self.refused_lingering = 0  # connections over the cap, told so, not yet gone
        too_many = json_error(
            "too_many_connections",
            f"the {what} has limits.max_client_connections connections open; retry shortly",
        )
        self.too_many = _TOO_MANY + b"Content-Length: %d\r\n\r\n%s" % (len(too_many), too_many)
        self.limits = limits
        self.what = what
        self.header_timeout = header_timeout
        self.connections: set[Connection] = set()
        # Counted when a connection is accepted, not when it is made a loop turn later:
        # a burst of accepts must not slip past the cap.
        self.open_connections = 0
        self._warned = -60.0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def __call__(self) -> asyncio.Protocol:
        if self.open_connections >= self.limits.max_client_connections:
            now = time.monotonic()
            if now - self._warned >= 60.0:  # a flood must not write a line per connection
                self._warned = now
                log.warning(
                    "%s: refused a connection, %d are open (limits.max_client_connections)",
                    self.what,
                    self.open_connections,
                )
            return _RefuseConnection(self)
        self.open_connections += 1
        return Connection(self)

    def pre_shutdown(self) -> None:
        """Stop taking requests: idle connections close now."""
        for conn in list(self.connections):
            conn._closing = True
            if conn.current is None and not conn._queue:
                conn.close()

    async def shutdown(self, grace: float | None = None) -> None:
        """Let requests in hand finish within ``grace`` seconds, then cancel them; close
        all. (:meth:`Listener.cleanup` calls it with ``grace_period``; the aiohttp runner of
        :func:`~sigproxy.app.make_runner`, with its shutdown timeout.)"""
        conns = list(self.connections)
        if conns:
            await asyncio.gather(*(c.shutdown(grace) for c in conns), return_exceptions=True)
        for conn in list(self.connections):
            conn.close()
