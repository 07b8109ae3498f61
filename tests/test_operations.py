"""Operations, against the real process: metrics after known traffic, health and
readiness, SIGHUP reload (under load, rejected, routes swapped), SIGTERM with a stream
in flight, systemd notifications, JSON logs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sigproxy.admin import ServerState, readiness
from sigproxy.config import parse_config
from sigproxy.credentials import CredentialSource, CredentialStore
from sigproxy.routing import RouteTable

from .conftest import one_upstream
from .support import FakeFunctionUrl, Recorded, raw_request, verify_sigv4
from .test_process import creds_env, serve_process, write
from .test_upstream import until_closed


async def scrape(admin_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def two_routes(port: int, *, extra: str = "") -> str:
    return (
        "admin: {port: 0}\n"
        f"{extra}"
        "upstreams:\n"
        f"  - {{name: orders, url: 'http://127.0.0.1:{port}', region: us-east-1, path_prefix: /orders}}\n"
        f"  - {{name: users, url: 'http://127.0.0.1:{port}', region: us-east-1, path_prefix: /users,"
        " max_body_bytes: 10}\n"
    )


async def test_metrics_after_known_traffic(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.raw_target.endswith("/missing"):
            return web.json_response({"error": "nope"}, status=404)
        return web.Response(body=b"x" * 100)

    upstream.answer = answer
    path = write(tmp_path, two_routes(upstream.port))
    async with serve_process(path) as served:
        assert served.admin_port is not None
        for _ in range(3):
            assert (
                await raw_request(served.port, "POST", "/orders/a", body=b"12345")
            ).status == 200
        assert (await raw_request(served.port, "GET", "/orders/missing")).status == 404
        assert (await raw_request(served.port, "GET", "/nowhere")).status == 404
        assert (await raw_request(served.port, "POST", "/users/x", body=b"y" * 50)).status == 413
        assert (await raw_request(served.port, "GET", "/orders/%zz")).status == 400
        m = await scrape(served.admin_port)
        assert await served.stop() == 0

    total = "sigproxy_requests_total"
    assert value(m, total, upstream="orders", method="POST", status="200") == 3
    assert value(m, total, upstream="orders", method="GET", status="404") == 1
    assert value(m, total, upstream="none", method="GET", status="404") == 1
    assert value(m, total, upstream="users", method="POST", status="413") == 1
    assert value(m, total, upstream="none", method="GET", status="400") == 1
    errors = "sigproxy_proxy_errors_total"
    assert value(m, errors, reason="no_route") == 1
    assert value(m, errors, reason="body_too_large") == 1
    assert value(m, errors, reason="bad_request") == 1
    assert value(m, "sigproxy_request_bytes_total", upstream="orders") == 15
    assert value(m, "sigproxy_response_bytes_total", upstream="orders") == 300 + len(
        b'{"error": "nope"}'
    )
    assert value(m, "sigproxy_request_duration_seconds_count", upstream="orders") == 4
    assert value(m, "sigproxy_upstream_duration_seconds_count", upstream="orders") == 4
    assert value(m, "sigproxy_signing_duration_seconds_count") == 4
    assert value(m, "sigproxy_requests_in_flight") == 0
    assert (
        value(
            m,
            "sigproxy_build_info",
            version="0.1.0",
            python=value_label(m, "sigproxy_build_info", "python"),
        )
        == 1
    )
    # Static credentials from the environment: no expiry series, no refreshes.
    assert not any(name == "sigproxy_credentials_expiry_seconds" for name, _ in m)
    # Half the series: no _created sample next to each counter and histogram child.
    assert not any(name.endswith("_created") for name, _ in m)
    # Labels stay bounded: no paths, ids or hosts anywhere.
    for _, labels in m:
        for _, label_value in labels:
            assert "/" not in label_value or label_value.startswith("+"), label_value


def test_metrics_touch_no_process_wide_prometheus_setting() -> None:
    """Building sigproxy's metrics leaves other registries in the process as they were:
    a counter elsewhere still has its _created series (sigproxy drops its own at
    exposition, not with prometheus-client's process-wide switch)."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from sigproxy.metrics import Metrics

    ours = Metrics()
    ours.request_done("fn", "GET", 200, 0.01, 0.005)
    assert b"_created" not in ours.exposition()
    assert b"sigproxy_requests_total" in ours.exposition()
    theirs = CollectorRegistry()
    Counter("app_events", "An embedding app's own counter.", registry=theirs).inc()
    assert b"app_events_created" in generate_latest(theirs)


def value_label(m: dict[Any, float], name: str, label: str) -> str:
    for sample_name, labels in m:
        if sample_name == name:
            return dict(labels)[label]
    raise AssertionError(f"{name} not scraped")


async def test_upstream_errors_metric(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    path = write(tmp_path, one_upstream(dead))
    async with serve_process(path) as served:
        assert served.admin_port is not None
        assert (await raw_request(served.port, "GET", "/")).status == 502
        m = await scrape(served.admin_port)
        assert await served.stop() == 0
    assert value(m, "sigproxy_upstream_errors_total", upstream="fn", kind="connect") == 1
    assert value(m, "sigproxy_proxy_errors_total", reason="upstream_unreachable") == 1


async def test_answers_the_server_gives_before_a_handler_are_counted(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Refusals made by the HTTP layer itself (a head over the limit, a target too long,
    a malformed or other-version request line, a connection over the cap) count in
    sigproxy_proxy_errors_total like the handler's, each by its code."""
    limits = "limits: {max_client_connections: 2}\n"
    path = write(tmp_path, limits + one_upstream(upstream.port))
    host = b"Host: localhost\r\n"
    async with serve_process(path) as served:
        assert served.admin_port is not None
        sent = {
            "headers_too_large": b"GET / HTTP/1.1\r\n" + host + b"X-Big: " + b"b" * 70_000,
            "uri_too_long": b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\n" + host + b"\r\n",
            "bad_request": b"GET / HTTP/1.1\r\n" + host + b"Content-Length: -1\r\n\r\n",
            "http_version_not_supported": b"GET / HTTP/2.0\r\n" + host + b"\r\n",
        }
        for code, data in sent.items():
            answer = await until_closed(served.port, data)
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == code, answer[:200]
        # Two connections held open fill the cap: the third is told so.
        held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(2)]
        await asyncio.sleep(0.2)
        answer = await until_closed(served.port, b"GET / HTTP/1.1\r\n" + host + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        for _, writer in held:
            writer.close()
        m = await scrape(served.admin_port)
        assert await served.stop() == 0
    for code in (*sent, "too_many_connections"):
        assert value(m, "sigproxy_proxy_errors_total", reason=code) == 1, code
    assert upstream.requests == []


async def test_health_and_readiness(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{served.admin_port}"
            async with session.get(base + "/healthz") as resp:
                assert (resp.status, await resp.json()) == (200, {"status": "ok"})
            async with session.get(base + "/readyz") as resp:
                assert (resp.status, await resp.json()) == (200, {"status": "ready"})
            # The proxy port claims no paths of its own: /healthz there is proxied.
            await raw_request(served.port, "GET", "/healthz")
            assert upstream.last.raw_target == "/healthz"
        assert await served.stop() == 0


def test_readiness_reasons() -> None:
    config = parse_config(one_upstream(1))
    source = CredentialSource.static("AKIDX", "s")
    table = RouteTable(config, CredentialStore.static_for(config, source))
    assert readiness(ServerState(listening=True), table) == []
    assert readiness(ServerState(listening=False), table) == ["not listening yet"]
    assert readiness(ServerState(listening=True, stopping=True), table) == ["shutting down"]
    source._expiry = time.time() + 30
    source.last_error = "sts unreachable"
    reasons = readiness(ServerState(listening=True), table)
    assert len(reasons) == 1
    assert re.fullmatch(r"upstream fn: credentials expire in \d+s: sts unreachable", reasons[0])


async def test_admin_can_be_disabled(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(tmp_path, "admin: false\n" + one_upstream(upstream.port).split("\n", 1)[1])
    async with serve_process(path) as served:
        assert served.admin_port is None
        assert (await raw_request(served.port, "GET", "/")).status == 200
        assert await served.stop() == 0
    assert "admin listening" not in served.log()


# --- reload ----------------------------------------------------------------------------


async def test_reload_swaps_routes_and_in_flight_finish_on_old_table(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.raw_target == "/slow":
            await asyncio.wait_for(release.wait(), 20)
        return web.json_response({"target": rec.raw_target})

    upstream.answer = answer
    path = write(tmp_path, two_routes(upstream.port))
    async with serve_process(path) as served:
        slow = asyncio.create_task(raw_request(served.port, "GET", "/orders/slow"))
        while not upstream.requests:
            await asyncio.sleep(0.01)
        Path(path).write_text(
            "admin: {port: 0}\nupstreams:\n"
            f"  - {{name: billing, url: 'http://127.0.0.1:{upstream.port}/v2', region: us-east-1,"
            " path_prefix: /billing}\n"
        )
        served.proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            if "config reloaded" in served.log():
                break
            await asyncio.sleep(0.02)
        assert "config reloaded: 1 upstream(s)" in served.log()
        assert (await raw_request(served.port, "GET", "/orders/x")).status == 404
        assert (await raw_request(served.port, "GET", "/billing/x")).status == 200
        assert upstream.last.raw_target == "/v2/x"
        release.set()
        old = await asyncio.wait_for(slow, 10)
        assert old.status == 200
        m = await scrape(served.admin_port or 0)
        assert await served.stop() == 0
    assert value(m, "sigproxy_config_reloads_total", result="success") == 1


async def test_bad_reload_keeps_old_routes(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(tmp_path, two_routes(upstream.port))
    async with serve_process(path) as served:
        Path(path).write_text("upstreams:\n  - {name: broken, url: 'http://10.0.0.1'}\n")
        served.proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            if "reload rejected" in served.log():
                break
            await asyncio.sleep(0.02)
        assert re.search(
            r"reload rejected, still serving the previous config: upstreams\[0\]\.url: plain http",
            served.log(),
        )
        assert (await raw_request(served.port, "GET", "/orders/x")).status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        m = await scrape(served.admin_port or 0)
        assert await served.stop() == 0
    assert value(m, "sigproxy_config_reloads_total", result="failure") == 1
    assert value(m, "sigproxy_config_reloads_total", result="success") == 0


async def test_reload_under_load_drops_no_request(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    configs = [
        two_routes(upstream.port),
        two_routes(upstream.port, extra="log_level: warning\n"),
    ]
    path = write(tmp_path, configs[0])
    statuses: list[int] = []
    async with serve_process(path) as served:
        stop_at = time.monotonic() + 3.0

        async def client() -> None:
            async with aiohttp.ClientSession() as session:
                while time.monotonic() < stop_at:
                    async with session.post(served.url + "/orders/x", data=b"{}") as resp:
                        await resp.read()
                        statuses.append(resp.status)

        clients = [asyncio.create_task(client()) for _ in range(6)]
        for i in range(8):
            await asyncio.sleep(0.3)
            Path(path).write_text(configs[i % 2])
            served.proc.send_signal(signal.SIGHUP)
        await asyncio.gather(*clients)
        m = await scrape(served.admin_port or 0)
        assert await served.stop() == 0
    assert len(statuses) > 100
    assert set(statuses) == {200}
    assert value(m, "sigproxy_config_reloads_total", result="success") >= 6
    assert value(m, "sigproxy_config_reloads_total", result="failure") == 0


# --- stop ------------------------------------------------------------------------------


async def test_sigterm_lets_a_slow_stream_finish(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(10):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.1)
        await resp.write_eof()
        return resp

    upstream.answer = answer
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        async with aiohttp.ClientSession() as session:
            async with session.get(served.url + "/events") as resp:
                first = await resp.content.readuntil(b"\n\n")
                served.proc.send_signal(signal.SIGTERM)
                rest = await asyncio.wait_for(resp.content.read(), 10)
        assert first + rest == b"".join(f"data: {i}\n\n".encode() for i in range(10))
        # Stopped accepting new connections while draining.
        with pytest.raises(OSError):
            await raw_request(served.port, "GET", "/")
        assert await served.stop() == 0


async def test_grace_period_bounds_the_drain(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(text="too late")

    upstream.answer = answer
    path = write(tmp_path, "grace_period: 1\n" + one_upstream(upstream.port))
    async with serve_process(path) as served:
        pending = asyncio.create_task(raw_request(served.port, "GET", "/stuck"))
        while not upstream.requests:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert await served.stop() == 0
        assert time.monotonic() - started < 10
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await pending


# --- systemd ---------------------------------------------------------------------------


async def test_systemd_notifications_in_order(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    messages: list[str] = []

    async def receive_until(pred: Any, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            assert left > 0, f"notifications so far: {messages}"
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
            messages.append(data.decode())

    env = creds_env()
    env.update(NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="200000")
    path = write(tmp_path, one_upstream(upstream.port))
    try:
        async with serve_process(path, env=env) as served:
            await receive_until(lambda: any(m.startswith("READY=1") for m in messages))
            await receive_until(lambda: sum(m == "WATCHDOG=1" for m in messages) >= 3)
            served.proc.send_signal(signal.SIGHUP)
            await receive_until(lambda: any(m.startswith("RELOADING=1") for m in messages))
            await receive_until(lambda: [m for m in messages if m.startswith("READY=1")][1:] != [])
            served.proc.send_signal(signal.SIGTERM)
            await receive_until(lambda: "STOPPING=1" in messages)
            assert await served.stop() == 0
    finally:
        sock.close()
    lifecycle = [m.split("\n")[0] for m in messages if m != "WATCHDOG=1"]
    assert lifecycle == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert re.fullmatch(
        r"RELOADING=1\nMONOTONIC_USEC=\d+", [m for m in messages if m.startswith("RELOADING")][0]
    )
    assert messages[0] == "READY=1\nSTATUS=serving 1 upstream(s)"


# --- logs ------------------------------------------------------------------------------


async def test_json_logs(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, "--log-format", "json") as served:
        resp = await raw_request(
            served.port,
            "POST",
            "/orders/7?secret=qv-json-1",
            [("X-Request-Id", "rid-json-1")],
            b"{}",
        )
        assert resp.status == 200
        assert await served.stop() == 0
    records = [json.loads(line) for line in served.log().splitlines() if line.strip()]
    access = [r for r in records if r["logger"] == "sigproxy.access"]
    assert len(access) == 1
    a = access[0]
    assert (a["request_id"], a["upstream"], a["method"], a["path"], a["status"]) == (
        "rid-json-1", "fn", "POST", "/orders/7", 200,
    )  # fmt: skip
    assert (a["bytes_in"], a["level"]) == (2, "info")
    assert isinstance(a["total_ms"], float) and isinstance(a["upstream_ms"], float)
    assert "qv-json-1" not in served.log()
    assert any(r["message"].startswith("sigproxy listening on") for r in records)


def test_unused_env_is_quiet() -> None:
    # NOTIFY_SOCKET unset: the notifier is off and sends nothing.
    from sigproxy.notify import Notifier

    n = Notifier(environ={})
    assert not n.enabled
    assert n.watchdog_interval is None
    n.ready()  # must not raise
    assert (
        Notifier(
            environ={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        ).watchdog_interval
        is None
    )
    assert Notifier(environ={"WATCHDOG_USEC": "1000000"}).watchdog_interval == 0.5
