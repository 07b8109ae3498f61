"""Header rules, response streaming, limits and failure paths of the proxy."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket

import aiohttp
import pytest
from aiohttp import web

from .conftest import StartProxy, one_upstream
from .support import FakeFunctionUrl, Recorded, raw_request, read_response, verify_sigv4


async def test_request_header_rules(upstream: FakeFunctionUrl, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(one_upstream(upstream.port))
    headers = [
        ("Authorization", "Bearer client-token"),
        ("X-Amz-Date", "20000101T000000Z"),
        ("X-Amz-Security-Token", "client-supplied-token"),
        ("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"),
        ("x-amz-target", "Other.Op"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Upgrade", "websocket"),
        ("X-Hop", "named-in-connection"),
        ("Connection", "X-Hop"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-Host", "spoofed.example"),
        ("Cookie", "session=abc; theme=dark"),
        ("User-Agent", "curl/8.5.0"),
        ("Accept", "application/json"),
        ("X-Custom", "kept"),
        ("X-Custom", "twice"),
        ("X-Request-Id", "req-123"),
    ]
    resp = await raw_request(proxy.port, "POST", "/p", headers, b"{}", host="localhost:8080")
    assert resp.status == 200
    assert resp.header("X-Request-Id") == "req-123"
    rec = upstream.last
    names = {k.lower() for k, _ in rec.headers}
    for gone in (
        "keep-alive",
        "te",
        "proxy-authorization",
        "upgrade",
        "x-hop",
        "x-amz-target",
        "connection",
        "accept-encoding",
        "transfer-encoding",
    ):
        assert gone not in names, gone
    assert rec.all("Authorization") != ["Bearer client-token"]
    assert len(rec.all("Authorization")) == 1
    assert rec.header("X-Amz-Date") != "20000101T000000Z"
    assert rec.all("X-Amz-Security-Token") == [verify_token()]
    assert rec.header("Host") == f"127.0.0.1:{upstream.port}"
    assert rec.header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    assert rec.header("X-Forwarded-Proto") == "http"
    assert rec.header("X-Forwarded-Host") == "localhost:8080"
    assert rec.header("X-Request-Id") == "req-123"
    assert rec.header("Cookie") == "session=abc; theme=dark"
    assert rec.header("User-Agent") == "curl/8.5.0"
    assert rec.header("Accept") == "application/json"
    assert rec.all("X-Custom") == ["kept", "twice"]
    verify_sigv4(rec, region="us-east-1")


def verify_token() -> str:
    from .support import SESSION_TOKEN

    return SESSION_TOKEN


async def test_auth_none_forwards_unsigned(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(one_upstream(upstream.port, auth="none"))
    resp = await raw_request(
        proxy.port, "GET", "/open", [("Authorization", "Bearer app-token"), ("X-Amz-Meta", "m")]
    )
    assert resp.status == 200
    rec = upstream.last
    assert rec.all("Authorization") == ["Bearer app-token"]
    assert rec.header("X-Amz-Date") is None
    assert rec.header("X-Amz-Security-Token") is None
    assert rec.header("X-Amz-Meta") == "m"


async def test_generated_request_id(upstream: FakeFunctionUrl, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(one_upstream(upstream.port))
    resp = await raw_request(proxy.port, "GET", "/", [("X-Request-Id", "bad id with spaces")])
    rid = resp.header("X-Request-Id")
    assert rid and rid != "bad id with spaces" and len(rid) == 32
    assert upstream.last.header("X-Request-Id") == rid


async def test_response_headers_and_cookies(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        resp = web.Response(status=201, body=b"created", content_type="text/plain")
        resp.headers.add("Set-Cookie", "a=1; Path=/; HttpOnly")
        resp.headers.add("Set-Cookie", "b=2; Path=/; Secure")
        resp.headers["X-Up-Hop"] = "secret-hop"
        resp.headers["Connection"] = "X-Up-Hop"
        resp.headers["Keep-Alive"] = "timeout=1"
        resp.headers["X-Function"] = "orders"
        return resp

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    resp = await raw_request(proxy.port, "GET", "/")
    assert resp.status == 201
    assert resp.body == b"created"
    assert resp.all("Set-Cookie") == ["a=1; Path=/; HttpOnly", "b=2; Path=/; Secure"]
    assert resp.header("X-Up-Hop") is None
    assert resp.header("Keep-Alive") is None
    assert resp.header("X-Function") == "orders"
    assert resp.header("Content-Length") == "7"


async def test_no_decompression_and_no_added_accept_encoding(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    payload = gzip.compress(b'{"big": "' + b"x" * 5000 + b'"}')

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        return web.Response(
            body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    resp = await raw_request(proxy.port, "GET", "/")
    assert upstream.last.header("Accept-Encoding") is None
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.body == payload
    await raw_request(proxy.port, "GET", "/", [("Accept-Encoding", "gzip, br")])
    assert upstream.last.header("Accept-Encoding") == "gzip, br"


async def test_redirects_are_passed_not_followed(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.raw_target == "/start":
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        return web.Response(text="followed")

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    resp = await raw_request(proxy.port, "GET", "/start")
    assert resp.status == 302
    assert resp.header("Location") == "/elsewhere"
    assert [r.raw_target for r in upstream.requests] == ["/start"]


async def test_no_route_lists_prefixes(
    upstream: FakeFunctionUrl, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    yaml_text = (
        "upstreams:\n"
        f"  - {{name: a, url: 'http://127.0.0.1:{upstream.port}', region: us-east-1, path_prefix: /orders}}\n"
        f"  - {{name: b, url: 'http://127.0.0.1:{upstream.port}', region: us-east-1, path_prefix: /users}}\n"
    )
    proxy = await start_proxy(yaml_text)
    for target in ("/ordersx", "/", "/orders/../admin", "/orders%2Fx"):
        resp = await raw_request(proxy.port, "GET", target)
        assert resp.status == 404, target
        body = json.loads(resp.body)
        assert body["error"] == "no_route"
        assert body["prefixes"] == ["/orders", "/users"]
        assert body["request_id"] == resp.header("X-Request-Id")
        # The access log counts the bytes of answers the proxy makes itself.
        assert f"{body['request_id']} none GET " in caplog.text
        assert f" 404 in=0 out={len(resp.body)} " in caplog.text
    assert upstream.requests == []


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_limit(
    upstream: FakeFunctionUrl, start_proxy: StartProxy, chunked: bool
) -> None:
    proxy = await start_proxy(one_upstream(upstream.port, max_body_bytes=1000))
    ok = await raw_request(proxy.port, "POST", "/", body=b"a" * 1000)
    assert ok.status == 200
    big = b"b" * 5000
    if chunked:
        resp = await raw_request(proxy.port, "POST", "/", chunked_body=[big[:800], big[800:]])
    else:
        resp = await raw_request(proxy.port, "POST", "/", body=big)
    assert resp.status == 413
    body = json.loads(resp.body)
    assert body["error"] == "body_too_large"
    assert body["limit"] == 1000
    assert resp.header("Connection") == "close"
    assert len(upstream.requests) == 1
    again = await raw_request(proxy.port, "GET", "/")
    assert again.status == 200


async def test_oversized_content_length_is_refused_before_the_body(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    """A 10 GB Content-Length is answered at once: the proxy does not wait for the body."""
    proxy = await start_proxy(one_upstream(upstream.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000000\r\n\r\n" + b"x" * 1000
    )
    await writer.drain()
    resp = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert resp.status == 413
    assert json.loads(resp.body)["limit"] == 6291456


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_upstream_down_is_502(start_proxy: StartProxy) -> None:
    port = closed_port()
    proxy = await start_proxy(one_upstream(port))
    resp = await raw_request(proxy.port, "GET", "/")
    assert resp.status == 502
    body = json.loads(resp.body)
    assert body["error"] == "upstream_unreachable"
    assert body["upstream"] == "fn"
    assert body["kind"] == "connect"
    assert body["detail"] == f"connection refused by 127.0.0.1:{port}"  # the cause, in words
    assert "Traceback" not in resp.body.decode()


async def test_upstream_timeout_is_504_and_proxy_keeps_serving(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.raw_target == "/slow":
            await asyncio.sleep(5)
        return web.json_response({"ok": True})

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port, timeout="{read: 0.3}"))
    resp = await raw_request(proxy.port, "GET", "/slow")
    assert resp.status == 504
    body = json.loads(resp.body)
    assert (body["error"], body["upstream"], body["kind"]) == ("upstream_timeout", "fn", "timeout")
    assert body["detail"] == f"no answer from 127.0.0.1:{upstream.port} within 0.3 seconds"
    fast = await raw_request(proxy.port, "GET", "/fast")
    assert fast.status == 200


async def test_upstream_garbage_is_502(start_proxy: StartProxy) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(one_upstream(port))
        resp = await raw_request(proxy.port, "GET", "/")
        assert resp.status == 502
        assert json.loads(resp.body)["upstream"] == "fn"
    finally:
        server.close()
        await server.wait_closed()


async def test_first_chunk_arrives_before_upstream_finishes(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    """A RESPONSE_STREAM function: the client sees event 1 while the function still runs.
    The upstream only sends the rest after the client has read the first chunk, so a
    proxy that buffered would never deliver it (and the wait below would time out)."""
    client_got_first = asyncio.Event()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await asyncio.wait_for(client_got_first.wait(), 20)
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/events") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert first == b"data: one\n\n"
        client_got_first.set()
        rest = await asyncio.wait_for(resp.content.read(), 10)
        assert rest == b"data: two\n\n"


async def test_client_gone_cancels_upstream_request(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    """A client that disconnects while the function is still working: the upstream
    request is cancelled rather than left running."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="late")

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /long HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(started.wait(), 10)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 10)


