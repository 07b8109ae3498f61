"""Adversarial checks of egress proxies, connect_to, retries and the TLS listener, from
outside: the real ``sigproxy serve`` process against real loopback servers. Signatures
that arrive are recomputed with awscrt (tests/support.py), never with sigproxy's signer."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from .conftest import one_upstream
from .support import FakeFunctionUrl, Recorded, raw_request, verify_sigv4
from .test_egress import (  # fixtures and helpers, reused
    CONNECT_LINE,
    FN,
    FUNCTION_HOST,
    ConnectProxy,
    FunctionUrl,
    StartConnectProxy,
    _pipe,
    assert_arrived_signed,
    ca,
    connect_proxy,
    function,
    no_proxy_environment,
    pem,
    process_env,
    yaml,
)
from .test_listener_tls import MTLS, Client, Pki, fresh, pki, refused, serve_tls, tls_config
from .test_process import ROOT, serve_process, write
from .test_working_day import metric

__all__ = ["ca", "connect_proxy", "function", "no_proxy_environment", "pem", "pki"]


def _targets(upstream: FakeFunctionUrl, prefix: str) -> list[str]:
    return [r.raw_target for r in upstream.requests if r.raw_target.startswith(prefix)]


def _arrived(upstream: FakeFunctionUrl, target: str) -> bool:
    return target in _targets(upstream, target)


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def test_clients_that_leave_during_a_backoff_give_back_their_retry_budget(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Three clients give up while sigproxy waits out a 503's Retry-After. The retries
    they were granted never ran: the budget must be whole again, so a later GET that
    meets one 503 is still retried."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.raw_target.startswith("/slow"):
            return web.json_response({}, status=503, headers={"Retry-After": "4"})
        if rec.raw_target == "/flaky" and len(_targets(upstream, "/flaky")) == 1:
            return web.json_response({}, status=503)
        return web.json_response({"ok": True})

    upstream.answer = answer
    retries = "{attempts: 3, backoff_base: 0.01, backoff_max: 0.05, deadline: 8}"
    path = write(tmp_path, one_upstream(upstream.port, retries=retries))
    async with serve_process(path) as served:
        for i in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(f"GET /slow{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            await _until(functools.partial(_arrived, upstream, f"/slow{i}"))
            await asyncio.sleep(0.2)  # sigproxy is now waiting out the Retry-After
            writer.close()
        await asyncio.sleep(0.3)
        resp = await raw_request(served.port, "GET", "/flaky")
        assert len(_targets(upstream, "/slow")) == 3  # no attempt after a client left
        assert resp.status == 200, (resp.status, served.log()[-2000:])
        assert _targets(upstream, "/flaky") == ["/flaky", "/flaky"]
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


# ------------------------------------------------------------ egress proxy, connect_to


async def test_connect_to_a_loopback_tunnel_is_not_sent_through_the_environments_proxy(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """The README's SSH tunnel (``ssh -L 8443:<function url host>:443 bastion`` with
    ``connect_to: 127.0.0.1:8443``) on a laptop whose environment has HTTPS_PROXY: only
    the connect_to address is dialled, and a loopback address is never sent to the
    environment's proxy (which would be asked for ITS OWN 127.0.0.1:8443)."""
    proxy = await connect_proxy(function.routes)
    path = write(tmp_path, yaml(FN + f", connect_to: '127.0.0.1:{function.port}'}}"))
    env = process_env(pem, HTTPS_PROXY=proxy.url)
    async with serve_process(path, env=env) as served:
        resp = await raw_request(served.port, "GET", "/tunnel")
        assert resp.status == 200, resp.body
        assert_arrived_signed(function, "/tunnel")
        assert await served.stop() == 0
    assert proxy.lines == []  # the proxy was never dialled


