"""The configuration: frozen dataclasses, ``load_config(path)`` and their validation.

Every problem is reported as one :class:`~sigproxy.errors.ConfigError` whose text names
the key path (``upstreams[1].region: ...``). Strings may use ``${VAR}`` and
``${VAR:-default}`` (``$$`` is a literal ``$``); the expansion happens after YAML parsing,
so a value from the environment can never inject YAML structure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

from .canonical import InvalidTarget, normalize_path
from .cors import CorsConfig
from .errors import ConfigError
from .hosts import is_loopback

DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024  # Function URL request payload limit
# Eight bodies of the Function URL limit: each costs about twice its size while it is
# read and sent, so the worst case stays well inside the shipped manifests' 256Mi.
DEFAULT_BODY_MEMORY_BYTES = 8 * DEFAULT_MAX_BODY_BYTES
DEFAULT_UPSTREAM_CONNECTIONS = 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
SIGNERS = ("builtin", "botocore")

AuthMode = Literal["aws_iam", "none"]

_NAME_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
_SERVICE_RE = re.compile(r"^[a-z0-9-]{1,64}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
# Hosts whose name carries the region: Function URLs and API Gateway.
_REGION_FROM_HOST = (
    re.compile(r"^[a-z0-9]+\.lambda-url\.([a-z0-9-]+)\.on\.aws$"),
    re.compile(r"^[a-z0-9]+\.execute-api\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$"),
)
_ENV_RE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True, slots=True)
class Admin:
    """The admin listener: /metrics, /healthz, /readyz."""

    host: str = "127.0.0.1"
    port: int = 9090


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    """Seconds to get a connection (TCP + TLS) to the upstream."""
    read: float = 900.0
    """Seconds the upstream may stay silent (Lambda functions run up to 15 minutes)."""
    idle: float = 15.0
    """Seconds an idle pooled connection to the upstream is kept before it is closed."""


@dataclass(frozen=True, slots=True)
class CredentialsSpec:
    """Where an upstream's AWS credentials come from. All empty = botocore's default chain."""

    profile: str | None = None
    role_arn: str | None = None
    external_id: str | None = None
    session_name: str | None = None
    duration_seconds: int | None = None

    def describe(self) -> str:
        base = f"profile {self.profile}" if self.profile else "default chain"
        if self.role_arn:
            return f"assume-role {self.role_arn} via {base}"
        return base


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    scheme: str
    host_header: str
    """The Host value sent (and signed): host name, plus the port when not the default."""
    origin: str
    """``scheme://host[:port]``: where to connect."""
    base_path: str
    """``""`` or the URL's own path without a trailing slash, e.g. ``/api``."""
    path_prefix: str
    match_host: str | None
    region: str
    service: str
    auth: AuthMode
    credentials: CredentialsSpec
    timeout: Timeouts
    max_body_bytes: int
    cors: CorsConfig | None = None
    url_host: str = ""
    """The URL's host name, lower-cased: what a forward-proxy request names."""
    max_connections: int = DEFAULT_UPSTREAM_CONNECTIONS
    """Open connections to the upstream at most (Envoy's per-cluster default)."""


@dataclass(frozen=True, slots=True)
class InboundAuth:
    """Who may use the proxy: a token in ``Authorization: Bearer <token>`` or, with
    ``header`` set, the token as that header's whole value."""

    tokens: tuple[str, ...]
    header: str = "Authorization"


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    header: float = 15.0
    """Seconds a connection may take to send a complete request head (and stay idle)."""
    body: float = 60.0
    """Seconds the request body may take to arrive."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what clients can make the process hold, before and after admission."""

    max_header_bytes: int = 64 * 1024
    """A whole request head (request line and headers); Envoy's default is 60 KiB."""
    max_client_connections: int = 1024
    """Open client connections per listener (the proxy port and the admin port each)."""
    body_memory_bytes: int = DEFAULT_BODY_MEMORY_BYTES
    """Request bodies held in memory at once, process-wide."""


DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen
    upstreams: tuple[Upstream, ...]
    log_level: str = "info"
    log_format: str = "text"
    admin: Admin | None = Admin()
    """None when the admin listener is disabled (``admin: false``)."""
    grace_period: float = 30.0
    """Seconds requests in flight may take to finish after SIGTERM."""
    inbound_auth: InboundAuth | None = None
    allow_unauthenticated: bool = False
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Empty: any client address."""
    allowed_methods: tuple[str, ...] = DEFAULT_METHODS
    client_timeouts: ClientTimeouts = ClientTimeouts()
    limits: Limits = Limits()
    allowed_hosts: tuple[str, ...] = ()
    """Host names (or ``*.suffix`` patterns, or ``*``) served besides the defaults: see
    :func:`default_hosts`."""
    allow_cross_site_navigation: bool = False
    """Let links and bookmarks on other sites open GET/HEAD pages through the proxy."""
    signer: str = "builtin"
    """``builtin`` (sigproxy's own SigV4 code) or ``botocore`` (botocore's SigV4Auth);
    both give byte-identical signatures, botocore's at about four times the CPU."""
    source: str = field(default="<config>", compare=False)


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the YAML file at ``path``."""
    return parse_config(read_text(path), source=path, environ=environ)


def parse_config(
    text: str, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> Config:
    """Validate config given as YAML text."""
    return _build_config(parse_yaml(text, environ), source)


def read_text(path: str) -> str:
    """A config file's text, or a :class:`ConfigError` saying why it can't be read."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"config file {path} is not UTF-8 text") from None


def parse_yaml(text: str, environ: Mapping[str, str] | None = None) -> Any:
    """Parse YAML (refusing duplicate keys) and expand ``${VAR}`` in its strings."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError("", f"invalid YAML: {where}{exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML: {exc}") from None
    if data is None:
        data = {}
    return _expand(data, "", os.environ if environ is None else environ)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class _Expanded(str):
    """A string produced by ``${VAR}`` expansion: numeric fields may parse it."""

    __slots__ = ()


def _expand(value: Any, path: str, environ: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        if "$" not in value:
            return value

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            got = environ.get(name)
            if got is None or (got == "" and default is not None):
                if default is None:
                    raise ConfigError(path, f"environment variable {name} is not set")
                return default
            return got

        return _Expanded(_ENV_RE.sub(sub, value))
    if isinstance(value, dict):
        return {k: _expand(v, _join(path, str(k)), environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", environ) for i, v in enumerate(value)]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Section:
    """A mapping being validated: typed getters that know their key path."""

    def __init__(self, data: Any, path: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, f"must be a mapping, got {_type_name(data)}")
        for key in data:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                known = ", ".join(allowed)
                raise ConfigError(_join(path, str(key)), f"unknown key{extra}; known keys: {known}")
        self.data: dict[str, Any] = data
        self.path = path

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ConfigError(self.at(key), f"must be a string, got {_type_name(value)}")
        return str(value)

    def integer(self, key: str, default: int | None, minimum: int, maximum: int) -> int | None:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, _Expanded) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.at(key), f"must be an integer, got {_type_name(value)}")
        if not minimum <= value <= maximum:
            raise ConfigError(self.at(key), f"must be between {minimum} and {maximum}, got {value}")
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, _Expanded):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.at(key), f"must be a number of seconds, got {_type_name(value)}")
        if not 0 < value <= 86400:
            raise ConfigError(self.at(key), f"must be more than 0 and at most 86400, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        """true/false; from ``${VAR}`` also yes/no, on/off and 1/0."""
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, _Expanded):
            word = value.strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
        if not isinstance(value, bool):
            raise ConfigError(self.at(key), f"must be true or false, got {_type_name(value)}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A list of strings, each stripped of surrounding white space."""
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(self.at(key), "must be a list of strings")
        return tuple(v.strip() for v in value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default)
        assert value is not None
        if value not in choices:
            raise ConfigError(self.at(key), f"must be one of {', '.join(choices)}, got {value!r}")
        return value


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    return {
        "dict": "a mapping",
        "list": "a list",
        "str": "a string",
        "_Expanded": "a string",
        "int": "an integer",
        "float": "a number",
    }.get(type(value).__name__, type(value).__name__)


T = TypeVar("T")


def optional_section(
    parent: Section, key: str, allowed: tuple[str, ...], build: Callable[[Section], T], default: T
) -> T:
    value = parent.data.get(key)
    if value is None:
        return default
    return build(Section(value, parent.at(key), allowed))


