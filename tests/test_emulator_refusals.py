"""Every refusal of the local Function URL, as the service gives it: status,
``x-amzn-ErrorType`` and body byte for byte, with a ``Date`` from the emulator's clock
(``clock_offset``), for requests signed by botocore's SigV4Auth (not by sigproxy's
signer). Real servers on loopback; nothing patched: other times are reached by moving
the emulator's clock, not the client's."""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sigproxy.config import parse_yaml
from sigproxy.emulator.config import EmulatorConfig, build_emulator_config, load_emulator_config
from sigproxy.emulator.server import (
    MSG_DENIED,
    FunctionUrl,
    RunningFunction,
    start_functions,
    stop_functions,
)
from sigproxy.emulator.sigv4 import MSG_EXPIRED, MSG_SIGNATURE, MSG_TOKEN, SignatureError, verify
from sigproxy.errors import ConfigError
from sigproxy.logs import protect_secrets

from .support import ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, RawResponse, raw_request

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
BOTH = ["lambda:InvokeFunctionUrl", "lambda:InvokeFunction"]
USER_ARN = "arn:aws:iam::111122223333:user/example-user"
OTHER_ARN = "arn:aws:iam::444455556666:role/other-team"
PERMANENT_KEY, PERMANENT_SECRET = "AKIDPERMANENTCALLER1", "permanent-secret-key"
OTHER_KEY, OTHER_SECRET = "AKIDOTHERACCOUNT0001", "other-account-secret"
# Signing changes for the two other callers.
OTHER: dict[str, Any] = {"key": OTHER_KEY, "secret": OTHER_SECRET, "token": None}
PERMANENT: dict[str, Any] = {"key": PERMANENT_KEY, "secret": PERMANENT_SECRET, "token": None}
FIVE_MIN = datetime.timedelta(minutes=5)
IMF_FIXDATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")


def compact(value: Any) -> bytes:
    """JSON the way the service writes its error bodies: no spaces."""
    return json.dumps(value, separators=(",", ":")).encode()


def callers(*, expires_at: str | None = None) -> list[dict[str, Any]]:
    """The test caller (temporary keys, account 1111...), a permanent one in the same
    account and one in another account."""
    temporary: dict[str, Any] = {
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "session_token": SESSION_TOKEN,
        "account_id": "111122223333",
        "user_arn": USER_ARN,
    }
    if expires_at is not None:
        temporary["expires_at"] = expires_at
    return [
        temporary,
        {
            "access_key_id": PERMANENT_KEY,
            "secret_access_key": PERMANENT_SECRET,
            "account_id": "111122223333",
            "user_arn": "arn:aws:iam::111122223333:user/permanent",
        },
        {
            "access_key_id": OTHER_KEY,
            "secret_access_key": OTHER_SECRET,
            "account_id": "444455556666",
            "user_arn": OTHER_ARN,
        },
    ]


