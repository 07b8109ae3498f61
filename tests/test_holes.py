"""Issue 10: the holes a web page, a client or an upstream could use, each pinned to the
contract of the issue, one section per item: the Host allow-list (DNS rebinding), CLI and
reload overrides, request heads and connection caps, the body memory budget, upstream
connection limits, cross-site requests, admission order, truncated bodies, upstream
oddities, transfer codings, the access log and what error bodies may echo.

Everything runs against real ``sigproxy serve`` processes, real loopback servers (the
fake Function URL, or raw asyncio servers where the bytes matter) and raw sockets where a
client library would normalise what is sent or hide how a connection ended (RST vs FIN).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import one_upstream
from .support import (
    FakeFunctionUrl,
    RawResponse,
    Recorded,
    loopback_server,
    raw_request,
    read_response,
    verify_sigv4,
)
from .test_adversarial import to_recorded
from .test_process import (
    ROOT,
    creds_env,
    peak_rss_kib,
    run_cli,
    serve_process,
    write,
)

AiohttpServer = Callable[..., Awaitable[TestServer]]

# An inbound_auth token; "never-LOGGED" makes CI's secrets grep look for it in the logs.
TOKEN = "inbound-token-never-LOGGED-issue10-0001"
BEARER = ("Authorization", f"Bearer {TOKEN}")
REBIND = "rebind.attacker.example:8080"
MIB = 1 << 20

# ------------------------------------------------------------------------------ helpers


def loopback(port: int) -> str:
    """The Host a client sends when it talks to the proxy at 127.0.0.1."""
    return f"127.0.0.1:{port}"


def http(
    method: str,
    target: str | bytes,
    *,
    host: str | None,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    version: str = "1.1",
    close: bool = True,
    extra: bytes = b"",
) -> bytes:
    """One request's bytes, exactly as given (``host=None``: no Host header at all);
    ``extra`` is appended raw to the header block (non-UTF-8 values)."""
    target_bytes = target if isinstance(target, bytes) else target.encode()
    lines = [method.encode() + b" " + target_bytes + b" HTTP/" + version.encode()]
    all_headers = [] if host is None else [("Host", host)]
    if close:
        all_headers.append(("Connection", "close"))
    all_headers += headers or []
    if body is not None:
        all_headers.append(("Content-Length", str(len(body))))
    lines += [f"{k}: {v}".encode("latin-1") for k, v in all_headers]
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n" + (body or b"")


async def recv_to_end(
    sock: socket.socket, *, idle: float = 2.0, limit: float = 10.0
) -> tuple[bytes, str]:
    """Everything the peer sends, and how the connection ended: ``fin`` (clean close),
    ``rst`` (reset: the kernel hands over the data that came before it, then
    ECONNRESET) or ``open`` (silent for ``idle`` s, or ``limit`` s in all)."""
    loop = asyncio.get_running_loop()
    out = b""
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out, "open"
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), min(idle, left))
        except TimeoutError:
            return out, "open"
        except ConnectionResetError:
            return out, "rst"
        if not chunk:
            return out, "fin"
        out += chunk


async def connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def send(sock: socket.socket, data: bytes) -> None:
    """Send, ignoring a peer that already closed (what it answered is read after)."""
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), 10)


async def talk(port: int, data: bytes, *, idle: float = 2.0) -> tuple[bytes, str]:
    """Send raw bytes on a new connection; what came back and how the connection ended."""
    sock = await connect(port)
    try:
        await send(sock, data)
        return await recv_to_end(sock, idle=idle)
    finally:
        sock.close()


async def parse(data: bytes) -> RawResponse:
    """The first response in ``data`` (bytes read until the connection ended)."""
    assert data, "no response at all"
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_response(reader)


def check_error(
    resp: RawResponse, status: int, code: str, *, request_id: bool | None = True
) -> dict[str, object]:
    """A JSON error answer; ``request_id``: True must be there (and match X-Request-Id),
    False must not be there (no request existed yet), None either way."""
    assert resp.status == status, (resp.status, resp.body[:300])
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp.headers
    body: dict[str, object] = json.loads(resp.body)
    assert body["error"] == code, body
    assert isinstance(body.get("message"), str)
    if request_id is True:
        assert body.get("request_id"), body
        assert body["request_id"] == resp.header("X-Request-Id")
    elif request_id is False:
        assert "request_id" not in body, body
    return body


async def ask(
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    *,
    host: str | None = None,
) -> RawResponse:
    """One request on its own connection (Host 127.0.0.1:<port> unless given)."""
    return await asyncio.wait_for(
        raw_request(port, method, target, headers, body, host=host or loopback(port)), 15
    )


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait (bounded) for ``pred``; whether it came true."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close a server-side connection with a reset instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def ok_reply(body: bytes, *, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


# A keep-alive raw upstream, scripted per request: (connection, request number on it,
# request) -> (reply, late) where late bytes are written 0.2 s after the reply; a reply
# of None closes the connection. It records when the proxy closed each connection.
Script = Callable[[int, int, Recorded], tuple[bytes | None, bytes | None]]


def fresh(conn: int, n: int, rec: Recorded) -> tuple[bytes | None, bytes | None]:
    body = json.dumps({"conn": conn, "n": n, "target": rec.raw_target}).encode()
    return ok_reply(body), None


@dataclass
class KeepAliveUpstream:
    script: Script
    got: list[tuple[int, Recorded]] = field(default_factory=list)
    opened: int = 0
    closed_by_proxy: set[int] = field(default_factory=set)
    port: int = 0


@contextlib.asynccontextmanager
async def keepalive_upstream(script: Script = fresh) -> AsyncIterator[KeepAliveUpstream]:
    up = KeepAliveUpstream(script)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = up.opened
        up.opened += 1
        n = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    up.closed_by_proxy.add(conn)
                    return
                rec = to_recorded(head, b"")
                length = int(rec.header("Content-Length") or 0)
                rec.body = await reader.readexactly(length)
                up.got.append((conn, rec))
                reply, late = up.script(conn, n, rec)
                n += 1
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
                if late is not None:
                    await asyncio.sleep(0.2)
                    writer.write(late)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            up.closed_by_proxy.add(conn)
        finally:
            writer.close()

    async with loopback_server(handle) as up.port:
        yield up


async def second_fake(aiohttp_server: AiohttpServer) -> FakeFunctionUrl:
    fake = FakeFunctionUrl()
    server = await aiohttp_server(fake.app(), access_log=None)
    fake.port = server.port
    return fake


# ------------------------------------------------------- 1. Host allow-list (rebinding)


def rebinding_config(port: int) -> str:
    return (
        "admin: {port: 0}\n"
        "upstreams:\n"
        f"  - {{name: fn, url: 'http://127.0.0.1:{port}', region: us-east-1}}\n"
        f"  - {{name: web, url: 'http://127.0.0.1:{port}/w', region: us-east-1, path_prefix: /web,\n"
        "     cors: {allow_origins: ['*']}}\n"
        f"  - {{name: named, url: 'http://127.0.0.1:{port}/n', region: us-east-1,\n"
        "     host: api.sigproxy.test}\n"
    )


async def test_dns_rebinding_reproduction_is_421_and_never_forwarded(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """The issue's curl reproduction, every method (a preflight and a method outside
    allowed_methods too: Host comes first), and look-alike names; the default names
    still work."""
    path = write(tmp_path, rebinding_config(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        repro = await ask(
            port,
            "POST",
            "/orders/x",
            [("Origin", f"http://{REBIND}"), ("Content-Type", "text/plain")],
            b"x",
            host=REBIND,
        )
        check_error(repro, 421, "host_not_allowed", request_id=None)
        assert b"rebind.attacker" not in repro.body  # the Host is not echoed
        for method, target, headers, data in [
            ("GET", "/orders/x", [], None),
            ("PUT", "/orders/x", [], b"{}"),
            ("DELETE", "/orders/x", [], None),
            ("PATCH", "/orders/x", [], b"{}"),
            ("PURGE", "/orders/x", [], None),
            (
                "OPTIONS",
                "/web/x",
                [("Origin", f"http://{REBIND}"), ("Access-Control-Request-Method", "POST")],
                None,
            ),
        ]:
            resp = await ask(port, method, target, headers, data, host=REBIND)
            check_error(resp, 421, "host_not_allowed", request_id=None)
            assert b"rebind.attacker" not in resp.body
        head, _ = await talk(port, http("HEAD", "/orders/x", host=REBIND))
        assert head.startswith(b"HTTP/1.1 421 "), head[:100]
        for name in [
            "localhost.attacker.example",
            "127.0.0.1.nip.io:8080",
            "api.sigproxy.test.attacker.example",
            "attacker.example:80",
        ]:
            resp = await ask(port, "GET", "/orders/x", host=name)
            check_error(resp, 421, "host_not_allowed", request_id=None)
        assert upstream.requests == []
        # The defaults: localhost, loopback literals, an upstream's host; port ignored,
        # case-insensitive, trailing dot ignored.
        for name, expected in [
            (loopback(port), "/orders/x"),
            ("127.0.0.1", "/orders/x"),
            (f"localhost:{port}", "/orders/x"),
            ("LOCALHOST.:8080", "/orders/x"),
            ("127.9.8.7", "/orders/x"),
            (f"[::1]:{port}", "/orders/x"),
            ("api.sigproxy.test", "/n/orders/x"),
            ("API.Sigproxy.Test.:8443", "/n/orders/x"),
        ]:
            resp = await ask(port, "POST", "/orders/x", body=b"{}", host=name)
            assert resp.status == 200, (name, resp.status, resp.body[:200])
            assert upstream.last.raw_target == expected
            verify_sigv4(upstream.last, region="us-east-1")
        # HTTP/1.1 without Host is refused; HTTP/1.0 without Host is allowed.
        before = len(upstream.requests)
        no_host, _ = await talk(port, http("GET", "/orders/x", host=None))
        check_error(await parse(no_host), 400, "bad_request", request_id=None)
        assert len(upstream.requests) == before
        old, _ = await talk(port, http("GET", "/orders/x", host=None, version="1.0", close=False))
        assert (await parse(old)).status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


async def test_host_is_checked_before_the_token(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(
        tmp_path, f"inbound_auth: {{tokens: ['{TOKEN}']}}\n" + rebinding_config(upstream.port)
    )
    async with serve_process(path) as served:
        port = served.port
        for headers in ([], [BEARER]):
            resp = await ask(port, "POST", "/x", headers, b"{}", host=REBIND)
            check_error(resp, 421, "host_not_allowed", request_id=None)
        preflight = await ask(
            port,
            "OPTIONS",
            "/web/x",
            [("Origin", f"http://{REBIND}"), ("Access-Control-Request-Method", "PUT")],
            host=REBIND,
        )
        check_error(preflight, 421, "host_not_allowed", request_id=None)
        assert upstream.requests == []
        check_error(await ask(port, "POST", "/x", [], b"{}"), 401, "unauthorized")
        ok = await ask(port, "POST", "/x", [BEARER], b"{}", host=f"localhost:{port}")
        assert ok.status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


async def test_allowed_hosts_add_names_and_suffix_patterns(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        "allowed_hosts: [sigproxy.example.internal, '*.svc.cluster.local']\n"
        + one_upstream(upstream.port),
    )
    async with serve_process(path) as served:
        port = served.port
        for name in [
            "sigproxy.example.internal:8080",
            "SigProxy.Example.Internal.",
            "proxy.svc.cluster.local",
            "a.b.svc.cluster.local:80",
            f"localhost:{port}",  # the defaults stay
        ]:
            resp = await ask(port, "GET", "/x", host=name)
            assert resp.status == 200, (name, resp.status, resp.body[:200])
            verify_sigv4(upstream.last, region="us-east-1")
        before = len(upstream.requests)
        for name in [
            "svc.cluster.local",
            "evilsvc.cluster.local",
            "proxy.svc.cluster.local.attacker.example",
            "other.example.internal",
            REBIND,
        ]:
            check_error(
                await ask(port, "GET", "/x", host=name), 421, "host_not_allowed", request_id=None
            )
        assert len(upstream.requests) == before
        assert await served.stop() == 0


async def test_allowed_hosts_star_needs_inbound_auth(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    bad = write(tmp_path, "allowed_hosts: ['*']\n" + one_upstream(upstream.port), "bad.yaml")
    result = await asyncio.to_thread(run_cli, "check", "--config", bad, env=creds_env())
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sigproxy: error: {bad}: ")
    assert "allowed_hosts" in lines[0] and "inbound_auth" in lines[0], lines[0]
    assert "unknown key" not in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    good = write(
        tmp_path,
        f"allowed_hosts: ['*']\ninbound_auth: {{tokens: ['{TOKEN}']}}\n"
        + one_upstream(upstream.port),
        "good.yaml",
    )
    result = await asyncio.to_thread(run_cli, "check", "--config", good, env=creds_env())
    assert result.returncode == 0, result.stderr
    async with serve_process(good) as served:
        resp = await ask(served.port, "GET", "/any", [BEARER], host=REBIND)
        assert resp.status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        check_error(await ask(served.port, "GET", "/any", host=REBIND), 401, "unauthorized")
        assert await served.stop() == 0


async def test_absolute_form_is_judged_by_its_authority(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        "admin: {port: 0}\nupstreams:\n"
        f"  - {{name: fn, url: 'http://localhost:{upstream.port}/v1', region: us-east-1, path_prefix: /fn}}\n",
    )
    async with serve_process(path) as served:
        port = served.port
        # Forward-proxy mode: the Function URL's host decides, whatever Host says.
        fwd = await ask(port, "GET", f"http://localhost:{upstream.port}/v1/x?a=1", host=REBIND)
        assert fwd.status == 200, fwd.body
        assert upstream.last.raw_target == "/v1/x?a=1"
        verify_sigv4(upstream.last, region="us-east-1")
        own = await ask(port, "GET", f"http://127.0.0.1:{port}/fn/y", host=REBIND)
        assert own.status == 200, own.body
        assert upstream.last.raw_target == "/v1/y"
        verify_sigv4(upstream.last, region="us-east-1")
        before = len(upstream.requests)
        other = await ask(port, "GET", "http://rebind.attacker.example/fn/x", host=REBIND)
        check_error(other, 403, "host_not_allowed")
        # The same Host on an origin-form request is the rebinding case.
        origin_form = await ask(port, "GET", "/fn/x", host=REBIND)
        check_error(origin_form, 421, "host_not_allowed", request_id=None)
        assert len(upstream.requests) == before
        assert await served.stop() == 0


async def test_admin_listener_applies_the_host_list_plus_ip_literals(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        admin = served.admin_port
        assert admin is not None
        for target in ("/healthz", "/readyz", "/metrics"):
            resp = await ask(admin, "GET", target, host=REBIND)
            check_error(resp, 421, "host_not_allowed", request_id=None)
            assert b"rebind.attacker" not in resp.body
        check_error(
            await ask(admin, "GET", "/healthz", host="metrics.attacker.example"),
            421,
            "host_not_allowed",
            request_id=None,
        )
        # Probes and scrapers use the pod IP: any IP literal is fine on the admin port.
        for name in [
            loopback(admin),
            f"localhost:{admin}",
            "10.1.2.3:9090",
            "[fd00::5]:9090",
            "192.168.7.9",
        ]:
            resp = await ask(admin, "GET", "/healthz", host=name)
            assert resp.status == 200, (name, resp.status, resp.body)
        assert (await ask(admin, "GET", "/metrics", host="10.0.0.7:9090")).status == 200
        assert await served.stop() == 0


# ------------------------------------------------------------ 2. Overrides are validated


async def serve_must_refuse(path: str, *args: str) -> tuple[int, list[str], bool]:
    """Run ``sigproxy serve``; (exit status, stderr lines, whether it ever listened). A
    process still running after it said it listens (or after 20 s) is stopped."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigproxy", "serve", "--config", path, "--port", str(port), *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=creds_env(),
        cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    listened = False
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(proc.stderr.readline(), deadline - time.monotonic())
            except TimeoutError:
                listened = True  # still running: it serves
                break
            if not raw:
                break
            lines.append(raw.decode())
            if "listening on" in lines[-1]:
                listened = True
                break
    finally:
        if proc.returncode is None and listened:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            code = await proc.wait()
    rest = await asyncio.wait_for(proc.stderr.read(), 5)
    lines += rest.decode().splitlines(keepends=True)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "something listens on the port"
    return code, lines, listened


