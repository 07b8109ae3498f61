"""Streamed Function URL responses (invoke_mode RESPONSE_STREAM): chunks leave as the
handler produces them, the prelude sets status, headers and cookies, the timeout covers
the whole invocation, and a failure or the size limit after the first byte cuts the
connection. Real servers on loopback, read with a raw socket that timestamps what
arrives."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from sigproxy.credentials import CredentialSource
from sigproxy.emulator.config import Cors, EmulatorConfig, FunctionConfig, build_emulator_config
from sigproxy.emulator.events import MAX_RESPONSE_BYTES, MAX_STREAM_RESPONSE_BYTES
from sigproxy.emulator.server import FunctionUrl

from .conftest import StartProxy
from .support import ACCESS_KEY, SECRET_KEY, SESSION_TOKEN
from .test_emulator import CALLER

REGION = "us-east-1"
PACE = 0.1  # seconds between a test handler's chunks
COUNT = 8

Served = Callable[..., Awaitable[int]]


@pytest.fixture
async def function_port(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Served:
    """``await function_port(handler, max_stream_bytes=..., **FunctionConfig fields)``
    -> the port of a streaming (by default) Function URL, AuthType NONE by default."""

    async def serve(handler: Any, max_stream_bytes: int | None = None, **fields: Any) -> int:
        fields.setdefault("auth", "NONE")
        fields.setdefault("invoke_mode", "RESPONSE_STREAM")
        fn = FunctionConfig(name="fn", handler="unused:handler", **fields)
        emulator = EmulatorConfig(region=REGION, callers=(CALLER,), functions=(fn,))
        limit = MAX_STREAM_RESPONSE_BYTES if max_stream_bytes is None else max_stream_bytes
        app = FunctionUrl(fn, emulator, handler, max_stream_bytes=limit).app()
        server = await aiohttp_server(app, access_log=None)
        assert server.port is not None
        return server.port

    return serve


@dataclass
class Streamed:
    """A response read off the wire: the head, each chunk's payload with the time it was
    decoded (seconds after the request was sent), and whether the body ended cleanly."""

    status: int
    headers: list[tuple[str, str]]
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    complete: bool = False
    head_at: float = 0.0

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def stream_request(
    port: int, target: str = "/", headers: list[tuple[str, str]] | None = None
) -> Streamed:
    """GET ``target`` over a raw socket and decode the chunked body as it arrives."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers or []]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        parsed = [tuple(h.split(": ", 1)) for h in header_lines]
        result = Streamed(int(status_line.split()[1]), [(k, v) for k, v in parsed])
        result.head_at = time.monotonic() - started
        if result.header("Transfer-Encoding") != "chunked":
            length = int(result.header("Content-Length") or 0)
            result.chunks.append((time.monotonic() - started, await reader.readexactly(length)))
            result.complete = True
            return result
        try:
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    result.complete = await reader.readexactly(2) == b"\r\n"
                    return result
                data = await reader.readexactly(size)
                result.chunks.append((time.monotonic() - started, data))
                assert await reader.readexactly(2) == b"\r\n"
        except (asyncio.IncompleteReadError, ConnectionError):
            return result  # cut: complete stays False
    finally:
        writer.close()


def sse(n: int) -> str:
    return f"data: {json.dumps({'n': n})}\n\n"


async def async_events(event: Any, context: Any) -> AsyncIterator[str]:
    yield {"statusCode": 200, "headers": {"Content-Type": "text/event-stream"}}  # type: ignore[misc]
    for n in range(COUNT):
        if n:
            await asyncio.sleep(PACE)
        yield sse(n)


def sync_events(event: Any, context: Any) -> Iterator[str]:
    yield {"statusCode": 200, "headers": {"Content-Type": "text/event-stream"}}  # type: ignore[misc]
    for n in range(COUNT):
        if n:
            time.sleep(PACE)  # blocking: runs in a worker thread
        yield sse(n)


# --- chunks leave as they are produced ---------------------------------------------------


