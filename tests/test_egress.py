"""Egress: upstream connections through an HTTP proxy's CONNECT tunnel, and ``connect_to``.

The proxy is a small CONNECT proxy written here (it records each CONNECT line, Host and
Proxy-Authorization, and can require credentials, refuse, close or stay silent). Behind
it is an HTTPS Function URL on 127.0.0.1 whose certificate, from a throwaway trustme CA
(trusted through ``SSL_CERT_FILE``), names ``abc123.lambda-url.us-east-1.on.aws``:
sigproxy never looks that name up, so only the tunnel (or ``connect_to``) reaches it. The
test proxy maps it to the local server and dials nothing but 127.0.0.1. Every signature
that arrives is recomputed with awscrt. Where the environment matters (HTTPS_PROXY,
NO_PROXY) or the logs do (the proxy's password), the real ``sigproxy serve`` process
runs; the rest runs the proxy app in-process, where the metrics can be read.

Upstreams reached directly on purpose (NO_PROXY, ``egress_proxy: none``) are named
``*.invalid`` (RFC 6761): their lookup fails everywhere without leaving the machine.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiohttp.test_utils import TestServer

from sigproxy.egress import EgressProxy
from sigproxy.routing import Origin
from sigproxy.upstream import ProxyFailed, UpstreamClient

from .conftest import RunningProxy, StartProxy
from .support import FakeFunctionUrl, RawResponse, raw_request, verify_sigv4
from .test_process import creds_env, run_cli, serve_process, write

AiohttpServer = Callable[..., Awaitable[TestServer]]

FUNCTION_HOST = "abc123.lambda-url.us-east-1.on.aws"
DIRECT_HOST = "direct.lambda-url.us-east-1.on.aws.invalid"
CONNECT_LINE = f"CONNECT {FUNCTION_HOST}:443 HTTP/1.1"
PROXY_USER = "proxy-user"
PROXY_PASSWORD = "pr0xy!PaSS-never-LOGGED"  # in a URL: pr0xy%21PaSS-never-LOGGED
WRONG_PASSWORD = "wr0ng-PaSS-never-LOGGED"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
ERRORS = "sigproxy_upstream_errors_total"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def with_credentials(url: str, password: str) -> str:
    quoted = password.replace("!", "%21")
    return url.replace("http://", f"http://{PROXY_USER}:{quoted}@")


# --------------------------------------------------------------------- the CONNECT proxy


async def read_connect(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    """A CONNECT request's line and its headers (names lower-cased)."""
    head = await reader.readuntil(b"\r\n\r\n")
    first, *rest = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in rest:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return first, headers


