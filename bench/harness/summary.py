"""From what the rounds measured (Results) to every figure the report shows (Summary).

Figures are medians over the rounds; each sigproxy/Envoy (and sigproxy/Go
aws-sigv4-proxy) ratio is the median of the ratios computed within each round. The
Summary is the JSON document, and harness.report renders the markdown from it alone, so
the two cannot disagree.
"""

from __future__ import annotations

import collections
import json
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from .clients import WrkResult
from .load import OpenLoopResult
from .measure import LogSummary
from .results import (
    GO_TARGET,
    AdminRecord,
    Check,
    Measured,
    OpenLoopRun,
    Results,
    Settings,
    TtfbRow,
    target_names,
)
from .verdicts import Verdict, verdicts

SCHEMA = 2  # 2: the Go aws-sigv4-proxy (rows, rps_n_go, go_skip), checks' sent


# --------------------------------------------------------------------------- outputs


@dataclass
class Ratio:
    median: float | None
    per_run: list[float | None]  # in round order


@dataclass
class RunFigures:
    run: int
    requests: int
    rps: float | None
    p50_ms: float | None
    p99_ms: float | None
    cpu_s_per_1k: float | None
    errors: dict[str, int]
    cpu_split: str
    wrk: WrkResult | None


@dataclass
class RowSummary:
    workload: str
    target: str
    runs: int  # rounds with a result
    requests: int  # total over the rounds
    rps: float | None  # median
    rps_min: float | None
    rps_max: float | None
    p50_ms: float | None  # median
    p99_ms: float | None  # median
    errors: dict[str, int]  # totals over the rounds, by wrk's kind
    cpu_s_per_1k: float | None  # median; None for the direct target
    skipped: str | None
    per_run: list[RunFigures | None]  # in round order; None: not measured in that round


@dataclass
class RatioRow:
    workload: str
    rps_1: Ratio  # sigproxy 1 worker / Envoy concurrency 1
    rps_n: Ratio  # sigproxy N workers / Envoy concurrency N
    p99_1: Ratio
    p99_n: Ratio
    rps_n_go: Ratio  # sigproxy N workers / the Go aws-sigv4-proxy


@dataclass
class OpenLoopSummary:
    target: str
    runs: int
    scheduled: int  # totals over the rounds
    ok: int
    achieved_rps: float | None  # medians over the rounds
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    p99_ms_per_run: list[float | None]
    p999_ms: float | None
    max_ms: float | None  # the highest round
    errors: dict[str, int]  # totals over the rounds
    send_lag_p99_ms: float | None
    generator_cpu_share: float | None
    proxy_cpu_s_per_1k: float | None
    skipped: str | None
    per_run: list[OpenLoopResult | None]


@dataclass
class TtfbSummary:
    target: str
    n: int
    bad: int
    ttfb_ms: float | None
    ttfb_max_ms: float | None
    total_ms: float | None
    skipped: str | None


@dataclass
class RssSummary:
    pid: int
    before_kb: int
    after_kb: int
    rss_after_kb: int
    tree_after_kb: dict[str, int]
    peak_kb: int  # the highest VmHWM of the tree: per worker
    status: int
    body_bytes: int
    seconds: float
    direct: tuple[int, int, float] | None  # the same response without the proxy


@dataclass
class CheckSummary:
    target: str
    ok_runs: int
    failed: list[Check]
    sent: dict[str, str]  # what the upstream saw in the last round that saw anything


@dataclass
class Summary:
    settings: Settings
    workloads: list[str]
    date: str
    elapsed_s: float
    machine: dict[str, str]
    versions: dict[str, str]
    notes: list[str]
    envoy_skip: str | None
    wrk2: str
    sigproxy_config: str
    go_skip: str | None
    go_command: str
    checks: list[CheckSummary]
    rows: list[RowSummary]
    ratios: list[RatioRow]
    open_loop: list[OpenLoopSummary]
    open_loop_p99_ratio: Ratio
    ttfb: list[TtfbSummary]
    rss: RssSummary | None
    admin: list[AdminRecord]
    logs: dict[str, LogSummary]
    problems: list[str]
    verdicts: list[Verdict]
    json_path: str | None
    schema: int = SCHEMA


