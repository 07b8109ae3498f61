"""The upstream HTTP/1.1 client (``sigproxy.upstream``) through the running proxy.

Covers: HTTPS upstreams (a trustme CA trusted through ``SSL_CERT_FILE``; an untrusted CA
and a wrong host name answered as 502 ``kind: tls``), keep-alive reuse and pooling of
upstream connections (sequential, concurrent, idle ones past ``timeout.idle``),
upstreams that close their keep-alive connections, the retry rule (one retry on a new
connection only for an idempotent request whose pooled connection died), the response
framing the proxy sends back (whole ``web.Response`` vs streamed), and the request-head
builder ``_head``; then, on ``UpstreamClient`` directly, the pools (the per-upstream cap,
its queue and ``PoolBusy``, slots never lost, idle expiry by timer, ``retain``), bytes no
request asked for, close-delimited bodies cut by a reset, and an unsolicited 101. Every
upstream is a real server on 127.0.0.1; nothing is mocked.
Connect failures and read timeouts on a fresh connection are in test_forwarding.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from sigproxy.routing import Origin
from sigproxy.upstream import (
    ConnectFailed,
    ConnectionClosed,
    PoolBusy,
    ProtocolError,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimedOut,
    _head,
)

from .conftest import RunningProxy, StartProxy, one_upstream
from .support import (
    FakeFunctionUrl,
    RawResponse,
    Recorded,
    loopback_server,
    raw_request,
    verify_sigv4,
)

AiohttpServer = Callable[..., Awaitable[TestServer]]
ERRORS = "sigproxy_upstream_errors_total"

# --------------------------------------------------------------------------- helpers


def peer_port(request: web.Request) -> int:
    """The proxy's source port for the connection this request came on."""
    assert request.transport is not None
    peer = request.transport.get_extra_info("peername")
    return int(peer[1])


@dataclass
class PortLog:
    """A FakeFunctionUrl answer that records (target, proxy source port) per request."""

    seen: list[tuple[str, int]] = field(default_factory=list)

    async def answer(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        self.seen.append((rec.raw_target, peer_port(request)))
        return web.json_response({"target": rec.raw_target, "len": len(rec.body)})

    @property
    def ports(self) -> list[int]:
        return [port for _, port in self.seen]


def upstream_errors(proxy: RunningProxy, upstream: str, kind: str) -> float:
    value = proxy.registry.get_sample_value(ERRORS, {"upstream": upstream, "kind": kind})
    return value or 0.0


def json_error(resp: RawResponse, status: int, code: str) -> dict[str, object]:
    assert resp.status == status, resp.body
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp.headers
    body: dict[str, object] = json.loads(resp.body)
    assert body["error"] == code
    assert body["request_id"] == resp.header("X-Request-Id")
    return body


def tls_and_plain(tls_port: int, plain_port: int, host: str = "localhost") -> str:
    """An https upstream ``tls`` under /tls and a plain-http upstream ``plain`` at /."""
    return (
        "admin: {port: 0}\n"
        "upstreams:\n"
        f"  - {{name: tls, url: 'https://{host}:{tls_port}', region: us-east-1, path_prefix: /tls}}\n"
        f"  - {{name: plain, url: 'http://127.0.0.1:{plain_port}', region: us-east-1}}\n"
    )


async def until_closed(port: int, data: bytes) -> bytes:
    """Send raw bytes to the proxy; everything it sends back until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


# A raw upstream whose answers are scripted per request: (connection number, request
# number on that connection, the request) -> the reply bytes, or None to close the
# connection without answering. Connections are kept open between requests.
Script = Callable[[int, int, Recorded], bytes | None]


@dataclass
class ScriptedUpstream:
    script: Script
    got: list[tuple[int, Recorded]] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    @property
    def seen(self) -> list[tuple[int, str, str]]:
        """(connection, method, target) of every request that arrived."""
        return [(conn, rec.method, rec.raw_target) for conn, rec in self.got]


def ok_reply(conn: int, n: int) -> bytes:
    body = json.dumps({"conn": conn, "n": n}).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


@contextlib.asynccontextmanager
async def scripted_upstream(script: Script) -> AsyncIterator[ScriptedUpstream]:
    up = ScriptedUpstream(script)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = up.connections
        up.connections += 1
        try:
            n = 0
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                headers = []
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers.append((name.strip(), value.strip()))
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                body = await reader.readexactly(length)
                rec = Recorded(method, target, headers, body)
                up.got.append((conn, rec))
                reply = up.script(conn, n, rec)
                n += 1
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with loopback_server(handle) as up.port:
        yield up


# ------------------------------------------------------------------------------ HTTPS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def trust(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: trustme.CA) -> None:
    """Make ``ca`` the only CA the proxy's default SSL context loads from a file (it reads
    SSL_CERT_FILE when the proxy starts)."""
    pem = tmp_path / f"ca-{id(ca)}.pem"
    ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))


async def tls_fake(
    aiohttp_server: AiohttpServer, ctx: ssl.SSLContext
) -> tuple[FakeFunctionUrl, PortLog]:
    fake = FakeFunctionUrl()
    log = PortLog()
    fake.answer = log.answer
    server = await aiohttp_server(fake.app(), ssl=ctx, access_log=None)
    assert server.port is not None
    fake.port = server.port
    return fake, log


async def test_https_upstream_trusted_through_ssl_cert_file(
    aiohttp_server: AiohttpServer,
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ca: trustme.CA,
) -> None:
    fake, log = await tls_fake(aiohttp_server, server_context(ca, "localhost", "127.0.0.1"))
    trust(monkeypatch, tmp_path, ca)
    proxy = await start_proxy(tls_and_plain(fake.port, upstream.port))

    first = await raw_request(proxy.port, "GET", "/tls/one?x=1")
    assert first.status == 200, first.body
    assert json.loads(first.body) == {"target": "/one?x=1", "len": 0}
    rec = fake.last
    assert rec.header("Host") == f"localhost:{fake.port}"
    verify_sigv4(rec, region="us-east-1")

    second = await raw_request(proxy.port, "POST", "/tls/two", body=b'{"a": 1}')
    assert second.status == 200, second.body
    assert json.loads(second.body) == {"target": "/two", "len": 8}
    assert fake.last.body == b'{"a": 1}'
    verify_sigv4(fake.last, region="us-east-1")
    # One TLS connection carried both requests.
    assert len(log.ports) == 2
    assert log.ports[0] == log.ports[1]
    assert upstream_errors(proxy, "tls", "tls") == 0


async def test_https_upstream_with_an_untrusted_ca_is_502_tls(
    aiohttp_server: AiohttpServer,
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ca: trustme.CA,
) -> None:
    fake, _ = await tls_fake(aiohttp_server, server_context(ca, "localhost", "127.0.0.1"))
    trust(monkeypatch, tmp_path, trustme.CA())  # some other CA
    proxy = await start_proxy(tls_and_plain(fake.port, upstream.port))

    resp = await raw_request(proxy.port, "GET", "/tls/x")
    body = json_error(resp, 502, "upstream_unreachable")
    assert (body["upstream"], body["kind"]) == ("tls", "tls")
    assert fake.requests == []
    assert upstream_errors(proxy, "tls", "tls") == 1

    ok = await raw_request(proxy.port, "GET", "/plain")
    assert ok.status == 200
    assert upstream.last.raw_target == "/plain"
    # And the TLS route fails the same way again (nothing half-open was pooled).
    again = await raw_request(proxy.port, "GET", "/tls/y")
    assert json_error(again, 502, "upstream_unreachable")["kind"] == "tls"
    assert upstream_errors(proxy, "tls", "tls") == 2


async def test_https_upstream_with_a_certificate_for_another_name_is_502_tls(
    aiohttp_server: AiohttpServer,
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ca: trustme.CA,
) -> None:
    fake, _ = await tls_fake(aiohttp_server, server_context(ca, "other.example"))
    trust(monkeypatch, tmp_path, ca)  # the CA is trusted: only the name is wrong
    proxy = await start_proxy(tls_and_plain(fake.port, upstream.port))

    resp = await raw_request(proxy.port, "GET", "/tls/x")
    body = json_error(resp, 502, "upstream_unreachable")
    assert (body["upstream"], body["kind"]) == ("tls", "tls")
    assert fake.requests == []
    assert upstream_errors(proxy, "tls", "tls") == 1
    ok = await raw_request(proxy.port, "GET", "/plain")
    assert ok.status == 200


async def test_https_upstream_by_ip_address_checks_the_ip_san(
    aiohttp_server: AiohttpServer,
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ca: trustme.CA,
) -> None:
    """``https://127.0.0.1:port`` is verified against the certificate's IP address."""
    good, _ = await tls_fake(aiohttp_server, server_context(ca, "127.0.0.1"))
    bad, _ = await tls_fake(aiohttp_server, server_context(ca, "localhost"))
    trust(monkeypatch, tmp_path, ca)
    proxy = await start_proxy(
        "admin: {port: 0}\n"
        "upstreams:\n"
        f"  - {{name: good, url: 'https://127.0.0.1:{good.port}', region: us-east-1, path_prefix: /good}}\n"
        f"  - {{name: bad, url: 'https://127.0.0.1:{bad.port}', region: us-east-1, path_prefix: /bad}}\n"
    )
    ok = await raw_request(proxy.port, "GET", "/good/x")
    assert ok.status == 200, ok.body
    assert good.last.header("Host") == f"127.0.0.1:{good.port}"
    verify_sigv4(good.last, region="us-east-1")
    resp = await raw_request(proxy.port, "GET", "/bad/x")
    assert json_error(resp, 502, "upstream_unreachable")["kind"] == "tls"
    assert bad.requests == []


