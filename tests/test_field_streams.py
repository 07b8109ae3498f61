"""Field test of the new HTTP/1.1 layer (``sigproxy/http1.py``, ``sigproxy/upstream.py``)
for streamed answers, MCP traffic and browsers: the real ``sigproxy serve`` process on
loopback, a scripted raw upstream whose every byte and every close is under the test's
control (SSE heads, events with gaps, silence, resets, truncations), and the real clients
found on the machine (curl, urllib, Node's fetch, the ``mcp`` SDK, headless Chromium).

Timeouts are scaled down: a silence of a second or two stands for the minutes an MCP
``GET`` stream may be quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import shutil
import signal
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .support import Recorded, verify_sigv4
from .test_browser import Page, headless_chromium
from .test_browser import chromium_binary as chromium_binary_fixture  # noqa: F401
from .test_browser import page as page_fixture  # noqa: F401
from .test_holes import connect, parse, recv_to_end, send, until
from .test_http1_adversarial import Upstream, raw_upstream
from .test_operations import scrape, value
from .test_process import serve_process, write

REGION = "us-east-1"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Access-Control-Allow-Origin: *\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(n: int) -> bytes:
    return b'id: %d\ndata: {"n": %d}\n\n' % (n, n)


# --------------------------------------------------------------- a scripted upstream

# (request, reader, writer, upstream) -> keep the connection for another request?
Route = Callable[
    [Recorded, asyncio.StreamReader, asyncio.StreamWriter, "Scripted"], Awaitable[bool]
]


@dataclass
class Scripted:
    """A raw loopback upstream (test_http1_adversarial's): each request goes to the route
    named by its path's first segment. It records every request, how many connections
    were opened, and when the proxy closed a connection that was in the middle of an
    answer (``abandoned``)."""

    routes: dict[str, Route]
    raw: Upstream | None = None
    abandoned: list[float] = field(default_factory=list)

    @property
    def requests(self) -> list[Recorded]:
        assert self.raw is not None
        return self.raw.requests

    @property
    def opened(self) -> int:
        assert self.raw is not None
        return self.raw.opened

    @property
    def port(self) -> int:
        assert self.raw is not None
        return self.raw.port

    def paths(self) -> list[str]:
        return [r.raw_target for r in self.requests]


async def hold_open(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, up: Scripted
) -> bool:
    """Stay silent until the proxy closes the connection; record when it did."""
    with contextlib.suppress(ConnectionError):
        await reader.read()
    up.abandoned.append(time.monotonic())
    return False


def rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.asynccontextmanager
async def scripted(routes: dict[str, Route]) -> AsyncIterator[Scripted]:
    up = Scripted(routes)

    async def answer(
        rec: Recorded, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        name = rec.raw_target.split("?")[0].strip("/").split("/")[0]
        return await up.routes[name](rec, reader, writer, up)

    async with raw_upstream(answer) as raw:
        up.raw = raw
        yield up


async def json_route(
    rec: Recorded, reader: Any, writer: asyncio.StreamWriter, up: Scripted
) -> bool:
    body = json.dumps({"target": rec.raw_target}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    writer.write(head if rec.method == "HEAD" else head + body)
    await writer.drain()
    return True


async def nocontent_route(
    rec: Recorded, reader: Any, writer: asyncio.StreamWriter, up: Scripted
) -> bool:
    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    await writer.drain()
    return True


def events_route(count: int, gap: float) -> Route:
    """``count`` events, ``gap`` seconds apart, then the chunked body's clean end."""

    async def route(rec: Recorded, reader: Any, writer: asyncio.StreamWriter, up: Scripted) -> bool:
        writer.write(SSE_HEAD)
        for n in range(count):
            writer.write(chunk(event(n)))
            await writer.drain()
            await asyncio.sleep(gap)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    return route


async def silent_route(
    rec: Recorded, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted
) -> bool:
    """An MCP GET stream: one event, then silence until the proxy lets go."""
    writer.write(SSE_HEAD + chunk(event(0)))
    await writer.drain()
    return await hold_open(writer, reader, up)


async def hang_route(
    rec: Recorded, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted
) -> bool:
    """No answer at all until the proxy lets go."""
    return await hold_open(writer, reader, up)


async def cut_route(rec: Recorded, reader: Any, writer: asyncio.StreamWriter, up: Scripted) -> bool:
    """Two events, then a reset: the function crashed mid-stream."""
    writer.write(SSE_HEAD + chunk(event(0)) + chunk(event(1)))
    await writer.drain()
    await asyncio.sleep(0.2)
    rst(writer)
    return False


async def short_route(
    rec: Recorded, reader: Any, writer: asyncio.StreamWriter, up: Scripted
) -> bool:
    """Content-Length 1000, 100 bytes, then a clean FIN: a truncated sized answer."""
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
        + b"s" * 100
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    return False


def config(port: int, *, upstream_extra: str = "", extra: str = "") -> str:
    return (
        "admin: {port: 0}\n"
        "client_timeouts: {header: 2, body: 2}\n"
        "grace_period: 1\n"
        f"{extra}"
        "upstreams:\n"
        "  - name: fn\n"
        f"    url: http://127.0.0.1:{port}\n"
        f"    region: {REGION}\n"
        "    timeout: {connect: 2, read: 30, idle: 5}\n"
        f"{upstream_extra}"
    )


def get(path: str, port: int, *, version: str = "1.1", extra: str = "") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()


async def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while marker not in data:
            piece = await loop.sock_recv(sock, 1 << 16)
            assert piece, f"closed before {marker!r}: {data!r}"
            data += piece
    return data


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """The chunked body's data and whether it ended with the last chunk."""
    out = b""
    rest = body
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return out, False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out, rest.startswith(b"\r\n")
        if len(rest) < size + 2:
            return out + rest[:size], False
        out += rest[:size]
        rest = rest[size + 2 :]
    return out, False


# ------------------------------------------------ 1. clients leaving a silent stream


async def test_a_client_leaving_a_silent_event_stream_frees_the_upstream_and_its_slot(
    tmp_path: Path,
) -> None:
    """An MCP client closes its standalone GET stream (the user quits the IDE) during a
    silence: nothing is written to it, so only the read side can notice. The upstream
    request must end at once, and the only upstream connection allowed
    (max_connections: 1) must serve the next request, not make it wait for a 503."""
    async with scripted({"events": silent_route, "json": json_route}) as up:
        cfg = config(up.port, upstream_extra="    max_connections: 1\n")
        async with serve_process(write(tmp_path, cfg)) as served:
            sock = await connect(served.port)
            try:
                await send(sock, get("/events", served.port))
                first = await read_until(sock, b"data:")
                assert first.startswith(b"HTTP/1.1 200 ")
                await asyncio.sleep(0.3)  # silence
            finally:
                sock.close()
            left = time.monotonic()
            assert await until(lambda: bool(up.abandoned), 3), "the upstream stream was kept open"
            assert up.abandoned[0] - left < 1.0
            t0 = time.monotonic()
            data, _ = await recv_to_end_after(
                served.port, get("/json/after", served.port, extra="Connection: close\r\n")
            )
            assert (await parse(data)).status == 200, data[:200]
            assert time.monotonic() - t0 < 1.0
            m = await scrape(served.admin_port or 0)
            assert value(m, "sigproxy_requests_in_flight") == 0
            assert await served.stop() == 0
    assert "Traceback" not in served.log()


async def recv_to_end_after(port: int, data: bytes) -> tuple[bytes, str]:
    sock = await connect(port)
    try:
        await send(sock, data)
        return await recv_to_end(sock)
    finally:
        sock.close()


async def test_a_client_that_pipelined_behind_a_silent_stream_and_left_frees_the_upstream(
    tmp_path: Path,
) -> None:
    """The same, from a client that had sent its next request right behind the stream's
    (HTTP/1.1 pipelining; or any client that writes ahead). The proxy stops reading
    while two requests are queued, so it must still notice the client leaving, or the
    upstream stream (a Lambda invocation, billed) runs on for as long as it stays silent:
    up to timeout.read, 15 minutes."""
    async with scripted({"events": silent_route, "json": json_route}) as up:
        cfg = config(up.port, upstream_extra="    max_connections: 1\n")
        async with serve_process(write(tmp_path, cfg)) as served:
            sock = await connect(served.port)
            try:
                await send(sock, get("/events", served.port) + get("/json/next", served.port))
                await read_until(sock, b"data:")
                await asyncio.sleep(0.3)
            finally:
                sock.close()
            left = time.monotonic()
            ended = await until(lambda: bool(up.abandoned), 3)
            assert ended, "the upstream stream was still held 3 s after its client left"
            assert up.abandoned[0] - left < 1.0
            assert await served.stop() == 0


# --------------------------------------------- 2. keep-alive and pipelining after SSE


async def test_pipelined_requests_after_an_event_stream_are_answered_in_order_on_one_upstream_connection(
    tmp_path: Path,
) -> None:
    """GET of an SSE stream with gaps, then a JSON GET, a HEAD and a 204, all pipelined
    in one write: each answered in order on the same client connection, the stream whole
    (every event, the chunked end), and the upstream connection reused for all four."""
    routes = {"events": events_route(3, 0.15), "json": json_route, "nocontent": nocontent_route}
    async with scripted(routes) as up:
        async with serve_process(write(tmp_path, config(up.port))) as served:
            p = served.port
            sock = await connect(p)
            try:
                await send(
                    sock,
                    get("/events", p)
                    + get("/json/1", p)
                    + f"HEAD /json/2 HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n".encode()
                    + get("/nocontent", p, extra="Connection: close\r\n"),
                )
                data, how = await recv_to_end(sock, idle=3)
            finally:
                sock.close()
            assert how == "fin", (how, data[-200:])
            first, rest = data.split(b"\r\n\r\n", 1)
            assert first.startswith(b"HTTP/1.1 200 ")
            assert b"transfer-encoding: chunked" in first.lower()
            body, ended = dechunk(rest)
            assert ended
            assert body == event(0) + event(1) + event(2)
            tail = rest[rest.index(b"0\r\n\r\n") + 5 :]
            statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", tail)]
            assert statuses == [200, 200, 204], tail
            assert b'{"target": "/json/1"}' in tail
            assert up.paths() == ["/events", "/json/1", "/json/2", "/nocontent"]
            assert [r.method for r in up.requests] == ["GET", "GET", "HEAD", "GET"]
            assert up.opened == 1, "the upstream connection was not reused after the stream"
            verify_sigv4(up.requests[0], region=REGION)
            assert await served.stop() == 0


# ---------------------------------- 3. real clients: a cut stream is never a clean end

CLIENT_ROUTES: dict[str, Route] = {
    "clean": events_route(3, 0.1),
    "cut": cut_route,
    "short": short_route,
}

NODE_READ = """
(async () => {
  const r = await fetch(process.argv[1]);
  const reader = r.body.getReader();
  let n = 0;
  try {
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      n += value.length;
    }
    console.log(JSON.stringify({status: r.status, ok: true, n}));
  } catch (e) {
    console.log(JSON.stringify({status: r.status, ok: false, n, error: String(e.cause || e)}));
  }
})();
"""


def urllib_read(url: str) -> tuple[bool, int, str]:
    """(whole, bytes read, what went wrong)."""
    got = b""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (http://127.0.0.1)
            while piece := resp.read1(1 << 16):
                got += piece
        return True, len(got), ""
    except (http.client.IncompleteRead, ConnectionError, urllib.error.URLError) as exc:
        return False, len(got), type(exc).__name__


async def run_client(kind: str, url: str) -> tuple[bool, int | None, str]:
    """Read ``url`` to its end with a real client: (whole, bytes, detail)."""
    if kind == "urllib":
        whole, n, detail = await asyncio.to_thread(urllib_read, url)
        return whole, n, detail
    if kind == "curl":
        argv = [
            "curl",
            "-sS",
            "-N",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            url,
        ]
    else:
        argv = ["node", "-e", NODE_READ, url]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    if kind == "curl":
        return (
            proc.returncode == 0,
            int(out or 0),
            f"exit {proc.returncode}: {err.decode().strip()}",
        )
    result = json.loads(out)
    assert result["status"] == 200, result
    return result["ok"], result["n"], result.get("error", "")


@pytest.mark.parametrize("kind", ["curl", "urllib", "node"])
async def test_real_clients_see_a_cut_or_truncated_stream_as_an_error_and_a_whole_one_as_whole(
    tmp_path: Path, kind: str
) -> None:
    if kind != "urllib" and shutil.which(kind) is None:
        pytest.skip(f"{kind} is not installed")
    async with scripted(CLIENT_ROUTES) as up:
        async with serve_process(write(tmp_path, config(up.port))) as served:
            whole, n, detail = await run_client(kind, f"{served.url}/clean")
            assert whole, detail
            assert n == len(event(0) + event(1) + event(2))
            # An SSE stream the function's crash reset after two events.
            whole, n, detail = await run_client(kind, f"{served.url}/cut")
            assert not whole, f"{kind} took a reset stream for a whole one ({n} bytes)"
            # A sized answer whose upstream closed 900 bytes early.
            whole, n, detail = await run_client(kind, f"{served.url}/short")
            assert not whole, f"{kind} took a truncated answer for a whole one ({n} bytes)"
            assert await served.stop() == 0
    assert "Traceback" not in served.log()


# ------------------------------------------------------- 4. CORS on streams and errors

ORIGIN = "http://localhost:5173"
CORS = (
    "    cors:\n"
    "      allow_origins: ['http://localhost:*']\n"
    "      allow_methods: [GET, POST, DELETE]\n"
    "      allow_headers: [content-type, mcp-session-id, mcp-protocol-version, last-event-id]\n"
    "      expose_headers: [mcp-session-id, x-request-id]\n"
)


def cors_config(port: int, closed: int) -> str:
    def one(name: str, url_port: int, extra: str) -> str:
        base = "/hang" if name == "slow" else ""
        return (
            f"  - name: {name}\n    url: http://127.0.0.1:{url_port}{base}\n    region: {REGION}\n"
            + extra
            + CORS
        )

    return (
        "admin: {port: 0}\n"
        "upstreams:\n"
        + one("fn", port, "")
        + one(
            "slow",
            port,
            "    path_prefix: /slow\n    timeout: {read: 0.5}\n    retries: {attempts: 1}\n",
        )
        + one("down", closed, "    path_prefix: /down\n    retries: {attempts: 1}\n")
    )


async def ask(
    port: int, method: str, path: str, headers: list[tuple[str, str]], host: str | None = None
) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host or f'127.0.0.1:{port}'}",
        "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in headers]
    data, _ = await recv_to_end_after(port, ("\r\n".join(lines) + "\r\n\r\n").encode())
    return data


async def test_cors_headers_on_streamed_answers_and_on_errors_before_the_head(
    tmp_path: Path,
) -> None:
    """A page's fetch() of an SSE stream gets the policy's CORS headers on the streamed
    answer (the upstream's own `*` replaced), and on a 502 and a 504 made before any
    byte came, so the page can read why it failed. Origin: null (a sandboxed frame, a
    file:// page), preflights included, is refused and never forwarded; a rebinding Host
    is refused whatever the Origin."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    async with scripted({"events": events_route(2, 0.05), "hang": hang_route}) as up:
        async with serve_process(write(tmp_path, cors_config(up.port, closed))) as served:
            p = served.port
            o = [
                ("Origin", ORIGIN),
                ("Sec-Fetch-Site", "same-site"),
                ("Accept", "text/event-stream"),
            ]

            resp = await parse(await ask(p, "GET", "/events", o))
            assert resp.status == 200
            assert [v for k, v in resp.headers if k.lower() == "access-control-allow-origin"] == [
                ORIGIN
            ]
            assert "origin" in (resp.header("Vary") or "").lower()
            assert "mcp-session-id" in (resp.header("Access-Control-Expose-Headers") or "")
            assert resp.body == event(0) + event(1)

            for path, status, code in (
                ("/down/x", 502, "upstream_unreachable"),
                ("/slow/x", 504, "upstream_timeout"),
            ):
                resp = await parse(await ask(p, "GET", path, o))
                assert resp.status == status, resp.body
                assert json.loads(resp.body)["error"] == code
                assert resp.header("Access-Control-Allow-Origin") == ORIGIN, (path, resp.headers)
                assert "x-request-id" in (resp.header("Access-Control-Expose-Headers") or "")

            forwarded = len(up.requests)
            resp = await parse(
                await ask(
                    p, "POST", "/events", [("Origin", "null"), ("Content-Type", "text/plain")]
                )
            )
            assert resp.status == 403 and json.loads(resp.body)["error"] == "origin_not_allowed"
            assert resp.header("Access-Control-Allow-Origin") is None
            pre = [
                ("Origin", "null"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type"),
            ]
            resp = await parse(await ask(p, "OPTIONS", "/events", pre))
            assert resp.status == 403 and json.loads(resp.body)["error"] == "cors_refused"
            assert resp.header("Access-Control-Allow-Origin") is None

            pre = [
                ("Origin", ORIGIN),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "content-type,mcp-session-id,mcp-protocol-version",
                ),
            ]
            resp = await parse(await ask(p, "OPTIONS", "/events", pre))
            assert resp.status == 204
            assert resp.header("Access-Control-Allow-Origin") == ORIGIN
            allowed = (
                (resp.header("Access-Control-Allow-Headers") or "").replace(" ", "").split(",")
            )
            assert set(allowed) >= {"content-type", "mcp-session-id", "mcp-protocol-version"}
            resp = await parse(
                await ask(p, "OPTIONS", "/events", pre, host="rebind.attacker.example:8080")
            )
            assert resp.status == 421
            resp = await parse(
                await ask(p, "GET", "/events", o, host="rebind.attacker.example:8080")
            )
            assert resp.status == 421
            assert len(up.requests) == forwarded, "a refused request reached the upstream"
            assert await served.stop() == 0


# ------------------------------------------------------------- 5. SIGTERM mid-stream


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_a_stream_cut_by_the_grace_period_is_never_a_clean_end(
    tmp_path: Path, version: str
) -> None:
    """systemd stops sigproxy (SIGTERM) while an MCP GET stream is open and silent; after
    grace_period (1 s) the stream is cut. The client must see a cut, not a clean end: for
    HTTP/1.1 a chunked body without its last chunk, for HTTP/1.0 (where the body ends
    when the connection does) a reset, as the README promises for upstream failures."""
    async with scripted({"events": silent_route}) as up:
        async with serve_process(write(tmp_path, config(up.port))) as served:
            sock = await connect(served.port)
            try:
                await send(sock, get("/events", served.port, version=version))
                first = await read_until(sock, b"data:")
                t0 = time.monotonic()
                served.proc.send_signal(signal.SIGTERM)
                rest, how = await recv_to_end(sock, idle=5)
            finally:
                sock.close()
            assert time.monotonic() - t0 < 4
            # It exits on its own: a second SIGTERM would test something else.
            assert await asyncio.wait_for(served.proc.wait(), 10) == 0
    head, body = (first + rest).split(b"\r\n\r\n", 1)
    if version == "1.1":
        assert b"chunked" in head.lower()
        assert not dechunk(body)[1], "the cut stream ended with the last chunk"
    else:
        assert b"chunked" not in head.lower()
        assert how == "rst", f"an HTTP/1.0 stream cut at the grace period ended with a {how}"


# ------------------------------------------------------ 6. a real browser (Chromium)


STREAM_PAGE = """<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">
</head><body><pre id="result"></pre><script>
(async () => {
  const out = document.getElementById("result");
  const res = {};
  const t0 = performance.now();
  try {
    const r = await fetch(%(events)s, {headers: {accept: "text/event-stream"}});
    res.status = r.status;
    res.requestId = r.headers.get("x-request-id");
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    res.chunks = [];
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      res.chunks.push([performance.now() - t0, dec.decode(value)]);
    }
  } catch (e) { res.error = e.name + ": " + e.message; }
  try {
    const r = await fetch(%(cut)s);
    const reader = r.body.getReader();
    let n = 0;
    for (;;) { const {done, value} = await reader.read(); if (done) break; n += value.length; }
    res.cut = {whole: true, n};
  } catch (e) { res.cut = {whole: false, error: e.name + ": " + e.message}; }
  out.textContent = JSON.stringify(res);
  out.dataset.done = "1";
})();
</script></body></html>"""

DONE_JS = """(() => { const el = document.getElementById("result");
  return el && el.dataset.done ? el.textContent : null; })()"""


async def browse(binary: str, workdir: Path, page: Page, html: str) -> dict[str, Any]:
    page.html = html
    async with asyncio.timeout(60), headless_chromium(binary, workdir) as devtools:
        nav = await devtools.call("Page.navigate", url=page.origin + "/")
        assert not nav.get("errorText"), nav
        deadline = time.monotonic() + 20
        while (text := await devtools.evaluate(DONE_JS)) is None:
            assert time.monotonic() < deadline, devtools.console_errors()
            await asyncio.sleep(0.1)
        result: dict[str, Any] = json.loads(text)
        result["console"] = devtools.console_errors()
        return result


def browser_config(port: int, cors: str) -> str:
    return (
        "admin: {port: 0}\n"
        "upstreams:\n"
        f"  - name: fn\n    url: http://127.0.0.1:{port}\n    region: {REGION}\n" + cors
    )


async def test_a_page_reads_an_event_stream_as_it_comes_and_sees_a_cut_one_fail(
    chromium_binary_fixture: str,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    page_fixture: Page,  # noqa: F811
) -> None:
    """Headless Chromium, a page on another loopback origin: fetch() of an SSE stream
    through the real sigproxy gets each event as the function sends it (0.3 s apart,
    not all at the end), with CORS on the streamed answer; a stream the function's
    crash resets makes the page's reader reject, never end as if whole."""
    cors = "    cors:\n      allow_origins: ['http://127.0.0.1:*']\n"
    async with scripted({"events": events_route(4, 0.3), "cut": cut_route}) as up:
        async with serve_process(write(tmp_path, browser_config(up.port, cors))) as served:
            html = STREAM_PAGE % {
                "events": json.dumps(f"{served.url}/events"),
                "cut": json.dumps(f"{served.url}/cut"),
            }
            result = await browse(chromium_binary_fixture, tmp_path, page_fixture, html)
            assert await served.stop() == 0
    assert "error" not in result, result
    assert result["status"] == 200
    assert result["requestId"], "X-Request-Id not exposed on the streamed answer"
    text = "".join(c for _, c in result["chunks"])
    assert text == "".join(event(n).decode() for n in range(4))
    times = [t for t, _ in result["chunks"]]
    assert len(times) >= 3 and times[-1] - times[0] > 600, result["chunks"]  # streamed
    assert result["cut"]["whole"] is False, result["cut"]
    assert result["cut"]["error"].startswith("TypeError"), result["cut"]
    assert [r.raw_target for r in up.requests] == ["/events", "/cut"]