@pytest.mark.parametrize("handler", [async_events, sync_events], ids=["async", "sync"])
async def test_chunks_arrive_one_by_one_at_the_handlers_pace(
    function_port: Served, handler: Any
) -> None:
    port = await function_port(handler)
    resp = await stream_request(port)
    assert resp.status == 200 and resp.complete
    assert resp.header("Content-Type") == "text/event-stream"
    assert resp.header("Transfer-Encoding") == "chunked"
    assert [c for _, c in resp.chunks] == [sse(n).encode() for n in range(COUNT)]
    times = [t for t, _ in resp.chunks]
    handler_runs = PACE * (COUNT - 1)
    # The first event arrives long before the handler finishes, the last about the
    # handler's run time later, and every gap is about the pacing.
    assert times[0] < handler_runs / 2, times
    assert handler_runs * 0.8 <= times[-1] - times[0] <= handler_runs + 1.0, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > PACE * 0.5, gaps


async def test_the_sync_handler_does_not_hold_the_loop(function_port: Served) -> None:
    """Two blocking streams at once take as long as one."""
    port = await function_port(sync_events)
    started = time.monotonic()
    both = await asyncio.gather(stream_request(port), stream_request(port))
    assert all(r.complete and len(r.chunks) == COUNT for r in both)
    assert time.monotonic() - started < PACE * (COUNT - 1) * 1.8


# --- the prelude and other handler shapes ------------------------------------------------


