"""Keep-alive HTTP/1.1 connections to the upstreams.

sigproxy sends one kind of request: a known origin, a finished header list and a body
already in memory. ``aiohttp.ClientSession`` spends more CPU per request on its general
machinery (URL objects, payload registry, cookie and redirect handling, tracing, timers)
than the exchange itself costs. This module keeps aiohttp's own response protocol (its
llhttp parser, payload streams and read timeouts) and drops the rest: the request head is
written as bytes and connections are pooled per origin, up to a cap, with idle ones
closed by a timer.

An origin may dial another address than its URL's host (``connect_to``: a VPC endpoint,
a tunnel) and may go through an HTTP proxy (``proxy``): TCP to the proxy, ``CONNECT`` to
the address, and TLS to the Function URL inside the tunnel. Either way the Host header,
the signature, the TLS SNI and the certificate check stay the URL's host. A tunnelled
connection is pooled like a direct one.

It raises one error tree, whatever failed below it (aiohttp, asyncio, the socket, TLS);
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
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import aiohappyeyeballs
import aiohttp
from aiohttp.client_exceptions import ClientPayloadError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

from .egress import EgressProxy
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


class _ConnectRefused(Exception):
    """The proxy's answer to CONNECT was not 2xx (``status``), or was not one at all
    (``status`` None, ``text`` says why). Only :func:`_translate` puts it in words."""

    def __init__(self, status: int | None, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _translate(
    exc: Exception, origin: Origin, timeout: float | None, hop: str = "upstream"
) -> UpstreamError:
    """The one place where what failed below (aiohttp, asyncio, the socket, TLS) becomes
    an :class:`UpstreamError` saying why in words. ``timeout`` is the limit that was
    running (connect or read); ``hop`` is what was under way: ``proxy`` (connecting to
    the egress proxy), ``tunnel`` (its answer to CONNECT) or ``upstream`` (the rest)."""
    if isinstance(exc, UpstreamError):
        return exc
    proxy = origin.proxy
    if proxy is not None and hop != "upstream":
        return _proxy_failure(exc, origin, proxy, timeout, hop)
    route = _route(origin)
    where = f"{origin.host}:{origin.port}{route}"
    if isinstance(exc, TimeoutError):  # asyncio's, and aiohttp's read timeouts
        limit = "" if timeout is None else f" within {timeout:g} seconds"
        return UpstreamTimedOut(origin, f"no answer from {where}{limit}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSFailed(
            origin,
            f"certificate verify failed for {origin.host}{route}: {exc.verify_message} "
            "(for a private CA, point SSL_CERT_FILE at its PEM bundle)",
        )
    if isinstance(exc, ssl.SSLError):
        return TLSFailed(origin, f"TLS handshake with {where} failed: {exc.reason or exc}")
    # Without a proxy sigproxy dials (and looks up) connect_to, else the URL's host.
    dialled = origin.connect_to[0] if origin.connect_to is not None else origin.host
    if isinstance(exc, socket.gaierror):
        return ConnectFailed(origin, f"DNS lookup of {dialled} failed: {exc.strerror}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectFailed(origin, f"connection refused by {where}")
    if isinstance(exc, HttpProcessingError):
        # The parser's words may quote what the upstream sent: shown, never obeyed.
        text = printable(str(exc.message or type(exc).__name__).strip().splitlines()[0][:200])
        return ProtocolError(origin, f"{where} sent an invalid HTTP response: {text}")
    if isinstance(exc, ClientPayloadError):
        return ConnectionClosed(origin, f"{where} cut the response body short")
    if isinstance(exc, aiohttp.ClientResponseError):
        text = printable(str(exc.message)[:200])
        return ProtocolError(origin, f"{where} sent an invalid HTTP response: {text}")
    if isinstance(exc, ServerDisconnectedError | ConnectionError | aiohttp.ClientOSError):
        return ConnectionClosed(origin, f"{where} closed the connection")
    if isinstance(exc, OSError):
        return ConnectFailed(origin, f"cannot connect to {where}: {exc.strerror or exc}")
    return ConnectionClosed(origin, f"{where} failed: {type(exc).__name__}")


def _proxy_failure(
    exc: Exception, origin: Origin, proxy: EgressProxy, timeout: float | None, hop: str
) -> ProxyFailed:
    """:func:`_translate`'s words for a failure of the egress proxy hop. ``proxy.url``
    is the one way the proxy is named: it has no password."""
    said = f"egress proxy {proxy.url}:"
    target = "CONNECT " + _authority(*(origin.connect_to or (origin.host, origin.port)))
    limit = "" if timeout is None else f" within {timeout:g} seconds"
    if isinstance(exc, _ConnectRefused):
        if exc.status == 407:
            advice = (
                "check the user and password in the proxy URL"
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


def _route(origin: Origin) -> str:
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
    end and the connection may be kept, and closes it otherwise."""

    __slots__ = ("_origin", "_protocol", "_read_timeout", "content", "headers", "status")

    def __init__(
        self,
        origin: Origin,
        protocol: _Connection,
        message: RawResponseMessage,
        content: StreamReader,
        read_timeout: float | None,
    ) -> None:
        self._origin = origin
        self._protocol: _Connection | None = protocol
        self._read_timeout = read_timeout
        self.status: int = message.code
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be unread)."""
        return self.content.is_eof()

    def read_buffered(self) -> bytes:
        """What of the body has arrived and is unread; all of it once :attr:`complete`."""
        return self.content.read_nowait()

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrives; ``b""`` at its end."""
        try:
            return await self.content.readany()
        except Exception as exc:
            raise _translate(exc, self._origin, self._read_timeout) from exc

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
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        pool = protocol.pool
        if pool is not None and self.content.is_eof() and protocol.reusable():
            if "Transfer-Encoding" in self.headers:
                # aiohttp's C parser can keep a chunked body's last trailer field pending
                # and add it to the next response it parses: the next client's headers. A
                # new parser for the next response on this connection; aiohttp's own
                # client makes one per request.
                protocol.chunked_before = True
            pool.put(protocol)
        else:
            protocol.discard()


