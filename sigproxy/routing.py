"""The compiled upstream table: which upstream serves a (Host, path) pair.

Routes that name a ``host`` are tried before routes that don't; within each group the
longest ``path_prefix`` wins, and a prefix matches only on a segment boundary
(``/orders`` matches ``/orders`` and ``/orders/x``, never ``/ordersx``). Paths given to
:meth:`Router.match` are already normalised (see :mod:`sigproxy.canonical`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .config import Upstream
from .hosts import hostname


@dataclass(frozen=True, slots=True)
class Match:
    upstream: Upstream
    path: str
    """The path to send upstream: base path + what is left after the prefix."""


class Router:
    """Longest-prefix router over a fixed list of upstreams."""

    def __init__(self, upstreams: Iterable[Upstream]) -> None:
        ordered = sorted(
            upstreams,
            key=lambda u: (u.match_host is None, -len(u.path_prefix)),
        )
        self._routes = tuple(ordered)
        self.prefixes = tuple(sorted({(u.match_host or "") + u.path_prefix for u in self._routes}))

    def match(self, host: str | None, path: str) -> Match | None:
        """Pick the upstream for a request, or ``None``."""
        name = hostname(host) if host else None
        for upstream in self._routes:
            if upstream.match_host is not None and upstream.match_host != name:
                continue
            prefix = upstream.path_prefix
            if prefix == "/":
                return Match(upstream, _join(upstream.base_path, path))
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return Match(upstream, _join(upstream.base_path, path[len(prefix) :]))
        return None


def _join(base_path: str, remainder: str) -> str:
    # base_path is "" or "/api"; remainder is "" or starts with "/".
    return base_path + remainder or "/"
