"""SigV4 signing of one outgoing request with botocore's signer.

Only headers no hop may change are signed: ``host``, ``x-amz-date``,
``x-amz-content-sha256`` (the body's SHA-256: Function URLs refuse ``UNSIGNED-PAYLOAD``)
and ``x-amz-security-token`` for temporary credentials. The target given must already be
canonical (see :mod:`sigproxy.canonical`): botocore signs the query as given.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

_KEY_CACHE_SIZE = 64


class CachedKeySigV4Auth(SigV4Auth):
    """botocore's SigV4 signer, with the signing key derived once per secret, day,
    region and service instead of four HMACs on every request. botocore still builds
    the canonical request and the string to sign; only the key derivation is reused."""

    _keys: dict[tuple[str, str, str, str], bytes] = {}  # noqa: RUF012 - a process-wide cache

    def __init__(self, credentials: ReadOnlyCredentials, service: str, region: str) -> None:
        super().__init__(credentials, service, region)
        self._scope = (region, service)

    def signature(self, string_to_sign: str, request: Any) -> str:
        secret = self.credentials.secret_key or ""
        date = request.context["timestamp"][0:8]
        region, service = self._scope
        cache_key = (secret, date, region, service)
        key = self._keys.get(cache_key)
        if key is None:
            key = f"AWS4{secret}".encode()
            for part in (date, region, service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            if len(self._keys) >= _KEY_CACHE_SIZE:
                self._keys.clear()  # rotated credentials or a new day: start again
            self._keys[cache_key] = key
        return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def sign(
    method: str,
    origin: str,
    target: str,
    host: str,
    body_sha256: str,
    credentials: ReadOnlyCredentials,
    region: str,
    service: str,
) -> dict[str, str]:
    """Return the headers to add to the request: Authorization, X-Amz-Date,
    X-Amz-Content-SHA256 and, with temporary credentials, X-Amz-Security-Token.

    ``origin`` is ``scheme://host[:port]`` and ``target`` the canonical path and query.
    """
    request = AWSRequest(
        method=method,
        url=origin + target,
        headers={"Host": host, "X-Amz-Content-SHA256": body_sha256},
    )
    CachedKeySigV4Auth(credentials, service, region).add_auth(request)
    headers = request.headers
    signed = {
        "Authorization": headers["Authorization"],
        "X-Amz-Date": headers["X-Amz-Date"],
        "X-Amz-Content-SHA256": body_sha256,
    }
    if credentials.token:
        signed["X-Amz-Security-Token"] = credentials.token
    return signed
