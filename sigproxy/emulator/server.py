"""Local Function URLs: one aiohttp server per function, doing what Lambda does with a
request (CORS preflight, size limit, SigV4 for AWS_IAM, the resource policy, event,
invoke, response). Every response carries a ``Date`` from the emulator's clock, so a
client can measure its skew from a refusal as it would from the service's.

A RESPONSE_STREAM function's chunks go out as the handler produces them (chunked
transfer encoding, one write per chunk). A failure before anything is sent is the usual
502; after that, as with the service, the connection is cut: a timeout, an exception, a
chunk that is not bytes or str, or a response past ``max_stream_bytes`` (200 MB) leaves
the client with a chunked body that never ends cleanly."""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import logging
import socket
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from ..logs import protect_secrets
from .config import EmulatorConfig, FunctionConfig
from .cors import is_preflight, preflight_headers, response_headers
from .events import (
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    MAX_STREAM_RESPONSE_BYTES,
    HttpResult,
    MalformedResult,
    build_event,
    map_prelude,
    map_result,
)
from .handlers import (
    Handler,
    InvocationTimeout,
    LambdaContext,
    NotAStream,
    invoke,
    invoke_stream,
    load_handler,
)
from .sigv4 import MSG_MISSING, Caller, Identity, SignatureError, verify

log = logging.getLogger("sigproxy.emulator")

_INTERNAL_ERROR = b"Internal Server Error"
# The service's answer when the resource policy does not grant both actions.
MSG_DENIED = (
    "Forbidden. For troubleshooting Function URL authorization issues, see: "
    "https://docs.aws.amazon.com/lambda/latest/dg/urls-auth.html"
)


