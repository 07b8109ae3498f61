"""The refusal table: each answer a Function URL gives before running the function, and
what sigproxy calls it (sigproxy.diagnosis, pure), and the clock that learns skew."""

from __future__ import annotations

import datetime
import email.utils
import json
import time

import pytest

from sigproxy.diagnosis import (
    ACCESS_DENIED,
    DIAGNOSES,
    EXPIRED_TOKEN,
    INVALID_SIGNATURE,
    NOT_SIGNED,
    SIGNATURE_EXPIRED,
    UNRECOGNIZED_CLIENT,
    classify,
    explain,
)
from sigproxy.signing import SKEW_TOLERANCE, Clock

MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service "
    "documentation for details."
)
FORBIDDEN = (
    "Forbidden. For troubleshooting Function URL authorization issues, see: "
    "https://docs.aws.amazon.com/lambda/latest/dg/urls-auth.html"
)


def body(key: str, message: str) -> bytes:
    return json.dumps({key: message}, separators=(",", ":")).encode()


CASES = [
    # (status, x-amzn-ErrorType, body, signed, diagnosis)
    (403, "InvalidSignatureException", body("message", MISMATCH), True, INVALID_SIGNATURE),
    (
        403,
        "InvalidSignatureException",
        body(
            "message",
            "Signature expired: 20261130T100000Z is now earlier than 20261130T100500Z "
            "(20261130T101000Z - 5 min.)",
        ),
        True,
        SIGNATURE_EXPIRED,
    ),
    (
        403,
        "InvalidSignatureException",
        body(
            "message",
            "Signature not yet current: 20261130T102000Z is still later than "
            "20261130T101500Z (20261130T101000Z + 5 min.)",
        ),
        True,
        SIGNATURE_EXPIRED,
    ),
    (
        403,
        "UnrecognizedClientException",
        body("message", "The security token included in the request is invalid."),
        True,
        UNRECOGNIZED_CLIENT,
    ),
    (
        403,
        "ExpiredTokenException",
        body("message", "The security token included in the request is expired"),
        True,
        EXPIRED_TOKEN,
    ),
    (403, "AccessDeniedException", body("Message", FORBIDDEN), True, ACCESS_DENIED),
    (403, "AccessDeniedException", body("Message", "Forbidden"), False, NOT_SIGNED),
    # A namespace after the type, as some AWS front ends send it.
    (
        403,
        "InvalidSignatureException:http://internal.amazon.com/coral/com.amazon.coral.service/",
        body("message", MISMATCH),
        True,
        INVALID_SIGNATURE,
    ),
    (
        403,
        "com.amazon.coral.service#ExpiredTokenException",
        body("message", "The security token included in the request is expired"),
        True,
        EXPIRED_TOKEN,
    ),
    (401, "UnrecognizedClientException", b"", True, UNRECOGNIZED_CLIENT),
    (403, "MissingAuthenticationTokenException", b"{}", False, NOT_SIGNED),
]


@pytest.mark.parametrize(("status", "error_type", "raw", "signed", "expected"), CASES)
def test_classify(status: int, error_type: str, raw: bytes, signed: bool, expected: str) -> None:
    refusal = classify(status, error_type, raw, signed=signed)
    assert refusal is not None
    assert refusal.diagnosis == expected
    assert refusal.diagnosis in DIAGNOSES


def test_every_diagnosis_is_reachable() -> None:
    assert {c[-1] for c in CASES} == set(DIAGNOSES)
    assert DIAGNOSES == (
        "invalid-signature",
        "signature-expired",
        "unrecognized-client",
        "expired-token",
        "access-denied",
        "not-signed",
    )


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (403, None),  # the function's own 403
        (403, ""),
        (200, "AccessDeniedException"),  # not a refusal status
        (500, "InvalidSignatureException"),
        (403, "SomeOtherException"),  # a type sigproxy does not know
    ],
)
def test_not_a_refusal(status: int, error_type: str | None) -> None:
    assert classify(status, error_type, body("message", MISMATCH), signed=True) is None


