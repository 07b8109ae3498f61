"""SigV4 signing of one outgoing request.

Only headers no hop may change are signed: ``host``, ``x-amz-date``,
``x-amz-content-sha256`` (the body's SHA-256: Function URLs refuse ``UNSIGNED-PAYLOAD``)
and ``x-amz-security-token`` for temporary credentials. The target given must already be
canonical (see :mod:`sigproxy.canonical`).

Two signers give byte-identical headers (tests prove it on the AWS SigV4 test suite, the
signing table and random targets): :class:`Signer`, the default, builds the canonical
request straight from the strings sigproxy already has and keeps the derived key and
the scope; :class:`BotocoreSigner` (``signer: botocore``) hands every request to
botocore's ``SigV4Auth``, the signer of record, at about four times the cost.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from urllib.parse import quote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ALGORITHM = "AWS4-HMAC-SHA256"

_KEY_CACHE_SIZE = 64
_keys: dict[tuple[str, str, str, str], bytes] = {}


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The derived SigV4 key, computed once per secret, day, region and service."""
    cache_key = (secret, date, region, service)
    key = _keys.get(cache_key)
    if key is None:
        key = f"AWS4{secret}".encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        if len(_keys) >= _KEY_CACHE_SIZE:
            _keys.clear()  # rotated credentials or a new day: start again
        _keys[cache_key] = key
    return key


def canonical_uri(path: str) -> str:
    """The path as AWS puts it in the canonical request for every service but S3: each
    character outside the unreserved set and ``/`` percent-encoded (again)."""
    return quote(path, safe="/~")


def canonical_query(query: str) -> str:
    """An already-encoded query with its ``key=value`` pairs sorted by key, then value."""
    if not query:
        return ""
    pairs = sorted([(k, v) for k, _, v in [piece.partition("=") for piece in query.split("&")]])
    return "&".join([f"{k}={v}" for k, v in pairs])


def canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(canonical header block, signed header list): names lower-cased and sorted,
    values trimmed with inner whitespace runs collapsed, repeats joined by commas."""
    grouped: dict[str, list[str]] = {}
    for name, value in headers:
        grouped.setdefault(name.lower(), []).append(" ".join(value.split()))
    names = sorted(grouped)
    block = "".join([f"{name}:{','.join(grouped[name])}\n" for name in names])
    return block, ";".join(names)


def authorization(
    method: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    payload_sha256: str,
    access_key: str,
    secret_key: str,
    timestamp: str,
    region: str,
    service: str,
) -> tuple[str, str, str]:
    """(Authorization header, canonical request, string to sign) for a request whose
    signed headers, including ``x-amz-date``, are ``headers``."""
    block, signed = canonical_headers(headers)
    return _authorize(
        method,
        path,
        query,
        block,
        signed,
        payload_sha256,
        access_key,
        secret_key,
        timestamp,
        region,
        service,
    )


def _authorize(
    method: str,
    path: str,
    query: str,
    header_block: str,
    signed: str,
    payload_sha256: str,
    access_key: str,
    secret_key: str,
    timestamp: str,
    region: str,
    service: str,
) -> tuple[str, str, str]:
    """:func:`authorization` from a ready canonical header block: the part both the
    general path (checked on the AWS SigV4 test suite) and :meth:`Signer.sign_at` run."""
    creq = (
        f"{method}\n{canonical_uri(path)}\n{canonical_query(query)}\n"
        f"{header_block}\n{signed}\n{payload_sha256}"
    )
    date = timestamp[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    sts = f"{ALGORITHM}\n{timestamp}\n{scope}\n{hashlib.sha256(creq.encode()).hexdigest()}"
    key = signing_key(secret_key, date, region, service)
    signature = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    header = (
        f"{ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return header, creq, sts


class _Clock:
    """``YYYYMMDDTHHMMSSZ`` for now, formatted once per second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._text = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
            self._second = second
        return self._text


_clock = _Clock()


