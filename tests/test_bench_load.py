"""bench/harness: the open-loop load generator against a real loopback server, its
HTTP/1.1 response reader, and the report's JSON against the tables it renders.

The server is a plain asyncio server on 127.0.0.1 port 0 that counts what arrives and
answers by plan: 200 with a length, 200 chunked, 200 then close, 500, or a close with no
answer. Rates and durations are small and every assertion on time is generous: the
counts are exact, the timing only bounded.
"""

from __future__ import annotations

import asyncio
import collections
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from harness.clients import TtfbResult, WrkResult
from harness.load import OpenLoopResult, open_loop, parse_response, run_open_loop
from harness.measure import LogSummary
from harness.report import errors_cell, fmt, render, row_cells
from harness.results import (
    GO_NOT_GIVEN,
    GO_TARGET,
    AdminRecord,
    Check,
    Measured,
    OpenLoopRun,
    Results,
    RssResult,
    Settings,
    TtfbRow,
)
from harness.summary import summarize, to_json

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- server


def mixed(i: int) -> str:
    """Every 10 requests: 6 plain 200s, one chunked, one 200 then close, a 500, a drop."""
    return {3: "500", 5: "chunked", 7: "drop", 9: "ok-close"}.get(i % 10, "ok")


class PlanServer:
    """Counts requests as they arrive; answers request i as ``plan(i)`` says."""

    def __init__(self, plan: Callable[[int], str]) -> None:
        self.plan = plan
        self.arrivals: list[float] = []
        self.actions: collections.Counter[str] = collections.Counter()
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                m = re.search(r"content-length:\s*(\d+)", head)
                await reader.readexactly(int(m.group(1)) if m else 0)
                i = len(self.arrivals)
                self.arrivals.append(time.monotonic())
                action = self.plan(i)
                self.actions[action] += 1
                if action == "drop":
                    return
                if action == "stall":  # until the client gives up and closes
                    await reader.read()
                    return
                if action == "chunked":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
                    )
                else:
                    status = b"500 Internal Server Error" if action == "500" else b"200 OK"
                    close = b"Connection: close\r\n" if action == "ok-close" else b""
                    writer.write(
                        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                        + close + b'Content-Length: 11\r\n\r\n{"ok":true}'
                    )  # fmt: skip
                await writer.drain()
                if action == "ok-close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def span(self) -> float:
        return self.arrivals[-1] - self.arrivals[0]


async def serving(plan: Callable[[int], str]) -> AsyncIterator[PlanServer]:
    state = PlanServer(plan)
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for writer in list(state._writers):
            writer.close()
        await server.wait_closed()


@pytest.fixture
async def mixed_server() -> AsyncIterator[PlanServer]:
    async for state in serving(mixed):
        yield state


@pytest.fixture
async def ok_server() -> AsyncIterator[PlanServer]:
    async for state in serving(lambda i: "ok"):
        yield state


def assert_sane_latencies(r: OpenLoopResult) -> None:
    figures = [r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms]
    assert all(v is not None and v > 0 for v in figures), figures
    assert figures == sorted(figures), figures  # p50 <= p90 <= p99 <= p99.9 <= max
    assert r.max_ms is not None and r.max_ms < 2000  # loopback, a tiny server
    assert r.send_lag_p99_ms is not None and r.send_lag_p99_ms >= 0


# --------------------------------------------------------------------------- generator


async def test_sends_what_it_says_and_counts_every_outcome(mixed_server: PlanServer) -> None:
    t0 = time.monotonic()
    r = await open_loop(mixed_server.port, rate=200, seconds=1.0, conns=8, request_timeout=5)
    elapsed = time.monotonic() - t0

    assert r.scheduled_total == r.scheduled == 200
    assert r.sent == len(mixed_server.arrivals) == 200  # every request sent arrived, once
    actions = mixed_server.actions
    assert actions["500"] == actions["drop"] == 20
    assert r.ok == actions["ok"] + actions["chunked"] + actions["ok-close"] == 160
    assert r.errors == {"status 500": 20, "connection closed": 20}
    assert r.warmup_errors == 0
    assert r.achieved_rps == pytest.approx(160.0)  # ok / seconds
    # Roughly the rate asked: 200 requests spread over about a second, not sent at once
    # nor dragged out (generous bounds; a loaded CI machine is slow, not this slow).
    assert 0.6 < mixed_server.span() < 3.0
    assert elapsed < 8
    assert_sane_latencies(r)
    assert 0 <= r.generator_cpu_share < 2


