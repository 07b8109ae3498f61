"""A Function URL's CORS, applied as Lambda applies it: preflights (OPTIONS with Origin
and Access-Control-Request-Method) are answered by the URL itself, before auth and
without invoking the function; other responses get the configured headers added.

Lambda adds its headers next to any the function returns (captures of the real service
show both copies), so the emulator does the same rather than replacing them.
"""

from __future__ import annotations

from .config import Cors


def is_preflight(method: str, origin: str | None, request_method: str | None) -> bool:
    return method == "OPTIONS" and origin is not None and request_method is not None


def _allowed_origin(cors: Cors, origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for ``origin``, or None (no grant)."""
    if origin is None:
        return None
    if origin in cors.allow_origins:
        return origin
    if "*" in cors.allow_origins:
        # "*" can't be combined with credentials, so the origin is echoed then.
        return origin if cors.allow_credentials else "*"
    return None


def preflight_headers(cors: Cors, origin: str | None) -> list[tuple[str, str]]:
    allowed = _allowed_origin(cors, origin)
    if allowed is None:
        return []
    headers = [("Access-Control-Allow-Origin", allowed)]
    if cors.allow_methods:
        headers.append(("Access-Control-Allow-Methods", ",".join(cors.allow_methods)))
    if cors.allow_headers:
        headers.append(("Access-Control-Allow-Headers", ",".join(cors.allow_headers)))
    if cors.allow_credentials:
        headers.append(("Access-Control-Allow-Credentials", "true"))
    if cors.max_age:
        headers.append(("Access-Control-Max-Age", str(cors.max_age)))
    if allowed != "*":
        headers.append(("Vary", "Origin"))
    return headers


def response_headers(cors: Cors, origin: str | None) -> list[tuple[str, str]]:
    allowed = _allowed_origin(cors, origin)
    if allowed is None:
        return []
    headers = [("Access-Control-Allow-Origin", allowed)]
    if cors.allow_credentials:
        headers.append(("Access-Control-Allow-Credentials", "true"))
    if cors.expose_headers:
        headers.append(("Access-Control-Expose-Headers", ",".join(cors.expose_headers)))
    if allowed != "*":
        headers.append(("Vary", "Origin"))
    return headers
