"""SigV4 signing of one outgoing request.

Only headers no hop may change are signed: ``host``, ``x-amz-date``,
``x-amz-content-sha256`` (the body's SHA-256: Function URLs refuse ``UNSIGNED-PAYLOAD``)
and ``x-amz-security-token`` for temporary credentials. The target given must already be
canonical (see :mod:`sigproxy.canonical`).

Two signers give byte-identical headers (tests prove it on the AWS SigV4 test suite, the
signing table and random targets): :class:`Signer`, the default, builds the canonical
request straight from the strings sigproxy already has and keeps the derived key and
the scope; :class:`~sigproxy.botocore_signer.BotocoreSigner` (``signer: botocore``) hands
every request to botocore's ``SigV4Auth``, the signer of record, at about four times the
cost. This module imports neither botocore nor anything that does I/O; derived keys are
cached by a :class:`SigningKeys` and the time read from a :class:`Clock`, both owned by
whoever builds the signers (one of each per route table).
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import importlib
import time
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import quote

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ALGORITHM = "AWS4-HMAC-SHA256"


class Credentials(Protocol):
    """What signing needs of a set of AWS credentials (botocore's ReadOnlyCredentials
    has it)."""

    @property
    def access_key(self) -> str | None: ...
    @property
    def secret_key(self) -> str | None: ...
    @property
    def token(self) -> str | None: ...


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The derived SigV4 key for a secret, day (``YYYYMMDD``), region and service."""
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


class SigningKeys:
    """Derived keys, each computed once per secret, day, region and service: four HMACs
    saved on every request."""

    __slots__ = ("_keys", "_size")

    def __init__(self, size: int = 64) -> None:
        self._keys: dict[tuple[str, str, str, str], bytes] = {}
        self._size = size

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, secret: str, date: str, region: str, service: str) -> bytes:
        cache_key = (secret, date, region, service)
        key = self._keys.get(cache_key)
        if key is None:
            key = signing_key(secret, date, region, service)
            if len(self._keys) >= self._size:
                self._keys.clear()  # rotated credentials or a new day: start again
            self._keys[cache_key] = key
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
    key = signing_key(secret_key, timestamp[:8], region, service)
    return _authorize(
        method,
        path,
        query,
        block,
        signed,
        payload_sha256,
        access_key,
        key,
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
    key: bytes,
    timestamp: str,
    region: str,
    service: str,
) -> tuple[str, str, str]:
    """:func:`authorization` from a ready canonical header block and derived key: the
    part both the general path (checked on the AWS SigV4 test suite) and
    :meth:`Signer.sign_at` run."""
    creq = (
        f"{method}\n{canonical_uri(path)}\n{canonical_query(query)}\n"
        f"{header_block}\n{signed}\n{payload_sha256}"
    )
    date = timestamp[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    sts = f"{ALGORITHM}\n{timestamp}\n{scope}\n{hashlib.sha256(creq.encode()).hexdigest()}"
    signature = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    header = (
        f"{ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return header, creq, sts


class Clock:
    """``YYYYMMDDTHHMMSSZ`` for now, formatted once per second, corrected by ``offset``:
    the seconds the upstream's clock is ahead of this machine's, learnt from its answers
    (:meth:`observe`, :meth:`measured`) as the AWS SDKs correct clock skew. SigV4 refuses
    signatures more than 5 minutes off, so a laptop whose clock drifted keeps working."""

    __slots__ = ("_date", "_second", "_text", "offset", "skew")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""
        self._date = ""
        self.offset = 0.0
        """Added to this machine's time when signing."""
        self.skew: float | None = None
        """The last offset measured (``None`` before any), corrected for or not."""

    def now(self) -> str:
        second = int(time.time() + self.offset)
        if second != self._second:
            self._text = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
            self._second = second
        return self._text

    def observe(self, date: str, local: float | None = None) -> bool:
        """Learn the upstream's time from the ``Date`` header of an answer that arrived at
        ``local`` (epoch seconds, default now); parsed only when it differs from the last
        one seen, so at most once a second. True when the signing offset changed."""
        if date == self._date:
            return False
        self._date = date
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
        return self.measured(server - (time.time() if local is None else local))

    def measured(self, skew: float) -> bool:
        """The upstream's clock is ``skew`` seconds ahead of this machine's. Beyond
        :data:`SKEW_TOLERANCE` from the offset in use, sign with it from now on (or with
        none, when it is back within the tolerance). True when the offset changed."""
        self.skew = skew
        if abs(skew - self.offset) <= SKEW_TOLERANCE:
            return False
        self.offset = skew if abs(skew) > SKEW_TOLERANCE else 0.0
        self._second = -1
        return True


# Date headers have whole seconds and the answer took time to arrive: differences this
# small are noise, and well inside SigV4's five minutes.
SKEW_TOLERANCE = 60.0


class BaseSigner:
    """Signs requests for one upstream host, region and service. ``keys`` and ``clock``
    are shared by the signers of one route table (each gets its own when not given)."""

    __slots__ = ("_host_line", "clock", "host", "keys", "region", "service")

    def __init__(
        self,
        host: str,
        region: str,
        service: str,
        *,
        keys: SigningKeys | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.host = host
        self.region = region
        self.service = service
        self.keys = keys if keys is not None else SigningKeys()
        self.clock = clock if clock is not None else Clock()
        self._host_line = f"host:{' '.join(host.split())}\n"

    def sign(
        self, method: str, target: str, body_sha256: str, credentials: Credentials
    ) -> list[tuple[str, str]]:
        """The headers to add to the request: Authorization, X-Amz-Date,
        X-Amz-Content-SHA256 and, with temporary credentials, X-Amz-Security-Token.
        ``target`` is the canonical path and query."""
        raise NotImplementedError


class Signer(BaseSigner):
    """sigproxy's own SigV4 code."""

    __slots__ = ()

    def sign(
        self, method: str, target: str, body_sha256: str, credentials: Credentials
    ) -> list[tuple[str, str]]:
        return self.sign_at(method, target, body_sha256, credentials, self.clock.now())

    def sign_at(
        self,
        method: str,
        target: str,
        body_sha256: str,
        credentials: Credentials,
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
            self.keys.get(credentials.secret_key or "", timestamp[:8], self.region, self.service),
            timestamp,
            self.region,
            self.service,
        )
        return signed_headers(header, timestamp, body_sha256, token)


def signed_headers(
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


_SIGNERS = {
    "builtin": "sigproxy.signing:Signer",
    # Only imported when chosen: it is the one signer that needs botocore.
    "botocore": "sigproxy.botocore_signer:BotocoreSigner",
}


def signer_class(name: str) -> type[BaseSigner]:
    """The signer the config's ``signer`` key names (``builtin`` or ``botocore``)."""
    module, _, attr = _SIGNERS[name].partition(":")
    cls: type[BaseSigner] = getattr(importlib.import_module(module), attr)
    return cls
