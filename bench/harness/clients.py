"""The other ways load is made: wrk, an aiohttp closed loop, and time-to-first-byte GETs.

The closed loop runs in its own process (``python -m harness.clients URL DURATION
CONCURRENCY BODY WARMUP``, see :func:`run_closed_loop`); wrk is a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from . import BENCH_DIR
from .load import REQUEST_TIMEOUT_S, ms, percentile
from .measure import run_child

# --------------------------------------------------------------------------- closed loop


@dataclass
class ClosedLoopResult:
    requests: int  # measured requests (after the warm-up)
    errors: int  # of those, non-2xx or failed
    seconds: float
    req_per_s: float
    p50_ms: float | None
    p99_ms: float | None


async def closed_loop(
    url: str, duration: float, concurrency: int, body_bytes: int, warmup: float = 1.0
) -> ClosedLoopResult:
    """``concurrency`` workers POSTing back to back over one aiohttp session (keep-alive),
    ``warmup`` seconds not counted, then ``duration`` seconds; latency per request."""
    import aiohttp

    body = os.urandom(body_bytes)
    headers = {"Content-Type": "application/octet-stream"}
    latencies: list[float] = []
    requests = errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal requests, errors
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
                requests += 1
                errors += not ok
                latencies.append(t1 - t0)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = max(time.perf_counter(), stop_at) - measure_from
    latencies.sort()
    return ClosedLoopResult(
        requests=requests,
        errors=errors,
        seconds=round(elapsed, 3),
        req_per_s=round(requests / elapsed, 1),
        p50_ms=ms(percentile(latencies, 50)),
        p99_ms=ms(percentile(latencies, 99)),
    )


def run_closed_loop(
    url: str, duration: float, concurrency: int, body_bytes: int, warmup: float = 1.0
) -> ClosedLoopResult:
    """:func:`closed_loop` in its own process."""
    args = [str(x) for x in (url, duration, concurrency, body_bytes, warmup)]
    line = run_child("clients", args, timeout=warmup + duration + REQUEST_TIMEOUT_S + 60)
    return ClosedLoopResult(**json.loads(line))


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    """What bench/wrk.lua's done() prints; latencies in microseconds. err_status counts
    responses with status >= 400 (wrk's rule); the other err_* are socket errors."""

    requests: int
    duration_us: int
    bytes: int
    err_connect: int
    err_read: int
    err_write: int
    err_status: int
    err_timeout: int
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: int
    mean_us: float


def run_wrk(
    wrk: str, port: int, body_bytes: int, seconds: int, connections: int, threads: int
) -> WrkResult:
    """wrk with bench/wrk.lua: GET, or POST ``body_bytes`` bytes when that is above 0."""
    cmd = [wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s"]
    cmd += ["--timeout", f"{REQUEST_TIMEOUT_S:.0f}s", "-s", str(BENCH_DIR / "wrk.lua")]
    cmd.append(f"http://127.0.0.1:{port}/")
    env = {**os.environ, "BENCH_BODY_BYTES": str(body_bytes)}
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False
    )
    for line in r.stdout.splitlines():
        if line.startswith("NATIVE_BENCH "):
            return WrkResult(**json.loads(line.split(" ", 1)[1]))
    raise RuntimeError(f"wrk gave no result (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")


# --------------------------------------------------------------------------- first byte


def _first_body_byte(buf: bytes) -> bool:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head, body = buf[:end].lower(), buf[end + 4 :]
    if b"transfer-encoding: chunked" in head:
        eol = body.find(b"\r\n")
        return eol >= 0 and len(body) > eol + 2
    return len(body) > 0


def fetch(port: int, path: str) -> tuple[float, float, int, int]:
    """GET with Connection: close on a connection made before the clock starts:
    (seconds to the first body byte, seconds to the end, status, bytes after the head)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        first: float | None = None
        head = b""
        received = 0
        t0 = time.perf_counter()
        s.sendall(req.encode())
        while data := s.recv(1 << 20):
            received += len(data)
            if first is None:
                head += data
                if _first_body_byte(head):
                    first = time.perf_counter() - t0
        total = time.perf_counter() - t0
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    end = head.find(b"\r\n\r\n")
    body = received - (end + 4) if end >= 0 else 0
    return (first if first is not None else float("nan")), total, status, body


@dataclass
class TtfbResult:
    n: int
    bad: int  # answers other than 200
    ttfb_ms: float | None  # median
    ttfb_max_ms: float | None
    total_ms: float | None  # median time to the last byte


def ttfb(port: int, n: int, path: str = "/stream") -> TtfbResult:
    """Time to first byte of ``n`` GETs of ``path``, one after the other."""
    firsts, totals, bad = [], [], 0
    for _ in range(n):
        first, total, status, _ = fetch(port, path)
        if status != 200 or math.isnan(first):  # no body byte at all: not a stream
            bad += 1
            continue
        firsts.append(first)
        totals.append(total)
    return TtfbResult(
        n=n,
        bad=bad,
        ttfb_ms=ms(statistics.median(firsts)) if firsts else None,
        ttfb_max_ms=ms(max(firsts)) if firsts else None,
        total_ms=ms(statistics.median(totals)) if totals else None,
    )


def main(argv: list[str]) -> int:
    """``URL DURATION CONCURRENCY BODY WARMUP``: one closed-loop run, its result as JSON."""
    if len(argv) != 5:
        print(f"usage: python -m harness.clients {main.__doc__}; got {argv}", file=sys.stderr)
        return 2
    url, duration, conc, body, warmup = argv
    result = asyncio.run(closed_loop(url, float(duration), int(conc), int(body), float(warmup)))
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
