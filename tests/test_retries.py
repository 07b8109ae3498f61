"""Retries that re-sign every attempt (sigproxy.retries, and the real process against
fake Function URLs that throttle, fail and come back), and the CloudFront OAC header.

Every signature that reaches the fake upstream is recomputed with awscrt
(tests/support.py), not with sigproxy's signer."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from pathlib import Path

import pytest
from aiohttp import web

from sigproxy.config import Retries
from sigproxy.retries import (
    Budget,
    Plan,
    backoff,
    failure_reason,
    retry_after,
    status_reason,
)

from .conftest import one_upstream
from .support import FakeFunctionUrl, Recorded, raw_request, verify_sigv4
from .test_process import serve_process, write
from .test_working_day import metric

# --- the rules, pure ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status", "reason"),
    [
        ("POST", 429, "429"),
        ("PATCH", 429, "429"),
        ("GET", 503, "503"),
        ("PUT", 502, "502"),
        ("DELETE", 504, "504"),
        ("POST", 503, None),  # the function may have run: never twice
        ("PATCH", 502, None),
        ("GET", 500, None),
        ("GET", 403, None),
        ("GET", 200, None),
    ],
)
def test_which_answers_are_retried(method: str, status: int, reason: str | None) -> None:
    assert status_reason(method, status) == reason


def test_only_failures_before_sending_are_retried() -> None:
    # Nothing sent: the connection or its handshake failed (or was cut).
    kinds = ("connect", "tls", "proxy", "timeout", "closed")
    assert [failure_reason(k, False) for k in kinds] == list(kinds)
    for kind in kinds:
        assert failure_reason(kind, True) is None  # it went out: the function may have run
    for kind in ("protocol", "busy"):
        assert failure_reason(kind, False) is None
    # An egress proxy that refuses the tunnel (407, 403) is configuration, not chance;
    # one that could not reach the Function URL this time (502/503/504) is retried.
    for status in (401, 403, 407):
        assert failure_reason("proxy", False, status) is None
    for status in (502, 503, 504):
        assert failure_reason("proxy", False, status) == "proxy"


def test_retry_after() -> None:
    now = time.time()
    assert retry_after("3", now) == 3.0
    assert retry_after(None, now) is None
    assert retry_after("soon", now) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 10))
    after = retry_after(date, now)
    assert after is not None and 8 <= after <= 11


def test_full_jitter_backoff_is_bounded() -> None:
    policy = Retries(backoff_base=0.1, backoff_max=0.5)
    assert backoff(policy, 1, lambda: 1.0) == pytest.approx(0.1)
    assert backoff(policy, 3, lambda: 1.0) == pytest.approx(0.4)
    assert backoff(policy, 9, lambda: 1.0) == pytest.approx(0.5)
    assert backoff(policy, 9, lambda: 0.0) == 0.0


def test_plan_stops_at_attempts_and_deadline() -> None:
    plan = Plan(Retries(attempts=3, backoff_base=0.0, backoff_max=0.0, deadline=5))
    assert plan.next_wait(None, lambda: 0.5) == 0.0
    plan.retries = 2
    assert plan.next_wait(None, lambda: 0.5) is None  # three attempts made
    plan.retries = 0
    assert plan.next_wait(6.0, lambda: 0.5) is None  # asked to wait past the deadline
    assert plan.next_wait(2.0, lambda: 0.5) == 2.0


def test_budget_is_a_share_of_requests_in_flight() -> None:
    policy = Retries(budget_percent=20, min_concurrency=3)
    budget = Budget(active=100, retrying=19)
    assert budget.allows(policy)
    budget.retrying = 20
    assert not budget.allows(policy)
    small = Budget(active=2, retrying=2)
    assert small.allows(policy)  # min_concurrency
    small.retrying = 3
    assert not small.allows(policy)


# --- against the real process ---------------------------------------------------------


def scripted(upstream: FakeFunctionUrl, answers: list[tuple[int, dict[str, str]]]) -> None:
    """The upstream answers with these (status, headers) in turn, then 200."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if answers:
            status, headers = answers.pop(0)
            return web.json_response({"status": status}, status=status, headers=headers)
        return web.json_response({"ok": True})

    upstream.answer = answer


def config(port: int, retries: str = "{attempts: 4, backoff_base: 0.01, backoff_max: 0.05}") -> str:
    return one_upstream(port, retries=retries)