@dataclass
class ConnectProxy:
    """A CONNECT-only HTTP proxy on 127.0.0.1. ``mode``: ``open`` (tunnels, asking for
    ``credentials`` when set), ``refuse`` (403), ``close`` (closes without answering) or
    ``silent`` (never answers)."""

    routes: dict[str, tuple[str, int]]
    mode: str = "open"
    credentials: str | None = None
    lines: list[str] = field(default_factory=list)
    hosts: list[str | None] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    port: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        try:
            await self._serve(reader, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, headers = await read_connect(reader)
        self.lines.append(first)
        self.hosts.append(headers.get("host"))
        self.authorizations.append(headers.get("proxy-authorization"))
        if self.mode == "close":
            return
        if self.mode == "silent":
            await reader.read()  # until sigproxy gives up
            return
        if self.mode == "refuse":
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        if self.mode == "unauthorized":  # tinyproxy's BasicAuth answers 401, not 407
            writer.write(b"HTTP/1.0 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            return
        if self.credentials is not None and headers.get("proxy-authorization") != self.credentials:
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="corp"\r\nContent-Length: 0\r\n\r\n'
            )
            return
        method, authority, _ = first.split(" ", 2)
        host, _, port = authority.rpartition(":")
        address = self.routes.get(authority)
        if address is None and host == "127.0.0.1":
            address = (host, int(port))
        if method != "CONNECT" or address is None:  # nothing leaves loopback
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        up_reader, up_writer = await asyncio.open_connection(*address)
        self.writers.append(up_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    except ConnectionError:
        pass
    finally:
        dst.close()


StartConnectProxy = Callable[..., Awaitable[ConnectProxy]]


@pytest.fixture
async def connect_proxy() -> AsyncIterator[StartConnectProxy]:
    """``await connect_proxy(routes, mode=..., credentials=...)``: a running ConnectProxy."""
    servers: list[asyncio.Server] = []
    proxies: list[ConnectProxy] = []

    async def start(
        routes: dict[str, tuple[str, int]], mode: str = "open", credentials: str | None = None
    ) -> ConnectProxy:
        proxy = ConnectProxy(routes, mode, credentials)
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        proxy.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        proxies.append(proxy)
        return proxy

    yield start
    for server in servers:
        server.close()
    for proxy in proxies:
        await proxy.close()
    for server in servers:
        await server.wait_closed()


# ------------------------------------------------------------- the HTTPS Function URL


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pem(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CA's PEM, trusted by in-process proxies started after this (and passed to
    processes as SSL_CERT_FILE)."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    return str(path)


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's proxy settings never reach the proxies these tests start."""
    import os

    for name in list(os.environ):
        if name.lower() in PROXY_VARIABLES:
            monkeypatch.delenv(name)


@dataclass
class FunctionUrl:
    """A FakeFunctionUrl over TLS that also records the SNI of each handshake."""

    fake: FakeFunctionUrl
    sni: list[str | None]

    @property
    def port(self) -> int:
        return self.fake.port

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.fake.port)

    @property
    def routes(self) -> dict[str, tuple[str, int]]:
        """What a proxy needs to reach it by the Function URL's name."""
        return {f"{FUNCTION_HOST}:443": self.address}


async def function_url(aiohttp_server: AiohttpServer, ca: trustme.CA, *names: str) -> FunctionUrl:
    sni: list[str | None] = []
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    ctx.sni_callback = lambda _obj, name, _ctx: sni.append(name)
    fake = FakeFunctionUrl()
    # No access log: it would print the query strings of the requests.
    server = await aiohttp_server(fake.app(), ssl=ctx, access_log=None)
    assert server.port is not None
    fake.port = server.port
    return FunctionUrl(fake, sni)


@pytest.fixture
async def function(aiohttp_server: AiohttpServer, ca: trustme.CA) -> FunctionUrl:
    """The Function URL at 127.0.0.1, with a certificate for its real name."""
    return await function_url(aiohttp_server, ca, FUNCTION_HOST)


# --------------------------------------------------------------------------- helpers


def process_env(pem: str, **variables: str) -> dict[str, str]:
    """A sigproxy process's environment: the test credentials, the CA, ``variables``,
    and none of the developer's proxy settings."""
    env = {k: v for k, v in creds_env().items() if k.lower() not in PROXY_VARIABLES}
    env["SSL_CERT_FILE"] = pem
    env.update(variables)
    return env


def yaml(*upstreams: str, top: str = "") -> str:
    lines = ["admin: {port: 0}", *([top] if top else []), "upstreams:"]
    return "\n".join(lines + [f"  - {u}" for u in upstreams]) + "\n"


FN = f"{{name: fn, url: 'https://{FUNCTION_HOST}', timeout: {{connect: 5}}"
DIRECT = (
    f"{{name: direct, url: 'https://{DIRECT_HOST}', region: us-east-1, path_prefix: /direct,"
    " timeout: {connect: 5}"
)


def error(resp: RawResponse, status: int = 502) -> dict[str, str]:
    assert resp.status == status, resp.body
    body: dict[str, str] = json.loads(resp.body)
    assert body["error"] == {502: "upstream_unreachable", 504: "upstream_timeout"}[status]
    return body


def assert_arrived_signed(function: FunctionUrl, target: str) -> None:
    rec = function.fake.last
    assert rec.raw_target == target
    assert rec.header("Host") == FUNCTION_HOST
    verify_sigv4(rec, region="us-east-1")
    assert set(function.sni) == {FUNCTION_HOST}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------ through a proxy: process


async def test_config_egress_proxy_tunnels_to_the_function_url(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    proxy = await connect_proxy(function.routes)
    path = write(tmp_path, yaml(FN + "}", top=f"egress_proxy: {proxy.url}"))
    async with serve_process(path, env=process_env(pem)) as served:
        first = await raw_request(served.port, "GET", "/hello?name=John")
        assert first.status == 200, first.body
        assert json.loads(first.body) == {"ok": True, "target": "/hello?name=John"}
        assert_arrived_signed(function, "/hello?name=John")
        second = await raw_request(served.port, "POST", "/orders", body=b'{"a": 1}')
        assert second.status == 200, second.body
        assert function.fake.last.body == b'{"a": 1}'
        assert_arrived_signed(function, "/orders")
        assert await served.stop() == 0
    # One tunnel carried both requests (one TLS handshake, one CONNECT).
    assert proxy.lines == [CONNECT_LINE]
    assert proxy.hosts == [f"{FUNCTION_HOST}:443"]
    assert proxy.authorizations == [None]
    assert function.sni == [FUNCTION_HOST]


@pytest.mark.parametrize("variables", ["HTTPS_PROXY", "https_proxy before HTTPS_PROXY"])
async def test_proxy_from_the_environment(
    connect_proxy: StartConnectProxy,
    function: FunctionUrl,
    pem: str,
    tmp_path: Path,
    variables: str,
) -> None:
    used = await connect_proxy(function.routes)
    other = await connect_proxy(function.routes)
    env = (
        {"HTTPS_PROXY": used.url}
        if variables == "HTTPS_PROXY"
        else {"HTTPS_PROXY": other.url, "https_proxy": used.url}
    )
    path = write(tmp_path, yaml(FN + "}"))
    async with serve_process(path, env=process_env(pem, **env)) as served:
        resp = await raw_request(served.port, "GET", "/env")
        assert resp.status == 200, resp.body
        assert_arrived_signed(function, "/env")
    assert used.lines == [CONNECT_LINE]
    assert other.lines == []


@pytest.mark.parametrize("bypass", ["NO_PROXY", "egress_proxy: none"])
async def test_an_upstream_the_proxy_must_not_carry_is_dialled_directly(
    connect_proxy: StartConnectProxy,
    function: FunctionUrl,
    pem: str,
    tmp_path: Path,
    bypass: str,
) -> None:
    """HTTPS_PROXY is set; one upstream is named in NO_PROXY, or says ``egress_proxy:
    none``. sigproxy looks its host up itself (and fails: the proxy would have reached
    it), while the other upstream still goes through the proxy."""
    proxy = await connect_proxy(function.routes)
    env = {"HTTPS_PROXY": proxy.url}
    if bypass == "NO_PROXY":
        env["NO_PROXY"] = f"localhost,{DIRECT_HOST}"
        direct = DIRECT + "}"
    else:
        direct = DIRECT + ", egress_proxy: none}"
    path = write(tmp_path, yaml(FN + "}", direct))
    async with serve_process(path, env=process_env(pem, **env)) as served:
        resp = await raw_request(served.port, "GET", "/direct/x")
        body = error(resp)
        assert (body["upstream"], body["kind"]) == ("direct", "connect")
        assert body["message"] == "cannot connect to upstream 'direct'"
        assert body["detail"].startswith(f"DNS lookup of {DIRECT_HOST} failed")
        assert "egress proxy" not in body["detail"]
        ok = await raw_request(served.port, "GET", "/through")
        assert ok.status == 200, ok.body
        assert_arrived_signed(function, "/through")
    assert proxy.lines == [CONNECT_LINE]


async def test_proxy_credentials_are_sent_and_never_logged(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """The user and password of the proxy URL go as Basic Proxy-Authorization; neither
    they nor that value are in sigproxy's stderr at debug level, or in a JSON body. A
    wrong password is a 502 naming the proxy hop with the advice."""
    right = basic(PROXY_USER, PROXY_PASSWORD)
    wrong = basic(PROXY_USER, WRONG_PASSWORD)
    proxy = await connect_proxy(function.routes, credentials=right)
    good_url = with_credentials(proxy.url, PROXY_PASSWORD)
    bad_url = with_credentials(proxy.url, WRONG_PASSWORD)
    path = write(
        tmp_path,
        yaml(
            FN + f", egress_proxy: '{good_url}'}}",
            f"{{name: wrong, url: 'https://{FUNCTION_HOST}/w', path_prefix: /wrong,"
            f" egress_proxy: '{bad_url}', timeout: {{connect: 5}}}}",
        ),
    )
    async with serve_process(path, "--log-level", "debug", env=process_env(pem)) as served:
        ok = await raw_request(served.port, "GET", "/with-credentials")
        assert ok.status == 200, ok.body
        assert_arrived_signed(function, "/with-credentials")
        refused = await raw_request(served.port, "GET", "/wrong/x")
        body = error(refused)
        assert (body["upstream"], body["kind"]) == ("wrong", "proxy")
        assert body["message"] == "the egress proxy for upstream 'wrong' failed"
        masked = f"http://***@127.0.0.1:{proxy.port}"
        assert body["detail"] == (
            f"egress proxy {masked}: 407 Proxy Authentication Required for "
            f"CONNECT {FUNCTION_HOST}:443: check the user and password in the proxy URL"
        )
        assert await served.stop() == 0
    assert proxy.authorizations[0] == right
    assert set(proxy.authorizations[1:]) == {wrong}
    assert function.fake.last.header("Proxy-Authorization") is None  # not past the proxy
    log = served.log()
    assert masked in log  # the failure was logged, by the masked URL
    for secret in (
        PROXY_PASSWORD,
        WRONG_PASSWORD,
        "pr0xy%21PaSS",
        right.split()[1],
        wrong.split()[1],
        f"{PROXY_USER}:",
    ):
        assert secret not in log
        assert secret not in refused.body.decode()


# --------------------------------------------------------- through a proxy: in-process


def proxy_errors(running: RunningProxy, upstream: str = "fn") -> float:
    value = running.registry.get_sample_value(ERRORS, {"upstream": upstream, "kind": "proxy"})
    return value or 0.0


@pytest.mark.parametrize("failure", ["407", "403", "close", "silent", "unreachable"])
async def test_proxy_hop_failures_are_502_naming_the_proxy(
    connect_proxy: StartConnectProxy,
    function: FunctionUrl,
    pem: str,
    start_proxy: StartProxy,
    failure: str,
) -> None:
    if failure == "407":
        proxy = await connect_proxy(function.routes, credentials=basic("someone", "something"))
    else:
        mode = {"403": "refuse", "close": "close", "silent": "silent"}.get(failure, "open")
        proxy = await connect_proxy(function.routes, mode)
    url = f"http://127.0.0.1:{closed_port()}" if failure == "unreachable" else proxy.url
    running = await start_proxy(
        yaml(
            f"{{name: fn, url: 'https://{FUNCTION_HOST}', timeout: {{connect: 0.5}}}}",
            top=f"egress_proxy: {url}",
        )
    )
    resp = await raw_request(running.port, "GET", "/x")
    body = error(resp)
    assert (body["upstream"], body["kind"]) == ("fn", "proxy")
    assert body["message"] == "the egress proxy for upstream 'fn' failed"
    said = f"egress proxy {url}: "
    expected = {
        "407": said + f"407 Proxy Authentication Required for CONNECT {FUNCTION_HOST}:443: "
        "it wants credentials: give them in the proxy URL (http://user:password@host:port)",
        "403": said + f"refused CONNECT {FUNCTION_HOST}:443: 403 Forbidden",
        "close": said + f"closed the connection before answering CONNECT {FUNCTION_HOST}:443",
        "silent": said + f"no answer to CONNECT {FUNCTION_HOST}:443 within 0.5 seconds",
        "unreachable": said + "connection refused",
    }[failure]
    assert body["detail"] == expected
    assert proxy_errors(running) >= 1
    assert function.fake.requests == []
    assert function.sni == []
    if failure != "unreachable":
        assert proxy.lines
        assert set(proxy.lines) == {CONNECT_LINE}


async def test_a_tunnelled_connection_is_pooled(
    connect_proxy: StartConnectProxy,
    function: FunctionUrl,
    pem: str,
    start_proxy: StartProxy,
) -> None:
    """Two sequential requests: one CONNECT, one TLS handshake, one connection."""
    proxy = await connect_proxy(function.routes)
    running = await start_proxy(yaml(FN + "}", top=f"egress_proxy: {proxy.url}"))
    for target in ("/one", "/two"):
        resp = await raw_request(running.port, "GET", target)
        assert resp.status == 200, resp.body
        assert_arrived_signed(function, target)
    assert proxy.lines == [CONNECT_LINE]
    assert function.sni == [FUNCTION_HOST]
    assert [r.raw_target for r in function.fake.requests] == ["/one", "/two"]
    assert proxy_errors(running) == 0


async def test_tls_failure_inside_the_tunnel_names_the_function_url(
    aiohttp_server: AiohttpServer,
    ca: trustme.CA,
    connect_proxy: StartConnectProxy,
    pem: str,
    start_proxy: StartProxy,
) -> None:
    """The proxy hop works; the certificate behind it is for another name: kind tls,
    and the words name the Function URL's host, reached through the proxy."""
    other = await function_url(aiohttp_server, ca, "other.example")
    proxy = await connect_proxy(other.routes)
    running = await start_proxy(yaml(FN + "}", top=f"egress_proxy: {proxy.url}"))
    resp = await raw_request(running.port, "GET", "/x")
    body = error(resp)
    assert (body["upstream"], body["kind"]) == ("fn", "tls")
    assert body["detail"].startswith(
        f"certificate verify failed for {FUNCTION_HOST} through egress proxy {proxy.url}: "
    )
    assert proxy.lines  # the tunnel was opened
    assert set(other.sni) == {FUNCTION_HOST}
    assert other.fake.requests == []
    assert proxy_errors(running) == 0


# ---------------------------------------------------------------------------- connect_to


async def test_connect_to_dials_the_address_and_keeps_the_url_host(
    function: FunctionUrl, pem: str, start_proxy: StartProxy
) -> None:
    """The URL's host does not resolve: only connect_to's address is dialled, while SNI,
    the certificate check, Host and the signature are the URL host's."""
    running = await start_proxy(yaml(FN + f", connect_to: '127.0.0.1:{function.port}'}}"))
    for target in ("/a?x=1", "/b"):
        resp = await raw_request(running.port, "GET", target)
        assert resp.status == 200, resp.body
        assert_arrived_signed(function, target)
    assert function.sni == [FUNCTION_HOST]  # and the second request reused the connection


async def test_connect_to_through_a_proxy_is_the_connect_target(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, start_proxy: StartProxy
) -> None:
    proxy = await connect_proxy({})  # knows no names: it dials 127.0.0.1 only
    running = await start_proxy(
        yaml(
            FN + f", connect_to: '127.0.0.1:{function.port}'}}",
            top=f"egress_proxy: {proxy.url}",
        )
    )
    resp = await raw_request(running.port, "POST", "/c", body=b"payload")
    assert resp.status == 200, resp.body
    assert_arrived_signed(function, "/c")
    assert proxy.lines == [f"CONNECT 127.0.0.1:{function.port} HTTP/1.1"]
    assert proxy.hosts == [f"127.0.0.1:{function.port}"]


async def test_connect_to_a_server_with_another_name_is_502_tls(
    aiohttp_server: AiohttpServer, ca: trustme.CA, pem: str, start_proxy: StartProxy
) -> None:
    other = await function_url(aiohttp_server, ca, "other.example", "127.0.0.1")
    running = await start_proxy(yaml(FN + f", connect_to: '127.0.0.1:{other.port}'}}"))
    resp = await raw_request(running.port, "GET", "/x")
    body = error(resp)
    assert (body["upstream"], body["kind"]) == ("fn", "tls")
    assert body["detail"].startswith(
        f"certificate verify failed for {FUNCTION_HOST} at 127.0.0.1:{other.port}: "
    )
    assert set(other.sni) == {FUNCTION_HOST}  # asked for the URL's name, not the address
    assert other.fake.requests == []


async def test_connect_to_refused_names_the_address(pem: str, start_proxy: StartProxy) -> None:
    port = closed_port()
    running = await start_proxy(yaml(FN + f", connect_to: '127.0.0.1:{port}'}}"))
    body = error(await raw_request(running.port, "GET", "/x"))
    assert (body["upstream"], body["kind"]) == ("fn", "connect")
    assert body["detail"] == f"connection refused by {FUNCTION_HOST}:443 at 127.0.0.1:{port}"


# ------------------------------------------------------- answers that are not answers


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.1 status line: 'SSH-2.0-OpenSSH_9.6'"),
        (b"HTTP/1.1 200 OK\r\n\r\nearly", "5 bytes after its 200 answer"),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 20000, "an answer head over 16384 bytes"),
        (b"HTTP/1.0 502 Bad\x1bGateway\r\n\r\n", "502 Bad\\x1bGateway"),
    ],
)
async def test_a_proxy_answer_that_is_not_a_tunnel_is_proxy_failed(
    answer: bytes, words: str
) -> None:
    """On the transport itself: what the proxy said is quoted (escaped), never obeyed,
    and the connection's slot is given back."""

    handlers: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            await reader.read()  # until sigproxy closes
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    origin = Origin("https", FUNCTION_HOST, 443, proxy=EgressProxy("127.0.0.1", port, url))
    client = UpstreamClient()
    try:
        with pytest.raises(ProxyFailed) as failed:
            await client.request(
                origin, "GET", "/", [("Host", FUNCTION_HOST)], b"", connect_timeout=5,
                read_timeout=5,
            )  # fmt: skip
        assert failed.value.kind == "proxy"
        assert str(failed.value).startswith(f"egress proxy {url}: ")
        assert str(failed.value).endswith(words)
        assert failed.value.status == (502 if answer.startswith(b"HTTP/1.0 502") else None)
        assert client._pools[origin].open == 0
    finally:
        await client.close()
        server.close()
        await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), 5)
        await server.wait_closed()


