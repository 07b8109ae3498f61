"""The configuration: frozen dataclasses that declare their own keys, and ``load_config``.

Each field of a section's dataclass is its key: default and coercer, written once
(:func:`key`); the keys allowed, the defaults and the type checks come from there. What
ties keys together is a short list of rules per section (:func:`_upstream`, ...). Every
problem is one :class:`ConfigError` naming the key path (``upstreams[1].region: ...``).

Strings may use ``${VAR}`` and ``${VAR:-default}`` (``$$`` is a literal ``$``); the
expansion happens after YAML parsing, so a value from the environment can never inject
YAML structure. Every coercer reads an expanded string as its own type: ``${PORT}`` as an
integer, ``${OPEN}`` as true or false (also yes/no, on/off, 1/0). A key left out, null or
empty takes its default.
"""

# ruff: noqa: RUF009 - key() returns a dataclasses.field(), not a shared default value

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import yaml

from . import egress
from .canonical import InvalidTarget, normalize_path
from .cors import CorsConfig
from .egress import EgressProxy
from .errors import ConfigError
from .hosts import is_loopback

DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024  # Function URL request payload limit
# Five bodies of the Function URL limit at once. Each costs about twice its size while
# it is read and sent (bench/flood_bench.py), so with the connection cap the worst case
# stays inside the shipped manifests' 256Mi.
DEFAULT_BODY_MEMORY_BYTES = 32 * 1024 * 1024
DEFAULT_UPSTREAM_CONNECTIONS = 1024
DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
SIGNERS = ("builtin", "botocore")

AuthMode = Literal["aws_iam", "none"]
AUTH_MODES: tuple[AuthMode, ...] = ("aws_iam", "none")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
S = TypeVar("S", bound=str)

# --- coercers: one per type ------------------------------------------------------------


class Coercer(Protocol[T_co]):
    """Reads a value that is present at ``path`` as its type, or raises ConfigError."""

    def __call__(self, value: Any, path: str, /) -> T_co: ...


class _Expanded(str):
    """A string produced by ``${VAR}`` expansion: coercers read it as their type."""

    __slots__ = ()


@dataclass(frozen=True)
class Text:
    """A string, stripped and ``normalize``-d; with a ``pattern``, it must match it
    (``error`` formats the value into the message)."""

    pattern: re.Pattern[str] | None = None
    error: str = ""
    normalize: Callable[[str], str] | None = None

    def __call__(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {_type_name(value)}")
        word = str(value).strip()
        if self.normalize is not None:
            word = self.normalize(word)
        if self.pattern is not None and not self.pattern.fullmatch(word):
            raise ConfigError(path, self.error.format(word))
        return word


text = Text()


@dataclass(frozen=True)
class Int:
    """An integer from ``minimum`` to ``maximum``."""

    minimum: int
    maximum: int

    def __call__(self, value: Any, path: str) -> int:
        if isinstance(value, _Expanded) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, got {_type_name(value)}")
        if not self.minimum <= value <= self.maximum:
            raise ConfigError(
                path, f"must be between {self.minimum} and {self.maximum}, got {value}"
            )
        return value


@dataclass(frozen=True)
class Seconds:
    """A number of seconds from ``minimum`` (excluded when ``above``) to ``maximum``."""

    minimum: float
    maximum: float
    above: bool = False

    def __call__(self, value: Any, path: str) -> float:
        if isinstance(value, _Expanded):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"must be a number of seconds, got {_type_name(value)}")
        low = value > self.minimum if self.above else value >= self.minimum
        if not low or value > self.maximum:
            bound = "more than" if self.above else "at least"
            raise ConfigError(
                path, f"must be {bound} {self.minimum:g} and at most {self.maximum:g}, got {value}"
            )
        return float(value)


seconds = Seconds(0, 86400, above=True)
"""A timeout: more than 0 seconds, at most a day."""


_WORDS = {"true": True, "yes": True, "on": True, "1": True}
_WORDS |= {"false": False, "no": False, "off": False, "0": False}


def _truth(value: Any) -> bool | None:
    """A YAML boolean, or from ``${VAR}`` also yes/no, on/off, 1/0; None for anything else."""
    if isinstance(value, _Expanded):
        return _WORDS.get(value.strip().lower())
    return value if isinstance(value, bool) else None


