"""``sigproxy demo`` the way a new user meets it: the real process, started with no AWS
credentials, and the commands it prints run exactly as printed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sigproxy.demo import demo_caller

from .support import drain_lines, stop_process

ROOT = Path(__file__).resolve().parent.parent
READY = "Ctrl-C stops the proxy and the six functions."
WEBHOOK_SECRET = b"demo-webhook-secret"
DEMO_USER_ARN = "arn:aws:iam::123456789012:user/sigproxy-demo"

HELLO_LINE = re.compile(r"^\s*curl '(?P<proxy>http://[^' ]+)/hello\?name=John'$")
DIRECT_LINE = re.compile(r"^\s*curl -i '(?P<function>http://[^' ]+)/\?name=John'\s+#.*403")
POST_LINE = re.compile(r"^\s*curl -X POST .* (?P<proxy>http://\S+)/api/process$")
DENIED_LINE = re.compile(
    r"^\s*curl -i '(?P<proxy>http://[^' ]+)/denied'\s+# refused by IAM .*: 403, "
    r"X-Sigproxy-Diagnosis: access-denied$"
)
DENIED_BODY = {
    "Message": "Forbidden. For troubleshooting Function URL authorization issues, see: "
    "https://docs.aws.amazon.com/lambda/latest/dg/urls-auth.html"
}
STREAM_LINE = re.compile(
    r"^\s*curl -N '(?P<proxy>http://[^' ]+)/stream'\s+# server-sent events, one every 100 ms, "
    r"arriving one by one through sigproxy$"
)
STREAM_EVENTS = [f'data: {{"n": {n}}}' for n in range(20)]
MCP_LINE = re.compile(
    r"^\s*curl -X POST .*tools/call.* (?P<proxy>http://\S+)/mcp\s+# an MCP server "
    r"\(examples/mcp_server.py\): MCP clients use (?P=proxy)/mcp$"
)
WEBHOOK_LINE = re.compile(
    r"^\s*curl -X POST .*X-Signature: sha256=[0-9a-f]{64}.* (?P<proxy>http://\S+)/webhook$"
)
ROUTE_LINE = re.compile(
    r"^\s*(?P<proxy>http://\S+?)(?P<prefix>/\w+)\s+->\s+(?P<name>\w+)\s+(?P<function>http://\S+)"
    r"\s+\(examples/\w+\.py\)$"
)

# A run of token characters this long is a credential-shaped string. The demo's secret
# key (token_urlsafe(30): 40 characters) and session token (64) are such runs; request
# ids (32 hex), UUIDs (36) and ports are shorter, and SHA-256 digests are lower-case hex.
LONG_TOKEN = re.compile(r"[A-Za-z0-9_-]{40,}")
LOWER_HEX = re.compile(r"[0-9a-f]+")


def demo_env() -> dict[str, str]:
    # The autouse aws_env fixture has removed every AWS credential from os.environ.
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def credential_shaped(text: str) -> list[str]:
    return [t for t in LONG_TOKEN.findall(text) if not LOWER_HEX.fullmatch(t)]


@dataclass
class Demo:
    proc: asyncio.subprocess.Process
    printed: list[str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    drains: list[asyncio.Task[None]] = field(default_factory=list)

    def line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The first printed line matching ``pattern``."""
        for text in self.printed:
            m = pattern.match(text)
            if m:
                return m
        raise AssertionError(
            f"no printed line matches {pattern.pattern}:\n" + "\n".join(self.printed)
        )

    @property
    def proxy(self) -> str:
        return self.line(HELLO_LINE)["proxy"]

    @property
    def hello_function(self) -> str:
        return self.line(DIRECT_LINE)["function"]

    def routes(self) -> dict[str, re.Match[str]]:
        return {m["prefix"]: m for m in map(ROUTE_LINE.match, self.printed) if m}

    def log(self) -> str:
        return "".join(self.stderr)

    async def stop(self, sig: int = signal.SIGINT) -> int:
        return await stop_process(self.proc, self.drains, sig)


