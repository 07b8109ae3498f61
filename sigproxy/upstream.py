"""Keep-alive HTTP/1.1 connections to the upstreams.

sigproxy sends one kind of request: a known origin, a finished header list and a body
already in memory. A general HTTP client spends more CPU per request on its machinery
(URL objects, payload registries, cookies, redirects, tracing, a stream and a timer
object per response) than the exchange itself costs. Here the request head is written as
bytes and each connection is its own asyncio protocol around one llhttp parser
(httptools): the response head becomes an :class:`UpstreamResponse` (status and a
case-insensitive header multidict, as aiohttp decodes them), and the body pieces go
straight into it. One timer per connection measures the read timeout; the connection
stops reading while the unread body holds more than :data:`_HIGH_WATER` bytes.
Connections are pooled per origin, up to a cap, with idle ones closed by a timer.

An origin may dial another address than its URL's host (``connect_to``: a VPC endpoint,
a tunnel) and may go through an HTTP proxy (``proxy``): TCP to the proxy, ``CONNECT`` to
the address, and TLS to the Function URL inside the tunnel. Either way the Host header,
the signature, the TLS SNI and the certificate check stay the URL's host. A tunnelled
connection is pooled like a direct one.

It raises one error tree, whatever failed below it (the parser, asyncio, the socket, TLS);
:func:`_translate` is the one place that turns those into it::

    UpstreamError          kind
    ├── ConnectFailed      connect   DNS lookup failed, connection refused or unreachable
    ├── TLSFailed          tls       TLS handshake or certificate verification failed
    ├── UpstreamTimedOut   timeout   no connection, or no answer, in time
    ├── ProtocolError      protocol  not a valid HTTP/1.1 answer (an unasked 101 included)
    ├── ConnectionClosed   closed    the upstream closed or reset the connection
    ├── PoolBusy           busy      every connection the upstream may have is taken
    └── ProxyFailed        proxy     the egress proxy: unreachable, refused the CONNECT
                                     (407 included), closed or timed out before its answer

``kind`` is a bounded metric label; the message says the cause in words, and names the
hop: ``egress proxy http://***@proxy:3128: ...`` for the proxy, the Function URL's host
(``... through egress proxy ...``) for what failed inside the tunnel. Neither ever holds
the proxy's password or ``Proxy-Authorization`` value.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .egress import EgressProxy
from .errors import ConfigError
from .logs import printable
from .routing import Origin

HAPPY_EYEBALLS_DELAY = 0.25  # seconds, RFC 8305's recommendation (and aiohttp's)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods sent without Content-Length when they carry no body; the rest get
# Content-Length: 0, as aiohttp does.
_NO_LENGTH_WHEN_EMPTY = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT", "DELETE"})
_LARGE = 1 << 16
# A proxy's answer to CONNECT is a status line and a few headers; a longer one is read no
# further, so a proxy (or what poses as one) can't make sigproxy buffer without bound.
_MAX_CONNECT_HEAD = 16 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?")


class UpstreamError(Exception):
    """An exchange with an upstream failed; ``str()`` says why in words."""

    kind = "closed"
    sent = True
    """False when the request never left: no connection to send it on was made."""

    def __init__(self, origin: Origin, message: str) -> None:
        super().__init__(message)
        self.origin = origin


class ConnectFailed(UpstreamError):
    kind = "connect"


class TLSFailed(UpstreamError):
    kind = "tls"


class UpstreamTimedOut(UpstreamError):
    kind = "timeout"


class ProtocolError(UpstreamError):
    kind = "protocol"


class ConnectionClosed(UpstreamError):
    kind = "closed"


class PoolBusy(UpstreamError):
    """``why`` is ``queue_full`` (as many requests are already waiting for a connection
    as the origin may have) or ``wait_timeout`` (none came free within the request's
    connect timeout)."""

    kind = "busy"

    def __init__(self, origin: Origin, why: str) -> None:
        waiting = (
            "as many requests are already waiting for one"
            if why == "queue_full"
            else "none came free in time"
        )
        super().__init__(
            origin,
            f"all {origin.max_connections} connections to {origin.host}:{origin.port} "
            f"are in use and {waiting}",
        )
        self.why = why


class ProxyFailed(UpstreamError):
    """The egress proxy failed: ``status`` is its answer to CONNECT when it refused one
    (407 included), else ``None``."""

    kind = "proxy"

    def __init__(self, origin: Origin, message: str, status: int | None = None) -> None:
        super().__init__(origin, message)
        self.status = status


class ConnectRefused(Exception):
    """The proxy's answer to CONNECT was not 2xx (``status``), or was not one at all
    (``status`` None, ``text`` says why). Only :func:`_translate` puts it in words."""

    def __init__(self, status: int | None, text: str, schemes: tuple[str, ...] = ()) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.schemes = schemes


def _translate(
    exc: Exception, origin: Origin, timeout: float | None, hop: str = "upstream"
) -> UpstreamError:
    """The one place where what failed below (the parser, asyncio, the socket, TLS) becomes
    an :class:`UpstreamError` saying why in words. ``timeout`` is the limit that was
    running (connect or read); ``hop`` is what was under way: ``proxy`` (connecting to
    the egress proxy), ``tunnel`` (its answer to CONNECT), ``dial`` (connecting to the
    upstream), ``handshake`` (TLS with it) or ``upstream`` (the exchange)."""
    if isinstance(exc, UpstreamError):
        return exc
    proxy = origin.proxy
    if proxy is not None and hop in ("proxy", "tunnel"):
        return proxy_failure(exc, origin, proxy, timeout, hop)
    route = route_text(origin)
    where = f"{origin.host}:{origin.port}{route}"
    if isinstance(exc, TimeoutError):  # asyncio's, and the read timeout's
        limit = "" if timeout is None else f" within {timeout:g} seconds"
        if hop == "dial":
            return UpstreamTimedOut(origin, f"no connection to {where}{limit} (timeout.connect)")
        if hop == "handshake":
            what = "TLS handshake with" if origin.tls else "connection to"
            return UpstreamTimedOut(origin, f"{what} {where} unfinished{limit} (timeout.connect)")
        return UpstreamTimedOut(origin, f"no answer from {where}{limit}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSFailed(
            origin,
            f"certificate verify failed for {origin.host}{route}: {exc.verify_message} "
            "(for a private CA, point SSL_CERT_FILE or AWS_CA_BUNDLE at its PEM bundle)",
        )
    if isinstance(exc, ssl.SSLError):
        return TLSFailed(origin, f"TLS handshake with {where} failed: {exc.reason or exc}")
    # Without a proxy sigproxy dials (and looks up) connect_to, else the URL's host.
    dialled = origin.connect_to[0] if origin.connect_to is not None else origin.host
    if isinstance(exc, socket.gaierror):
        return ConnectFailed(origin, f"DNS lookup of {dialled} failed: {exc.strerror}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectFailed(origin, f"connection refused by {where}")
    if isinstance(exc, _Malformed | httptools.HttpParserError):
        # llhttp's words (they never quote the bytes), shown, never obeyed.
        text = printable((str(exc).strip().splitlines() or [type(exc).__name__])[0][:200])
        return ProtocolError(origin, f"{where} sent an invalid HTTP response: {text}")
    if isinstance(exc, _CutShort):
        return ConnectionClosed(origin, f"{where} cut the response body short")
    if isinstance(exc, ConnectionError):
        return ConnectionClosed(origin, f"{where} closed the connection")
    if isinstance(exc, OSError):
        return ConnectFailed(origin, f"cannot connect to {where}: {exc.strerror or exc}")
    return ConnectionClosed(origin, f"{where} failed: {type(exc).__name__}")


def proxy_failure(
    exc: Exception, origin: Origin, proxy: EgressProxy, timeout: float | None, hop: str
) -> ProxyFailed:
    """:func:`_translate`'s words for a failure of the egress proxy hop. ``proxy.url``
    is the one way the proxy is named: it has no password."""
    said = f"egress proxy {proxy.url}:"
    target = "CONNECT " + _authority(*(origin.connect_to or (origin.host, origin.port)))
    limit = "" if timeout is None else f" within {timeout:g} seconds"
    if isinstance(exc, ConnectRefused):
        if exc.status == 407:
            offered = [s for s in exc.schemes if s.lower() != "basic"]
            advice = (
                f"it offers only {', '.join(offered)} authentication, which sigproxy does not "
                "speak (it sends Basic): use a proxy port that takes Basic, or a local relay "
                "that speaks NTLM/Negotiate (cntlm, px) as egress_proxy"
                if offered and len(offered) == len(exc.schemes)
                else "check the user and password in the proxy URL"
                if proxy.authorization is not None
                else "it wants credentials: give them in the proxy URL "
                "(http://user:password@host:port)"
            )
            return ProxyFailed(
                origin, f"{said} 407 Proxy Authentication Required for {target}: {advice}", 407
            )
        if exc.status == 401 and proxy.authorization is not None:
            # tinyproxy's BasicAuth answers 401 rather than 407.
            return ProxyFailed(
                origin,
                f"{said} refused {target}: {exc.text} (check the user and password in the "
                "proxy URL)",
                401,
            )
        if exc.status is not None:
            return ProxyFailed(origin, f"{said} refused {target}: {exc.text}", exc.status)
        return ProxyFailed(origin, f"{said} invalid answer to {target}: {exc.text}")
    if hop == "proxy":
        if isinstance(exc, TimeoutError):
            return ProxyFailed(origin, f"{said} no connection{limit}")
        if isinstance(exc, socket.gaierror):
            return ProxyFailed(origin, f"{said} DNS lookup of {proxy.host} failed: {exc.strerror}")
        if isinstance(exc, ConnectionRefusedError):
            return ProxyFailed(origin, f"{said} connection refused")
        if isinstance(exc, OSError):
            return ProxyFailed(origin, f"{said} cannot connect: {exc.strerror or exc}")
        return ProxyFailed(origin, f"{said} failed: {type(exc).__name__}")
    if isinstance(exc, TimeoutError):
        return ProxyFailed(origin, f"{said} no answer to {target}{limit}")
    if isinstance(exc, ConnectionError | EOFError):
        return ProxyFailed(origin, f"{said} closed the connection before answering {target}")
    if isinstance(exc, OSError):
        return ProxyFailed(origin, f"{said} {target} failed: {exc.strerror or exc}")
    return ProxyFailed(origin, f"{said} {target} failed: {type(exc).__name__}")


def route_text(origin: Origin) -> str:
    """How an origin is reached, when not directly: `` at <connect_to>`` and/or
    `` through egress proxy <url>``; empty when direct."""
    words = ""
    if origin.connect_to is not None:
        words += " at " + _authority(*origin.connect_to)
    if origin.proxy is not None:
        words += f" through egress proxy {origin.proxy.url}"
    return words


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UpstreamResponse:
    """A response whose head has arrived; the body is read with :meth:`read_chunk`.
    :meth:`release` must be called: it pools the connection if the body was read to the
    end and the connection may be kept, and closes it otherwise.

    Its connection feeds it: the body's pieces wait in ``_chunks`` until read, and the
    connection stops reading from the upstream while they hold more than
    :data:`_HIGH_WATER` bytes."""

    __slots__ = (
        "_chunks",
        "_connection",
        "_eof",
        "_error",
        "_origin",
        "_read_timeout",
        "_size",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(
        self,
        origin: Origin,
        connection: _Connection,
        status: int,
        headers: CIMultiDictProxy[str],
        read_timeout: float | None,
    ) -> None:
        self._origin = origin
        self._connection: _Connection | None = connection
        self._read_timeout = read_timeout
        self.status = status
        self.headers = headers
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be unread)."""
        return self._eof

    def read_buffered(self) -> bytes:
        """What of the body has arrived and is unread; all of it once :attr:`complete`."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        connection = self._connection
        if connection is not None and connection.paused:
            connection.resume()
        return data

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrives; ``b""`` at its end."""
        while True:
            # As aiohttp's StreamReader did: a failure wins over what is still unread.
            error = self._error
            if error is not None:
                raise _translate(error, self._origin, self._read_timeout) from error
            if self._chunks:
                return self.read_buffered()
            if self._eof:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        """The rest of the body."""
        chunks = []
        while chunk := await self.read_chunk():
            chunks.append(chunk)
        return b"".join(chunks)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finish(self._eof)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# What a connection is doing, as _Connection.phase.
