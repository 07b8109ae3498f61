"""Who may use the proxy, decided before anything is routed, read or forwarded: client
addresses (``allowed_clients``), the Host name (``allowed_hosts``: DNS rebinding), methods
and transfer codings, the ``inbound_auth`` token, and the page a browser request comes
from (a web page on another site must not be able to make the proxy sign for it unless
the upstream's CORS policy allows its origin: cross-site request forgery on a signing
proxy spends your IAM permissions)."""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .config import Config, InboundAuth
from .cors import CorsPolicy
from .errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    MisdirectedRequest,
    Unauthorized,
    UnsupportedCoding,
)
from .hosts import HostAllowList, hostname

if TYPE_CHECKING:
    from .http1 import Request

CONNECT_HELP = (
    "sigproxy cannot sign inside a TLS tunnel: with CONNECT it would only see encrypted "
    "bytes. Send the request to sigproxy as plain HTTP instead: either to the proxy URL "
    "(http://<proxy>/<path_prefix>/...) or, with sigproxy set as your HTTP proxy, to the "
    "Function URL written with http:// (http://<url-id>.lambda-url.<region>.on.aws/...); "
    "sigproxy signs it and sends it on over HTTPS."
)
# Sec-Fetch-Site values a browser sends for requests a page on another site made.
# Anything but these two safe values is treated as cross-site (fail closed).
_SAFE_SITES = frozenset({"same-origin", "none"})
_NAVIGATION_METHODS = frozenset({"GET", "HEAD"})


def check_client(request: Request, config: Config) -> None:
    if not config.allowed_clients:
        return
    try:
        address = ipaddress.ip_address((request.remote or "").split("%")[0])
    except ValueError:
        address = None
    if address is None or not any(address in net for net in config.allowed_clients):
        raise Forbidden("this client address is not in allowed_clients", code="client_not_allowed")


def check_host(request: Request, hosts: HostAllowList) -> None:
    """Refuse a Host the proxy is not known by. Absolute-form requests (forward-proxy
    mode) are judged by their target's authority when they are routed."""
    if not request.raw_path.startswith("/"):
        return
    host = request.headers.get("Host")
    if host is None:
        if request.version >= (1, 1):
            raise BadRequest("an HTTP/1.1 request needs a Host header")
        return
    if not hosts.allows(hostname(host)):
        raise MisdirectedRequest(
            "sigproxy does not serve the host name in this request's Host header (a guard "
            "against DNS rebinding); if it is a name you use for the proxy, add it to "
            "allowed_hosts",
            code="host_not_allowed",
        )


def check_method(request: Request, config: Config) -> None:
    method = request.method
    if method == "CONNECT":
        raise MethodNotAllowed(CONNECT_HELP, headers={"Allow": ", ".join(config.allowed_methods)})
    if method not in config.allowed_methods:
        raise MethodNotAllowed(
            f"method {method} is not allowed here",
            headers={"Allow": ", ".join(config.allowed_methods)},
        )


def check_framing(request: Request) -> None:
    """Only ``chunked`` is a transfer coding sigproxy can pass on faithfully: a body
    de-chunked from ``gzip, chunked`` would lose its coding (RFC 9112 section 6.1)."""
    codings = request.headers.getall("Transfer-Encoding", ())
    if codings and [c.strip().lower() for v in codings for c in v.split(",")] != ["chunked"]:
        raise UnsupportedCoding("the only transfer coding sigproxy accepts is chunked")


def check_token(request: Request, auth: InboundAuth) -> None:
    """Constant-time check of the inbound token; the token is never echoed."""
    value = request.headers.get(auth.header, "")
    if auth.header.lower() == "authorization":
        scheme, _, value = value.partition(" ")
        if scheme.lower() != "bearer":
            value = ""
    # Bytes that are not UTF-8 arrive as surrogate escapes: compare them as the bytes sent.
    given = value.strip().encode("utf-8", "surrogateescape")
    ok = False
    for token in auth.tokens:
        ok |= hmac.compare_digest(given, token.encode())
    if not ok:
        hint = (
            "Authorization: Bearer <token>"
            if auth.header.lower() == "authorization"
            else f"{auth.header}: <token>"
        )
        raise Unauthorized(
            f"sigproxy needs a valid token ({hint})",
            headers={"WWW-Authenticate": 'Bearer realm="sigproxy"'},
        )


def is_preflight(request: Request) -> bool:
    """A CORS preflight, which browsers send without credentials or tokens."""
    headers = request.headers
    return (
        request.method == "OPTIONS"
        and "Origin" in headers
        and "Access-Control-Request-Method" in headers
    )


def check_site(request: Request, policy: CorsPolicy | None, *, allow_navigation: bool) -> None:
    """Refuse what a web page on another origin makes a browser send (fetch, forms,
    links, images, frames), unless the upstream's CORS policy allows that origin."""
    headers = request.headers
    own = f"{request.scheme}://{request.host}".lower()
    origin = headers.get("Origin")
    if origin is not None:
        if origin.lower() == own or (policy is not None and policy.allows_origin(origin)):
            return
        raise _refused()
    site = headers.get("Sec-Fetch-Site")
    if site in _SAFE_SITES:
        return
    page = _referer_origin(headers.get("Referer"))
    if site is None and (page is None or page == own):
        return  # not a browser, or no sign of another page (older Safari sends no Sec-Fetch-*)
    if page is not None and policy is not None and policy.allows_origin(page):
        return
    if allow_navigation and _is_navigation(request):
        return
    raise _refused()


def _is_navigation(request: Request) -> bool:
    headers = request.headers
    if request.method not in _NAVIGATION_METHODS:
        return False
    if "Sec-Fetch-Mode" not in headers:
        return True  # Referer only: an older browser following a link
    return headers.get("Sec-Fetch-Mode") == "navigate" and headers.get("Sec-Fetch-Dest") in (
        None,
        "document",
    )


def _referer_origin(referer: str | None) -> str | None:
    if not referer:
        return None
    try:
        parts = urlsplit(referer.strip())
        port = parts.port
    except ValueError:
        return "invalid"
    if not parts.scheme or not parts.hostname:
        return "invalid"
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None else "")


def _refused() -> Forbidden:
    # The origin is not echoed: a reflected value is one more thing a page controls.
    return Forbidden(
        "requests that web pages on other sites make are not forwarded; to let a page "
        "call this upstream, list its origin in the upstream's cors.allow_origins",
        code="origin_not_allowed",
    )
