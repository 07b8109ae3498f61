"""Throughput and latency of sigproxy against a direct connection to the same upstream.

A benchmark run by hand, not a test. From the repo root::

    python bench/proxy_bench.py [--duration SECONDS] [--concurrency N] [--body-bytes N] [--json]

One run starts, all on 127.0.0.1 (bench/harness does the work):

* a stand-in Function URL: a minimal aiohttp server (own process, harness/upstream.py)
  answering every request with ``{"ok":true}`` without looking at signatures;
* the real proxy, ``python -m sigproxy serve`` (own process) in its default
  configuration as users deploy it (log_level info with its access log, admin listener
  and metrics on; the admin port probed and scraped while it serves), ``auth: aws_iam``
  with static fake credentials from the environment, so every request is SigV4-signed
  but no AWS endpoint (nor instance metadata) is ever contacted;
* a load generator (own process, harness/load.py's closed loop): ``--concurrency``
  workers over one keep-alive aiohttp session POSTing ``--body-bytes`` random bytes, for
  a ~1 s warm-up that is not counted and then ``--duration`` seconds.

The load runs first directly against the upstream, then through sigproxy, and a table of
requests, errors (non-2xx or failed requests), req/s and p50/p99 latency is printed, with
the sigproxy/direct ratio and the machine it ran on. All child processes are stopped on
exit, including on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.clients import ClosedLoopResult, run_closed_loop
from harness.measure import Runner, summarize_logs
from harness.report import fmt
from harness.targets import ACCESS_LOGGER, AdminTraffic, start_sigproxy, start_upstream

ROW = "{:<10} {:>8}  {:>6}  {:>9}  {:>7}  {:>7}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds (default 10)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="concurrent workers (default 16)"
    )
    parser.add_argument(
        "--body-bytes", type=int, default=1024, help="request body bytes (default 1024)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    def load(port: int) -> ClosedLoopResult:
        url = f"http://127.0.0.1:{port}/"
        return run_closed_loop(url, args.duration, args.concurrency, args.body_bytes)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        runner = Runner(stack, Path(tmp))
        upstream = start_upstream(runner)
        proxy = start_sigproxy(runner, upstream.port, None)
        results = {"direct": load(upstream.port)}
        with AdminTraffic(proxy.admin_port) as admin:
            results["sigproxy"] = load(proxy.port)
        if proxy.proc.poll() is not None:
            print(f"warning: sigproxy exited with status {proxy.proc.returncode}", file=sys.stderr)
        proxy_log = summarize_logs(runner.logs["sigproxy"], ACCESS_LOGGER)

    direct, proxied = results["direct"].req_per_s, results["sigproxy"].req_per_s
    info: dict[str, Any] = {
        "ratio": round(proxied / direct, 3) if direct else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "duration": args.duration,
        "concurrency": args.concurrency,
        "body_bytes": args.body_bytes,
        "sigproxy_admin": {
            "answers": {path: dict(c) for path, c in admin.answers.items()},
            "requests_total": admin.requests_total,
        },
    }
    if args.json:
        out = {name: asdict(r) for name, r in results.items()}
        print(json.dumps({"results": out, **info}, indent=2))
    else:
        print(ROW.format("target", "requests", "errors", "req/s", "p50 ms", "p99 ms"))
        for name, r in results.items():
            cells = (r.requests, r.errors, f"{r.req_per_s:.1f}", fmt(r.p50_ms), fmt(r.p99_ms))
            print(ROW.format(name, *cells))
        print(
            f"sigproxy/direct req/s: {info['ratio']}; cpu_count {info['cpu_count']}, "
            f"Python {info['python']}, {info['date']} (concurrency {args.concurrency}, "
            f"body {args.body_bytes} B, {args.duration:g} s; sigproxy in its default "
            f"config, sigproxy_requests_total {fmt(admin.requests_total, 0)} at the last scrape)"
        )
    lines = [*proxy_log.lines, f"{proxy_log.access_lines} access-log lines"]
    print("sigproxy output:\n" + "\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # children were stopped by the ExitStack on the way out
        sys.exit("interrupted")
