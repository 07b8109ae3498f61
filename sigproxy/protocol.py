"""HTTP-level refusals as JSON: requests aiohttp's parser rejects before any handler
runs (malformed request lines and headers, oversized headers, conflicting
Content-Length / Transfer-Encoding) get the same kind of JSON error as everything else,
and the log line names the problem without quoting the raw bytes (which may hold query
values)."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from .proxy import Proxy

log = logging.getLogger("sigproxy.protocol")


def describe(exc: BaseException | None) -> tuple[int, str, str]:
    """(status, error code, message) for a parser error; the message has no raw bytes."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        if isinstance(line, bytes | bytearray) and line[:1] == b"/":
            return 414, "uri_too_long", "the request target is too long"
        return 431, "headers_too_large", "a request header is too large"
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc.message):
        return 431, "headers_too_large", "too many request headers"
    if isinstance(exc, HttpProcessingError):
        text = str(exc.message or "").strip()
        first = text.splitlines()[0].rstrip(":") if text else "malformed request"
        if "'" in first or '"' in first:  # would quote client bytes
            first = type(exc).__name__
        return 400, "bad_request", f"malformed HTTP request: {first}"
    return 500, "internal_error", "sigproxy failed unexpectedly"


class JsonErrorRequestHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        code_status, code, text = describe(exc)
        if exc is None or not isinstance(exc, HttpProcessingError):
            code_status = status
            if status != 500:
                code, text = "bad_request", f"refused: {status}"
        if code_status >= 500:
            log.error("unexpected error from %s", request.remote, exc_info=exc)
        else:
            log.info("refused a request from %s: %s %s", request.remote, code_status, text)
        resp = web.Response(
            status=code_status,
            body=json.dumps({"error": code, "message": text}).encode(),
            content_type="application/json",
        )
        resp.force_close()
        return resp


class JsonErrorServer(Server):
    __slots__ = ()

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.ServerRunner):
    """Serves :meth:`Proxy.handle` on aiohttp's low-level server: every request goes to
    the proxy whatever its target (CONNECT's authority form and ``OPTIONS *`` included),
    without an Application's router and middleware chain. Opens the proxy's upstream
    connections at setup and closes them at cleanup."""

    def __init__(self, proxy: Proxy, *, shutdown_timeout: float, idle_timeout: float) -> None:
        server = JsonErrorServer(
            proxy.handle,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=idle_timeout,
            # Request bodies go upstream byte for byte, Content-Encoding and all: the hash
            # is of what is sent, and the function decides what to do with gzip.
            auto_decompress=False,
        )
        super().__init__(server, shutdown_timeout=shutdown_timeout)
        self.proxy = proxy

    async def _make_server(self) -> Server:
        await self.proxy.open()
        return await super()._make_server()

    async def _cleanup_server(self) -> None:
        await super()._cleanup_server()
        await self.proxy.close()