def _build_config(data: Any, source: str) -> Config:
    # The emulator section is validated by sigproxy.emulator.config.
    top = Section(
        data,
        "",
        (
            "listen",
            "admin",
            "upstreams",
            "log_level",
            "log_format",
            "grace_period",
            "inbound_auth",
            "allow_unauthenticated",
            "allowed_clients",
            "allowed_methods",
            "client_timeouts",
            "limits",
            "allowed_hosts",
            "allow_cross_site_navigation",
            "signer",
            "emulator",
        ),
    )
    listen = optional_section(
        top,
        "listen",
        ("host", "port"),
        lambda s: Listen(
            host=s.text("host", "127.0.0.1") or "127.0.0.1",
            port=s.integer("port", 8080, 0, 65535) or 0,
        ),
        Listen(),
    )
    log_level = top.choice("log_level", "info", LOG_LEVELS)
    log_format = top.choice("log_format", "text", LOG_FORMATS)
    grace_period = top.seconds("grace_period", 30.0)
    signer = top.choice("signer", "builtin", SIGNERS)
    admin = _build_admin(top, listen)
    raw_upstreams = top.data.get("upstreams")
    if raw_upstreams is None:
        raise ConfigError("upstreams", "is required: list at least one upstream")
    if not isinstance(raw_upstreams, list) or not raw_upstreams:
        raise ConfigError("upstreams", "must be a non-empty list of upstreams")
    upstreams: list[Upstream] = []
    names: dict[str, int] = {}
    routes: dict[tuple[str | None, str], str] = {}
    for i, raw in enumerate(raw_upstreams):
        upstream = _build_upstream(Section(raw, f"upstreams[{i}]", _UPSTREAM_KEYS))
        if upstream.name in names:
            raise ConfigError(
                f"upstreams[{i}].name",
                f"duplicate name {upstream.name!r} (also upstreams[{names[upstream.name]}])",
            )
        names[upstream.name] = i
        route = (upstream.match_host, upstream.path_prefix)
        if route in routes:
            where = f"host {route[0]} and " if route[0] else ""
            raise ConfigError(
                f"upstreams[{i}].path_prefix",
                f"{where}prefix {route[1]} are already routed to upstream {routes[route]!r}",
            )
        routes[route] = upstream.name
        upstreams.append(upstream)
    inbound_auth = optional_section(
        top, "inbound_auth", ("tokens", "tokens_file", "header"), _build_inbound_auth, None
    )
    config = Config(
        listen=listen,
        upstreams=tuple(upstreams),
        log_level=log_level,
        log_format=log_format,
        admin=admin,
        grace_period=grace_period,
        inbound_auth=inbound_auth,
        allow_unauthenticated=top.boolean("allow_unauthenticated", False),
        allowed_clients=_build_clients(top),
        allowed_methods=_build_methods(top),
        signer=signer,
        client_timeouts=optional_section(
            top,
            "client_timeouts",
            ("header", "body"),
            lambda t: ClientTimeouts(
                header=t.seconds("header", 15.0), body=t.seconds("body", 60.0)
            ),
            ClientTimeouts(),
        ),
        limits=optional_section(top, "limits", _LIMIT_KEYS, _build_limits, Limits()),
        allowed_hosts=_build_allowed_hosts(top),
        allow_cross_site_navigation=top.boolean("allow_cross_site_navigation", False),
        source=source,
    )
    check_exposure(config)
    return config


def check_exposure(config: Config) -> None:
    """Refuse a config that would let others use the proxy without a token. Run on every
    config that is about to be served: after command-line overrides, and on reload against
    the address actually listened on."""
    exposed = not is_loopback(config.listen.host)
    if exposed and config.inbound_auth is None and not config.allow_unauthenticated:
        raise ConfigError(
            "listen.host",
            f"{config.listen.host} is not a loopback address, so others could reach the "
            "proxy and call your functions with its AWS credentials: set inbound_auth "
            "(bearer tokens or a shared header secret) or, on a network you trust, "
            "allow_unauthenticated: true",
        )
    if "*" in config.allowed_hosts and config.inbound_auth is None:
        raise ConfigError(
            "allowed_hosts",
            '"*" accepts any Host header, which lets web pages on other sites reach the proxy '
            "through DNS rebinding; list the names instead, or set inbound_auth as well",
        )


