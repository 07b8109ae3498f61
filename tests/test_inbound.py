"""Who gets in: CORS, origins, inbound tokens, client addresses, methods, forward-proxy
mode (curl -x), CONNECT, slow clients, and a hypothesis suite of hostile inputs that
must never produce a 5xx or a connection to a host outside the table."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigproxy.config import parse_config
from sigproxy.cors import CorsConfig, CorsPolicy
from sigproxy.errors import ConfigError
from sigproxy.inbound import HostAllowList

from .conftest import StartProxy, one_upstream
from .support import FakeFunctionUrl, Recorded, raw_request, read_response, verify_sigv4

TOKEN = "inbound-token-never-LOGGED-0123456789"


def with_cors(port: int, cors: str, *, extra: str = "") -> str:
    return (
        f"{extra}upstreams:\n"
        f"  - {{name: fn, url: 'http://127.0.0.1:{port}', region: us-east-1, path_prefix: /fn,\n"
        f"     cors: {cors}}}\n"
    )


CORS = (
    "{allow_origins: ['http://localhost:*', 'https://app.example.com'], "
    "allow_methods: [GET, POST, PUT], allow_headers: [content-type, x-custom], "
    "expose_headers: [x-request-id], max_age: 300}"
)


# --- Host names (DNS rebinding) ---------------------------------------------------------

HOSTS_CONFIG = """
listen: {host: proxy.internal, port: 8080}
allow_unauthenticated: true
allowed_hosts: [sigproxy, "*.svc.cluster.local", 10.0.0.7]
upstreams:
  - {name: a, url: 'http://127.0.0.1:1', region: us-east-1, host: orders.localhost}
  - {name: b, url: 'http://127.0.0.1:1', region: us-east-1, path_prefix: /b}