class FunctionUrl:
    """One emulated function and its URL."""

    def __init__(
        self,
        function: FunctionConfig,
        emulator: EmulatorConfig,
        handler: Handler,
        clock: Callable[[], datetime.datetime] | None = None,
        *,
        max_stream_bytes: int = MAX_STREAM_RESPONSE_BYTES,
    ) -> None:
        self.function = function
        self.max_stream_bytes = max_stream_bytes
        self.emulator = emulator
        self.handler = handler
        self._callers = emulator.caller_map()
        self._arn = emulator.function_arn(function)
        self._clock = clock or emulator.now

    def app(self) -> web.Application:
        protect_secrets()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_response_prepare.append(self._stamp_date)
        return app

    async def _stamp_date(self, request: web.Request, response: web.StreamResponse) -> None:
        # Runs for every response of this app (after aiohttp has set its Date from the
        # real clock). Only aiohttp's 400 for bytes it cannot parse as HTTP, which never
        # reach the app, keep aiohttp's Date.
        response.headers["Date"] = http_date(self._clock())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        fn = self.function
        request_id = str(uuid.uuid4())
        origin = request.headers.get("Origin")
        if fn.cors is not None and is_preflight(
            request.method, origin, request.headers.get("Access-Control-Request-Method")
        ):
            return web.Response(status=200, headers=preflight_headers(fn.cors, origin))

        def finish(response: web.StreamResponse) -> web.StreamResponse:
            response.headers["x-amzn-RequestId"] = request_id
            if fn.cors is not None:
                for name, value in response_headers(fn.cors, origin):
                    response.headers.add(name, value)
            return response

        return await self._answer(request, request_id, finish)

    async def _answer(
        self,
        request: web.Request,
        request_id: str,
        finish: Callable[[web.StreamResponse], web.StreamResponse],
    ) -> web.StreamResponse:
        """The response, passed through ``finish`` (request id, CORS) before it is sent."""
        fn = self.function
        length = request.content_length
        if length is not None and length > MAX_REQUEST_BYTES:
            return finish(_too_large())
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:
                return finish(_too_large())
            chunks.append(chunk)
        body = b"".join(chunks)

        raw_path, _, raw_query = request.raw_path.partition("?")
        raw_path = raw_path.partition("#")[0]
        now = self._clock()
        caller: Caller | None = None
        if fn.auth == "AWS_IAM":
            try:
                identity = verify(
                    request.method,
                    raw_path,
                    raw_query,
                    request.headers.items(),
                    body,
                    self._callers,
                    self.emulator.region,
                    now=now,
                )
            except SignatureError as exc:
                log.warning(
                    "%s: 403 for %s %s: %s check failed: %s",
                    fn.name,
                    request.method,
                    raw_path,
                    exc.part,
                    exc.detail,
                )
                return finish(_forbidden(exc))
            caller = identity.caller
        refused = _refused_by_policy(fn, caller)
        if refused is not None:
            principal, missing = refused
            log.warning(
                "%s: 403 for %s %s: permission check failed: %s is not allowed %s",
                fn.name,
                request.method,
                raw_path,
                principal,
                " and ".join(missing),
            )
            return finish(_access_denied())

        # What the Function URL front end adds on its way to the function.
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _REPLACED]
        if "X-Amzn-Trace-Id" not in request.headers:
            headers.append(("x-amzn-trace-id", _trace_id(now)))
        headers.append(("x-forwarded-for", _forwarded_for(request)))
        headers.append(("x-forwarded-port", str(_local_port(request))))
        headers.append(("x-forwarded-proto", request.scheme))
        event = build_event(
            method=request.method,
            raw_path=raw_path,
            raw_query=raw_query,
            headers=headers,
            body=body,
            source_ip=request.remote or "",
            domain_name=request.host,
            url_id=fn.url_id,
            account_id=self.emulator.account_id,
            request_id=request_id,
            iam=Identity(caller).as_event() if caller is not None else None,
            now=now,
        )
        context = LambdaContext(
            function_name=fn.name,
            memory_limit_in_mb=fn.memory_mb,
            invoked_function_arn=self._arn,
            timeout=fn.timeout,
            aws_request_id=request_id,
        )
        log.info("START RequestId: %s Version: $LATEST", request_id)
        started = time.perf_counter()
        try:
            if fn.invoke_mode == "RESPONSE_STREAM":
                return await self._stream(request, request_id, event, context, finish)
            try:
                result = await invoke(self.handler, event, context)
            except InvocationTimeout as exc:
                log.error("%s RequestId: %s Error: %s", fn.name, request_id, exc)
                return finish(_internal_error())
            except Exception:
                log.exception("%s RequestId: %s: the handler raised", fn.name, request_id)
                return finish(_internal_error())
            try:
                mapped = map_result(result)
            except MalformedResult as exc:
                log.error("%s RequestId: %s: malformed result: %s", fn.name, request_id, exc)
                return finish(_internal_error())
            if len(mapped.body) > MAX_RESPONSE_BYTES:
                log.error(
                    "%s RequestId: %s: response of %d bytes is over the %d byte limit",
                    fn.name,
                    request_id,
                    len(mapped.body),
                    MAX_RESPONSE_BYTES,
                )
                return finish(_internal_error())
            return finish(
                web.Response(
                    status=mapped.status, body=mapped.body, headers=CIMultiDict(mapped.headers)
                )
            )
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            log.info("END RequestId: %s", request_id)
            log.info(
                "REPORT RequestId: %s Duration: %.2f ms Memory Size: %d MB",
                request_id,
                elapsed_ms,
                fn.memory_mb,
            )

    async def _stream(
        self,
        request: web.Request,
        request_id: str,
        event: dict[str, Any],
        context: LambdaContext,
        finish: Callable[[web.StreamResponse], web.StreamResponse],
    ) -> web.StreamResponse:
        """Send a RESPONSE_STREAM handler's chunks as they come. The head goes out with
        the prelude, or else with the first chunk (200, application/octet-stream)."""
        fn = self.function
        response: web.StreamResponse | None = None
        sent = 0
        first = True
        items = invoke_stream(self.handler, event, context)
        try:
            async for item in items:
                if first and isinstance(item, dict):
                    first = False
                    response = await self._start(request, map_prelude(item), finish)
                    continue
                first = False
                chunk = _chunk(item)
                if not chunk:
                    continue
                if response is None:
                    response = await self._start(request, _STREAM_HEAD, finish)
                if request.method == "HEAD" or response.status in (204, 304):
                    continue  # no body on the wire for these; the handler runs to its end
                room = self.max_stream_bytes - sent
                if len(chunk) > room:
                    await response.write(chunk[:room])
                    sent += room
                    raise _OverLimit(self.max_stream_bytes)
                await response.write(chunk)
                sent += len(chunk)
            if response is None:
                response = await self._start(request, _STREAM_HEAD, finish)
            await response.write_eof()
            return response
        except _ClientGone:
            log.info(
                "%s RequestId: %s: the client went away after %d bytes", fn.name, request_id, sent
            )
            return response or finish(_internal_error())
        except Exception as exc:
            if isinstance(exc, InvocationTimeout | _OverLimit):
                log.error("%s RequestId: %s Error: %s", fn.name, request_id, exc)
            elif isinstance(exc, MalformedResult | NotAStream):
                log.error("%s RequestId: %s: malformed result: %s", fn.name, request_id, exc)
            else:
                log.exception("%s RequestId: %s: the handler raised", fn.name, request_id)
            if response is None:
                return finish(_internal_error())
            log.error("%s RequestId: %s: stream cut after %d bytes", fn.name, request_id, sent)
            _cut(request)
            return response
        finally:
            await items.aclose()

    async def _start(
        self,
        request: web.Request,
        head: HttpResult,
        finish: Callable[[web.StreamResponse], web.StreamResponse],
    ) -> web.StreamResponse:
        response = _ChunkWriter(status=head.status, headers=CIMultiDict(head.headers))
        finish(response)
        await response.prepare(request)
        return response


class _ClientGone(ConnectionResetError):
    """The client closed its connection while the response was being sent (or the
    stream was cut). A ConnectionError, so aiohttp's own closing write_eof after a cut
    is handled as one."""


class _OverLimit(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"streamed response is over the {limit} byte limit")