class _Connection(ResponseHandler):
    """aiohttp's response protocol, plus what the pool knows of it: the slot it holds, when
    it was pooled, whether a request is outstanding, and the parser settings it was given
    (its parser is kept from one response to the next while they stay the same)."""

    params: tuple[bool, float | None] | None = None
    chunked_before = False  # its last response was chunked: parse the next with a new parser
    pool: _Pool | None = None  # whose slot it holds; None once it is closed
    idle_since = 0.0
    # No request outstanding: whatever arrives now answers nothing that will be asked.
    quiet = False
    body: StreamReader | None = None  # the last response's

    def reusable(self) -> bool:
        if not self.is_connected() or self.should_close:
            return False
        # Bytes that came after the response may have begun another message inside the
        # parser, which should_close does not see: feed_eof() returns that message (or
        # raises on it), and is a no-op between messages.
        parser = self._parser
        try:
            return parser is not None and parser.feed_eof() is None
        except Exception:
            return False

    def data_received(self, data: bytes) -> None:
        if self.quiet and data:
            # Parsed, they would be taken for the answer to the next request.
            self.discard()
            return
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        body = self.body
        if exc is not None and body is not None and not body.is_eof():
            # aiohttp ends a body read until close on any close; a reset one is cut
            # short, not whole. (A sized or chunked one also gets aiohttp's own error.)
            body.set_exception(ClientPayloadError(f"response body cut short: {exc!r}"), exc)
        self._free()
        super().connection_lost(exc)

    def close(self) -> None:
        super().close()
        self._free()

    def discard(self) -> None:
        # Closed without waiting to flush: the connection is in an unknown state.
        transport = self.transport
        if transport is not None:
            transport.abort()
        self._free()

    def _free(self) -> None:
        pool = self.pool
        if pool is not None:
            self.pool = None
            pool.free_slot()


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
            if protocol.is_connected() and not protocol.should_close:
                return protocol
            protocol.discard()
        return None

    def put(self, protocol: _Connection) -> None:
        protocol.quiet = True
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