async def test_client_gone_mid_stream_stops_upstream(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    stopped = asyncio.Event()
    written = 0

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        nonlocal written
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for _ in range(2000):  # bounded: at most ~128 MiB
                await resp.write(b"z" * 65536)
                written += 65536
                await asyncio.sleep(0.001)
        except (ConnectionError, asyncio.CancelledError):
            stopped.set()
            raise
        return resp

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    await reader.readexactly(200_000)
    writer.close()
    await asyncio.wait_for(stopped.wait(), 10)
    assert written < 2000 * 65536


async def test_upstream_dies_mid_stream_cuts_client_connection(
    start_proxy: StartProxy,
) -> None:
    """Headers are already sent when the upstream dies: the client must see a broken
    response, never a short body that looks complete."""

    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(dying, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(one_upstream(port))
        async with aiohttp.ClientSession() as session:
            with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
                async with session.get(proxy.url + "/") as resp:
                    assert resp.status == 200
                    await resp.read()
        # Still serving: a second request gets the same cut-short answer, over a raw
        # socket: the connection is reset, not closed as if the body were whole.
        with pytest.raises(ConnectionResetError):
            await raw_request(proxy.port, "GET", "/")
    finally:
        server.close()
        await server.wait_closed()


async def test_expect_continue(upstream: FakeFunctionUrl, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(one_upstream(upstream.port, max_body_bytes=1000))
    # Within the limit: 100 Continue, then the body is read, signed and forwarded.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /ok HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    resp = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert resp.status == 200
    assert upstream.last.body == b"hello"
    verify_sigv4(upstream.last, region="us-east-1")
    # Over the limit: no 100 Continue, a 413 at once, the body never sent.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /big HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    resp = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert resp.status == 413
    assert json.loads(resp.body)["error"] == "body_too_large"
    assert [r.raw_target for r in upstream.requests] == ["/ok"]


async def test_head_keeps_length_without_body(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        return web.Response(body=b"x" * 1234, content_type="application/json")

    upstream.answer = answer
    proxy = await start_proxy(one_upstream(upstream.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"HEAD /thing HTTP/1.1\r\nHost: localhost\r\n\r\nGET /after HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 1234" in head
    # The next response on the same connection starts right away: HEAD had no body.
    after = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert after.status == 200
    assert len(after.body) == 1234
    assert upstream.requests[0].method == "HEAD"
    verify_sigv4(upstream.requests[0], region="us-east-1")


async def test_an_upstream_failure_is_logged_once_per_cause_with_its_cause(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Every client hears the cause (the JSON detail); the log says it at WARNING once
    a minute per upstream and cause, not once per request."""
    port = closed_port()
    proxy = await start_proxy(one_upstream(port))
    with caplog.at_level(logging.WARNING, logger="sigproxy.proxy"):
        for _ in range(5):
            resp = await raw_request(proxy.port, "GET", "/")
            assert json.loads(resp.body)["detail"] == f"connection refused by 127.0.0.1:{port}"
    lines = [r.getMessage() for r in caplog.records if r.name == "sigproxy.proxy"]
    assert lines == [f"upstream fn: connection refused by 127.0.0.1:{port} (connect)"]