def boolean(value: Any, path: str) -> bool:
    """true or false."""
    on = _truth(value)
    if on is None:
        raise ConfigError(path, f"must be true or false, got {_type_name(value)}")
    return on


@dataclass(frozen=True)
class Choice(Generic[S]):
    """One of ``options``."""

    options: tuple[S, ...]

    def __call__(self, value: Any, path: str) -> S:
        word = text(value, path)
        for option in self.options:
            if word == option:
                return option
        raise ConfigError(path, f"must be one of {', '.join(self.options)}, got {word!r}")


@dataclass(frozen=True)
class ListOf(Generic[T]):
    """A list whose items ``item`` reads (at ``key[i]``), as a tuple."""

    item: Coercer[T]
    what: str = "strings"
    nonempty: bool = False

    def __call__(self, value: Any, path: str) -> tuple[T, ...]:
        if not isinstance(value, list) or (self.nonempty and not value):
            some = "non-empty " if self.nonempty else ""
            raise ConfigError(path, f"must be a {some}list of {self.what}")
        return tuple(self.item(v, f"{path}[{i}]") for i, v in enumerate(value))


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    return {"dict": "a mapping", "list": "a list", "int": "an integer", "float": "a number"}.get(
        type(value).__name__, type(value).__name__
    )


# --- sections: a dataclass's keys, read from a mapping ---------------------------------


@dataclass(frozen=True)
class Key:
    """One config key: the coercer that reads it and its default (MISSING: it must be
    given, except that a section left out reads as an empty one)."""

    coerce: Coercer[Any]
    default: Any = field(default_factory=lambda: MISSING)  # "= MISSING" is no default
    yaml: str = ""
    """The key's name when it is not the field's (``host`` fills ``match_host``)."""
    required: str = "is required"


def key(default: T, coerce: Coercer[T], yaml: str = "", *, secret: bool = False) -> T:
    """A dataclass field that is also a config key: its default and its coercer; a
    ``secret`` one is left out of the dataclass's repr."""
    return field(default=default, metadata={"key": Key(coerce, yaml=yaml)}, repr=not secret)


def spec(coerce: Coercer[Any], required: str = "is required") -> dict[str, Key]:
    """``field(metadata=...)`` for a key whose field has no default."""
    return {"key": Key(coerce, required=required)}


@dataclass(frozen=True)
class Section:
    """A mapping read by a :class:`Schema`: values by field name, ``extra`` keys (those
    that are not fields) by key, and which keys were given."""

    path: str
    given: frozenset[str]
    values: dict[str, Any]
    extra: dict[str, Any]

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def build(self, cls: Callable[..., T], **changes: Any) -> T:
        """``cls`` made from the values read, with ``changes``."""
        return cls(**{**self.values, **changes})


