"""Every Prometheus collector sigproxy has, registered on a registry the app owns.

Labels are bounded: upstream names come from the config, methods from a fixed set,
statuses are codes; never paths, hosts or ids.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from . import __version__

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NO_UPSTREAM = "none"
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0,
)  # fmt: skip


def method_label(method: str) -> str:
    """A bounded label value for an HTTP method."""
    return method if method in _METHODS else "other"


class Metrics:
    """The collectors, created on ``registry`` (a fresh one per app by default), and what
    /metrics shows of them: this process's values, or with ``multiprocess_dir`` (a worker
    of ``serve --workers``) every worker's values added up."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._scrape = CollectorRegistry(auto_describe=False)
        if multiprocess_dir is None:
            self._scrape.register(_WithoutCreated(self.registry))
            self._live = self.registry
        else:
            summed = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(summed, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            self._scrape.register(_WithoutCreated(summed))
            # Collectors read at scrape time (not counted into the shared files) are
            # this process's own: shown as they are.
            self._live = self._scrape
        r = self.registry
        self.requests = Counter(
            "sigproxy_requests",
            "Requests answered, by upstream, method and status code.",
            ["upstream", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "sigproxy_request_duration_seconds",
            "Time from request received to response finished.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "sigproxy_upstream_duration_seconds",
            "Time from sending upstream to the response headers arriving.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # With several workers, in-flight requests of live workers add up.
        self.in_flight = Gauge(
            "sigproxy_requests_in_flight",
            "Requests being handled.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.request_bytes = Counter(
            "sigproxy_request_bytes", "Request body bytes sent upstream.", ["upstream"], registry=r
        )
        self.response_bytes = Counter(
            "sigproxy_response_bytes",
            "Response body bytes sent to clients.",
            ["upstream"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "sigproxy_upstream_errors",
            "Failed upstream exchanges by kind "
            "(connect, tls, proxy, timeout, protocol, closed, busy).",
            ["upstream", "kind"],
            registry=r,
        )
        self.proxy_errors = Counter(
            "sigproxy_proxy_errors",
            "Error responses sigproxy produced itself, by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_auth_failures = Counter(
            "sigproxy_upstream_auth_failures",
            "Upstream refusals of a request sigproxy sent (401/403 with an x-amzn-ErrorType), "
            "by upstream and diagnosis (invalid-signature, signature-expired, "
            "unrecognized-client, expired-token, access-denied, not-signed).",
            ["upstream", "reason"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "sigproxy_upstream_retries",
            "Upstream attempts after the first, by upstream and reason (connect, tls, proxy, "
            "timeout, 429, 502, 503, 504, credentials, clock).",
            ["upstream", "reason"],
            registry=r,
        )
        self.signing_duration = Histogram(
            "sigproxy_signing_duration_seconds",
            "Time spent computing SigV4 signatures.",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
            registry=r,
        )
        self.config_reloads = Counter(
            "sigproxy_config_reloads",
            "Config reloads (SIGHUP), by result.",
            ["result"],
            registry=r,
        )
        # A gauge rather than an Info: Info has no multiprocess (several workers) mode.
        self.build = Gauge(
            "sigproxy_build_info",
            "sigproxy version and runtime.",
            ["version", "python"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build.labels(__version__, platform.python_version()).set(1)
        # Labelled children looked up once per label set: labels() takes a lock and
        # validates on every call, which the hot path need not pay.
        self._per_request: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._per_upstream_bytes: dict[str, tuple[Any, Any]] = {}

    def add_collector(self, collector: Collector) -> None:
        """A collector read at scrape time (credential expiry, for one)."""
        self._live.register(collector)

    def exposition(self) -> bytes:
        """The text /metrics answers."""
        return generate_latest(self._scrape)

    def request_done(
        self,
        upstream: str,
        method: str,
        status: int,
        elapsed: float,
        upstream_time: float | None,
    ) -> None:
        """Count one finished request and observe its durations."""
        key = (upstream, method, status)
        children = self._per_request.get(key)
        if children is None:
            children = (
                self.requests.labels(upstream, method_label(method), str(status)),
                self.request_duration.labels(upstream),
                self.upstream_duration.labels(upstream),
            )
            if len(self._per_request) < 10_000:  # methods are free text: stay bounded
                self._per_request[key] = children
        children[0].inc()
        children[1].observe(elapsed)
        if upstream_time is not None:
            children[2].observe(upstream_time)

    def bytes_done(self, upstream: str, bytes_in: int, bytes_out: int) -> None:
        children = self._per_upstream_bytes.get(upstream)
        if children is None:
            children = (self.request_bytes.labels(upstream), self.response_bytes.labels(upstream))
            self._per_upstream_bytes[upstream] = children
        if bytes_in:
            children[0].inc(bytes_in)
        if bytes_out:
            children[1].inc(bytes_out)


class _WithoutCreated(Collector):
    """``registry``'s metrics without the ``_created`` series prometheus-client adds to
    every counter and histogram child: half the series to scrape, and nothing a
    dashboard uses. (prometheus-client's own switch for this is process-wide.)"""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