class Relay:
    """A TCP relay on 127.0.0.1 to ``target``; the first ``drop`` connections are closed
    as soon as their first bytes (a TLS ClientHello) arrive, or get ``banner`` first."""

    def __init__(self, target: tuple[str, int], drop: int = 0, banner: bytes = b"") -> None:
        self.target = target
        self.drop = drop
        self.banner = banner
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        try:
            if self.connections <= self.drop:
                if self.banner:
                    writer.write(self.banner)
                    await writer.drain()
                await reader.read(1)
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.parametrize("via", ["connect_to", "egress proxy"])
async def test_a_tls_handshake_cut_by_the_peer_is_retried_for_a_post(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, tmp_path: Path, via: str
) -> None:
    """The first connection is dropped during the TLS handshake, by the address
    connect_to dials (a load balancer, a VPC endpoint) or right after an egress proxy's
    200 to CONNECT. Nothing was sent: a connection failure, tried again for every
    method, and the POST arrives once, signed."""
    relay = Relay(function.address, drop=1)
    port = await relay.start()
    try:
        if via == "connect_to":
            upstream = FN + f", connect_to: '127.0.0.1:{port}'}}"
        else:
            proxy = await connect_proxy({f"{FUNCTION_HOST}:443": ("127.0.0.1", port)})
            upstream = FN + f", egress_proxy: '{proxy.url}'}}"
        path = write(tmp_path, yaml(upstream))
        async with serve_process(path, env=process_env(pem)) as served:
            resp = await raw_request(served.port, "POST", "/pay", body=b'{"n": 1}')
            assert resp.status == 200, resp.body
            assert [r.raw_target for r in function.fake.requests] == ["/pay"]
            assert function.fake.last.body == b'{"n": 1}'
            assert_arrived_signed(function, "/pay")
            assert relay.connections == 2
            assert await served.stop() == 0
    finally:
        await relay.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 503 Service Unavailable",
        b"HTTP/1.1 502 Bad Gateway",
        b"HTTP/1.1 504 Gateway Timeout",
    ],
)
async def test_a_proxy_that_could_not_reach_the_function_url_once_is_retried(
    connect_proxy: StartConnectProxy,
    function: FunctionUrl,
    pem: str,
    tmp_path: Path,
    answer: bytes,
) -> None:
    """Squid answers CONNECT with 503 (DNS failed), 502 or 504 (connecting timed out)
    when the way past it failed: a connection that never got through, and not one of
    the refusals (407, 403) the README leaves out. Tried again, a POST included."""
    proxy = await connect_proxy(function.routes)
    serve = proxy._serve
    calls = 0

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer + b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        await serve(reader, writer)

    proxy._serve = flaky  # type: ignore[method-assign]
    path = write(tmp_path, yaml(FN + f", egress_proxy: '{proxy.url}'}}"))
    async with serve_process(path, env=process_env(pem)) as served:
        resp = await raw_request(served.port, "POST", "/once", body=b"{}")
        assert resp.status == 200, resp.body
        assert [r.raw_target for r in function.fake.requests] == ["/once"]
        assert_arrived_signed(function, "/once")
        assert calls == 2
        assert await served.stop() == 0


