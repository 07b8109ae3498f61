"""The markdown report of bench/native_bench.py, rendered from a Summary alone.

Sections, in order: the run (date, machine, versions, load, configurations, signing
checks), the medians table, the per-round table, CPU per process, the sigproxy/Envoy and
sigproxy/Go aws-sigv4-proxy ratios, the fixed-offered-load table, time to first byte,
peak RSS, sigproxy's admin port, what the proxies logged, and the targets with met /
missed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .results import GO_TARGET, target_names

if TYPE_CHECKING:
    from .summary import CheckSummary, Ratio, RowSummary, Summary

ROW_HEAD = (
    "| workload | target | runs | requests | req/s | req/s range | p50 ms | p99 ms | "
    "errors | proxy CPU s / 1k req |"
)
OPEN_LOOP_HEAD = (
    "| target | runs | scheduled | ok | achieved req/s | p50 ms | p90 ms | p99 ms | "
    "p99 ms per run | p99.9 ms | max ms | errors | send lag p99 ms | "
    "generator CPU share | proxy CPU s / 1k req |"
)


def fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def with_runs(ratio: Ratio, digits: int = 3) -> str:
    """'0.432 (0.411, 0.432, 0.450)': the median, then every round's value in order."""
    if ratio.median is None:
        return "n/a"
    if len(ratio.per_run) == 1:
        return fmt(ratio.median, digits)
    return f"{fmt(ratio.median, digits)} ({', '.join(fmt(v, digits) for v in ratio.per_run)})"


def errors_cell(errors: dict[str, int]) -> str:
    """'0' or '12 (status 10, timeout 2)'."""
    parts = [f"{k} {c}" for k, c in errors.items() if c]
    return "0" if not parts else f"{sum(errors.values())} ({', '.join(parts)})"


def row_cells(row: RowSummary) -> list[str]:
    """The medians-table cells of a measured row (the test compares them with the JSON)."""
    return [
        row.workload,
        row.target,
        str(row.runs),
        str(row.requests),
        fmt(row.rps, 1),
        f"{fmt(row.rps_min, 1)}-{fmt(row.rps_max, 1)}",
        fmt(row.p50_ms),
        fmt(row.p99_ms),
        errors_cell(row.errors),
        "-" if row.cpu_s_per_1k is None else fmt(row.cpu_s_per_1k, 3),
    ]


def go_line(s: Summary) -> str:
    """How the Go aws-sigv4-proxy ran, or 'Go aws-sigv4-proxy: skipped (why)'."""
    if s.go_skip:
        return f"Go aws-sigv4-proxy: skipped ({s.go_skip})"
    return (
        f"Go aws-sigv4-proxy (rows '{GO_TARGET}'): `{s.go_command}`, credentials from the "
        "same AWS_* environment, its defaults otherwise (GOMAXPROCS = every CPU, info "
        "logging: nothing per request); POST workloads only, no open-loop row"
    )


def sent_cell(c: CheckSummary) -> str:
    """What the upstream saw: 'x-amz-content-sha256 not sent; SignedHeaders=...'."""
    if not c.sent:
        return ""
    digest = c.sent.get("x-amz-content-sha256", "")
    shown = "not sent" if digest == "" else repr(digest)
    if digest and digest == c.sent.get("body_sha256"):
        shown = f"{digest[:12]}... (the body's SHA-256)"
    signed = c.sent.get("signed_headers")
    return f"; the upstream saw x-amz-content-sha256 {shown}, SignedHeaders={signed}"


