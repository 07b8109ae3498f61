"""Function URL payloads: an HTTP request as a payload format 2.0 event, and a handler's
result as the HTTP response Lambda makes of it.

The rules follow "Invoking Lambda function URLs"
(https://docs.aws.amazon.com/lambda/latest/dg/urls-invocation.html) and, where the docs
are silent, responses recorded against the real service: a returned string is sent as
is, a value without ``statusCode`` is sent as compact JSON, every inferred response is
``application/json``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

# Request bodies Lambda passes as text; everything else (no Content-Type and form posts
# included) arrives base64-encoded.
_TEXT_TYPES = frozenset({"application/json", "application/xml", "application/javascript"})

# Buffered invoke payload limits, in bytes.
MAX_REQUEST_BYTES = 6 * 1024 * 1024  # 6291456
MAX_RESPONSE_BYTES = 6 * 1024 * 1024 + 100  # 6291556, as the service measures it
# A streamed response (invoke_mode RESPONSE_STREAM) may reach 200 MB
# (https://docs.aws.amazon.com/lambda/latest/dg/configuration-response-streaming.html).
MAX_STREAM_RESPONSE_BYTES = 200 * 1024 * 1024


class MalformedResult(Exception):
    """The handler returned something Lambda can't turn into an HTTP response."""


@dataclass
class HttpResult:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def is_text(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith("text/") or media in _TEXT_TYPES or media.endswith(("+json", "+xml"))


def build_event(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    source_ip: str,
    domain_name: str,
    url_id: str,
    account_id: str,
    request_id: str,
    iam: Mapping[str, object] | None,
    now: datetime.datetime,
) -> dict[str, Any]:
    """The payload format 2.0 event for one request."""
    joined: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower == "cookie":
            cookies.extend(c.strip() for c in value.split(";") if c.strip())
            continue
        joined[lower] = f"{joined[lower]},{value}" if lower in joined else value
    content_type = joined.get("content-type")

    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": raw_query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = joined
    params = query_parameters(raw_query)
    if params:
        event["queryStringParameters"] = params
    epoch_ms = int(now.timestamp() * 1000)
    event["requestContext"] = {
        "accountId": account_id if iam is not None else "anonymous",
        "apiId": url_id,
        "authentication": None,
        "authorizer": {"iam": dict(iam)} if iam is not None else None,
        "domainName": domain_name,
        "domainPrefix": domain_name.split(".", 1)[0],
        "http": {
            "method": method,
            "path": raw_path,
            "protocol": "HTTP/1.1",
            "sourceIp": source_ip,
            "userAgent": joined.get("user-agent", ""),
        },
        "requestId": request_id,
        "routeKey": "$default",
        "stage": "$default",
        "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
        "timeEpoch": epoch_ms,
    }
    if body:
        if is_text(content_type):
            try:
                event["body"] = body.decode("utf-8")
                event["isBase64Encoded"] = False
            except UnicodeDecodeError:
                event["body"] = base64.b64encode(body).decode()
                event["isBase64Encoded"] = True
        else:
            event["body"] = base64.b64encode(body).decode()
            event["isBase64Encoded"] = True
    else:
        event["isBase64Encoded"] = False
    return event


def query_parameters(raw_query: str) -> dict[str, str]:
    """``queryStringParameters``: decoded, repeated keys comma-joined."""
    params: dict[str, str] = {}
    for piece in raw_query.split("&"):
        if not piece:
            continue
        key, _, value = piece.partition("=")
        k, v = unquote_plus(key), unquote_plus(value)
        params[k] = f"{params[k]},{v}" if k in params else v
    return params


def map_result(result: Any) -> HttpResult:
    """What the client receives for a handler's return value."""
    if isinstance(result, Iterator | AsyncIterator):
        raise MalformedResult(
            "the result is an iterator: a streamed response needs invoke_mode RESPONSE_STREAM"
        )
    if isinstance(result, dict) and "statusCode" in result:
        return _custom_response(result)
    if isinstance(result, str):
        body = result.encode()
    else:
        try:
            body = json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise MalformedResult(f"the result is not JSON serialisable: {exc}") from None
    return HttpResult(200, [("Content-Type", "application/json")], body)


def _custom_response(result: dict[str, Any]) -> HttpResult:
    status = _status(result["statusCode"])
    headers = _headers_and_cookies(result, "application/json")
    body = result.get("body")
    if body is None:
        data = b""
    elif isinstance(body, str):
        if result.get("isBase64Encoded") is True:
            try:
                data = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise MalformedResult("isBase64Encoded is true but body is not base64") from None
        else:
            data = body.encode()
    else:
        # Lambda serialises a non-string body as JSON.
        try:
            data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise MalformedResult(f"body is not JSON serialisable: {exc}") from None
    return HttpResult(status, headers, data)


def map_prelude(prelude: dict[str, Any]) -> HttpResult:
    """The status and headers of a streamed response, from the dict a streaming handler
    yields first (Node's ``awslambda.HttpResponseStream.from(stream, metadata)``):
    ``statusCode`` (default 200), ``headers`` and ``cookies``. Without a Content-Type
    the response is ``application/octet-stream``, as a Node stream's is."""
    unknown = set(prelude) - {"statusCode", "headers", "cookies"}
    if unknown:
        raise MalformedResult(f"the prelude has unknown keys: {', '.join(sorted(unknown))}")
    status = _status(prelude.get("statusCode", 200))
    if status < 200:
        # The prelude's status is the final answer: 1xx would leave the chunks after it
        # outside any HTTP message.
        raise MalformedResult(f"statusCode {status} in the prelude is not a final status")
    return HttpResult(status, _headers_and_cookies(prelude, "application/octet-stream"))


def _status(value: Any) -> int:
    status = int(value) if isinstance(value, str) and value.isdigit() else value
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise MalformedResult(f"statusCode {value!r} is not an HTTP status")
    return status


def _headers_and_cookies(result: dict[str, Any], content_type: str) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    raw_headers = result.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise MalformedResult("headers must be an object of strings")
    for name, value in raw_headers.items():
        if not isinstance(name, str) or isinstance(value, dict | list) or value is None:
            raise MalformedResult(f"header {name!r} must have a string value")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if "\r" in text or "\n" in text or "\r" in name or "\n" in name:
            raise MalformedResult(f"header {name!r} contains CR or LF")
        headers.append((name, text))
    if not any(name.lower() == "content-type" for name, _ in headers):
        headers.append(("Content-Type", content_type))
    cookies = result.get("cookies") or []
    if not isinstance(cookies, list) or not all(isinstance(c, str) for c in cookies):
        raise MalformedResult("cookies must be a list of strings")
    headers.extend(("Set-Cookie", c) for c in cookies)
    return headers
