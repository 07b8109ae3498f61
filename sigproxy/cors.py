"""The proxy's own CORS policy per upstream, following the Fetch standard
(https://fetch.spec.whatwg.org/#http-cors-protocol).

Browsers can't sign a preflight, and the proxy is the origin they talk to, so sigproxy
answers preflights itself (never forwarding or signing them) and replaces whatever CORS
headers the upstream sends with its own, so the browser sees one consistent answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Methods and request headers a browser sends without asking first.
SAFELISTED_METHODS = frozenset({"GET", "HEAD", "POST"})
SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: int = 600


def origin_pattern(origin: str) -> re.Pattern[str]:
    """``http://localhost:*`` (any port) or ``https://*.example.com`` (one label)."""
    parts = re.split(r"(:\*|\*)", origin.lower())
    out = []
    for part in parts:
        if part == ":*":
            out.append(r":\d{1,5}")
        elif part == "*":
            out.append(r"[a-z0-9-]+")
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "$")


_TOKEN = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,64}$")


def _names(headers: list[str]) -> str:
    shown = [h if _TOKEN.match(h) else "(not a header name)" for h in headers[:10]]
    return ", ".join(shown)


class CorsPolicy:
    """A compiled :class:`CorsConfig`."""

    def __init__(self, config: CorsConfig) -> None:
        self.config = config
        self.any_origin = "*" in config.allow_origins
        self._exact = frozenset(o.lower() for o in config.allow_origins if "*" not in o)
        self._patterns = tuple(
            origin_pattern(o) for o in config.allow_origins if "*" in o and o != "*"
        )
        self._methods = frozenset(m.upper() for m in config.allow_methods)
        self.any_method = "*" in self._methods
        self._headers = frozenset(h.lower() for h in config.allow_headers)
        self.any_header = "*" in self._headers

    def allows_origin(self, origin: str) -> bool:
        o = origin.lower()
        return self.any_origin or o in self._exact or any(p.match(o) for p in self._patterns)

    def _allow_origin_value(self, origin: str) -> str:
        # "*" can't carry credentials (the Fetch standard refuses it), so a policy with
        # credentials echoes the origin, and Vary: Origin tells caches it depends on it.
        return "*" if self.any_origin and not self.config.allow_credentials else origin

    def preflight(
        self, origin: str, method: str, request_headers: Iterable[str]
    ) -> list[tuple[str, str]] | str:
        """Response headers granting the preflight, or the reason it is refused."""
        if not self.allows_origin(origin):
            return "the page's origin is not in cors.allow_origins"  # never echoed
        method = method.upper()
        if not (self.any_method or method in self._methods or method in SAFELISTED_METHODS):
            return "the requested method is not in cors.allow_methods"
        wanted = [h.strip().lower() for h in request_headers if h.strip()]
        denied = [
            h
            for h in wanted
            if h not in self._headers and h not in SAFELISTED_HEADERS and not self.any_header
        ]
        if denied:
            # Named (they are header names, as a developer needs them) but never echoed
            # beyond the header-name characters.
            return f"request header(s) not in cors.allow_headers: {_names(denied)}"
        headers = [
            ("Access-Control-Allow-Origin", self._allow_origin_value(origin)),
            ("Access-Control-Allow-Methods", method),
        ]
        if wanted:
            headers.append(("Access-Control-Allow-Headers", ", ".join(wanted)))
        if self.config.allow_credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        headers.append(("Access-Control-Max-Age", str(self.config.max_age)))
        headers.append(
            ("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        )
        return headers

    def response_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """CORS headers for an actual response (none when the origin is not allowed)."""
        headers = [("Vary", "Origin")]
        if origin is None or not self.allows_origin(origin):
            return headers
        headers.append(("Access-Control-Allow-Origin", self._allow_origin_value(origin)))
        if self.config.allow_credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        if self.config.expose_headers:
            headers.append(("Access-Control-Expose-Headers", ", ".join(self.config.expose_headers)))
        return headers
