"""SigV4 verification the way a Function URL with AuthType AWS_IAM does it: from the
bytes that arrived, with the known callers' keys, the emulator's region, service
``lambda`` and a five-minute clock window.

Written from the specification (https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html)
with hashlib and hmac, deliberately not with botocore: the signer and the verifier of a
request that goes through sigproxy and the emulator must not share code.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = datetime.timedelta(minutes=5)

_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential\s*=\s*(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders\s*=\s*(?P<signed>[^,\s]+)\s*,\s*Signature\s*=\s*(?P<signature>[0-9a-f]{64})\s*$"
)
_SPACES = re.compile(r"\s+")

# The messages the service answers with (status 403 for all of them).
MSG_MISSING = "Forbidden"
MSG_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service "
    "documentation for details."
)
MSG_TOKEN = "The security token included in the request is invalid."  # noqa: S105
MSG_EXPIRED = "The security token included in the request is expired"  # sic: no period


@dataclass(frozen=True, slots=True)
class Caller:
    """A known identity: its keys and who it is. Temporary keys (with a session token)
    may carry ``expires_at`` (aware, UTC): from then on the service calls the token
    expired."""

    access_key_id: str
    secret_access_key: str
    account_id: str
    user_arn: str
    session_token: str | None = None
    expires_at: datetime.datetime | None = None

    @property
    def user_id(self) -> str:
        # IAM user ids start AIDA, assumed-role sessions AROA; the emulator derives a
        # stable fake one from the access key.
        digest = hashlib.sha256(self.access_key_id.encode()).hexdigest().upper()
        return ("AROA" if self.session_token else "AIDA") + digest[:17]


@dataclass(frozen=True, slots=True)
class Identity:
    """``requestContext.authorizer.iam`` of a verified request."""

    caller: Caller

    def as_event(self) -> dict[str, object]:
        c = self.caller
        return {
            "accessKey": c.access_key_id,
            "accountId": c.account_id,
            "callerId": c.user_id,
            "cognitoIdentity": None,
            "principalOrgId": None,
            "userArn": c.user_arn,
            "userId": c.user_id,
        }


class SignatureError(Exception):
    """Verification failed. ``message`` is what the client is told (the service's own
    words); ``part`` and ``detail`` are for the emulator log, to debug the client."""

    def __init__(self, message: str, part: str, detail: str) -> None:
        super().__init__(message)
        self.message = message
        self.part = part
        self.detail = detail


def verify(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    callers: Mapping[str, Caller],
    region: str,
    *,
    service: str = "lambda",
    now: datetime.datetime | None = None,
) -> Identity:
    """Return who signed the request, or raise :class:`SignatureError`.

    The checks run in the service's order, so that each failure gets the answer it gets
    from Lambda: the Authorization header's form, the credential scope, the X-Amz-Date
    window around ``now``, the access key, the session token, the token's expiry, then
    the signature itself."""
    header_list = [(k.lower(), v) for k, v in headers]
    values: dict[str, list[str]] = {}
    for name, value in header_list:
        values.setdefault(name, []).append(value)
    authorization = values.get("authorization")
    if not authorization:
        raise SignatureError(MSG_MISSING, "authorization", "no Authorization header")
    m = _AUTH_RE.match(authorization[0].strip())
    if m is None or len(authorization) > 1:
        raise SignatureError(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
            "parameters of an AWS4-HMAC-SHA256 signature.",
            "authorization",
            "the Authorization header is not AWS4-HMAC-SHA256 Credential=..., "
            "SignedHeaders=..., Signature=<64 hex>",
        )
    scope_parts = m["credential"].split("/")
    if len(scope_parts) != 5 or scope_parts[4] != "aws4_request":
        raise SignatureError(
            "Credential should be scoped to a valid region.",
            "scope",
            f"credential scope {'/'.join(scope_parts[1:])!r} is not "
            "<date>/<region>/<service>/aws4_request",
        )
    access_key, scope_date, scope_region, scope_service, _ = scope_parts
    if scope_region != region:
        raise SignatureError(
            f"Credential should be scoped to a valid region, not '{scope_region}'.",
            "scope",
            f"signed for region {scope_region}, this function URL is in {region}",
        )
    if scope_service != service:
        raise SignatureError(
            f"Credential should be scoped to correct service: '{service}'.",
            "scope",
            f"signed for service {scope_service}, Function URLs need {service}",
        )

    amz_date = (values.get("x-amz-date") or [""])[0]
    try:
        signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.UTC
        )
    except ValueError:
        raise SignatureError(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
            "date",
            f"X-Amz-Date {amz_date!r} is missing or not YYYYMMDDTHHMMSSZ",
        ) from None
    if scope_date != amz_date[:8]:
        raise SignatureError(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{scope_date}' != '{amz_date[:8]}', from '{amz_date}'.",
            "scope",
            f"credential scope date {scope_date} differs from X-Amz-Date {amz_date}",
        )
    now = now or datetime.datetime.now(datetime.UTC)
    if signed_at < now - MAX_SKEW:
        raise SignatureError(
            f"Signature expired: {amz_date} is now earlier than "
            f"{_fmt(now - MAX_SKEW)} ({_fmt(now)} - 5 min.)",
            "date",
            f"signed at {amz_date}, more than 5 minutes ago (now {_fmt(now)})",
        )
    if signed_at > now + MAX_SKEW:
        raise SignatureError(
            f"Signature not yet current: {amz_date} is still later than "
            f"{_fmt(now + MAX_SKEW)} ({_fmt(now)} + 5 min.)",
            "date",
            f"signed at {amz_date}, more than 5 minutes in the future (now {_fmt(now)})",
        )

    caller = callers.get(access_key)
    if caller is None:
        raise SignatureError(MSG_TOKEN, "key", f"unknown access key {access_key}")
    token = values.get("x-amz-security-token")
    if caller.session_token is not None:
        if not token or not hmac.compare_digest(token[0], caller.session_token):
            raise SignatureError(
                MSG_TOKEN,
                "token",
                f"access key {access_key} is temporary: X-Amz-Security-Token is "
                + ("missing" if not token else "not the one issued with it"),
            )
    elif token:
        raise SignatureError(
            MSG_TOKEN, "token", f"access key {access_key} is permanent but a session token was sent"
        )
    if caller.expires_at is not None and now >= caller.expires_at:
        raise SignatureError(
            MSG_EXPIRED,
            "expiry",
            f"the session token of access key {access_key} expired at "
            f"{_fmt(caller.expires_at)} (now {_fmt(now)})",
        )

    signed_headers = m["signed"].split(";")
    if signed_headers != sorted(set(signed_headers)) or "host" not in signed_headers:
        raise SignatureError(
            MSG_SIGNATURE,
            "canonical request",
            f"SignedHeaders {m['signed']!r} must be sorted, unique and include host",
        )
    missing = [h for h in signed_headers if h not in values]
    if missing:
        raise SignatureError(
            MSG_SIGNATURE, "canonical request", f"signed headers not in the request: {missing}"
        )
    content_shas = values.get("x-amz-content-sha256")
    content_sha = content_shas[0] if content_shas else None
    body_hash = hashlib.sha256(body).hexdigest()
    if content_sha is not None and content_sha != body_hash:
        raise SignatureError(
            MSG_SIGNATURE,
            "payload",
            "X-Amz-Content-SHA256 is not the SHA-256 of the body that arrived"
            + (" (UNSIGNED-PAYLOAD is not accepted)" if content_sha == "UNSIGNED-PAYLOAD" else ""),
        )

    canonical = "\n".join(
        [
            method,
            canonical_uri(raw_path),
            canonical_query(raw_query),
            "".join(f"{h}:{_canonical_value(values[h])}\n" for h in signed_headers),
            ";".join(signed_headers),
            body_hash,
        ]
    )
    scope = f"{scope_date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _signing_key(caller.secret_access_key, scope_date, region, service)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, m["signature"]):
        shown = canonical.replace(token[0], "<session token>") if token else canonical
        raise SignatureError(
            MSG_SIGNATURE,
            "canonical request",
            "signature mismatch; the canonical request computed from what arrived was:\n"
            + shown
            + "\nand the string to sign:\n"
            + string_to_sign,
        )
    return Identity(caller)


def canonical_uri(raw_path: str) -> str:
    """Normalise the path (dot and empty segments) and URI-encode each segment again."""
    segments: list[str] = []
    for segment in raw_path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    path = "/" + "/".join(segments)
    if raw_path.endswith("/") and segments:
        path += "/"
    return quote(path, safe="/~")


def canonical_query(raw_query: str) -> str:
    """Decode every key and value, re-encode with unreserved characters bare, sort."""
    pairs: list[tuple[str, str]] = []
    for piece in raw_query.split("&"):
        if not piece:
            continue
        key, _, value = piece.partition("=")
        pairs.append((_requote(key), _requote(value)))
    pairs.sort()
    return "&".join(f"{k}={v}" for k, v in pairs)


def _requote(text: str) -> str:
    return quote(unquote_to_bytes(text), safe="~")


def _canonical_value(values: list[str]) -> str:
    return ",".join(_SPACES.sub(" ", v.strip()) for v in values)


def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _fmt(when: datetime.datetime) -> str:
    return when.strftime("%Y%m%dT%H%M%SZ")
