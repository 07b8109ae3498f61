"""Adversarial checks of streamed responses and MCP traffic through the real ``sigproxy
serve`` process and the emulator's RESPONSE_STREAM path, from outside: raw loopback
upstreams that send exactly the bytes chosen, raw sockets as clients, the MCP client's
own HTTP transport. Each test here failed when it was written."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sigproxy.emulator.config import EmulatorConfig, FunctionConfig
from sigproxy.emulator.server import start_functions, stop_functions

from .conftest import one_upstream
from .support import Recorded, verify_sigv4
from .test_process import serve_process, write

REGION = "us-east-1"

Script = Callable[[asyncio.StreamWriter, bytes], Awaitable[None]]


class RawUpstream:
    """A loopback HTTP/1.1 server that reads each request (head and Content-Length body)
    and answers with the bytes ``script`` writes; connections are kept alive."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Recorded] = []
        self.connections = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[:-2]
                method, target, _ = lines[0].split(" ", 2)
                headers = [(k, v.strip()) for k, v in (h.split(":", 1) for h in lines[1:])]
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                body = await reader.readexactly(length) if length else b""
                self.requests.append(Recorded(method, target, headers, body))
                await self.script(writer, head)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_upstream(script: Script) -> AsyncIterator[RawUpstream]:
    up = RawUpstream(script)
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()


async def exchange(port: int, data: bytes, wait: float = 3.0) -> bytes:
    """Send ``data`` and read until the server closes (or ``wait`` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(wait):
            while piece := await reader.read(1 << 16):
                out += piece
    writer.close()
    return out


def head_of(response: bytes) -> str:
    return response.split(b"\r\n\r\n", 1)[0].decode("latin-1")


# --- trailers must stay with their own message -------------------------------------


async def test_an_upstream_trailer_never_becomes_a_header_of_the_next_clients_response(
    tmp_path: Path,
) -> None:
    """Alice's response ends with a chunked trailer (``Set-Cookie``); Bob's request, on
    another client connection, reuses the pooled upstream connection. The trailer must
    not turn up as a header of Bob's response. (It did: the last trailer field of one
    response was prepended to the headers of the next response parsed on that pooled
    connection, because the connection's parser is kept from one response to the next.)"""
    answered = 0

    async def script(writer: asyncio.StreamWriter, head: bytes) -> None:
        nonlocal answered
        answered += 1
        if answered == 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                b"5\r\nalice\r\n0\r\nX-Alice: 1\r\nSet-Cookie: session=ALICE-SECRET\r\n\r\n"
            )
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nbob"
            )

    async with raw_upstream(script) as up:
        async with serve_process(write(tmp_path, one_upstream(up.port))) as served:
            close = b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n"
            alice = await exchange(served.port, b"GET /alice HTTP/1.1\r\n" + close)
            bob = await exchange(served.port, b"GET /bob HTTP/1.1\r\n" + close)
            assert await served.stop() == 0
        assert up.connections == 1  # Bob's request did go over Alice's pooled connection
        for rec in up.requests:
            verify_sigv4(rec, region=REGION)
    assert alice.startswith(b"HTTP/1.1 200 ") and b"alice" in alice
    assert bob.startswith(b"HTTP/1.1 200 ") and bob.endswith(b"bob")
    assert "ALICE-SECRET" not in head_of(bob), head_of(bob)
    assert "x-alice" not in head_of(bob).lower(), head_of(bob)


async def test_a_request_trailer_never_becomes_a_header_of_the_next_request(
    tmp_path: Path,
) -> None:
    """A chunked request body with a trailer, then a second request on the same client
    connection: no request may reach the upstream with the first one's trailer as a
    header (the GET arrived with ``X-Smuggled: from-trailer``). sigproxy now closes the
    connection after answering a chunked request."""

    async def script(writer: asyncio.StreamWriter, head: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with raw_upstream(script) as up:
        async with serve_process(write(tmp_path, one_upstream(up.port))) as served:
            out = await exchange(
                served.port,
                b"POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\nX-Smuggled: from-trailer\r\n\r\n"
                b"GET /b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
            assert await served.stop() == 0
    # sigproxy answers the chunked POST and closes the connection (a pipelined request
    # after it goes unanswered, as HTTP allows: the client sends it again on a new one).
    assert out.count(b"HTTP/1.1 200 ") >= 1
    assert up.requests[0].method == "POST"
    for rec in up.requests:
        verify_sigv4(rec, region=REGION)
        assert rec.header("X-Smuggled") is None, rec.headers


# --- the emulator: bytes outside any message -----------------------------------------

STREAMING_HANDLERS = """
def events(event, context):
    yield {"statusCode": 200, "headers": {"Content-Type": "text/event-stream"}}
    yield "data: 1\\n\\n"


def _with_status(status):
    def handler(event, context):
        yield {"statusCode": status, "headers": {"Content-Type": "text/event-stream"}}
        yield "data: 1\\n\\n"
    return handler


s100, s101, s103, s204, s304 = (_with_status(s) for s in (100, 101, 103, 204, 304))
"""


@contextlib.asynccontextmanager
async def streaming_function(tmp_path: Path, name: str) -> AsyncIterator[int]:
    (tmp_path / "streaming_handlers.py").write_text(STREAMING_HANDLERS)
    emulator = EmulatorConfig(
        region=REGION,
        callers=(),
        functions=(
            FunctionConfig(
                name="fn",
                handler=f"streaming_handlers.py:{name}",
                auth="NONE",
                invoke_mode="RESPONSE_STREAM",
            ),
        ),
        base_dir=str(tmp_path),
    )
    running = await start_functions(emulator)
    try:
        yield int(running[0].url.rsplit(":", 1)[1])
    finally:
        await stop_functions(running)


def after_first_head(out: bytes) -> bytes:
    return out.split(b"\r\n\r\n", 1)[1]


async def test_head_to_a_streaming_function_puts_no_body_bytes_on_the_connection(
    tmp_path: Path,
) -> None:
    """HEAD, then GET, on one kept-alive connection to a RESPONSE_STREAM Function URL: the
    HEAD answer has no body, so the next bytes are the GET's status line. (The handler's
    chunks were written raw after the HEAD head: ``data: 1\\n\\nHTTP/1.1 200 OK``.)"""
    async with streaming_function(tmp_path, "events") as port:
        out = await exchange(
            port,
            b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
    assert out.startswith(b"HTTP/1.1 200 ")
    rest = after_first_head(out)
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:80]


@pytest.mark.parametrize("name", ["s204", "s304"])
async def test_a_bodiless_prelude_status_puts_no_chunks_on_the_connection(
    tmp_path: Path, name: str
) -> None:
    """A prelude with 204 or 304 and chunks after it: whatever the emulator does with the
    chunks (drop them, cut the stream), it must not write them after a head that says
    there is no body, where the next response on the connection is expected."""
    async with streaming_function(tmp_path, name) as port:
        out = await exchange(
            port,
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
    assert out.startswith(b"HTTP/1.1 " + name[1:].encode())
    rest = after_first_head(out)
    assert rest == b"" or rest.startswith(b"HTTP/1.1 "), rest[:80]


@pytest.mark.parametrize("name", ["s100", "s101", "s103"])
async def test_a_prelude_with_an_interim_status_is_a_malformed_prelude(
    tmp_path: Path, name: str
) -> None:
    """1xx is never a final status: a prelude naming one is malformed (502, as the README
    says of a malformed prelude). It was sent as the final answer, chunks after it."""
    async with streaming_function(tmp_path, name) as port:
        out = await exchange(
            port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
    assert out.startswith(b"HTTP/1.1 502 "), out[:200]
