"""Keep-alive HTTP/1.1 connections to the upstreams.

sigproxy sends one kind of request: a known origin, a finished header list and a body
already in memory. ``aiohttp.ClientSession`` spends more CPU per request on its general
machinery (URL objects, payload registry, cookie and redirect handling, tracing, timers)
than the exchange itself costs. This module keeps aiohttp's own response protocol (its
llhttp parser, payload streams, read timeouts and exceptions) and drops the rest: the
request head is written as bytes and connections are pooled per origin.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass

import aiohttp
from aiohttp.client_exceptions import ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

# Idle connections older than this are closed rather than reused: servers drop idle
# keep-alive connections after a while, and a request sent on one that is just closing
# fails. aiohttp's connector uses the same figure.
KEEPALIVE_SECONDS = 15.0
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods sent without Content-Length when they carry no body; the rest get
# Content-Length: 0, as aiohttp does.
_NO_LENGTH_WHEN_EMPTY = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT", "DELETE"})
_LARGE = 1 << 16


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream's connections go."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


class ConnectError(Exception):
    """No connection to the upstream; ``kind`` is ``connect``, ``tls`` or ``timeout``."""

    def __init__(self, origin: Origin, kind: str, cause: BaseException) -> None:
        super().__init__(f"{kind} error connecting to {origin.host}:{origin.port}: {cause}")
        self.kind = kind


class UpstreamResponse:
    """A response whose head has arrived; the body is read from :attr:`content`.
    :meth:`release` must be called: it pools the connection if the body was read to the
    end and the connection may be kept, and closes it otherwise."""

    __slots__ = ("_client", "_origin", "_protocol", "content", "headers", "reason", "status")

    def __init__(
        self,
        client: UpstreamClient,
        origin: Origin,
        protocol: _Connection,
        message: RawResponseMessage,
        content: StreamReader,
    ) -> None:
        self._client = client
        self._origin = origin
        self._protocol: _Connection | None = protocol
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def release(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        if self.content.is_eof() and not protocol.should_close and protocol.is_connected():
            self._client._put(self._origin, protocol)
        else:
            _abort(protocol)


class _Connection(ResponseHandler):
    """aiohttp's response protocol, remembering the parser settings it was given: its
    parser is kept from one response to the next while they stay the same."""

    params: tuple[bool, float | None] | None = None


class UpstreamClient:
    """One per proxy process: pools of idle connections by origin."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._idle: dict[Origin, collections.deque[tuple[float, _Connection]]] = {}
        self._loop = asyncio.get_running_loop()
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for pool in self._idle.values():
            for _, protocol in pool:
                protocol.close()
        self._idle.clear()

    def _put(self, origin: Origin, protocol: _Connection) -> None:
        if self._closed:
            protocol.close()
            return
        self._idle.setdefault(origin, collections.deque()).append((time.monotonic(), protocol))

    def _take(self, origin: Origin) -> _Connection | None:
        pool = self._idle.get(origin)
        if not pool:
            return None
        stale = time.monotonic() - KEEPALIVE_SECONDS
        while pool and pool[0][0] < stale:  # the oldest are at the left
            pool.popleft()[1].close()
        while pool:
            _, protocol = pool.pop()  # the most recently used: its socket is warm
            if protocol.is_connected() and not protocol.should_close:
                return protocol
            protocol.close()
        return None

    async def _connect(self, origin: Origin, connect_timeout: float | None) -> _Connection:
        try:
            async with asyncio.timeout(connect_timeout):
                _, protocol = await self._loop.create_connection(
                    lambda: _Connection(self._loop),
                    origin.host,
                    origin.port,
                    ssl=self._ssl if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError as exc:
            raise ConnectError(origin, "timeout", exc) from exc
        except ssl.SSLError as exc:  # also certificate verification
            raise ConnectError(origin, "tls", exc) from exc
        except OSError as exc:
            raise ConnectError(origin, "connect", exc) from exc
        return protocol

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
        """Send the request and wait for the response head. Raises aiohttp's client
        exceptions (and ``TimeoutError`` for a read timeout), like ClientSession."""
        head = _head(method, target, headers, body)
        protocol = self._take(origin)
        if protocol is not None:
            try:
                return await self._exchange(origin, protocol, method, head, body, read_timeout)
            except (ServerDisconnectedError, aiohttp.ClientOSError):
                # The server closed a pooled connection as the request went out. Only a
                # request that is safe to repeat is sent again, on a new connection.
                if method not in _IDEMPOTENT:
                    raise
        protocol = await self._connect(origin, connect_timeout)
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
            if protocol.params != params:
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
            if len(body) <= _LARGE:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
            protocol.start_timeout()
            while True:
                message, payload = await protocol.read()
                # Interim responses (100 Continue, 103 Early Hints) are not passed on.
                if not 100 <= message.code < 200 or message.code == 101:
                    break
        except BaseException:
            _abort(protocol)
            raise
        return UpstreamResponse(self, origin, protocol, message, payload)


def _abort(protocol: ResponseHandler) -> None:
    # Closed without waiting to flush: the connection is in an unknown state.
    # (ResponseHandler.abort() only exists in newer aiohttp releases.)
    transport = protocol.transport
    if transport is not None:
        transport.abort()


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