@contextlib.asynccontextmanager
async def start_demo(*args: str) -> AsyncIterator[Demo]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigproxy", "demo", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=demo_env(),
        cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    demo = Demo(proc, printed=[])
    demo.drains.append(asyncio.create_task(drain_lines(proc.stderr, demo.stderr)))
    try:
        async with asyncio.timeout(30):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    await proc.wait()
                    await asyncio.gather(*demo.drains)
                    raise AssertionError(
                        f"demo exited ({proc.returncode}) before {READY!r}:\n"
                        + "".join(demo.printed)
                        + demo.log()
                    )
                text = raw.decode().rstrip("\n")
                demo.printed.append(text)
                if text == READY:
                    break
        demo.stdout.extend(t + "\n" for t in demo.printed)
        demo.drains.append(asyncio.create_task(drain_lines(proc.stdout, demo.stdout)))
        yield demo
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for task in demo.drains:
            task.cancel()
        await asyncio.gather(*demo.drains, return_exceptions=True)


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    async with start_demo() as running:
        yield running


def curl_env(tmp_path: Path) -> dict[str, str]:
    """The user's environment minus anything that could send curl off loopback or change
    what the printed command does (proxies, a ~/.curlrc)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(no_proxy="*", NO_PROXY="*", HOME=str(tmp_path), CURL_HOME=str(tmp_path))
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    return env


def _shell(line: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # The point is to run the printed line through a shell, as a user pasting it would.
    return subprocess.run(  # noqa: S602
        line, shell=True, capture_output=True, text=True, timeout=30, env=env, check=False
    )


async def run_printed(line: str, tmp_path: Path) -> str:
    """Run one printed command through a shell, exactly as printed; returns its stdout."""
    result = await asyncio.to_thread(_shell, line, curl_env(tmp_path))
    assert result.returncode == 0, f"{line!r} failed ({result.returncode}): {result.stderr}"
    return result.stdout


def split_http(output: str) -> tuple[int, str, Any]:
    """``curl -i`` output: status, head, JSON body."""
    head, sep, body = output.partition("\n\n")
    assert sep, f"no header/body separator in {output!r}"
    status = int(head.splitlines()[0].split()[1])
    return status, head, json.loads(body)


def assert_processed(payload: dict[str, Any]) -> None:
    assert payload["processed"] == {"order": 42}
    assert payload["caller"]["userArn"] == DEMO_USER_ARN
    assert payload["caller"]["accountId"] == "123456789012"
    access_key = payload["caller"]["accessKey"]
    assert re.fullmatch(r"ASIA[A-Z0-9]{16}", access_key), access_key
    assert re.fullmatch(r"[0-9a-f-]{36}", payload["requestId"])


def test_printed_instructions_are_consistent(demo: Demo) -> None:
    routes = demo.routes()
    assert set(routes) == {"/hello", "/webhook", "/api", "/denied", "/stream", "/mcp"}
    assert {m["name"] for m in routes.values()} == {
        "hello",
        "webhook",
        "router",
        "denied",
        "stream",
        "mcp",
    }
    assert {m["proxy"] for m in routes.values()} == {demo.proxy}
    assert demo.line(POST_LINE)["proxy"] == demo.proxy
    assert demo.line(DENIED_LINE)["proxy"] == demo.proxy
    assert demo.line(STREAM_LINE)["proxy"] == demo.proxy
    assert any("six local Function URLs" in line for line in demo.printed)
    # The unsigned example goes to the hello function itself, not through the proxy.
    assert demo.hello_function == routes["/hello"]["function"]
    assert demo.hello_function != demo.proxy
    functions = {m["function"] for m in routes.values()}
    assert len(functions) == 6 and demo.proxy not in functions
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", demo.proxy)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_printed_curl_commands_work_as_printed(demo: Demo, tmp_path: Path) -> None:
    hello = demo.line(HELLO_LINE).string
    assert json.loads(await run_printed(hello, tmp_path)) == {"message": "Hello, John!"}

    direct = demo.line(DIRECT_LINE).string
    status, head, body = split_http(await run_printed(direct, tmp_path))
    assert status == 403, head
    assert body == {"Message": "Forbidden"}

    post = demo.line(POST_LINE).string
    assert_processed(json.loads(await run_printed(post, tmp_path)))

    # Every function gets a line that works as printed: the webhook's delivery is signed.
    webhook = demo.line(WEBHOOK_LINE).string
    assert json.loads(await run_printed(webhook, tmp_path)) == {
        "received": True,
        "type": "order.created",
        "id": 42,
    }

    # Signed by sigproxy, refused by the function's resource policy.
    denied = demo.line(DENIED_LINE).string
    status, head, body = split_http(await run_printed(denied, tmp_path))
    assert status == 403, head
    assert re.search(r"(?mi)^x-amzn-ErrorType: AccessDeniedException\r?$", head), head
    assert body == DENIED_BODY

    # Twenty events, all of them, through sigproxy.
    stream = demo.line(STREAM_LINE).string
    events = [e for e in (await run_printed(stream, tmp_path)).split("\n") if e]
    assert events == STREAM_EVENTS

    # A tools/call to the example MCP server, through sigproxy, signed.
    mcp = demo.line(MCP_LINE).string
    assert json.loads(await run_printed(mcp, tmp_path)) == {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"content": [{"type": "text", "text": "42"}], "isError": False},
    }
    assert await demo.stop() == 0


async def test_stream_events_arrive_spread_over_time_through_sigproxy(demo: Demo) -> None:
    """sigproxy passes each event on as the function streams it: they do not arrive in a
    lump at the end."""
    arrived: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as session:
        started = asyncio.get_running_loop().time()
        async with session.get(demo.proxy + "/stream") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            async for line in resp.content:
                if line.strip():
                    arrived.append((asyncio.get_running_loop().time() - started, line))
    assert [line.decode().strip() for _, line in arrived] == STREAM_EVENTS
    times = [t for t, _ in arrived]
    # The function takes 1.9 s (19 pauses of 100 ms).
    assert times[0] < 1.0, times
    assert times[-1] - times[0] >= 1.5, times
    assert sum(1 for a, b in itertools.pairwise(times) if b - a > 0.05) >= 15, times


async def test_printed_requests_without_curl(demo: Demo) -> None:
    """The same requests with aiohttp, so they are checked where curl is missing."""
    async with aiohttp.ClientSession() as session:
        async with session.get(demo.proxy + "/hello?name=John") as resp:
            assert resp.status == 200
            assert await resp.json() == {"message": "Hello, John!"}
        async with session.get(demo.hello_function + "/?name=John") as resp:
            assert resp.status == 403
            assert await resp.json() == {"Message": "Forbidden"}
        async with session.post(
            demo.proxy + "/api/process",
            data=b'{"order": 42}',
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200
            assert_processed(await resp.json())
        async with session.get(demo.proxy + "/denied") as resp:
            assert resp.status == 403
            assert resp.headers["x-amzn-ErrorType"] == "AccessDeniedException"
            assert await resp.json() == DENIED_BODY


def webhook_signature(body: bytes) -> str:
    return "sha256=" + hmac.new(WEBHOOK_SECRET, body, hashlib.sha256).hexdigest()


async def test_example_routes_through_the_proxy(demo: Demo) -> None:
    delivery = json.dumps({"type": "order.created", "id": 42}).encode()
    async with aiohttp.ClientSession() as session:
        async with session.get(demo.proxy + "/hello") as resp:
            assert resp.status == 400
            body = await resp.json()
            assert set(body) == {"error"} and "name" in body["error"]

        async with session.get(demo.proxy + "/api/nowhere") as resp:
            assert resp.status == 404
            assert await resp.json() == {"error": "not found", "method": "GET", "path": "/nowhere"}

        async with session.get(demo.proxy + "/api/health") as resp:
            assert resp.status == 200
            health = await resp.json()
            assert health["status"] == "ok" and health["caller"]["userArn"] == DEMO_USER_ARN

        # JSON arrives at the function as text; octet-stream as base64. Both must be the
        # very bytes that were signed by the webhook sender.
        for content_type in ("application/json", "application/octet-stream"):
            async with session.post(
                demo.proxy + "/webhook",
                data=delivery,
                headers={"Content-Type": content_type, "X-Signature": webhook_signature(delivery)},
            ) as resp:
                assert resp.status == 200, content_type
                assert await resp.json() == {"received": True, "type": "order.created", "id": 42}

        for bad in (webhook_signature(delivery + b" "), "sha256=" + "0" * 64, None):
            headers = {"Content-Type": "application/json"}
            if bad is not None:
                headers["X-Signature"] = bad
            async with session.post(
                demo.proxy + "/webhook", data=delivery, headers=headers
            ) as resp:
                assert resp.status == 401, bad
                assert await resp.json() == {"error": "invalid or missing X-Signature"}

        async with session.get(demo.proxy + "/webhook") as resp:
            assert resp.status == 405

        async with session.get(demo.proxy + "/elsewhere") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "no_route"


async def test_sigint_stops_cleanly_and_no_credential_reaches_the_output(demo: Demo) -> None:
    # The check below must be able to see the demo's keys if they were printed.
    sample = demo_caller()
    assert credential_shaped(sample.secret_access_key) == [sample.secret_access_key]
    assert credential_shaped(sample.session_token or "") == [sample.session_token]

    async with aiohttp.ClientSession() as session:
        for url in (
            demo.proxy + "/hello?name=John",
            demo.proxy + "/hello",
            demo.proxy + "/api/health",
            demo.hello_function + "/?name=John",  # unsigned: logged as a 403
        ):
            async with session.get(url) as resp:
                await resp.read()
        async with session.get(demo.proxy + "/api/health") as resp:
            access_key = (await resp.json())["caller"]["accessKey"]

    assert await demo.stop(signal.SIGINT) == 0
    out, err = "".join(demo.stdout), demo.log()
    assert "Traceback" not in err, err
    assert "GET /hello 200" in err  # the access log was captured
    assert credential_shaped(out) == [], out
    assert credential_shaped(err) == [], err
    # The access key id is not secret, but nothing needs to print it either.
    assert access_key not in out + err


async def test_port_taken_exits_2_with_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "sigproxy", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            env=demo_env(),
            cwd=ROOT,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sigproxy: error: cannot listen on 127.0.0.1:{port}"), lines[0]
    assert "Traceback" not in result.stderr


def test_port_out_of_range_has_no_port_taken_hint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sigproxy", "demo", "--port", "70000"],
        capture_output=True,
        text=True,
        env=demo_env(),
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sigproxy: error: "), result.stderr
    assert "must be between 0 and 65535" in lines[0]
    assert "another program has the port" not in lines[0]


async def test_cors_origin_lets_a_page_on_that_origin_call_the_demo() -> None:
    """sigproxy demo --cors-origin http://localhost:3000: a page there can call the
    functions through the proxy (preflight answered, response readable); other origins
    still cannot."""
    async with start_demo("--port", "0", "--cors-origin", "http://localhost:3000") as demo:
        async with aiohttp.ClientSession() as session:
            preflight = {
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            }
            async with session.options(demo.proxy + "/api/process", headers=preflight) as resp:
                assert resp.status == 204
                assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
            async with session.get(
                demo.proxy + "/hello?name=Page", headers={"Origin": "http://localhost:3000"}
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
                assert await resp.json() == {"message": "Hello, Page!"}
            async with session.get(
                demo.proxy + "/hello?name=x", headers={"Origin": "http://evil.example"}
            ) as resp:
                assert resp.status == 403
        assert await demo.stop() == 0


def test_the_newman_script_waits_for_the_line_the_demo_prints() -> None:
    """CI's Postman run knows the demo is ready by its last line: the two must agree."""
    script = (Path(__file__).resolve().parent.parent / "examples/postman/run-newman.sh").read_text()
    grep_pattern = "'^" + READY.replace(".", "\\.") + "'"  # a basic regex, as grep reads it
    assert grep_pattern in script
