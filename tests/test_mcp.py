"""MCP (Model Context Protocol) over Streamable HTTP through the real ``sigproxy serve``
process, driven by the real MCP client of the ``mcp`` package.

Two upstreams: the ``mcp`` package's own server (stateful, answers over SSE, a
standalone GET event stream, ``Mcp-Session-Id``) served by uvicorn behind a recorder that
checks every request's SigV4 signature with awscrt; and ``examples/mcp_server.py``, a
stateless JSON-response server written as a Lambda handler, run under the emulator with
AuthType AWS_IAM."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the MCP tests need the test extra (pip install -e '.[test]')")

import uvicorn
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import TextContent, ToolListChangedNotification

from sigproxy.emulator.config import DEFAULT_ACCOUNT, EmulatorConfig, FunctionConfig
from sigproxy.emulator.server import start_functions, stop_functions
from sigproxy.emulator.sigv4 import Caller

from .conftest import one_upstream
from .support import ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, Recorded, verify_sigv4
from .test_process import serve_process, write

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class Exchange:
    """One request as it reached the MCP server, what verifying its signature said, and
    the response it got."""

    request: Recorded
    problem: str | None
    arrived: float
    status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    ended: float | None = None  # the last response byte was sent
    response_body: bytearray = field(default_factory=bytearray)

    def response_header(self, name: str) -> str | None:
        lower = name.lower()
        return next((v for k, v in self.response_headers if k.lower() == lower), None)


class SigV4Recorder:
    """ASGI middleware: reads each request whole, records it, verifies its SigV4
    signature from the bytes that arrived (awscrt, not sigproxy's signer), refuses it with
    403 when it does not verify, and otherwise replays it to the app, recording the
    response's status, headers and end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body arrived
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        rec = Recorded(
            method=scope["method"],
            raw_target=target,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=body,
        )
        problem = None
        try:
            verify_sigv4(rec, region=REGION)
        except AssertionError as exc:
            problem = str(exc) or "assertion failed"
        exchange = Exchange(rec, problem, time.monotonic())
        self.exchanges.append(exchange)
        if problem is not None:
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [(b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                exchange.response_headers = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]
                ]
            elif message["type"] == "http.response.body":
                exchange.response_body += message.get("body", b"")
                if not message.get("more_body", False):
                    exchange.ended = time.monotonic()
            await send(message)

        await self.app(scope, replay, watch)

    def named(self, method: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.request.method == method]


@contextlib.asynccontextmanager
async def serve_asgi(app: ASGIApp) -> AsyncIterator[int]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port), in this event loop."""
    # log_config=None: uvicorn's own dictConfig would close every logging handler there
    # is, pytest's log file (which .ci/run greps for secrets) included.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, log_level="warning", ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def mcp_server(finished: list[float]) -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer("sigproxy-test")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    async def count(steps: int, ctx: Context) -> str:
        """Count to ``steps``, reporting progress after each step, slowly."""
        for i in range(1, steps + 1):
            await ctx.report_progress(i, steps, f"step {i}")
            await asyncio.sleep(0.3)
        finished.append(time.monotonic())
        return f"counted to {steps}"

    @server.tool()
    async def announce(ctx: Context) -> str:
        """Tell the client its tool list changed (a notification of no request: it goes
        out on the standalone GET event stream)."""
        await ctx.request_context.session.send_tool_list_changed()
        return "announced"

    return server


def sigproxy_config(port: int) -> str:
    """Every sigproxy timeout short except the upstream read timeout, which is what holds
    an idle event stream open."""
    return "client_timeouts: {header: 1, body: 1}\n" + one_upstream(
        port, timeout="{connect: 2, read: 30, idle: 1}"
    )


IDLE = 3.5  # longer than client_timeouts.header/body and timeout.idle above


async def test_mcp_client_through_sigproxy_to_a_streamable_http_server(tmp_path: Path) -> None:
    finished: list[float] = []
    recorder = SigV4Recorder(mcp_server(finished).streamable_http_app())
    arrivals: list[tuple[float, float, str | None]] = []
    notifications: list[object] = []
    init_version: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append((time.monotonic(), progress, message))

    async def on_message(message: object) -> None:
        notifications.append(message)

    async with serve_asgi(recorder) as mcp_port:
        path = write(tmp_path, sigproxy_config(mcp_port))
        async with serve_process(path) as served:
            async with (
                streamable_http_client(f"{served.url}/mcp") as (read, write_stream),
                ClientSession(read, write_stream, message_handler=on_message) as session,
            ):
                init = await session.initialize()
                assert init.server_info.name == "sigproxy-test"
                init_version.append(init.protocol_version)
                tools = await session.list_tools()
                assert {t.name for t in tools.tools} == {"add", "count", "announce"}

                result = await session.call_tool(
                    "count", {"steps": 3}, progress_callback=on_progress
                )
                assert not result.is_error
                assert isinstance(result.content[0], TextContent)
                assert result.content[0].text == "counted to 3"
                # Each progress notification reached the client while the tool still
                # worked: streamed through sigproxy, not buffered until the end.
                assert [(v, m) for _, v, m in arrivals] == [
                    (1, "step 1"),
                    (2, "step 2"),
                    (3, "step 3"),
                ]
                (done,) = finished
                assert all(at < done for at, _, _ in arrivals), (arrivals, done)
                assert done - arrivals[0][0] > 0.5

                # The standalone GET event stream, silent for longer than every sigproxy
                # timeout but the upstream read timeout, stays open.
                gets = recorder.named("GET")
                assert len(gets) == 1, "the client opened no standalone GET stream"
                await asyncio.sleep(IDLE)
                assert len(recorder.named("GET")) == 1, "the GET stream was cut and reopened"
                assert gets[0].status == 200
                assert gets[0].ended is None, "the idle GET stream was closed"
                assert (gets[0].response_header("Content-Type") or "").startswith(
                    "text/event-stream"
                )

                # ...and still carries what the server sends on it.
                announced = await session.call_tool("announce", {})
                assert not announced.is_error
                for _ in range(200):
                    if any(isinstance(n, ToolListChangedNotification) for n in notifications):
                        break
                    await asyncio.sleep(0.02)
                assert any(isinstance(n, ToolListChangedNotification) for n in notifications)
                assert b"notifications/tools/list_changed" in gets[0].response_body

                summed = await session.call_tool("add", {"a": 2, "b": 40})
                assert isinstance(summed.content[0], TextContent)
                assert summed.content[0].text == "42"
            # Leaving the client sends DELETE with the session id.
            assert await served.stop() == 0

    exchanges = recorder.exchanges
    assert exchanges
    problems = [(e.request.method, e.problem) for e in exchanges if e.problem]
    assert not problems, problems

    first = exchanges[0]
    assert first.request.method == "POST"
    assert b'"initialize"' in first.request.body
    assert first.request.header("Mcp-Session-Id") is None
    session_id = first.response_header("Mcp-Session-Id")
    assert session_id, "the server gave no Mcp-Session-Id"
    # The id went back to the client through sigproxy, and the client sent it on
    # every later request, through sigproxy again.
    later = exchanges[1:]
    assert later
    assert all(e.request.header("Mcp-Session-Id") == session_id for e in later), [
        (e.request.method, e.request.header("Mcp-Session-Id")) for e in later
    ]
    negotiated = init_version[0]
    assert all(e.request.header("MCP-Protocol-Version") == negotiated for e in later)
    deletes = recorder.named("DELETE")
    assert len(deletes) == 1
    assert deletes[0].request.header("Mcp-Session-Id") == session_id
    assert deletes[0].status in (200, 204)
    assert "Traceback" not in served.log()


async def test_the_example_lambda_mcp_server_behind_the_emulator_and_sigproxy(
    tmp_path: Path,
) -> None:
    """examples/mcp_server.py as an AWS_IAM Function URL in the emulator, sigproxy signing
    in front, the real MCP client talking to it."""
    caller = Caller(
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        session_token=SESSION_TOKEN,
        account_id=DEFAULT_ACCOUNT,
        user_arn=f"arn:aws:iam::{DEFAULT_ACCOUNT}:user/mcp-test",
    )
    emulator = EmulatorConfig(
        region=REGION,
        callers=(caller,),
        functions=(
            FunctionConfig(
                name="mcp",
                handler=f"{ROOT / 'examples' / 'mcp_server.py'}:handler",
                auth="AWS_IAM",
            ),
        ),
        base_dir=str(ROOT / "examples"),
    )
    running = await start_functions(emulator)
    try:
        port = int(running[0].url.rsplit(":", 1)[1])
        path = write(tmp_path, one_upstream(port))
        async with serve_process(path) as served:
            async with (
                streamable_http_client(f"{served.url}/mcp") as (read, write_stream),
                ClientSession(read, write_stream) as session,
            ):
                init = await session.initialize()
                assert init.server_info.name == "lambda-mcp-example"
                tools = await session.list_tools()
                assert {t.name for t in tools.tools} == {"add", "echo"}
                summed = await session.call_tool("add", {"a": 2, "b": 40})
                assert not summed.is_error
                assert isinstance(summed.content[0], TextContent)
                assert summed.content[0].text == "42"
                echoed = await session.call_tool("echo", {"text": "héllo"})
                assert isinstance(echoed.content[0], TextContent)
                assert echoed.content[0].text == "héllo"
                wrong = await session.call_tool("add", {"a": "two"})
                assert wrong.is_error
            assert await served.stop() == 0
        log = served.log()
        assert "Traceback" not in log
    finally:
        await stop_functions(running)