class UpstreamClient:
    """One per proxy process: a pool of connections per origin."""

    def __init__(
        self, ssl_context: ssl.SSLContext | None = None, *, resolve: Resolver | None = None
    ) -> None:
        """``resolve(host, port)`` gives the addresses to try, in order (default: the
        system resolver, as ``getaddrinfo`` orders them)."""
        self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
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
        hop = "upstream"
        try:
            async with asyncio.timeout(connect_timeout):
                if proxy is None:
                    sock = await self._dial(host, port)
                else:
                    hop = "proxy"
                    sock = await self._dial(proxy.host, proxy.port)
                    hop = "tunnel"
                    try:
                        await _tunnel(loop, sock, proxy, host, port)
                    except BaseException:
                        sock.close()
                        raise
                    hop = "upstream"
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
            if got.is_connected() and not got.should_close:
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
        if protocol.params is not None:  # it has carried a response: it may have died idle
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
            params = (method == "HEAD", read_timeout)
            if protocol.params != params or protocol.chunked_before:
                protocol.chunked_before = False
                protocol.set_response_params(
                    skip_payload=params[0],
                    read_until_eof=True,
                    auto_decompress=False,
                    read_timeout=read_timeout,
                )
                protocol.params = params
            transport = protocol.transport
            if transport is None:
                raise ServerDisconnectedError()
            protocol.quiet = False
            if len(body) <= _LARGE:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
            protocol.start_timeout()
            while True:
                message, payload = await protocol.read()
                if not 100 <= message.code < 200:
                    break
                if message.code == 101:
                    # sigproxy never asks to switch: what follows is not HTTP.
                    raise BadHttpMessage("unsolicited 101 Switching Protocols")
                # Interim responses (100 Continue, 103 Early Hints) are not passed on.
            protocol.body = payload
        except BaseException as exc:
            protocol.discard()
            if isinstance(exc, Exception):
                raise _translate(exc, origin, read_timeout) from exc
            raise
        return UpstreamResponse(origin, protocol, message, payload, read_timeout)


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
Resolver = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


async def _getaddrinfo(host: str, port: int) -> Sequence[AddrInfo]:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def _tunnel(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: EgressProxy, host: str, port: int
) -> None:
    """Ask ``proxy`` (connected on ``sock``) for a tunnel to ``host:port``; returns once it
    answered 2xx, with nothing of the upstream's read. Raises :class:`_ConnectRefused`
    for any other answer, ``ConnectionResetError`` when it closed first."""
    authority = _authority(host, port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization is not None:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) > _MAX_CONNECT_HEAD:
            raise _ConnectRefused(None, f"an answer head over {_MAX_CONNECT_HEAD} bytes")
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectionResetError("the proxy closed the connection")
        head += chunk
    first = head.split(b"\r\n", 1)[0]
    status = _STATUS_LINE.fullmatch(first)
    if status is None:
        # The proxy's words are shown, never obeyed.
        text = printable(first[:100].decode("latin-1"))
        raise _ConnectRefused(None, f"not an HTTP/1.1 status line: {text!r}")
    code = int(status[1])
    if not 200 <= code < 300:
        reason = printable((status[2] or b"").decode("latin-1").strip()[:200])
        raise _ConnectRefused(code, f"{code} {reason}".rstrip())
    if len(head) > end + 4:
        # The upstream speaks second (TLS, HTTP): bytes here came from the proxy.
        raise _ConnectRefused(None, f"{len(head) - end - 4} bytes after its {code} answer")


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
