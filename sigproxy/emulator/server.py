"""Local Function URLs: one aiohttp server per function, doing what Lambda does with a
request (CORS preflight, size limit, SigV4 for AWS_IAM, the resource policy, event,
invoke, response). Every response carries a ``Date`` from the emulator's clock, so a
client can measure its skew from a refusal as it would from the service's."""

from __future__ import annotations

import datetime
import email.utils
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

from ..logs import protect_secrets
from .config import EmulatorConfig, FunctionConfig
from .cors import is_preflight, preflight_headers, response_headers
from .events import MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, MalformedResult, build_event, map_result
from .handlers import Handler, InvocationTimeout, LambdaContext, invoke, load_handler
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
    ) -> None:
        self.function = function
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

        response = await self._answer(request, request_id)
        response.headers["x-amzn-RequestId"] = request_id
        if fn.cors is not None:
            for name, value in response_headers(fn.cors, origin):
                response.headers.add(name, value)
        return response

    async def _answer(self, request: web.Request, request_id: str) -> web.Response:
        fn = self.function
        length = request.content_length
        if length is not None and length > MAX_REQUEST_BYTES:
            return _too_large()
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:
                return _too_large()
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
                return _forbidden(exc)
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
            return _access_denied()

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
            try:
                result = await invoke(self.handler, event, context)
            except InvocationTimeout as exc:
                log.error("%s RequestId: %s Error: %s", fn.name, request_id, exc)
                return _internal_error()
            except Exception:
                log.exception("%s RequestId: %s: the handler raised", fn.name, request_id)
                return _internal_error()
            try:
                mapped = map_result(result)
            except MalformedResult as exc:
                log.error("%s RequestId: %s: malformed result: %s", fn.name, request_id, exc)
                return _internal_error()
            if len(mapped.body) > MAX_RESPONSE_BYTES:
                log.error(
                    "%s RequestId: %s: response of %d bytes is over the %d byte limit",
                    fn.name,
                    request_id,
                    len(mapped.body),
                    MAX_RESPONSE_BYTES,
                )
                return _internal_error()
            return web.Response(
                status=mapped.status, body=mapped.body, headers=CIMultiDict(mapped.headers)
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
