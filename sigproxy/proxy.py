"""The request handler: route, read and hash the body, sign, forward, stream back."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy
from yarl import URL

from .canonical import normalize_path, normalize_query, split_target
from .config import Config, Upstream, is_loopback
from .cors import CorsPolicy
from .credentials import CredentialSource, CredentialStore
from .errors import (
    BadRequest,
    BodyTooLarge,
    ExpectationFailed,
    Forbidden,
    NoRoute,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_response,
    proxy_error_response,
    upstream_failure,
)
from .inbound import check_client, check_method, check_origin, check_token
from .metrics import NO_UPSTREAM, Metrics
from .routing import Match, Router, hostname
from .signing import EMPTY_SHA256, SIGNER_CLASSES, BaseSigner
from .upstream import ConnectError, Origin, UpstreamClient, UpstreamResponse

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


class Proxy:
    """Owns the current route table, the upstream connections and the per-request work."""

    def __init__(self, table: RouteTable, metrics: Metrics) -> None:
        self.table = table
        self.metrics = metrics
        self._client: UpstreamClient | None = None

    def swap(self, table: RouteTable) -> None:
        """Serve new requests from ``table``; requests in flight finish on the old one."""
        self.table = table

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
        m = self.metrics
        m.in_flight.inc()
        upstream_name = NO_UPSTREAM
        status = 0
        sent = 0
        body_len = 0
        upstream_time: float | None = None
        table = self.table
        policy: CorsPolicy | None = None
        try:
            try:
                config = table.config
                check_client(request, config)
                check_method(request, config)
                if "Expect" in request.headers:
                    if request.headers["Expect"].lower() != "100-continue":
                        raise ExpectationFailed("only 'Expect: 100-continue' is supported")
                    await self.expect(request)
                match, query = self._route(request, table)
                upstream = match.upstream
                upstream_name = upstream.name
                target = table.targets[upstream_name]
                policy = target.cors
                origin = request.headers.get("Origin")
                if policy is not None and origin is not None and request.method == "OPTIONS":
                    wanted = request.headers.get("Access-Control-Request-Method")
                    if wanted is not None:
                        # A preflight: answered here, never forwarded or signed.
                        status = 204
                        return _preflight(policy, origin, wanted, request, request_id)
                check_origin(request, policy)
                if config.inbound_auth is not None:
                    check_token(request, config.inbound_auth)
                try:
                    body = _body_at_hand(request, upstream.max_body_bytes)
                    if body is None:
                        async with asyncio.timeout(config.client_timeouts.body):
                            body = await _read_body(request, upstream.max_body_bytes)
                except TimeoutError:
                    raise RequestTimeout(
                        f"the request body did not arrive within "
                        f"{config.client_timeouts.body:g} seconds"
                    ) from None
                body_len = len(body)
                outgoing = match.path + ("?" + query if query else "")
                strip = config.inbound_auth.header if config.inbound_auth else None
                headers = _forward_headers(request, upstream, request_id, strip)
                if target.credentials is not None:
                    creds = await target.credentials.get()
                    t0 = time.perf_counter()
                    digest = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
                    headers.extend(target.signer.sign(request.method, outgoing, digest, creds))
                    m.signing_duration.observe(time.perf_counter() - t0)
                response, status, sent, upstream_time = await self._forward(
                    request, target, outgoing, headers, body, request_id
                )
                return response
            except ProxyError as exc:
                status = exc.status
                m.proxy_errors.labels(exc.reason).inc()
                if isinstance(exc, UpstreamUnreachable | UpstreamTimeout):
                    m.upstream_errors.labels(upstream_name, exc.extra.get("kind", "connect")).inc()
                resp = proxy_error_response(exc, request_id)
                resp.headers["X-Request-Id"] = request_id
                if policy is not None and exc.code != "cors_refused":
                    # So a page allowed to call the upstream can read why it failed.
                    for name, value in policy.response_headers(request.headers.get("Origin")):
                        resp.headers.add(name, value)
                sent = len(resp.body) if isinstance(resp.body, bytes) else 0
                if isinstance(exc, BodyTooLarge | RequestTimeout):
                    await _refuse_rest_of_body(request, resp)
                return resp
            except (asyncio.CancelledError, ConnectionResetError):
                status = CLIENT_GONE
                raise
            except Exception:
                status = 500
                log.exception("request %s: unexpected error", request_id)
                m.proxy_errors.labels("internal").inc()
                resp = error_response(
                    500, "internal_error", "sigproxy failed unexpectedly", request_id
                )
                resp.headers["X-Request-Id"] = request_id
                return resp
        finally:
            elapsed = time.perf_counter() - started
            m.in_flight.dec()
            m.request_done(upstream_name, request.method, status, elapsed, upstream_time)
            if body_len or sent:
                m.bytes_done(upstream_name, body_len, sent)
            if access_log.isEnabledFor(logging.INFO):
                upstream_ms = None if upstream_time is None else round(upstream_time * 1000, 1)
                access_log.info(
                    "%s %s %s %s %s in=%d out=%d total_ms=%.1f upstream_ms=%s",
                    request_id,
                    upstream_name,
                    request.method,
                    request.path,
                    status,
                    body_len,
                    sent,
                    elapsed * 1000,
                    "-" if upstream_ms is None else upstream_ms,
                    extra={
                        "request_id": request_id,
                        "upstream": upstream_name,
                        "method": request.method,
                        "path": request.path,
                        "status": status,
                        "bytes_in": body_len,
                        "bytes_out": sent,
                        "total_ms": round(elapsed * 1000, 1),
                        "upstream_ms": upstream_ms,
                    },
                )

    async def expect(self, request: web.BaseRequest) -> None:
        """Answer ``Expect: 100-continue`` (the handler has checked that is what was
        asked). A body the route would refuse gets no ``100 Continue``: the handler
        answers 413 at once and the client never sends it."""
        length = request.content_length
        if length is not None:
            try:
                match, _ = self._route(request, self.table)
            except ProxyError:
                return  # the handler answers 400, 403 or 404
            if length > match.upstream.max_body_bytes:
                return  # the handler answers 413
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0

    def _target_of(self, request: web.BaseRequest) -> tuple[str, str]:
        raw_path, raw_query = split_target(request.raw_path)
        return normalize_path(raw_path), normalize_query(raw_query)

    def _route(self, request: web.BaseRequest, table: RouteTable) -> tuple[Match, str]:
        """The upstream and canonical path for a request in origin form (reverse proxy)
        or absolute form (``GET http://<function url host>/path``: forward proxy)."""
        raw = request.raw_path
        if raw.startswith("/"):
            path, query = self._target_of(request)
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
        raw_path, raw_query = split_target("/" + remainder if slash else "/")
        path, query = normalize_path(raw_path), normalize_query(raw_query)
        match = table.forward_match(host, path)
        if match is not None:
            return match, query
        if _is_local(host):
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
            f"sigproxy only forwards to the hosts of its upstream table; {host} is not one",
            code="host_not_allowed",
        )

    async def _forward(
        self,
        request: web.BaseRequest,
        target: _Target,
        outgoing: str,
        headers: list[tuple[str, str]],
        body: bytes,
        request_id: str,
    ) -> tuple[web.StreamResponse, int, int, float]:
        assert self._client is not None, "Proxy.open() was not called"
        upstream = target.upstream
        t0 = time.perf_counter()
        try:
            up = await self._client.request(
                target.origin,
                request.method,
                outgoing,
                headers,
                body,
                connect_timeout=upstream.timeout.connect,
                read_timeout=upstream.timeout.read,
            )
        except (TimeoutError, aiohttp.ClientError, HttpProcessingError, ConnectError) as exc:
            raise upstream_failure(exc, upstream.name) from exc
        try:
            upstream_time = time.perf_counter() - t0
            length = up.content_length
            sized = length is not None and "Transfer-Encoding" not in up.headers
            whole = (
                sized
                and request.method != "HEAD"
                and up.status not in (204, 304)
                and up.content.is_eof()
            )
            response: web.StreamResponse
            if whole:
                # The body came with the head: send it with the headers in one write,
                # where a streamed response costs a write for each.
                response = web.Response(status=up.status, reason=up.reason)
            else:
                response = web.StreamResponse(status=up.status, reason=up.reason)
            _copy_response_headers(up.headers, response, request_id, target.cors is not None)
            if target.cors is not None:
                for name, value in target.cors.response_headers(request.headers.get("Origin")):
                    response.headers.add(name, value)
            response.headers["X-Request-Id"] = request_id
            if whole:
                assert isinstance(response, web.Response)
                response.body = up.content.read_nowait()
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionError:
                    return response, CLIENT_GONE, 0, upstream_time
                return response, up.status, len(response.body), upstream_time
            if sized:
                response.content_length = length
            try:
                await response.prepare(request)
            except ConnectionError:
                return response, CLIENT_GONE, 0, upstream_time
            sent, status = await self._stream(request, up, response, upstream.name, request_id)
            return response, status, sent, upstream_time
        finally:
            up.release()

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
                # Headers are out; the only honest signal left is a cut connection, so
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
                if request.transport is not None:
                    request.transport.abort()
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


def _is_local(host: str) -> bool:
    return is_loopback(host.strip("[]"))


def _preflight(
    policy: CorsPolicy, origin: str, method: str, request: web.BaseRequest, request_id: str
) -> web.Response:
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
    return Origin(upstream.scheme, url.host, url.port)


def _request_id(request: web.BaseRequest) -> str:
    given = request.headers.get("X-Request-Id")
    if given and _REQUEST_ID_RE.match(given):
        return given
    return os.urandom(16).hex()


def _body_at_hand(request: web.BaseRequest, limit: int) -> bytes | None:
    """The body when it is already whole in memory (it came with the request head), or
    None when it has to be read."""
    if not request.body_exists:
        return b""
    content = request.content
    length = request.content_length
    if length is not None and length <= limit and content.is_eof():
        return content.read_nowait()
    return None


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole request body, or :class:`BodyTooLarge` as soon as it passes ``limit``."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(
            f"request body of {length} bytes is over the limit of {limit} bytes",
            limit=limit,
        )
    if not request.body_exists:
        return b""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _refuse_rest_of_body(request: web.BaseRequest, resp: web.StreamResponse) -> None:
    """Send the 413 and close the connection without reading the rest of the body.

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
