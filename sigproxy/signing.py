"""SigV4 signing of one outgoing request with botocore's signer.

Only headers no hop may change are signed: ``host``, ``x-amz-date``,
``x-amz-content-sha256`` (the body's SHA-256: Function URLs refuse ``UNSIGNED-PAYLOAD``)
and ``x-amz-security-token`` for temporary credentials. The target given must already be
canonical (see :mod:`sigproxy.canonical`): botocore signs the query as given.
"""

from __future__ import annotations

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


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
    SigV4Auth(credentials, service, region).add_auth(request)
    headers = request.headers
    signed = {
        "Authorization": headers["Authorization"],
        "X-Amz-Date": headers["X-Amz-Date"],
        "X-Amz-Content-SHA256": body_sha256,
    }
    if credentials.token:
        signed["X-Amz-Security-Token"] = credentials.token
    return signed
