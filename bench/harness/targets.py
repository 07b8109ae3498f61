"""What is measured: nginx, sigproxy as users deploy it, Envoy, and a Python upstream.

sigproxy runs with its default configuration (SIGPROXY_CONFIG sets only the listener, the
upstream and a free admin port): log_level info, so one access-log line per request (to
a file, as a container runtime would take stderr), the admin listener on, metrics on.
While it serves, AdminTraffic does to the admin port what a deployment does
(deploy/kubernetes/shared.yaml): /readyz every 5 s, /healthz every 10 s, /metrics every
15 s. Envoy runs as bench/envoy.yaml.tmpl has it: no admin listener and no access log,
which is Envoy's own default (both must be configured to exist). The Go aws-sigv4-proxy
(github.com/awslabs/aws-sigv4-proxy, a binary given with --go-proxy) runs with the flags
that make it sign for the same upstream (go_proxy_cmd) and otherwise its defaults: info
logging (nothing per request), no admin port, GOMAXPROCS = every CPU.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import os
import re
import sys
import threading
import time
from dataclasses import dataclass

from . import BENCH_DIR, REPO_ROOT
from .measure import Runner, Server, free_port, harness_cmd, harness_env, wait_for_log
from .results import GO_TARGET
from .tools import Tools, run

BENCH_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDBENCHEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "benchsecret",
    "AWS_SESSION_TOKEN": "benchtoken",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
# Defaults everywhere else: log_level info (with the access log), admin on, metrics on.
SIGPROXY_CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: 0}}
upstreams:
  - name: bench
    url: 'http://127.0.0.1:{upstream_port}'
    region: us-east-1
    service: lambda
    auth: aws_iam
"""
ADMIN_SCHEDULE = (("/readyz", 5.0), ("/healthz", 10.0), ("/metrics", 15.0))
ACCESS_LOGGER = " sigproxy.access: "  # in a text-format log line


def sigproxy_config(port: int | str, upstream_port: int | str) -> str:
    return SIGPROXY_CONFIG.format(port=port, upstream_port=upstream_port)


@dataclass
class SigproxyServer(Server):
    admin_port: int = 0


