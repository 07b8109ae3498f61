"""Field test: a corporate network day over the rewritten upstream client.

The real ``sigproxy serve`` (and ``sigproxy check --probe``) process on loopback, against
stand-ins written here: CONNECT proxies that misbehave the ways corporate proxies do
(NTLM-only 407, HTML error pages, idle tunnels closed or swallowed, half-open tunnels,
resets mid-response) and the TLS Function URL of tests/test_egress.py (a trustme CA
trusted through SSL_CERT_FILE / SSL_CERT_DIR). Nothing leaves loopback: hosts a process
could look up are ``*.invalid``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from .support import SESSION_TOKEN, Recorded, loopback_server, raw_request
from .test_egress import (  # fixtures and helpers, reused
    CONNECT_LINE,
    FN,
    FUNCTION_HOST,
    AiohttpServer,
    FunctionUrl,
    StartConnectProxy,
    _pipe,
    assert_arrived_signed,
    ca,
    connect_proxy,
    function,
    function_url,
    no_proxy_environment,
    pem,
    process_env,
    read_connect,
    yaml,
)
from .test_probe import probe
from .test_process import ROOT, run_cli, serve_process, write

__all__ = ["ca", "connect_proxy", "function", "no_proxy_environment", "pem"]

# A Function URL host no resolver knows (RFC 6761): reached only through a tunnel or
# connect_to, and a lookup of it fails on this machine.
INVALID_HOST = "field.lambda-url.us-east-1.on.aws.invalid"
INVALID_CONNECT = f"CONNECT {INVALID_HOST}:443 HTTP/1.1"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """``handler`` on a 127.0.0.1 port (yielded), its connection errors swallowed."""

    async def quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async with loopback_server(quiet) as port:
        yield port


def body_of(resp_body: bytes) -> dict[str, str]:
    data: dict[str, str] = json.loads(resp_body)
    return data


def signature_of(rec: Recorded) -> str:
    authz = rec.header("Authorization") or ""
    return authz.rsplit("Signature=", 1)[-1]


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a proxy that drops a connection does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ------------------------------------------------------------- probe says what serve does


@pytest.mark.parametrize("via", ["HTTPS_PROXY", "connect_to"])
async def test_probe_reaches_the_upstream_the_way_serve_does(
    aiohttp_server: AiohttpServer,
    ca: trustme.CA,
    connect_proxy: StartConnectProxy,
    pem: str,
    tmp_path: Path,
    via: str,
) -> None:
    """On a corporate network the Function URL is reachable only through the proxy in
    HTTPS_PROXY (or only at the connect_to address). ``serve`` gets through; ``check
    --probe``, the documented way to check the setup, must try the same path rather
    than look the host up and dial it directly (and report dns-failed or a timeout
    for an upstream that works)."""
    function = await function_url(aiohttp_server, ca, INVALID_HOST)
    proxy = await connect_proxy({f"{INVALID_HOST}:443": function.address})
    entry = f"{{name: fn, url: 'https://{INVALID_HOST}', region: us-east-1, timeout: {{connect: 5}}"
    if via == "connect_to":
        entry += f", connect_to: '127.0.0.1:{function.port}'"
        env = process_env(pem)
    else:
        env = process_env(pem, HTTPS_PROXY=proxy.url)
    text = yaml(entry + "}").replace("admin: {port: 0}", "admin: false")
    path = write(tmp_path, text)
    async with serve_process(path, env=env) as served:
        resp = await raw_request(served.port, "GET", "/works")
        assert resp.status == 200, resp.body
        assert await served.stop() == 0
    served_connects = list(proxy.lines)
    assert served_connects == ([INVALID_CONNECT] if via == "HTTPS_PROXY" else [])
    before = len(function.fake.requests)

    run = await probe(tmp_path, text, env=env)
    row = run.rows["fn"]
    assert row["VERDICT"] not in ("dns-failed", "connect-failed", "tls-failed", "timeout"), (
        run.result.stdout
    )
    assert (row["TCP"], row["TLS"]) == ("ok", "ok"), run.result.stdout
    assert len(function.fake.requests) == before + 1  # the probe's GET arrived
    if via == "HTTPS_PROXY":
        assert proxy.lines == [INVALID_CONNECT, INVALID_CONNECT]


# ------------------------------------------------------------------ proxy authentication


@pytest.mark.parametrize(
    "offered", [["NTLM", "Negotiate"], ["Negotiate"]], ids=["ntlm+negotiate", "negotiate"]
)
async def test_a_407_offering_no_basic_scheme_says_so(
    function: FunctionUrl, pem: str, tmp_path: Path, offered: list[str]
) -> None:
    """Many corporate proxies (Windows domains) accept only NTLM or Negotiate. With a user
    and password in the proxy URL, sigproxy sends Basic and gets 407 every time; telling
    the user to "check the user and password" sends them re-typing a correct password.
    The detail must say the proxy does not take Basic, naming the schemes it offered."""
    seen: list[str | None] = []

    async def ntlm_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await read_connect(reader)
        seen.append(headers.get("proxy-authorization"))
        challenge = "".join(f"Proxy-Authenticate: {s}\r\n" for s in offered)
        writer.write(
            (
                "HTTP/1.1 407 Proxy Authentication Required\r\n"
                + challenge
                + "Content-Type: text/html\r\nContent-Length: 5\r\n\r\nDENY!"
            ).encode()
        )
        await writer.drain()

    async with tcp_server(ntlm_only) as port:
        url = f"http://CORP%5Cjdoe:Corr3ct-PW-never-LOGGED@127.0.0.1:{port}"
        path = write(tmp_path, yaml(FN + f", egress_proxy: '{url}'}}"))
        async with serve_process(path, env=process_env(pem)) as served:
            resp = await raw_request(served.port, "GET", "/x")
            assert await served.stop() == 0
    assert resp.status == 502, resp.body
    body = body_of(resp.body)
    assert body["kind"] == "proxy"
    assert seen and seen[0] is not None and seen[0].startswith("Basic ")
    detail = body["detail"]
    assert "407" in detail
    for scheme in offered:
        assert scheme in detail, detail
    assert "check the user and password" not in detail, detail
    assert "Corr3ct-PW" not in served.log() + resp.body.decode()


# -------------------------------------------------------- proxy refusals with a body


@pytest.mark.parametrize("status", [403, 502])
async def test_a_proxy_error_page_is_never_relayed_or_logged(
    function: FunctionUrl, pem: str, tmp_path: Path, status: int
) -> None:
    """Squid and Zscaler answer a refused CONNECT with an HTML page, some echoing the
    request (its Proxy-Authorization included). Only the status and reason reach the
    client and the log; a 502 (the proxy could not reach the Function URL) is retried,
    a 403 (its policy) is not."""
    connects: list[str] = []
    marker = "SQUID-ERROR-PAGE-MARKER"

    async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, headers = await read_connect(reader)
        connects.append(first)
        page = (
            f"<html><body><h1>{marker}</h1><pre>{first}\nProxy-Authorization: "
            f"{headers.get('proxy-authorization')}</pre></body></html>"
        ).encode()
        reason = {403: "Forbidden", 502: "Bad Gateway"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html\r\n"
            f"Content-Length: {len(page)}\r\n\r\n".encode()
            + page
        )
        await writer.drain()

    password = "Page-PW-never-LOGGED"
    token = base64.b64encode(f"jdoe:{password}".encode()).decode()
    async with tcp_server(refusing) as port:
        url = f"http://jdoe:{password}@127.0.0.1:{port}"
        retries = "{attempts: 3, backoff_base: 0.01, backoff_max: 0.02}"
        path = write(tmp_path, yaml(FN + f", egress_proxy: '{url}', retries: {retries}}}"))
        async with serve_process(path, "--log-level", "debug", env=process_env(pem)) as served:
            resp = await raw_request(served.port, "GET", "/x")
            assert await served.stop() == 0
    assert resp.status == 502, resp.body
    body = body_of(resp.body)
    reason = {403: "403 Forbidden", 502: "502 Bad Gateway"}[status]
    assert body["kind"] == "proxy"
    assert body["detail"] == (
        f"egress proxy http://***@127.0.0.1:{port}: refused CONNECT {FUNCTION_HOST}:443: {reason}"
    )
    assert len(connects) == (3 if status == 502 else 1)
    everything = served.log() + resp.body.decode() + "".join(f"{k}{v}" for k, v in resp.headers)
    for secret in (marker, "<html", password, token):
        assert secret not in everything


# ------------------------------------------------------------ pooling through a tunnel


async def test_tunnels_are_reused_across_many_requests_within_the_pool_cap(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """max_connections: 2 through a proxy: four overlapping requests open two tunnels,
    twenty more in a row reuse them; each request signed afresh (no signature twice)."""

    async def slow(request: web.Request, rec: Recorded) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.json_response({"ok": True})

    function.fake.answer = slow
    proxy = await connect_proxy(function.routes)
    path = write(tmp_path, yaml(FN + ", max_connections: 2}", top=f"egress_proxy: {proxy.url}"))
    async with serve_process(path, env=process_env(pem)) as served:
        first = await asyncio.gather(
            *(raw_request(served.port, "POST", f"/c{i}", body=b"x") for i in range(4))
        )
        assert [r.status for r in first] == [200] * 4
        function.fake.answer = lambda request, rec: _ok()
        for i in range(20):
            resp = await raw_request(served.port, "GET", f"/s{i}")
            assert resp.status == 200, resp.body
        assert await served.stop() == 0
    assert proxy.lines == [CONNECT_LINE, CONNECT_LINE]
    assert len(function.sni) == 2
    assert len(function.fake.requests) == 24
    signatures = [signature_of(r) for r in function.fake.requests]
    assert len(set(signatures)) == 24
    assert_arrived_signed(function, "/s19")


async def _ok() -> web.StreamResponse:
    return web.json_response({"ok": True})


class IdleTunnelProxy:
    """A CONNECT proxy to one address whose tunnels misbehave once idle for ``idle``
    seconds: ``close`` closes them (a FIN both ways, as Squid's idle timeout), ``swallow``
    keeps them open but drops the next bytes from sigproxy and closes then (the close
    racing the next request)."""

    def __init__(self, target: tuple[str, int], idle: float, mode: str) -> None:
        self.target = target
        self.idle = idle
        self.mode = mode
        self.connects: list[str] = []
        self.swallowed = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, _ = await read_connect(reader)
        self.connects.append(first)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        last = time.monotonic()
        done = asyncio.Event()

        def shut() -> None:
            done.set()
            writer.close()
            up_writer.close()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            nonlocal last
            with contextlib.suppress(ConnectionError):
                while data := await src.read(1 << 16):
                    if up and self.mode == "swallow" and time.monotonic() - last > self.idle:
                        self.swallowed += 1
                        shut()
                        return
                    last = time.monotonic()
                    dst.write(data)
                    await dst.drain()
            shut()

        async def watchdog() -> None:
            while not done.is_set():
                await asyncio.sleep(0.02)
                if self.mode == "close" and time.monotonic() - last > self.idle:
                    shut()

        await asyncio.gather(
            pump(reader, up_writer, True), pump(up_reader, writer, False), watchdog()
        )


async def test_a_tunnel_the_proxy_closed_while_idle_is_not_used_and_a_post_arrives_once(
    function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    proxy = IdleTunnelProxy(function.address, 0.3, "close")
    async with tcp_server(proxy.handle) as port:
        path = write(tmp_path, yaml(FN + f", egress_proxy: 'http://127.0.0.1:{port}'}}"))
        async with serve_process(path, env=process_env(pem)) as served:
            assert (await raw_request(served.port, "GET", "/first")).status == 200
            await asyncio.sleep(0.8)  # the proxy closes the idle tunnel
            resp = await raw_request(served.port, "POST", "/order", body=b'{"n": 1}')
            assert resp.status == 200, resp.body
            assert await served.stop() == 0
    assert [r.raw_target for r in function.fake.requests] == ["/first", "/order"]
    assert proxy.connects == [CONNECT_LINE, CONNECT_LINE]
    assert_arrived_signed(function, "/order")


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_request_the_proxy_swallows_on_a_reused_tunnel(
    function: FunctionUrl, pem: str, tmp_path: Path, method: str
) -> None:
    """The proxy drops its idle tunnel just as the next request goes out through it. A
    POST may have run: 502 kind closed, never sent a second time (by the pool or by
    the retries). A GET is sent once more on a new tunnel and answered."""
    proxy = IdleTunnelProxy(function.address, 0.3, "swallow")
    async with tcp_server(proxy.handle) as port:
        path = write(tmp_path, yaml(FN + f", egress_proxy: 'http://127.0.0.1:{port}'}}"))
        async with serve_process(path, env=process_env(pem)) as served:
            assert (await raw_request(served.port, "GET", "/first")).status == 200
            await asyncio.sleep(0.6)
            body = b'{"charge": 100}' if method == "POST" else None
            resp = await raw_request(served.port, method, "/charge", body=body)
            swallowed = proxy.swallowed  # (not the close_notify sent at shutdown)
            await asyncio.sleep(0.3)
            assert await served.stop() == 0
    assert swallowed == 1
    targets = [r.raw_target for r in function.fake.requests]
    if method == "POST":
        assert resp.status == 502, resp.body
        error = body_of(resp.body)
        assert (error["error"], error["kind"]) == ("upstream_unreachable", "closed")
        assert "through egress proxy http://127.0.0.1:" in error["detail"]
        assert targets == ["/first"]
        assert proxy.connects == [CONNECT_LINE]
    else:
        assert resp.status == 200, resp.body
        assert targets == ["/first", "/charge"]
        assert proxy.connects == [CONNECT_LINE, CONNECT_LINE]
    assert "Traceback" not in served.log()


async def test_a_proxy_reset_mid_response_resets_the_client(
    function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """The proxy forwards part of a 2 MiB answer, then resets the tunnel: the client's
    connection is reset too, so the truncated body is never taken for a whole one."""
    size = 2 << 20

    async def big(request: web.Request, rec: Recorded) -> web.StreamResponse:
        return web.Response(body=b"a" * (size if rec.raw_target == "/big" else 10))

    function.fake.answer = big

    async def cutting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_connect(reader)
        up_reader, up_writer = await asyncio.open_connection(*function.address)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def down() -> None:
            passed = 0
            while data := await up_reader.read(1 << 14):
                writer.write(data)
                await writer.drain()
                passed += len(data)
                if passed > 256 << 10:
                    reset(writer)
                    up_writer.close()
                    return

        await asyncio.gather(_pipe(reader, up_writer), down())

    async with tcp_server(cutting) as port:
        path = write(tmp_path, yaml(FN + f", egress_proxy: 'http://127.0.0.1:{port}'}}"))
        async with serve_process(path, env=process_env(pem)) as served:
            with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
                await raw_request(served.port, "GET", "/big")
            again = await raw_request(served.port, "GET", "/after")  # it keeps serving
            assert again.status == 200
            assert await served.stop() == 0
    assert "failed mid-response" in served.log()
    assert "Traceback" not in served.log()


# ---------------------------------------------------------------- timeouts named right


async def test_a_half_open_tunnel_names_the_tls_handshake_that_never_finished(
    function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """The proxy says 200 to CONNECT and then passes nothing (its side to the Function URL
    is dead). What ran out is timeout.connect during the TLS handshake; "no answer from
    the Function URL" reads like a slow function (timeout.read). ``check --probe`` says
    "TLS handshake with ... unfinished within 5 s" for the same thing."""
    connects: list[str] = []

    async def half_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, _ = await read_connect(reader)
        connects.append(first)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await reader.read()  # swallows the ClientHello, answers nothing

    async with tcp_server(half_open) as port:
        entry = (
            f"{{name: fn, url: 'https://{FUNCTION_HOST}', timeout: {{connect: 0.5}}, "
            f"retries: {{attempts: 1}}, egress_proxy: 'http://127.0.0.1:{port}'}}"
        )
        path = write(tmp_path, yaml(entry))
        async with serve_process(path, env=process_env(pem)) as served:
            started = time.monotonic()
            resp = await raw_request(served.port, "GET", "/x")
            took = time.monotonic() - started
            assert await served.stop() == 0
    assert took < 3
    assert connects == [CONNECT_LINE]
    assert resp.status == 504, resp.body
    detail = body_of(resp.body)["detail"]
    assert "TLS handshake" in detail, detail
    assert "0.5 seconds" in detail


# ------------------------------------------------------------------------ secrets


@pytest.mark.parametrize("form", ["percent-encoded", "raw @ and :"])
async def test_secrets_never_leave_through_logs_metrics_bodies_or_check(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, tmp_path: Path, form: str
) -> None:
    """HTTPS_PROXY with a password holding ``@``, ``:`` and ``%`` (percent-encoded, or
    ``@`` and ``:`` typed raw as people do): the proxy gets the right Basic value; the
    password, its encodings, the Basic token, the signature and the session token are
    in no log line at debug, no error body, no /metrics line and no ``check`` output."""
    password = "p@ss:w%rd-FIELD-never-LOGGED"
    quoted = "p%40ss%3Aw%25rd-FIELD-never-LOGGED"
    typed = quoted if form == "percent-encoded" else "p@ss:w%25rd-FIELD-never-LOGGED"
    right = "Basic " + base64.b64encode(f"CORP\\jdoe:{password}".encode()).decode()
    proxy = await connect_proxy(function.routes, credentials=right)
    proxy_env = f"http://CORP%5Cjdoe:{typed}@127.0.0.1:{proxy.port}"

    async def mixed(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.raw_target == "/denied":
            return web.json_response(
                {"Message": "Forbidden"},
                status=403,
                headers={"x-amzn-ErrorType": "AccessDeniedException", "x-amzn-RequestId": "r"},
            )
        return web.json_response({"ok": True})

    function.fake.answer = mixed
    env = process_env(pem, HTTPS_PROXY=proxy_env, https_proxy="")
    bodies = []
    path = write(tmp_path, yaml(FN + "}"))
    async with serve_process(path, "--log-level", "debug", env=env) as served:
        for target in ("/ok?X-Amz-Security-Token=abc", "/denied", "/ok2"):
            resp = await raw_request(served.port, "GET", target)
            bodies.append(resp.body.decode())
        assert [b for b in bodies if '"ok": true' in b] and len(bodies) == 3
        assert served.admin_port is not None
        metrics = (await raw_request(served.admin_port, "GET", "/metrics")).body.decode()
        assert await served.stop() == 0
    assert proxy.authorizations and set(proxy.authorizations) == {right}
    check = await asyncio.to_thread(run_cli, "check", "--config", path, env=env)
    assert check.returncode == 0, check.stderr
    secrets = [password, quoted, typed, right.split()[1], "jdoe", SESSION_TOKEN]
    secrets += [signature_of(r) for r in function.fake.requests]
    for where in (served.log(), metrics, check.stdout + check.stderr, *bodies):
        for secret in secrets:
            assert secret not in where


# -------------------------------------------------------------------- private CAs


async def test_ssl_cert_dir_trusts_an_intercepting_proxys_ca(
    aiohttp_server: AiohttpServer, connect_proxy: StartConnectProxy, tmp_path: Path
) -> None:
    """A TLS-inspecting proxy re-signs the Function URL's certificate with the company's
    CA. Distributions install such a CA as a hashed file in a directory; OpenSSL's
    SSL_CERT_DIR (the other half of the SSL_CERT_FILE convention the README names)
    makes the process trust it, and without it the error says what to do."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to hash the CA directory")
    corp = trustme.CA(organization_name="Corp TLS Inspection")
    function = await function_url(aiohttp_server, corp, FUNCTION_HOST)
    proxy = await connect_proxy(function.routes)
    folder = tmp_path / "certs"
    folder.mkdir()
    corp.cert_pem.write_to_path(str(folder / "corp.pem"))
    await asyncio.to_thread(
        subprocess.run, ["openssl", "rehash", str(folder)], check=True, capture_output=True
    )
    base = process_env(str(tmp_path / "nothing.pem"), HTTPS_PROXY=proxy.url)
    base.pop("SSL_CERT_FILE")
    path = write(tmp_path, yaml(FN + ", retries: {attempts: 1}}"))
    async with serve_process(path, env=base) as served:
        refused = await raw_request(served.port, "GET", "/untrusted")
        assert await served.stop() == 0
    assert refused.status == 502, refused.body
    error = body_of(refused.body)
    assert error["kind"] == "tls"
    assert "certificate verify failed" in error["detail"]
    assert "SSL_CERT_FILE" in error["detail"]
    async with serve_process(path, env={**base, "SSL_CERT_DIR": str(folder)}) as served:
        resp = await raw_request(served.port, "GET", "/trusted")
        assert resp.status == 200, resp.body
        assert await served.stop() == 0
    assert_arrived_signed(function, "/trusted")