async def test_prelude_sets_status_headers_and_cookies(function_port: Served) -> None:
    async def handler(event: Any, context: Any) -> AsyncIterator[Any]:
        yield {
            "statusCode": 201,
            "headers": {"Content-Type": "text/plain", "X-Custom": "yes", "X-Flag": True},
            "cookies": ["a=1; Path=/", "b=2; HttpOnly"],
        }
        yield "created"

    cors = Cors(allow_origins=("http://page.example",))
    port = await function_port(handler, cors=cors)
    resp = await stream_request(port, headers=[("Origin", "http://page.example")])
    assert resp.status == 201 and resp.complete
    assert resp.header("Content-Type") == "text/plain"
    assert resp.header("X-Custom") == "yes"
    assert resp.header("X-Flag") == "true"
    assert resp.all("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
    assert resp.header("x-amzn-RequestId")
    assert resp.header("Access-Control-Allow-Origin") == "http://page.example"
    assert resp.body == b"created"


async def test_without_prelude_200_octet_stream(function_port: Served) -> None:
    port = await function_port(lambda e, c: iter([b"a", "b", bytearray(b"c")]))
    resp = await stream_request(port)
    assert (resp.status, resp.header("Content-Type"), resp.body) == (
        200,
        "application/octet-stream",
        b"abc",
    )
    assert resp.complete


class Countdown:
    """An async iterator that is not a generator."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> Countdown:
        return self

    async def __anext__(self) -> bytes:
        if self.n == 0:
            raise StopAsyncIteration
        self.n -= 1
        await asyncio.sleep(0)
        return f"{self.n};".encode()


async def coroutine_returning_an_async_iterator(event: Any, context: Any) -> Countdown:
    await asyncio.sleep(0)
    return Countdown(3)


@pytest.mark.parametrize(
    ("handler", "body"),
    [
        (lambda e, c: Countdown(3), b"2;1;0;"),
        (coroutine_returning_an_async_iterator, b"2;1;0;"),
        (lambda e, c: (str(i) for i in range(3)), b"012"),
        (lambda e, c: ["x", b"y"], b"xy"),
        (lambda e, c: "a whole body", b"a whole body"),
        (lambda e, c: iter([]), b""),
        (lambda e, c: iter([{"statusCode": 204}]), b""),
    ],
    ids=["async-iterator", "coroutine", "generator", "list", "str", "empty", "prelude-only"],
)
async def test_handler_shapes(function_port: Served, handler: Any, body: bytes) -> None:
    port = await function_port(handler)
    resp = await stream_request(port)
    assert resp.complete
    assert resp.body == body


# --- failures: before the first byte a 502, after it a cut connection ---------------------


async def boom_after_two(event: Any, context: Any) -> AsyncIterator[str]:
    yield "one\n"
    await asyncio.sleep(PACE)
    yield "two\n"
    raise RuntimeError("boom mid-stream")


def sync_boom_after_two(event: Any, context: Any) -> Iterator[str]:
    yield "one\n"
    yield "two\n"
    raise RuntimeError("boom mid-stream")


@pytest.mark.parametrize("handler", [boom_after_two, sync_boom_after_two], ids=["async", "sync"])
async def test_exception_mid_stream_cuts_the_connection(
    function_port: Served, caplog: pytest.LogCaptureFixture, handler: Any
) -> None:
    port = await function_port(handler)
    with caplog.at_level(logging.INFO, logger="sigproxy.emulator"):
        resp = await stream_request(port)
    assert resp.status == 200
    assert resp.body == b"one\ntwo\n"
    assert not resp.complete  # no last chunk: the client can tell it is truncated
    assert "RuntimeError: boom mid-stream" in caplog.text
    assert "stream cut after 8 bytes" in caplog.text


async def test_aiohttp_client_sees_the_cut_as_an_error(function_port: Served) -> None:
    port = await function_port(boom_after_two)
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_timeout_covers_the_whole_stream(
    function_port: Served, caplog: pytest.LogCaptureFixture
) -> None:
    async def endless(event: Any, context: Any) -> AsyncIterator[str]:
        n = 0
        while True:
            yield f"{n}\n"
            n += 1
            await asyncio.sleep(PACE)

    port = await function_port(endless, timeout=0.5)
    started = time.monotonic()
    resp = await stream_request(port)
    assert 0.4 < time.monotonic() - started < 2.5
    assert resp.status == 200 and not resp.complete
    assert 3 <= len(resp.chunks) <= 7
    assert "Task timed out after 0.50 seconds" in caplog.text


async def test_sync_stream_timeout_cuts_too(function_port: Served) -> None:
    def slow(event: Any, context: Any) -> Iterator[str]:
        yield "first"
        time.sleep(1.0)
        yield "too late"

    port = await function_port(slow, timeout=0.3)
    started = time.monotonic()
    resp = await stream_request(port)
    assert time.monotonic() - started < 0.9
    assert resp.body == b"first" and not resp.complete


def raises_at_once(event: Any, context: Any) -> Iterator[str]:
    raise ValueError("boom before the first byte")


async def fails_before_first_chunk(event: Any, context: Any) -> AsyncIterator[Any]:
    yield {"statusCode": 200, "headers": {"Content-Type": "text/plain"}, "bogus": 1}


async def sleeps_past_timeout(event: Any, context: Any) -> AsyncIterator[str]:
    await asyncio.sleep(5)
    yield "late"


@pytest.mark.parametrize(
    ("handler", "log_fragment"),
    [
        (raises_at_once, "ValueError: boom before the first byte"),
        (lambda e, c: iter([ValueError("x")]), "must be bytes or str, got ValueError"),
        (fails_before_first_chunk, "the prelude has unknown keys: bogus"),
        (lambda e, c: iter([{"statusCode": 99}]), "statusCode 99 is not an HTTP status"),
        (lambda e, c: {"statusCode": 200, "body": "x"}, "needs an iterator of chunks, got dict"),
        (lambda e, c: 42, "needs an iterator of chunks, got int"),
        (sleeps_past_timeout, "Task timed out after 0.30 seconds"),
    ],
    ids=["raises", "bad-chunk", "bad-prelude", "bad-status", "dict", "int", "timeout"],
)
async def test_failure_before_the_first_byte_is_502(
    function_port: Served, caplog: pytest.LogCaptureFixture, handler: Any, log_fragment: str
) -> None:
    port = await function_port(handler, timeout=0.3)
    with caplog.at_level(logging.INFO, logger="sigproxy.emulator"):
        resp = await stream_request(port)
    assert resp.status == 502
    assert resp.body == b"Internal Server Error"
    assert log_fragment in caplog.text


async def test_bad_chunk_mid_stream_cuts(function_port: Served) -> None:
    port = await function_port(lambda e, c: iter(["ok", 42]))
    resp = await stream_request(port)
    assert resp.status == 200 and resp.body == b"ok" and not resp.complete


async def test_client_leaving_closes_the_handlers_generator(function_port: Served) -> None:
    closed = asyncio.Event()

    async def endless(event: Any, context: Any) -> AsyncIterator[str]:
        try:
            while True:
                yield "tick\n"
                await asyncio.sleep(0.05)
        finally:
            closed.set()

    port = await function_port(endless, timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"tick\n")
    writer.close()
    await asyncio.wait_for(closed.wait(), 5)


# --- limits --------------------------------------------------------------------------------


def test_the_streamed_limit_is_200_mb() -> None:
    assert MAX_STREAM_RESPONSE_BYTES == 200 * 1024 * 1024
    fn = FunctionConfig(name="fn", handler="m:f", invoke_mode="RESPONSE_STREAM")
    url = FunctionUrl(fn, EmulatorConfig(functions=(fn,)), lambda e, c: iter(()))
    assert url.max_stream_bytes == MAX_STREAM_RESPONSE_BYTES


async def test_over_the_stream_limit_the_body_is_truncated(
    function_port: Served, caplog: pytest.LogCaptureFixture
) -> None:
    port = await function_port(lambda e, c: (b"x" * 300 for _ in range(10)), max_stream_bytes=1000)
    resp = await stream_request(port)
    assert resp.status == 200
    assert resp.body == b"x" * 1000  # everything up to the limit, then the cut
    assert not resp.complete
    assert "streamed response is over the 1000 byte limit" in caplog.text


async def test_a_stream_may_pass_the_buffered_6_mb(function_port: Served) -> None:
    mib = b"z" * (1024 * 1024)
    port = await function_port(lambda e, c: (mib for _ in range(7)))
    resp = await stream_request(port)
    assert resp.complete and len(resp.body) == 7 * len(mib) > MAX_RESPONSE_BYTES


async def test_buffered_keeps_6_mb_and_refuses_iterators(
    function_port: Served, caplog: pytest.LogCaptureFixture
) -> None:
    big = "x" * (MAX_RESPONSE_BYTES + 1)
    port = await function_port(lambda e, c: big, invoke_mode="BUFFERED")
    assert (await stream_request(port)).status == 502
    port = await function_port(lambda e, c: "x" * MAX_RESPONSE_BYTES, invoke_mode="BUFFERED")
    assert (await stream_request(port)).status == 200
    port = await function_port(async_events, invoke_mode="BUFFERED")
    resp = await stream_request(port)
    assert resp.status == 502 and resp.body == b"Internal Server Error"
    assert "a streamed response needs invoke_mode RESPONSE_STREAM" in caplog.text


# --- config --------------------------------------------------------------------------------


def test_invoke_mode_key() -> None:
    config = build_emulator_config(
        {
            "functions": [
                {"name": "a", "handler": "m:f", "auth": "NONE"},
                {"name": "b", "handler": "m:f", "auth": "NONE", "invoke_mode": "RESPONSE_STREAM"},
            ]
        }
    )
    assert [f.invoke_mode for f in config.functions] == ["BUFFERED", "RESPONSE_STREAM"]
    from sigproxy.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_emulator_config(
            {"functions": [{"name": "a", "handler": "m:f", "auth": "NONE", "invoke_mode": "x"}]}
        )
    assert info.value.path == "emulator.functions[0].invoke_mode"


# --- AWS_IAM, and through sigproxy ------------------------------------------------------------


async def test_aws_iam_streams_only_signed_requests_and_sigproxy_does_not_buffer(
    function_port: Served, start_proxy: StartProxy
) -> None:
    port = await function_port(async_events, auth="AWS_IAM", timeout=10)
    unsigned = await stream_request(port)
    assert unsigned.status == 403
    assert json.loads(unsigned.body) == {"Message": "Forbidden"}

    proxy = await start_proxy(
        f"upstreams:\n  - {{name: fn, url: 'http://127.0.0.1:{port}', region: {REGION}}}\n",
        credentials=CredentialSource.static(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN),
    )
    proxy_port = int(proxy.url.rsplit(":", 1)[1])
    resp = await stream_request(proxy_port, "/events")
    assert resp.status == 200 and resp.complete
    assert resp.header("Content-Type") == "text/event-stream"
    assert resp.body == "".join(sse(n) for n in range(COUNT)).encode()
    times = [t for t, _ in resp.chunks]
    assert times[0] < PACE * (COUNT - 1) / 2, times
    assert times[-1] - times[0] >= PACE * (COUNT - 1) * 0.8, times


async def test_a_cut_stream_reaches_the_client_through_sigproxy_as_a_cut(
    function_port: Served, start_proxy: StartProxy
) -> None:
    port = await function_port(boom_after_two, auth="AWS_IAM")
    proxy = await start_proxy(
        f"upstreams:\n  - {{name: fn, url: 'http://127.0.0.1:{port}', region: {REGION}}}\n",
        credentials=CredentialSource.static(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN),
    )
    resp = await stream_request(int(proxy.url.rsplit(":", 1)[1]))
    assert resp.status == 200
    assert resp.body == b"one\ntwo\n"
    assert not resp.complete