def start_sigproxy(runner: Runner, upstream_port: int, workers: int | None) -> SigproxyServer:
    """``python -m sigproxy serve`` with the default config; ``workers``: ``--workers``."""
    port = free_port()
    path = runner.tmp / f"sigproxy-{port}.yaml"
    path.write_text(sigproxy_config(port, upstream_port))
    cmd = [sys.executable, "-m", "sigproxy", "serve", "--config", str(path), "--port", str(port)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    server = runner.start(f"sigproxy workers={workers or 1}", cmd, port, env=BENCH_ENV)
    found = wait_for_log(server, r"admin listening on http://127\.0\.0\.1:(\d+)")
    port_text = found.group(1)
    return SigproxyServer(server.name, server.proc, server.port, server.log_path, int(port_text))


def sigproxy_has_workers() -> bool:
    r = run([sys.executable, "-m", "sigproxy", "serve", "--help"], timeout=60, cwd=REPO_ROOT)
    return "--workers" in r.stdout


def start_nginx(runner: Runner, tools: Tools) -> Server:
    """nginx (one worker) from bench/nginx.conf.tmpl, every file in the run's tmp dir."""
    port = free_port()
    user_line = "user root root;" if os.geteuid() == 0 else ""
    conf = (BENCH_DIR / "nginx.conf.tmpl").read_text()
    conf = conf.format(user_line=user_line, workers=1, tmp=runner.tmp, port=port)
    path = runner.tmp / "nginx.conf"
    path.write_text(conf)
    err = runner.tmp / "nginx-error.log"
    check = run([tools.nginx, "-t", "-p", str(runner.tmp), "-c", str(path), "-e", str(err)])
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
    cmd = [tools.nginx, "-p", str(runner.tmp), "-c", str(path), "-e", str(err)]
    return runner.start("nginx", cmd, port)


def start_envoy(runner: Runner, envoy: str, upstream_port: int, concurrency: int) -> Server:
    """Envoy from bench/envoy.yaml.tmpl: aws_request_signing with the payload hashed."""
    port = free_port()
    conf = (BENCH_DIR / "envoy.yaml.tmpl").read_text()
    upstream_host = f"127.0.0.1:{upstream_port}"
    conf = conf.format(port=port, upstream_port=upstream_port, upstream_host=upstream_host)
    path = runner.tmp / f"envoy-{port}.yaml"
    path.write_text(conf)
    cmd = [envoy, "-c", str(path), "--concurrency", str(concurrency)]
    cmd += ["--disable-hot-restart", "--log-level", "warn"]
    return runner.start(f"envoy concurrency={concurrency}", cmd, port, env=BENCH_ENV)


def go_proxy_cmd(path: str, port: int | str, upstream_port: int | str) -> list[str]:
    """The Go aws-sigv4-proxy signing for lambda in us-east-1 in front of the upstream:
    ``--host`` is where it proxies to (and the Host it signs), ``--upstream-url-scheme
    http`` because the upstream is plain HTTP (its default is https). The payload is
    hashed (no ``--unsigned-payload``); credentials come from the AWS_* environment."""
    return [
        path,
        "--port",
        f"127.0.0.1:{port}",
        "--name",
        "lambda",
        "--region",
        "us-east-1",
        "--host",
        f"127.0.0.1:{upstream_port}",
        "--upstream-url-scheme",
        "http",
    ]


def start_go_proxy(runner: Runner, path: str, upstream_port: int) -> Server:
    """The Go aws-sigv4-proxy (go_proxy_cmd), credentials from BENCH_ENV."""
    port = free_port()
    return runner.start(GO_TARGET, go_proxy_cmd(path, port, upstream_port), port, env=BENCH_ENV)


def start_upstream(runner: Runner, name: str = "python-upstream") -> Server:
    """harness.upstream in its own process."""
    port = free_port()
    return runner.start(name, harness_cmd("upstream", str(port)), port, env=harness_env())


def signing_check(
    port: int, upstream_port: int, signed: bool, payload_header: bool = True
) -> tuple[str | None, dict[str, str]]:
    """POST to nginx's /_echo through the target: (problem, what the upstream saw).

    The problem is None when what arrived is as expected: a SigV4 Authorization for
    lambda/us-east-1 with the key id, the session token, the upstream's Host and, in
    x-amz-content-sha256, the body's SHA-256. With ``payload_header=False`` (the Go
    aws-sigv4-proxy: its signer, aws-sdk-go's, sends that header only for S3, Glacier or
    an unsigned payload) the header may also be absent, but never UNSIGNED-PAYLOAD nor
    any other value; nothing is recomputed. What the upstream saw is returned either way:
    x-amz-content-sha256 ("" when not sent) and the SignedHeaders, with the body's
    SHA-256 beside them."""
    body = b"sigproxy native bench"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/_echo", body=body, headers={"Content-Type": "text/plain"})
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return f"request failed: {exc!r}", {}
    finally:
        conn.close()
    if resp.status != 200:
        return f"status {resp.status}: {text[:300]}", {}
    if not signed:
        return None, {}
    seen = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    auth = seen.get("authorization", "")
    m = re.search(r"SignedHeaders=([^,\s]*)", auth)
    sent = {
        "x-amz-content-sha256": seen.get("x-amz-content-sha256", ""),
        "signed_headers": m.group(1) if m else "",
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return _signing_problem(seen, body, upstream_port, payload_header), sent


def _signing_problem(
    seen: dict[str, str], body: bytes, upstream_port: int, payload_header: bool
) -> str | None:
    """What is wrong with the headers the upstream saw (nginx's /_echo), or None."""
    auth = seen.get("authorization", "")
    problems = []
    if not re.match(
        r"AWS4-HMAC-SHA256 Credential=AKIDBENCHEXAMPLE/\d{8}/us-east-1/lambda/aws4_request,",
        auth,
    ):
        problems.append(f"authorization={auth!r}")
    digest = seen.get("x-amz-content-sha256", "")
    if digest != hashlib.sha256(body).hexdigest() and (payload_header or digest != ""):
        problems.append(f"x-amz-content-sha256={digest!r}")
    if seen.get("x-amz-security-token") != "benchtoken":
        problems.append(f"x-amz-security-token={seen.get('x-amz-security-token')!r}")
    if seen.get("host") != f"127.0.0.1:{upstream_port}":
        problems.append(f"host={seen.get('host')!r}")
    return "; ".join(problems) or None


def requests_total(metrics_text: str) -> float:
    """The sum of every ``sigproxy_requests_total`` series in a /metrics scrape."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("sigproxy_requests_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class AdminTraffic:
    """The kubelet's probes and Prometheus's scrapes on sigproxy's admin port, in a
    thread, from entering the context to leaving it; then one last /metrics scrape.

    ``answers[path][status]`` counts the answers (``error`` when there was none);
    ``requests_total`` is sigproxy_requests_total at the last scrape."""

    def __init__(self, port: int, schedule: tuple[tuple[str, float], ...] = ADMIN_SCHEDULE):
        self.port = port
        self.schedule = schedule
        self.answers: dict[str, collections.Counter[str]] = {
            path: collections.Counter() for path, _ in schedule
        }
        self.requests_total: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="admin-traffic", daemon=True)

    def get(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            self.answers.setdefault(path, collections.Counter())[str(resp.status)] += 1
        except (OSError, http.client.HTTPException):
            self.answers.setdefault(path, collections.Counter())["error"] += 1
            return ""
        finally:
            conn.close()
        if path == "/metrics" and resp.status == 200:
            self.requests_total = requests_total(body)
        return body

    def _run(self) -> None:
        due = dict.fromkeys((path for path, _ in self.schedule), time.monotonic())
        every = dict(self.schedule)
        while not self._stop.is_set():
            now = time.monotonic()
            for path, at in due.items():
                if at <= now:
                    self.get(path)
                    due[path] = at + every[path]
            self._stop.wait(max(0.0, min(due.values()) - time.monotonic()))

    def __enter__(self) -> AdminTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self.get("/metrics")