def _header(s: Summary) -> list[str]:
    st, v = s.settings, s.versions
    out = [
        "# sigproxy vs Envoy (aws_request_signing) and the Go aws-sigv4-proxy, native load "
        "generator",
        "",
        f"- date: {s.date}; total run time {s.elapsed_s:.0f} s",
        f"- machine: processor {s.machine['cpu_model']} (/proc/cpuinfo model name), "
        f"{s.machine['cpus']} cores (os.cpu_count()), {s.machine['system']}; "
        "upstream, proxy and load generator share the cores",
        f"- versions: Python {v.get('python')}, sigproxy {v.get('sigproxy')} (aiohttp "
        f"{v.get('aiohttp')}, botocore {v.get('botocore')}, uvloop {v.get('uvloop')}), envoy "
        f"{v.get('envoy', 'n/a')}, Go aws-sigv4-proxy {v.get('go aws-sigv4-proxy', 'n/a')}, "
        f"nginx {v.get('nginx')}, wrk {v.get('wrk')}",
        f"- load: wrk -t{min(st.wrk_threads, st.connections)} -c{st.connections} --timeout "
        f"{st.request_timeout_s:.0f}s, {st.warmup} s warm-up (not counted) then {st.duration} s "
        f"measured per row; upstream nginx with 1 worker; N = {st.workers}",
        f"- runs: {st.runs}; each run takes the targets in the table's order, starts each "
        "proxy afresh and measures it on every workload once (then its open-loop row, if it "
        "has one); figures are medians over the runs (with an even number of runs, the mean "
        "of the middle two), ratios the median of the ratios within each run",
        "- sigproxy: its default configuration as users deploy it (log_level info, so one "
        "access-log line per request, written to a file; admin listener on; metrics on), "
        "with /readyz probed every 5 s, /healthz every 10 s and /metrics scraped every 15 s "
        "while it serves; config: `"
        + " ".join(line.strip() for line in s.sigproxy_config.splitlines())
        + "`",
        "- Envoy: bench/envoy.yaml.tmpl, no admin listener and no access log (Envoy's own "
        "default: both must be configured), --log-level warn",
        f"- {go_line(s)}",
    ]
    out += [f"- {note}" for note in s.notes]
    if s.envoy_skip:
        out.append(f"- Envoy rows skipped: {s.envoy_skip}")
    for c in s.checks:
        line = f"{c.target}: OK in {c.ok_runs} of {st.runs} runs"
        line += "".join(f"; FAILED in run {f.run}: {f.problem}" for f in c.failed)
        line += sent_cell(c)
        out.append(f"- signing check: {line}")
    if s.json_path:
        out.append(f"- every figure below, and each round's, as JSON: {s.json_path}")
    return out


