"""The request handler: route, read and hash the body, sign, forward, stream back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import socket
import struct
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy
from yarl import URL

from .canonical import InvalidTarget, normalize_path, normalize_query, split_target
from .config import Config, Upstream
from .cors import CorsPolicy
from .credentials import CredentialSource, CredentialStore
from .errors import (
    BadRequest,
    BodyTooLarge,
    ExpectationFailed,
    Forbidden,
    NoRoute,
    OverCapacity,
    ProxyError,
    RequestTimeout,
    UpstreamBusy,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_response,
    proxy_error_response,
    upstream_failure,
)
from .hosts import hostname, is_loopback
from .inbound import (
    HostAllowList,
    check_client,
    check_framing,
    check_host,
    check_method,
    check_site,
    check_token,
    is_preflight,
)
from .logs import printable
from .metrics import NO_UPSTREAM, Metrics
from .routing import Match, Router
from .signing import EMPTY_SHA256, SIGNER_CLASSES, BaseSigner
from .upstream import ConnectError, Origin, PoolBusy, UpstreamClient, UpstreamResponse

log = logging.getLogger("sigproxy.proxy")
access_log = logging.getLogger("sigproxy.access")

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection and Keep-Alive.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers never passed on: the proxy sets its own Host and length, the aiohttp
# server already answered any Expect, and forwarded-for headers are rebuilt.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# Status recorded (never sent) when the client disconnected, as nginx does.
CLIENT_GONE = 499


@dataclass(frozen=True, slots=True)
class _Target:
    """What is known about an upstream when the config is loaded."""

    upstream: Upstream
    credentials: CredentialSource | None
    signer: BaseSigner
    origin: Origin
    cors: CorsPolicy | None


class RouteTable:
    """Everything requests need from one config, built once and never changed: a reload
    swaps in a whole new table, and a request keeps the table it started with."""

    def __init__(self, config: Config, credentials: CredentialStore) -> None:
        self.config = config
        self.credentials = credentials
        self.router = Router(config.upstreams)
        self.hosts = HostAllowList.for_config(config)
        self.admin_hosts = HostAllowList.for_config(config, any_ip=True)
        self.targets: dict[str, _Target] = {}
        self.by_host: dict[str, list[Upstream]] = {}
        signer_class = SIGNER_CLASSES[config.signer]
        for upstream in config.upstreams:
            source = credentials.get(upstream.name)
            if upstream.auth == "aws_iam" and source is None:
                raise ValueError(f"no credential source for aws_iam upstream {upstream.name!r}")
            self.targets[upstream.name] = _Target(
                upstream=upstream,
                credentials=source,
                signer=signer_class(upstream.host_header, upstream.region, upstream.service),
                origin=_origin(upstream),
                cors=CorsPolicy(upstream.cors) if upstream.cors is not None else None,
            )
            # Forward-proxy requests name the Function URL's own host.
            self.by_host.setdefault(upstream.url_host, []).append(upstream)
        for same_host in self.by_host.values():
            same_host.sort(key=lambda u: -len(u.base_path))

    def forward_match(self, host: str, path: str) -> Match | None:
        """The upstream a forward-proxy request for ``host`` + ``path`` goes to."""
        for upstream in self.by_host.get(host, ()):
            base = upstream.base_path
            if not base or path == base or path.startswith(base + "/"):
                return Match(upstream, path)
        return None


@dataclass(slots=True)
class _Outcome:
    """What the access log and the metrics are told about one request."""

    upstream: str = NO_UPSTREAM
    status: int = 0
    sent: int = 0
    received: int = 0
    upstream_time: float | None = None
    path: str | None = None
    error: str | None = None
    cors: CorsPolicy | None = None


class Proxy:
    """Owns the current route table, the upstream connections, the request body memory
    budget and the per-request work."""

    def __init__(self, table: RouteTable, metrics: Metrics) -> None:
        self.table = table
        self.metrics = metrics
        self.bodies = MemoryBudget(table.config.limits.body_memory_bytes)
        self._client: UpstreamClient | None = None

    def swap(self, table: RouteTable) -> None:
        """Serve new requests from ``table``; requests in flight finish on the old one.
        Pools of upstreams the new table no longer has are closed."""
        self.table = table
        self.bodies.capacity = table.config.limits.body_memory_bytes
        if self._client is not None:
            self._client.retain(t.origin for t in table.targets.values())

    async def open(self) -> None:
        """Create the upstream connection pools (TLS verified with the system's CAs)."""
        self._client = UpstreamClient()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp handler for every request on the proxy port."""
        started = time.perf_counter()
        request_id = _request_id(request)
        self.metrics.in_flight.inc()
        outcome = _Outcome()
        try:
            return await self._proxy(request, self.table, request_id, outcome)
        except ProxyError as exc:
            return await self._refuse(request, exc, request_id, outcome)
        except (asyncio.CancelledError, ConnectionResetError):
            outcome.status = CLIENT_GONE
            raise
        except Exception:
            outcome.status = 500
            log.exception("request %s: unexpected error", request_id)
            self.metrics.proxy_errors.labels("internal").inc()
            resp = error_response(500, "internal_error", "sigproxy failed unexpectedly", request_id)
            resp.headers["X-Request-Id"] = request_id
            return resp
        finally:
            self._account(request, request_id, outcome, time.perf_counter() - started)

    async def _proxy(
        self, request: web.BaseRequest, table: RouteTable, request_id: str, outcome: _Outcome
    ) -> web.StreamResponse:
        """Admit, route, read the body, sign, forward, stream the answer back."""
        config = table.config
        check_client(request, config)
        check_host(request, table.hosts)
        check_method(request, config)
        check_framing(request)
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            raise ExpectationFailed("only 'Expect: 100-continue' is supported")
        if is_preflight(request):
            # Browsers send preflights without credentials: answered here, before the
            # token, never forwarded or signed, and telling nothing about other routes.
            outcome.status = 204
            return self._preflight(request, table, request_id, outcome)
        if config.inbound_auth is not None:
            check_token(request, config.inbound_auth)
        match, query = self._route(request, table, outcome)
        upstream = match.upstream
        outcome.upstream = upstream.name
        target = table.targets[upstream.name]
        outcome.cors = target.cors
        check_site(request, target.cors, allow_navigation=config.allow_cross_site_navigation)

        body, held = await self._receive(request, upstream.max_body_bytes, config)
        try:
            outcome.received = len(body)
            outgoing = match.path + ("?" + query if query else "")
            strip = config.inbound_auth.header if config.inbound_auth else None
            headers = _forward_headers(request, upstream, request_id, strip)
            if target.credentials is not None:
                creds = await target.credentials.get()
                t0 = time.perf_counter()
                digest = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
                headers.extend(target.signer.sign(request.method, outgoing, digest, creds))
                self.metrics.signing_duration.observe(time.perf_counter() - t0)
            t0 = time.perf_counter()
            up = await self._send(target, request.method, outgoing, headers, body)
            outcome.upstream_time = time.perf_counter() - t0
        finally:
            # The body has gone upstream: its memory is free for others while the
            # answer streams back, which may take minutes.
            self.bodies.release(held)
            del body
        try:
            return await self._relay(request, target, up, request_id, outcome)
        finally:
            up.release()

    async def _refuse(
        self, request: web.BaseRequest, exc: ProxyError, request_id: str, outcome: _Outcome
    ) -> web.StreamResponse:
        outcome.status = exc.status
        outcome.error = exc.code
        self.metrics.proxy_errors.labels(exc.reason).inc()
        if isinstance(exc, UpstreamUnreachable | UpstreamTimeout):
            kind = exc.extra.get("kind", "connect")
            self.metrics.upstream_errors.labels(outcome.upstream, kind).inc()
        resp = proxy_error_response(exc, request_id)
        resp.headers["X-Request-Id"] = request_id
        if outcome.cors is not None and exc.code != "cors_refused":
            # So a page allowed to call the upstream can read why it failed.
            for name, value in outcome.cors.response_headers(request.headers.get("Origin")):
                resp.headers.add(name, value)
        outcome.sent = len(resp.body) if isinstance(resp.body, bytes) else 0
        if exc.closes or (request.body_exists and not request.content.is_eof()):
            # Refused before its body was read (or while it was): nothing more is taken
            # from this client, and the connection closes after the answer.
            await _refuse_rest_of_body(request, resp)
        return resp

    def _account(
        self, request: web.BaseRequest, request_id: str, outcome: _Outcome, elapsed: float
    ) -> None:
        """Metrics and the access log line for one finished request."""
        m = self.metrics
        m.in_flight.dec()
        m.request_done(
            outcome.upstream, request.method, outcome.status, elapsed, outcome.upstream_time
        )
        if outcome.received or outcome.sent:
            m.bytes_done(outcome.upstream, outcome.received, outcome.sent)
        if not access_log.isEnabledFor(logging.INFO):
            return
        raw = printable(split_target(request.raw_path)[0])
        path = raw if outcome.path is None else outcome.path
        upstream_ms = (
            None if outcome.upstream_time is None else round(outcome.upstream_time * 1000, 1)
        )
        access_log.info(
            "%s %s %s %s %s in=%d out=%d total_ms=%.1f upstream_ms=%s%s%s",
            request_id,
            outcome.upstream,
            printable(request.method),
            path,
            outcome.status,
            outcome.received,
            outcome.sent,
            elapsed * 1000,
            "-" if upstream_ms is None else upstream_ms,
            "" if raw == path else f" raw={raw}",
            "" if outcome.error is None else f" error={outcome.error}",
            extra={
                "request_id": request_id,
                "upstream": outcome.upstream,
                "method": request.method,
                "path": path,
                "raw_path": raw,
                "status": outcome.status,
                "bytes_in": outcome.received,
                "bytes_out": outcome.sent,
                "total_ms": round(elapsed * 1000, 1),
                "upstream_ms": upstream_ms,
                "error": outcome.error,
            },
        )

    def _preflight(
        self, request: web.BaseRequest, table: RouteTable, request_id: str, outcome: _Outcome
    ) -> web.Response:
        try:
            match, _ = self._route(request, table, outcome)
        except ProxyError:
            raise Forbidden(
                "CORS preflight refused: no upstream with a CORS policy serves this path",
                code="cors_refused",
            ) from None
        outcome.upstream = match.upstream.name
        policy = table.targets[match.upstream.name].cors
        if policy is None:
            raise Forbidden(
                "CORS preflight refused: this upstream has no cors section", code="cors_refused"
            )
        return _preflight(policy, request, request_id)

    async def _receive(
        self, request: web.BaseRequest, limit: int, config: Config
    ) -> tuple[bytes, int]:
        """The whole request body and the bytes of the memory budget it holds (the
        caller releases them). ``100 Continue`` is sent only now, when the body is
        wanted: after admission, routing and the length check."""
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(
                f"request body of {length} bytes is over the limit of {limit} bytes",
                limit=limit,
            )
        if not request.body_exists:
            return b"", 0
        budget = self.bodies
        held = 0
        if length is not None:
            if not budget.take(length):
                raise _over_capacity()
            held = length
        try:
            content = request.content
            if length is not None and content.is_eof():
                return content.read_nowait(), held  # it came with the request head
            if "Expect" in request.headers and request.version >= (1, 1):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0
            chunks: list[bytes] = []
            size = 0
            async with asyncio.timeout(config.client_timeouts.body):
                async for chunk in content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge(
                            f"request body is over the limit of {limit} bytes", limit=limit
                        )
                    if size > held:  # chunked: the budget is taken as the body arrives
                        if not budget.take(size - held):
                            raise _over_capacity()
                        held = size
                    chunks.append(chunk)
            return b"".join(chunks), held
        except TimeoutError:
            budget.release(held)
            raise RequestTimeout(
                f"the request body did not arrive within {config.client_timeouts.body:g} seconds"
            ) from None
        except BaseException:
            budget.release(held)
            raise

    def _route(
        self, request: web.BaseRequest, table: RouteTable, outcome: _Outcome
    ) -> tuple[Match, str]:
        """The upstream and canonical path for a request in origin form (reverse proxy)
        or absolute form (``GET http://<function url host>/path``: forward proxy)."""
        raw = request.raw_path
        if raw.startswith("/"):
            path, query = _canonical(*split_target(raw))
            outcome.path = path
            match = table.router.match(request.host, path)
            if match is None:
                raise NoRoute(
                    "no upstream is configured for this path",
                    path=path,
                    prefixes=list(table.router.prefixes),
                )
            return match, query
        if raw == "*":
            raise BadRequest("asterisk-form requests (OPTIONS *) are not forwarded")
        scheme, sep, rest = raw.partition("://")
        if not sep or scheme.lower() != "http":
            raise BadRequest(
                "the request target must be a path, or an http:// URL when sigproxy is used "
                "as an HTTP proxy"
            )
        authority, slash, remainder = rest.partition("/")
        host = hostname(authority)
        path, query = _canonical(*split_target("/" + remainder if slash else "/"))
        outcome.path = path
        match = table.forward_match(host, path)
        if match is not None:
            return match, query
        if is_loopback(host):
            # An absolute-form request for the proxy itself: route it as a path.
            local = table.router.match(request.host, path)
            if local is not None:
                return local, query
            raise NoRoute(
                "no upstream is configured for this path",
                path=path,
                prefixes=list(table.router.prefixes),
            )
        raise Forbidden(
            "sigproxy only forwards to the hosts of its upstream table; this host is not one",
            code="host_not_allowed",
        )

    async def _send(
        self,
        target: _Target,
        method: str,
        outgoing: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> UpstreamResponse:
        """Send the signed request; returns once the response head has arrived."""
        assert self._client is not None, "Proxy.open() was not called"
        upstream = target.upstream
        try:
            return await self._client.request(
                target.origin,
                method,
                outgoing,
                headers,
                body,
                connect_timeout=upstream.timeout.connect,
                read_timeout=upstream.timeout.read,
            )
        except PoolBusy as exc:
            raise UpstreamBusy(
                f"all {upstream.max_connections} connections to upstream {upstream.name!r} "
                "are in use and "
                + (
                    "too many requests are waiting for one"
                    if exc.why == "queue_full"
                    else f"none came free within {upstream.timeout.connect:g} seconds"
                ),
                upstream=upstream.name,
            ) from exc
        except (TimeoutError, aiohttp.ClientError, HttpProcessingError, ConnectError) as exc:
            raise upstream_failure(exc, upstream.name) from exc

    async def _relay(
        self,
        request: web.BaseRequest,
        target: _Target,
        up: UpstreamResponse,
        request_id: str,
        outcome: _Outcome,
    ) -> web.StreamResponse:
        """Send the upstream's answer to the client: at once when it is whole in memory,
        else streamed as it arrives."""
        length = up.content_length
        sized = length is not None and "Transfer-Encoding" not in up.headers
        whole = (
            sized
            and request.method != "HEAD"
            and up.status not in (204, 304)
            and up.content.is_eof()
        )
        # The upstream's reason phrase is not passed on: the status says it all, and a
        # phrase with control bytes would not survive the trip.
        # A body that came with the head goes out with the headers in one write, where a
        # streamed response costs a write for each.
        response = (web.Response if whole else web.StreamResponse)(status=up.status)
        _copy_response_headers(up.headers, response, request_id, target.cors is not None)
        if target.cors is not None:
            for name, value in target.cors.response_headers(request.headers.get("Origin")):
                response.headers.add(name, value)
        response.headers["X-Request-Id"] = request_id
        outcome.status = CLIENT_GONE
        if whole:
            assert isinstance(response, web.Response)
            response.body = up.content.read_nowait()
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                return response
            outcome.status, outcome.sent = up.status, len(response.body)
            return response
        if sized:
            response.content_length = length
        try:
            await response.prepare(request)
        except ConnectionError:
            return response
        outcome.sent, outcome.status = await self._stream(
            request, up, response, target.upstream.name, request_id
        )
        return response

    async def _stream(
        self,
        request: web.BaseRequest,
        up: UpstreamResponse,
        response: web.StreamResponse,
        upstream: str,
        request_id: str,
    ) -> tuple[int, int]:
        """Copy the upstream body to the client as it arrives; returns (bytes, status)."""
        sent = 0
        content = up.content
        while True:
            try:
                chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientError) as exc:
                # Headers are out; the only honest signal left is a reset connection, so
                # the client never mistakes a truncated body for a whole one.
                kind = upstream_failure(exc, upstream).extra["kind"]
                self.metrics.upstream_errors.labels(upstream, kind).inc()
                log.warning(
                    "request %s: upstream %s failed mid-response after %d bytes (%s)",
                    request_id,
                    upstream,
                    sent,
                    kind,
                )
                _reset(request)
                return sent, up.status
            if not chunk:
                break
            try:
                await response.write(chunk)
            except ConnectionError:
                log.debug("request %s: client went away after %d bytes", request_id, sent)
                return sent, CLIENT_GONE
            sent += len(chunk)
        try:
            await response.write_eof()
        except ConnectionError:
            return sent, CLIENT_GONE
        return sent, up.status


def _canonical(raw_path: str, raw_query: str) -> tuple[str, str]:
    """The path and query to route, sign and send (see :mod:`sigproxy.canonical`)."""
    try:
        return normalize_path(raw_path), normalize_query(raw_query)
    except InvalidTarget as exc:
        raise BadRequest(str(exc)) from None


class MemoryBudget:
    """Bytes of request bodies held in memory at once, process-wide. Taking is
    all-or-nothing: a request that would go over is refused, never queued."""

    __slots__ = ("capacity", "used")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.capacity:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size


def _over_capacity() -> OverCapacity:
    return OverCapacity(
        "sigproxy is holding as many request bodies in memory as limits.body_memory_bytes "
        "allows; retry shortly"
    )


_LINGER_ZERO = struct.pack("ii", 1, 0)


def _reset(request: web.BaseRequest) -> None:
    """Cut the client's connection with a reset (RST), which every client reads as an
    error; a plain close (FIN) would end an HTTP/1.0 or close-delimited body as if it
    were whole."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    transport.abort()


def _preflight(policy: CorsPolicy, request: web.BaseRequest, request_id: str) -> web.Response:
    origin = request.headers["Origin"]
    method = request.headers["Access-Control-Request-Method"]
    wanted = request.headers.get("Access-Control-Request-Headers", "").split(",")
    granted = policy.preflight(origin, method, wanted)
    if isinstance(granted, str):
        raise Forbidden(f"CORS preflight refused: {granted}", code="cors_refused")
    resp = web.Response(status=204, headers={"X-Request-Id": request_id})
    for name, value in granted:
        resp.headers.add(name, value)
    return resp


def _origin(upstream: Upstream) -> Origin:
    url = URL(upstream.origin)
    assert url.host is not None
    assert url.port is not None
    return Origin(
        upstream.scheme,
        url.host,
        url.port,
        name=upstream.name,
        max_connections=upstream.max_connections,
        idle_timeout=upstream.timeout.idle,
    )


def _request_id(request: web.BaseRequest) -> str:
    given = request.headers.get("X-Request-Id")
    if given and _REQUEST_ID_RE.match(given):
        return given
    return os.urandom(16).hex()


async def _refuse_rest_of_body(request: web.BaseRequest, resp: web.StreamResponse) -> None:
    """Send the refusal and close the connection without reading the rest of the body.

    aiohttp would otherwise do a lingering close, reading and discarding up to 10 s of
    the upload. The response is flushed before the socket closes.
    """
    resp.force_close()
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionError:
        return
    protocol = request.protocol
    if protocol is not None:
        protocol.force_close()


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    if "Connection" not in headers:
        return tokens
    for value in headers.getall("Connection"):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _forward_headers(
    request: web.BaseRequest, upstream: Upstream, request_id: str, strip: str | None = None
) -> list[tuple[str, str]]:
    """The client's headers as they go upstream (before signing); ``strip`` names the
    inbound_auth header, which is the proxy's and never forwarded."""
    incoming = request.headers
    drop = _connection_tokens(incoming)
    if strip is not None:
        drop.add(strip.lower())
    signed = upstream.auth == "aws_iam"
    # Every header the proxy sets below is in _REQUEST_DROP, so each appears once.
    out = [("Host", upstream.host_header)]
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _REQUEST_DROP or lower in drop:
            continue
        # The signature is ours: the client's Authorization and any X-Amz-* it sent
        # (a stale date, a token) would contradict it.
        if signed and (lower == "authorization" or lower.startswith("x-amz-")):
            continue
        if not value.isascii():
            _check_utf8(value, name)
        out.append((name, value))
    peer = request.remote or ""
    prior = ", ".join(incoming.getall("X-Forwarded-For", ()))
    if peer:
        out.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
    elif prior:
        out.append(("X-Forwarded-For", prior))
    out.append(("X-Forwarded-Proto", request.scheme))
    if request.host:
        out.append(("X-Forwarded-Host", request.host))
    out.append(("X-Request-Id", request_id))
    return out


def _check_utf8(value: str, name: str) -> None:
    # aiohttp hands undecodable header bytes over as surrogate escapes, and its writer
    # would silently drop them; refuse instead of forwarding an altered value.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"header {name} is not valid UTF-8") from None


def _copy_response_headers(
    headers: CIMultiDictProxy[str], response: web.StreamResponse, request_id: str, cors: bool
) -> None:
    drop = _connection_tokens(headers)
    for name, value in headers.items():
        lower = name.lower()
        if lower in _RESPONSE_DROP or lower in drop or lower == "x-request-id":
            continue
        if cors and lower.startswith("access-control-"):
            continue  # the proxy's policy replaces the upstream's
        if not value.isascii():
            try:
                _check_utf8(value, name)
            except BadRequest:
                log.warning(
                    "request %s: dropped upstream header %s: not valid UTF-8", request_id, name
                )
                continue
        response.headers.add(name, value)