"""


@pytest.mark.parametrize(
    ("host", "allowed", "admin"),
    [
        ("localhost", True, True),
        ("127.0.0.1", True, True),
        ("127.8.9.10", True, True),
        ("[::1]", True, True),
        ("proxy.internal", True, True),  # listen.host
        ("orders.localhost", True, True),  # an upstream's host:
        ("sigproxy", True, True),
        ("a.svc.cluster.local", True, True),
        ("a.b.svc.cluster.local", True, True),
        ("svc.cluster.local", False, False),  # the pattern is for names under it
        ("evilsvc.cluster.local", False, False),
        ("10.0.0.7", True, True),
        ("10.0.0.8", False, True),  # the admin listener takes any address
        ("[fd00::1]", False, True),
        ("localhost.evil.example", False, False),
        ("127.0.0.1.nip.io", False, False),
        ("rebind.attacker.example", False, False),
        ("0.0.0.0", False, True),
        ("", False, False),
    ],
)
def test_host_allow_list(host: str, allowed: bool, admin: bool) -> None:
    config = parse_config(HOSTS_CONFIG)
    assert HostAllowList.for_config(config).allows(host) is allowed
    assert HostAllowList.for_config(config, any_ip=True).allows(host) is admin


def test_star_allows_any_host_only_with_a_token() -> None:
    with pytest.raises(ConfigError, match=r"allowed_hosts.*inbound_auth"):
        parse_config('allowed_hosts: ["*"]\n' + one_upstream(1))
    config = parse_config(
        f'allowed_hosts: ["*"]\ninbound_auth: {{tokens: [{TOKEN}]}}\n' + one_upstream(1)
    )
    assert HostAllowList.for_config(config).allows("anything.example")


@pytest.mark.parametrize("bad", ["host:8080", "http://x", "a b", "*.", "**.x", "x/y"])
def test_allowed_hosts_must_be_names(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"allowed_hosts\[0\]"):
        parse_config(f"allowed_hosts: ['{bad}']\n" + one_upstream(1))


# --- CORS policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://LOCALHOST:8080", True),
        ("http://localhost", False),
        ("http://localhost:3000.evil.com", False),
        ("https://localhost:3000", False),
        ("https://app.example.com", True),
        ("https://app.example.com.evil.com", False),
        ("https://evil.app.example.com", False),
        ("null", False),
    ],
)
def test_origin_matching(origin: str, allowed: bool) -> None:
    policy = CorsPolicy(CorsConfig(allow_origins=("http://localhost:*", "https://app.example.com")))
    assert policy.allows_origin(origin) is allowed


def test_wildcard_subdomain_pattern() -> None:
    policy = CorsPolicy(CorsConfig(allow_origins=("https://*.example.com",)))
    assert policy.allows_origin("https://a.example.com")
    assert not policy.allows_origin("https://a.b.example.com")
    assert not policy.allows_origin("https://example.com")


def test_star_with_credentials_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot be combined with allow_credentials"):
        parse_config(with_cors(1, "{allow_origins: ['*'], allow_credentials: true}"))
    with pytest.raises(ConfigError, match=r"allow_origins\[0\]: 'localhost:3000' is not an origin"):
        parse_config(with_cors(1, "{allow_origins: ['localhost:3000']}"))


async def test_preflight_is_answered_locally(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(with_cors(upstream.port, CORS))
    resp = await raw_request(
        proxy.port,
        "OPTIONS",
        "/fn/orders",
        [
            ("Origin", "http://localhost:3000"),
            ("Access-Control-Request-Method", "PUT"),
            ("Access-Control-Request-Headers", "Content-Type, X-Custom"),
        ],
    )
    assert resp.status == 204
    assert resp.header("Access-Control-Allow-Origin") == "http://localhost:3000"
    assert resp.header("Access-Control-Allow-Methods") == "PUT"
    assert resp.header("Access-Control-Allow-Headers") == "content-type, x-custom"
    assert resp.header("Access-Control-Max-Age") == "300"
    assert resp.header("Access-Control-Allow-Credentials") is None
    assert "Origin" in (resp.header("Vary") or "")
    assert upstream.requests == []  # never forwarded, never signed


@pytest.mark.parametrize(
    ("origin", "method", "headers", "why"),
    [
        (
            "http://evil.example",
            "POST",
            "content-type",
            "this page's origin may not call this path",
        ),
        (
            "http://localhost:3000",
            "DELETE",
            "",
            "the requested method is not in cors.allow_methods",
        ),
        (
            "http://localhost:3000",
            "POST",
            "x-secret, <img src=x>",
            "request header(s) not in cors.allow_headers: x-secret, (not a header name)",
        ),
    ],
)
async def test_preflight_refusals_grant_nothing(
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    origin: str,
    method: str,
    headers: str,
    why: str,
) -> None:
    proxy = await start_proxy(with_cors(upstream.port, CORS))
    resp = await raw_request(
        proxy.port,
        "OPTIONS",
        "/fn/x",
        [
            ("Origin", origin),
            ("Access-Control-Request-Method", method),
            ("Access-Control-Request-Headers", headers),
        ],
    )
    assert resp.status == 403
    assert resp.header("Access-Control-Allow-Origin") is None
    body = json.loads(resp.body)
    assert body["error"] == "cors_refused"
    assert why in body["message"]
    assert upstream.requests == []


async def test_actual_response_gets_the_policy_not_the_upstreams(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        return web.json_response(
            {"ok": True},
            headers={
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Methods": "DELETE",
                "Access-Control-Expose-Headers": "x-secret",
            },
        )

    upstream.answer = answer
    proxy = await start_proxy(with_cors(upstream.port, CORS))
    resp = await raw_request(
        proxy.port, "POST", "/fn/x", [("Origin", "https://app.example.com")], b"{}"
    )
    assert resp.status == 200
    assert resp.all("Access-Control-Allow-Origin") == ["https://app.example.com"]
    assert resp.header("Access-Control-Allow-Methods") is None
    assert resp.all("Access-Control-Expose-Headers") == ["x-request-id"]
    assert "Origin" in resp.all("Vary")
    verify_sigv4(upstream.last, region="us-east-1")
    # A client without Origin (curl) still gets the upstream's answer, minus its CORS.
    plain = await raw_request(proxy.port, "GET", "/fn/x")
    assert plain.header("Access-Control-Allow-Origin") is None


async def test_credentials_policy_echoes_the_origin(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        with_cors(upstream.port, "{allow_origins: ['http://localhost:*'], allow_credentials: true}")
    )
    resp = await raw_request(proxy.port, "GET", "/fn/x", [("Origin", "http://localhost:5173")])
    assert resp.header("Access-Control-Allow-Origin") == "http://localhost:5173"
    assert resp.header("Access-Control-Allow-Credentials") == "true"


# --- requests from web pages ----------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "forwarded"),
    [
        ([("Origin", "http://evil.example")], False),
        ([("Origin", "null")], False),
        ([("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "no-cors")], False),
        # A link on another site: it would make the proxy sign a GET for that site.
        ([("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "navigate")], False),
        ([("Sec-Fetch-Site", "same-site"), ("Sec-Fetch-Mode", "cors")], False),
        ([("Referer", "http://evil.example/page")], False),  # an older Safari
        ([("Referer", "http://127.0.0.1:{proxy}/page")], True),
        ([("Sec-Fetch-Site", "none"), ("Sec-Fetch-Mode", "navigate")], True),
        ([("Origin", "http://127.0.0.1:{proxy}")], True),  # same origin
        ([], True),  # curl, Postman, app code
    ],
)
async def test_pages_on_other_origins_cannot_use_the_proxy(
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    headers: list[tuple[str, str]],
    forwarded: bool,
) -> None:
    proxy = await start_proxy(one_upstream(upstream.port))
    sent = [(k, v.replace("{proxy}", str(proxy.port))) for k, v in headers]
    resp = await raw_request(
        proxy.port, "POST", "/transfer", sent, b'{"amount": 100}', host=f"127.0.0.1:{proxy.port}"
    )
    if forwarded:
        assert resp.status == 200
        assert len(upstream.requests) == 1
    else:
        assert resp.status == 403
        assert json.loads(resp.body)["error"] == "origin_not_allowed"
        assert upstream.requests == []


# --- inbound auth, clients, methods ---------------------------------------------------


def test_public_listen_needs_auth_or_explicit_opt_out(tmp_path: Path) -> None:
    base = one_upstream(1)
    with pytest.raises(ConfigError) as info:
        parse_config("listen: {host: 0.0.0.0}\n" + base)
    assert info.value.path == "listen.host"
    assert "inbound_auth" in str(info.value)
    assert parse_config("listen: {host: 0.0.0.0}\nallow_unauthenticated: true\n" + base)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"\n{TOKEN}\nsecond-token-0123456789abcdef\n")
    config = parse_config(
        f"listen: {{host: 0.0.0.0}}\ninbound_auth: {{tokens_file: {tokens}}}\n" + base
    )
    assert config.inbound_auth is not None
    assert config.inbound_auth.tokens == (TOKEN, "second-token-0123456789abcdef")
    with pytest.raises(ConfigError) as weak:
        parse_config("inbound_auth: {tokens: [short-secret]}\n" + base)
    assert "short-secret" not in str(weak.value)
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(f"inbound_auth: {{tokens_file: {tmp_path / 'missing'}}}\n" + base)


@pytest.mark.parametrize(
    ("auth", "headers", "status"),
    [
        ("{tokens: ['" + TOKEN + "']}", [("Authorization", f"Bearer {TOKEN}")], 200),
        ("{tokens: ['" + TOKEN + "']}", [("Authorization", f"bearer {TOKEN}")], 200),
        ("{tokens: ['" + TOKEN + "']}", [], 401),
        ("{tokens: ['" + TOKEN + "']}", [("Authorization", f"Basic {TOKEN}")], 401),
        ("{tokens: ['" + TOKEN + "']}", [("Authorization", f"Bearer {TOKEN}x")], 401),
        ("{tokens: ['" + TOKEN + "'], header: X-Proxy-Token}", [("X-Proxy-Token", TOKEN)], 200),
        (
            "{tokens: ['" + TOKEN + "'], header: X-Proxy-Token}",
            [("Authorization", f"Bearer {TOKEN}")],
            401,
        ),
    ],
)
async def test_inbound_token(
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    auth: str,
    headers: list[tuple[str, str]],
    status: int,
) -> None:
    proxy = await start_proxy(f"inbound_auth: {auth}\n" + one_upstream(upstream.port, auth="none"))
    resp = await raw_request(proxy.port, "GET", "/x", headers)
    assert resp.status == status
    assert TOKEN not in resp.body.decode() and all(TOKEN not in v for _, v in resp.headers)
    if status == 401:
        assert json.loads(resp.body)["error"] == "unauthorized"
        assert resp.header("WWW-Authenticate") == 'Bearer realm="sigproxy"'
        assert upstream.requests == []
    else:
        rec = upstream.last
        # The proxy's token is never passed on, even to an auth: none upstream.
        assert all(TOKEN not in v for _, v in rec.headers)


async def test_allowed_clients(upstream: FakeFunctionUrl, start_proxy: StartProxy) -> None:
    denied = await start_proxy("allowed_clients: [10.0.0.0/8]\n" + one_upstream(upstream.port))
    resp = await raw_request(denied.port, "GET", "/")
    assert resp.status == 403
    assert json.loads(resp.body)["error"] == "client_not_allowed"
    assert upstream.requests == []
    allowed = await start_proxy(
        "allowed_clients: [10.0.0.0/8, 127.0.0.1]\n" + one_upstream(upstream.port)
    )
    assert (await raw_request(allowed.port, "GET", "/")).status == 200


# --- forward-proxy mode ---------------------------------------------------------------


def forward_config(port: int) -> str:
    # The upstream is named by host "localhost", as a client would name a Function URL.
    return f"upstreams:\n  - {{name: fn, url: 'http://localhost:{port}/v1', region: us-east-1, path_prefix: /fn}}\n"


async def test_absolute_form_for_a_table_host_is_signed(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(forward_config(upstream.port))
    resp = await raw_request(
        proxy.port,
        "POST",
        f"http://localhost:{upstream.port}/v1/orders?q=a+b",
        body=b"{}",
        host=f"localhost:{upstream.port}",
    )
    assert resp.status == 200
    rec = upstream.last
    assert rec.raw_target == "/v1/orders?q=a%20b"  # as typed, canonical
    verify_sigv4(rec, region="us-east-1")


@pytest.mark.parametrize(
    "target",
    [
        "http://example.com/",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost.evil.com/",
        "http://[::2]/",
    ],
)
async def test_absolute_form_for_other_hosts_is_403(
    upstream: FakeFunctionUrl, start_proxy: StartProxy, target: str
) -> None:
    proxy = await start_proxy(forward_config(upstream.port))
    started = time.monotonic()
    resp = await raw_request(proxy.port, "GET", target, host="example.com")
    assert time.monotonic() - started < 2  # refused at once: no connection attempted
    assert resp.status == 403
    assert json.loads(resp.body)["error"] == "host_not_allowed"
    assert upstream.requests == []


async def test_https_absolute_form_is_400(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(forward_config(upstream.port))
    resp = await raw_request(proxy.port, "GET", f"https://localhost:{upstream.port}/v1/x")
    assert resp.status == 400
    assert "http:// URL" in json.loads(resp.body)["message"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_with_the_proxy_as_http_proxy(
    upstream: FakeFunctionUrl, start_proxy: StartProxy, tmp_path: Path
) -> None:
    proxy = await start_proxy(forward_config(upstream.port))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no curlrc, no *_proxy vars

    def curl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", "-x", f"http://127.0.0.1:{proxy.port}", *args],
            capture_output=True, text=True, env=env, timeout=20, check=False,
        )  # fmt: skip

    ok = await asyncio.to_thread(curl, "-d", '{"a": 1}', f"http://localhost:{upstream.port}/v1/run")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    verify_sigv4(upstream.last, region="us-east-1")
    other = await asyncio.to_thread(curl, "-i", "http://example.com/")
    assert "403" in other.stdout.splitlines()[0]
    assert '"host_not_allowed"' in other.stdout
    tunnel = await asyncio.to_thread(curl, "-i", f"https://localhost:{upstream.port}/v1/run")
    assert tunnel.returncode != 0
    assert "405" in tunnel.stderr or "405" in tunnel.stdout
    assert len(upstream.requests) == 1


# --- slow clients ---------------------------------------------------------------------


async def test_slow_body_is_408(upstream: FakeFunctionUrl, start_proxy: StartProxy) -> None:
    proxy = await start_proxy("client_timeouts: {body: 0.5}\n" + one_upstream(upstream.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc")
    await writer.drain()
    resp = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert resp.status == 408
    assert json.loads(resp.body)["error"] == "request_timeout"
    assert upstream.requests == []


async def test_slow_headers_are_cut_off(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    from .test_process import serve_process, write

    path = write(tmp_path, "client_timeouts: {header: 1}\n" + one_upstream(upstream.port))
    async with serve_process(path) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        started = time.monotonic()
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            for _ in range(10):
                await asyncio.sleep(0.5)
                writer.write(b"X-Trickle: 1\r\n")
                await writer.drain()
            await asyncio.wait_for(reader.readexactly(1), 5)
        assert time.monotonic() - started < 6
        writer.close()
        assert await served.stop() == 0
    assert upstream.requests == []


# --- hostile input --------------------------------------------------------------------

_token_chars = st.characters(codec="latin-1", exclude_characters="\r\n\x00")
_hostile_target = st.one_of(
    st.text(_token_chars, max_size=60).map(lambda s: "/" + s),
    st.sampled_from(
        [
            "*",
            "http://trap.test/",
            "http://127.0.0.1:{trap}/",
            "//trap.test/x",
            "/%2e%2e/%2e%2e/etc",
            "/%",
            "/a?%zz",
            "/" + "a" * 9000,
            "http://localhost:{trap}/x",
            "http://[::1]:{trap}/x",
        ]
    ),
)
_hostile_header = st.tuples(
    st.text(st.characters(codec="ascii", categories=("L", "N", "P")), min_size=1, max_size=20),
    st.text(_token_chars, max_size=80),
)


@pytest.fixture
async def trap() -> tuple[int, list[bytes]]:
    """A server no request may ever reach."""
    hits: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(1024))
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], hits  # type: ignore[misc]
    server.close()
    await server.wait_closed()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "BREW"]),
    target=_hostile_target,
    headers=st.lists(_hostile_header, max_size=6),
    body=st.binary(max_size=300),
)
async def test_hostile_requests_never_5xx_or_leave_the_table(
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    trap: tuple[int, list[bytes]],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> None:
    trap_port, hits = trap
    proxy = getattr(test_hostile_requests_never_5xx_or_leave_the_table, "_proxy", None)
    if proxy is None or proxy[0] != upstream.port:
        running = await start_proxy(with_cors(upstream.port, CORS))
        proxy = (upstream.port, running.port)
        test_hostile_requests_never_5xx_or_leave_the_table._proxy = proxy  # type: ignore[attr-defined]
    port = proxy[1]
    raw_target = target.replace("{trap}", str(trap_port)).encode("latin-1")
    head = (
        method.encode()
        + b" "
        + raw_target
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    )
    for name, value in headers:
        head += name.encode("latin-1") + b": " + value.encode("latin-1") + b"\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        try:
            resp = await asyncio.wait_for(read_response(reader), 10)
        except (asyncio.IncompleteReadError, ConnectionError):
            resp = None  # the proxy may close on garbage; it must stay up (checked below)
    finally:
        writer.close()
    if resp is not None:
        assert resp.status < 500, (resp.status, resp.body[:200])
        if resp.status >= 400 and resp.header("Content-Type"):
            assert resp.header(
                "Content-Type",
            ).startswith("application/json"), resp.body[:200]  # type: ignore[union-attr]
    assert hits == []  # nothing ever reached a host outside the table
    alive = await raw_request(port, "GET", "/fn/alive")
    assert alive.status == 200
    assert all(r.raw_target.startswith("/") for r in upstream.requests)


async def test_expect_continue_in_forward_mode(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    """The Expect handler routes absolute-form requests the way the handler does: a body
    within the limit gets 100 Continue at once, one over it gets 413 and no 100."""
    proxy = await start_proxy(
        f"upstreams:\n  - {{name: fn, url: 'http://localhost:{upstream.port}', region: us-east-1, max_body_bytes: 10}}\n"
    )
    head = (
        f"POST http://localhost:{upstream.port}/x HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n"
        "Content-Length: {n}\r\nExpect: 100-continue\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head.replace("{n}", "5").encode())
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head.replace("{n}", "5000").encode())
    await writer.drain()
    resp = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert resp.status == 413
    assert [r.body for r in upstream.requests] == [b"hello"]
