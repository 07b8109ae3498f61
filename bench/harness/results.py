"""What the rounds measured, as they measured it: the input of harness.summary.

bench/harness/native.py fills a Results; nothing here computes a figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .clients import TtfbResult, WrkResult
from .load import OpenLoopResult
from .measure import LogSummary

WRK_ERROR_KINDS = ("status", "connect", "read", "write", "timeout")  # bench/wrk.lua's
DIRECT_TTFB = "direct (aiohttp)"
GO_TARGET = "go aws-sigv4-proxy"  # github.com/awslabs/aws-sigv4-proxy, built by hand
GO_NOT_GIVEN = "no --go-proxy PATH given"  # why its rows are skipped without --go-proxy


def target_names(n: int) -> tuple[str, str, str, str]:
    """sigproxy 1 worker, sigproxy N workers, Envoy concurrency 1, Envoy concurrency N."""
    return (
        "sigproxy 1 worker",
        f"sigproxy {n} workers",
        "envoy concurrency 1",
        f"envoy concurrency {n}",
    )


@dataclass
class Settings:
    """How the run was made: the command line and the fixed figures of the harness."""

    duration: int
    warmup: int
    connections: int
    wrk_threads: int
    workers: int  # N
    runs: int
    quick: bool
    ttfb_requests: int
    fixed_rate: int
    fixed_rate_body: int
    request_timeout_s: float
    stream_chunks: int
    stream_interval_ms: float
    big_bytes: int
    rss_target_bytes: int
    go_proxy: str | None = None  # --go-proxy: the aws-sigv4-proxy binary, absolute


@dataclass
class Measured:
    """One target on one workload in one round, with wrk."""

    workload: str
    target: str
    run: int  # the round, from 1
    wrk: WrkResult | None = None
    cpu: dict[int, float] | None = None  # CPU s per process of the proxy tree, measured run
    root: int | None = None  # the proxy's top process
    skipped: str | None = None

    @property
    def rps(self) -> float | None:
        if self.wrk is None or not self.wrk.duration_us:
            return None
        return self.wrk.requests / (self.wrk.duration_us / 1e6)

    @property
    def p50_ms(self) -> float | None:
        return None if self.wrk is None else self.wrk.p50_us / 1000

    @property
    def p99_ms(self) -> float | None:
        return None if self.wrk is None else self.wrk.p99_us / 1000

    @property
    def cpu_per_1k(self) -> float | None:
        """Proxy CPU seconds per 1,000 requests (None for the direct target)."""
        if self.cpu is None or self.wrk is None:
            return None
        return sum(self.cpu.values()) / max(self.wrk.requests, 1) * 1000

    @property
    def errors(self) -> dict[str, int]:
        if self.wrk is None:
            return {}
        return {k: getattr(self.wrk, "err_" + k) for k in WRK_ERROR_KINDS}

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


@dataclass
class Check:
    run: int
    target: str
    problem: str | None  # None: signed as expected
    # What the upstream saw, as it saw it: x-amz-content-sha256 ("" when not sent) and
    # the SignedHeaders of the Authorization header; body_sha256: what was sent.
    sent: dict[str, str] = field(default_factory=dict)


@dataclass
class OpenLoopRun:
    run: int
    target: str
    result: OpenLoopResult | None = None
    skipped: str | None = None


@dataclass
class TtfbRow:
    target: str
    result: TtfbResult | None = None
    skipped: str | None = None


@dataclass
class RssResult:
    pid: int
    before_kb: int
    after_kb: int
    tree_after_kb: dict[int, int]
    rss_after_kb: int
    status: int
    body_bytes: int
    seconds: float


@dataclass
class AdminRecord:
    """What sigproxy's admin port answered while one target was measured in one round."""

    run: int
    target: str
    answers: dict[str, dict[str, int]]  # path -> status (or "error") -> count
    requests_total: float | None  # sigproxy_requests_total at the last scrape
    requests_counted: int  # requests the harness counted as answered by this process


@dataclass
class Results:
    settings: Settings
    workloads: list[str]
    date: str
    machine: dict[str, str]
    versions: dict[str, str]
    notes: list[str]
    envoy_skip: str | None
    wrk2: str
    sigproxy_config: str
    go_skip: str | None = None  # why the Go aws-sigv4-proxy rows are skipped
    go_command: str = ""  # how it is started (ports as placeholders)
    elapsed_s: float = 0.0
    checks: list[Check] = field(default_factory=list)
    rows: list[Measured] = field(default_factory=list)
    open_loop: list[OpenLoopRun] = field(default_factory=list)
    ttfb: list[TtfbRow] = field(default_factory=list)
    rss: RssResult | None = None
    big_direct: tuple[int, int, float] | None = None  # status, body bytes, seconds
    admin: list[AdminRecord] = field(default_factory=list)
    logs: dict[str, LogSummary] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    json_path: str | None = None