@pytest.mark.parametrize(
    "args",
    [
        ["--host", "0.0.0.0"],
        ["--host", "::"],
        ["--host", "0.0.0.0", "--workers", "2"],
    ],
    ids=["ipv4-any", "ipv6-any", "workers"],
)
async def test_host_override_without_inbound_auth_exits_2(
    upstream: FakeFunctionUrl, tmp_path: Path, args: list[str]
) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    code, lines, listened = await serve_must_refuse(path, *args)
    text = "".join(lines)
    assert not listened, "sigproxy served on a wide address without inbound_auth:\n" + text
    assert code == 2, text
    assert "Traceback" not in text
    shown = [line for line in lines if line.strip()]
    assert len(shown) == 1, text
    assert shown[0].startswith("sigproxy: error: "), shown[0]
    assert re.search(r"listen\.host|--host", shown[0]), shown[0]
    assert "inbound_auth" in shown[0], shown[0]
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("where", "workers"),
    [("cli", 1), ("file", 1), ("cli", 2)],
    ids=["host-flag", "host-in-file", "host-flag-workers"],
)
async def test_reload_cannot_drop_inbound_auth_while_serving_wide(
    upstream: FakeFunctionUrl, tmp_path: Path, where: str, workers: int
) -> None:
    auth = f"inbound_auth: {{tokens: ['{TOKEN}']}}\n"
    listen = "listen: {host: 0.0.0.0}\n" if where == "file" else ""
    path = write(tmp_path, listen + auth + one_upstream(upstream.port))
    args = ["--host", "0.0.0.0"] if where == "cli" else []
    if workers > 1:
        args += ["--workers", str(workers)]
    async with serve_process(path, *args) as served:
        if workers > 1:
            assert await until(lambda: f"{workers} workers ready" in served.log(), 30)
        port = served.port
        check_error(await ask(port, "GET", "/before"), 401, "unauthorized")
        assert (await ask(port, "GET", "/before", [BEARER])).status == 200
        # The new file is fine on loopback, but the process serves 0.0.0.0.
        Path(path).write_text(one_upstream(upstream.port))
        served.proc.send_signal(signal.SIGHUP)
        await until(
            lambda: "reload rejected" in served.log() or "config reloaded" in served.log(), 15
        )
        if workers > 1:  # the supervisor may refuse it, or each worker
            await until(lambda: served.log().count("reload rejected") >= workers, 2)
        before = len(upstream.requests)
        for _ in range(3 * workers):  # new connections: every worker is asked
            check_error(await ask(port, "GET", "/after"), 401, "unauthorized")
        assert len(upstream.requests) == before
        log = served.log()
        assert "config reloaded" not in log, log[-2000:]
        assert "reload rejected" in log, log[-2000:]
        assert (await ask(port, "GET", "/after", [BEARER])).status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