# --------------------------------------------------------------------------- figures


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that were measured (None: not measured in that round)."""
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else None


def ratio_value(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _rows(results: Results) -> list[RowSummary]:
    runs = range(1, results.settings.runs + 1)
    groups: dict[tuple[str, str], list[Measured]] = {}
    for row in results.rows:
        groups.setdefault((row.workload, row.target), []).append(row)
    out = []
    for (workload, target), rows in groups.items():
        done = {r.run: r for r in rows if r.wrk is not None and r.rps is not None}
        rps = [r.rps for r in done.values() if r.rps is not None]
        errors = collections.Counter[str]()
        for r in done.values():
            errors.update(r.errors)
        skipped = None
        if not done:
            skipped = next((r.skipped for r in rows if r.skipped), None) or "failed (see problems)"
        per_run: list[RunFigures | None] = []
        for run_no in runs:
            m = done.get(run_no)
            if m is None or m.wrk is None:
                per_run.append(None)
                continue
            per_run.append(
                RunFigures(
                    run=m.run,
                    requests=m.wrk.requests,
                    rps=m.rps,
                    p50_ms=m.p50_ms,
                    p99_ms=m.p99_ms,
                    cpu_s_per_1k=m.cpu_per_1k,
                    errors=m.errors,
                    cpu_split=m.cpu_split,
                    wrk=m.wrk,
                )
            )
        out.append(
            RowSummary(
                workload=workload,
                target=target,
                runs=len(done),
                requests=sum(r.wrk.requests for r in done.values() if r.wrk),
                rps=median(rps),
                rps_min=min(rps) if rps else None,
                rps_max=max(rps) if rps else None,
                p50_ms=median(r.p50_ms for r in done.values()),
                p99_ms=median(r.p99_ms for r in done.values()),
                errors=dict(errors) if done else {},
                cpu_s_per_1k=median(r.cpu_per_1k for r in done.values()),
                skipped=skipped,
                per_run=per_run,
            )
        )
    return out


def _ratio(rows: list[RowSummary], workload: str, a: str, b: str, attr: str, runs: int) -> Ratio:
    by_target = {r.target: r for r in rows if r.workload == workload}

    def value(target: str, i: int) -> float | None:
        row = by_target.get(target)
        figures = None if row is None else row.per_run[i]
        return None if figures is None else getattr(figures, attr)

    per_run = [ratio_value(value(a, i), value(b, i)) for i in range(runs)]
    return Ratio(median(per_run), per_run)


def _open_loop(results: Results) -> list[OpenLoopSummary]:
    runs = range(1, results.settings.runs + 1)
    groups: dict[str, list[OpenLoopRun]] = {}
    for entry in results.open_loop:
        groups.setdefault(entry.target, []).append(entry)
    out = []
    for target, entries in groups.items():
        by_run = {e.run: e.result for e in entries if e.result is not None}
        done = list(by_run.values())
        errors = collections.Counter[str]()
        for r in done:
            errors.update(r.errors)
        maxes = [r.max_ms for r in done if r.max_ms is not None]
        skipped = None
        if not done:
            skipped = next((e.skipped for e in entries if e.skipped), None) or "failed"

        def med(key: str, done: list[OpenLoopResult] = done) -> float | None:
            return median(getattr(r, key) for r in done)

        out.append(
            OpenLoopSummary(
                target=target,
                runs=len(done),
                scheduled=sum(r.scheduled for r in done),
                ok=sum(r.ok for r in done),
                achieved_rps=med("achieved_rps"),
                p50_ms=med("p50_ms"),
                p90_ms=med("p90_ms"),
                p99_ms=med("p99_ms"),
                p99_ms_per_run=[None if x not in by_run else by_run[x].p99_ms for x in runs],
                p999_ms=med("p999_ms"),
                max_ms=max(maxes) if maxes else None,
                errors=dict(errors),
                send_lag_p99_ms=med("send_lag_p99_ms"),
                generator_cpu_share=med("generator_cpu_share"),
                proxy_cpu_s_per_1k=med("proxy_cpu_per_1k"),
                skipped=skipped,
                per_run=[by_run.get(x) for x in runs],
            )
        )
    return out


def _ttfb(row: TtfbRow) -> TtfbSummary:
    r = row.result
    if r is None:
        return TtfbSummary(row.target, 0, 0, None, None, None, row.skipped or "failed")
    return TtfbSummary(row.target, r.n, r.bad, r.ttfb_ms, r.ttfb_max_ms, r.total_ms, None)


def _rss(results: Results) -> RssSummary | None:
    r = results.rss
    if r is None:
        return None
    tree = r.tree_after_kb or {r.pid: r.after_kb}
    return RssSummary(
        pid=r.pid,
        before_kb=r.before_kb,
        after_kb=r.after_kb,
        rss_after_kb=r.rss_after_kb,
        tree_after_kb={str(pid): kb for pid, kb in sorted(tree.items())},
        peak_kb=max(tree.values()),
        status=r.status,
        body_bytes=r.body_bytes,
        seconds=r.seconds,
        direct=results.big_direct,
    )


def summarize(results: Results) -> Summary:
    s = results.settings
    s1, sn, e1, en = target_names(s.workers)
    rows = _rows(results)
    ratios = [
        RatioRow(
            wl,
            _ratio(rows, wl, s1, e1, "rps", s.runs),
            _ratio(rows, wl, sn, en, "rps", s.runs),
            _ratio(rows, wl, s1, e1, "p99_ms", s.runs),
            _ratio(rows, wl, sn, en, "p99_ms", s.runs),
            _ratio(rows, wl, sn, GO_TARGET, "rps", s.runs),
        )
        for wl in results.workloads
    ]
    open_loop = _open_loop(results)
    ol = {o.target: o.p99_ms_per_run for o in open_loop}
    none: list[float | None] = [None] * s.runs
    ol_ratio = [ratio_value(a, b) for a, b in zip(ol.get(s1, none), ol.get(e1, none), strict=True)]
    checks: dict[str, list[Check]] = {}
    for c in results.checks:
        checks.setdefault(c.target, []).append(c)
    summary = Summary(
        settings=s,
        workloads=results.workloads,
        date=results.date,
        elapsed_s=results.elapsed_s,
        machine=results.machine,
        versions=results.versions,
        notes=results.notes,
        envoy_skip=results.envoy_skip,
        wrk2=results.wrk2,
        sigproxy_config=results.sigproxy_config,
        go_skip=results.go_skip,
        go_command=results.go_command,
        checks=[
            CheckSummary(
                t,
                sum(c.problem is None for c in cs),
                [c for c in cs if c.problem],
                next((c.sent for c in reversed(cs) if c.sent), {}),
            )
            for t, cs in checks.items()
        ],
        rows=rows,
        ratios=ratios,
        open_loop=open_loop,
        open_loop_p99_ratio=Ratio(median(ol_ratio), ol_ratio),
        ttfb=[_ttfb(t) for t in results.ttfb],
        rss=_rss(results),
        admin=results.admin,
        logs=results.logs,
        problems=results.problems,
        verdicts=[],
        json_path=results.json_path,
    )
    summary.verdicts = verdicts(summary)
    return summary


def to_json(summary: Summary) -> str:
    """The summary as JSON (NaN refused: a figure not measured is null)."""
    return json.dumps(asdict(summary), indent=1, allow_nan=False)