def warnings(config: Config) -> list[str]:
    """What is allowed but probably not meant; ``serve`` and ``check`` say it."""
    found = []
    for upstream in config.upstreams:
        if upstream.auth == "none" and upstream.match_host is None:
            found.append(
                f"upstream {upstream.name!r} has auth: none and no host:, so what it serves "
                "shares the proxy's origin with the signed routes: a page it returns could "
                "call them as its own. Give it its own host: name unless you trust its "
                "content."
            )
    return found


def with_listen(config: Config, host: str | None, port: int | None) -> Config:
    """``config`` listening on ``host``/``port`` instead (command-line overrides), checked
    as a whole again."""
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError("--port", f"must be between 0 and 65535, got {port}")
    if host is None and port is None:
        return config
    listen = Listen(
        host=host if host is not None else config.listen.host,
        port=port if port is not None else config.listen.port,
    )
    changed = dataclasses.replace(config, listen=listen)
    try:
        check_exposure(changed)
    except ConfigError as exc:
        if host is None:
            raise
        raise ConfigError("--host", exc.message) from None
    return changed


_LIMIT_KEYS = ("max_header_bytes", "max_client_connections", "body_memory_bytes")


def _build_limits(s: Section) -> Limits:
    d = Limits()
    return Limits(
        max_header_bytes=_int(s, "max_header_bytes", d.max_header_bytes, 1024, 1 << 20),
        max_client_connections=_int(
            s, "max_client_connections", d.max_client_connections, 1, 1 << 20
        ),
        body_memory_bytes=_int(s, "body_memory_bytes", d.body_memory_bytes, 0, 1 << 40),
    )


def _int(s: Section, key: str, default: int, minimum: int, maximum: int) -> int:
    value = s.integer(key, default, minimum, maximum)
    assert value is not None
    return value


_ALLOWED_HOST_RE = re.compile(rf"^(\*|(\*\.)?{_LABEL}(\.{_LABEL})*|[0-9.]+|\[[0-9a-f:.]+\])$")


def _build_allowed_hosts(top: Section) -> tuple[str, ...]:
    hosts = []
    for i, raw in enumerate(top.strings("allowed_hosts")):
        host = raw.lower()
        if host != "*":
            host = host.removesuffix(".")  # a fully qualified name is the same name
        if ":" in host and not host.startswith("["):
            host = f"[{host}]" if _is_ipv6(host) else host
        if not _ALLOWED_HOST_RE.match(host) or (host == "*" and raw != "*"):
            raise ConfigError(
                f"allowed_hosts[{i}]",
                f"{raw!r} is not a host name (without a port), a pattern like "
                '*.example.com, or "*"',
            )
        hosts.append(host)
    return tuple(hosts)


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


_TOKEN_RE = re.compile(r"^[\x21-\x7e]{16,}$")
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _build_inbound_auth(a: Section) -> InboundAuth:
    tokens = [t for t in a.strings("tokens") if t]
    path = a.text("tokens_file")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                tokens.extend(line.strip() for line in fh if line.strip())
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(a.at("tokens_file"), f"cannot read {path}: {reason}") from None
    if not tokens:
        raise ConfigError(
            "inbound_auth", "needs at least one token (tokens: [${VAR}] or tokens_file)"
        )
    for token in tokens:
        if not _TOKEN_RE.match(token):
            # The token itself never appears in the message.
            raise ConfigError(
                "inbound_auth", "tokens must be at least 16 printable characters without spaces"
            )
    header = a.text("header", "Authorization") or "Authorization"
    if not _HEADER_NAME_RE.match(header):
        raise ConfigError(a.at("header"), f"{header!r} is not a header name")
    return InboundAuth(tokens=tuple(tokens), header=header)


def _build_clients(top: Section) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    raw = top.data.get("allowed_clients")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError("allowed_clients", "must be a non-empty list of addresses or CIDRs")
    nets = []
    for i, item in enumerate(raw):
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(
                f"allowed_clients[{i}]", f"{item!r} is not an address or CIDR"
            ) from None
    return tuple(nets)


def _build_methods(top: Section) -> tuple[str, ...]:
    raw = top.data.get("allowed_methods")
    if raw is None:
        return DEFAULT_METHODS
    if not isinstance(raw, list) or not raw or not all(isinstance(m, str) for m in raw):
        raise ConfigError("allowed_methods", "must be a non-empty list of HTTP methods")
    methods = tuple(m.upper() for m in raw)
    for i, m in enumerate(methods):
        if not re.fullmatch(r"[A-Z]{1,20}", m) or m == "CONNECT":
            raise ConfigError(f"allowed_methods[{i}]", f"{m!r} is not a method sigproxy forwards")
    return methods


