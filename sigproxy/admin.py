"""The admin listener, apart from the proxy port: /metrics, /healthz, /readyz."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .metrics import Metrics
from .proxy import Proxy, RouteTable

# /readyz wants credentials that stay valid at least this long.
MIN_CREDENTIAL_SECONDS = 60.0


@dataclass
class ServerState:
    """What the process is doing, for /readyz."""

    listening: bool = False
    stopping: bool = False


def readiness(state: ServerState, table: RouteTable, now: float | None = None) -> list[str]:
    """Why the proxy is not ready (an empty list when it is)."""
    reasons: list[str] = []
    if state.stopping:
        reasons.append("shutting down")
    if not state.listening:
        reasons.append("not listening yet")
    now = time.time() if now is None else now
    for name, source in table.credentials.items():
        if source.expiry is not None and source.expiry - now < MIN_CREDENTIAL_SECONDS:
            left = max(0, int(source.expiry - now))
            why = f": {source.last_error}" if source.last_error else ""
            reasons.append(f"upstream {name}: credentials expire in {left}s{why}")
    return reasons


def create_admin_app(proxy: Proxy, metrics: Metrics, state: ServerState) -> web.Application:
    async def metrics_handler(request: web.Request) -> web.Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several workers: add up every worker's values, as one scrape target.
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(CredentialCollector(lambda: proxy.table))
            body = generate_latest(registry)
        else:
            body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        # Answering at all shows the event loop is turning.
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reasons = readiness(state, proxy.table)
        if reasons:
            return web.Response(
                status=503,
                body=json.dumps({"status": "not ready", "reasons": reasons}).encode(),
                content_type="application/json",
            )
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class CredentialCollector(Collector):
    """Credential refreshes by result and seconds until expiry, per upstream, read from
    the current route table at scrape time."""

    def __init__(self, table: Callable[[], RouteTable]) -> None:
        self._table = table

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        refreshes = CounterMetricFamily(
            "sigproxy_credential_refreshes",
            "Background credential refreshes, by upstream and result.",
            labels=["upstream", "result"],
        )
        expiry = GaugeMetricFamily(
            "sigproxy_credentials_expiry_seconds",
            "Seconds until the upstream's credentials expire (absent when they don't).",
            labels=["upstream"],
        )
        now = time.time()
        for name, source in self._table().credentials.items():
            for result, count in source.refreshes.items():
                refreshes.add_metric([name, result], count)
            if source.expiry is not None:
                expiry.add_metric([name], source.expiry - now)
        yield refreshes
        yield expiry
