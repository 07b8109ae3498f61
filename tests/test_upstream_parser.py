"""The upstream client's own response protocol (``sigproxy.upstream._Connection``, on
httptools' llhttp parser), on ``UpstreamClient`` directly against raw loopback servers:
responses to HEAD (a head that announces a body it does not send), chunked trailers,
interim responses, header decoding and limits, close-delimited bodies, the read timeout
measured between bytes (and not while the reader holds the upstream back), and the
bound on the unread body. Nothing is mocked; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from sigproxy.routing import Origin
from sigproxy.upstream import (
    ConnectionClosed,
    ProtocolError,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimedOut,
)

Reply = Callable[[str, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    port: int = 0
    connections: int = 0
    seen: list[tuple[int, str, str]] = field(default_factory=list)  # (conn, method, target)


@contextlib.asynccontextmanager
async def server(reply: Reply) -> AsyncIterator[Server]:
    """A loopback server that calls ``reply(target, writer)`` for each request head."""
    up = Server()
    tasks: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        conn = up.connections
        up.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b" ", 2)
                up.seen.append((conn, method.decode(), target.decode()))
                await reply(target.decode(), writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    up.port = srv.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        srv.close()
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await srv.wait_closed()


def fixed(replies: dict[str, bytes]) -> Reply:
    async def reply(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(replies[target])

    return reply


def sized(body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream_client = UpstreamClient()
    yield upstream_client
    await upstream_client.close()


async def send(
    client: UpstreamClient, port: int, target: str, method: str = "GET", read_timeout: float = 5
) -> UpstreamResponse:
    return await client.request(
        Origin("http", "127.0.0.1", port),
        method,
        target,
        [("Host", "upstream.test")],
        b"",
        connect_timeout=5,
        read_timeout=read_timeout,
    )


async def body_of(client: UpstreamClient, port: int, target: str, method: str = "GET") -> bytes:
    resp = await send(client, port, target, method)
    try:
        return await asyncio.wait_for(resp.read(), 5)
    finally:
        resp.release()


async def test_a_head_response_has_no_body_and_its_connection_is_reused(
    client: UpstreamClient,
) -> None:
    """llhttp is not told the request was a HEAD: the response ends at its head, and the
    next response on the connection is parsed from its start."""
    replies = {
        "/head": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\n",
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        "/next": sized(b"next"),
    }
    async with server(fixed(replies)) as up:
        resp = await send(client, up.port, "/head", "HEAD")
        assert resp.complete
        assert resp.content_length == 5
        assert await resp.read() == b""
        resp.release()
        assert await body_of(client, up.port, "/next") == b"next"
        assert await body_of(client, up.port, "/chunked", "HEAD") == b""
        assert await body_of(client, up.port, "/next") == b"next"
        assert up.connections == 1


async def test_a_body_after_a_head_response_closes_the_connection(
    client: UpstreamClient,
) -> None:
    replies = {
        "/head": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        "/next": sized(b"next"),
    }
    async with server(fixed(replies)) as up:
        assert await body_of(client, up.port, "/head", "HEAD") == b""
        await asyncio.sleep(0.05)
        assert await body_of(client, up.port, "/next") == b"next"
        assert [conn for conn, _, _ in up.seen] == [0, 1]


async def test_trailers_and_interim_responses_never_become_headers(
    client: UpstreamClient,
) -> None:
    replies = {
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Trailer: 1\r\nX-Last-Trailer: 2\r\n\r\n",
        "/interim": b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + sized(b"final", b"X-Final: 1"),
    }
    async with server(fixed(replies)) as up:
        for _ in range(2):
            resp = await send(client, up.port, "/chunked")
            assert await resp.read() == b"ok"
            assert "X-Trailer" not in resp.headers
            resp.release()
            resp = await send(client, up.port, "/interim")
            assert resp.status == 200
            assert [k for k in resp.headers if k.startswith("X-")] == ["X-Final"]
            assert "Link" not in resp.headers
            assert "X-Last-Trailer" not in resp.headers
            assert await resp.read() == b"final"
            resp.release()
        assert up.connections == 1


async def test_headers_decode_as_aiohttp_did(client: UpstreamClient) -> None:
    reply = (
        b"HTTP/1.1 200 \xff\xfeOK\r\nX-Latin: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\n"
        b"x-dup: a\r\nX-Dup: b\r\nX-Pad: v \t\r\nContent-Length: 2\r\n\r\nok"
    )
    async with server(fixed({"/": reply})) as up:
        resp = await send(client, up.port, "/")
        assert resp.status == 200
        assert resp.headers["x-latin"] == b"caf\xe9".decode("utf-8", "surrogateescape")
        assert resp.headers["X-UTF8"] == "café"
        assert resp.headers.getall("X-DUP") == ["a", "b"]
        assert resp.headers["X-Pad"] == "v"
        assert await resp.read() == b"ok"
        resp.release()


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 2\r\n\r\nok", "NUL byte"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"\xff" * 9000 + b"\r\n\r\n", "over 8190 bytes"),
        (
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(129)) + b"\r\n",
            "more than 128 header fields",
        ),
        (b"HTTP/1.1 200 OK\r\nX-Endless: " + b"\xfe" * (2 << 20), "a response head over"),
        (b"\xfe\xff garbage\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok", "Duplicate"),
    ],
)
async def test_malformed_heads_are_protocol_errors_without_their_bytes(
    client: UpstreamClient, reply: bytes, words: str
) -> None:
    async with server(fixed({"/": reply})) as up:
        with pytest.raises(ProtocolError, match=words) as caught:
            await send(client, up.port, "/")
        message = str(caught.value)
        assert message.isprintable() and "\ufffd" not in message
        assert not any(ch in message for ch in "\xff\xfe\x00")


async def test_a_chunked_body_with_bad_framing_is_a_protocol_error(
    client: UpstreamClient,
) -> None:
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"
    async with server(fixed({"/": reply})) as up:
        resp = await send(client, up.port, "/")
        with pytest.raises(ProtocolError):
            await asyncio.wait_for(resp.read(), 5)
        resp.release()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nshort\r\n",
    ],
)
async def test_a_framed_body_ended_by_a_fin_is_cut_short(
    client: UpstreamClient, reply: bytes
) -> None:
    async def answer(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(reply)
        await writer.drain()
        writer.close()

    async with server(answer) as up:
        resp = await send(client, up.port, "/")
        with pytest.raises(ConnectionClosed, match="cut the response body short"):
            await asyncio.wait_for(resp.read(), 5)
        resp.release()


async def test_no_content_and_not_modified_end_at_their_head(client: UpstreamClient) -> None:
    replies = {
        "/204": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
        "/next": sized(b"next"),
    }
    async with server(fixed(replies)) as up:
        for target in ("/204", "/304"):
            resp = await send(client, up.port, target)
            assert resp.complete
            assert await resp.read() == b""
            resp.release()
        assert await body_of(client, up.port, "/next") == b"next"
        assert up.connections == 1


async def test_http_1_0_and_connection_close_answers_are_not_pooled(
    client: UpstreamClient,
) -> None:
    replies = {
        "/10": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/close": sized(b"ok", b"Connection: close"),
        "/head10": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
    }
    async with server(fixed(replies)) as up:
        assert await body_of(client, up.port, "/10") == b"ok"
        assert await body_of(client, up.port, "/close") == b"ok"
        assert await body_of(client, up.port, "/head10", "HEAD") == b""
        assert await body_of(client, up.port, "/10") == b"ok"
        assert [conn for conn, _, _ in up.seen] == [0, 1, 2, 3]


async def test_the_read_timeout_is_the_silence_between_bytes(client: UpstreamClient) -> None:
    async def trickle(target: str, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)  # the head: within the timeout too
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
        for _ in range(8):
            await asyncio.sleep(0.15 if target == "/trickle" else 1.5)
            writer.write(b"x")

    async with server(trickle) as up:
        resp = await send(client, up.port, "/trickle", read_timeout=0.6)
        assert await asyncio.wait_for(resp.read(), 5) == b"x" * 8  # 1.5 s in all
        resp.release()
        resp = await send(client, up.port, "/silent", read_timeout=0.6)
        with pytest.raises(UpstreamTimedOut, match=r"within 0\.6 seconds"):
            await asyncio.wait_for(resp.read(), 5)
        resp.release()


async def test_an_unread_body_holds_the_upstream_back_without_timing_out(
    client: UpstreamClient,
) -> None:
    """While the reader holds back, the unread body stays bounded (the upstream is told
    to wait), and the silence that causes is not the upstream's: no read timeout."""
    total = 16 << 20
    sent: list[int] = [0]

    async def flood(target: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        piece = b"y" * (1 << 16)
        while sent[0] < total:
            writer.write(piece)
            sent[0] += len(piece)
            await writer.drain()

    async with server(flood) as up:
        resp = await send(client, up.port, "/", read_timeout=0.3)
        await asyncio.sleep(0.8)  # longer than the read timeout, reading nothing
        buffered = len(resp.read_buffered())
        assert buffered < 1 << 20, buffered
        assert sent[0] < 12 << 20, sent[0]  # held back by the TCP window
        got = buffered
        while chunk := await asyncio.wait_for(resp.read_chunk(), 5):
            got += len(chunk)
        assert got == total
        resp.release()


@pytest.mark.parametrize("reset", [False, True])
async def test_client_connection_lost_ends_a_close_delimited_body(reset: bool) -> None:
    """A body read until close ends whole with a FIN and is cut short by a reset."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    srv = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        client = UpstreamClient()
        up = await client.request(
            Origin("http", "127.0.0.1", port),
            "GET",
            "/",
            [("Host", "h")],
            b"",
            connect_timeout=5,
            read_timeout=5,
        )
        if reset:
            with pytest.raises(ConnectionClosed, match="cut the response body short"):
                await up.read()
        else:
            assert await up.read() == b"partial"
        up.release()
        await client.close()
    finally:
        srv.close()
        await srv.wait_closed()
