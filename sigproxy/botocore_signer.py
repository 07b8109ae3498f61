"""``signer: botocore``: SigV4 computed by botocore's ``SigV4Auth``, the signer of record.

Byte-identical to :class:`sigproxy.signing.Signer` (tests/test_signers.py proves it) at
about four times the cost; kept as a switch and as the reference the builtin signer is
checked against.
"""

from __future__ import annotations

import hashlib
import hmac

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from .signing import BaseSigner, Credentials, SigningKeys, signed_headers


class _CachedKeySigV4Auth(SigV4Auth):
    """botocore's SigV4 signer with the derived key from a :class:`SigningKeys`; botocore
    still builds the canonical request and the string to sign."""

    def __init__(
        self,
        credentials: ReadOnlyCredentials,
        service: str,
        region: str,
        keys: SigningKeys,
        timestamp: str,
    ) -> None:
        super().__init__(credentials, service, region)
        self._scope = (region, service)
        self._keys = keys
        self._timestamp = timestamp

    def add_auth(self, request: AWSRequest) -> None:
        # SigV4Auth.add_auth with the time of sigproxy's Clock, which corrects for the
        # upstream's clock skew, instead of botocore's own clock; the rest is botocore's.
        # tests/test_signers.py proves the result byte-identical to the builtin signer.
        request.context["timestamp"] = self._timestamp
        self._modify_request_before_signing(request)  # type: ignore[attr-defined]
        canonical_request = self.canonical_request(request)
        string_to_sign = self.string_to_sign(request, canonical_request)
        self._inject_signature_to_request(  # type: ignore[attr-defined]
            request, self.signature(string_to_sign, request)
        )

    def signature(self, string_to_sign: str, request: AWSRequest) -> str:
        region, service = self._scope
        secret = self.credentials.secret_key or ""
        key = self._keys.get(secret, request.context["timestamp"][0:8], region, service)
        return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


class BotocoreSigner(BaseSigner):
    """The same headers, computed by botocore's ``SigV4Auth`` at the time of the
    signer's :class:`~sigproxy.signing.Clock`."""

    __slots__ = ()

    def sign(
        self, method: str, target: str, body_sha256: str, credentials: Credentials
    ) -> list[tuple[str, str]]:
        request = AWSRequest(
            method=method,
            url=f"https://{self.host}{target}",
            headers={"Host": self.host, "X-Amz-Content-SHA256": body_sha256},
        )
        frozen = ReadOnlyCredentials(
            credentials.access_key, credentials.secret_key, credentials.token
        )
        _CachedKeySigV4Auth(
            frozen, self.service, self.region, self.keys, self.clock.now()
        ).add_auth(request)
        headers = request.headers
        return signed_headers(
            headers["Authorization"], headers["X-Amz-Date"], body_sha256, credentials.token
        )