# ------------------------------------------------------- 3. Heads, connections, admin


def padded_head(target: str, host: str, total: int, *, complete: bool = True) -> bytes:
    """A request head of about ``total`` bytes in 4,000-byte header lines (each line far
    below aiohttp's per-line limit, and few enough lines for its header count)."""
    head = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode()
    i = 0
    while len(head) < total:
        head += f"X-Pad-{i:03d}: ".encode() + b"p" * 4000 + b"\r\n"
        i += 1
    return head + (b"\r\n" if complete else b"")


async def test_head_over_64_kib_is_431_and_closed(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        data, end = await talk(port, padded_head("/big", loopback(port), 80_000))
        check_error(await parse(data), 431, "headers_too_large", request_id=False)
        assert end in ("fin", "rst"), "the connection stayed open after the 431"
        # A head that never completes, sent in pieces: refused once it passes the cap,
        # long before the header timeout (15 s).
        sock = await connect(port)
        try:
            partial = padded_head("/partial", loopback(port), 70_000, complete=False)
            for i in range(0, len(partial), 10_000):
                await send(sock, partial[i : i + 10_000])
                await asyncio.sleep(0.05)
            data, end = await recv_to_end(sock, idle=5)
        finally:
            sock.close()
        check_error(await parse(data), 431, "headers_too_large", request_id=False)
        assert end in ("fin", "rst")
        assert upstream.requests == []
        # Under the cap: forwarded as before.
        data, _ = await talk(port, padded_head("/fits", loopback(port), 50_000))
        assert (await parse(data)).status == 200
        assert upstream.last.raw_target == "/fits"
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_many_huge_heads_keep_memory_bounded(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        for _ in range(3):
            assert (await ask(port, "GET", "/warm")).status == 200
        before = peak_rss_kib(served.proc.pid)
        line = b"p" * 7900 + b"\r\n"

        async def flood(i: int) -> socket.socket:
            sock = await connect(port)
            head = f"GET /flood/{i} HTTP/1.1\r\nHost: {loopback(port)}\r\n".encode()
            await send(sock, head)
            sent = 0
            n = 0
            while sent < 1_000_000:  # ~1 MB of headers, never finished
                piece = f"X-F{n:03d}: ".encode() + line
                try:
                    await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, piece), 10)
                except (ConnectionError, TimeoutError):
                    break
                sent += len(piece)
                n += 1
            return sock

        socks = await asyncio.gather(*(flood(i) for i in range(130)))
        await asyncio.sleep(0.5)  # let the proxy take in whatever it is going to
        after = peak_rss_kib(served.proc.pid)
        for sock in socks:
            sock.close()
        growth_mib = (after - before) / 1024
        assert growth_mib < 48, f"peak RSS grew {growth_mib:.1f} MiB for 130 unfinished heads"
        assert (await ask(port, "GET", "/after")).status == 200
        assert all(not r.raw_target.startswith("/flood") for r in upstream.requests)
        assert await served.stop() == 0


async def test_pipelined_heads_under_the_cap_keep_memory_bounded(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Found by the second adversarial pass: each head just under the cap, 40 of them
    pipelined per connection by clients that never read, took 3.6 MiB per connection
    (aiohttp parses and queues 32 requests before it stops reading). Two at a time now."""
    path = write(tmp_path, f"inbound_auth: {{tokens: [{TOKEN}]}}\n" + one_upstream(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        before = peak_rss_kib(served.proc.pid)
        head = (
            f"GET /big HTTP/1.1\r\nHost: {loopback(port)}\r\n".encode()
            + b"".join(b"X-P%d: %s\r\n" % (j, b"b" * 8100) for j in range(7))
            + b"\r\n"
        )
        blob = head * 40

        async def flood() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # reads nothing back
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            await send(sock, blob)
            return sock

        socks = await asyncio.gather(*(flood() for _ in range(100)))
        await asyncio.sleep(2)
        after = peak_rss_kib(served.proc.pid)
        for sock in socks:
            sock.close()
        growth_mib = (after - before) / 1024
        # 3.6 MiB a connection before: 350 MiB for these 100; now about 0.6 MiB each.
        assert growth_mib < 120, f"peak RSS grew {growth_mib:.0f} MiB for 100 connections"
        assert (
            await ask(port, "GET", "/after", [("Authorization", f"Bearer {TOKEN}")])
        ).status == 200
        assert upstream.requests and all(r.raw_target == "/after" for r in upstream.requests)
        assert await served.stop() == 0


async def test_a_head_that_begins_in_the_read_that_ends_another_is_still_capped(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Found by the second adversarial pass: a 149 KiB head that began in the same read
    as the end of a small request was not counted, and went upstream."""
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        host = loopback(served.port)
        small = f"GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        big = (
            f"GET /big HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode()
            + b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"a" * 8000) for i in range(19))
            + b"\r\n"
        )
        sock = await connect(served.port)
        try:
            await send(sock, small + big[:-10])
            await asyncio.sleep(0.3)
            await send(sock, big[-10:])
            data, _ = await recv_to_end(sock, idle=3)
        finally:
            sock.close()
        statuses = re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)
        assert statuses == [b"200", b"431"], data[:300]
        assert [r.raw_target for r in upstream.requests] == ["/small"]
        assert await served.stop() == 0