def _tables(s: Summary) -> list[str]:
    st = s.settings
    n = st.workers
    out = [
        "",
        f"Medians over {st.runs} runs; requests and errors are totals over the runs, "
        "req/s range the lowest and the highest run",
        "",
        ROW_HEAD,
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in s.rows:
        if row.skipped:
            out.append(f"| {row.workload} | {row.target} | skipped: {row.skipped} ||||||||")
        else:
            out.append(f"| {' | '.join(row_cells(row))} |")
    if st.runs > 1:
        out += [
            "",
            "Per run, in run order (each target measured once per run):",
            "",
            "| workload | target | req/s | p99 ms | proxy CPU s / 1k req |",
            "|---|---|---:|---:|---:|",
        ]
        for row in s.rows:
            if row.skipped:
                continue
            cells = row.per_run
            rps = ", ".join(fmt(None if c is None else c.rps, 1) for c in cells)
            p99 = ", ".join(fmt(None if c is None else c.p99_ms) for c in cells)
            cpu = ", ".join(fmt(None if c is None else c.cpu_s_per_1k, 3) for c in cells)
            if row.target.startswith("direct"):
                cpu = "-"
            out.append(f"| {row.workload} | {row.target} | {rps} | {p99} | {cpu} |")
    splits = [(row, c) for row in s.rows for c in row.per_run if c is not None and c.cpu_split]
    if splits:
        out += ["", "CPU seconds per process of multi-process proxies during the measured runs:"]
        out.append("")
        out += [f"- {r.target}, {r.workload}, run {c.run}: {c.cpu_split}" for r, c in splits]
    out += [
        "",
        "sigproxy / Envoy and sigproxy / Go aws-sigv4-proxy, computed within each run: the "
        "median over the runs, then each run's ratio in run order (req/s: above 1 means "
        "sigproxy is faster; p99: below 1 does)",
        "",
        f"| workload | req/s 1 worker / conc. 1 | req/s {n} workers / conc. {n} | "
        f"p99 1 worker / conc. 1 | p99 {n} workers / conc. {n} | req/s {n} workers / Go |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in s.ratios:
        ratios = [with_runs(x) for x in (r.rps_1, r.rps_n, r.p99_1, r.p99_n, r.rps_n_go)]
        out.append(f"| {r.workload} | {' | '.join(ratios)} |")
    return out


def _open_loop(s: Summary) -> list[str]:
    st = s.settings
    out = [
        "",
        f"Fixed offered load: {st.fixed_rate} req/s of {st.fixed_rate_body} B POSTs, open "
        f"loop, latency from the scheduled send time; {st.warmup} s warm-up + {st.duration} s "
        "measured, once per run; tool: python asyncio open-loop generator in "
        f"bench/harness/load.py (own process, {st.connections} keep-alive connections; wrk2 "
        f"is not in Debian: {s.wrk2}). Medians over the runs; scheduled, ok and errors are "
        "totals, max the highest run",
        "",
        OPEN_LOOP_HEAD,
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for o in s.open_loop:
        if o.skipped:
            out.append(f"| {o.target} | skipped: {o.skipped} ||||||||||||||")
            continue
        cpu = "-" if o.proxy_cpu_s_per_1k is None else fmt(o.proxy_cpu_s_per_1k, 3)
        errors = ", ".join(f"{k} {c}" for k, c in o.errors.items()) or "0"
        out.append(
            f"| {o.target} | {o.runs} | {o.scheduled} | {o.ok} | {fmt(o.achieved_rps, 1)} | "
            f"{fmt(o.p50_ms)} | {fmt(o.p90_ms)} | {fmt(o.p99_ms)} | "
            f"{', '.join(fmt(x) for x in o.p99_ms_per_run)} | {fmt(o.p999_ms)} | "
            f"{fmt(o.max_ms)} | {errors} | {fmt(o.send_lag_p99_ms)} | "
            f"{fmt(o.generator_cpu_share, 3)} | {cpu} |"
        )
    s1, _, e1, _ = target_names(st.workers)
    e1 = e1.replace("envoy", "Envoy")
    out += [
        "",
        f"Open-loop p99, {s1} / {e1}, within each run (below 1 means sigproxy is faster): "
        f"{with_runs(s.open_loop_p99_ratio)}",
    ]
    return out


def _streaming(s: Summary) -> list[str]:
    st = s.settings
    out = [
        "",
        "Time to first byte of a streamed response (aiohttp upstream in its own process: "
        f"first chunk at once, then {st.stream_chunks - 1} chunks {st.stream_interval_ms:.0f} "
        f"ms apart), median over {st.ttfb_requests} GETs on fresh connections (connect not "
        "timed), measured once after the runs",
        "",
        "| target | TTFB median ms | TTFB max ms | last byte median ms | non-200 or empty |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in s.ttfb:
        if t.skipped:
            out.append(f"| {t.target} | skipped: {t.skipped} ||||")
        else:
            out.append(
                f"| {t.target} | {fmt(t.ttfb_ms, 3)} | {fmt(t.ttfb_max_ms, 3)} | "
                f"{fmt(t.total_ms, 1)} | {t.bad} |"
            )
    out.append("")
    r = s.rss
    if r is not None:
        out.append(
            f"Peak RSS of a fresh sigproxy (1 worker, pid {r.pid}) while a "
            f"{st.big_bytes >> 20} MiB response streams through it: VmHWM before "
            f"{r.before_kb / 1024:.1f} MiB, after {r.after_kb / 1024:.1f} MiB "
            f"(+{(r.after_kb - r.before_kb) / 1024:.1f} MiB); VmRSS after "
            f"{r.rss_after_kb / 1024:.1f} MiB; status {r.status}, "
            f"{r.body_bytes} body bytes in {r.seconds:.3f} s; measured once"
        )
        if len(r.tree_after_kb) > 1:
            per = ", ".join(f"pid {p} {kb / 1024:.1f} MiB" for p, kb in r.tree_after_kb.items())
            out.append(f"(VmHWM after, per process of its tree: {per})")
        if r.direct:
            status, size, secs = r.direct
            out.append(
                f"(the same response directly from the upstream: status {status}, "
                f"{size} body bytes in {secs:.3f} s)"
            )
        out.append("")
    return out


def _admin_and_logs(s: Summary) -> list[str]:
    out = []
    if s.admin:
        out += [
            "sigproxy's admin port while each target was measured (answers by status; "
            "sigproxy_requests_total at the last scrape, against the requests the load "
            "generators counted as answered: wrk leaves out the few in flight when it stops):",
            "",
        ]
        for a in s.admin:
            answers = "; ".join(
                f"{path} " + ", ".join(f"{n}x {status}" for status, n in counts.items())
                for path, counts in a.answers.items()
            )
            total = "n/a" if a.requests_total is None else f"{a.requests_total:.0f}"
            out.append(
                f"- {a.target}, run {a.run}: {answers}; requests_total {total}, "
                f"counted {a.requests_counted}"
            )
        out.append("")
    out += ["What the proxies logged (distinct lines, count first):", ""]
    for name, logs in s.logs.items():
        what = [f"{logs.access_lines} access-log lines (not listed)"] if logs.access_lines else []
        what += [] if logs.lines else ["nothing else" if what else "nothing"]
        out.append(f"- {name}: {'; '.join(what)}" if what else f"- {name}:")
        out += [f"    {line}" for line in logs.lines]
    out += [f"- problem: {problem}" for problem in s.problems]
    return out


def _verdicts(s: Summary) -> list[str]:
    out = [
        "",
        "Targets (issue 16's; ratios are the medians of the per-run ratios "
        f"above, over {s.settings.runs} run(s)):",
        "",
    ]
    out += [f"- {v.text}: {v.status}" for v in s.verdicts]
    return out


def render(s: Summary) -> str:
    parts = [_header(s), _tables(s), _open_loop(s), _streaming(s), _admin_and_logs(s)]
    parts.append(_verdicts(s))
    return "\n".join(line for part in parts for line in part)