async def test_throttled_request_is_retried_signed_afresh(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """429 (Lambda's concurrency is used up) twice, the second asking to wait a second:
    every method is retried, each attempt signed again with its own date."""
    scripted(upstream, [(429, {}), (429, {"Retry-After": "1"})])
    path = write(tmp_path, config(upstream.port))
    async with serve_process(path) as served:
        assert served.admin_port is not None
        resp = await raw_request(served.port, "POST", "/orders", body=b'{"n": 1}')
        assert resp.status == 200, resp.body
        assert len(upstream.requests) == 3
        for rec in upstream.requests:
            assert rec.body == b'{"n": 1}'
            verify_sigv4(rec, region="us-east-1")
        dates = [r.header("X-Amz-Date") for r in upstream.requests]
        assert dates[2] != dates[1]  # a second later: a new date and signature
        assert upstream.requests[2].header("Authorization") != upstream.requests[1].header(
            "Authorization"
        )
        retried = await metric(
            served.admin_port, 'sigproxy_upstream_retries_total{reason="429",upstream="fn"}'
        )
        assert retried == 2.0
        assert await served.stop() == 0


async def test_unavailable_is_retried_for_get_and_never_for_post(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, config(upstream.port))
    scripted(upstream, [(503, {}), (502, {})])
    async with serve_process(path) as served:
        assert (await raw_request(served.port, "GET", "/a")).status == 200
        assert len(upstream.requests) == 3
        scripted(upstream, [(503, {})])
        resp = await raw_request(served.port, "POST", "/b", body=b"{}")
        assert resp.status == 503  # the upstream's answer, passed on
        assert len(upstream.requests) == 4  # one attempt: a POST may have run
        scripted(upstream, [(504, {}), (504, {}), (504, {}), (504, {}), (504, {})])
        resp = await raw_request(served.port, "DELETE", "/c")
        assert resp.status == 504  # attempts used up: the last answer
        assert len(upstream.requests) == 8  # 4 attempts
        assert await served.stop() == 0


async def test_retry_after_past_the_deadline_is_not_waited_for(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    scripted(upstream, [(429, {"Retry-After": "30"})])
    path = write(tmp_path, config(upstream.port, "{deadline: 5}"))
    async with serve_process(path) as served:
        t0 = time.monotonic()
        resp = await raw_request(served.port, "GET", "/x")
        assert resp.status == 429
        assert time.monotonic() - t0 < 3
        assert resp.header("Retry-After") == "30"  # the client may wait itself
        assert len(upstream.requests) == 1
        assert await served.stop() == 0


async def test_an_empty_budget_stops_retries(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    scripted(upstream, [(429, {})])
    path = write(tmp_path, config(upstream.port, "{budget_percent: 0, min_concurrency: 0}"))
    async with serve_process(path) as served:
        assert (await raw_request(served.port, "GET", "/x")).status == 429
        assert len(upstream.requests) == 1
        assert await served.stop() == 0
    assert "the retry budget is used up" in served.log()


async def test_attempts_1_turns_retries_off(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    scripted(upstream, [(429, {})])
    path = write(tmp_path, config(upstream.port, "{attempts: 1}"))
    async with serve_process(path) as served:
        assert (await raw_request(served.port, "GET", "/x")).status == 429
        assert len(upstream.requests) == 1
        assert await served.stop() == 0


async def test_a_refused_connection_is_retried_until_the_upstream_is_back(
    tmp_path: Path,
) -> None:
    """Nothing was sent, so even a POST is tried again: the function starts listening
    while sigproxy backs off."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # reserved, not listening: connections are refused
    port = holder.getsockname()[1]
    upstream = FakeFunctionUrl(port=port)
    retries = "{attempts: 10, backoff_base: 0.2, backoff_max: 0.4, deadline: 8}"
    path = write(tmp_path, config(port, retries))
    runner: web.AppRunner | None = None
    async with serve_process(path) as served:
        assert served.admin_port is not None
        request = asyncio.create_task(raw_request(served.port, "POST", "/late", body=b"{}"))
        await asyncio.sleep(0.5)
        assert not request.done()
        holder.close()
        runner = web.AppRunner(upstream.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            resp = await asyncio.wait_for(request, 10)
            assert resp.status == 200, resp.body
            assert len(upstream.requests) == 1
            verify_sigv4(upstream.last, region="us-east-1")
            retried = await metric(
                served.admin_port,
                'sigproxy_upstream_retries_total{reason="connect",upstream="fn"}',
            )
            assert retried is not None and retried >= 1
        finally:
            await runner.cleanup()
        assert await served.stop() == 0


async def test_content_sha256_header_for_cloudfront_oac(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    text = (
        "admin: false\nupstreams:\n"
        f"  - {{name: oac, url: 'http://127.0.0.1:{upstream.port}', auth: none, "
        "host: oac.localhost, content_sha256_header: true}\n"
    )
    path = write(tmp_path, text)
    body = b'{"order": 42}'
    async with serve_process(path) as served:
        resp = await raw_request(
            served.port,
            "PUT",
            "/o",
            headers=[("X-Amz-Content-SHA256", "0" * 64)],
            body=body,
            host="oac.localhost",
        )
        assert resp.status == 200
        rec = upstream.last
        assert rec.all("X-Amz-Content-SHA256") == [hashlib.sha256(body).hexdigest()]
        assert rec.header("Authorization") is None
        assert await served.stop() == 0