# ------------------------------------------------- check says what serve will do


def check_online(path: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``sigproxy check`` without --offline (run_cli adds it): its DNS warnings run."""
    return subprocess.run(
        [sys.executable, "-m", "sigproxy", "check", "--config", path],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize("via", ["HTTPS_PROXY", "connect_to"])
def test_check_does_not_warn_about_a_lookup_serve_never_makes(
    pem: str, tmp_path: Path, via: str
) -> None:
    """Behind a corporate proxy the Function URL's name often does not resolve inside
    the network (only the proxy resolves it); with connect_to it need not resolve at all.
    serve never looks it up (test_probe_reaches_the_upstream_the_way_serve_does shows it
    serving), so check must not warn "a typo in the url, or no network here"."""
    entry = f"{{name: fn, url: 'https://{INVALID_HOST}', region: us-east-1"
    env = process_env(pem)
    if via == "connect_to":
        entry += ", connect_to: '127.0.0.1:9'"
    else:
        env["HTTPS_PROXY"] = "http://127.0.0.1:9"
    path = write(tmp_path, yaml(entry + "}"))
    result = check_online(path, env)
    assert result.returncode == 0, result.stderr
    assert f"DNS lookup of {INVALID_HOST}" not in result.stderr, result.stderr


def test_check_names_the_egress_proxy_the_environment_chose(pem: str, tmp_path: Path) -> None:
    """Which proxy an upstream uses is decided by HTTPS_PROXY/NO_PROXY rules the user can't
    see; serve logs it per route ("through egress proxy http://***@host:port"). check,
    the command for validating a setup, must say the same (password hidden), and must
    say which upstream NO_PROXY sends directly."""
    env = process_env(
        pem,
        HTTPS_PROXY="http://jdoe:Check-PW-never-SHOWN@proxy.corp.invalid:3128",
        NO_PROXY="direct.lambda-url.us-east-1.on.aws.invalid",
    )
    path = write(
        tmp_path,
        yaml(
            f"{{name: fn, url: 'https://{INVALID_HOST}', region: us-east-1}}",
            "{name: direct, url: 'https://direct.lambda-url.us-east-1.on.aws.invalid',"
            " region: us-east-1, path_prefix: /direct}",
        ),
    )
    result = run_cli("check", "--config", path, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "Check-PW" not in out and "jdoe" not in out
    shown = "http://***@proxy.corp.invalid:3128"
    lines = [line for line in result.stdout.splitlines() if shown in line]
    assert any(" fn " in f" {line.replace(':', ' ')} " for line in lines), result.stdout
    assert not any("direct" in line for line in lines), result.stdout