class _ChunkWriter(web.StreamResponse):
    """A streamed response whose writes raise :class:`_ClientGone` when the client has
    left, so a ConnectionError the handler raises is not mistaken for one."""

    async def prepare(self, request: web.BaseRequest) -> Any:
        try:
            return await super().prepare(request)
        except ConnectionError as exc:
            raise _ClientGone from exc

    async def write(self, data: Any) -> None:
        try:
            await super().write(data)
        except ConnectionError as exc:
            raise _ClientGone from exc

    async def write_eof(self, data: bytes = b"") -> None:
        try:
            await super().write_eof(data)
        except ConnectionError as exc:
            raise _ClientGone from exc


_STREAM_HEAD = HttpResult(200, [("Content-Type", "application/octet-stream")])


def _chunk(item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    raise MalformedResult(f"a streamed chunk must be bytes or str, got {type(item).__name__}")


def _cut(request: web.Request) -> None:
    """End the connection without the chunked body's last chunk, as the service does
    when a stream fails: every byte already written still arrives, then the close. An
    HTTP/1.0 body ends with the connection, so there a reset (RST) marks it broken."""
    transport = request.transport
    if transport is None:
        return
    if request.version < (1, 1):
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


_REPLACED = frozenset({"x-forwarded-for", "x-forwarded-port", "x-forwarded-proto"})


def _forwarded_for(request: web.Request) -> str:
    prior = request.headers.get("X-Forwarded-For")
    peer = request.remote or ""
    return f"{prior}, {peer}" if prior else peer


def _local_port(request: web.Request) -> int:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return int(sockname[1]) if sockname else 0


def _trace_id(now: datetime.datetime) -> str:
    return f"Root=1-{int(now.timestamp()):08x}-{uuid.uuid4().hex[:24]}"


def http_date(when: datetime.datetime) -> str:
    """RFC 7231 IMF-fixdate: ``Mon, 30 Nov 2026 10:00:00 GMT``."""
    return email.utils.format_datetime(when.astimezone(datetime.UTC), usegmt=True)


def _refused_by_policy(
    fn: FunctionConfig, caller: Caller | None
) -> tuple[str, tuple[str, ...]] | None:
    """(principal, missing actions) when ``fn.allow`` refuses the request, else None.
    An unsigned request (AuthType NONE) is principal ``*``."""
    if caller is None:
        principal, principals = "*", {"*"}
    else:
        principal, principals = caller.user_arn, {caller.user_arn, caller.account_id, "*"}
    missing = fn.missing_actions(principals)
    return (principal, missing) if missing else None


def _internal_error() -> web.Response:
    return web.Response(status=502, body=_INTERNAL_ERROR, content_type="text/plain")


def _too_large() -> web.Response:
    resp = web.Response(
        status=413,
        body=json.dumps(
            {
                "Message": f"Request must be smaller than {MAX_REQUEST_BYTES} bytes for the "
                "InvokeFunction operation"
            },
            separators=(",", ":"),
        ).encode(),
        content_type="application/json",
    )
    resp.force_close()
    return resp


def _forbidden(exc: SignatureError) -> web.Response:
    if exc.message == MSG_MISSING:
        body, error_type = {"Message": exc.message}, "AccessDeniedException"
    elif exc.part in ("key", "token"):
        body, error_type = {"message": exc.message}, "UnrecognizedClientException"
    elif exc.part == "expiry":
        body, error_type = {"message": exc.message}, "ExpiredTokenException"
    else:
        body, error_type = {"message": exc.message}, "InvalidSignatureException"
    return web.Response(
        status=403,
        # Compact, as the service writes it: {"Message":"Forbidden"}.
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers={"x-amzn-ErrorType": error_type},
    )


def _access_denied() -> web.Response:
    return web.Response(
        status=403,
        body=json.dumps({"Message": MSG_DENIED}, separators=(",", ":")).encode(),
        content_type="application/json",
        headers={"x-amzn-ErrorType": "AccessDeniedException"},
    )


@dataclass
class RunningFunction:
    function: FunctionConfig
    url: str
    runner: web.AppRunner


async def start_functions(emulator: EmulatorConfig) -> list[RunningFunction]:
    """Load every handler and serve each function on its own port (0 = any free one)."""
    loaded = [(fn, load_handler(fn.handler, Path(emulator.base_dir))) for fn in emulator.functions]
    running: list[RunningFunction] = []
    try:
        for fn, handler in loaded:
            url_app = FunctionUrl(fn, emulator, handler).app()
            runner = web.AppRunner(url_app, access_log=None, handler_cancellation=True)
            await runner.setup()
            running.append(RunningFunction(fn, "", runner))
            site = web.TCPSite(runner, emulator.host, fn.port)
            await site.start()
            host, port = runner.addresses[0][:2]
            host = f"[{host}]" if ":" in host else host
            running[-1].url = f"http://{host}:{port}"
    except BaseException:
        await stop_functions(running)
        raise
    return running


async def stop_functions(running: list[RunningFunction]) -> None:
    for r in running:
        await r.runner.cleanup()
