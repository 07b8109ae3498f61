"""The performance issue's targets, each with the measured figure and met / missed.

The limits (issue 16), in the order the report gives them:

* 1 KiB POST req/s, sigproxy 1 worker >= 0.60x Envoy concurrency 1, and 2 workers >=
  0.70x Envoy concurrency 2 (medians of the per-round ratios);
* 1 KiB POST req/s, sigproxy 2 workers >= 1.3x the Go aws-sigv4-proxy (median of the
  per-round ratios; n/a when --go-proxy was not given);
* sigproxy's CPU per request, 1 KiB POST, 1 worker <= 0.08 ms (the median over the rounds
  of the proxy CPU seconds per 1,000 requests, which is ms per request);
* p99 at a fixed offered load of 2,000 req/s <= 1.2x Envoy's;
* a streamed response's first byte within 1 ms of direct;
* peak RSS per worker while 64 MiB stream through <= 60 MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .report import fmt
from .results import DIRECT_TTFB, GO_NOT_GIVEN, target_names

if TYPE_CHECKING:
    from .summary import Summary

WORKLOAD = "POST 1 KiB"
RPS_1_MIN = 0.60  # sigproxy 1 worker / Envoy concurrency 1
RPS_2_MIN = 0.70  # sigproxy 2 workers / Envoy concurrency 2
RPS_GO_MIN = 1.3  # sigproxy 2 workers / the Go aws-sigv4-proxy
CPU_MS_MAX = 0.08  # sigproxy 1 worker, ms of CPU per request
OPEN_LOOP_P99_MAX = 1.2  # sigproxy 1 worker / Envoy concurrency 1, p99 at the fixed rate
TTFB_DELTA_MAX_MS = 1.0  # sigproxy 1 worker - direct, streamed first byte
GO_SKIPPED = "n/a (skipped: no --go-proxy PATH)"


@dataclass
class Verdict:
    text: str  # what was measured against what, as the report says it
    value: float | None
    limit: float
    status: str  # met | missed | n/a (why) | not assessed (why)


def _status(value: float | None, ok: bool, why: str = "not measured") -> str:
    return f"n/a ({why})" if value is None else ("met" if ok else "missed")


def _at_least(value: float | None, limit: float) -> str:
    return _status(value, value is not None and value >= limit)


def _at_most(value: float | None, limit: float) -> str:
    return _status(value, value is not None and value <= limit)


def _two_workers(value: float | None, limit: float, n: int) -> str:
    """The 2-worker targets are assessed only when N is 2."""
    if n != 2:
        return f"not assessed (the target is for 2; run with --workers 2), N = {n}"
    return _at_least(value, limit)


def _throughput(summary: Summary) -> list[Verdict]:
    n = summary.settings.workers
    ratios = {r.workload: r for r in summary.ratios}
    if WORKLOAD not in ratios:
        why = f"n/a ({WORKLOAD} was not run)"
        return [
            Verdict("1 KiB POST req/s, 1 worker", None, RPS_1_MIN, why),
            Verdict(f"1 KiB POST req/s, {n} workers", None, RPS_2_MIN, why),
            Verdict(f"1 KiB POST req/s, {n} workers vs Go", None, RPS_GO_MIN, why),
        ]
    row = ratios[WORKLOAD]
    r1, rn, rgo = row.rps_1.median, row.rps_n.median, row.rps_n_go.median
    if summary.go_skip == GO_NOT_GIVEN:
        go_status = GO_SKIPPED
    elif summary.go_skip:
        go_status = f"n/a (skipped: {summary.go_skip})"
    else:
        go_status = _two_workers(rgo, RPS_GO_MIN, n)
    return [
        Verdict(
            f"1 KiB POST req/s, 1 worker: {fmt(r1, 3)}x Envoy concurrency 1 "
            f"(target >= {RPS_1_MIN:.2f}x)",
            r1,
            RPS_1_MIN,
            _at_least(r1, RPS_1_MIN),
        ),
        Verdict(
            f"1 KiB POST req/s, {n} workers: {fmt(rn, 3)}x Envoy concurrency {n} "
            f"(target >= {RPS_2_MIN:.2f}x with 2 workers and 2 threads)",
            rn,
            RPS_2_MIN,
            _two_workers(rn, RPS_2_MIN, n),
        ),
        Verdict(
            f"1 KiB POST req/s, {n} workers: {fmt(rgo, 3)}x the Go aws-sigv4-proxy "
            f"(target >= {RPS_GO_MIN:.1f}x with 2 workers)",
            rgo,
            RPS_GO_MIN,
            go_status,
        ),
    ]


def _cpu(summary: Summary) -> Verdict:
    s1 = target_names(summary.settings.workers)[0]
    row = next((r for r in summary.rows if r.workload == WORKLOAD and r.target == s1), None)
    ms = None if row is None else row.cpu_s_per_1k  # CPU s per 1,000 requests = ms each
    why = "not measured" if row is not None else f"{WORKLOAD} was not run"
    return Verdict(
        f"sigproxy CPU per request, 1 KiB POST, 1 worker: {fmt(ms, 3)} ms (median over the "
        f"runs; target <= {CPU_MS_MAX:.2f} ms)",
        ms,
        CPU_MS_MAX,
        _status(ms, ms is not None and ms <= CPU_MS_MAX, why),
    )


def verdicts(summary: Summary) -> list[Verdict]:
    s = summary.settings
    s1, _, e1, _ = target_names(s.workers)
    out = [*_throughput(summary), _cpu(summary)]
    ro = summary.open_loop_p99_ratio.median
    ol_errors = {o.target: sum(o.errors.values()) for o in summary.open_loop}
    caveat = ""
    if ro is not None and (ol_errors.get(s1) or ol_errors.get(e1)):
        caveat = (
            f" (errors over the runs: sigproxy {ol_errors.get(s1, 0)}, "
            f"Envoy {ol_errors.get(e1, 0)}; p99 is of the successful requests)"
        )
    out.append(
        Verdict(
            f"p99 at a fixed offered load of {s.fixed_rate:,} req/s, 1 worker: {fmt(ro, 3)}x "
            f"Envoy concurrency 1 (target <= {OPEN_LOOP_P99_MAX:.1f}x)" + caveat,
            ro,
            OPEN_LOOP_P99_MAX,
            _at_most(ro, OPEN_LOOP_P99_MAX),
        )
    )
    ttfb = {t.target: t.ttfb_ms for t in summary.ttfb}
    t_sig, t_direct = ttfb.get(s1), ttfb.get(DIRECT_TTFB)
    delta = None if t_sig is None or t_direct is None else t_sig - t_direct
    out.append(
        Verdict(
            f"streamed response, first byte: sigproxy 1 worker {fmt(t_sig, 3)} ms, direct "
            f"{fmt(t_direct, 3)} ms, difference {fmt(delta, 3)} ms "
            f"(target <= {TTFB_DELTA_MAX_MS:.0f} ms)",
            delta,
            TTFB_DELTA_MAX_MS,
            _at_most(delta, TTFB_DELTA_MAX_MS),
        )
    )
    peak_kb = None if summary.rss is None else summary.rss.peak_kb
    peak_bytes = None if peak_kb is None else peak_kb * 1024
    measured = "n/a"
    if peak_kb is not None:
        measured = f"{peak_kb / 1024:.1f} MiB = {peak_kb * 1024 / 1e6:.1f} MB"
    out.append(
        Verdict(
            f"peak RSS per worker while a {s.big_bytes >> 20} MiB response streams: VmHWM "
            f"{measured} (target <= 60 MB = {s.rss_target_bytes:,} bytes)",
            peak_bytes,
            float(s.rss_target_bytes),
            _at_most(peak_bytes, s.rss_target_bytes),
        )
    )
    return out
