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
sigproxy.upstream (the client side) uses none: it parses responses with httptools
(tests/test_upstream_parser.py).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections import deque

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import HttpRequestParser
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from sigproxy.config import Limits
from sigproxy.protocol import BoundedRequestHandler, BoundedServer, ListenerRunner

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
