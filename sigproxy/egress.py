"""Which HTTP proxy, if any, an upstream's connections go through.

The config's ``egress_proxy`` (per upstream, then global) wins; ``none`` turns proxying
off. Without it the environment decides, with the rules of curl and requests:
``https_proxy``/``HTTPS_PROXY`` for https URLs, ``http_proxy``/``HTTP_PROXY`` for http
ones, ``all_proxy``/``ALL_PROXY`` for both, the lower-case form first; ``no_proxy``/
``NO_PROXY`` lists hosts to reach directly (``*`` for all; a name matches itself and its
subdomains, with or without a leading dot; an IP address or CIDR block matches addresses;
``host:port`` only that port). As in Go's net/http, the environment never sends loopback
hosts (local emulators, tunnels) through a proxy; with ``connect_to``, the address dialled
counts as well as the URL's host. Pure: the environment is passed in.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import ConfigError
from .hosts import is_loopback

NONE = "none"


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """An HTTP proxy to open CONNECT tunnels through. ``url`` is safe to log (no
    password); ``authorization`` is the ``Proxy-Authorization`` value, if any."""

    host: str
    port: int
    url: str
    authorization: str | None = field(default=None, repr=False)


def parse_proxy_url(value: str, path: str) -> EgressProxy:
    """``http://[user:password@]host[:port]`` (the scheme may be left out, as curl
    allows); raises :class:`ConfigError` naming ``path``."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        # urlsplit's own words may quote the password: never pass them on.
        raise ConfigError(
            path,
            "is not a valid proxy URL: http://[user:password@]host:port, with a port number "
            "(percent-encode / # ? @ in the user or password)",
        ) from None
    scheme = parts.scheme.lower()
    if scheme != "http":
        raise ConfigError(
            path,
            f"{scheme}:// proxies are not supported: give the proxy's http:// URL (HTTPS to "
            "the Function URL still runs end to end inside the CONNECT tunnel)",
        )
    host = (parts.hostname or "").lower()
    if not host:
        raise ConfigError(path, "is not a valid proxy URL: it has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(path, "is not a valid proxy URL: only http://[user:password@]host:port")
    authorization = None
    if parts.username is not None:
        user = unquote(parts.username)
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"
    shown = f"[{host}]" if ":" in host else host
    shown = f"http://{'***@' if authorization else ''}{shown}:{port or 80}"
    return EgressProxy(host, port or 80, shown, authorization)


def from_environment(
    scheme: str,
    host: str,
    port: int,
    environ: Mapping[str, str],
    connect_to: tuple[str, int] | None = None,
) -> tuple[str, str] | None:
    """(variable name, value) of the environment's proxy for this upstream, or ``None``
    to connect directly: when the URL's host, or the ``connect_to`` address that is
    dialled instead, is loopback or in ``no_proxy``."""
    no_proxy = _first(environ, "no_proxy")
    for name, number in [(host, port)] + ([connect_to] if connect_to else []):
        if is_loopback(name) or bypassed(name, number, no_proxy):
            return None
    for name in (f"{scheme}_proxy", "all_proxy"):
        for variable in (name, name.upper()):
            value = environ.get(variable, "").strip()
            if value:
                return variable, value
    return None


def _first(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name) or environ.get(name.upper()) or ""


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (a comma-separated list) says to reach ``host`` directly."""
    host = host.lower().strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_host, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry_host, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = entry_host.lstrip(".").removeprefix("*.")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [::1]:8080
        inside, _, rest = entry[1:].partition("]")
        return inside, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, int(port)
    return entry, None


def resolve(
    upstream_setting: str | None,
    global_setting: str | None,
    scheme: str,
    host: str,
    port: int,
    environ: Mapping[str, str],
    where: str,
    connect_to: tuple[str, int] | None = None,
) -> EgressProxy | None:
    """The proxy an upstream's connections go through: its own ``egress_proxy``, else
    the global one, else the environment's; ``none`` at either level means directly.
    ``where`` is the upstream's key path, for errors."""
    if upstream_setting is not None:
        if upstream_setting == NONE:
            return None
        return parse_proxy_url(upstream_setting, f"{where}.egress_proxy")
    if global_setting is not None:
        if global_setting == NONE:
            return None
        return parse_proxy_url(global_setting, "egress_proxy")
    found = from_environment(scheme, host, port, environ, connect_to)
    if found is None:
        return None
    variable, value = found
    return parse_proxy_url(value, f"{variable} (environment)")
