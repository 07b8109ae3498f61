"""What an upstream refusal means: the 401/403 a Function URL answers when it will not
run the function, read from its ``x-amzn-ErrorType`` header and message.

The proxy is the one place that knows both the request it signed and the answer, so it
names the cause for the client (``X-Sigproxy-Diagnosis``), for the log (what it means
and the fix) and for the metrics. Pure: no I/O, no clock.

Function URLs answer a refusal before the function runs with a type such as
``InvalidSignatureException`` (sometimes followed by ``:`` and a namespace) and a small
JSON body ``{"message": ...}`` or ``{"Message": ...}``. A 401/403 without a type is the
function's own answer and is not a refusal.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from typing import Final

HEADER: Final = "X-Sigproxy-Diagnosis"

INVALID_SIGNATURE: Final = "invalid-signature"
SIGNATURE_EXPIRED: Final = "signature-expired"
UNRECOGNIZED_CLIENT: Final = "unrecognized-client"
EXPIRED_TOKEN: Final = "expired-token"  # noqa: S105 - a diagnosis, not a secret
ACCESS_DENIED: Final = "access-denied"
NOT_SIGNED: Final = "not-signed"
DIAGNOSES: Final = (
    INVALID_SIGNATURE,
    SIGNATURE_EXPIRED,
    UNRECOGNIZED_CLIENT,
    EXPIRED_TOKEN,
    ACCESS_DENIED,
    NOT_SIGNED,
)

# The largest refusal body read to classify it: the service's are under 300 bytes.
MAX_BODY: Final = 16 * 1024

# x-amzn-ErrorType (before any ":") -> diagnosis. InvalidSignatureException is split by
# its message (clock or signature) in classify().
_TYPES: Final = {
    "InvalidSignatureException": INVALID_SIGNATURE,
    "SignatureDoesNotMatch": INVALID_SIGNATURE,
    "IncompleteSignatureException": INVALID_SIGNATURE,
    "UnrecognizedClientException": UNRECOGNIZED_CLIENT,
    "InvalidClientTokenId": UNRECOGNIZED_CLIENT,
    "ExpiredTokenException": EXPIRED_TOKEN,
    "ExpiredToken": EXPIRED_TOKEN,
    "AccessDeniedException": ACCESS_DENIED,
    "AccessDenied": ACCESS_DENIED,
    "MissingAuthenticationTokenException": NOT_SIGNED,
}

# "Signature expired: 20251020T101500Z is now earlier than 20251020T102000Z
#  (20251020T102500Z - 5 min.)" and "Signature not yet current: ... (... + 5 min.)":
# the last timestamp is the service's own clock.
_CLOCK_RE: Final = re.compile(
    r"Signature (?:expired|not yet current):.*\((\d{8}T\d{6}Z) [-+] \d+ min\.\)"
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upstream refusal: the diagnosis, the type and message as the service gave them
    (for the log), and the service's clock when the message tells it."""

    diagnosis: str
    error_type: str
    message: str
    server_time: float | None = None

    @property
    def credentials_problem(self) -> bool:
        """Fresh credentials from the source may cure it."""
        return self.diagnosis in (UNRECOGNIZED_CLIENT, EXPIRED_TOKEN, INVALID_SIGNATURE)


def classify(status: int, error_type: str | None, body: bytes, *, signed: bool) -> Refusal | None:
    """The refusal an upstream answer is, or ``None`` when it is not one (any other
    status, or a 401/403 the function itself sent, which carries no error type)."""
    if status not in (401, 403) or not error_type:
        return None
    # "Type", "Type:namespace" or "namespace#Type", as botocore reads it.
    kind = error_type.split(":", 1)[0].rsplit("#", 1)[-1].strip()
    diagnosis = _TYPES.get(kind)
    if diagnosis is None:
        return None
    message = _message(body)
    server_time = None
    if kind == "InvalidSignatureException" and message.startswith("Signature "):
        m = _CLOCK_RE.search(message)
        if m is not None or "expired" in message or "not yet current" in message:
            diagnosis = SIGNATURE_EXPIRED
            server_time = _amz_time(m.group(1)) if m is not None else None
    if not signed and diagnosis == ACCESS_DENIED:
        diagnosis = NOT_SIGNED  # sigproxy sent it unsigned (auth: none)
    return Refusal(diagnosis, kind, message, server_time)


