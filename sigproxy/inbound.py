"""Who may use the proxy, decided before anything is read or forwarded: client
addresses (``allowed_clients``), methods, the ``inbound_auth`` token, and the browser
origin (a web page must not be able to make the proxy sign requests for it unless its
origin is allowed: cross-site request forgery on a signing proxy would spend your IAM
permissions)."""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from .config import Config, InboundAuth
from .cors import CorsPolicy
from .errors import Forbidden, MethodNotAllowed, Unauthorized

CONNECT_HELP = (
    "sigproxy cannot sign inside a TLS tunnel: with CONNECT it would only see encrypted "
    "bytes. Send the request to sigproxy as plain HTTP instead: either to the proxy URL "
    "(http://<proxy>/<path_prefix>/...) or, with sigproxy set as your HTTP proxy, to the "
    "Function URL written with http:// (http://<url-id>.lambda-url.<region>.on.aws/...); "
    "sigproxy signs it and sends it on over HTTPS."
)


def check_client(request: web.BaseRequest, config: Config) -> None:
    if not config.allowed_clients:
        return
    try:
        address = ipaddress.ip_address((request.remote or "").split("%")[0])
    except ValueError:
        address = None
    if address is None or not any(address in net for net in config.allowed_clients):
        raise Forbidden("this client address is not in allowed_clients", code="client_not_allowed")


def check_method(request: web.BaseRequest, config: Config) -> None:
    method = request.method
    if method == "CONNECT":
        raise MethodNotAllowed(CONNECT_HELP, headers={"Allow": ", ".join(config.allowed_methods)})
    if method not in config.allowed_methods:
        raise MethodNotAllowed(
            f"method {method} is not allowed here",
            headers={"Allow": ", ".join(config.allowed_methods)},
        )


def check_token(request: web.BaseRequest, auth: InboundAuth) -> None:
    """Constant-time check of the inbound token; the token is never echoed."""
    value = request.headers.get(auth.header, "")
    if auth.header.lower() == "authorization":
        scheme, _, value = value.partition(" ")
        if scheme.lower() != "bearer":
            value = ""
    given = value.strip().encode()
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


def check_origin(request: web.BaseRequest, policy: CorsPolicy | None) -> None:
    """Refuse what a web page on another origin makes a browser send, unless the
    upstream's CORS policy allows that origin."""
    origin = request.headers.get("Origin")
    if origin is not None:
        if origin == f"{request.scheme}://{request.host}":
            return  # same origin: a page served through the proxy itself
        if policy is not None and policy.allows_origin(origin):
            return
        raise Forbidden(
            f"requests from origin {origin} are not allowed (add it to the upstream's "
            "cors.allow_origins)",
            code="origin_not_allowed",
        )
    # No Origin: a navigation, or a no-cors load (img, script) a page triggered.
    if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site") and (
        request.headers.get("Sec-Fetch-Mode") not in (None, "navigate")
    ):
        raise Forbidden(
            "cross-site requests from web pages are not forwarded", code="origin_not_allowed"
        )