class Schema(Generic[T]):
    """A section's keys and ``build``, its rules, which make a T of what was read. The
    keys are ``cls``'s fields that carry a :class:`Key` (in their metadata, or in ``keys``
    for a class another module owns), then ``extra`` keys that fill no field."""

    def __init__(
        self,
        cls: type[Any],
        build: Callable[[Section], T],
        keys: Mapping[str, Key] | None = None,
        extra: Mapping[str, Key] | None = None,
    ) -> None:
        self.cls, self.build = cls, build
        self.keys: dict[str, tuple[str | None, Key]] = {}
        for f in dataclasses.fields(cls):
            k = f.metadata.get("key") or (keys or {}).get(f.name)
            if k is not None:
                default = f.default if k.default is MISSING else k.default
                self.keys[k.yaml or f.name] = (f.name, dataclasses.replace(k, default=default))
        self.keys.update((name, (None, k)) for name, k in (extra or {}).items())

    def __call__(self, value: Any, path: str) -> T:
        return self.build(self.read(value, path))

    def read(self, data: Any, path: str) -> Section:
        if not isinstance(data, dict):
            raise ConfigError(path, f"must be a mapping, got {_type_name(data)}")
        for name in data:
            if name not in self.keys:
                hint = difflib.get_close_matches(str(name), list(self.keys), n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                known = ", ".join(self.keys)
                raise ConfigError(
                    _join(path, str(name)), f"unknown key{extra}; known keys: {known}"
                )
        given = frozenset(name for name, value in data.items() if value not in (None, ""))
        section = Section(path, given, {}, {})
        for name, (attr, k) in self.keys.items():
            at = _join(path, name)
            if name in given:
                value = k.coerce(data[name], at)
            elif k.default is not MISSING:
                value = k.default
            elif isinstance(k.coerce, Schema):
                value = k.coerce({}, at)
            else:
                raise ConfigError(at, k.required)
            if attr is None:
                section.extra[name] = value
            else:
                section.values[attr] = value
        return section


def section(cls: type[T], keys: Mapping[str, Key] | None = None) -> Schema[T]:
    """The schema of a section without rules: ``cls`` made of its keys' values."""
    return Schema(cls, lambda s: s.build(cls), keys)


@dataclass(frozen=True)
class OrNone(Generic[T]):
    """An optional section: a mapping, true (every default) or false (None)."""

    schema: Coercer[T]

    def __call__(self, value: Any, path: str) -> T | None:
        if isinstance(value, dict):
            return self.schema(value, path)
        on = _truth(value)
        if on is None:
            raise ConfigError(path, f"must be a mapping, true or false, got {_type_name(value)}")
        return self.schema({}, path) if on else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- the sections, each with its rules -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenTls:
    """TLS on the proxy listener: PEM files, checked when the config is loaded and read
    again on SIGHUP (see :mod:`sigproxy.tls`). ``load_config`` makes relative paths
    relative to the config file."""

    cert: str = field(metadata=spec(text))
    """The certificate, then any intermediates."""
    key: str = field(metadata=spec(text))
    # Not key(...): the field above shadows that name in this class body.
    client_ca: str | None = field(default=None, metadata=spec(text))
    """CA certificates: set, every client must present a certificate one of them issued."""


def _listen_tls(s: Section) -> ListenTls:
    """The files must make a server context: a file missing, unreadable or not matching
    is one error naming its key, at load rather than at the first handshake."""
    from .tls import server_context  # here: sigproxy.tls imports this module's types

    tls = s.build(ListenTls)
    server_context(tls, s.path)
    return tls


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = key("127.0.0.1", text)
    port: int = key(8080, Int(0, 65535))
    tls: ListenTls | None = key(None, Schema(ListenTls, _listen_tls))
    """None: plain HTTP."""

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    @property
    def client_certificates(self) -> bool:
        """Whether every client must present a certificate (``tls.client_ca``)."""
        return self.tls is not None and self.tls.client_ca is not None


@dataclass(frozen=True, slots=True)
class Admin:
    """The admin listener: /metrics, /healthz, /readyz."""

    host: str = key("127.0.0.1", text)
    port: int = key(9090, Int(0, 65535))


def _admin(s: Section) -> Admin | None:
    """``enabled: false`` turns the listener off, as ``admin: false`` does."""
    return s.build(Admin) if s.extra["enabled"] else None


_ADMIN = Schema(Admin, _admin, extra={"enabled": Key(boolean, default=True)})


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = key(5.0, seconds)
    """Seconds to get a connection (TCP + TLS) to the upstream."""
    read: float = key(900.0, seconds)
    """Seconds the upstream may stay silent (Lambda functions run up to 15 minutes)."""
    idle: float = key(15.0, seconds)
    """Seconds an idle pooled connection to the upstream is kept before it is closed."""


_ROLE_ARN = Text(
    re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+"),
    "{!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)",
)
_SESSION_NAME = Text(
    re.compile(r"[\w+=,.@-]{2,64}"), "must be 2-64 characters of letters, digits and +=,.@_-"
)


@dataclass(frozen=True, slots=True)
class CredentialsSpec:
    """Where an upstream's AWS credentials come from. All empty = botocore's default chain."""

    profile: str | None = key(None, text)
    role_arn: str | None = key(None, _ROLE_ARN)
    external_id: str | None = key(None, text)
    session_name: str | None = key(None, _SESSION_NAME)
    duration_seconds: int | None = key(None, Int(900, 43200))

    def describe(self) -> str:
        base = f"profile {self.profile}" if self.profile else "default chain"
        if self.role_arn:
            return f"assume-role {self.role_arn} via {base}"
        return base


def _credentials(s: Section) -> CredentialsSpec:
    """The keys that only say how to assume a role need role_arn."""
    spec = s.build(CredentialsSpec)
    if spec.role_arn is None:
        for name in ("external_id", "session_name", "duration_seconds"):
            if name in s.given:
                raise ConfigError(s.at(name), "only applies together with role_arn")
    return spec


def _cors(s: Section) -> CorsConfig:
    """Origins must be listed, and "*" can't carry credentials."""
    cors = s.build(CorsConfig)
    if not cors.allow_origins:
        raise ConfigError(s.at("allow_origins"), 'list the origins allowed (or "*")')
    if cors.allow_credentials and "*" in cors.allow_origins:
        raise ConfigError(
            s.at("allow_origins"),
            '"*" cannot be combined with allow_credentials (the Fetch standard forbids it); '
            "list the origins",
        )
    return cors


_ORIGIN = Text(
    re.compile(r"\*|https?://([a-z0-9*-]+(\.[a-z0-9*-]+)*|\[[0-9a-f:.]+\])(:(\d{1,5}|\*))?", re.I),
    "{!r} is not an origin like https://app.example.com or http://localhost:*",
)
# CorsConfig belongs to sigproxy.cors, so its keys are listed here; defaults are its own
# except expose_headers, where the proxy shows pages its request id unless told otherwise.
_CORS = Schema(
    CorsConfig,
    _cors,
    keys={
        "allow_origins": Key(ListOf(_ORIGIN)),
        "allow_methods": Key(ListOf(Text(normalize=str.upper))),
        "allow_headers": Key(ListOf(Text(normalize=str.lower))),
        "expose_headers": Key(ListOf(text), default=("X-Request-Id",)),
        "allow_credentials": Key(boolean),
        "max_age": Key(Int(0, 86400)),
    },
)
CORS_KEYS = tuple(_CORS.keys)


def _path_prefix(value: Any, path: str) -> str:
    """A normalized path, without its trailing slash."""
    prefix = text(value, path)
    if not prefix.startswith("/") or "?" in prefix or "#" in prefix:
        raise ConfigError(path, f"{prefix!r} must be a path starting with '/'")
    try:
        prefix = normalize_path(prefix)
    except InvalidTarget as exc:
        raise ConfigError(path, str(exc)) from None
    return prefix if prefix == "/" else prefix.rstrip("/")


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = Text(re.compile(r"[a-z0-9_-]{1,64}"), "{!r} must be 1-64 characters of a-z, 0-9, - and _")
_HOST = Text(
    re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*"),
    "{!r} must be a host name without a port",
    lambda host: host.lower().rstrip("."),
)
_REGION = Text(re.compile(r"[a-z]{2}(-[a-z]+)+-\d+"), "{!r} is not an AWS region name")
_SERVICE = Text(re.compile(r"[a-z0-9-]{1,64}"), "{!r} is not an AWS service signing name")


def _egress_setting(value: Any, path: str) -> str:
    """``none``, or an http:// proxy URL (checked here, parsed again per upstream)."""
    text_value = text(value, path)
    if text_value.strip().lower() == egress.NONE:
        return egress.NONE
    egress.parse_proxy_url(text_value, path)
    return text_value.strip()


def _connect_to(value: Any, path: str) -> tuple[str, int]:
    """``host:port``: an IP address (IPv6 in brackets) or a host name, and a port."""
    raw = text(value, path).strip()
    try:
        parts = urlsplit(f"//{raw}")
        port = parts.port
    except ValueError:
        port = None
        parts = None
    host = (parts.hostname or "") if parts is not None else ""
    if parts is None or not host or port is None or parts.path or parts.username is not None:
        raise ConfigError(path, f"{raw!r} must be host:port (an IP address or name, and a port)")
    if not _is_ip(host):
        try:
            host = _HOST(host, path)
        except ConfigError:
            raise ConfigError(path, f"{host!r} is not an IP address or host name") from None
    return host.lower(), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Retries:
    """How an exchange that failed before the function ran is tried again, each attempt
    signed afresh."""

    attempts: int = key(3, Int(1, 10))
    """Attempts in all, the first included: 1 turns retries off."""
    backoff_base: float = key(0.05, Seconds(0, 60))
    """Seconds; attempt n waits a random time up to min(backoff_max, base * 2^n)."""
    backoff_max: float = key(1.0, Seconds(0, 300))
    deadline: float = key(10.0, seconds)
    """No attempt starts later than this many seconds after the first."""
    budget_percent: int = key(20, Int(0, 100))
    """Retries in flight at most this share of the requests in flight (Envoy's budget)..."""
    min_concurrency: int = key(3, Int(0, 10000))
    """...or this many, whichever is more."""


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str = field(metadata=spec(_NAME))
    url: str = field(metadata=spec(text))
    scheme: str
    host_header: str
    """The Host value sent (and signed): host name, plus the port when not the default."""
    origin: str
    """``scheme://host[:port]``: where to connect."""
    base_path: str
    """``""`` or the URL's own path without a trailing slash, e.g. ``/api``."""
    path_prefix: str = key("/", _path_prefix)
    match_host: str | None = key(None, _HOST, yaml="host")
    region: str = key("", _REGION)
    """Left out: the URL's; ``""`` for an auth: none upstream whose URL doesn't say."""
    service: str = key("lambda", _SERVICE)
    auth: AuthMode = key("aws_iam", Choice(AUTH_MODES))
    credentials: CredentialsSpec = key(CredentialsSpec(), Schema(CredentialsSpec, _credentials))
    timeout: Timeouts = key(Timeouts(), section(Timeouts))
    max_body_bytes: int = key(DEFAULT_MAX_BODY_BYTES, Int(0, 1 << 40))
    cors: CorsConfig | None = key(None, OrNone(_CORS))
    url_host: str = ""
    """The URL's host name, lower-cased: what a forward-proxy request names."""
    max_connections: int = key(DEFAULT_UPSTREAM_CONNECTIONS, Int(1, 1 << 16))
    """Open connections to the upstream at most (Envoy's per-cluster default)."""
    egress_proxy: str | None = key(None, _egress_setting, secret=True)
    """``none``, an http:// proxy URL (it may hold a password), or None: the global
    setting, then the environment."""
    connect_to: tuple[str, int] | None = key(None, _connect_to)
    """Where TCP connections go instead of the URL's host (Host, SNI and the signature
    stay the URL's)."""
    retries: Retries = key(Retries(), section(Retries))
    content_sha256_header: bool = key(False, boolean)
    """Send X-Amz-Content-SHA256 on an auth: none upstream (CloudFront OAC needs it)."""
    egress: EgressProxy | None = None
    """The proxy its connections go through, resolved at load (see :mod:`sigproxy.egress`)."""


def _upstream(s: Section) -> Upstream:
    """What follows from the URL, and the region and credentials rules."""
    derived = _from_url(s.values["url"], s.at("url"))
    region, auth = s.values["region"], s.values["auth"]
    url_region = _region_from_host(derived["url_host"])
    if region and url_region and region != url_region:
        raise ConfigError(
            s.at("region"), f"{region} does not match the region in the URL ({url_region})"
        )
    region = region or url_region or ""
    if not region and auth == "aws_iam":
        raise ConfigError(
            s.at("region"),
            "is required: it cannot be read from the URL host "
            "(only <id>.lambda-url.<region>.on.aws and API Gateway hosts carry it)",
        )
    if "credentials" in s.given and auth == "none":
        raise ConfigError(s.at("credentials"), "is not used when auth is none; remove it")
    if s.values["content_sha256_header"] and auth == "aws_iam":
        raise ConfigError(
            s.at("content_sha256_header"),
            "only applies to auth: none upstreams (signed requests carry the header already)",
        )
    retries = s.values["retries"]
    if retries.backoff_base > retries.backoff_max:
        raise ConfigError(s.at("retries.backoff_base"), "must not be more than retries.backoff_max")
    service = s.values["service"]
    if "service" not in s.given and _API_GATEWAY.match(derived["url_host"]):
        service = "execute-api"  # API Gateway signs as execute-api, not lambda
    return s.build(Upstream, region=region, service=service, **derived)


def _from_url(url: str, path: str) -> dict[str, str]:
    """The Upstream fields that follow from its URL, which must be one the proxy can use."""
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
    if parts.query or parts.fragment or url.endswith(("?", "#")):
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
    try:
        base_path = normalize_path(parts.path or "/")
    except InvalidTarget as exc:
        raise ConfigError(path, str(exc)) from None
    return {
        "scheme": scheme,
        "host_header": host_header,
        "origin": f"{scheme}://{host_header}",
        "base_path": base_path.rstrip("/"),
        "url_host": hostname,
    }


# Hosts whose name carries the region: Function URLs and API Gateway.
_FUNCTION_URL = re.compile(r"^[a-z0-9]+\.lambda-url\.([a-z0-9-]+)\.on\.aws$")
_API_GATEWAY = re.compile(r"^[a-z0-9]+\.execute-api\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
_REGION_FROM_HOST = (_FUNCTION_URL, _API_GATEWAY)


def _region_from_host(hostname: str) -> str | None:
    for pattern in _REGION_FROM_HOST:
        m = pattern.match(hostname)
        if m:
            return m.group(1)
    return None


@dataclass(frozen=True, slots=True)
class InboundAuth:
    """Who may use the proxy: a token in ``Authorization: Bearer <token>`` or, with
    ``header`` set, the token as that header's whole value."""

    tokens: tuple[str, ...] = key((), ListOf(text))
    header: str = key(
        "Authorization",
        Text(re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"), "{!r} is not a header name"),
    )


_TOKEN_RE = re.compile(r"[\x21-\x7e]{16,}")


def _inbound_auth(s: Section) -> InboundAuth:
    """The tokens listed and those in tokens_file (one a line): at least one, all long."""
    tokens = [t for t in s.values["tokens"] if t]
    path = s.extra["tokens_file"]
    if path is not None:  # load_config made it relative to the config file
        try:
            with open(path, encoding="utf-8") as fh:
                tokens.extend(line.strip() for line in fh if line.strip())
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(s.at("tokens_file"), f"cannot read {path}: {reason}") from None
    if not tokens:
        raise ConfigError(s.path, "needs at least one token (tokens: [${VAR}] or tokens_file)")
    if not all(_TOKEN_RE.fullmatch(t) for t in tokens):
        # The token itself never appears in the message.
        raise ConfigError(s.path, "tokens must be at least 16 printable characters without spaces")
    return s.build(InboundAuth, tokens=tuple(tokens))


_INBOUND_AUTH = Schema(InboundAuth, _inbound_auth, extra={"tokens_file": Key(text, default=None)})


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    header: float = key(15.0, seconds)
    """Seconds a connection may take to send a complete request head (and stay idle)."""
    body: float = key(60.0, seconds)
    """Seconds the request body may take to arrive."""
    write: float = key(900.0, seconds)
    """Seconds a client may take in nothing of an answer being written to it (then it is
    cut with a reset): a client that stopped reading holds its connection, and a
    stream's upstream, no longer than an upstream may stay silent (timeout.read)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what clients can make the process hold, before and after admission."""

    max_header_bytes: int = key(64 * 1024, Int(1024, 1 << 20))
    """A whole request head (request line and headers); Envoy's default is 60 KiB."""
    max_client_connections: int = key(256, Int(1, 1 << 20))
    """Open client connections per listener (the proxy port and the admin port each).
    A hostile connection can make the process hold about 0.6 MiB before it is
    authenticated (two pipelined heads at the cap and one unparsed read): 256 of them
    stay inside a 256Mi container with the body budget. Raise both with the memory."""
    body_memory_bytes: int = key(DEFAULT_BODY_MEMORY_BYTES, Int(0, 1 << 40))
    """Request bodies held in memory at once, process-wide."""


def _network(value: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or a CIDR."""
    item = text(value, path)
    try:
        return ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ConfigError(path, f"{item!r} is not an address or CIDR") from None


_ALLOWED_HOST_RE = re.compile(rf"\*|(\*\.)?{_LABEL}(\.{_LABEL})*|[0-9.]+|\[[0-9a-f:.]+\]")


def _allowed_host(value: Any, path: str) -> str:
    """A host name (lower-case, without its final dot), ``*.suffix`` or ``*``."""
    raw = text(value, path)
    host = raw.lower()
    if host != "*":
        host = host.removesuffix(".")  # a fully qualified name is the same name
    if ":" in host and not host.startswith("["):
        with contextlib.suppress(ValueError):  # a bare IPv6 address gets its brackets
            ipaddress.IPv6Address(host)
            host = f"[{host}]"
    if not _ALLOWED_HOST_RE.fullmatch(host) or (host == "*" and raw != "*"):
        raise ConfigError(
            path,
            f'{raw!r} is not a host name (without a port), a pattern like *.example.com, or "*"',
        )
    return host


# CONNECT asks for a tunnel, which the proxy never opens.
_METHOD = Text(
    re.compile(r"(?!CONNECT$)[A-Z]{1,20}"), "{!r} is not a method sigproxy forwards", str.upper
)
_UPSTREAMS = ListOf(Schema(Upstream, _upstream), "upstreams", nonempty=True)


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = field(metadata=spec(section(Listen)))
    upstreams: tuple[Upstream, ...] = field(
        metadata=spec(_UPSTREAMS, "is required: list at least one upstream")
    )
    log_level: str = key("info", Choice(LOG_LEVELS))
    log_format: str = key("text", Choice(LOG_FORMATS))
    admin: Admin | None = key(Admin(), OrNone(_ADMIN))
    """None when the admin listener is disabled (``admin: false``)."""
    grace_period: float = key(30.0, seconds)
    """Seconds requests in flight may take to finish after SIGTERM."""
    inbound_auth: InboundAuth | None = key(None, OrNone(_INBOUND_AUTH))
    allow_unauthenticated: bool = key(False, boolean)
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = key(
        (), ListOf(_network, "addresses or CIDRs", nonempty=True)
    )
    """Empty: any client address."""
    allowed_methods: tuple[str, ...] = key(
        DEFAULT_METHODS, ListOf(_METHOD, "HTTP methods", nonempty=True)
    )
    client_timeouts: ClientTimeouts = key(ClientTimeouts(), section(ClientTimeouts))
    limits: Limits = key(Limits(), section(Limits))
    allowed_hosts: tuple[str, ...] = key((), ListOf(_allowed_host))
    """Host names (or ``*.suffix`` patterns, or ``*``) served besides the defaults: see
    :func:`default_hosts`."""
    allow_cross_site_navigation: bool = key(False, boolean)
    """Let links and bookmarks on other sites open GET/HEAD pages through the proxy."""
    egress_proxy: str | None = key(None, _egress_setting, secret=True)
    """Every upstream's HTTP proxy (``none``: connect directly) unless it names its own;
    left out, the environment's (HTTPS_PROXY, NO_PROXY...)."""
    signer: str = key("builtin", Choice(SIGNERS))
    """``builtin`` (sigproxy's own SigV4 code) or ``botocore`` (botocore's SigV4Auth);
    both give byte-identical signatures, botocore's at about four times the CPU."""
    source: str = field(default="<config>", compare=False)


def _config(s: Section) -> Config:
    """The rules across sections."""
    config = s.build(Config)
    _check_routes(config.upstreams)
    admin, listen = config.admin, config.listen
    if admin is not None and admin.port and (admin.host, admin.port) == (listen.host, listen.port):
        raise ConfigError("admin.port", f"{admin.port} is the proxy's own port (listen.port)")
    check_exposure(config)
    return config


def _check_routes(upstreams: tuple[Upstream, ...]) -> None:
    """Names are unique, and so is each (host, path_prefix) route."""
    names: dict[str, int] = {}
    routes: dict[tuple[str | None, str], str] = {}
    for i, upstream in enumerate(upstreams):
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


# The emulator: section is read by sigproxy.emulator.config.
SCHEMA = Schema(Config, _config, extra={"emulator": Key(lambda value, path: value, default=None)})


# --- files, YAML and ${VAR} ------------------------------------------------------------


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the YAML file at ``path``. Relative paths in it
    (``inbound_auth.tokens_file``, ``listen.tls``'s files) are relative to the file, as
    the emulator's handlers are, not to wherever sigproxy was started."""
    data = parse_yaml(read_text(path), environ)
    folder = os.path.dirname(os.path.abspath(path))
    auth = data.get("inbound_auth") if isinstance(data, dict) else None
    if isinstance(auth, dict) and isinstance(auth.get("tokens_file"), str):
        auth["tokens_file"] = os.path.join(folder, os.path.expanduser(auth["tokens_file"]))
    listen = data.get("listen") if isinstance(data, dict) else None
    tls = listen.get("tls") if isinstance(listen, dict) else None
    if isinstance(tls, dict):
        for name in ("cert", "key", "client_ca"):
            file = tls.get(name)
            if isinstance(file, str) and file.strip():  # empty is left out, not the folder
                tls[name] = os.path.join(folder, os.path.expanduser(file.strip()))
    return with_egress(dataclasses.replace(SCHEMA(data, ""), source=path), environ)


def parse_config(
    text: str, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> Config:
    """Validate config given as YAML text."""
    config = dataclasses.replace(SCHEMA(parse_yaml(text, environ), ""), source=source)
    return with_egress(config, environ)


def with_egress(config: Config, environ: Mapping[str, str] | None = None) -> Config:
    """``config`` with each upstream's egress proxy resolved: its own setting, the
    global one, or the environment's (``os.environ`` unless given)."""
    env = os.environ if environ is None else environ
    upstreams = []
    for i, upstream in enumerate(config.upstreams):
        url = urlsplit(upstream.origin)
        proxy = egress.resolve(
            upstream.egress_proxy,
            config.egress_proxy,
            upstream.scheme,
            upstream.url_host,
            url.port or (443 if upstream.scheme == "https" else 80),
            env,
            f"upstreams[{i}]",
            upstream.connect_to,
        )
        upstreams.append(dataclasses.replace(upstream, egress=proxy))
    return dataclasses.replace(config, upstreams=tuple(upstreams))


def read_text(path: str) -> str:
    """A config file's text, or a :class:`ConfigError` saying why it can't be read."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError(
            "",
            f"no config file {path} (give --config PATH or set SIGPROXY_CONFIG, or start "
            "from the example: cp config.example.yaml sigproxy.yaml)",
        ) from None
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


_ENV_RE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


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


# --- checks on a whole config ----------------------------------------------------------


def check_exposure(config: Config) -> None:
    """Refuse a config that would let others use the proxy without a token. Run on every
    config that is about to be served: after command-line overrides, and on reload against
    the address actually listened on."""
    listen = config.listen
    # A client certificate from listen.tls.client_ca is checked in every handshake: as
    # much a credential as a token.
    authenticated = config.inbound_auth is not None or listen.client_certificates
    if not is_loopback(listen.host) and not authenticated and not config.allow_unauthenticated:
        raise ConfigError(
            "listen.host",
            f"{listen.host} is not a loopback address, so others could reach the "
            "proxy and call your functions with its AWS credentials: set inbound_auth "
            "(bearer tokens or a shared header secret), listen.tls.client_ca (client "
            "certificates) or, on a network you trust, allow_unauthenticated: true",
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
        if upstream.base_path and _FUNCTION_URL.match(upstream.url_host):
            found.append(
                f"upstream {upstream.name!r}: its url has a path ({upstream.base_path}), which "
                f"becomes a base path: {upstream.path_prefix.rstrip('/')}/x is sent as "
                f"{upstream.base_path}/x. A Function URL is usually given without one."
            )
        if upstream.service == "lambda" and _API_GATEWAY.match(upstream.url_host):
            found.append(
                f"upstream {upstream.name!r}: an API Gateway URL signed for service lambda; "
                "API Gateway expects execute-api (leave service out, or set it)"
            )
    return found


def with_listen(config: Config, host: str | None, port: int | None) -> Config:
    """``config`` listening on ``host``/``port`` instead (command-line overrides), checked
    as a whole again."""
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError("--port", f"must be between 0 and 65535, got {port}")
    if host is None and port is None:
        return config
    listen = dataclasses.replace(
        config.listen,
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