_IDLE = 0  # no request outstanding: whatever arrives answers nothing that will be asked
_HEAD = 1  # a request sent, its response head awaited (interim 1xx heads skipped)
_BODY = 2  # the head handed over, the body arriving
_DONE = 3  # the response arrived whole; anything more is a message nobody asked for
_FAILED = 4  # the exchange failed or the connection was given up: never reused

# aiohttp's limits for a response head (nginx's and Node's are alike): a header line of
# 8190 bytes, 128 header fields. httptools hands a field over only once it is whole, so
# the head as a whole is capped too, or one endless field would be buffered.
_MAX_FIELD = 8190
_MAX_HEADERS = 128
_MAX_HEAD = (_MAX_HEADERS + 1) * (_MAX_FIELD + 2)
# A body is buffered up to this, unread, before the upstream is told to wait (the TCP
# window then holds it back): aiohttp's StreamReader high-water mark.
_HIGH_WATER = 1 << 17
_NO_BODY_STATUS = frozenset({204, 304})


class _Malformed(Exception):
    """The upstream's answer is not HTTP/1.1; the text says how, without its bytes."""


class _CutShort(Exception):
    """The connection ended inside a response body with a length or chunks, or by a
    reset inside any body."""


class _Stray(Exception):
    """Raised inside the parser to stop it at a message no request asked for."""


