"""Which headers go upstream and which come back: hop-by-hop headers (RFC 9110 section
7.6.1), the forwarded-for set the proxy rebuilds, the client's own ``Authorization`` and
``X-Amz-*`` on signed routes, the inbound token, and values that are not UTF-8.

Pure functions over ``(name, value)`` pairs, so the policy is a table (tests/test_headers.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import BadRequest

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection and Keep-Alive.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers never passed on: the proxy sets its own Host and length, answers any
# Expect itself, and rebuilds the forwarded-for set.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
}
# The proxy frames the body itself and sets its own request id.
# The proxy sets these itself; an upstream may not speak for it (X-Sigproxy-Diagnosis).
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-request-id", "x-sigproxy-diagnosis"}

Headers = Iterable[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Client:
    """What the proxy knows of the client for the forwarded-for headers."""

    address: str
    """The peer address, ``""`` when unknown (a Unix socket)."""
    scheme: str
    host: str | None
    """Its Host header, when it sent one."""


def request_headers(
    incoming: Headers,
    *,
    host: str,
    signed: bool,
    client: Client,
    request_id: str,
    token_header: str | None = None,
) -> list[tuple[str, str]]:
    """The client's headers as they go upstream, before signing: ``Host`` set to
    ``host``, hop-by-hop and ``Connection``-named headers dropped, the ``token_header``
    (inbound_auth's) never forwarded, and on ``signed`` routes the client's own
    ``Authorization`` and ``X-Amz-*`` dropped (the signature is the proxy's; a stale date
    or token would contradict it). Raises :class:`BadRequest` for a value that is not
    UTF-8 rather than forwarding it altered."""
    token = token_header.lower() if token_header is not None else None
    kept: list[tuple[str, str]] = []
    prior: list[str] = []
    listed: set[str] | None = None  # what a Connection header names, when there is one
    for name, value in incoming:
        lower = name.lower()
        if lower in _REQUEST_DROP:
            if lower == "x-forwarded-for":
                prior.append(value)
            elif lower == "connection":
                listed = (listed or set()) | _tokens(value)
            continue
        if lower == token or (signed and (lower == "authorization" or lower.startswith("x-amz-"))):
            continue
        if not value.isascii() and not is_utf8(value):
            raise BadRequest(f"header {name} is not valid UTF-8")
        kept.append((name, value))
    if listed:
        kept = [(n, v) for n, v in kept if n.lower() not in listed]
    # Every header the proxy sets is in _REQUEST_DROP, so each appears once.
    out = [("Host", host), *kept]
    chain = ", ".join(prior)
    if client.address:
        out.append(("X-Forwarded-For", f"{chain}, {client.address}" if chain else client.address))
    elif chain:
        out.append(("X-Forwarded-For", chain))
    out.append(("X-Forwarded-Proto", client.scheme))
    if client.host:
        out.append(("X-Forwarded-Host", client.host))
    out.append(("X-Request-Id", request_id))
    return out


def response_headers(incoming: Headers, *, cors: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """(the upstream's headers as they go to the client, the names of those dropped for
    not being UTF-8). Hop-by-hop and ``Connection``-named headers go; with a CORS policy
    the upstream's ``Access-Control-*`` go too, since the policy's replace them."""
    out: list[tuple[str, str]] = []
    undecodable: list[str] = []
    listed: set[str] | None = None
    for name, value in incoming:
        lower = name.lower()
        if lower in _RESPONSE_DROP:
            if lower == "connection":
                listed = (listed or set()) | _tokens(value)
            continue
        if cors and lower.startswith("access-control-"):
            continue
        if not value.isascii() and not is_utf8(value):
            undecodable.append(name)
            continue
        out.append((name, value))
    if listed:
        out = [(n, v) for n, v in out if n.lower() not in listed]
    return out, undecodable


def _tokens(value: str) -> set[str]:
    """The header names one ``Connection`` value lists (hop-by-hop for this message)."""
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def is_utf8(value: str) -> bool:
    # sigproxy.http1 and sigproxy.upstream hand undecodable header bytes over as
    # surrogate escapes (as aiohttp did): a request with one gets a 400, a response's are
    # dropped and reported; never sent on.
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