def iso(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def real_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --- a client that signs with botocore ---------------------------------------------------


def botocore_signed(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    key: str = ACCESS_KEY,
    secret: str = SECRET_KEY,
    token: str | None = SESSION_TOKEN,
    region: str = REGION,
    service: str = "lambda",
) -> list[tuple[str, str]]:
    """The headers botocore's SigV4Auth adds for ``method url`` (Host is signed from the
    URL and sent by the client)."""
    protect_secrets()  # botocore's debug lines carry the canonical request and its token
    request = AWSRequest(method=method, url=url, data=body)
    SigV4Auth(Credentials(key, secret, token), service, region).add_auth(request)
    return [(k, v) for k, v in request.headers.items() if k.lower() != "host"]


async def send(
    url: str,
    method: str = "GET",
    target: str = "/?name=x",
    body: bytes = b"",
    *,
    unsigned: bool = False,
    headers: list[tuple[str, str]] | None = None,
    **signing: Any,
) -> RawResponse:
    """One request to the function at ``url``, signed by botocore unless ``unsigned``."""
    host = urlsplit(url).netloc
    port = urlsplit(url).port
    assert port is not None
    sent = list(headers or [])
    if not unsigned:
        sent += botocore_signed(method, url + target, body, **signing)
    return await raw_request(port, method, target, sent, body if body else None, host=host)


def assert_refusal(resp: RawResponse, status: int, error_type: str | None, body: Any) -> None:
    assert resp.status == status, resp.body
    assert resp.header("x-amzn-ErrorType") == error_type
    assert resp.header("Content-Type") == "application/json"
    assert resp.body == compact(body), resp.body


def date_of(resp: RawResponse) -> datetime.datetime:
    """The response's one Date header, which must be an IMF-fixdate."""
    (value,) = resp.all("Date")
    assert IMF_FIXDATE.fullmatch(value), value
    return email.utils.parsedate_to_datetime(value)


# --- serving functions from an emulator section ------------------------------------------

Calls = list[str]
Serve = Callable[..., Awaitable[dict[str, str]]]


@pytest.fixture
async def serve(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> tuple[Serve, Calls]:
    """``urls = await serve({emulator section})``: each function answers with its event
    and records its name in ``calls``, so a refusal can be seen not to invoke it."""
    calls: Calls = []

    async def start(section: dict[str, Any]) -> dict[str, str]:
        config = build_emulator_config({"region": REGION, "callers": callers(), **section})
        urls = {}
        for fn in config.functions:

            def handler(event: dict[str, Any], context: Any, name: str = fn.name) -> Any:
                calls.append(name)
                return {"statusCode": 200, "body": json.dumps(event)}

            app = FunctionUrl(fn, config, handler).app()
            server = await aiohttp_server(app, access_log=None)
            urls[fn.name] = f"http://127.0.0.1:{server.port}"
        return urls

    return start, calls


def function(name: str = "fn", **fields: Any) -> dict[str, Any]:
    return {"name": name, "handler": "unused:handler", **fields}


# --- signature refusals, each with its own type and body -------------------------------

SIGNING_REFUSALS: list[tuple[str, dict[str, Any], str, dict[str, str]]] = [
    # (case, signing changes, x-amzn-ErrorType, exact body)
    ("wrong region", {"region": "eu-west-1"}, "InvalidSignatureException",
     {"message": "Credential should be scoped to a valid region, not 'eu-west-1'."}),
    ("wrong service", {"service": "execute-api"}, "InvalidSignatureException",
     {"message": "Credential should be scoped to correct service: 'lambda'."}),
    ("unknown key", {"key": "AKIDNOBODYKNOWSTHIS1"}, "UnrecognizedClientException",
     {"message": MSG_TOKEN}),
    ("token missing", {"token": None}, "UnrecognizedClientException", {"message": MSG_TOKEN}),
    ("token mismatch", {"token": "another-token"}, "UnrecognizedClientException",
     {"message": MSG_TOKEN}),
    ("token on permanent keys",
     {"key": PERMANENT_KEY, "secret": PERMANENT_SECRET, "token": "stray"},
     "UnrecognizedClientException", {"message": MSG_TOKEN}),
    ("wrong secret", {"secret": "not-the-secret"}, "InvalidSignatureException",
     {"message": MSG_SIGNATURE}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "changes", "error_type", "body"),
    SIGNING_REFUSALS,
    ids=[r[0] for r in SIGNING_REFUSALS],
)
async def test_signing_refusals(
    serve: tuple[Serve, Calls],
    case: str,
    changes: dict[str, Any],
    error_type: str,
    body: dict[str, str],
) -> None:
    start, calls = serve
    urls = await start({"functions": [function()]})
    resp = await send(urls["fn"], "POST", "/x?a=1", b'{"k": 1}', **changes)
    assert_refusal(resp, 403, error_type, body)
    assert calls == []


async def test_botocore_signed_requests_are_accepted(serve: tuple[Serve, Calls]) -> None:
    start, calls = serve
    urls = await start({"functions": [function()]})
    signings: list[dict[str, Any]] = [{}, PERMANENT]
    for signing in signings:
        resp = await send(urls["fn"], "POST", "/x?a=1", b'{"k": 1}', **signing)
        assert resp.status == 200, resp.body
    assert calls == ["fn", "fn"]


@pytest.mark.parametrize(
    ("headers", "error_type", "body"),
    [
        ([], "AccessDeniedException", {"Message": "Forbidden"}),
        ([("Authorization", "Bearer abc")], "InvalidSignatureException",
         {"message": "Authorization header requires 'Credential', 'SignedHeaders' and "
                     "'Signature' parameters of an AWS4-HMAC-SHA256 signature."}),
    ],
    ids=["no Authorization", "not SigV4"],
)  # fmt: skip
async def test_unsigned_and_malformed_authorization(
    serve: tuple[Serve, Calls], headers: list[tuple[str, str]], error_type: str, body: Any
) -> None:
    start, calls = serve
    urls = await start({"functions": [function()]})
    resp = await send(urls["fn"], unsigned=True, headers=headers)
    assert_refusal(resp, 403, error_type, body)
    assert calls == []


# --- the clock: clock_offset moves the SigV4 window, and every Date --------------------


def assert_window_message(
    resp: RawResponse, offset: float, word: str, sign: str, skew: datetime.timedelta
) -> None:
    assert resp.status == 403
    assert resp.header("x-amzn-ErrorType") == "InvalidSignatureException"
    message = json.loads(resp.body)["message"]
    m = re.fullmatch(
        rf"Signature {word}: (\d{{8}}T\d{{6}}Z) is (?:now earlier|still later) than "
        rf"(\d{{8}}T\d{{6}}Z) \((\d{{8}}T\d{{6}}Z) \{sign} 5 min\.\)",
        message,
    )
    assert m, message
    signed_at, bound, now = (
        datetime.datetime.strptime(t, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        for t in m.groups()
    )
    assert bound == now + skew
    expected_now = real_now() + datetime.timedelta(seconds=offset)
    assert abs((now - expected_now).total_seconds()) <= 2
    assert abs((signed_at - real_now()).total_seconds()) <= 2
    assert resp.body == compact({"message": message})


async def test_clock_ahead_says_signature_expired_and_dates_ahead(
    serve: tuple[Serve, Calls],
) -> None:
    start, calls = serve
    urls = await start({"clock_offset": 600, "functions": [function()]})
    resp = await send(urls["fn"])
    assert_window_message(resp, 600, "expired", "-", -FIVE_MIN)
    ahead = (date_of(resp) - real_now()).total_seconds()
    assert 598 <= ahead <= 602, ahead
    assert calls == []


async def test_clock_behind_says_signature_not_yet_current(serve: tuple[Serve, Calls]) -> None:
    start, calls = serve
    urls = await start({"clock_offset": -600, "functions": [function()]})
    resp = await send(urls["fn"])
    assert_window_message(resp, -600, "not yet current", "+", FIVE_MIN)
    behind = (real_now() - date_of(resp)).total_seconds()
    assert 598 <= behind <= 602, behind
    assert calls == []


async def test_within_the_window_the_event_and_date_use_the_emulator_clock(
    serve: tuple[Serve, Calls],
) -> None:
    start, _ = serve
    urls = await start({"clock_offset": 240, "functions": [function()]})
    resp = await send(urls["fn"])
    assert resp.status == 200, resp.body
    event = json.loads(resp.body)
    assert abs(event["requestContext"]["timeEpoch"] / 1000 - (time.time() + 240)) <= 2
    assert abs((date_of(resp) - real_now()).total_seconds() - 240) <= 2


def handler_raises(event: Any, context: Any) -> Any:
    raise ValueError("the handler fails")


async def test_every_response_carries_the_emulator_date(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    """200, 403 (signature and policy), 413, 502 and a CORS preflight: each has exactly
    one Date, 3600 s ahead."""
    config = build_emulator_config(
        {
            "clock_offset": 3600,
            "functions": [
                function("ok", auth="NONE", cors={"allow_origins": ["*"]}),
                function("denied", auth="NONE", allow=[{"principal": USER_ARN, "actions": BOTH}]),
                function("fails", auth="NONE"),
                function("iam"),
            ],
            "callers": callers(),
        }
    )
    handlers = {"ok": lambda e, c: "fine", "denied": lambda e, c: "no", "fails": handler_raises}
    ports: dict[str, int] = {}
    for fn in config.functions:
        app = FunctionUrl(fn, config, handlers.get(fn.name, handler_raises)).app()
        server = await aiohttp_server(app, access_log=None)
        assert server.port is not None
        ports[fn.name] = server.port
    responses = {
        200: await raw_request(ports["ok"], "GET", "/"),
        "preflight": await raw_request(
            ports["ok"],
            "OPTIONS",
            "/",
            [("Origin", "http://localhost:3000"), ("Access-Control-Request-Method", "GET")],
        ),
        403: await raw_request(ports["iam"], "GET", "/"),
        "403 policy": await raw_request(ports["denied"], "GET", "/"),
        413: await raw_request(ports["ok"], "POST", "/", body=b"y" * (6 * 1024 * 1024 + 1)),
        502: await raw_request(ports["fails"], "GET", "/"),
    }
    assert responses[403].status == 403 and responses["403 policy"].status == 403
    assert responses[413].status == 413 and responses[502].status == 502
    assert responses["preflight"].status == 200
    for what, resp in responses.items():
        ahead = (date_of(resp) - real_now()).total_seconds()
        assert 3598 <= ahead <= 3602, (what, ahead)


async def test_the_config_file_drives_the_clock_of_started_functions(tmp_path: Path) -> None:
    """clock_offset from a YAML file, through start_functions (what `sigproxy emulate`
    runs), with the example hello handler."""
    path = tmp_path / "emulator.yaml"
    path.write_text(
        "emulator:\n"
        "  clock_offset: 600\n"
        "  callers:\n"
        f"    - {{access_key_id: {ACCESS_KEY}, secret_access_key: '${{SECRET}}',"
        f" session_token: '${{TOKEN}}'}}\n"
        f"  functions:\n    - {{name: hello, handler: '{ROOT / 'examples/hello.py'}:handler'}}\n"
    )
    config = load_emulator_config(str(path), {"SECRET": SECRET_KEY, "TOKEN": SESSION_TOKEN})
    running: list[RunningFunction] = await start_functions(config)
    try:
        resp = await send(running[0].url)
    finally:
        await stop_functions(running)
    assert_window_message(resp, 600, "expired", "-", -FIVE_MIN)
    assert abs((date_of(resp) - real_now()).total_seconds() - 600) <= 2


# --- expired session tokens ------------------------------------------------------------


async def test_expired_token_is_its_own_refusal(serve: tuple[Serve, Calls]) -> None:
    start, calls = serve
    urls = await start(
        {
            "callers": callers(expires_at=iso(real_now() - datetime.timedelta(minutes=1))),
            "functions": [function()],
        }
    )
    resp = await send(urls["fn"])
    assert_refusal(resp, 403, "ExpiredTokenException", {"message": MSG_EXPIRED})
    assert resp.body == b'{"message":"The security token included in the request is expired"}'
    # The token is compared before its expiry, and its expiry before the signature.
    mismatch = await send(urls["fn"], token="another-token")
    assert_refusal(mismatch, 403, "UnrecognizedClientException", {"message": MSG_TOKEN})
    bad_signature = await send(urls["fn"], secret="not-the-secret")
    assert_refusal(bad_signature, 403, "ExpiredTokenException", {"message": MSG_EXPIRED})
    # Permanent keys never expire.
    permanent = await send(urls["fn"], key=PERMANENT_KEY, secret=PERMANENT_SECRET, token=None)
    assert permanent.status == 200
    assert calls == ["fn"]


async def test_token_before_expiry_is_accepted(serve: tuple[Serve, Calls]) -> None:
    start, calls = serve
    urls = await start(
        {
            "callers": callers(expires_at=iso(real_now() + datetime.timedelta(hours=1))),
            "functions": [function()],
        }
    )
    resp = await send(urls["fn"])
    assert resp.status == 200, resp.body
    assert calls == ["fn"]


async def test_expiry_is_judged_by_the_emulator_clock(serve: tuple[Serve, Calls]) -> None:
    """Real time has not reached expires_at, the emulator's clock (4 min ahead, inside
    the signing window) has."""
    start, _ = serve
    urls = await start(
        {
            "clock_offset": 240,
            "callers": callers(expires_at=iso(real_now() + datetime.timedelta(minutes=2))),
            "functions": [function()],
        }
    )
    resp = await send(urls["fn"])
    assert_refusal(resp, 403, "ExpiredTokenException", {"message": MSG_EXPIRED})


def test_expired_at_the_instant_of_expires_at() -> None:
    """verify() with the request's own signing time as ``now``: a token expiring then is
    expired; one expiring a second later is not."""
    url = "http://127.0.0.1:9001/x?a=1"
    headers = botocore_signed("GET", url)
    amz_date = dict(headers)["X-Amz-Date"]
    signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    config = build_emulator_config(
        {"callers": callers(expires_at=iso(signed_at)), "functions": [function()]}
    )
    caller = config.caller_map()[ACCESS_KEY]
    arrived = [("Host", "127.0.0.1:9001"), *headers]

    def check(expires_at: datetime.datetime) -> None:
        known = {ACCESS_KEY: dataclasses.replace(caller, expires_at=expires_at)}
        verify("GET", "/x", "a=1", arrived, b"", known, REGION, now=signed_at)

    with pytest.raises(SignatureError) as info:
        check(signed_at)
    assert (info.value.message, info.value.part) == (MSG_EXPIRED, "expiry")
    check(signed_at + datetime.timedelta(seconds=1))


# --- the resource policy (allow) -------------------------------------------------------


def denied_body() -> dict[str, str]:
    return {"Message": MSG_DENIED}


async def test_both_actions_granted_is_allowed(serve: tuple[Serve, Calls]) -> None:
    start, calls = serve
    urls = await start(
        {
            "functions": [
                function("one", allow=[{"principal": USER_ARN, "actions": BOTH}]),
                # Grants add up across entries.
                function(
                    "split",
                    allow=[
                        {"principal": USER_ARN, "actions": ["lambda:InvokeFunctionUrl"]},
                        {"principal": "111122223333", "actions": ["lambda:InvokeFunction"]},
                    ],
                ),
            ]
        }
    )
    for name in ("one", "split"):
        resp = await send(urls[name])
        assert resp.status == 200, (name, resp.body)
    assert calls == ["one", "split"]


async def test_function_url_permission_alone_is_denied(
    serve: tuple[Serve, Calls], caplog: pytest.LogCaptureFixture
) -> None:
    start, calls = serve
    urls = await start(
        {
            "functions": [
                function(
                    allow=[{"principal": USER_ARN, "actions": ["lambda:InvokeFunctionUrl"]}],
                    cors={"allow_origins": ["*"]},
                )
            ]
        }
    )
    with caplog.at_level(logging.WARNING, logger="sigproxy.emulator"):
        resp = await send(urls["fn"])
    assert_refusal(resp, 403, "AccessDeniedException", denied_body())
    assert resp.body == compact(
        {
            "Message": "Forbidden. For troubleshooting Function URL authorization issues, "
            "see: https://docs.aws.amazon.com/lambda/latest/dg/urls-auth.html"
        }
    )
    assert calls == []
    (record,) = [r for r in caplog.records if "permission check failed" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert USER_ARN in record.getMessage()
    assert record.getMessage().endswith("is not allowed lambda:InvokeFunction")
    assert SESSION_TOKEN not in caplog.text and SECRET_KEY not in caplog.text
    # A preflight is answered before auth, so the policy does not touch it.
    preflight = await send(
        urls["fn"],
        "OPTIONS",
        "/",
        unsigned=True,
        headers=[("Origin", "http://a.example"), ("Access-Control-Request-Method", "GET")],
    )
    assert preflight.status == 200
    assert preflight.header("Access-Control-Allow-Origin") == "*"


async def test_signature_is_checked_before_the_policy(serve: tuple[Serve, Calls]) -> None:
    start, _ = serve
    urls = await start({"functions": [function(allow=[])]})
    resp = await send(urls["fn"], secret="not-the-secret")
    assert_refusal(resp, 403, "InvalidSignatureException", {"message": MSG_SIGNATURE})
    resp = await send(urls["fn"])
    assert_refusal(resp, 403, "AccessDeniedException", denied_body())


@pytest.mark.parametrize(
    ("principal", "signing", "allowed"),
    [
        (USER_ARN, {}, True),
        (USER_ARN, PERMANENT, False),  # same account, another user: not listed
        (USER_ARN, OTHER, False),  # another account, not listed
        ("111122223333", {}, True),
        ("111122223333", PERMANENT, True),
        ("111122223333", OTHER, False),
        ("444455556666", OTHER, True),
        (OTHER_ARN, OTHER, True),
        ("*", {}, True),
        ("*", OTHER, True),
    ],
)
async def test_principals(
    serve: tuple[Serve, Calls], principal: str, signing: dict[str, Any], allowed: bool
) -> None:
    start, calls = serve
    urls = await start({"functions": [function(allow=[{"principal": principal, "actions": BOTH}])]})
    resp = await send(urls["fn"], **signing)
    if allowed:
        assert resp.status == 200, resp.body
        assert calls == ["fn"]
    else:
        assert_refusal(resp, 403, "AccessDeniedException", denied_body())
        assert calls == []


async def test_auth_none_is_principal_star(serve: tuple[Serve, Calls]) -> None:
    start, calls = serve
    urls = await start(
        {
            "functions": [
                function("open", auth="NONE"),
                function("star", auth="NONE", allow=[{"principal": "*", "actions": BOTH}]),
                function("named", auth="NONE", allow=[{"principal": USER_ARN, "actions": BOTH}]),
                function(
                    "half",
                    auth="NONE",
                    allow=[{"principal": "*", "actions": ["lambda:InvokeFunctionUrl"]}],
                ),
            ]
        }
    )
    for name in ("open", "star"):
        resp = await send(urls[name], unsigned=True)
        assert resp.status == 200, (name, resp.body)
    for name in ("named", "half"):
        # A signature on a NONE function is not checked, so it names nobody either.
        resp = await send(urls[name])
        assert_refusal(resp, 403, "AccessDeniedException", denied_body())
    assert calls == ["open", "star"]


async def test_refusals_through_aiohttp_client(serve: tuple[Serve, Calls]) -> None:
    """The same answers read by an ordinary HTTP client."""
    start, _ = serve
    urls = await start(
        {"functions": [function(allow=[{"principal": "*", "actions": ["lambda:InvokeFunction"]}])]}
    )
    url = urls["fn"] + "/?name=x"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=dict(botocore_signed("GET", url))) as resp:
            assert resp.status == 403
            assert resp.headers["x-amzn-ErrorType"] == "AccessDeniedException"
            assert await resp.read() == compact(denied_body())
            assert IMF_FIXDATE.fullmatch(resp.headers["Date"])


# --- config errors: one line naming the key ----------------------------------------------


def one(**extra: Any) -> dict[str, Any]:
    return {"callers": callers(), "functions": [function()], **extra}


CONFIG_ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    ("bad action", one(functions=[function(allow=[{"principal": "*", "actions": ["lambda:InvokeFunctionUrl", "lambda:Invoke"]}])]),
     "emulator.functions[0].allow[0].actions[1]",
     "must be one of lambda:InvokeFunctionUrl, lambda:InvokeFunction, got 'lambda:Invoke'"),
    ("no actions", one(functions=[function(allow=[{"principal": "*", "actions": []}])]),
     "emulator.functions[0].allow[0].actions", "must be a non-empty list of actions"),
    ("actions missing", one(functions=[function(allow=[{"principal": "*"}])]),
     "emulator.functions[0].allow[0].actions",
     "is required: lambda:InvokeFunctionUrl and/or lambda:InvokeFunction"),
    ("bad principal", one(functions=[function(allow=[{"principal": "alice", "actions": BOTH}])]),
     "emulator.functions[0].allow[0].principal",
     "'alice' is not an IAM ARN, a 12-digit account id or \"*\""),
    ("allow not a list", one(functions=[function(allow={"principal": "*"})]),
     "emulator.functions[0].allow", "must be a list of grants"),
    ("expires_at without token",
     {"callers": [{"access_key_id": "AKIDX", "secret_access_key": "s",
                   "expires_at": "2026-11-30T12:00:00Z"}], "functions": [function()]},
     "emulator.callers[0].expires_at", "only temporary credentials expire: give session_token too"),
    ("expires_at without zone",
     {"callers": [{"access_key_id": "AKIDX", "secret_access_key": "s", "session_token": "t",
                   "expires_at": "2026-11-30T12:00:00"}], "functions": [function()]},
     "emulator.callers[0].expires_at", "2026-11-30T12:00:00 has no zone: end it with Z (UTC)"),
    ("expires_at not a time",
     {"callers": [{"access_key_id": "AKIDX", "secret_access_key": "s", "session_token": "t",
                   "expires_at": "tomorrow"}], "functions": [function()]},
     "emulator.callers[0].expires_at",
     "'tomorrow' is not an ISO-8601 time like 2026-11-30T12:00:00Z"),
    ("offset too large", one(clock_offset=86401), "emulator.clock_offset",
     "must be at least -86400 and at most 86400, got 86401"),
    ("offset too small", one(clock_offset=-90000.5), "emulator.clock_offset",
     "must be at least -86400 and at most 86400, got -90000.5"),
    ("offset not a number", one(clock_offset="soon"), "emulator.clock_offset",
     "must be a number of seconds, got a string"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "data", "path", "message"), CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS]
)
def test_config_errors(case: str, data: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_emulator_config(data)
    assert info.value.path == path
    assert str(info.value) == f"{path}: {message}"
    assert "\n" not in str(info.value)


def test_config_reads_the_new_keys(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(
        "emulator:\n"
        "  clock_offset: ${OFFSET}\n"
        "  callers:\n"
        "    - {access_key_id: A1, secret_access_key: s, session_token: t,"
        " expires_at: 2026-11-30T12:00:00Z}\n"
        "    - {access_key_id: A2, secret_access_key: s, session_token: t,"
        " expires_at: '2026-11-30T14:00:00+02:00'}\n"
        "  functions:\n"
        "    - name: a\n"
        "      handler: m:f\n"
        "      allow:\n"
        "        - {principal: '*', actions: [lambda:InvokeFunctionUrl]}\n"
        "        - {principal: 'arn:aws:sts::111122223333:assumed-role/r/s',"
        " actions: [lambda:InvokeFunction]}\n"
        "    - {name: b, handler: 'm:f', auth: NONE}\n"
    )
    config: EmulatorConfig = load_emulator_config(str(path), {"OFFSET": "-30.5"})
    assert config.clock_offset == -30.5
    noon = datetime.datetime(2026, 11, 30, 12, tzinfo=datetime.UTC)
    assert [c.expires_at for c in config.callers] == [noon, noon]
    assert all(c.expires_at and c.expires_at.tzinfo == datetime.UTC for c in config.callers)
    a, b = config.functions
    assert a.allow is not None and [g.principal for g in a.allow] == [
        "*",
        "arn:aws:sts::111122223333:assumed-role/r/s",
    ]
    assert b.allow is None
    defaults = build_emulator_config(
        parse_yaml("functions: [{name: a, handler: 'm:f', auth: NONE}]")
    )
    assert defaults.clock_offset == 0.0
    assert abs((defaults.now() - real_now()).total_seconds()) < 1
    assert abs((config.now() - real_now()).total_seconds() + 30.5) < 1