class _Connection(asyncio.Protocol):
    """One upstream connection: an asyncio protocol parsing responses with llhttp
    (httptools), one exchange at a time, plus what the pool knows of it: the slot it
    holds and when it was pooled. It hands each response over as an
    :class:`UpstreamResponse` and feeds it the body; the read timeout (the longest
    silence while a response is awaited or arriving) is its timer."""

    __slots__ = (
        "failure",
        "fields",
        "head_bytes",
        "head_only",
        "idle_since",
        "keep_alive",
        "last_read",
        "loop",
        "origin",
        "parser",
        "paused",
        "phase",
        "pool",
        "progressed",
        "read_timeout",
        "response",
        "spent",
        "stalled",
        "stray",
        "timer",
        "transport",
        "until_close",
        "used",
        "waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = _parser(self)
        self.pool: _Pool | None = None  # whose slot it holds; None once it is closed
        self.idle_since = 0.0
        self.used = False  # it has carried an exchange: it may have died while pooled
        self.phase = _IDLE
        self.origin: Origin | None = None
        self.head_only = False  # the request is a HEAD: its response has no body
        self.spent = False  # the parser was left inside a HEAD response's phantom body
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self.fields: list[tuple[str, str]] = []
        self.head_bytes = 0
        self.keep_alive = False
        self.until_close = False  # the body ends where the connection does
        self.stray = False  # bytes came that no request asked for
        self.failure: _Malformed | None = None  # raised in a callback, as llhttp stopped
        self.paused = False  # reading stopped: the response's unread body is full
        self.progressed = False  # the last read gave body bytes or ended a head
        self.stalled = 0  # bytes read in the body since it last progressed
        self.read_timeout: float | None = None
        self.last_read = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # --- the exchange, as UpstreamClient drives it

    def begin(
        self, origin: Origin, head_only: bool, read_timeout: float | None
    ) -> asyncio.Future[UpstreamResponse]:
        """Expect a response (the request is about to be written); its head resolves the
        future returned."""
        if self.spent:
            self.parser = _parser(self)
            self.spent = False
        self.used = True
        self.origin = origin
        self.head_only = head_only
        self.read_timeout = read_timeout
        self.head_bytes = 0
        self.keep_alive = False
        self.stray = False
        self.response = None
        waiter = self.waiter = self.loop.create_future()
        self.phase = _HEAD
        self._arm()
        return waiter

    def finish(self, whole: bool) -> None:
        """The response's reader is done with it: pool the connection or close it."""
        pool = self.pool
        if pool is not None and whole and self.reusable():
            self.response = None
            if self.paused:
                self.resume()
            pool.put(self)
        else:
            self.discard()

    def reusable(self) -> bool:
        transport = self.transport
        return (
            self.phase == _DONE
            and self.keep_alive
            and not self.stray
            and transport is not None
            and not transport.is_closing()
        )

    def is_connected(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing()

    def resume(self) -> None:
        """The response's unread body was taken: read from the upstream again."""
        self.paused = False
        transport = self.transport
        if transport is not None:
            transport.resume_reading()
        if self.phase == _BODY:
            self._arm()  # the silence is measured from now, not from the pause

    def close(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.close()
        self._end()

    def discard(self) -> None:
        # Closed without waiting to flush: the connection is in an unknown state.
        transport = self.transport
        if transport is not None:
            transport.abort()
        self._end()

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase != _HEAD and phase != _BODY:
            if phase == _IDLE:
                # Parsed, they would be taken for the answer to the next request.
                self.discard()
            elif phase == _DONE:
                self.stray = True
            return
        if self.read_timeout:
            self.last_read = self.loop.time()
        self.progressed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # llhttp reports a callback's exception as its own (the callback's is only
            # its __context__, and only when no other exception was being handled).
            if self.stray:
                return  # after a whole response: it is not reused
            failure, self.failure = self.failure, None
            self._fail(failure if failure is not None else _Malformed(str(exc)))
            return
        except httptools.HttpParserUpgrade:
            self._fail(_Malformed("an upgrade to another protocol"))
            return
        if self.phase == _HEAD:
            self.head_bytes += len(data)
            if self.head_bytes > _MAX_HEAD:
                self._fail(_Malformed(f"a response head over {_MAX_HEAD} bytes"))
        elif self.phase == _BODY:
            if self.progressed:
                self.stalled = 0
            else:
                # Chunk sizes, extensions and trailers, which llhttp buffers whole until
                # they end: bounded like a head.
                self.stalled += len(data)
                if self.stalled > _MAX_HEAD:
                    self._fail(_Malformed(f"chunk framing or trailers over {_MAX_HEAD} bytes"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        phase = self.phase
        if phase == _HEAD:
            self._fail(ConnectionResetError("closed before the response head"))
        elif phase == _BODY:
            if exc is None and self.until_close:
                self._complete()  # a body read until close, closed cleanly: whole
            else:
                self._fail(_CutShort())
        self._end()

    def eof_received(self) -> bool | None:
        return None  # closed: connection_lost says whether a body ended whole

    # --- httptools callbacks

    def _malformed(self, text: str) -> _Malformed:
        """The error for a callback to raise, kept for ``data_received``."""
        self.failure = _Malformed(text)
        return self.failure

    def on_message_begin(self) -> None:
        if self.phase != _HEAD:
            self.stray = True
            raise _Stray
        self.fields = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.phase != _HEAD:
            return  # a chunked body's trailer: not passed on, nor kept
        if len(name) + len(value) > _MAX_FIELD:
            raise self._malformed(f"a header line over {_MAX_FIELD} bytes")
        # llhttp strips the whitespace before a value, not after (aiohttp strips both).
        value = value.rstrip(b" \t")
        if b"\x00" in value:
            raise self._malformed("a NUL byte in a header value")
        fields = self.fields
        # As aiohttp decoded them: bytes that are not UTF-8 become surrogate escapes,
        # which sigproxy.headers reports and drops.
        fields.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )
        if len(fields) > _MAX_HEADERS:
            raise self._malformed(f"more than {_MAX_HEADERS} header fields")

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        self.progressed = True
        self.stalled = 0
        if status < 100:
            # llhttp takes any three digits; the client could not be told this one.
            raise self._malformed(f"status code {status:03d}")
        if 100 <= status < 200:
            if status == 101:
                # sigproxy never asks to switch: what follows is not HTTP.
                raise self._malformed("unsolicited 101 Switching Protocols")
            return  # interim (100 Continue, 103 Early Hints): not passed on
        headers = CIMultiDictProxy(CIMultiDict(self.fields))
        assert self.origin is not None
        response = UpstreamResponse(self.origin, self, status, headers, self.read_timeout)
        self.response = response
        if self.head_only:
            # llhttp cannot be told the request was a HEAD, so it expects the body the
            # head describes: the message ends here, and the next response on this
            # connection gets a new parser.
            self.spent = True
            self.keep_alive = _keeps_alive(parser.get_http_version(), headers)
            self._complete()
        else:
            self.keep_alive = parser.should_keep_alive()
            if status in _NO_BODY_STATUS:
                self._complete()  # llhttp knows these have no body
            else:
                coding = _undecoded_coding(headers)
                if coding is not None:
                    # The client would get coded bytes under no label (Transfer-Encoding
                    # is hop-by-hop): garbage, never an answer.
                    raise self._malformed(
                        f"transfer coding {coding}, which sigproxy does not decode"
                    )
                self.until_close = _until_close(headers)
                self.phase = _BODY
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_chunk_header(self) -> None:
        self.progressed = True

    def on_body(self, body: bytes) -> None:
        self.progressed = True
        response = self.response
        if self.phase != _BODY or response is None:
            self.stray = True  # after a HEAD response: bytes nobody asked for
            raise _Stray
        response._chunks.append(body)
        response._size += len(body)
        response._wake()
        if response._size > _HIGH_WATER and not self.paused:
            self.paused = True
            transport = self.transport
            if transport is not None:
                transport.pause_reading()

    def on_message_complete(self) -> None:
        self.progressed = True
        if self.phase == _BODY:
            self._complete()
        # else an interim response's end, or one whose end was decided at its head

    # --- state

    def _complete(self) -> None:
        self.phase = _DONE
        response = self.response
        if response is not None:
            response._eof = True
            response._wake()

    def _fail(self, exc: Exception) -> None:
        phase, self.phase = self.phase, _FAILED
        if phase == _HEAD:
            waiter = self.waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        elif phase == _BODY:
            response = self.response
            if response is not None:
                response._error = exc
                response._wake()
        if not isinstance(exc, TimeoutError | ConnectionError | _CutShort):
            transport = self.transport
            if transport is not None:
                transport.abort()  # what follows an invalid message is not HTTP either

    def _arm(self) -> None:
        """Start measuring the silence (a read timeout) from now."""
        timeout = self.read_timeout
        if not timeout:
            return
        now = self.last_read = self.loop.time()
        timer = self.timer
        if timer is not None:
            if timer.when() <= now + timeout:
                return  # it fires first, and looks at last_read then
            timer.cancel()
        self.timer = self.loop.call_at(now + timeout, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        timeout = self.read_timeout
        if not timeout or self.paused or (self.phase != _HEAD and self.phase != _BODY):
            return
        deadline = self.last_read + timeout
        if deadline - self.loop.time() > 0.001:  # bytes came since it was set
            self.timer = self.loop.call_at(deadline, self._on_timer)
            return
        self._fail(TimeoutError())

    def _end(self) -> None:
        if self.phase != _DONE:
            self.phase = _FAILED
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        pool = self.pool
        if pool is not None:
            self.pool = None
            pool.free_slot()


def _parser(connection: _Connection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(connection)
    # aiohttp's leniencies for responses (outside its dev mode): servers in the wild
    # send these, and none of them changes where a message ends.
    parser.set_dangerous_leniencies(
        lenient_headers=True,
        lenient_optional_cr_before_lf=True,
        lenient_spaces_after_chunk_size=True,
    )
    return parser


def _until_close(headers: CIMultiDictProxy[str]) -> bool:
    """Whether a response body ends where the connection does (RFC 9112 section 6.3): no
    chunked coding last, and no Content-Length."""
    coding = headers.get("Transfer-Encoding")
    if coding is not None:
        return coding.rsplit(",", 1)[-1].strip().lower() != "chunked"
    return "Content-Length" not in headers


_CODING_NAME = re.compile(r"[a-z0-9._-]{1,32}")


def _undecoded_coding(headers: CIMultiDictProxy[str]) -> str | None:
    """A transfer coding other than chunked (gzip, deflate, compress), or a chunked one
    llhttp does not take off (applied twice, or not last: RFC 9112 6.3), named for the
    error when it is a plain token; None when there is none."""
    # Only OWS is stripped, as llhttp does: str.strip() would also take off NBSP or VT,
    # with which llhttp does not read "chunked".
    codings = [c.strip(" \t") for c in ",".join(headers.getall("Transfer-Encoding", ())).split(",")]
    codings = [c for c in codings if c]
    for coding in codings:
        if not (coding.isascii() and _CODING_NAME.fullmatch(coding.lower())):
            return "(not a token)"  # (str.lower() makes some non-ASCII letters ASCII)
        if coding.lower() not in ("chunked", "identity"):
            return coding.lower()
    if "chunked" in (c.lower() for c in codings[:-1]):
        return "chunked before another coding"
    return None


def _keeps_alive(version: str, headers: CIMultiDictProxy[str]) -> bool:
    """llhttp's keep-alive rule for a message whose end its head decides."""
    tokens = {t.strip().lower() for t in ",".join(headers.getall("Connection", ())).split(",")}
    if version == "1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


class _Pool:
    """One origin's connections: the idle ones (oldest first), how many are open (in
    use, idle or connecting) against its cap, and the requests waiting for one. A retired
    pool (its origin is gone from the config) keeps none idle."""

    __slots__ = (
        "idle",
        "idle_timeout",
        "limit",
        "loop",
        "open",
        "origin",
        "retired",
        "timer",
        "waiters",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin, retired: bool) -> None:
        self.loop = loop
        self.origin = origin
        self.limit = origin.max_connections
        self.idle_timeout = origin.idle_timeout
        self.open = 0
        self.idle: collections.deque[_Connection] = collections.deque()
        # Each is given a connection, or None for a free slot to connect with.
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.retired = retired

    def take(self) -> _Connection | None:
        idle = self.idle
        while idle:
            protocol = idle.pop()  # the most recently used: its socket is warm
            if protocol.is_connected():
                return protocol
            protocol.discard()
        return None

    def put(self, protocol: _Connection) -> None:
        protocol.phase = _IDLE
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(protocol)
                return
        if self.retired:
            protocol.close()
            return
        now = self.loop.time()
        protocol.idle_since = now
        self.idle.append(protocol)
        if self.timer is None:
            self.timer = self.loop.call_at(now + self.idle_timeout, self._expire)

    def free_slot(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.open -= 1

    async def wait(self, deadline: float | None) -> _Connection | None:
        """Queue for the next connection released or slot freed, until ``deadline``."""
        if len(self.waiters) >= self.limit:
            raise PoolBusy(self.origin, "queue_full")
        waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Given a connection or a slot just as the wait ended: pass it on.
                got = waiter.result()
                if got is None:
                    self.free_slot()
                else:
                    self.put(got)
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):  # popped by put() or free_slot()
                    self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise PoolBusy(self.origin, "wait_timeout") from None
            raise

    def retire(self) -> None:
        self.retired = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        idle, self.idle = self.idle, collections.deque()
        for protocol in idle:
            protocol.close()

    def _expire(self) -> None:
        self.timer = None
        idle = self.idle
        now = self.loop.time()
        while idle and idle[0].idle_since + self.idle_timeout <= now:
            idle.popleft().close()
        if idle:
            self.timer = self.loop.call_at(idle[0].idle_since + self.idle_timeout, self._expire)


def verify_context(environ: Mapping[str, str] = os.environ) -> ssl.SSLContext:
    """What upstream certificates are verified against: the system's CAs (with OpenSSL's
    ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``), and the bundle ``AWS_CA_BUNDLE`` names, as the
    AWS CLI and SDKs read it behind a TLS-inspecting proxy. A bundle that can't be read
    is a :class:`ConfigError`."""
    context = ssl.create_default_context()
    bundle = environ.get("AWS_CA_BUNDLE")
    if bundle:
        try:
            context.load_verify_locations(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            raise ConfigError(
                "AWS_CA_BUNDLE",
                f"{bundle}: {reason}: point it at a PEM file of CA certificates, or unset it",
            ) from None
    return context


class UpstreamClient:
    """One per proxy process: a pool of connections per origin."""

    def __init__(
        self, ssl_context: ssl.SSLContext | None = None, *, resolve: Resolver | None = None
    ) -> None:
        """``resolve(host, port)`` gives the addresses to try, in order (default: the
        system resolver, as ``getaddrinfo`` orders them)."""
        self._ssl = ssl_context if ssl_context is not None else verify_context()
        self._resolve = resolve if resolve is not None else _getaddrinfo
        self._pools: dict[Origin, _Pool] = {}
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        self.retain(())

    def retain(self, origins: Iterable[Origin]) -> None:
        """Drop the pools of every origin not in ``origins``: their idle connections are
        closed now, those in use when released. Requests waiting on them still get one."""
        keep = set(origins)
        for origin in [origin for origin in self._pools if origin not in keep]:
            self._pools.pop(origin).retire()

    async def _connect(self, pool: _Pool, connect_timeout: float | None) -> _Connection:
        """A new connection on a slot the caller holds in ``pool``; the slot is freed if
        there is none. Everything (the proxy's answer and TLS included) happens within
        ``connect_timeout``."""
        origin = pool.origin
        proxy = origin.proxy
        # Only this address is dialled (or named in CONNECT); TLS stays the URL host's.
        host, port = origin.connect_to or (origin.host, origin.port)
        loop = asyncio.get_running_loop()
        hop = "dial"
        try:
            async with asyncio.timeout(connect_timeout):
                if proxy is None:
                    sock = await self._dial(host, port)
                else:
                    hop = "proxy"
                    sock = await self._dial(proxy.host, proxy.port)
                    hop = "tunnel"
                    try:
                        await open_tunnel(loop, sock, proxy, host, port)
                    except BaseException:
                        sock.close()
                        raise
                hop = "handshake"
                try:
                    # Over a tunnel this is TLS inside it, as loop.start_tls would do: the
                    # socket after the proxy's 2xx is a byte stream to the upstream.
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(loop),
                        sock=sock,
                        ssl=self._ssl if origin.tls else None,
                        server_hostname=origin.host if origin.tls else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except BaseException as exc:
            pool.free_slot()
            if isinstance(exc, Exception):
                failure = _translate(exc, origin, connect_timeout, hop)
                failure.sent = False
                raise failure from exc
            raise
        protocol.pool = pool
        return protocol

    async def _dial(self, host: str, port: int) -> socket.socket:
        """A TCP connection to ``host``: every address it has, by Happy Eyeballs."""
        addresses = await self._resolve(host, port)
        # Happy Eyeballs (RFC 8305): with a host that has IPv6 and IPv4 addresses and an
        # IPv6 route that drops packets, the IPv4 attempt starts after 250 ms instead of
        # after the IPv6 one times out.
        return await aiohappyeyeballs.start_connection(
            addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
        )

    async def _acquire(self, pool: _Pool, connect_timeout: float | None) -> _Connection:
        """For a request that found no idle connection: a new one while the pool is under
        its cap, else the first one released (or slot freed) while it waits."""
        loop = asyncio.get_running_loop()
        deadline = None if connect_timeout is None else loop.time() + connect_timeout
        while True:
            if pool.open < pool.limit:
                pool.open += 1
                return await self._connect(pool, connect_timeout)
            got = await pool.wait(deadline)
            if got is None:
                return await self._connect(pool, connect_timeout)
            if got.is_connected():
                return got
            got.discard()

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
    ) -> UpstreamResponse:
        """Send the request and wait for the response head; :class:`UpstreamError` says
        why not."""
        head = _head(method, target, headers, body)
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(asyncio.get_running_loop(), origin, self._closed)
        protocol = pool.take()
        if protocol is None:
            protocol = await self._acquire(pool, connect_timeout)
        if protocol.used:  # it has carried a response: it may have died idle
            try:
                return await self._exchange(origin, protocol, method, head, body, read_timeout)
            except ConnectionClosed:
                # The server closed a pooled connection as the request went out. Only a
                # request that is safe to repeat is sent again, on a new connection.
                if method not in _IDEMPOTENT:
                    raise
            protocol = await self._acquire(pool, connect_timeout)
        return await self._exchange(origin, protocol, method, head, body, read_timeout)

    async def _exchange(
        self,
        origin: Origin,
        protocol: _Connection,
        method: str,
        head: bytes,
        body: bytes,
        read_timeout: float | None,
    ) -> UpstreamResponse:
        try:
            transport = protocol.transport
            if transport is None:
                raise ConnectionResetError("closed while pooled")
            head_arrived = protocol.begin(origin, method == "HEAD", read_timeout)
            if len(body) <= _LARGE:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
            return await head_arrived
        except BaseException as exc:
            protocol.discard()
            if isinstance(exc, Exception):
                raise _translate(exc, origin, read_timeout) from exc
            raise


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
Resolver = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


async def _getaddrinfo(host: str, port: int) -> Sequence[AddrInfo]:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: EgressProxy, host: str, port: int
) -> None:
    """Ask ``proxy`` (connected on ``sock``) for a tunnel to ``host:port``; returns once it
    answered 2xx, with nothing of the upstream's read. Raises :class:`ConnectRefused`
    for any other answer, ``ConnectionResetError`` when it closed first."""
    authority = _authority(host, port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization is not None:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) > _MAX_CONNECT_HEAD:
            raise ConnectRefused(None, f"an answer head over {_MAX_CONNECT_HEAD} bytes")
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectionResetError("the proxy closed the connection")
        head += chunk
    first = head.split(b"\r\n", 1)[0]
    status = _STATUS_LINE.fullmatch(first)
    if status is None:
        # The proxy's words are shown, never obeyed.
        text = printable(first[:100].decode("latin-1"))
        raise ConnectRefused(None, f"not an HTTP/1.1 status line: {text!r}")
    code = int(status[1])
    if not 200 <= code < 300:
        reason = printable((status[2] or b"").decode("latin-1").strip()[:200])
        raise ConnectRefused(code, f"{code} {reason}".rstrip(), _auth_schemes(head[:end]))
    if len(head) > end + 4:
        # The upstream speaks second (TLS, HTTP): bytes here came from the proxy.
        raise ConnectRefused(None, f"{len(head) - end - 4} bytes after its {code} answer")


_SCHEME = re.compile(rb"(?im)^proxy-authenticate:[ \t]*([A-Za-z0-9_-]{1,32})")


def _auth_schemes(head: bytes) -> tuple[str, ...]:
    """The schemes a 407's Proxy-Authenticate fields offer (one challenge per field, as
    proxies send them), in order, without duplicates."""
    return tuple(dict.fromkeys(m.decode("ascii") for m in _SCHEME.findall(head)))


def _head(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    if body or method not in _NO_LENGTH_WHEN_EMPTY:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        # A CR or LF inside a name or value would split the request in two.
        raise ValueError("newline or carriage return in a request header")
    return text.encode("utf-8", "surrogateescape")