def _build_admin(top: Section, listen: Listen) -> Admin | None:
    raw = top.data.get("admin")
    admin: Admin | None = Admin()
    if raw is False:
        admin = None
    elif raw is not None and raw is not True:
        s = Section(raw, "admin", ("host", "port", "enabled"))
        enabled = s.boolean("enabled", True)
        admin = Admin(
            host=s.text("host", "127.0.0.1") or "127.0.0.1",
            port=s.integer("port", 9090, 0, 65535) or 0,
        )
        if not enabled:
            admin = None
    if admin is not None and admin.port and (admin.host, admin.port) == (listen.host, listen.port):
        raise ConfigError("admin.port", f"{admin.port} is the proxy's own port (listen.port)")
    return admin


_UPSTREAM_KEYS = (
    "name",
    "url",
    "path_prefix",
    "host",
    "region",
    "service",
    "auth",
    "credentials",
    "timeout",
    "max_body_bytes",
    "max_connections",
    "cors",
)


def _build_upstream(s: Section) -> Upstream:
    name = s.text("name")
    if name is None:
        raise ConfigError(s.at("name"), "is required")
    if not _NAME_RE.match(name):
        raise ConfigError(s.at("name"), f"{name!r} must be 1-64 characters of a-z, 0-9, - and _")

    url = s.text("url")
    if url is None:
        raise ConfigError(s.at("url"), "is required")
    scheme, hostname, port, origin, host_header, base_path = _parse_url(url, s.at("url"))

    prefix_raw = s.text("path_prefix", "/") or "/"
    if not prefix_raw.startswith("/") or "?" in prefix_raw or "#" in prefix_raw:
        raise ConfigError(s.at("path_prefix"), f"{prefix_raw!r} must be a path starting with '/'")
    try:
        path_prefix = normalize_path(prefix_raw)
    except InvalidTarget as exc:
        raise ConfigError(s.at("path_prefix"), str(exc)) from None
    if path_prefix != "/":
        path_prefix = path_prefix.rstrip("/")

    match_host = s.text("host")
    if match_host is not None:
        match_host = match_host.strip().lower().rstrip(".")
        if not _HOSTNAME_RE.match(match_host):
            raise ConfigError(s.at("host"), f"{match_host!r} must be a host name without a port")

    service = s.text("service", "lambda") or "lambda"
    if not _SERVICE_RE.match(service):
        raise ConfigError(s.at("service"), f"{service!r} is not an AWS service signing name")

    url_region = _region_from_host(hostname)
    region = s.text("region")
    if region is not None:
        if not _REGION_RE.match(region):
            raise ConfigError(s.at("region"), f"{region!r} is not an AWS region name")
        if url_region is not None and url_region != region:
            raise ConfigError(
                s.at("region"), f"{region} does not match the region in the URL ({url_region})"
            )
    else:
        region = url_region
    auth = s.choice("auth", "aws_iam", ("aws_iam", "none"))
    if region is None:
        if auth == "aws_iam":
            raise ConfigError(
                s.at("region"),
                "is required: it cannot be read from the URL host "
                "(only <id>.lambda-url.<region>.on.aws and API Gateway hosts carry it)",
            )
        region = ""

    credentials = optional_section(s, "credentials", _CREDENTIAL_KEYS, _build_credentials, None)
    if credentials is not None and auth == "none":
        raise ConfigError(s.at("credentials"), "is not used when auth is none; remove it")

    timeout = optional_section(
        s,
        "timeout",
        ("connect", "read", "idle"),
        lambda t: Timeouts(
            connect=t.seconds("connect", 5.0),
            read=t.seconds("read", 900.0),
            idle=t.seconds("idle", 15.0),
        ),
        Timeouts(),
    )
    max_body = s.integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES, 0, 1 << 40)
    assert max_body is not None
    cors = optional_section(s, "cors", CORS_KEYS, _build_cors, None)
    del port
    return Upstream(
        name=name,
        url=url,
        scheme=scheme,
        host_header=host_header,
        origin=origin,
        base_path=base_path,
        path_prefix=path_prefix,
        match_host=match_host,
        region=region,
        service=service,
        auth=auth,  # type: ignore[arg-type]
        credentials=credentials or CredentialsSpec(),
        timeout=timeout,
        max_body_bytes=max_body,
        cors=cors,
        url_host=hostname,
        max_connections=_int(s, "max_connections", DEFAULT_UPSTREAM_CONNECTIONS, 1, 1 << 16),
    )