MCP_PAGE = """<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">
</head><body><pre id="result"></pre><script>
(async () => {
  const out = document.getElementById("result");
  const url = %(url)s;
  const accept = "application/json, text/event-stream";
  const res = {};
  try {
    const init = {jsonrpc: "2.0", id: 1, method: "initialize", params: {
      protocolVersion: "2025-06-18", capabilities: {},
      clientInfo: {name: "page", version: "1"}}};
    const r1 = await fetch(url, {method: "POST", body: JSON.stringify(init),
      headers: {"content-type": "application/json", accept}});
    res.status1 = r1.status;
    res.session = r1.headers.get("mcp-session-id");
    res.body1 = await r1.text();
    const r2 = await fetch(url, {method: "POST",
      body: JSON.stringify({jsonrpc: "2.0", method: "notifications/initialized"}),
      headers: {"content-type": "application/json", accept,
                "mcp-session-id": String(res.session), "mcp-protocol-version": "2025-06-18"}});
    res.status2 = r2.status;
    const r3 = await fetch(url, {method: "DELETE",
      headers: {"mcp-session-id": String(res.session), "mcp-protocol-version": "2025-06-18"}});
    res.status3 = r3.status;
  } catch (e) { res.error = e.name + ": " + e.message; }
  out.textContent = JSON.stringify(res);
  out.dataset.done = "1";
})();
</script></body></html>"""

