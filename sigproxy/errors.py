"""The exceptions sigproxy raises, and the one place that turns them into HTTP answers.

::

    SigproxyError
    ├── ConfigError                 bad config file (CLI exit 2)
    ├── CredentialsError            no credentials at startup (CLI exit 2)
    ├── ListenError                 the listening socket can't be opened (CLI exit 2)
    └── ProxyError                  one request failed; carries status + JSON code
        ├── BadRequest              400 bad_request: the request can't be forwarded faithfully
        ├── Unauthorized            401 unauthorized: inbound_auth token missing or wrong
        ├── Forbidden               403 (client, origin or host not allowed; CORS refusal)
        ├── MethodNotAllowed        405 method_not_allowed (CONNECT explained)
        ├── RequestTimeout          408 request_timeout: the body arrived too slowly
        ├── NoRoute                 404 no_route
        ├── BodyTooLarge            413 body_too_large
        ├── ExpectationFailed       417 expectation_failed
        ├── MisdirectedRequest      421 host_not_allowed: a Host the proxy is not known by
        ├── UnsupportedCoding       501 not_implemented: a transfer coding other than chunked
        ├── UpstreamUnreachable     502 upstream_unreachable
        ├── OverCapacity            503 over_capacity: the request body memory budget is spent
        ├── UpstreamBusy            503 upstream_busy: the upstream's connections are all taken
        ├── UpstreamTimeout         504 upstream_timeout
        └── CredentialsUnavailable  503 credentials_unavailable

Messages never contain secrets: they name upstreams, limits and prefixes, never
header values, query values or credentials. This module is pure: the handler turns
:func:`error_body` into a response, and the transport's failures arrive here as a kind
and a message (:func:`upstream_failure`), so nothing below the proxy is imported.
"""

from __future__ import annotations

import json
import os
from typing import Any


class SigproxyError(Exception):
    """Base of every error sigproxy raises on purpose."""


class ConfigError(SigproxyError):
    """The configuration is invalid; ``path`` names the key (``upstreams[1].region``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class CredentialsError(SigproxyError):
    """Credentials for an upstream could not be resolved at startup."""


class ListenError(SigproxyError):
    """The listening socket could not be opened (port taken, address not local, ...)."""


class ProxyError(SigproxyError):
    """A request failed in a way the client should hear about as JSON."""

    status = 500
    code = "internal_error"
    reason = "internal"  # bounded metric label
    closes = False
    """The connection can't be trusted for another request after this answer."""
    retry: str | None = None
    """Set on an upstream failure that may be tried again: the reason (see retries)."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.extra = extra


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"
    reason = "bad_request"


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"
    reason = "unauthorized"


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"
    reason = "forbidden"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"
    reason = "bad_request"


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"
    reason = "client_timeout"


class MisdirectedRequest(ProxyError):
    status = 421
    code = "host_not_allowed"
    reason = "forbidden"


class UnsupportedCoding(ProxyError):
    status = 501
    code = "not_implemented"
    reason = "bad_request"
    closes = True  # its framing is in doubt


class OverCapacity(ProxyError):
    status = 503
    code = "over_capacity"
    reason = "over_capacity"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class UpstreamBusy(ProxyError):
    status = 503
    code = "upstream_busy"
    reason = "upstream_busy"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message, headers={"Retry-After": "1"}, **extra)


class NoRoute(ProxyError):
    status = 404
    code = "no_route"
    reason = "no_route"


class BodyTooLarge(ProxyError):
    status = 413
    code = "body_too_large"
    reason = "body_too_large"


class ExpectationFailed(ProxyError):
    status = 417
    code = "expectation_failed"
    reason = "bad_request"


class UpstreamUnreachable(ProxyError):
    status = 502
    code = "upstream_unreachable"
    reason = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"
    reason = "upstream_timeout"


class CredentialsUnavailable(ProxyError):
    status = 503
    code = "credentials_unavailable"
    reason = "credentials"


def error_body(code: str, message: str, request_id: str | None = None, **extra: Any) -> bytes:
    """A JSON error body: ``{"error": code, "message": ..., **extra, "request_id": ...}``."""
    body: dict[str, Any] = {"error": code, "message": message}
    body.update(extra)
    if request_id:
        body["request_id"] = request_id
    return json.dumps(body).encode()


# What each kind of upstream failure is called in the 502 message (the detail says why).
_FAILED = {
    "connect": "cannot connect to upstream {!r}",
    "tls": "TLS with upstream {!r} failed",
    "protocol": "upstream {!r} sent an invalid response",
    "closed": "upstream {!r} closed the connection",
    "proxy": "the egress proxy for upstream {!r} failed",
}


def upstream_failure(kind: str, detail: str, upstream: str) -> ProxyError:
    """What the client is told when the exchange with ``upstream`` failed: ``kind`` and
    ``detail`` are the transport's (a bounded label, and the cause in words)."""
    if kind == "timeout":
        return UpstreamTimeout(
            f"upstream {upstream!r} did not answer in time",
            upstream=upstream,
            kind=kind,
            detail=detail,
        )
    if kind == "busy":
        return UpstreamBusy(
            f"upstream {upstream!r} is busy: {detail}", upstream=upstream, kind=kind
        )
    return UpstreamUnreachable(
        _FAILED.get(kind, _FAILED["closed"]).format(upstream),
        upstream=upstream,
        kind=kind,
        detail=detail,
    )


def listen_failure(what: str, host: str, port: int, exc: OSError) -> str:
    """One line naming the listener that could not open, why, and what to do."""
    if what == "admin":
        fix = "set admin.port, --admin-port 0 for any free port, or admin: false"
    else:
        fix = "--port 0 for any free port, or set listen.port"
    # The errno's own words: asyncio and socket.create_server wrap them differently.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"cannot listen on {host}:{port} for the {what} listener: {reason} ({fix})"