CORS_KEYS = (
    "allow_origins",
    "allow_methods",
    "allow_headers",
    "expose_headers",
    "allow_credentials",
    "max_age",
)
_ORIGIN_RE = re.compile(r"^https?://([a-z0-9*-]+(\.[a-z0-9*-]+)*|\[[0-9a-f:.]+\])(:(\d{1,5}|\*))?$")


def _build_cors(c: Section) -> CorsConfig:
    strings = c.strings
    origins = strings("allow_origins")
    if not origins:
        raise ConfigError(c.at("allow_origins"), 'list the origins allowed (or "*")')
    for i, origin in enumerate(origins):
        if origin != "*" and not _ORIGIN_RE.match(origin.lower()):
            raise ConfigError(
                f"{c.at('allow_origins')}[{i}]",
                f"{origin!r} is not an origin like https://app.example.com or http://localhost:*",
            )
    credentials = c.boolean("allow_credentials", False)
    if credentials and "*" in origins:
        raise ConfigError(
            c.at("allow_origins"),
            '"*" cannot be combined with allow_credentials (the Fetch standard forbids it); '
            "list the origins",
        )
    methods = tuple(m.upper() for m in strings("allow_methods", ("GET", "HEAD", "POST")))
    return CorsConfig(
        allow_origins=origins,
        allow_methods=methods,
        allow_headers=tuple(h.lower() for h in strings("allow_headers")),
        expose_headers=strings("expose_headers", ("X-Request-Id",)),
        allow_credentials=credentials,
        max_age=c.integer("max_age", 600, 0, 86400) or 0,
    )


_CREDENTIAL_KEYS = ("profile", "role_arn", "external_id", "session_name", "duration_seconds")
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")


def _build_credentials(c: Section) -> CredentialsSpec:
    role_arn = c.text("role_arn")
    if role_arn is not None and not _ROLE_ARN_RE.match(role_arn):
        raise ConfigError(
            c.at("role_arn"),
            f"{role_arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)",
        )
    spec = CredentialsSpec(
        profile=c.text("profile"),
        role_arn=role_arn,
        external_id=c.text("external_id"),
        session_name=c.text("session_name"),
        duration_seconds=c.integer("duration_seconds", None, 900, 43200),
    )
    if role_arn is None:
        for key in ("external_id", "session_name", "duration_seconds"):
            if c.data.get(key) is not None:
                raise ConfigError(c.at(key), "only applies together with role_arn")
    if spec.session_name is not None and not re.fullmatch(r"[\w+=,.@-]{2,64}", spec.session_name):
        raise ConfigError(
            c.at("session_name"), "must be 2-64 characters of letters, digits and +=,.@_-"
        )
    return spec


def _parse_url(url: str, path: str) -> tuple[str, str, int | None, str, str, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(path, f"{url!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    hostname = (parts.hostname or "").lower()
    if scheme not in ("https", "http") or not hostname:
        raise ConfigError(path, f"{url!r} must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(path, "must not contain a user name or password")
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        raise ConfigError(path, "must not have a query string or fragment")
    if scheme == "http" and not is_loopback(hostname):
        raise ConfigError(
            path,
            f"plain http:// is only allowed for loopback hosts (127.0.0.0/8, ::1, localhost); "
            f"use https://{parts.netloc}",
        )
    netloc_host = f"[{hostname}]" if ":" in hostname else hostname
    default_port = 443 if scheme == "https" else 80
    host_header = netloc_host if port in (None, default_port) else f"{netloc_host}:{port}"
    origin = f"{scheme}://{host_header}"
    try:
        base_path = normalize_path(parts.path or "/")
    except InvalidTarget as exc:
        raise ConfigError(path, str(exc)) from None
    base_path = base_path.rstrip("/")
    return scheme, hostname, port, origin, host_header, base_path


def _region_from_host(hostname: str) -> str | None:
    for pattern in _REGION_FROM_HOST:
        m = pattern.match(hostname)
        if m:
            return m.group(1)
    return None