# ------------------------------------------------------------------------- keep-alive


async def test_sequential_requests_share_one_upstream_connection(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    log = PortLog()
    upstream.answer = log.answer
    proxy = await start_proxy(one_upstream(upstream.port))
    for i in range(6):
        if i % 2:
            resp = await raw_request(proxy.port, "POST", f"/s{i}", body=b"x" * i)
        else:
            resp = await raw_request(proxy.port, "GET", f"/s{i}")
        assert resp.status == 200
        assert json.loads(resp.body) == {"target": f"/s{i}", "len": i if i % 2 else 0}
    assert [m.method for m in upstream.requests] == ["GET", "POST"] * 3
    assert len(set(log.ports)) == 1, log.seen
    for rec in upstream.requests:
        verify_sigv4(rec, region="us-east-1")


async def test_concurrent_requests_open_connections_that_are_pooled_after(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    width = 8
    log = PortLog()
    all_in = asyncio.Event()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        resp = await log.answer(request, rec)
        if rec.raw_target.startswith("/c"):
            # Hold every concurrent request until all of them are at the upstream, so
            # they are in flight together and each needs its own connection.
            if sum(t.startswith("/c") for t, _ in log.seen) == width:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), 10)
        return resp

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    first = await raw_request(proxy.port, "GET", "/warm")
    assert first.status == 200
    results = await asyncio.gather(
        *(
            raw_request(
                proxy.port, "POST" if i % 2 else "GET", f"/c{i}", body=b"b" if i % 2 else None
            )
            for i in range(width)
        )
    )
    assert [r.status for r in results] == [200] * width
    assert [json.loads(r.body)["target"] for r in results] == [f"/c{i}" for i in range(width)]
    concurrent = {port for target, port in log.seen if target.startswith("/c")}
    assert len(concurrent) == width
    # The warm connection was one of them: it was idle in the pool.
    assert log.ports[0] in concurrent

    for i in range(2 * width):
        resp = await raw_request(proxy.port, "GET", f"/after{i}")
        assert resp.status == 200
    after = [port for target, port in log.seen if target.startswith("/after")]
    # Pooled connections are reused (the most recently used one each time); no new
    # connection was opened.
    assert len(set(after)) == 1
    assert set(log.ports) == concurrent