def _message(body: bytes) -> str:
    try:
        data = json.loads(body[:MAX_BODY])
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    for key in ("message", "Message"):
        value = data.get(key)
        if isinstance(value, str):
            # One line for the log, whatever the body holds.
            return " ".join(value.split())[:500]
    return ""


def _amz_time(text: str) -> float | None:
    try:
        when = datetime.datetime.strptime(text, "%Y%m%dT%H%M%SZ")
    except ValueError:
        return None
    return when.replace(tzinfo=datetime.UTC).timestamp()


def explain(refusal: Refusal, *, upstream: str, credentials: str, url: str) -> str:
    """One log line: what the refusal means for this upstream and what fixes it.
    ``credentials`` describes the source (``profile dev (sso)``), never a key."""
    said = f"{refusal.error_type}: {refusal.message}" if refusal.message else refusal.error_type
    what, fix = _MEANING[refusal.diagnosis]
    text = f"{what} {fix}".format(upstream=upstream, credentials=credentials, url=url)
    return f"upstream {upstream} refused the request ({refusal.diagnosis}; {said}). {text}"


# What each diagnosis means and the fix, for the log. access-denied lists the policy
# statements to add (https://docs.aws.amazon.com/lambda/latest/dg/urls-auth.html).
_MEANING: Final = {
    INVALID_SIGNATURE: (
        "The service computed a different signature from the bytes that arrived.",
        "Check that the upstream's region and url are the Function URL's own (sign for "
        "service lambda), that nothing between sigproxy and the URL rewrites the path, "
        "query or Host, and that the secret key of {credentials} belongs to its access key.",
    ),
    SIGNATURE_EXPIRED: (
        "The signature's time is more than 5 minutes from the service's clock.",
        "Set this machine's clock (NTP: timedatectl set-ntp true); sigproxy corrects "
        "for the offset it measured meanwhile.",
    ),
    UNRECOGNIZED_CLIENT: (
        "The access key of {credentials} is not one AWS knows (deleted, deactivated, "
        "mistyped, or a session token that does not belong to it).",
        "Put valid keys where {credentials} reads them (aws configure, or aws sso login "
        "for SSO profiles); sigproxy picks them up without a restart.",
    ),
    EXPIRED_TOKEN: (
        "The session token of {credentials} has expired.",
        "Renew it (aws sso login, aws login, or new temporary keys in the credentials "
        "file); sigproxy picks the new ones up without a restart.",
    ),
    ACCESS_DENIED: (
        "The signature was valid, but IAM did not allow {credentials} to invoke the "
        "function behind {url}.",
        "The caller needs both actions on the function (since October 2025): an identity "
        'policy statement {{"Effect": "Allow", "Action": "lambda:InvokeFunctionUrl", '
        '"Resource": "<function ARN>", "Condition": {{"StringEquals": '
        '{{"lambda:FunctionUrlAuthType": "AWS_IAM"}}}}}} and {{"Effect": "Allow", '
        '"Action": "lambda:InvokeFunction", "Resource": "<function ARN>", "Condition": '
        '{{"Bool": {{"lambda:InvokedViaFunctionUrl": "true"}}}}}}; a caller in another '
        "account also needs both in the function's resource policy (aws lambda "
        "add-permission --action lambda:InvokeFunctionUrl --function-url-auth-type "
        "AWS_IAM, and --action lambda:InvokeFunction --invoked-via-function-url); check "
        "that no policy's lambda:FunctionUrlAuthType condition excludes AWS_IAM.",
    ),
    NOT_SIGNED: (
        "sigproxy sent the request unsigned (auth: none) and the URL requires a "
        "signature (AuthType AWS_IAM), or its resource policy does not allow public calls.",
        "Set auth: aws_iam (with region) on upstream {upstream}; or, for a public URL "
        "(AuthType NONE), grant lambda:InvokeFunctionUrl and lambda:InvokeFunction to "
        'principal "*" in its resource policy.',
    ),
}