async def test_a_request_waiting_out_retry_after_does_not_hold_an_upstream_connection(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """With max_connections: 1, one request is throttled (429, Retry-After: 3) and waits
    to try again. The connection it came on is idle meanwhile: another request must get
    it, not wait timeout.connect and be refused 503 upstream_busy."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.raw_target == "/throttled" and len(_targets(upstream, "/throttled")) == 1:
            return web.json_response({}, status=429, headers={"Retry-After": "3"})
        return web.json_response({"ok": True})

    upstream.answer = answer
    path = write(
        tmp_path,
        one_upstream(upstream.port, max_connections=1, timeout="{connect: 1}"),
    )
    async with serve_process(path) as served:
        throttled = asyncio.create_task(raw_request(served.port, "GET", "/throttled"))
        try:
            await _until(lambda: len(_targets(upstream, "/throttled")) == 1)
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            other = await raw_request(served.port, "GET", "/other")
            took = time.monotonic() - t0
        finally:
            first = (await asyncio.gather(throttled, return_exceptions=True))[0]
        assert other.status == 200, other.body
        assert took < 0.9
        assert not isinstance(first, BaseException) and first.status == 200
        assert await served.stop() == 0


@pytest.mark.parametrize(
    "value",
    ["\u00b2", "-1", "1e9", "99999999999999999999999999999", "Mon, 01 Jan 2001 00:00:00 GMT"],
)
async def test_any_retry_after_is_taken_or_ignored_never_a_500(
    upstream: FakeFunctionUrl, tmp_path: Path, value: str
) -> None:
    """A throttled answer's Retry-After is whatever the upstream wrote: a number,
    a date, garbage, or a character str.isdigit() calls a digit that float() refuses
    (U+00B2). Each is a wait, or none; the request is retried or the 429 passed on,
    never turned into sigproxy's own 500."""
    calls = 0

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.json_response({}, status=429, headers={"Retry-After": value})
        return web.json_response({"ok": True})

    upstream.answer = answer
    retries = "{attempts: 2, backoff_base: 0.01, backoff_max: 0.05, deadline: 3}"
    path = write(tmp_path, one_upstream(upstream.port, retries=retries))
    async with serve_process(path) as served:
        resp = await raw_request(served.port, "GET", "/r")
        assert resp.status in (200, 429), (resp.status, resp.body)
        assert "Traceback" not in served.log()
        assert await served.stop() == 0


async def test_an_ipv6_proxy_with_a_user_and_no_password(
    function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """``http://us%40er@[::1]:port``: the user is decoded, the password is empty, and
    neither the user nor the Proxy-Authorization value is logged or passed on."""
    proxy = ConnectProxy(function.routes)
    server = await asyncio.start_server(proxy.handle, "::1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://us%40er@[::1]:{proxy.port}"
        path = write(tmp_path, yaml(FN + f", egress_proxy: '{url}'}}"))
        async with serve_process(path, "--log-level", "debug", env=process_env(pem)) as served:
            resp = await raw_request(
                served.port, "GET", "/v6", headers=[("Proxy-Authorization", "Basic Y2xpZW50")]
            )
            assert resp.status == 200, resp.body
            assert_arrived_signed(function, "/v6")
            assert await served.stop() == 0
        value = "Basic " + base64.b64encode(b"us@er:").decode()
        assert proxy.authorizations == [value]
        assert proxy.lines == [CONNECT_LINE]
        assert function.fake.last.header("Proxy-Authorization") is None  # not the client's
        log = served.log()
        for secret in ("us@er", "us%40er", value.split()[1]):
            assert secret not in log
    finally:
        server.close()
        await proxy.close()


async def test_a_proxy_that_drips_its_answer_is_bounded_by_the_connect_timeout(
    function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """A byte every 50 ms, never finishing the head: the whole way through the proxy
    is inside timeout.connect, and retries stop at the deadline."""
    connections = 0

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 Connection established\r\n")
            while True:
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        upstream = (
            f"{{name: fn, url: 'https://{FUNCTION_HOST}', timeout: {{connect: 0.5}},"
            f" egress_proxy: 'http://127.0.0.1:{port}',"
            " retries: {attempts: 10, backoff_base: 0.01, backoff_max: 0.02, deadline: 1.2}}"
        )
        path = write(tmp_path, yaml(upstream))
        async with serve_process(path, env=process_env(pem)) as served:
            t0 = time.monotonic()
            resp = await raw_request(served.port, "GET", "/drip")
            took = time.monotonic() - t0
            body = json.loads(resp.body)
            assert resp.status == 502, resp.body
            assert body["kind"] == "proxy"
            assert body["detail"].endswith(
                f"no answer to CONNECT {FUNCTION_HOST}:443 within 0.5 seconds"
            )
            assert took < 2.5
            assert 2 <= connections <= 4
            assert await served.stop() == 0
        assert function.fake.requests == []
    finally:
        server.close()


@pytest.mark.parametrize(
    "variables",
    [
        {"HTTP_PROXY": "P", "HTTPS_PROXY": "P", "ALL_PROXY": "P"},
        {"http_proxy": "P", "all_proxy": "P", "NO_PROXY": ""},
    ],
)
async def test_the_environments_proxy_never_carries_a_loopback_emulator(
    connect_proxy: StartConnectProxy,
    upstream: FakeFunctionUrl,
    pem: str,
    tmp_path: Path,
    variables: dict[str, str],
) -> None:
    proxy = await connect_proxy({})
    env = process_env(pem, **{k: v.replace("P", proxy.url) for k, v in variables.items()})
    text = (
        "admin: {port: 0}\nupstreams:\n"
        f"  - {{name: a, url: 'http://127.0.0.1:{upstream.port}', region: us-east-1, path_prefix: /a}}\n"
        f"  - {{name: b, url: 'http://localhost:{upstream.port}', region: us-east-1, path_prefix: /b}}\n"
    )
    path = write(tmp_path, text)
    async with serve_process(path, env=env) as served:
        for target in ("/a/x", "/b/y"):
            resp = await raw_request(served.port, "POST", target, body=b"{}")
            assert resp.status == 200, resp.body
            verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0
    assert proxy.lines == []


async def test_a_throttling_storm_is_not_multiplied_by_retries(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """A function whose concurrency is used up answers every one of 50 concurrent
    requests 429. With three attempts each and no budget that would be 150 invocations
    refused; the budget (20% of requests in flight, at least 3) keeps it near 50."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        await asyncio.sleep(0.05)
        return web.json_response({}, status=429)

    upstream.answer = answer
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        answers = await asyncio.gather(
            *[raw_request(served.port, "POST", f"/s{i}", body=b"x") for i in range(50)]
        )
        assert {a.status for a in answers} == {429}
        attempts = len(upstream.requests)
        assert 50 <= attempts <= 80, attempts
        assert served.admin_port is not None
        retried = await metric(
            served.admin_port, 'sigproxy_upstream_retries_total{reason="429",upstream="fn"}'
        )
        assert retried == attempts - 50
        for rec in upstream.requests:
            assert rec.body == b"x"
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


@pytest.mark.parametrize("where", ["config", "HTTPS_PROXY"])
@pytest.mark.parametrize("separator", ["/", "#", "?"])
async def test_a_proxy_password_is_never_in_the_error_refusing_its_url(
    pem: str, tmp_path: Path, where: str, separator: str
) -> None:
    """A password with a character left unencoded (``/``, ``#``, ``?``: common in
    generated passwords) makes the proxy URL unparsable. sigproxy refuses to start, as it
    should, but the one-line error must not quote the password (README: proxy
    credentials are never logged or put in an error)."""
    secret = "Hunter2Secret"
    url = f"http://me:{secret}{separator}Tail@proxy.corp.example:3128"
    upstream = FN + (f", egress_proxy: '{url}'}}" if where == "config" else "}")
    path = write(tmp_path, yaml(upstream))
    env = process_env(pem, **({"HTTPS_PROXY": url} if where == "HTTPS_PROXY" else {}))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sigproxy", "serve", "--config", path, "--port", "0"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "egress_proxy" in result.stderr or "HTTPS_PROXY" in result.stderr
    assert secret not in result.stderr + result.stdout


async def test_a_reload_that_changes_the_proxy_password_uses_it_at_once(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """The proxy's password is rotated in the config and SIGHUP sent: the tunnel pooled
    with the old credentials is not reused; the next request opens a new one with the
    new Proxy-Authorization, and JSON logs at debug hold neither password."""
    old, new = "0ld-PaSS-never-LOGGED", "n3w-PaSS-never-LOGGED"
    proxy = await connect_proxy(function.routes)

    def text(password: str) -> str:
        return yaml(
            FN + f", egress_proxy: 'http://u:{password}@127.0.0.1:{proxy.port}'}}",
            top="log_format: json",
        )

    path = write(tmp_path, text(old))
    async with serve_process(path, "--log-level", "debug", env=process_env(pem)) as served:
        assert (await raw_request(served.port, "GET", "/before")).status == 200
        write(tmp_path, text(new))
        served.proc.send_signal(signal.SIGHUP)
        await _until(lambda: "config reloaded" in served.log(), 10)
        resp = await raw_request(served.port, "GET", "/after")
        assert resp.status == 200, resp.body
        assert_arrived_signed(function, "/after")
        assert await served.stop() == 0

    def basic(p: str) -> str:
        return "Basic " + base64.b64encode(f"u:{p}".encode()).decode()

    assert proxy.authorizations == [basic(old), basic(new)]
    log = served.log()
    for secret in (old, new, basic(old).split()[1], basic(new).split()[1]):
        assert secret not in log


async def test_a_tunnel_that_answers_with_a_banner_is_tls_and_retried(
    connect_proxy: StartConnectProxy, function: FunctionUrl, pem: str, tmp_path: Path
) -> None:
    """The proxy says 200, then what is behind it speaks first, and not TLS (an SSH
    server): the handshake fails (kind tls), nothing was sent, the POST is tried again
    and arrives once. When the banner comes in the same read as the proxy's 200, it can't
    be told from bytes the proxy sent after its answer (kind proxy): which of the two
    happens is the loopback's timing, so the one retry may count under either."""
    relay = Relay(function.address, drop=1, banner=b"SSH-2.0-OpenSSH_9.6\r\n")
    port = await relay.start()
    try:
        proxy = await connect_proxy({f"{FUNCTION_HOST}:443": ("127.0.0.1", port)})
        path = write(tmp_path, yaml(FN + f", egress_proxy: '{proxy.url}'}}"))
        async with serve_process(path, env=process_env(pem)) as served:
            resp = await raw_request(served.port, "POST", "/b", body=b"{}")
            assert resp.status == 200, resp.body
            assert [r.raw_target for r in function.fake.requests] == ["/b"]
            assert_arrived_signed(function, "/b")
            assert relay.connections == 2
            assert served.admin_port is not None
            retried = {
                reason: await metric(
                    served.admin_port,
                    f'sigproxy_upstream_retries_total{{reason="{reason}",upstream="fn"}}',
                )
                for reason in ("tls", "proxy")
            }
            assert sorted(retried.values(), key=str) == [1.0, None], retried
            assert await served.stop() == 0
        assert proxy.lines == [CONNECT_LINE, CONNECT_LINE]
    finally:
        await relay.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.0 200 Connection established\r\nProxy-agent: Squid/6.6\r\n\r\n",
        b"HTTP/1.1 200\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nVia: 1.1 corp\r\n\r\n",
    ],
)
async def test_the_ways_proxies_say_200_to_connect(
    function: FunctionUrl, pem: str, tmp_path: Path, answer: bytes
) -> None:
    """Squid's HTTP/1.0 answer with Proxy-agent, a bare status, extra headers: each is a
    tunnel, and two requests share it."""
    connects: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        connects.append(head.split(b"\r\n", 1)[0])
        up_reader, up_writer = await asyncio.open_connection(*function.address)
        # Sent in two pieces: the head is read until its blank line, not one recv.
        writer.write(answer[:7])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(answer[7:])
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        path = write(tmp_path, yaml(FN + f", egress_proxy: 'http://127.0.0.1:{port}'}}"))
        async with serve_process(path, env=process_env(pem)) as served:
            for target in ("/one", "/two"):
                resp = await raw_request(served.port, "GET", target)
                assert resp.status == 200, resp.body
                assert_arrived_signed(function, target)
            assert await served.stop() == 0
        assert connects == [CONNECT_LINE.encode()]
    finally:
        server.close()


# ------------------------------------------------------------------- the TLS listener


async def test_sighup_with_a_new_client_ca_revokes_new_handshakes_only(
    upstream: FakeFunctionUrl, pki: Pki
) -> None:
    """client_ca is replaced by another CA's bundle (the old client CA revoked) and
    SIGHUP sent: a new connection with the old CA's certificate is refused in the
    handshake, one from the new CA is served, and the connection opened before goes on."""
    path = write(pki.folder, tls_config(upstream.port, MTLS))
    async with serve_tls(path) as served:
        old = pki.client(pki.clients)
        kept = Client(served.port, old)
        try:
            assert (await kept.get("/before"))[0] == 200
            newer = trustme.CA()
            newer.cert_pem.write_to_path(str(pki.folder / "client-ca.pem"))
            served.proc.send_signal(signal.SIGHUP)
            await _until(lambda: "config reloaded" in served.log(), 10)
            await refused(served.port, pki.client(pki.clients))
            assert (await fresh(served.port, pki.client(newer), "/new-ca"))[0] == 200
            assert (await kept.get("/kept"))[0] == 200
            assert [r.raw_target for r in upstream.requests] == ["/before", "/new-ca", "/kept"]
            verify_sigv4(upstream.last, region="us-east-1")
        finally:
            kept.close()
        assert await served.stop() == 0
