"""The compiled upstream table and which upstream a request goes to.

A request names its upstream one of two ways:

* origin form (``GET /orders/42``, reverse proxy): routes that name a ``host`` are tried
  before routes that don't; within each group the longest ``path_prefix`` wins, and a
  prefix matches only on a segment boundary (``/orders`` matches ``/orders`` and
  ``/orders/x``, never ``/ordersx``); the prefix is replaced by the URL's base path;
* absolute form (``GET http://<function url host>/x``, sigproxy as an HTTP proxy): the
  upstream whose URL has that host (and the longest base path the path is under).

Everything that can be decided when the config is loaded (compiled routes, origins,
signers, CORS policies, the host allow-lists) is decided in :class:`RouteTable`, once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .canonical import InvalidTarget, normalize_path, normalize_query, split_target
from .config import Config, Upstream
from .cors import CorsPolicy
from .egress import EgressProxy
from .errors import BadRequest, Forbidden, NoRoute
from .hosts import HostAllowList, hostname, is_loopback
from .signing import BaseSigner, Clock, SigningKeys, signer_class

if TYPE_CHECKING:
    from .credentials import CredentialSource, CredentialStore


@dataclass(frozen=True, slots=True)
class Match:
    upstream: Upstream
    path: str
    """The path to send upstream: base path + what is left after the prefix."""


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the upstream, and the canonical path and query to send
    (and sign). ``incoming`` is the client's path, normalised, for the access log."""

    target: Target
    path: str
    query: str
    incoming: str

    @property
    def outgoing(self) -> str:
        return self.path + ("?" + self.query if self.query else "")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream's connections go, and how many may be open (in use and idle) and
    for how long an idle one is kept. Each distinct Origin has its own pool.

    ``host`` and ``port`` are the URL's: the Host header, TLS SNI and certificate check.
    ``connect_to`` is the address dialled instead (``None``: the URL's), and ``proxy``
    the HTTP proxy whose CONNECT tunnel the connections go through (``None``: direct)."""

    scheme: str
    host: str
    port: int
    name: str = ""
    max_connections: int = 1024
    idle_timeout: float = 15.0
    connect_to: tuple[str, int] | None = None
    proxy: EgressProxy | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@dataclass(frozen=True, slots=True)
class Target:
    """What is known about an upstream when the config is loaded."""

    upstream: Upstream
    credentials: CredentialSource | None
    signer: BaseSigner
    origin: Origin
    cors: CorsPolicy | None


class Router:
    """Longest-prefix router over a fixed list of upstreams (origin form)."""

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


class RouteTable:
    """Everything requests need from one config, built once and never changed: a reload
    swaps in a whole new table, and a request keeps the table it started with."""

    def __init__(self, config: Config, credentials: CredentialStore) -> None:
        self.config = config
        self.credentials = credentials
        self.router = Router(config.upstreams)
        self.hosts = HostAllowList.for_config(config)
        self.admin_hosts = HostAllowList.for_config(config, any_ip=True)
        self.keys = SigningKeys()
        self.targets: dict[str, Target] = {}
        self._by_host: dict[str, list[Upstream]] = {}
        make_signer = signer_class(config.signer)
        for upstream in config.upstreams:
            source = credentials.get(upstream.name)
            if upstream.auth == "aws_iam" and source is None:
                raise ValueError(f"no credential source for aws_iam upstream {upstream.name!r}")
            self.targets[upstream.name] = Target(
                upstream=upstream,
                credentials=source,
                signer=make_signer(
                    upstream.host_header,
                    upstream.region,
                    upstream.service,
                    keys=self.keys,
                    # Each upstream's own: its clock skew is learnt from its answers.
                    clock=Clock(),
                ),
                origin=origin_of(upstream),
                cors=CorsPolicy(upstream.cors) if upstream.cors is not None else None,
            )
            # Forward-proxy requests name the Function URL's own host.
            self._by_host.setdefault(upstream.url_host, []).append(upstream)
        for same_host in self._by_host.values():
            same_host.sort(key=lambda u: -len(u.base_path))

    def resolve(self, raw_target: str, host: str | None) -> Route:
        """The route for a request target as it arrived and its Host header, or the
        :class:`~sigproxy.errors.ProxyError` that says why there is none."""
        if raw_target.startswith("/"):
            path, query = _canonical(raw_target)
            match = self.router.match(host, path)
            if match is None:
                raise self._no_route(path)
            return self._route(match, query, path)
        if raw_target == "*":
            raise BadRequest("asterisk-form requests (OPTIONS *) are not forwarded")
        scheme, sep, rest = raw_target.partition("://")
        if not sep or scheme.lower() != "http":
            raise BadRequest(
                "the request target must be a path, or an http:// URL when sigproxy is used "
                "as an HTTP proxy"
            )
        authority, slash, remainder = rest.partition("/")
        name = hostname(authority)
        path, query = _canonical("/" + remainder if slash else "/")
        for upstream in self._by_host.get(name, ()):
            base = upstream.base_path
            if not base or path == base or path.startswith(base + "/"):
                return self._route(Match(upstream, path), query, path)
        if is_loopback(name):
            # An absolute-form request for the proxy itself: route it as a path.
            match = self.router.match(host, path)
            if match is None:
                raise self._no_route(path)
            return self._route(match, query, path)
        raise Forbidden(
            "sigproxy only forwards to the hosts of its upstream table; this host is not one",
            code="host_not_allowed",
        )

    def _route(self, match: Match, query: str, incoming: str) -> Route:
        return Route(self.targets[match.upstream.name], match.path, query, incoming)

    def _no_route(self, path: str) -> NoRoute:
        return NoRoute(
            "no upstream is configured for this path",
            path=path,
            prefixes=list(self.router.prefixes),
        )


def _canonical(raw_target: str) -> tuple[str, str]:
    """The path and query to route, sign and send (see :mod:`sigproxy.canonical`)."""
    raw_path, raw_query = split_target(raw_target)
    try:
        return normalize_path(raw_path), normalize_query(raw_query)
    except InvalidTarget as exc:
        raise BadRequest(str(exc)) from None


def origin_of(upstream: Upstream) -> Origin:
    """Where ``upstream``'s connections go (its address, ``connect_to`` and egress proxy
    as resolved at load), with its pool's limits."""
    url = urlsplit(upstream.origin)
    assert url.hostname is not None
    return Origin(
        upstream.scheme,
        url.hostname,
        url.port or (443 if upstream.scheme == "https" else 80),
        name=upstream.name,
        max_connections=upstream.max_connections,
        idle_timeout=upstream.timeout.idle,
        connect_to=upstream.connect_to,
        proxy=upstream.egress,
    )