async def test_warm_up_is_sent_but_not_counted(ok_server: PlanServer) -> None:
    r = await open_loop(ok_server.port, rate=100, seconds=1.0, warmup=0.5, conns=4)
    assert r.scheduled_total == 150
    assert r.scheduled == 100
    assert r.sent == len(ok_server.arrivals) == 150
    assert r.ok == 100
    assert r.errors == {}
    assert 0.9 < ok_server.span() < 4.5
    assert_sane_latencies(r)


async def test_a_server_that_never_answers_costs_timeouts_not_a_hang() -> None:
    async for state in serving(lambda i: "stall"):
        t0 = time.monotonic()
        r = await open_loop(state.port, rate=20, seconds=0.5, conns=2, request_timeout=0.3)
        assert time.monotonic() - t0 < 8  # schedule + timeouts, bounded
        assert r.scheduled == r.sent == len(state.arrivals) == 10
        assert r.ok == 0
        assert r.errors == {"timeout": 10}
        assert r.p50_ms is None and r.max_ms is None
        assert r.achieved_rps == 0


async def test_nothing_listening_is_connect_errors() -> None:
    async for state in serving(lambda i: "ok"):
        port = state.port
    r = await open_loop(port, rate=50, seconds=0.2, conns=2, request_timeout=1)
    assert r.scheduled == 10
    assert r.sent == 0
    assert r.errors == {"connect error": 10}


async def test_in_its_own_process(mixed_server: PlanServer) -> None:
    """What native_bench runs: ``python -m harness.load`` in a child, result as JSON."""
    r = await asyncio.to_thread(run_open_loop, mixed_server.port, 100, 0.5, 0.0, 1024, 4, 5.0)
    assert r.scheduled == r.sent == len(mixed_server.arrivals) == 50
    assert r.errors == {"status 500": 5, "connection closed": 5}
    assert r.ok == 40
    assert r.body_bytes == 1024
    assert_sane_latencies(r)


# --------------------------------------------------------------------------- reader


def feed(data: bytes, eof: bool = False) -> list[tuple[int, int, bool] | None]:
    """parse_response on every prefix of data (the last one with ``eof``)."""
    out = []
    for n in range(1, len(data) + 1):
        r = parse_response(data[:n], eof=eof and n == len(data))
        out.append(None if r is None else (r.status, r.consumed, r.close))
    return out


def test_reader_needs_the_whole_response() -> None:
    body = b'{"ok":true}'
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + body
    assert feed(data) == [None] * (len(data) - 1) + [(200, len(data), False)]
    chunked = (
        b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5;x=y\r\nhello\r\n0\r\nTrailer: 1\r\n\r\n"
    )
    assert feed(chunked) == [None] * (len(chunked) - 1) + [(502, len(chunked), True)]


def test_reader_leaves_what_follows() -> None:
    first = b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"
    r = parse_response(first + b"HTTP/1.1 200 OK\r\n")
    assert r is not None and (r.status, r.consumed, r.close) == (204, len(first), False)
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n" + b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    r = parse_response(interim)
    assert r is not None and (r.status, r.consumed) == (201, len(interim))


def test_reader_body_until_close_and_http10() -> None:
    data = b"HTTP/1.0 200 OK\r\n\r\nuntil the end"
    assert parse_response(data) is None
    r = parse_response(data, eof=True)
    assert r is not None and (r.status, r.consumed, r.close) == (200, len(data), True)
    r = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert r is not None and r.close