async def test_a_body_that_breaks_its_framing_midway_is_400_at_once(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Found by the second adversarial pass: a bad chunk size or oversized trailers sent
    after the body began were noticed only at the body timeout (408, the connection and
    the body budget held meanwhile). Now the body reader hears it."""
    path = write(tmp_path, "client_timeouts: {body: 30}\n" + one_upstream(upstream.port))
    async with serve_process(path) as served:
        host = loopback(served.port)
        head = (
            f"POST /x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        for first, later in [
            (b"5\r\nhello\r\n", b"ZZ\r\n"),
            (b"5\r\nhello\r\n0\r\n", b"".join(b"X-T%d: v\r\n" % i for i in range(130)) + b"\r\n"),
            (b"5\r\nhello\r\n0\r\n", b"X-T: a\x01b\r\n\r\n"),
        ]:
            sock = await connect(served.port)
            try:
                await send(sock, head + first)
                await asyncio.sleep(0.3)  # the body is being read now
                started = time.monotonic()
                await send(sock, later)
                data, _ = await recv_to_end(sock, idle=10, limit=15)
            finally:
                sock.close()
            check_error(await parse(data), 400, "bad_request")
            assert time.monotonic() - started < 10  # not the 30 s body timeout
        assert upstream.requests == []
        assert await served.stop() == 0


async def test_refused_preflights_tell_nothing_about_routes(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Found by the second adversarial pass: preflights (answered without a token) told a
    missing route, an upstream without CORS and a disallowed origin apart, and echoed the
    requested method and headers."""
    path = write(
        tmp_path,
        f"admin: {{port: 0}}\ninbound_auth: {{tokens: [{TOKEN}]}}\n"
        "upstreams:\n"
        f"  - {{name: secret, url: 'http://127.0.0.1:{upstream.port}', region: us-east-1,"
        " path_prefix: /secret-internal-fn}\n"
        f"  - {{name: web, url: 'http://127.0.0.1:{upstream.port}', region: us-east-1,"
        " path_prefix: /web, cors: {allow_origins: ['http://localhost:3000']}}\n",
    )
    async with serve_process(path, "--log-level", "info") as served:

        async def preflight(target: str, origin: str, method: str = "GET") -> RawResponse:
            return await ask(
                served.port,
                "OPTIONS",
                target,
                [
                    ("Origin", origin),
                    ("Access-Control-Request-Method", method),
                    ("Access-Control-Request-Headers", "<img src=x onerror=alert(1)>"),
                ],
            )

        refusals = [
            await preflight("/secret-internal-fn/x", "http://evil.example"),
            await preflight("/nope", "http://evil.example"),
            await preflight("/web/x", "http://evil.example"),
        ]
        bodies = {json.loads(r.body)["message"] for r in refusals}
        assert [r.status for r in refusals] == [403, 403, 403]
        assert len(bodies) == 1, bodies
        allowed_origin = await preflight("/web/x", "http://localhost:3000", "<SCRIPT>")
        assert allowed_origin.status == 403
        assert b"<" not in allowed_origin.body and b"script" not in allowed_origin.body.lower()
        assert upstream.requests == []
        assert await served.stop() == 0


async def over_the_cap(port: int) -> tuple[RawResponse, str]:
    """Open one more connection: the answer may come at once or after a request."""
    sock = await connect(port)
    try:
        data, end = await recv_to_end(sock, idle=1.0)
        if not data and end == "open":
            await send(sock, http("GET", "/healthz", host=loopback(port), close=False))
            data, end = await recv_to_end(sock, idle=3.0)
        return await parse(data), end
    finally:
        sock.close()


async def test_connections_over_the_cap_get_503_on_both_listeners(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, "limits: {max_client_connections: 20}\n" + one_upstream(upstream.port))
    async with serve_process(path) as served:
        for port, target in ((served.port, "/kept"), (served.admin_port, "/healthz")):
            assert port is not None
            kept: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            try:
                for _ in range(20):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    kept.append((reader, writer))
                    writer.write(http("GET", target, host=loopback(port), close=False))
                    assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
                forwarded = len(upstream.requests)
                resp, end = await over_the_cap(port)
                check_error(resp, 503, "too_many_connections", request_id=False)
                assert resp.header("Retry-After"), resp.headers
                assert (resp.header("Connection") or "").lower() == "close", resp.headers
                assert end in ("fin", "rst")
                assert len(upstream.requests) == forwarded
                # The connections already open keep working.
                reader, writer = kept[0]
                writer.write(http("GET", target, host=loopback(port), close=False))
                assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
            finally:
                for _, writer in kept:
                    writer.close()
            # Once they are gone there is room again.
            assert await until_status(port, target, 200)
        assert await served.stop() == 0


async def until_status(port: int, target: str, status: int) -> bool:
    for _ in range(50):
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            if (await ask(port, "GET", target)).status == status:
                return True
        await asyncio.sleep(0.1)
    return False


async def test_admin_listener_caps_the_head(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        admin = served.admin_port
        assert admin is not None
        data, end = await talk(admin, padded_head("/healthz", loopback(admin), 80_000))
        check_error(await parse(data), 431, "headers_too_large", request_id=False)
        assert end in ("fin", "rst")
        data, _ = await talk(admin, padded_head("/healthz", loopback(admin), 50_000))
        assert (await parse(data)).status == 200
        assert await served.stop() == 0


async def test_admin_listener_has_the_header_timeout(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, "client_timeouts: {header: 1}\n" + one_upstream(upstream.port))
    async with serve_process(path) as served:
        admin = served.admin_port
        assert admin is not None
        # A trickled head that never completes is cut after client_timeouts.header.
        sock = await connect(admin)
        try:
            await send(sock, f"GET /healthz HTTP/1.1\r\nHost: {loopback(admin)}\r\n".encode())
            started = time.monotonic()
            end = "open"
            while time.monotonic() - started < 6:
                await send(sock, b"X-Trickle: 1\r\n")
                got, end = await recv_to_end(sock, idle=0.4, limit=0.4)
                if end != "open":
                    break
            assert end in ("fin", "rst"), "the admin port kept a trickling head for 6 s"
        finally:
            sock.close()
        # A connection that sends nothing is closed too.
        sock = await connect(admin)
        try:
            _, end = await recv_to_end(sock, idle=5, limit=5)
            assert end in ("fin", "rst"), "the admin port kept a silent connection for 5 s"
        finally:
            sock.close()
        assert (await ask(admin, "GET", "/healthz")).status == 200
        assert await served.stop() == 0


# ---------------------------------------------------------------- 4. Body memory budget


async def test_body_memory_budget_is_process_wide(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(
        tmp_path, f"limits: {{body_memory_bytes: {8 * MIB}}}\n" + one_upstream(upstream.port)
    )
    async with serve_process(path) as served:
        port = served.port
        host = loopback(port)
        held_body = os.urandom(6 * MIB)
        held = await connect(port)
        try:
            head = f"POST /held HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {len(held_body)}\r\n\r\n"
            await send(held, head.encode() + held_body[: 5 * MIB])
            await asyncio.sleep(0.5)  # the proxy is holding 5-6 MiB of it now
            # 4 MiB more would go over the 8 MiB budget: refused without reading it.
            over = await connect(port)
            try:
                head = f"POST /over HTTP/1.1\r\nHost: {host}\r\nContent-Length: {4 * MIB}\r\n\r\n"
                await send(over, head.encode())
                data, end = await recv_to_end(over, idle=5)
            finally:
                over.close()
            resp = await parse(data)
            check_error(resp, 503, "over_capacity", request_id=None)
            assert resp.header("Retry-After") == "1"
            assert end in ("fin", "rst"), "the connection stayed open after over_capacity"
            # A chunked body has no length to judge up front: it is refused as it grows
            # past what is left of the budget, and the rest of it is not read.
            chunked = await connect(port)
            try:
                head = (
                    f"POST /chunked HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                await send(chunked, head.encode())
                piece = b"c" * MIB
                for _ in range(4):
                    await send(chunked, b"%x\r\n" % len(piece) + piece + b"\r\n")
                    await asyncio.sleep(0.1)
                data, end = await recv_to_end(chunked, idle=5)
            finally:
                chunked.close()
            resp = await parse(data)
            check_error(resp, 503, "over_capacity")
            assert end in ("fin", "rst")
            assert "/chunked" not in [r.raw_target for r in upstream.requests]
            # Small requests go on meanwhile.
            small = await ask(port, "POST", "/small", body=b"s" * 1024)
            assert small.status == 200
            verify_sigv4(upstream.last, region="us-east-1")
            await send(held, held_body[5 * MIB :])
            data, _ = await recv_to_end(held, idle=10)
        finally:
            held.close()
        assert (await parse(data)).status == 200
        done = next(r for r in upstream.requests if r.raw_target == "/held")
        assert done.body == held_body
        verify_sigv4(done, region="us-east-1")
        # The memory came back: the request refused before now fits.
        again = await ask(port, "POST", "/over", body=b"o" * (4 * MIB))
        assert again.status == 200, again.body[:200]
        assert upstream.last.body == b"o" * (4 * MIB)
        assert [r.raw_target for r in upstream.requests].count("/over") == 1
        assert await served.stop() == 0


# -------------------------------------------------------------- 5. Upstream connections


async def test_max_connections_queue_and_upstream_busy(
    upstream: FakeFunctionUrl, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    tight = await second_fake(aiohttp_server)
    release = {"fn": asyncio.Event(), "tight": asyncio.Event()}
    in_use = {"fn": 0, "tight": 0}
    peak = {"fn": 0, "tight": 0}
    ports: dict[str, set[int]] = {"fn": set(), "tight": set()}

    def holder(name: str) -> Callable[[web.Request, Recorded], Awaitable[web.StreamResponse]]:
        async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
            assert request.transport is not None
            ports[name].add(request.transport.get_extra_info("peername")[1])
            in_use[name] += 1
            peak[name] = max(peak[name], in_use[name])
            try:
                if "/slow" in rec.raw_target:
                    await asyncio.wait_for(release[name].wait(), 20)
                return web.json_response({"target": rec.raw_target})
            finally:
                in_use[name] -= 1

        return answer

    upstream.answer = holder("fn")
    tight.answer = holder("tight")
    path = write(
        tmp_path,
        "admin: {port: 0}\nupstreams:\n"
        f"  - {{name: fn, url: 'http://127.0.0.1:{upstream.port}', region: us-east-1,\n"
        "     max_connections: 2, timeout: {connect: 3, read: 30}}\n"
        f"  - {{name: tight, url: 'http://127.0.0.1:{tight.port}', region: us-east-1, path_prefix: /tight,\n"
        "     max_connections: 1, timeout: {connect: 0.5, read: 30}}\n",
    )
    async with serve_process(path) as served:
        port = served.port
        # Two requests hold both connections; two more wait in the queue (its length is
        # max_connections); the next one finds the queue full.
        active = [asyncio.create_task(ask(port, "GET", f"/slow/{i}")) for i in (1, 2)]
        assert await until(lambda: len(upstream.requests) == 2)
        queued = []
        for i in (3, 4):
            queued.append(asyncio.create_task(ask(port, "GET", f"/slow/{i}")))
            await asyncio.sleep(0.15)
        await asyncio.sleep(0.15)
        busy = await ask(port, "GET", "/busy/5")
        check_error(busy, 503, "upstream_busy")
        assert busy.header("Retry-After"), busy.headers
        assert len(upstream.requests) == 2
        release["fn"].set()
        results = await asyncio.wait_for(asyncio.gather(*active, *queued), 15)
        assert [r.status for r in results] == [200, 200, 200, 200]
        assert sorted(r.raw_target for r in upstream.requests) == [
            f"/slow/{i}" for i in (1, 2, 3, 4)
        ]
        assert peak["fn"] <= 2 and len(ports["fn"]) <= 2, (peak, ports)
        # A waiter that gets no connection within timeout.connect gives up.
        hold = asyncio.create_task(ask(port, "GET", "/tight/slow/6"))
        assert await until(lambda: len(tight.requests) == 1)
        waited = await ask(port, "GET", "/tight/x/7")
        check_error(waited, 503, "upstream_busy")
        assert waited.header("Retry-After"), waited.headers
        assert [r.raw_target for r in tight.requests] == ["/slow/6"]
        release["tight"].set()
        assert (await asyncio.wait_for(hold, 10)).status == 200
        assert (await ask(port, "GET", "/tight/x/8")).status == 200
        assert peak["tight"] == 1 and len(ports["tight"]) == 1, (peak, ports)
        verify_sigv4(tight.last, region="us-east-1")
        assert await served.stop() == 0


async def test_idle_pooled_connections_are_closed_by_a_timer(tmp_path: Path) -> None:
    async with keepalive_upstream() as up:
        path = write(tmp_path, one_upstream(up.port, timeout="{idle: 0.5}"))
        async with serve_process(path) as served:
            for target in ("/a", "/b"):
                resp = await ask(served.port, "GET", target)
                assert resp.status == 200
                assert json.loads(resp.body)["conn"] == 0  # kept alive and reused
            # No further request: the timer closes it.
            assert await until(lambda: 0 in up.closed_by_proxy, 5), "idle connection kept open"
            resp = await ask(served.port, "GET", "/c")
            assert json.loads(resp.body)["conn"] == 1
            verify_sigv4(up.got[-1][1], region="us-east-1")
            assert await served.stop() == 0


@pytest.mark.parametrize("change", ["dropped", "moved"])
async def test_reload_closes_idle_connections_of_a_changed_upstream(
    upstream: FakeFunctionUrl, tmp_path: Path, change: str
) -> None:
    async with keepalive_upstream() as old, keepalive_upstream() as new:

        def config(gone_port: int | None) -> str:
            text = "admin: {port: 0}\nupstreams:\n"
            text += (
                f"  - {{name: fn, url: 'http://127.0.0.1:{upstream.port}', region: us-east-1}}\n"
            )
            if gone_port is not None:
                text += f"  - {{name: gone, url: 'http://127.0.0.1:{gone_port}', region: us-east-1, path_prefix: /gone}}\n"
            return text

        path = write(tmp_path, config(old.port))
        async with serve_process(path) as served:
            assert (await ask(served.port, "GET", "/gone/x")).status == 200
            assert old.opened == 1 and not old.closed_by_proxy
            Path(path).write_text(config(None if change == "dropped" else new.port))
            served.proc.send_signal(signal.SIGHUP)
            assert await until(lambda: "config reloaded" in served.log())
            assert await until(lambda: 0 in old.closed_by_proxy, 3), "idle connection kept"
            if change == "moved":
                resp = await ask(served.port, "GET", "/gone/y")
                assert resp.status == 200
                assert new.got[-1][1].raw_target == "/y"
                verify_sigv4(new.got[-1][1], region="us-east-1")
            assert (await ask(served.port, "GET", "/still")).status == 200
            assert await served.stop() == 0


# ---------------------------------------------------------------- 6. Cross-site requests


def cross_site_config(port: int, *, extra: str = "") -> str:
    return (
        f"admin: {{port: 0}}\n{extra}upstreams:\n"
        f"  - {{name: fn, url: 'http://127.0.0.1:{port}', region: us-east-1}}\n"
        f"  - {{name: web, url: 'http://127.0.0.1:{port}/w', region: us-east-1, path_prefix: /web,\n"
        "     cors: {allow_origins: ['https://app.example.com']}}\n"
    )


MODES = [
    ("navigate", "document"),
    ("navigate", "iframe"),
    ("nested-navigate", "iframe"),
    ("no-cors", "image"),
    ("cors", "empty"),
    ("websocket", "websocket"),
    (None, None),
]


def fetch_headers(site: str, mode: str | None, dest: str | None) -> list[tuple[str, str]]:
    headers = [("Sec-Fetch-Site", site)]
    if mode:
        headers.append(("Sec-Fetch-Mode", mode))
    if dest:
        headers.append(("Sec-Fetch-Dest", dest))
    return headers


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_cross_site_requests_of_every_mode_are_403(
    upstream: FakeFunctionUrl, tmp_path: Path, site: str
) -> None:
    path = write(tmp_path, cross_site_config(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        for mode, dest in MODES:
            headers = [*fetch_headers(site, mode, dest), ("Referer", "https://evil.example/page")]
            for method, body in (("GET", None), ("POST", b"{}"), ("DELETE", None)):
                resp = await ask(port, method, "/transfer", headers, body)
                assert resp.status == 403, (site, mode, method, resp.status)
                check_error(resp, 403, "origin_not_allowed")
            head, _ = await talk(
                port, http("HEAD", "/transfer", host=loopback(port), headers=headers)
            )
            assert head.startswith(b"HTTP/1.1 403 "), (mode, head[:80])
        assert upstream.requests == []
        # Unless the route's CORS policy allows the page: Origin first, else Referer.
        allowed = [("Referer", "https://app.example.com/page")]
        nav = await ask(
            port, "GET", "/web/x", fetch_headers(site, "navigate", "document") + allowed
        )
        assert nav.status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        cors = await ask(
            port,
            "POST",
            "/web/x",
            [
                *fetch_headers(site, "cors", "empty"),
                ("Origin", "https://app.example.com"),
                ("Referer", "https://evil.example/"),
            ],
            b"{}",
        )
        assert cors.status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        before = len(upstream.requests)
        denied = await ask(
            port,
            "GET",
            "/web/x",
            [*fetch_headers(site, "navigate", "document"), ("Referer", "https://evil.example/")],
        )
        check_error(denied, 403, "origin_not_allowed")
        assert len(upstream.requests) == before
        assert await served.stop() == 0


async def test_referer_decides_without_sec_fetch_site(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, cross_site_config(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        for method, target, referer in [
            ("POST", "/transfer", "https://evil.example/form"),
            ("GET", "/transfer", "http://evil.example/"),
            ("GET", "/transfer", f"https://127.0.0.1:{port}/page"),  # another scheme
            ("GET", "/transfer", f"http://127.0.0.1:{port + 1}/page"),  # another port
            ("POST", "/web/x", "https://evil.example/"),
        ]:
            resp = await ask(
                port, method, target, [("Referer", referer)], b"{}" if method == "POST" else None
            )
            check_error(resp, 403, "origin_not_allowed")
        assert upstream.requests == []
        # Still allowed: the proxy's own origin, an origin the route's CORS allows, no
        # Referer (curl), and Sec-Fetch-Site none / same-origin.
        for host, headers, target in [
            (loopback(port), [("Referer", f"http://127.0.0.1:{port}/page")], "/own"),
            (f"localhost:{port}", [("Referer", f"http://localhost:{port}/a/b?c=d")], "/own2"),
            (loopback(port), [("Referer", "https://app.example.com/x")], "/web/cors"),
            (loopback(port), [], "/curl"),
            (loopback(port), fetch_headers("none", "navigate", "document"), "/typed"),
            (
                loopback(port),
                [
                    *fetch_headers("same-origin", "cors", "empty"),
                    ("Origin", f"http://127.0.0.1:{port}"),
                ],
                "/same",
            ),
        ]:
            resp = await ask(port, "POST", target, headers, b"{}", host=host)
            assert resp.status == 200, (target, resp.status, resp.body[:200])
            verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


async def test_allow_cross_site_navigation_lets_top_level_get_and_head_through(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(
        tmp_path, cross_site_config(upstream.port, extra="allow_cross_site_navigation: true\n")
    )
    async with serve_process(path) as served:
        port = served.port
        evil = ("Referer", "https://evil.example/page")
        top = [*fetch_headers("cross-site", "navigate", "document"), evil]
        assert (await ask(port, "GET", "/nav", top)).status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        assert (await ask(port, "GET", "/referer-only", [evil])).status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        for headers in (top, [evil]):
            head, _ = await talk(
                port, http("HEAD", "/nav-head", host=loopback(port), headers=headers)
            )
            assert head.startswith(b"HTTP/1.1 200 "), head[:80]
        assert [r.method for r in upstream.requests] == ["GET", "GET", "HEAD", "HEAD"]
        before = len(upstream.requests)
        for method, headers in [
            ("POST", top),
            ("POST", [evil]),
            ("PUT", [evil]),
            ("GET", [*fetch_headers("cross-site", "no-cors", "image"), evil]),
            ("GET", [*fetch_headers("cross-site", "nested-navigate", "iframe"), evil]),
            ("GET", [*fetch_headers("cross-site", "navigate", "iframe"), evil]),
            ("GET", [*fetch_headers("same-site", "cors", "empty"), evil]),
        ]:
            resp = await ask(
                port,
                method,
                "/not-a-navigation",
                headers,
                b"{}" if method in ("POST", "PUT") else None,
            )
            check_error(resp, 403, "origin_not_allowed")
        assert len(upstream.requests) == before
        assert await served.stop() == 0


# ------------------------------------------------- 7. Admission before anything else


def admission_config(port: int) -> str:
    return f"inbound_auth: {{tokens: ['{TOKEN}']}}\n" + (
        "admin: {port: 0}\nupstreams:\n"
        f"  - {{name: fn, url: 'http://127.0.0.1:{port}', region: us-east-1, path_prefix: /fn,\n"
        "     max_body_bytes: 1000, cors: {allow_origins: ['https://app.example.com']}}\n"
    )


async def first_answer(
    port: int, head: bytes
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a request head only; the head of the first thing the proxy answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return first, reader, writer


async def test_no_token_means_401_before_routing(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(tmp_path, admission_config(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        for method, target in (
            ("GET", "/nope"),
            ("POST", "/nope/deeper"),
            ("GET", "/fn/x"),
            ("GET", "/"),
        ):
            resp = await ask(port, method, target, body=b"{}" if method == "POST" else None)
            body = check_error(resp, 401, "unauthorized")
            assert "prefixes" not in body and b"/fn" not in resp.body, resp.body
        assert upstream.requests == []
        # With the token, routing answers as before (prefixes and all).
        check_error(await ask(port, "GET", "/nope", [BEARER]), 404, "no_route")
        assert (await ask(port, "GET", "/fn/x", [BEARER])).status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


async def test_no_token_with_expect_gets_401_and_no_100_continue(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, admission_config(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        for target in ("/fn/x", "/nope"):
            expect = [("Expect", "100-continue"), ("Content-Length", "5")]
            first, reader, writer = await first_answer(
                port, http("POST", target, host=loopback(port), headers=expect)
            )
            try:
                assert first.startswith(b"HTTP/1.1 401 "), first
                # The body of the 401 (the proxy may still wait for the 5 bytes announced).
                length = re.search(rb"(?im)^content-length: *(\d+)", first)
                assert length, first
                rest = await asyncio.wait_for(reader.readexactly(int(length[1])), 10)
            finally:
                writer.close()
            check_error(await parse(first + rest), 401, "unauthorized")
        assert upstream.requests == []
        assert await served.stop() == 0


async def test_100_continue_only_when_the_body_is_read(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, admission_config(upstream.port))
    async with serve_process(path) as served:
        port = served.port

        def head(target: str, length: int, *extra: tuple[str, str]) -> bytes:
            headers = [BEARER, ("Expect", "100-continue"), *extra, ("Content-Length", str(length))]
            return http("POST", target, host=loopback(port), headers=headers)

        for data, status in [
            (head("/fn/x", 5, ("Origin", "https://evil.example")), 403),  # origin check
            (head("/nope", 5), 404),  # routing
            (head("/fn/x", 5000), 413),  # the Content-Length limit
        ]:
            first, _, writer = await first_answer(port, data)
            writer.close()
            assert first.startswith(f"HTTP/1.1 {status} ".encode()), (status, first[:60])
        assert upstream.requests == []
        # Admitted, routed, within the limit: 100 Continue, then the body is read.
        first, reader, writer = await first_answer(port, head("/fn/x?q=1", 5))
        try:
            assert first.startswith(b"HTTP/1.1 100 "), first
            writer.write(b"hello")
            resp = await asyncio.wait_for(read_response(reader), 10)
        finally:
            writer.close()
        assert resp.status == 200
        assert upstream.last.body == b"hello"
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


async def test_non_utf8_bearer_is_401_without_a_traceback(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, admission_config(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        for value in (b"Bearer \xff\xfe", b"Bearer \xc3\x28" + TOKEN.encode(), b"\xff\xfe"):
            data, _ = await talk(
                port,
                http(
                    "GET", "/fn/x", host=loopback(port), extra=b"Authorization: " + value + b"\r\n"
                ),
            )
            check_error(await parse(data), 401, "unauthorized")
        assert upstream.requests == []
        assert (await ask(port, "GET", "/fn/x", [BEARER])).status == 200
        assert await served.stop() == 0
    log = served.log()
    assert "Traceback" not in log
    assert "unexpected error" not in log


async def test_preflights_need_no_token_and_never_list_prefixes(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, admission_config(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        preflight = [
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "POST"),
        ]
        granted = await ask(port, "OPTIONS", "/fn/x", preflight)
        assert granted.status == 204
        assert granted.header("Access-Control-Allow-Origin") == "https://app.example.com"
        for target in ("/nope", "/"):
            resp = await ask(port, "OPTIONS", target, preflight)
            body = check_error(resp, 403, "cors_refused")
            assert "prefixes" not in body and b"/fn" not in resp.body, resp.body
            assert resp.header("Access-Control-Allow-Origin") is None
        refused = await ask(
            port,
            "OPTIONS",
            "/fn/x",
            [("Origin", "https://evil.example"), ("Access-Control-Request-Method", "POST")],
        )
        check_error(refused, 403, "cors_refused")
        # An OPTIONS that is not a preflight needs the token like any request.
        check_error(await ask(port, "OPTIONS", "/fn/x"), 401, "unauthorized")
        assert upstream.requests == []
        assert await served.stop() == 0


# ------------------------------------------------------------------------ 8. Truncation


@dataclass
class Cutting:
    """A raw upstream answering each target with fixed bytes (a head and maybe part of
    a body), then closing: at once with a FIN (``fin-now``), or with a FIN (``fin``) or
    a reset (``rst``) once ``cut(target)`` is called."""

    replies: dict[str, tuple[bytes, str]]
    cuts: dict[str, asyncio.Event] = field(default_factory=dict)
    port: int = 0

    def cut(self, target: str) -> None:
        self.cuts.setdefault(target, asyncio.Event()).set()


@contextlib.asynccontextmanager
async def cutting_upstream(replies: dict[str, tuple[bytes, str]]) -> AsyncIterator[Cutting]:
    up = Cutting(replies)
    tasks: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            reply, ending = up.replies.get(target, (b"HTTP/1.1 404 Not Found\r\n\r\n", "fin-now"))
            writer.write(reply)
            await writer.drain()
            if ending == "fin-now":
                writer.close()
                return
            await asyncio.wait_for(up.cuts.setdefault(target, asyncio.Event()).wait(), 15)
            if ending == "rst":
                rst_close(writer)
            else:
                writer.close()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await server.wait_closed()


PART = b"a" * 30_000


async def read_until_body(sock: socket.socket, at_least: int) -> bytes:
    """Read until the response head and ``at_least`` bytes after it have arrived."""
    loop = asyncio.get_running_loop()
    data = b""
    deadline = time.monotonic() + 10
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep and len(rest) >= at_least:
            return data
        assert time.monotonic() < deadline, data[:200]
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10)
        assert chunk, data[:300]
        data += chunk


TRUNCATED = {
    "/content-length": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n"
    + PART,
    "/chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    + f"{len(PART):x}\r\n".encode()
    + PART
    + b"\r\n",
}


async def test_http10_client_is_reset_when_the_upstream_dies_midway(tmp_path: Path) -> None:
    """Content-Length and chunked upstream bodies, cut after 30,000 bytes with a FIN."""
    replies = {target: (reply, "fin") for target, reply in TRUNCATED.items()}
    async with cutting_upstream(replies) as up:
        path = write(tmp_path, one_upstream(up.port))
        async with serve_process(path) as served:
            for target in TRUNCATED:
                sock = await connect(served.port)
                try:
                    request = http(
                        "GET", target, host=loopback(served.port), version="1.0", close=False
                    )
                    await send(sock, request)
                    data = await read_until_body(sock, len(PART))
                    assert re.match(rb"HTTP/1\.[01] 200 ", data), data[:100]
                    up.cut(target)
                    more, end = await recv_to_end(sock, idle=5)
                finally:
                    sock.close()
                assert end == "rst", f"{target}: the client saw {end!r}, a cut body looks whole"
                assert len(data.partition(b"\r\n\r\n")[2] + more) < 100_000
            assert await served.stop() == 0


async def test_http11_close_delimited_body_ending_in_a_reset_is_not_terminated(
    tmp_path: Path,
) -> None:
    unframed = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    replies = {"/reset": (unframed + PART, "rst"), "/clean": (unframed + PART, "fin-now")}
    async with cutting_upstream(replies) as up:
        path = write(tmp_path, one_upstream(up.port))
        async with serve_process(path) as served:
            port = served.port
            sock = await connect(port)
            try:
                await send(sock, http("GET", "/reset", host=loopback(port)))
                data = await read_until_body(sock, len(PART))
                up.cut("/reset")
                more, end = await recv_to_end(sock, idle=5)
            finally:
                sock.close()
            whole = data + more
            assert b"chunked" in whole.partition(b"\r\n\r\n")[0].lower()
            assert not whole.endswith(b"0\r\n\r\n"), "a reset body was terminated as if whole"
            assert end == "rst", f"the client saw {end!r} after a body the upstream reset"
            # A close-delimited body that ends with a clean FIN is whole.
            clean = await ask(port, "GET", "/clean")
            assert clean.status == 200
            assert clean.header("Transfer-Encoding") == "chunked"
            assert clean.body == PART
            assert await served.stop() == 0


# ------------------------------------------------------------------- 9. Upstream oddities


async def test_dirty_reason_phrases_become_the_standard_one(tmp_path: Path) -> None:
    replies = {
        "/whole": (b"HTTP/1.1 200 \xff\xfeOK\x01\r\nContent-Length: 2\r\n\r\nok", "fin-now"),
        "/chunked": (
            b"HTTP/1.1 200 \xff\xfeOK\x01\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            "fin-now",
        ),
        "/missing": (b"HTTP/1.1 404 Nope\x7f\x1b[31m\r\nContent-Length: 2\r\n\r\nno", "fin-now"),
    }
    async with cutting_upstream(replies) as up:
        path = write(tmp_path, one_upstream(up.port))
        async with serve_process(path) as served:
            port = served.port
            for target, status, reason, body in [
                ("/whole", 200, b"OK", b"ok"),
                ("/chunked", 200, b"OK", b"ok"),
                ("/missing", 404, b"Not Found", b"no"),
            ]:
                data, _ = await talk(port, http("GET", target, host=loopback(port)))
                status_line = data.split(b"\r\n", 1)[0]
                assert status_line == b"HTTP/1.1 %d %s" % (status, reason), status_line
                assert (await parse(data)).body == body
            assert await served.stop() == 0
        assert "Traceback" not in served.log()


async def test_unsolicited_101_is_502(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    reply = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"
    async with cutting_upstream({"/ws": (reply, "fin-now")}) as up:
        path = write(
            tmp_path,
            "admin: {port: 0}\nupstreams:\n"
            f"  - {{name: odd, url: 'http://127.0.0.1:{up.port}/ws', region: us-east-1, path_prefix: /ws}}\n"
            f"  - {{name: fn, url: 'http://127.0.0.1:{upstream.port}', region: us-east-1}}\n",
        )
        async with serve_process(path) as served:
            port = served.port
            for headers in ([], [("Upgrade", "websocket"), ("Connection", "Upgrade")]):
                data, _ = await talk(port, http("GET", "/ws", host=loopback(port), headers=headers))
                assert not data.startswith(b"HTTP/1.1 101"), data[:100]
                assert b"hello" not in data
                body = check_error(await parse(data), 502, "upstream_unreachable")
                assert body["upstream"] == "odd"
            assert (await ask(port, "GET", "/still")).status == 200
            assert await served.stop() == 0


# What an upstream may send after a complete response: the example (a whole
# second response) and the start of a response head, which would become the beginning
# of the next client's answer.
TRAILING = {
    "second-response": ok_reply(b'{"smuggled": true}'),
    "partial-head": b"HTTP/1.1 200 OK\r\nX-Smuggled: yes\r\nX-Swallow: ",
}


@pytest.mark.parametrize(
    ("extra", "when"),
    [
        ("second-response", "with-the-response"),
        ("partial-head", "with-the-response"),
        ("partial-head", "after-it"),
    ],
)
async def test_bytes_after_a_response_never_reach_the_next_client(
    tmp_path: Path, extra: str, when: str
) -> None:
    def script(conn: int, n: int, rec: Recorded) -> tuple[bytes | None, bytes | None]:
        if rec.raw_target == "/one":
            first = ok_reply(b'{"first": true}')
            if when == "with-the-response":
                return first + TRAILING[extra], None
            return first, TRAILING[extra]
        return fresh(conn, n, rec)

    async with keepalive_upstream(script) as up:
        path = write(tmp_path, one_upstream(up.port))
        async with serve_process(path) as served:
            port = served.port
            first = await ask(port, "GET", "/one")
            assert json.loads(first.body) == {"first": True}
            await asyncio.sleep(0.5)  # late bytes have arrived on the idle connection
            for i in range(3):
                resp = await ask(port, "GET", f"/next/{i}")
                assert resp.status == 200, resp.body[:200]
                assert resp.header("X-Smuggled") is None, resp.headers
                got = json.loads(resp.body)
                assert got.get("target") == f"/next/{i}", got
                assert got["conn"] != 0, "the next request went on the tainted connection"
            assert await until(lambda: 0 in up.closed_by_proxy, 3)
            verify_sigv4(up.got[-1][1], region="us-east-1")
            assert await served.stop() == 0


# ------------------------------------------------------------------ 10. Transfer codings


async def test_transfer_codings_other_than_chunked_are_501(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        for coding in ("gzip, chunked", "identity, chunked", "deflate, chunked"):
            te = [("Transfer-Encoding", coding)]
            request = http("POST", "/te", host=loopback(port), headers=te, close=False)
            data, end = await talk(port, request + b"5\r\nhello\r\n0\r\n\r\n")
            check_error(await parse(data), 501, "not_implemented", request_id=None)
            assert end in ("fin", "rst"), f"{coding}: the connection stayed open after the 501"
        assert upstream.requests == []
        # Exactly "chunked" is read and forwarded as before.
        plain = await asyncio.wait_for(
            raw_request(port, "POST", "/plain", chunked_body=[b"hel", b"lo"], host=loopback(port)),
            15,
        )
        assert plain.status == 200
        assert (upstream.last.raw_target, upstream.last.body) == ("/plain", b"hello")
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


# ----------------------------------------------------------------------- 11. Access log


async def test_access_log_has_the_routed_path_the_raw_path_and_no_injected_lines(
    tmp_path: Path,
) -> None:
    async with keepalive_upstream() as up:
        path = write(tmp_path, one_upstream(up.port))
        async with serve_process(path) as served:
            port = served.port
            dotted = await ask(
                port,
                "GET",
                "/a/./b/../c%0ad%0D%0Afake-line?k=hunter2-query-value",
                [("X-Request-Id", "rid-issue10-dotted")],
            )
            assert dotted.status == 200
            rec = up.got[-1][1]
            assert rec.raw_target == "/a/c%0Ad%0D%0Afake-line?k=hunter2-query-value"
            verify_sigv4(rec, region="us-east-1")
            plain = await ask(
                port,
                "GET",
                "/plain/p?k=hunter2-query-value",
                [("X-Request-Id", "rid-issue10-plain")],
            )
            assert plain.status == 200
            refused = await ask(
                port,
                "GET",
                "/bad%0D%0Ainjected-line/%zz?k=hunter2-query-value",
                [("X-Request-Id", "rid-issue10-bad")],
            )
            assert refused.status == 400
            assert len(up.got) == 2
            assert await served.stop() == 0
    log = served.log()
    lines = log.splitlines()
    for line in lines:  # every line is a log record: nothing a client sent started one
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line), line
    assert "hunter2-query-value" not in log

    def access_line(request_id: str) -> str:
        found = [ln for ln in lines if request_id in ln]
        assert len(found) == 1, found
        return found[0]

    dotted_line = access_line("rid-issue10-dotted")
    assert "/a/c%0Ad%0D%0Afake-line" in dotted_line, dotted_line
    assert "raw=/a/./b/../c%0ad%0D%0Afake-line" in dotted_line, dotted_line
    plain_line = access_line("rid-issue10-plain")
    assert "/plain/p" in plain_line and "raw=" not in plain_line, plain_line
    assert re.search(r"\b400\b", access_line("rid-issue10-bad"))
    assert "\r" not in log


# ------------------------------------------------------------------------ 12. Smaller


async def test_403_bodies_never_echo_origin_host_or_referer(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, cross_site_config(upstream.port))
    async with serve_process(path) as served:
        port = served.port
        for method, target, headers, code in [
            ("POST", "/x", [("Origin", "http://echo-origin.example")], "origin_not_allowed"),
            (
                "OPTIONS",
                "/web/x",
                [
                    ("Origin", "http://echo-preflight.example"),
                    ("Access-Control-Request-Method", "POST"),
                ],
                "cors_refused",
            ),
            ("GET", "http://echo-host.example/x", [], "host_not_allowed"),
            ("GET", "/x", [("Referer", "https://echo-referer.example/p")], "origin_not_allowed"),
            (
                "GET",
                "/x",
                [
                    *fetch_headers("cross-site", "navigate", "document"),
                    ("Referer", "https://echo-nav.example/"),
                ],
                "origin_not_allowed",
            ),
        ]:
            resp = await ask(port, method, target, headers, b"{}" if method == "POST" else None)
            check_error(resp, 403, code)
            assert b"echo-" not in resp.body, resp.body
        assert upstream.requests == []
        assert await served.stop() == 0


def auth_none_config(port: int, *, host: str | None) -> str:
    own_host = f", host: {host}" if host else ""
    return (
        "admin: {port: 0}\nupstreams:\n"
        f"  - {{name: signed, url: 'http://127.0.0.1:{port}', region: us-east-1, path_prefix: /fn}}\n"
        f"  - {{name: openfn, url: 'http://127.0.0.1:{port}', auth: none, path_prefix: /pub{own_host}}}\n"
    )


def warnings_about(text: str, name: str) -> list[str]:
    return [ln for ln in text.splitlines() if "WARNING" in ln and name in ln]


async def test_auth_none_upstream_without_host_is_warned_about(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    shared = write(tmp_path, auth_none_config(upstream.port, host=None), "shared.yaml")
    result = await asyncio.to_thread(run_cli, "check", "--config", shared, env=creds_env())
    assert result.returncode == 0, result.stderr
    found = warnings_about(result.stderr, "openfn")
    assert len(found) == 1, f"check logged no WARNING about upstream openfn:\n{result.stderr}"
    assert "origin" in found[0].lower(), found[0]
    async with serve_process(shared) as served:
        assert (await ask(served.port, "GET", "/pub/x")).status == 200
        assert await served.stop() == 0
    found = warnings_about(served.log(), "openfn")
    assert found, f"serve logged no WARNING about upstream openfn:\n{served.log()}"
    assert "origin" in found[0].lower(), found[0]
    # With its own host it has its own origin: nothing to warn about.
    own = write(tmp_path, auth_none_config(upstream.port, host="open.localhost"), "own.yaml")
    result = await asyncio.to_thread(run_cli, "check", "--config", own, env=creds_env())
    assert result.returncode == 0, result.stderr
    assert warnings_about(result.stderr, "openfn") == []
