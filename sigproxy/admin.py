"""The admin listener, apart from the proxy port: /metrics, /healthz, /readyz."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .hosts import hostname
from .http1 import Handler, Request
from .metrics import Metrics
from .proxy import Proxy
from .routing import RouteTable

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
        if source.pending:
            why = source.last_error or "none found yet"
            reasons.append(
                f"upstream {name}: no AWS credentials yet ({source.description}): {why}; "
                f"{source.next_step}"
            )
        elif source.expiry is not None and source.expiry - now < MIN_CREDENTIAL_SECONDS:
            left = max(0, int(source.expiry - now))
            why = f": {source.last_error}" if source.last_error else ""
            reasons.append(f"upstream {name}: credentials expire in {left}s{why}")
    return reasons


def admin_handler(proxy: Proxy, metrics: Metrics, state: ServerState) -> Handler:
    """The admin listener's one handler: ``GET``/``HEAD`` of /metrics, /healthz, /readyz.
    Host names are checked as on the proxy port, and any IP address is accepted too
    (probes and Prometheus address a pod by its IP)."""

    async def handle(request: Request) -> None:
        host = request.headers.get("Host")
        if host is not None and not proxy.table.admin_hosts.allows(hostname(host)):
            await _json(request, 421, {"error": "host_not_allowed", "message": "unknown host name"})
        elif request.method not in ("GET", "HEAD"):
            await _json(request, 405, {"error": "method_not_allowed", "message": "GET only"})
        elif (path := request.raw_path.partition("?")[0]) == "/metrics":
            body = metrics.exposition()
            await request.respond(200, [("Content-Type", CONTENT_TYPE_LATEST)], body)
        elif path == "/healthz":
            # Answering at all shows the event loop is turning.
            await _json(request, 200, {"status": "ok"})
        elif path == "/readyz":
            reasons = readiness(state, proxy.table)
            if reasons:
                await _json(request, 503, {"status": "not ready", "reasons": reasons})
            else:
                await _json(request, 200, {"status": "ready"})
        else:
            message = "try /metrics, /healthz or /readyz"
            await _json(request, 404, {"error": "not_found", "message": message})

    return handle


async def _json(request: Request, status: int, body: dict[str, object]) -> None:
    headers = [("Content-Type", "application/json")]
    await request.respond(status, headers, json.dumps(body).encode())


class CredentialCollector(Collector):
    """Credential refreshes by result, seconds until expiry and the clock skew measured,
    per upstream, read from the current route table at scrape time."""

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
        skew = GaugeMetricFamily(
            "sigproxy_clock_skew_seconds",
            "Seconds the upstream's clock is ahead of this machine's (from its Date headers "
            "and refusals); beyond 60 s sigproxy signs with the corrected time.",
            labels=["upstream"],
        )
        now = time.time()
        table = self._table()
        for name, source in table.credentials.items():
            for result, count in source.refreshes.items():
                refreshes.add_metric([name, result], count)
            if source.expiry is not None:
                expiry.add_metric([name], source.expiry - now)
        for name, target in table.targets.items():
            measured = target.signer.clock.skew
            if target.credentials is not None and measured is not None:
                skew.add_metric([name], measured)
        yield refreshes
        yield expiry
        yield skew