@pytest.mark.parametrize(
    "data",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nbad\r\n\r\n"],
)
def test_reader_refuses_what_is_not_http(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_response(data)


# --------------------------------------------------------------------------- report


def wrk(requests: int, p99_us: int, status_errors: int = 0) -> WrkResult:
    return WrkResult(
        requests=requests, duration_us=3_000_000, bytes=requests * 100, err_connect=0,
        err_read=0, err_write=0, err_status=status_errors, err_timeout=0, p50_us=p99_us // 3,
        p90_us=p99_us // 2, p99_us=p99_us, p999_us=p99_us * 2, max_us=p99_us * 3, mean_us=500.0,
    )  # fmt: skip


def open_result(p99: float, errors: dict[str, int] | None = None) -> OpenLoopResult:
    return OpenLoopResult(
        rate=2000, seconds=3, warmup=1, connections=32, body_bytes=1024, scheduled_total=8000,
        sent=8000, scheduled=6000, ok=6000 - sum((errors or {}).values()), errors=errors or {},
        warmup_errors=0, achieved_rps=2000.0, p50_ms=p99 / 3, p90_ms=p99 / 2, p99_ms=p99,
        p999_ms=p99 * 1.5, max_ms=p99 * 2, send_lag_p99_ms=1.1, generator_cpu_share=0.2,
        proxy_cpu_per_1k=None if errors is None else 0.2,
    )  # fmt: skip


GO_PATH = "/opt/go/aws-sigv4-proxy"


def fake_results(go_proxy: str | None = GO_PATH) -> Results:
    """Two rounds of every target on both POST workloads; the Go aws-sigv4-proxy measured
    when ``go_proxy`` is given, its rows skipped as native_bench skips them otherwise."""
    settings = Settings(
        duration=3, warmup=1, connections=32, wrk_threads=1, workers=2, runs=2, quick=True,
        ttfb_requests=20, fixed_rate=2000, fixed_rate_body=1024, request_timeout_s=10,
        stream_chunks=5, stream_interval_ms=25, big_bytes=64 << 20, rss_target_bytes=60_000_000,
        go_proxy=go_proxy,
    )  # fmt: skip
    r = Results(
        settings=settings, workloads=["POST 1 KiB", "POST 1 MiB"], date="2026-11-29T12:00:00",
        machine={"cpus": "2", "cpu_model": "test CPU", "system": "Linux 6"},
        versions={"python": "3.11", "sigproxy": "0.1.0"}, notes=[], envoy_skip=None,
        wrk2="apt-cache policy wrk2: candidate (none)", sigproxy_config="listen: {}\n",
        elapsed_s=100.0, json_path="bench/results/x.json",
        go_skip=None if go_proxy else GO_NOT_GIVEN,
        go_command=f"{go_proxy or 'PATH'} --port 127.0.0.1:PORT --name lambda",
    )  # fmt: skip
    speed = {"direct (nginx)": 100_000, "sigproxy 1 worker": 8_000, "sigproxy 2 workers": 12_000,
             "envoy concurrency 1": 15_000, "envoy concurrency 2": 24_000}  # fmt: skip
    if go_proxy:
        speed[GO_TARGET] = 8_000
    for run_no in (1, 2):
        if not go_proxy:
            r.rows += [Measured(wl, GO_TARGET, run_no, skipped=GO_NOT_GIVEN)
                       for wl in ("POST 1 KiB", "POST 1 MiB")]  # fmt: skip
        for target, per_3s in speed.items():
            sent = {"x-amz-content-sha256": "", "signed_headers": "host;x-amz-date"}
            r.checks.append(Check(run_no, target, None, sent if target == GO_TARGET else {}))
            for wl, scale in (("POST 1 KiB", 3), ("POST 1 MiB", 3 / 20)):
                n = int(per_3s * scale) + run_no * 7
                cpu = None if target.startswith("direct") else {10: 0.01, 11: 0.3 * run_no}
                r.rows.append(
                    Measured(wl, target, run_no, wrk(n, 3000 + 100 * run_no, run_no - 1), cpu, 10)
                )
        r.open_loop += [
            OpenLoopRun(run_no, "direct (nginx)", open_result(1.5 + run_no / 10)),
            OpenLoopRun(run_no, "sigproxy 1 worker", open_result(2.1, {"status 502": run_no})),
            OpenLoopRun(run_no, "envoy concurrency 1", None, "no envoy in run 2")
            if run_no == 2 else OpenLoopRun(run_no, "envoy concurrency 1", open_result(2.0, {})),
        ]  # fmt: skip
        r.admin.append(AdminRecord(run_no, "sigproxy 1 worker", {"/metrics": {"200": 2}}, 9.0, 9))
    r.ttfb = [
        TtfbRow("direct (aiohttp)", TtfbResult(20, 0, 0.585, 1.01, 102.3)),
        TtfbRow("sigproxy 1 worker", TtfbResult(20, 1, 1.1, 1.845, 102.8)),
        TtfbRow("envoy concurrency 1", skipped="no envoy"),
    ]
    r.rss = RssResult(100, 51_000, 54_000, {100: 54_000}, 50_000, 200, 64 << 20, 0.5)
    r.logs = {"sigproxy": LogSummary(["2x WARNING something"], access_lines=123)}
    return r


def table(markdown: str, head: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with ``head``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_json_has_the_figures_the_tables_show() -> None:
    import json

    summary = summarize(fake_results())
    markdown = render(summary)
    doc = json.loads(to_json(summary))

    # The medians table: every cell from the JSON row of the same workload and target.
    shown = table(markdown, "| workload | target | runs |")
    assert len(shown) == len(doc["rows"]) == 12
    for cells, row in zip(shown, doc["rows"], strict=True):
        cpu = row["cpu_s_per_1k"]
        assert cells == [
            row["workload"], row["target"], str(row["runs"]), str(row["requests"]),
            fmt(row["rps"], 1), f"{fmt(row['rps_min'], 1)}-{fmt(row['rps_max'], 1)}",
            fmt(row["p50_ms"]), fmt(row["p99_ms"]), errors_cell(row["errors"]),
            "-" if cpu is None else fmt(cpu, 3),
        ]  # fmt: skip
        assert row["requests"] == sum(x["requests"] for x in row["per_run"])
    assert shown[0] == row_cells(summary.rows[0])
    assert shown[1][:4] == ["POST 1 MiB", "direct (nginx)", "2", "30021"]
    assert doc["rows"][2]["errors"] == {"status": 1, "connect": 0, "read": 0, "write": 0,
                                        "timeout": 0}  # fmt: skip

    # Per round: the JSON's per-run figures, in round order.
    per_run = table(markdown, "| workload | target | req/s | p99 ms |")
    for cells, row in zip(per_run, doc["rows"], strict=True):
        assert cells[2] == ", ".join(fmt(x["rps"], 1) for x in row["per_run"])
        assert cells[3] == ", ".join(fmt(x["p99_ms"]) for x in row["per_run"])

    # Ratios: the median and each round's value.
    ratios = {c[0]: c[1:] for c in table(markdown, "| workload | req/s 1 worker")}
    for r in doc["ratios"]:
        rps_1 = r["rps_1"]
        assert ratios[r["workload"]][0] == (
            f"{rps_1['median']:.3f} ({', '.join(f'{v:.3f}' for v in rps_1['per_run'])})"
        )

    # The open-loop table, skipped rows included.
    shown_ol = {c[0]: c for c in table(markdown, "| target | runs | scheduled |")}
    for o in doc["open_loop"]:
        cells = shown_ol[o["target"]]
        assert cells[1:5] == [str(o["runs"]), str(o["scheduled"]), str(o["ok"]),
                              fmt(o["achieved_rps"], 1)]  # fmt: skip
        assert cells[7] == fmt(o["p99_ms"])
        assert cells[11] == (", ".join(f"{k} {c}" for k, c in o["errors"].items()) or "0")
    assert doc["open_loop"][1]["errors"] == {"status 502": 3}
    assert doc["open_loop_p99_ratio"]["per_run"] == [pytest.approx(2.1 / 2.0), None]

    # TTFB, peak RSS, the verdicts: each line as the JSON has it.
    for t in doc["ttfb"]:
        if t["skipped"] is None:
            assert f"| {t['target']} | {fmt(t['ttfb_ms'], 3)} | " in markdown
    assert f"VmHWM before {doc['rss']['before_kb'] / 1024:.1f} MiB" in markdown
    assert len(doc["verdicts"]) == 7
    for v in doc["verdicts"]:
        assert f"- {v['text']}: {v['status']}" in markdown
    # 1 worker and 2 workers against Envoy (0.53x, 0.50x) fall short of 0.60x and 0.70x;
    # against Go 1.5x, CPU 0.019 ms, p99 1.05x, TTFB +0.515 ms and RSS 55.3 MB are met.
    statuses = ["missed", "missed", "met", "met", "met", "met", "met"]
    assert [v["status"] for v in doc["verdicts"]] == statuses
    assert doc["verdicts"][5]["value"] == pytest.approx(1.1 - 0.585)
    assert "- sigproxy: 123 access-log lines (not listed)\n    2x WARNING something" in markdown
    assert "- sigproxy 1 worker, run 1: /metrics 2x 200; requests_total 9, counted 9" in markdown