def test_service_clock_is_read_from_the_expired_message() -> None:
    refusal = classify(403, "InvalidSignatureException", CASES[1][2], signed=True)
    assert refusal is not None
    expected = datetime.datetime(2026, 11, 30, 10, 10, tzinfo=datetime.UTC).timestamp()
    assert refusal.server_time == expected
    ahead = classify(403, "InvalidSignatureException", CASES[2][2], signed=True)
    assert ahead is not None and ahead.server_time == expected


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1]", b'{"message": 5}', b"\xff\xfe"])
def test_odd_bodies_still_classify_by_type(raw: bytes) -> None:
    refusal = classify(403, "ExpiredTokenException", raw, signed=True)
    assert refusal is not None
    assert (refusal.diagnosis, refusal.message) == (EXPIRED_TOKEN, "")


def test_message_is_one_bounded_line() -> None:
    raw = body("message", "line one\r\nline two\x1b[31m" + "x" * 5000)
    refusal = classify(403, "InvalidSignatureException", raw, signed=True)
    assert refusal is not None
    assert "\n" not in refusal.message and "\r" not in refusal.message
    assert len(refusal.message) <= 500


def test_only_credential_problems_are_worth_new_credentials() -> None:
    worth = {
        d
        for status, error_type, raw, signed, d in CASES
        if (r := classify(status, error_type, raw, signed=signed)) and r.credentials_problem
    }
    assert worth == {INVALID_SIGNATURE, UNRECOGNIZED_CLIENT, EXPIRED_TOKEN}


@pytest.mark.parametrize("case", CASES, ids=[c[-1] + "-" + str(i) for i, c in enumerate(CASES)])
def test_explain_says_meaning_and_fix(case: tuple[int, str, bytes, bool, str]) -> None:
    status, error_type, raw, signed, _ = case
    refusal = classify(status, error_type, raw, signed=signed)
    assert refusal is not None
    line = explain(refusal, upstream="orders", credentials="profile dev (sso)", url="https://x")
    assert line.startswith(f"upstream orders refused the request ({refusal.diagnosis}; ")
    assert "\n" not in line
    # Every placeholder filled in, with this upstream's words.
    assert "{credentials}" not in line and "{url}" not in line and "{upstream}" not in line
    if refusal.diagnosis in (INVALID_SIGNATURE, UNRECOGNIZED_CLIENT, EXPIRED_TOKEN, ACCESS_DENIED):
        assert "profile dev (sso)" in line
    if refusal.diagnosis == ACCESS_DENIED:
        for needed in (
            "lambda:InvokeFunctionUrl",
            "lambda:InvokeFunction",
            "lambda:InvokedViaFunctionUrl",
            "lambda:FunctionUrlAuthType",
            "add-permission",
        ):
            assert needed in line
    if refusal.diagnosis == NOT_SIGNED:
        assert "auth: aws_iam" in line


# --- the clock that learns the upstream's skew -------------------------------------------


def http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


def test_clock_learns_skew_from_date_headers() -> None:
    clock = Clock()
    now = time.time()
    assert clock.observe(http_date(now + 30), now) is False  # within tolerance
    assert clock.offset == 0.0 and clock.skew is not None and 28 <= clock.skew <= 31
    assert clock.observe(http_date(now + 600), now) is True
    assert 598 <= clock.offset <= 601
    signed = datetime.datetime.strptime(clock.now(), "%Y%m%dT%H%M%SZ")
    expected = datetime.datetime.fromtimestamp(now + 600, datetime.UTC).replace(tzinfo=None)
    assert abs((signed - expected).total_seconds()) <= 3
    # The same header again is not parsed again, and changes nothing.
    assert clock.observe(http_date(now + 600), now + 100) is False
    # The machine's clock was set right: the skew is gone, and so is the correction.
    assert clock.observe(http_date(now + 1), now) is True
    assert clock.offset == 0.0


def test_clock_ignores_bad_dates() -> None:
    clock = Clock()
    for junk in ("", "yesterday", "Mon, 99 Foo 2026 99:99:99 GMT", "0" * 400):
        assert clock.observe(junk, time.time()) is False
    assert clock.offset == 0.0 and clock.skew is None


def test_skew_tolerance_is_well_inside_sigv4_window() -> None:
    assert SKEW_TOLERANCE <= 60
    clock = Clock()
    assert clock.measured(-SKEW_TOLERANCE) is False
    assert clock.measured(-SKEW_TOLERANCE - 5) is True
    assert clock.offset == -SKEW_TOLERANCE - 5