SESSION = "sess-4f1c9a7e"


async def mcp_route(rec: Recorded, reader: Any, writer: asyncio.StreamWriter, up: Scripted) -> bool:
    """A Streamable HTTP MCP server: initialize answered over SSE with a session id,
    the notification with 202, DELETE with 204."""
    if rec.method == "DELETE":
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    elif b'"initialize"' in rec.body:
        answer = b'{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-06-18","capabilities":{},"serverInfo":{"name":"s","version":"1"}}}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nMcp-Session-Id: "
            + SESSION.encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk(b"event: message\ndata: " + answer + b"\n\n")
            + b"0\r\n\r\n"
        )
    else:
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    return True


def readme_mcp_cors() -> str:
    """The ``cors:`` block the README's MCP section gives browser clients, as it is
    written there, with the page's origin for the one it names."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## MCP servers on Lambda behind IAM") :]
    block = section[section.index("```yaml\n    cors:") + len("```yaml\n") :]
    block = block[: block.index("```")]
    lines = [line.split("#", 1)[0].rstrip() for line in block.splitlines()]
    assert any(line.strip().startswith("allow_origins:") for line in lines), block
    lines = [
        "      allow_origins: ['http://127.0.0.1:*']"
        if line.strip().startswith("allow_origins:")
        else line
        for line in lines
    ]
    return "\n".join(lines) + "\n"


async def test_a_browser_mcp_client_set_up_as_the_readme_says_can_hold_a_session(
    chromium_binary_fixture: str,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    page_fixture: Page,  # noqa: F811
) -> None:
    """README, MCP section: the ``cors:`` block it gives clients running in a browser
    page. A browser MCP client (Streamable HTTP: POST with Content-Type
    application/json, Mcp-Session-Id and MCP-Protocol-Version on later requests, DELETE
    at the end) set up that way must initialize, read the session id the server gave and
    send it back. (Found: the README asked only for the origin; the page then could not
    read Mcp-Session-Id, and every request after initialize failed its preflight.)"""
    cors = readme_mcp_cors()
    async with scripted({"mcp": mcp_route}) as up:
        async with serve_process(write(tmp_path, browser_config(up.port, cors))) as served:
            html = MCP_PAGE % {"url": json.dumps(f"{served.url}/mcp")}
            result = await browse(chromium_binary_fixture, tmp_path, page_fixture, html)
            assert await served.stop() == 0
    assert "error" not in result, (result["error"], result["console"][-3:])
    assert result["status1"] == 200 and '"serverInfo"' in result["body1"]
    assert result["session"] == SESSION, "the page could not read Mcp-Session-Id"
    assert (result["status2"], result["status3"]) == (202, 204)
    assert [r.method for r in up.requests] == ["POST", "POST", "DELETE"]
    assert [r.header("Mcp-Session-Id") for r in up.requests] == [None, SESSION, SESSION]
    for rec in up.requests:
        verify_sigv4(rec, region=REGION)


# ------------------------------------------------------------- 7. the mcp SDK client


async def test_many_mcp_sessions_at_once_and_one_abandoned_mid_tool_call(tmp_path: Path) -> None:
    """Six MCP clients (the ``mcp`` SDK) at once through sigproxy to the SDK's stateful
    server, each calling a tool that reports progress over its SSE answer, and a seventh
    that is killed mid-call (the user closes the IDE). Every progress notification
    arrives in order for each, every request is signed, each session ends with its
    DELETE, and once the clients are gone no request is left in flight in sigproxy."""
    pytest.importorskip("mcp")
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp_types import TextContent

    from .test_mcp import SigV4Recorder, mcp_server, serve_asgi, sigproxy_config

    finished: list[float] = []
    recorder = SigV4Recorder(mcp_server(finished).streamable_http_app())

    async def one(url: str, steps: int, progress: list[float]) -> str:
        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        async with (
            streamable_http_client(url) as (read, write_stream),
            ClientSession(read, write_stream) as session,
        ):
            await session.initialize()
            result = await session.call_tool(
                "count", {"steps": steps}, progress_callback=on_progress
            )
            assert isinstance(result.content[0], TextContent)
            return result.content[0].text

    async with serve_asgi(recorder) as mcp_port:
        async with serve_process(write(tmp_path, sigproxy_config(mcp_port))) as served:
            url = f"{served.url}/mcp"
            progress: list[list[float]] = [[] for _ in range(7)]
            abandoned = asyncio.create_task(one(url, 20, progress[6]))
            results = await asyncio.wait_for(
                asyncio.gather(*(one(url, 3, progress[i]) for i in range(6))), 30
            )
            assert results == ["counted to 3"] * 6
            assert all(p == [1, 2, 3] for p in progress[:6]), progress
            assert await until(lambda: len(progress[6]) >= 2, 10)
            abandoned.cancel()
            with contextlib.suppress(asyncio.CancelledError, BaseExceptionGroup):
                await abandoned
            left = time.monotonic()
            in_flight = -1.0
            while time.monotonic() - left < 3:
                in_flight = value(
                    await scrape(served.admin_port or 0), "sigproxy_requests_in_flight"
                )
                if in_flight == 0:
                    break
                await asyncio.sleep(0.1)
            assert in_flight == 0, "requests of the abandoned client were still in flight 3 s later"
            assert await served.stop() == 0
    problems = [(e.request.method, e.problem) for e in recorder.exchanges if e.problem]
    assert not problems, problems
    assert len(recorder.named("DELETE")) >= 6
    assert "Traceback" not in served.log()


async def flood_route(
    rec: Recorded, reader: Any, writer: asyncio.StreamWriter, up: Scripted
) -> bool:
    """A stream with no end, as fast as the proxy takes it; records when it is let go."""
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(chunk(b"f" * 65536))
            await writer.drain()
    up.abandoned.append(time.monotonic())
    return False


async def test_a_client_that_stops_reading_is_cut_after_client_timeouts_write(
    tmp_path: Path,
) -> None:
    """A client that takes in nothing of a stream (a suspended process, a stuck reader)
    is cut with a reset after client_timeouts.write, and the upstream stream it held (the
    only connection allowed) is let go and serves the next request."""
    async with scripted({"flood": flood_route, "json": json_route}) as up:
        cfg = config(
            up.port,
            upstream_extra="    max_connections: 1\n",
            extra="client_timeouts: {header: 2, body: 2, write: 1}\n",
        ).replace("client_timeouts: {header: 2, body: 2}\n", "", 1)
        async with serve_process(write(tmp_path, cfg)) as served:
            sock = await connect(served.port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                await send(sock, get("/flood", served.port))
                head = await read_until(sock, b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                stopped = time.monotonic()  # and reads nothing more
                assert await until(lambda: bool(up.abandoned), 8), "the stream was held"
                assert up.abandoned[0] - stopped < 6
                _, end = await recv_to_end(sock, idle=1, limit=60)
                assert end == "rst", f"the client saw {end}, not a reset"
            finally:
                sock.close()
            data, _ = await recv_to_end_after(
                served.port, get("/json/after", served.port, extra="Connection: close\r\n")
            )
            assert (await parse(data)).status == 200, data[:200]
            assert await served.stop() == 0
    log = served.log()
    assert "took in nothing of its answer for 1s (client_timeouts.write)" in log
    assert "Traceback" not in log