async def test_a_401_from_the_proxy_with_credentials_says_to_check_them(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, start_proxy: StartProxy
) -> None:
    """tinyproxy (checked by hand against tinyproxy 1.11.1 too) refuses wrong BasicAuth
    credentials with 401 where the standard says 407."""
    proxy = await connect_proxy(function.routes, "unauthorized")
    url = proxy.url.replace("http://", "http://alice:wrong-never-LOGGED@")
    running = await start_proxy(
        yaml(f"{{name: fn, url: 'https://{FUNCTION_HOST}'}}", top=f"egress_proxy: '{url}'")
    )
    body = error(await raw_request(running.port, "GET", "/x"))
    assert body["kind"] == "proxy"
    assert body["detail"] == (
        f"egress proxy http://***@127.0.0.1:{proxy.port}: refused CONNECT {FUNCTION_HOST}:443: "
        "401 Unauthorized (check the user and password in the proxy URL)"
    )
    assert "wrong-never-LOGGED" not in json.dumps(body)
    assert function.fake.requests == []


async def test_a_tls_inspecting_proxys_ca_is_trusted_through_aws_ca_bundle(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """Behind a TLS-inspecting proxy, users of the AWS CLI already set AWS_CA_BUNDLE to
    its CA: sigproxy reads it too (besides the system CAs), with no SSL_CERT_FILE."""
    proxy = await connect_proxy(function.routes)
    path = write(tmp_path, yaml(FN + "}", top=f"egress_proxy: {proxy.url}"))
    env = process_env(pem, AWS_CA_BUNDLE=pem)
    del env["SSL_CERT_FILE"]
    async with serve_process(path, env=env) as served:
        resp = await raw_request(served.port, "GET", "/bundle")
        assert resp.status == 200, resp.body
        assert_arrived_signed(function, "/bundle")
        assert await served.stop() == 0
    # Without either, the same upstream is a 502 naming both ways to trust the CA.
    env.pop("AWS_CA_BUNDLE")
    async with serve_process(path, env=env) as served:
        resp = await raw_request(served.port, "GET", "/untrusted")
        assert resp.status == 502, resp.body
        error = json.loads(resp.body)
        assert error["kind"] == "tls", error
        assert "point SSL_CERT_FILE or AWS_CA_BUNDLE at its PEM bundle" in error["detail"]
        assert await served.stop() == 0


@pytest.mark.parametrize(
    ("bundle", "says"),
    [("missing.pem", "No such file or directory"), ("garbage.pem", "")],
)
def test_an_unreadable_aws_ca_bundle_is_one_line_and_exit_2(
    tmp_path: Path, bundle: str, says: str
) -> None:
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    path = write(tmp_path, yaml(FN + "}"))
    env = process_env(str(tmp_path / "none.pem"), AWS_CA_BUNDLE=str(tmp_path / bundle))
    del env["SSL_CERT_FILE"]
    for command in ("serve", "check"):
        result = run_cli(command, "--config", path, env=env)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"sigproxy: error: AWS_CA_BUNDLE: {tmp_path / bundle}: ")
        assert says in lines[0]
        assert lines[0].endswith("point it at a PEM file of CA certificates, or unset it")
        assert "Traceback" not in result.stderr
