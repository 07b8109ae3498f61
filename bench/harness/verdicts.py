"""The performance issue's targets, each with the measured figure and met / missed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .report import fmt
from .results import DIRECT_TTFB, target_names

if TYPE_CHECKING:
    from .summary import Summary


@dataclass
class Verdict:
    text: str  # what was measured against what, as the report says it
    value: float | None
    limit: float
    status: str  # met | missed | n/a (why) | not assessed (why)


def _status(value: float | None, ok: bool, why: str = "not measured") -> str:
    return f"n/a ({why})" if value is None else ("met" if ok else "missed")


def verdicts(summary: Summary) -> list[Verdict]:
    s = summary.settings
    n = s.workers
    s1, _, e1, _ = target_names(n)
    out = []
    ratios = {r.workload: r for r in summary.ratios}
    wl = "POST 1 KiB"
    if wl not in ratios:
        why = f"{wl} was not run"
        out.append(Verdict("1 KiB POST req/s, 1 worker", None, 0.40, f"n/a ({why})"))
    else:
        r1 = ratios[wl].rps_1.median
        out.append(
            Verdict(
                f"1 KiB POST req/s, 1 worker: {fmt(r1, 3)}x Envoy concurrency 1 (target >= 0.40x)",
                r1,
                0.40,
                _status(r1, r1 is not None and r1 >= 0.40),
            )
        )
        rn = ratios[wl].rps_n.median
        if n == 2:
            status = _status(rn, rn is not None and rn >= 0.50)
        else:
            status = f"not assessed (the target is for 2; run with --workers 2), N = {n}"
        out.append(
            Verdict(
                f"1 KiB POST req/s, {n} workers: {fmt(rn, 3)}x Envoy concurrency {n} "
                f"(target >= 0.50x with 2 workers and 2 threads)",
                rn,
                0.50,
                status,
            )
        )
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
            f"Envoy concurrency 1 (target <= 2x)" + caveat,
            ro,
            2.0,
            _status(ro, ro is not None and ro <= 2),
        )
    )
    ttfb = {t.target: t.ttfb_ms for t in summary.ttfb}
    t_sig, t_direct = ttfb.get(s1), ttfb.get(DIRECT_TTFB)
    delta = None if t_sig is None or t_direct is None else t_sig - t_direct
    out.append(
        Verdict(
            f"streamed response, first byte: sigproxy 1 worker {fmt(t_sig, 3)} ms, direct "
            f"{fmt(t_direct, 3)} ms, difference {fmt(delta, 3)} ms (target <= 5 ms)",
            delta,
            5.0,
            _status(delta, delta is not None and delta <= 5),
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
            _status(peak_bytes, peak_bytes is not None and peak_bytes <= s.rss_target_bytes),
        )
    )
    return out
