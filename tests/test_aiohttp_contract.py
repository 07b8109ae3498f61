"""The aiohttp internals sigproxy relies on, each exercised by name, so that a new aiohttp
release that changes one fails here (one named test) instead of in production.

pyproject.toml pins aiohttp to the minor series these pass on (``>=3.14,<3.15``). To let
a new series in: raise the pin, run this file, and mend what it names.

Used by sigproxy.protocol (the server side):
  * ``aiohttp.web_protocol._ErrInfo(status=, exc=, message=)`` queued as a message is
    answered through ``RequestHandler.handle_error``;
  * ``RequestHandler._messages`` (the parsed-message deque), ``._waiter`` (set while
    waiting for a message), ``._manager``, ``.data_received`` and ``.connection_lost``;
  * ``RequestHandler._max_msg_queue_size``/``._msg_queue_resume_size`` (when it stops
    reading), ``._parser``, ``._read_bufsize``, ``.max_line_size``/``.max_field_size``/
    ``.max_headers``, and ``http_parser.HttpRequestParser(..., max_msg_queue_size=)`` with
    ``web_protocol.RequestPayloadError``: the parser is rebuilt to queue two requests;
  * ``web_server.Server._kwargs`` and ``._loop``, and ``Server.__call__`` as the
    protocol factory;
  * ``ServerRunner._make_server`` and ``._cleanup_server`` (the runner's open/close hooks);
  * ``StreamWriter.output_size`` (reset after a ``100 Continue`` sent by hand);
  * ``StreamResponse._prepare_headers`` (sigproxy.proxy removes the Content-Type it adds
    to a body the upstream sent without one).
Used by sigproxy.upstream (the client side):
  * ``client_proto.ResponseHandler(loop)``, ``set_response_params(skip_payload=,
    read_until_eof=, auto_decompress=, read_timeout=)``, ``start_timeout()``, ``read()``,
    ``should_close``, ``is_connected()``, ``transport``, ``close()``, ``data_received`` and
    ``connection_lost`` (which feeds EOF to a read-until-close body on any close);
  * ``ResponseHandler._parser.feed_eof()``: None between messages, a message or an error
    once another one has begun.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections import deque

import pytest
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import HttpRequestParser
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from sigproxy.config import Limits
from sigproxy.protocol import BoundedRequestHandler, BoundedServer, ListenerRunner
from sigproxy.routing import Origin
from sigproxy.upstream import ConnectionClosed, UpstreamClient

from .support import read_response


async def _ok(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text="ok")


def test_server_side_names_exist() -> None:
    # sigproxy.proxy drops the Content-Type aiohttp would invent, after this runs.
    assert inspect.iscoroutinefunction(web.StreamResponse._prepare_headers)
    info = _ErrInfo(status=431, exc=BadHttpMessage("x"), message="x")
    assert (info.status, info.message) == (431, "x")
    for name in (
        "_messages",
        "_waiter",
        "_manager",
        "_max_msg_queue_size",
        "_msg_queue_resume_size",
        "_read_bufsize",
    ):
        assert name in RequestHandler.__slots__, name


async def test_server_internals_behave_as_relied_on() -> None:
    """A handler's message queue is a deque of (message, payload); a queued _ErrInfo is
    answered by handle_error; the server hands its kwargs and loop to each handler."""
    runner = ListenerRunner(
        _ok,
        what="contract",
        limits=Limits(max_header_bytes=2048, max_client_connections=2),
        shutdown_timeout=1,
        header_timeout=5,
    )
    await runner.setup()
    server = runner.server
    assert isinstance(server, BoundedServer)
    assert server._loop is asyncio.get_running_loop()
    assert server._kwargs["keepalive_timeout"] == 5
    handler = server()
    assert isinstance(handler, BoundedRequestHandler)
    assert isinstance(handler._messages, deque)
    assert handler._waiter is None
    assert handler._manager is server
    # The parser it builds in place of aiohttp's (queueing two requests, not 32) takes
    # the arguments RequestHandler gives its own, from the attributes it keeps.
    assert isinstance(handler._parser, HttpRequestParser)
    assert (handler.max_line_size, handler.max_field_size, handler.max_headers) == (
        8190,
        8190,
        128,
    )
    assert handler._max_msg_queue_size == 2
    server.open_connections -= 1  # the handler above was never connected
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        # An oversized head goes through the queue as an _ErrInfo and handle_error.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
        resp = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        assert resp.status == 431
        assert json.loads(resp.body)["error"] == "headers_too_large"
        # A normal request still works, and its writer's output_size is settable.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        resp = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        assert (resp.status, resp.body) == (200, b"ok")
    finally:
        await runner.cleanup()


def test_client_side_names_exist() -> None:
    params = inspect.signature(ResponseHandler.set_response_params).parameters
    assert {"skip_payload", "read_until_eof", "auto_decompress", "read_timeout"} <= set(params)
    for name in ("start_timeout", "read", "is_connected", "close", "data_received"):
        assert callable(getattr(ResponseHandler, name)), name
    assert isinstance(ResponseHandler.should_close, property)


async def test_client_parser_feed_eof_between_and_inside_messages() -> None:
    """``_parser.feed_eof()`` is None between messages and not None (or raises) once a
    second response has begun: how a pooled connection is judged reusable."""
    sent: list[bytes] = []
    done: list[asyncio.Task[None]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done.append(asyncio.current_task())  # type: ignore[arg-type]
        await reader.readuntil(b"\r\n\r\n")
        writer.write(sent[0])
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        for tail, reusable in ((b"", True), (b"HTTP/1.1 200 OK\r\nContent-Le", False)):
            sent[:] = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi" + tail]
            _, protocol = await loop.create_connection(
                lambda: ResponseHandler(loop), "127.0.0.1", port
            )
            protocol.set_response_params(
                skip_payload=False, read_until_eof=True, auto_decompress=False, read_timeout=5
            )
            assert protocol.transport is not None
            protocol.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            protocol.start_timeout()
            message, payload = await protocol.read()
            assert message.code == 200
            assert await payload.read() == b"hi"
            await asyncio.sleep(0.05)  # the tail, if any, has been parsed
            parser = protocol._parser
            assert parser is not None
            try:
                between = parser.feed_eof() is None
            except Exception:
                between = False
            assert between is reusable
            assert protocol.is_connected()
            protocol.close()
        await asyncio.wait_for(asyncio.gather(*done), 5)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("reset", [False, True])
async def test_client_connection_lost_ends_a_close_delimited_body(reset: bool) -> None:
    """aiohttp ends a read-until-close body on any close; sigproxy's client turns a reset
    into an error (tests/test_upstream.py checks that), relying on this."""
    import socket
    import struct

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

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
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
        server.close()
        await server.wait_closed()
