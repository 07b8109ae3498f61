"""Throughput and latency of sigproxy against a direct connection to the same upstream.

A benchmark run by hand, not a test. From the repo root::

    python bench/proxy_bench.py [--duration SECONDS] [--concurrency N] [--body-bytes N] [--json]

One run starts, all on 127.0.0.1:

* a stand-in Function URL: a minimal aiohttp server (own process) answering every request
  with ``{"ok":true}`` without looking at signatures;
* the real proxy, ``python -m sigproxy serve`` (own process), with ``auth: aws_iam`` and
  static fake credentials from the environment, so every request is SigV4-signed but no
  AWS endpoint (nor instance metadata) is ever contacted;
* a load generator (own process, so it does not share an event loop or core with either
  server): ``--concurrency`` workers over one keep-alive aiohttp session POSTing
  ``--body-bytes`` random bytes, for a ~1 s warm-up that is not counted and then
  ``--duration`` seconds.

The load runs first directly against the upstream, then through sigproxy, and a table of
requests, errors (non-2xx or failed requests), req/s and p50/p99 latency is printed, with
the sigproxy/direct ratio and the machine it ran on. All child processes are stopped on
exit, including on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP_S = 1.0
REQUEST_TIMEOUT_S = 10.0
REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDBENCHEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "benchsecret",
    "AWS_SESSION_TOKEN": "benchtoken",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
ROW = "{:<10} {:>8}  {:>6}  {:>9}  {:>7}  {:>7}"
CONFIG = """\
listen: {{host: 127.0.0.1, port: 0}}
log_level: warning
upstreams:
  - name: bench
    url: http://127.0.0.1:{port}
    region: us-east-1
    auth: aws_iam
"""


def run_upstream(port_queue: mp.Queue) -> None:
    """Child process: serve ``{"ok":true}`` on a free port, report the port, run forever."""
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    async def main() -> None:
        runner = web.ServerRunner(web.Server(handler, access_log=None))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_queue.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


async def _load(url: str, duration: float, concurrency: int, body_bytes: int) -> dict:
    import aiohttp

    body = os.urandom(body_bytes)
    headers = {"Content-Type": "application/octet-stream"}
    latencies: list[float] = []
    counts = {"requests": 0, "errors": 0}
    start = time.perf_counter()
    measure_from = start + WARMUP_S
    stop_at = measure_from + duration
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

    async def worker(session: aiohttp.ClientSession) -> None:
        while (t0 := time.perf_counter()) < stop_at:
            ok = False
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = 200 <= resp.status < 300
            except (aiohttp.ClientError, TimeoutError):
                pass
            t1 = time.perf_counter()
            if t0 >= measure_from:
                counts["requests"] += 1
                counts["errors"] += not ok
                latencies.append(t1 - t0)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = max(time.perf_counter(), stop_at) - measure_from
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {
        **counts,
        "seconds": round(elapsed, 3),
        "req_per_s": round(counts["requests"] / elapsed, 1),
        "p50_ms": round(pct(50), 3),
        "p99_ms": round(pct(99), 3),
    }


def run_load(result_queue: mp.Queue, url: str, duration: float, conc: int, body: int) -> None:
    """Child process: run the load generator and put its result dict on the queue."""
    with contextlib.suppress(KeyboardInterrupt):
        result_queue.put(asyncio.run(_load(url, duration, conc, body)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log_path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = Path(log_path).read_text(errors="replace")
            raise SystemExit(f"sigproxy exited with status {proc.returncode}:\n{err}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"sigproxy did not accept connections on port {port} within {timeout}s")


def stop_process(proc: mp.Process | subprocess.Popen) -> None:
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
    elif proc.pid is not None and proc.is_alive():
        proc.terminate()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def measure(
    ctx: mp.context.BaseContext, url: str, args: argparse.Namespace, stack: contextlib.ExitStack
) -> dict:
    queue = ctx.Queue()
    proc = ctx.Process(
        target=run_load, args=(queue, url, args.duration, args.concurrency, args.body_bytes)
    )
    proc.start()
    stack.callback(stop_process, proc)
    try:
        result = queue.get(timeout=WARMUP_S + args.duration + REQUEST_TIMEOUT_S + 30)
    except Exception:
        raise SystemExit(f"load generator against {url} produced no result") from None
    proc.join(timeout=10)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent workers")
    parser.add_argument("--body-bytes", type=int, default=1024, help="request body size")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        port_queue = ctx.Queue()
        upstream = ctx.Process(target=run_upstream, args=(port_queue,), daemon=True)
        upstream.start()
        stack.callback(stop_process, upstream)
        upstream_port = port_queue.get(timeout=30)

        config_path = os.path.join(tmp, "sigproxy.yaml")
        Path(config_path).write_text(CONFIG.format(port=upstream_port))
        log_path = os.path.join(tmp, "sigproxy.log")
        proxy_port = free_port()
        cmd = [sys.executable, "-m", "sigproxy", "serve", "--config", config_path]
        with open(log_path, "wb") as log:
            proxy = subprocess.Popen(
                [*cmd, "--port", str(proxy_port)],
                cwd=REPO_ROOT,
                env={**os.environ, **BENCH_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stack.callback(stop_process, proxy)
        wait_for_port(proxy_port, proxy, log_path, timeout=30)

        results = {
            "direct": measure(ctx, f"http://127.0.0.1:{upstream_port}/", args, stack),
            "sigproxy": measure(ctx, f"http://127.0.0.1:{proxy_port}/", args, stack),
        }
        if proxy.poll() is not None:
            print(f"warning: sigproxy exited with status {proxy.returncode}", file=sys.stderr)
        proxy_log = Path(log_path).read_text(errors="replace").strip()

    direct, proxied = results["direct"]["req_per_s"], results["sigproxy"]["req_per_s"]
    info = {
        "ratio": round(proxied / direct, 3) if direct else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "duration": args.duration,
        "concurrency": args.concurrency,
        "body_bytes": args.body_bytes,
    }
    if args.json:
        print(json.dumps({"results": results, **info}, indent=2))
    else:
        print(ROW.format("target", "requests", "errors", "req/s", "p50 ms", "p99 ms"))
        for name, r in results.items():
            cells = (r["requests"], r["errors"], f"{r['req_per_s']:.1f}")
            print(ROW.format(name, *cells, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"))
        print(
            f"sigproxy/direct req/s: {info['ratio']}; cpu_count {info['cpu_count']}, "
            f"Python {info['python']}, {info['date']} (concurrency {args.concurrency}, "
            f"body {args.body_bytes} B, {args.duration:g} s)"
        )
    if proxy_log:
        print(f"sigproxy output:\n{proxy_log}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # children were stopped by the ExitStack on the way out
        sys.exit("interrupted")