class BaseSigner:
    """Signs requests for one upstream host, region and service."""

    __slots__ = ("_host_line", "host", "region", "service")

    def __init__(self, host: str, region: str, service: str) -> None:
        self.host = host
        self.region = region
        self.service = service
        self._host_line = f"host:{' '.join(host.split())}\n"

    def sign(
        self, method: str, target: str, body_sha256: str, credentials: ReadOnlyCredentials
    ) -> list[tuple[str, str]]:
        """The headers to add to the request: Authorization, X-Amz-Date,
        X-Amz-Content-SHA256 and, with temporary credentials, X-Amz-Security-Token.
        ``target`` is the canonical path and query."""
        raise NotImplementedError


class Signer(BaseSigner):
    """sigproxy's own SigV4 code."""

    __slots__ = ()

    def sign(
        self, method: str, target: str, body_sha256: str, credentials: ReadOnlyCredentials
    ) -> list[tuple[str, str]]:
        return self.sign_at(method, target, body_sha256, credentials, _clock.now())

    def sign_at(
        self,
        method: str,
        target: str,
        body_sha256: str,
        credentials: ReadOnlyCredentials,
        timestamp: str,
    ) -> list[tuple[str, str]]:
        """:meth:`sign` for the given ``YYYYMMDDTHHMMSSZ`` time."""
        path, _, query = target.partition("?")
        token = credentials.token
        # The signed header names sort as host < x-amz-content-sha256 < x-amz-date <
        # x-amz-security-token, so the block is built in that order directly rather than
        # by canonical_headers(); the differential tests against botocore check it.
        if token:
            signed = _SIGNED_WITH_TOKEN
            token_line = f"x-amz-security-token:{' '.join(token.split())}\n"
        else:
            signed = _SIGNED
            token_line = ""
        block = (
            f"{self._host_line}x-amz-content-sha256:{body_sha256}\n"
            f"x-amz-date:{timestamp}\n{token_line}"
        )
        header, _, _ = _authorize(
            method,
            path,
            query,
            block,
            signed,
            body_sha256,
            credentials.access_key or "",
            credentials.secret_key or "",
            timestamp,
            self.region,
            self.service,
        )
        return _signed_headers(header, timestamp, body_sha256, token)


def _signed_headers(
    authorization: str, timestamp: str, body_sha256: str, token: str | None
) -> list[tuple[str, str]]:
    out = [
        ("Authorization", authorization),
        ("X-Amz-Date", timestamp),
        ("X-Amz-Content-SHA256", body_sha256),
    ]
    if token:
        out.append(("X-Amz-Security-Token", token))
    return out


_SIGNED = "host;x-amz-content-sha256;x-amz-date"
_SIGNED_WITH_TOKEN = _SIGNED + ";x-amz-security-token"


class _CachedKeySigV4Auth(SigV4Auth):
    """botocore's SigV4 signer with the derived key cached (see :func:`signing_key`);
    botocore still builds the canonical request and the string to sign."""

    def __init__(self, credentials: ReadOnlyCredentials, service: str, region: str) -> None:
        super().__init__(credentials, service, region)
        self._scope = (region, service)

    def signature(self, string_to_sign: str, request: AWSRequest) -> str:
        region, service = self._scope
        secret = self.credentials.secret_key or ""
        key = signing_key(secret, request.context["timestamp"][0:8], region, service)
        return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


class BotocoreSigner(BaseSigner):
    """The same headers, computed by botocore's ``SigV4Auth.add_auth`` (the signer of
    record) at the time botocore reads from its own clock."""

    __slots__ = ()

    def sign(
        self, method: str, target: str, body_sha256: str, credentials: ReadOnlyCredentials
    ) -> list[tuple[str, str]]:
        request = AWSRequest(
            method=method,
            url=f"https://{self.host}{target}",
            headers={"Host": self.host, "X-Amz-Content-SHA256": body_sha256},
        )
        _CachedKeySigV4Auth(credentials, self.service, self.region).add_auth(request)
        headers = request.headers
        return _signed_headers(
            headers["Authorization"], headers["X-Amz-Date"], body_sha256, credentials.token
        )


SIGNER_CLASSES: dict[str, type[BaseSigner]] = {"builtin": Signer, "botocore": BotocoreSigner}
"""By the name the config's ``signer`` key takes."""