async def test_idle_connections_past_the_keepalive_limit_are_not_reused(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    log = PortLog()
    upstream.answer = log.answer
    proxy = await start_proxy(one_upstream(upstream.port, timeout="{idle: 0.2}"))
    assert (await raw_request(proxy.port, "GET", "/1")).status == 200
    assert (await raw_request(proxy.port, "GET", "/2")).status == 200
    await asyncio.sleep(0.3)
    assert (await raw_request(proxy.port, "POST", "/3", body=b"p")).status == 200
    ports = log.ports
    assert ports[0] == ports[1]  # young enough: reused
    assert ports[2] != ports[1]  # too old: closed, a new connection instead
    assert upstream_errors(proxy, "fn", "closed") == 0


async def test_upstream_answering_connection_close_is_not_reused(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    log = PortLog()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        resp = await log.answer(request, rec)
        resp.force_close()  # Connection: close, then the server closes
        return resp

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    methods = ["GET", "POST", "POST", "GET"]
    for i, method in enumerate(methods):
        resp = await raw_request(
            proxy.port, method, f"/k{i}", body=b"{}" if method == "POST" else None
        )
        assert resp.status == 200, resp.body
        assert json.loads(resp.body)["target"] == f"/k{i}"
    assert len(set(log.ports)) == len(methods)  # a new connection each time
    assert [r.method for r in upstream.requests] == methods
    assert upstream_errors(proxy, "fn", "closed") == 0


async def test_upstream_closing_idle_keepalive_connections(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    """The upstream drops idle connections after 0.2 s; requests after that go out on a
    new connection, POST too (POST is never retried, so a dead pooled connection would
    show as a 502)."""
    fake = FakeFunctionUrl()
    log = PortLog()
    fake.answer = log.answer
    server = await aiohttp_server(fake.app(), keepalive_timeout=0.2, access_log=None)
    assert server.port is not None
    proxy = await start_proxy(one_upstream(server.port))
    steps = [("GET", None), ("POST", b"one"), ("GET", None), ("POST", b"two")]
    for i, (method, body) in enumerate(steps):
        if i:
            # Wait until the upstream has closed the idle connection (at most 2 s).
            deadline = time.monotonic() + 2
            while server.handler.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert server.handler.connections == []
            await asyncio.sleep(0.05)  # the proxy's side sees the close
        resp = await raw_request(proxy.port, method, f"/p{i}", body=body)
        assert resp.status == 200, resp.body
        assert json.loads(resp.body) == {"target": f"/p{i}", "len": len(body or b"")}
    assert len(set(log.ports)) == len(steps)
    assert [r.body for r in fake.requests] == [b"", b"one", b"", b"two"]
    assert upstream_errors(proxy, "fn", "closed") == 0


# ------------------------------------------------------------------------- retry rule


def first_only(conn: int, n: int, rec: Recorded) -> bytes | None:
    """Answer the first request on each connection; read the second and hang up."""
    return ok_reply(conn, n) if n == 0 else None


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
async def test_idempotent_request_on_a_dead_pooled_connection_is_retried_once(
    start_proxy: StartProxy, method: str
) -> None:
    async with scripted_upstream(first_only) as up:
        proxy = await start_proxy(one_upstream(up.port))
        first = await raw_request(proxy.port, "GET", "/one")
        assert first.status == 200
        assert json.loads(first.body) == {"conn": 0, "n": 0}
        body = b"data" if method == "PUT" else None
        second = await raw_request(proxy.port, method, "/two", body=body)
        assert second.status == 200, second.body
        assert json.loads(second.body) == {"conn": 1, "n": 0}
        assert up.seen == [(0, "GET", "/one"), (0, method, "/two"), (1, method, "/two")]
        assert up.connections == 2
        # The retry is the same signed request, byte for byte.
        assert up.got[1][1] == up.got[2][1]
        verify_sigv4(up.got[2][1], region="us-east-1")
        assert upstream_errors(proxy, "fn", "closed") == 0


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_request_on_a_dead_pooled_connection_is_not_retried(
    start_proxy: StartProxy, method: str
) -> None:
    async with scripted_upstream(first_only) as up:
        proxy = await start_proxy(one_upstream(up.port))
        first = await raw_request(proxy.port, "GET", "/one")
        assert first.status == 200
        second = await raw_request(proxy.port, method, "/two", body=b'{"charge": 1}')
        body = json_error(second, 502, "upstream_unreachable")
        assert (body["upstream"], body["kind"]) == ("fn", "closed")
        assert up.seen == [(0, "GET", "/one"), (0, method, "/two")]
        assert upstream_errors(proxy, "fn", "closed") == 1

        third = await raw_request(proxy.port, "GET", "/three")
        assert third.status == 200
        assert json.loads(third.body) == {"conn": 1, "n": 0}
        assert up.seen[-1] == (1, "GET", "/three")
        assert up.connections == 2


async def test_a_retry_that_also_fails_is_not_retried_again(start_proxy: StartProxy) -> None:
    """Connection 0 answers once then hangs up; every later connection hangs up at once.
    A GET on the dead pooled connection gets exactly one retry, then a 502."""

    def script(conn: int, n: int, rec: Recorded) -> bytes | None:
        return ok_reply(conn, n) if conn == 0 and n == 0 else None

    async with scripted_upstream(script) as up:
        proxy = await start_proxy(one_upstream(up.port))
        assert (await raw_request(proxy.port, "GET", "/one")).status == 200
        resp = await raw_request(proxy.port, "GET", "/two")
        assert json_error(resp, 502, "upstream_unreachable")["kind"] == "closed"
        assert up.seen == [(0, "GET", "/one"), (0, "GET", "/two"), (1, "GET", "/two")]


async def test_read_timeout_on_a_pooled_connection_is_not_retried(
    start_proxy: StartProxy,
) -> None:
    """A slow answer is not a dead connection: the GET is not sent twice."""

    def script(conn: int, n: int, rec: Recorded) -> bytes | None:
        return ok_reply(conn, n) if n == 0 else b""  # the second request: silence

    async with scripted_upstream(script) as up:
        proxy = await start_proxy(one_upstream(up.port, timeout="{read: 0.3}"))
        assert (await raw_request(proxy.port, "GET", "/one")).status == 200
        started = time.monotonic()
        resp = await raw_request(proxy.port, "GET", "/slow")
        assert time.monotonic() - started < 5
        body = json_error(resp, 504, "upstream_timeout")
        assert body["kind"] == "timeout"
        assert up.seen == [(0, "GET", "/one"), (0, "GET", "/slow")]
        # The timed-out connection was dropped, not pooled: the next request is fresh.
        ok = await raw_request(proxy.port, "GET", "/three")
        assert ok.status == 200
        assert up.seen[-1] == (1, "GET", "/three")


# ---------------------------------------------------------------------------- framing


async def test_small_complete_response_is_passed_whole(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    payload = json.dumps({"items": list(range(20)), "name": "ünïcode"}).encode()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        return web.Response(
            status=201,
            body=payload,
            headers={"Content-Type": "application/json; charset=utf-8", "X-Upstream": "yes"},
        )

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    resp = await raw_request(proxy.port, "GET", "/small", [("X-Request-Id", "req-small-1")])
    assert resp.status == 201
    assert resp.body == payload
    assert resp.header("Content-Length") == str(len(payload))
    assert resp.header("Transfer-Encoding") is None
    assert resp.header("Content-Type") == "application/json; charset=utf-8"
    assert resp.header("X-Upstream") == "yes"
    assert resp.header("X-Request-Id") == "req-small-1"
    assert len(resp.all("Content-Length")) == 1


async def test_head_answer_keeps_the_upstream_content_length_and_has_no_body(
    start_proxy: StartProxy,
) -> None:
    reply = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 1234\r\nX-Up: head\r\n\r\n"
    )

    def script(conn: int, n: int, rec: Recorded) -> bytes | None:
        return reply if rec.method == "HEAD" else ok_reply(conn, n)

    async with scripted_upstream(script) as up:
        proxy = await start_proxy(one_upstream(up.port))
        raw = await until_closed(
            proxy.port, b"HEAD /file HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = split(raw)
        assert status == 200
        assert headers["content-length"] == "1234"
        assert "transfer-encoding" not in headers
        assert headers["x-up"] == "head"
        assert body == b""
        assert up.seen == [(0, "HEAD", "/file")]
        verify_sigv4(up.got[0][1], region="us-east-1")
        # The upstream connection is still good for the next request.
        after = await raw_request(proxy.port, "GET", "/next")
        assert after.status == 200
        assert up.seen[-1] == (0, "GET", "/next")


async def test_not_modified_has_no_body(upstream: FakeFunctionUrl, start_proxy: StartProxy) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        assert request.headers["If-None-Match"] == '"v7"'
        return web.Response(status=304, headers={"ETag": '"v7"', "Cache-Control": "max-age=60"})

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    raw = await until_closed(
        proxy.port,
        b'GET /doc HTTP/1.1\r\nHost: localhost\r\nIf-None-Match: "v7"\r\nConnection: close\r\n\r\n',
    )
    status, headers, body = split(raw)
    assert status == 304
    assert headers["etag"] == '"v7"'
    assert headers["cache-control"] == "max-age=60"
    assert "transfer-encoding" not in headers
    assert body == b""


async def test_chunked_upstream_response_streams_whole_and_in_order(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    chunks = [b"first-" * 10, b"second-" * 1000, b"third"]

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
            await asyncio.sleep(0.02)
        await resp.write_eof()
        return resp

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    resp = await raw_request(proxy.port, "GET", "/stream")
    assert resp.status == 200
    assert resp.header("Transfer-Encoding") == "chunked"
    assert resp.header("Content-Length") is None
    assert resp.header("Content-Type") == "text/plain"
    assert resp.body == b"".join(chunks)
    # The chunked response was read to its end, so its connection went back to the pool.
    again = await raw_request(proxy.port, "GET", "/stream")
    assert again.body == b"".join(chunks)


async def test_one_connection_carries_responses_of_every_framing_in_turn(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    """A kept-alive connection keeps its response parser between responses: chunked,
    sized, empty, HEAD (which needs other parser settings) and sized again, in turn on
    one connection, each arrive whole and framed as sent."""
    ports: list[int] = []

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        ports.append(peer_port(request))
        kind = rec.raw_target.strip("/").split("-")[0]
        if kind == "chunked":
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await resp.write(part)
            await resp.write_eof()
            return resp
        if kind == "empty":
            return web.Response(status=204)
        if kind == "head":
            return web.Response(headers={"Content-Length": "77"})
        return web.Response(text=f"sized {rec.raw_target}")

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    for round_ in range(2):
        resp = await raw_request(proxy.port, "GET", f"/chunked-{round_}")
        assert (resp.status, resp.body) == (200, b"one,two,three")
        assert resp.header("Transfer-Encoding") == "chunked"
        resp = await raw_request(proxy.port, "GET", f"/sized-{round_}")
        assert (resp.status, resp.body) == (200, f"sized /sized-{round_}".encode())
        resp = await raw_request(proxy.port, "DELETE", f"/empty-{round_}")
        assert (resp.status, resp.body) == (204, b"")
        raw = await until_closed(
            proxy.port,
            f"HEAD /head-{round_} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode(),
        )
        status, headers, body = split(raw)
        assert (status, headers["content-length"], body) == (200, "77", b"")
        resp = await raw_request(proxy.port, "POST", f"/sized-again-{round_}", body=b"x")
        assert (resp.status, resp.body) == (200, f"sized /sized-again-{round_}".encode())
    assert len(ports) == 10
    assert len(set(ports)) == 1, ports


async def test_large_response_arrives_byte_identical(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    data = os.urandom(5 * 1024 * 1024)

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        return web.Response(body=data, content_type="application/octet-stream")

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    resp = await raw_request(proxy.port, "GET", "/big")
    assert resp.status == 200
    assert resp.header("Content-Length") == str(len(data))
    assert resp.header("Transfer-Encoding") is None
    assert hashlib.sha256(resp.body).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_large_request_body_arrives_byte_identical_and_signed(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    """Bodies over 64 KiB are written after the head in a second write."""
    data = os.urandom(3 * 1024 * 1024 + 7)
    proxy = await start_proxy(one_upstream(upstream.port))
    resp = await raw_request(proxy.port, "PUT", "/upload", body=data)
    assert resp.status == 200
    rec = upstream.last
    assert rec.header("Content-Length") == str(len(data))
    assert hashlib.sha256(rec.body).digest() == hashlib.sha256(data).digest()
    verify_sigv4(rec, region="us-east-1")


# ------------------------------------------------------------------------ _head bytes


def test_head_bytes_for_a_get() -> None:
    head = _head("GET", "/p/a%20b?x=1&y=", [("Host", "h:1"), ("X-A", "1"), ("x-a", "2")], b"")
    assert head == b"GET /p/a%20b?x=1&y= HTTP/1.1\r\nHost: h:1\r\nX-A: 1\r\nx-a: 2\r\n\r\n"


def test_head_bytes_keep_utf8_values() -> None:
    head = _head("GET", "/", [("X-Name", "Zoë")], b"")
    assert head == "GET / HTTP/1.1\r\nX-Name: Zoë\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("method", "body", "length"),
    [
        ("POST", b"abc", "3"),
        ("POST", b"", "0"),
        ("PUT", b"", "0"),
        ("PATCH", b"", "0"),
        ("GET", b"xy", "2"),
        ("DELETE", b"z", "1"),
        ("GET", b"", None),
        ("HEAD", b"", None),
        ("OPTIONS", b"", None),
        ("TRACE", b"", None),
        ("CONNECT", b"", None),
        ("DELETE", b"", None),
    ],
)
def test_head_content_length_rule(method: str, body: bytes, length: str | None) -> None:
    head = _head(method, "/t", [("Host", "h")], body)
    expected = f"{method} /t HTTP/1.1\r\nHost: h\r\n"
    if length is not None:
        expected += f"Content-Length: {length}\r\n"
    assert head == (expected + "\r\n").encode()


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/", [("X-Evil", "a\r\nX-Injected: 1")]),
        ("/", [("X-Evil", "a\nX-Injected: 1")]),
        ("/", [("X-Evil", "a\rb")]),
        ("/", [("X-Evil\r\nX-Injected", "1")]),
        ("/", [("Host", "h"), ("X-Evil", "\r\n\r\nGET /smuggled HTTP/1.1")]),
        ("/a HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /b", [("Host", "h")]),
    ],
)
def test_head_refuses_cr_and_lf(target: str, headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match="newline or carriage return"):
        _head("GET", target, headers, b"")


# ------------------------------------ pools: cap, idle timer, retain, stale bytes, framing
#
# UpstreamClient driven directly against raw loopback servers: connections capped per
# Origin (a queue of waiters, PoolBusy), no slot lost on any path, idle connections closed
# by a timer, pools dropped by retain(), bytes no request asked for never delivered,
# close-delimited bodies cut by a reset, and an unsolicited 101. Every wait is bounded.


@dataclass
class RawUpstream:
    """A raw loopback server running ``handle(up, conn, reader, writer)`` for each
    connection (numbered from 0). ``targets`` holds (connection, target) of each request;
    ``closed`` the loop time at which a connection's client side was seen closing."""

    port: int = 0
    connections: int = 0
    targets: list[tuple[int, str]] = field(default_factory=list)
    closed: dict[int, float] = field(default_factory=dict)

    async def next_target(self, conn: int, reader: asyncio.StreamReader) -> str | None:
        """The next request's target (these requests have no body); None, noted in
        ``closed``, once the client closes the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed[conn] = asyncio.get_running_loop().time()
            return None
        target = head.split(b" ", 2)[1].decode()
        self.targets.append((conn, target))
        return target

    async def wait_closed(self, conn: int) -> float:
        """When the client closed connection ``conn`` (waiting at most 3 s for it)."""
        async with asyncio.timeout(3):
            while conn not in self.closed:
                await asyncio.sleep(0.005)
        return self.closed[conn]


Handle = Callable[[RawUpstream, int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(handle: Handle) -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    tasks: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        writers.append(writer)
        conn = up.connections
        up.connections += 1
        try:
            await handle(up, conn, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass  # cancelled: a handler left waiting by a failed test
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await server.wait_closed()


def sized(text: str) -> bytes:
    body = text.encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def answer_all(
    up: RawUpstream, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer every request at once with ``<connection> <target>``."""
    while (target := await up.next_target(conn, reader)) is not None:
        writer.write(sized(f"{conn} {target}"))


def gated(gates: dict[str, asyncio.Event]) -> Handle:
    """Like answer_all, but a request whose target has a gate is answered once it is set."""

    async def handle(
        up: RawUpstream, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (target := await up.next_target(conn, reader)) is not None:
            if target in gates:
                await gates[target].wait()
            writer.write(sized(f"{conn} {target}"))

    return handle


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream_client = UpstreamClient()
    yield upstream_client
    await upstream_client.close()


def origin_of(up: RawUpstream, **settings: Any) -> Origin:
    return Origin("http", "127.0.0.1", up.port, **settings)


async def send(
    client: UpstreamClient,
    origin: Origin,
    target: str,
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 5.0,
) -> UpstreamResponse:
    return await client.request(
        origin,
        "GET",
        target,
        [("Host", "upstream.test")],
        b"",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


async def fetch(client: UpstreamClient, origin: Origin, target: str) -> str:
    """GET ``target``: the whole body as text; the response is released."""
    resp = await send(client, origin, target)
    try:
        assert resp.status == 200
        return (await asyncio.wait_for(resp.read(), 5)).decode()
    finally:
        resp.release()


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(3):
        while not predicate():
            await asyncio.sleep(0.005)


def pool_of(client: UpstreamClient, origin: Origin) -> Any:
    return client._pools[origin]


def waiting(client: UpstreamClient, origin: Origin) -> int:
    return len(pool_of(client, origin).waiters)


def assert_settled(client: UpstreamClient, origin: Origin) -> None:
    """Nothing in use or waiting: the pool counts exactly its open idle connections."""
    pool = pool_of(client, origin)
    assert not pool.waiters
    assert pool.open == sum(c.is_connected() for c in pool.idle), (pool.open, pool.idle)


async def test_pool_cap_queues_requests_and_hands_released_connections_over_in_order(
    client: UpstreamClient,
) -> None:
    gates = {"/a": asyncio.Event(), "/b": asyncio.Event()}
    async with raw_upstream(gated(gates)) as up:
        origin = origin_of(up, name="fn", max_connections=2)
        a = asyncio.create_task(send(client, origin, "/a"))
        b = asyncio.create_task(send(client, origin, "/b"))
        await until(lambda: len(up.targets) == 2)
        third = asyncio.create_task(fetch(client, origin, "/third"))
        await until(lambda: waiting(client, origin) == 1)
        fourth = asyncio.create_task(fetch(client, origin, "/fourth"))
        await until(lambda: waiting(client, origin) == 2)
        await asyncio.sleep(0.1)
        assert not third.done() and not fourth.done()
        assert up.connections == 2  # no third connection was opened

        gates["/a"].set()
        resp_a = await asyncio.wait_for(a, 5)
        conn_a = (await resp_a.read()).split()[0].decode()
        resp_a.release()  # handed to the oldest waiter
        assert await asyncio.wait_for(third, 5) == f"{conn_a} /third"
        # /third was released in its turn, to the next waiter.
        assert await asyncio.wait_for(fourth, 5) == f"{conn_a} /fourth"

        gates["/b"].set()
        resp_b = await asyncio.wait_for(b, 5)
        await resp_b.read()
        resp_b.release()
        assert up.connections == 2
        assert_settled(client, origin)
        assert pool_of(client, origin).open == 2


async def test_pool_busy_when_the_queue_is_full_or_the_wait_too_long(
    client: UpstreamClient,
) -> None:
    gates = {"/a": asyncio.Event(), "/b": asyncio.Event()}
    async with raw_upstream(gated(gates)) as up:
        origin = origin_of(up, max_connections=2)
        held = [asyncio.create_task(send(client, origin, t)) for t in gates]
        await until(lambda: len(up.targets) == 2)
        waiters = [asyncio.create_task(fetch(client, origin, f"/w{i}")) for i in range(2)]
        await until(lambda: waiting(client, origin) == 2)

        started = time.monotonic()
        with pytest.raises(PoolBusy) as full:
            await send(client, origin, "/over")
        assert full.value.why == "queue_full"
        assert time.monotonic() - started < 0.5  # at once
        assert waiting(client, origin) == 2

        # Waiters whose client went away leave the queue.
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert waiting(client, origin) == 0
        assert pool_of(client, origin).open == 2

        started = time.monotonic()
        with pytest.raises(PoolBusy) as slow:
            await send(client, origin, "/slow", connect_timeout=0.2)
        assert slow.value.why == "wait_timeout"
        assert 0.15 < time.monotonic() - started < 2
        assert waiting(client, origin) == 0

        for gate in gates.values():
            gate.set()
        for task in held:
            resp = await asyncio.wait_for(task, 5)
            await resp.read()
            resp.release()
        assert_settled(client, origin)
        assert await fetch(client, origin, "/after") == "1 /after"
        assert up.connections == 2
        assert [t for _, t in up.targets] == ["/a", "/b", "/after"]


async def test_a_closed_connection_frees_its_slot_for_a_waiter(client: UpstreamClient) -> None:
    """A waiter connects anew when an in-use connection is closed (its response given up
    with the body unread) rather than released whole."""

    async def handle(
        up: RawUpstream, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (target := await up.next_target(conn, reader)) is not None:
            if target == "/partial":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly some")
            else:
                writer.write(sized(f"{conn} {target}"))

    async with raw_upstream(handle) as up:
        origin = origin_of(up, max_connections=1)
        partial = await send(client, origin, "/partial")
        waiter = asyncio.create_task(fetch(client, origin, "/next"))
        await until(lambda: waiting(client, origin) == 1)
        partial.release()  # closed, its slot handed to the waiter
        assert await asyncio.wait_for(waiter, 5) == "1 /next"
        await up.wait_closed(0)
        assert_settled(client, origin)
        assert pool_of(client, origin).open == 1


async def test_no_slot_is_lost_on_any_path(client: UpstreamClient) -> None:
    """Failed connects, errors and read timeouts in the exchange, cancellation at each
    step, a response released after its connection was reset (and released twice),
    waiters cancelled in the very tick a connection or a slot is handed to them: after
    each the pool counts exactly its open idle connections, and it still serves
    max_connections requests at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]  # nothing listens there once it is closed
    dead = Origin("http", "127.0.0.1", dead_port, max_connections=1)
    for _ in range(3):
        with pytest.raises(ConnectFailed, match=f"connection refused by 127.0.0.1:{dead_port}"):
            await send(client, dead, "/x")
    assert pool_of(client, dead).open == 0

    async def handle(
        up: RawUpstream, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (target := await up.next_target(conn, reader)) is not None:
            if target == "/hangup":
                return
            if target == "/silent":
                continue
            if target == "/partial":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
                continue
            if target == "/reset":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
                await writer.drain()
                await asyncio.sleep(0.05)
                reset(writer)
                return
            if target.startswith("/slow"):
                await asyncio.sleep(0.02)
            writer.write(sized(f"{conn} {target}"))

    async with raw_upstream(handle) as up:
        origin = origin_of(up, max_connections=2)
        with pytest.raises(ConnectionClosed):
            await send(client, origin, "/hangup")
        assert_settled(client, origin)
        with pytest.raises(UpstreamTimedOut, match=r"within 0\.1 seconds"):
            await send(client, origin, "/silent", read_timeout=0.1)
        assert_settled(client, origin)

        # Cancelled before, while and after connecting, and waiting for the head.
        assert await fetch(client, origin, "/warm") == "2 /warm"
        for ticks in range(12):
            task = asyncio.create_task(fetch(client, origin, f"/slow{ticks}"))
            for _ in range(ticks):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert_settled(client, origin)

        cut = await send(client, origin, "/reset")
        with pytest.raises(ConnectionClosed, match="cut the response body short"):
            await asyncio.wait_for(cut.read(), 5)
        assert_settled(client, origin)  # the reset freed its slot...
        cut.release()
        cut.release()
        assert_settled(client, origin)  # ...and releasing did not free it again

        # Waiters gone in the very tick a connection, then a slot, is handed to them.
        partial = await send(client, origin, "/partial")
        whole = await send(client, origin, "/slow-whole")
        await whole.read()
        waiter = asyncio.create_task(fetch(client, origin, "/never"))
        await until(lambda: waiting(client, origin) == 1)
        whole.release()  # handed to the waiter...
        waiter.cancel()  # ...gone before it runs: the connection is pooled instead
        await asyncio.gather(waiter, return_exceptions=True)
        assert len(pool_of(client, origin).idle) == 1
        other = await send(client, origin, "/slow-other")  # takes it
        await other.read()
        waiter = asyncio.create_task(fetch(client, origin, "/never"))
        await until(lambda: waiting(client, origin) == 1)
        partial.release()  # closed, its slot handed to the waiter...
        waiter.cancel()  # ...gone before it runs: the slot is freed
        await asyncio.gather(waiter, return_exceptions=True)
        assert pool_of(client, origin).open == 1
        other.release()
        assert_settled(client, origin)
        assert "/never" not in [t for _, t in up.targets]

        # Both slots are there: two requests at once, neither waits.
        gates = {"/p1": asyncio.Event(), "/p2": asyncio.Event()}
        both = [asyncio.create_task(send(client, origin, t, connect_timeout=0.5)) for t in gates]
        await until(lambda: {"/p1", "/p2"} <= {t for _, t in up.targets})
        for resp in await asyncio.wait_for(asyncio.gather(*both), 5):
            await resp.read()
            resp.release()
        assert_settled(client, origin)
        assert pool_of(client, origin).open == 2


async def test_idle_connections_are_closed_by_a_timer(client: UpstreamClient) -> None:
    """Each idle connection is closed idle_timeout after its last use, with no request
    coming to notice."""
    loop = asyncio.get_running_loop()
    gates = {"/a": asyncio.Event(), "/b": asyncio.Event()}
    async with raw_upstream(gated(gates)) as up:
        origin = origin_of(up, idle_timeout=0.3)
        assert await fetch(client, origin, "/one") == "0 /one"
        await asyncio.sleep(0.2)
        last_use = loop.time()  # the connection is pooled again after this
        assert await fetch(client, origin, "/two") == "0 /two"  # younger than 0.3 s
        closed = await up.wait_closed(0)
        # 0.3 s after the last use, not the first; the upper bound only catches "never"
        # (a loaded machine may run the timer late, never early).
        assert 0.29 <= closed - last_use < 5
        assert pool_of(client, origin).open == 0
        assert not pool_of(client, origin).idle

        # Two connections pooled 0.15 s apart are closed 0.15 s apart.
        held = [asyncio.create_task(send(client, origin, t)) for t in gates]
        await until(lambda: len(up.targets) == 4)
        released = []
        for target, task in zip(gates, held, strict=True):
            gates[target].set()
            resp = await asyncio.wait_for(task, 5)
            await resp.read()
            released.append(loop.time())  # pooled at this time or after
            resp.release()
            await asyncio.sleep(0.15)
        # Which of the two connections carried /a is up to the pool: the one released
        # first closes first.
        first, second = sorted([await up.wait_closed(1), await up.wait_closed(2)])
        assert 0.29 <= first - released[0] < 5
        assert 0.29 <= second - released[1] < 5  # timed from its own release
        assert pool_of(client, origin).open == 0


async def test_retain_drops_the_pools_of_origins_no_longer_listed(
    client: UpstreamClient,
) -> None:
    gates = {"/held": asyncio.Event()}
    async with raw_upstream(gated(gates)) as up:
        # Two upstreams on one server: a pool each, told apart by name.
        a = origin_of(up, name="a", max_connections=2)
        b = origin_of(up, name="b")
        held = asyncio.create_task(send(client, a, "/held"))  # connection 0, in use
        await until(lambda: len(up.targets) == 1)
        assert await fetch(client, a, "/a1") == "1 /a1"  # connection 1, idle
        assert await fetch(client, b, "/b1") == "2 /b1"  # connection 2, idle

        dropped = asyncio.get_running_loop().time()
        client.retain(iter([b]))
        assert await up.wait_closed(1) - dropped < 0.5  # idle: closed at once
        assert 0 not in up.closed
        gates["/held"].set()
        resp = await asyncio.wait_for(held, 5)
        assert await resp.read() == b"0 /held"
        resp.release()
        await up.wait_closed(0)  # in use: closed when released, not pooled

        assert await fetch(client, b, "/b2") == "2 /b2"  # b's pool is untouched
        assert 2 not in up.closed
        assert await fetch(client, a, "/a2") == "3 /a2"  # a fresh pool for a


async def test_requests_waiting_on_a_dropped_pool_still_complete(
    client: UpstreamClient,
) -> None:
    gates = {"/held": asyncio.Event()}
    async with raw_upstream(gated(gates)) as up:
        a = origin_of(up, name="a", max_connections=1)
        held = asyncio.create_task(send(client, a, "/held"))
        await until(lambda: len(up.targets) == 1)
        waiter = asyncio.create_task(fetch(client, a, "/waiting"))
        await until(lambda: waiting(client, a) == 1)
        pool = pool_of(client, a)
        client.retain([])
        gates["/held"].set()
        resp = await asyncio.wait_for(held, 5)
        await resp.read()
        resp.release()  # to the waiter, on the same connection
        assert await asyncio.wait_for(waiter, 5) == "0 /waiting"
        await up.wait_closed(0)  # and closed once the waiter released it
        assert pool.open == 0
        assert not pool.idle


STALE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"


@pytest.mark.parametrize(
    "when",
    [
        "in the same write as the response",
        "after the response, before its release",
        "while idle",
        "whole, while idle",
    ],
)
async def test_bytes_no_request_asked_for_close_the_connection(
    client: UpstreamClient, when: str
) -> None:
    """A second response, or the start of one, sent after a complete response is never
    taken for the next request's answer: that connection is closed and the next request
    gets its own, on a new connection."""
    cut = len(STALE) if when.startswith("whole") else 20  # mid-header

    async def handle(
        up: RawUpstream, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (target := await up.next_target(conn, reader)) is not None:
            if target == "/one":
                if when.startswith("in the same"):
                    writer.write(sized(f"{conn} {target}") + STALE[:cut])
                else:
                    writer.write(sized(f"{conn} {target}"))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(STALE[:cut])
            elif conn == 0:  # the rest of the stray response, then the answer
                writer.write(STALE[cut:] + sized(f"{conn} {target}"))
            else:
                writer.write(sized(f"{conn} {target}"))

    async with raw_upstream(handle) as up:
        origin = origin_of(up)
        resp = await send(client, origin, "/one")
        assert await asyncio.wait_for(resp.read(), 5) == b"0 /one"
        if when.startswith("after"):
            await asyncio.sleep(0.15)  # the stray bytes arrive before the release
        resp.release()
        await asyncio.sleep(0.15)
        assert await fetch(client, origin, "/two") == "1 /two"
        await up.wait_closed(0)
        assert up.targets == [(0, "/one"), (1, "/two")]
        assert_settled(client, origin)


async def test_bytes_after_a_complete_response_never_reach_the_next_client(
    start_proxy: StartProxy,
) -> None:
    """Through the proxy: the start of a second response after the first one, and its
    rest sent on the next request, never reach a client."""

    def script(conn: int, n: int, rec: Recorded) -> bytes | None:
        if conn == 0 and n == 0:
            return ok_reply(conn, n) + STALE[:20]
        if conn == 0:
            return STALE[20:] + ok_reply(conn, n)
        return ok_reply(conn, n)

    async with scripted_upstream(script) as up:
        proxy = await start_proxy(one_upstream(up.port))
        first = await raw_request(proxy.port, "GET", "/one")
        assert json.loads(first.body) == {"conn": 0, "n": 0}
        second = await raw_request(proxy.port, "GET", "/two")
        assert second.status == 200, second.body
        assert json.loads(second.body) == {"conn": 1, "n": 0}
        assert up.seen == [(0, "GET", "/one"), (1, "GET", "/two")]


@pytest.mark.parametrize("ending", ["reset", "fin"])
async def test_close_delimited_body_ended_by_a_reset_is_an_error(
    client: UpstreamClient, ending: str
) -> None:
    """A body without Content-Length or chunking ends when the connection does: a FIN
    ends it whole, an RST (SO_LINGER 0) cuts it short, and reading it raises."""
    whole = b"first part, second part"

    async def handle(
        up: RawUpstream, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await up.next_target(conn, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + whole[:12])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(whole[12:])
        await writer.drain()
        await asyncio.sleep(0.1)
        if ending == "reset":
            reset(writer)
        # else: a FIN, as raw_upstream closes the writer

    async with raw_upstream(handle) as up:
        origin = origin_of(up)
        resp = await send(client, origin, "/body")
        assert resp.content_length is None
        assert "Transfer-Encoding" not in resp.headers
        got = b""
        try:
            async with asyncio.timeout(5):
                while chunk := await resp.read_chunk():
                    got += chunk
        except ConnectionClosed:
            outcome = "cut short"
        else:
            outcome = "whole"
        finally:
            resp.release()
        if ending == "fin":
            assert (outcome, got) == ("whole", whole)
        else:
            assert outcome == "cut short"
            assert whole.startswith(got)
        assert_settled(client, origin)


async def test_unsolicited_101_is_a_bad_message_and_its_connection_is_aborted(
    client: UpstreamClient,
) -> None:
    async def handle(
        up: RawUpstream, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await up.next_target(conn, reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n\x81\x05hello"
        )
        await up.next_target(conn, reader)  # until the client closes

    async with raw_upstream(handle) as up:
        origin = origin_of(up)
        with pytest.raises(ProtocolError, match="unsolicited 101 Switching Protocols"):
            await send(client, origin, "/ws")
        await up.wait_closed(0)
        assert_settled(client, origin)
        assert pool_of(client, origin).open == 0


# --- Happy Eyeballs ----------------------------------------------------------------------


async def test_an_address_that_drops_connections_falls_back_to_the_next_in_250_ms() -> None:
    """RFC 8305: a host with two addresses whose first drops connection attempts (a
    broken IPv6 route, say) is reached on the second after 250 ms, not after the whole
    connect timeout. The dropping address is a real listener whose accept queue is full,
    so the kernel ignores further SYNs."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(blackhole.getsockname())
        fillers.append(filler)
    loop = asyncio.get_running_loop()
    probe = socket.socket()
    probe.setblocking(False)
    try:
        # The premise: a connection to the first address now hangs.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.sock_connect(probe, blackhole.getsockname()), 1.0)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        good = await asyncio.start_server(answer, "127.0.0.1", 0)
        good_port = good.sockets[0].getsockname()[1]

        async def two_addresses(host: str, port: int) -> list[Any]:
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", blackhole.getsockname()),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", good_port)),
            ]

        client = UpstreamClient(resolve=two_addresses)
        try:
            started = loop.time()
            resp = await client.request(
                Origin("http", "dual.example", 80),
                "GET",
                "/",
                [("Host", "dual.example")],
                b"",
                connect_timeout=10,
                read_timeout=5,
            )
            assert resp.status == 200
            assert await resp.read() == b"ok"
            resp.release()
            assert loop.time() - started < 5  # far from the 10 s a sequential try takes
        finally:
            await client.close()
            good.close()
            await good.wait_closed()
    finally:
        for sock in (probe, blackhole, *fillers):
            sock.close()
