"""The local Function URL: events and responses compared with the AWS documentation,
SigV4 verification driven by AWS's C signer (awscrt) and by sigproxy itself, CORS,
limits, errors and timeouts. Real servers on loopback throughout."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from awscrt import auth as crt_auth
from awscrt import http as crt_http

from sigproxy.credentials import CredentialSource
from sigproxy.emulator.config import Cors, EmulatorConfig, FunctionConfig, build_emulator_config
from sigproxy.emulator.server import FunctionUrl
from sigproxy.emulator.sigv4 import MSG_SIGNATURE, MSG_TOKEN, Caller

from .conftest import StartProxy
from .support import ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, raw_request
from .test_signing_e2e import TARGETS

REGION = "us-east-1"
CALLER = Caller(
    access_key_id=ACCESS_KEY,
    secret_access_key=SECRET_KEY,
    session_token=SESSION_TOKEN,
    account_id="111122223333",
    user_arn="arn:aws:iam::111122223333:user/example-user",
)
PERMANENT = Caller(
    access_key_id="AKIDPERMANENTCALLER1",
    secret_access_key="permanent-secret-key",
    account_id="111122223333",
    user_arn="arn:aws:iam::111122223333:user/permanent",
)

Served = Callable[..., Awaitable[str]]


def echo_event(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return {"statusCode": 200, "body": json.dumps(event)}


@pytest.fixture
async def function_url(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Served:
    """``await function_url(handler, auth=..., timeout=..., cors=...)`` -> base URL."""

    async def serve(handler: Any = echo_event, **fields: Any) -> str:
        fn = FunctionConfig(name=fields.pop("name", "fn"), handler="unused:handler", **fields)
        emulator = EmulatorConfig(region=REGION, callers=(CALLER, PERMANENT), functions=(fn,))
        server = await aiohttp_server(FunctionUrl(fn, emulator, handler).app(), access_log=None)
        return f"http://127.0.0.1:{server.port}"

    return serve


def crt_headers(
    method: str,
    target: str,
    body: bytes,
    host: str,
    *,
    key: str = ACCESS_KEY,
    secret: str = SECRET_KEY,
    token: str | None = SESSION_TOKEN,
    region: str = REGION,
    service: str = "lambda",
    when: datetime.datetime | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """Headers of a request signed by awscrt, not by sigproxy or botocore."""
    request = crt_http.HttpRequest(
        method, target, crt_http.HttpHeaders([("host", host), *(extra or [])])
    )
    config = crt_auth.AwsSigningConfig(
        credentials_provider=crt_auth.AwsCredentialsProvider.new_static(key, secret, token),
        region=region,
        service=service,
        date=when or datetime.datetime.now(datetime.UTC),
        signed_body_value=hashlib.sha256(body).hexdigest(),
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
    )
    crt_auth.aws_sign_request(request, config).result(timeout=10)
    return [(k, v) for k, v in request.headers if k.lower() != "host"]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def signed(
    url: str, method: str, target: str, body: bytes = b"", **kw: Any
) -> tuple[int, dict[str, str], bytes]:
    host = url.removeprefix("http://")
    headers = crt_headers(method, target, body, host, **kw)
    resp = await raw_request(
        port_of(url), method, target, headers, body if body else None, host=host
    )
    return resp.status, {k.lower(): v for k, v in resp.headers}, resp.body


# --- the request event -----------------------------------------------------------------


async def test_event_matches_the_documented_example(function_url: Served) -> None:
    """The example request of "Invoking Lambda function URLs", field by field."""
    url = await function_url()
    host = url.removeprefix("http://")
    target = "/my/path?parameter1=value1&parameter1=value2&parameter2=value"
    body = b"Hello from client!"
    extra = [
        ("header1", "value1"),
        ("header2", "value1"),
        ("header2", "value2"),
        ("Cookie", "cookie1; cookie2"),
        ("User-Agent", "agent"),
        ("Content-Type", "text/plain"),
    ]
    headers = crt_headers("POST", target, body, host, extra=extra)
    # awscrt returns the extra headers too; send each once.
    before = time.time()
    resp = await raw_request(port_of(url), "POST", target, headers, body, host=host)
    after = time.time()
    assert resp.status == 200, resp.body
    assert resp.header("Content-Type") == "application/json"
    event = json.loads(resp.body)

    assert event["version"] == "2.0"
    assert event["routeKey"] == "$default"
    assert event["rawPath"] == "/my/path"
    assert event["rawQueryString"] == "parameter1=value1&parameter1=value2&parameter2=value"
    assert event["cookies"] == ["cookie1", "cookie2"]
    assert event["headers"]["header1"] == "value1"
    assert event["headers"]["header2"] == "value1,value2"
    assert event["headers"]["user-agent"] == "agent"
    assert "cookie" not in event["headers"]
    assert all(name == name.lower() for name in event["headers"])
    assert event["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert event["headers"]["x-forwarded-proto"] == "http"
    assert event["headers"]["x-amzn-trace-id"].startswith("Root=1-")
    assert event["queryStringParameters"] == {"parameter1": "value1,value2", "parameter2": "value"}
    assert event["body"] == "Hello from client!"
    assert event["isBase64Encoded"] is False
    assert "pathParameters" not in event
    assert "stageVariables" not in event

    ctx = event["requestContext"]
    assert ctx["accountId"] == "123456789012"
    assert re.fullmatch(r"[0-9a-f]{32}", ctx["apiId"])
    assert ctx["authentication"] is None
    iam = ctx["authorizer"]["iam"]
    assert iam["accessKey"] == ACCESS_KEY
    assert iam["accountId"] == "111122223333"
    assert iam["userArn"] == "arn:aws:iam::111122223333:user/example-user"
    assert iam["callerId"] == iam["userId"]
    assert re.fullmatch(r"(AIDA|AROA)[0-9A-F]{17}", iam["userId"])
    assert iam["cognitoIdentity"] is None
    assert iam["principalOrgId"] is None
    assert ctx["domainName"] == host
    assert ctx["domainPrefix"] == host.split(".")[0]
    assert ctx["http"] == {
        "method": "POST",
        "path": "/my/path",
        "protocol": "HTTP/1.1",
        "sourceIp": "127.0.0.1",
        "userAgent": "agent",
    }
    assert re.fullmatch(r"[0-9a-f-]{36}", ctx["requestId"])
    assert resp.header("x-amzn-RequestId") == ctx["requestId"]
    assert ctx["routeKey"] == "$default"
    assert ctx["stage"] == "$default"
    assert re.fullmatch(r"\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000", ctx["time"])
    assert isinstance(ctx["timeEpoch"], int)
    assert before * 1000 - 1000 <= ctx["timeEpoch"] <= after * 1000 + 1000
    parsed = datetime.datetime.strptime(ctx["time"], "%d/%b/%Y:%H:%M:%S +0000")
    assert abs(parsed.replace(tzinfo=datetime.UTC).timestamp() - ctx["timeEpoch"] / 1000) < 1


async def test_auth_none_event_and_absent_fields(function_url: Served) -> None:
    url = await function_url(auth="NONE")
    resp = await raw_request(port_of(url), "GET", "/plain")
    assert resp.status == 200
    event = json.loads(resp.body)
    assert event["requestContext"]["authorizer"] is None
    assert event["requestContext"]["accountId"] == "anonymous"
    assert event["rawQueryString"] == ""
    assert "queryStringParameters" not in event
    assert "cookies" not in event
    assert "body" not in event
    assert event["isBase64Encoded"] is False


@pytest.mark.parametrize(
    ("content_type", "as_text"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("text/plain", True),
        ("text/csv", True),
        ("application/xml", True),
        ("application/vnd.api+json", True),
        ("application/octet-stream", False),
        ("application/x-www-form-urlencoded", False),
        ("image/png", False),
        (None, False),
    ],
)
async def test_body_encoding_by_content_type(
    function_url: Served, content_type: str | None, as_text: bool
) -> None:
    url = await function_url(auth="NONE")
    body = b'{"a": "caf\xc3\xa9"}'
    headers = [("Content-Type", content_type)] if content_type else []
    resp = await raw_request(port_of(url), "POST", "/", headers, body)
    event = json.loads(resp.body)
    assert event["isBase64Encoded"] is (not as_text)
    if as_text:
        assert event["body"] == body.decode()
    else:
        assert base64.b64decode(event["body"]) == body


async def test_query_parameters_are_decoded(function_url: Served) -> None:
    url = await function_url(auth="NONE")
    resp = await raw_request(port_of(url), "GET", "/?q=a+b&e=%C3%A9&k=1&k=2&empty=")
    event = json.loads(resp.body)
    assert event["rawQueryString"] == "q=a+b&e=%C3%A9&k=1&k=2&empty="
    assert event["queryStringParameters"] == {"q": "a b", "e": "é", "k": "1,2", "empty": ""}


# --- the response ----------------------------------------------------------------------


RESULTS = [
    # (handler result, status, content type, body) - the mapping of the AWS docs'
    # response examples and of responses recorded from the service.
    ("Hello, world!", 200, "application/json", b"Hello, world!"),
    ({"message": "Hello, world!"}, 200, "application/json", b'{"message":"Hello, world!"}'),
    (["hello", 3, True], 200, "application/json", b'["hello",3,true]'),
    (3, 200, "application/json", b"3"),
    (None, 200, "application/json", b"null"),
    ({"statusCode": 200, "body": "body123"}, 200, "application/json", b"body123"),
    ({"statusCode": "418", "body": "i'm a teapot"}, 418, "application/json", b"i'm a teapot"),
    (
        {
            "statusCode": 201,
            "headers": {"Content-Type": "application/json", "My-Custom-Header": "Custom Value"},
            "body": json.dumps({"message": "Hello, world!"}),
            "isBase64Encoded": False,
        },
        201,
        "application/json",
        b'{"message": "Hello, world!"}',
    ),
    (
        {
            "statusCode": 200,
            "headers": {"Content-Type": "image/png"},
            "body": base64.b64encode(b"\x89PNG\r\n\x1a\n\x00").decode(),
            "isBase64Encoded": True,
        },
        200,
        "image/png",
        b"\x89PNG\r\n\x1a\n\x00",
    ),
    ({"statusCode": 204}, 204, "application/json", b""),
]


@pytest.mark.parametrize(("result", "status", "content_type", "body"), RESULTS)
async def test_response_mapping(
    function_url: Served, result: Any, status: int, content_type: str, body: bytes
) -> None:
    url = await function_url(lambda event, context: result, auth="NONE")
    resp = await raw_request(port_of(url), "GET", "/")
    assert resp.status == status
    assert resp.header("Content-Type") == content_type
    assert resp.body == body
    if isinstance(result, dict) and "My-Custom-Header" in result.get("headers", {}):
        assert resp.header("My-Custom-Header") == "Custom Value"


async def test_cookies_become_separate_set_cookie_headers(function_url: Served) -> None:
    cookies = ["Cookie_1=Value1; Expires=21 Oct 2021 07:48 GMT", "Cookie_2=Value2; Max-Age=78000"]
    url = await function_url(
        lambda e, c: {"statusCode": 200, "cookies": cookies, "body": "ok"}, auth="NONE"
    )
    resp = await raw_request(port_of(url), "GET", "/")
    assert resp.all("Set-Cookie") == cookies


def raises(event: Any, context: Any) -> Any:
    raise ValueError("boom in the handler")


@pytest.mark.parametrize(
    ("handler", "log_fragment"),
    [
        (raises, "ValueError: boom in the handler"),
        (lambda e, c: {"statusCode": "abc"}, "statusCode 'abc' is not an HTTP status"),
        (lambda e, c: {"statusCode": 200, "headers": ["x"]}, "headers must be an object"),
        (lambda e, c: {"statusCode": 200, "cookies": "a=b"}, "cookies must be a list"),
        (lambda e, c: {"statusCode": 200, "body": "!!", "isBase64Encoded": True}, "not base64"),
        (lambda e, c: {1, 2}, "not JSON serialisable"),
    ],
)
async def test_errors_are_502_with_details_only_in_the_log(
    function_url: Served, caplog: pytest.LogCaptureFixture, handler: Any, log_fragment: str
) -> None:
    url = await function_url(handler, auth="NONE")
    with caplog.at_level(logging.INFO, logger="sigproxy.emulator"):
        resp = await raw_request(port_of(url), "GET", "/")
    assert resp.status == 502
    assert resp.body == b"Internal Server Error"
    assert log_fragment in caplog.text
    assert b"boom" not in resp.body and b"Traceback" not in resp.body


async def test_timeout_is_502_and_logged(
    function_url: Served, caplog: pytest.LogCaptureFixture
) -> None:
    async def slow(event: Any, context: Any) -> str:
        await asyncio.sleep(5)
        return "late"

    url = await function_url(slow, auth="NONE", timeout=0.2)
    started = time.monotonic()
    resp = await raw_request(port_of(url), "GET", "/")
    assert resp.status == 502
    assert time.monotonic() - started < 4
    assert "Task timed out after 0.20 seconds" in caplog.text


async def test_context_object_and_async_handler(function_url: Served) -> None:
    seen: dict[str, Any] = {}

    async def handler(event: Any, context: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        seen.update(
            function_name=context.function_name,
            request_id=context.aws_request_id,
            memory=context.memory_limit_in_mb,
            arn=context.invoked_function_arn,
            remaining=context.get_remaining_time_in_millis(),
            event_request_id=event["requestContext"]["requestId"],
        )
        return {"ok": True}

    url = await function_url(handler, name="orders", auth="NONE", timeout=7.0, memory_mb=512)
    resp = await raw_request(port_of(url), "GET", "/")
    assert json.loads(resp.body) == {"ok": True}
    assert seen["function_name"] == "orders"
    assert seen["request_id"] == seen["event_request_id"] == resp.header("x-amzn-RequestId")
    assert seen["memory"] == 512
    assert seen["arn"] == "arn:aws:lambda:us-east-1:123456789012:function:orders"
    assert 6000 < seen["remaining"] <= 7000


async def test_sync_handlers_run_off_the_loop(function_url: Served) -> None:
    """Two blocking handlers at once finish together: they run in worker threads."""

    def blocking(event: Any, context: Any) -> str:
        time.sleep(0.5)
        return "done"

    url = await function_url(blocking, auth="NONE")
    started = time.monotonic()
    results = await asyncio.gather(*(raw_request(port_of(url), "GET", "/") for _ in range(2)))
    assert [r.body for r in results] == [b"done", b"done"]
    assert time.monotonic() - started < 0.95


async def test_payload_limits(function_url: Served) -> None:
    big = "x" * (6 * 1024 * 1024 + 200)
    url = await function_url(lambda e, c: big if e.get("rawPath") == "/big" else "ok", auth="NONE")
    port = port_of(url)
    resp = await raw_request(port, "POST", "/", body=b"y" * (6 * 1024 * 1024 + 1))
    assert resp.status == 413
    assert "6291456" in json.loads(resp.body)["Message"]
    resp = await raw_request(port, "POST", "/", body=b"y" * (6 * 1024 * 1024))
    assert resp.status == 200
    resp = await raw_request(port, "GET", "/big")
    assert resp.status == 502


# --- SigV4, from the wire --------------------------------------------------------------


async def test_signed_by_awscrt_is_accepted(function_url: Served) -> None:
    url = await function_url()
    status, headers, body = await signed(url, "POST", "/a%20b/c?x=1&y=a%2Cb", b'{"k": 1}')
    assert status == 200, body
    assert json.loads(body)["requestContext"]["authorizer"]["iam"]["accessKey"] == ACCESS_KEY


async def test_permanent_credentials_are_accepted(function_url: Served) -> None:
    url = await function_url()
    status, _, body = await signed(
        url, "GET", "/", key=PERMANENT.access_key_id, secret=PERMANENT.secret_access_key, token=None
    )
    assert status == 200, body


FAILURES: list[tuple[str, dict[str, Any], str, str, str]] = [
    # (case, signing changes, expected message (start), x-amzn-ErrorType, log part)
    ("wrong region", {"region": "eu-west-1"},
     "Credential should be scoped to a valid region, not 'eu-west-1'.", "InvalidSignatureException", "scope"),
    ("wrong service", {"service": "execute-api"},
     "Credential should be scoped to correct service: 'lambda'.", "InvalidSignatureException", "scope"),
    ("stale date", {"when": -datetime.timedelta(minutes=6)},
     "Signature expired: ", "InvalidSignatureException", "date"),
    ("future date", {"when": datetime.timedelta(minutes=6)},
     "Signature not yet current: ", "InvalidSignatureException", "date"),
    ("unknown key", {"key": "AKIDNOBODYKNOWSTHIS1"}, MSG_TOKEN, "UnrecognizedClientException", "key"),
    ("missing token", {"token": None}, MSG_TOKEN, "UnrecognizedClientException", "token"),
    ("wrong token", {"token": "not-the-issued-token"}, MSG_TOKEN, "UnrecognizedClientException", "token"),
    ("wrong secret", {"secret": "not-the-secret"}, MSG_SIGNATURE, "InvalidSignatureException",
     "canonical request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "changes", "message", "error_type", "part"),
    FAILURES,
    ids=[f[0] for f in FAILURES],
)
async def test_each_signature_failure_is_its_own_403(
    function_url: Served,
    caplog: pytest.LogCaptureFixture,
    case: str,
    changes: dict[str, Any],
    message: str,
    error_type: str,
    part: str,
) -> None:
    called: list[bool] = []
    url = await function_url(lambda e, c: called.append(True) or "ran")
    when = changes.get("when")
    if isinstance(when, datetime.timedelta):
        # From now, not from when the cases were collected: the suite takes minutes.
        changes = {**changes, "when": datetime.datetime.now(datetime.UTC) + when}
    with caplog.at_level(logging.WARNING, logger="sigproxy.emulator"):
        status, headers, body = await signed(url, "POST", "/x?a=1", b"{}", **changes)
    assert status == 403
    assert headers["x-amzn-errortype"] == error_type
    assert json.loads(body)["message"].startswith(message)
    assert f"{part} check failed" in caplog.text
    assert called == []
    assert SECRET_KEY not in caplog.text
    assert SESSION_TOKEN not in caplog.text


async def test_tampered_body_is_403(function_url: Served, caplog: pytest.LogCaptureFixture) -> None:
    url = await function_url()
    host = url.removeprefix("http://")
    headers = crt_headers("POST", "/x", b'{"amount": 1}', host)
    resp = await raw_request(port_of(url), "POST", "/x", headers, b'{"amount": 9}', host=host)
    assert resp.status == 403
    assert json.loads(resp.body) == {"message": MSG_SIGNATURE}
    assert "payload check failed" in caplog.text


async def test_tampered_query_is_403_and_log_shows_canonical_request(
    function_url: Served, caplog: pytest.LogCaptureFixture
) -> None:
    url = await function_url()
    host = url.removeprefix("http://")
    headers = crt_headers("GET", "/x?amount=1", b"", host)
    resp = await raw_request(port_of(url), "GET", "/x?amount=9", headers, host=host)
    assert resp.status == 403
    assert json.loads(resp.body) == {"message": MSG_SIGNATURE}
    assert "canonical request check failed" in caplog.text
    assert "GET\n/x\namount=9\nhost:" in caplog.text
    assert "<session token>" in caplog.text
    assert SESSION_TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("headers", "body_json"),
    [
        ([], {"Message": "Forbidden"}),
        ([("Authorization", "Bearer abc")], None),
        ([("Authorization", "AWS4-HMAC-SHA256 Credential=x")], None),
    ],
)
async def test_missing_or_malformed_authorization(
    function_url: Served, headers: list[tuple[str, str]], body_json: Any
) -> None:
    url = await function_url()
    resp = await raw_request(port_of(url), "GET", "/", headers)
    assert resp.status == 403
    body = json.loads(resp.body)
    if body_json is not None:
        assert body == body_json
        assert resp.body == b'{"Message":"Forbidden"}'  # byte for byte, as the service sends it
        assert resp.header("x-amzn-ErrorType") == "AccessDeniedException"
    else:
        assert "Authorization header requires" in body["message"]


async def test_unsigned_payload_is_refused(function_url: Served) -> None:
    url = await function_url()
    host = url.removeprefix("http://")
    headers = crt_headers("POST", "/", b"{}", host)
    headers = [
        (k, "UNSIGNED-PAYLOAD" if k.lower() == "x-amz-content-sha256" else v) for k, v in headers
    ]
    resp = await raw_request(port_of(url), "POST", "/", headers, b"{}", host=host)
    assert resp.status == 403


@pytest.mark.parametrize(("client_target", "expected"), TARGETS)
async def test_sigproxy_signed_awkward_targets_verify(
    function_url: Served, start_proxy: StartProxy, client_target: str, expected: str
) -> None:
    """botocore (in the proxy) signs, the emulator's hand-written verifier checks: two
    implementations agree on every awkward target of the proxy's own table."""
    url = await function_url()
    proxy = await start_proxy(
        "upstreams:\n"
        f"  - {{name: orders, url: '{url}/base', region: {REGION}, path_prefix: /orders}}\n",
        credentials=CredentialSource.static(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN),
    )
    resp = await raw_request(proxy.port, "GET", client_target)
    assert resp.status == 200, resp.body
    event = json.loads(resp.body)
    path, _, query = expected.partition("?")
    assert event["rawPath"] == path
    assert event["rawQueryString"] == query


# --- CORS ------------------------------------------------------------------------------


CORS = Cors(
    allow_origins=("http://localhost:3000",),
    allow_methods=("GET", "POST"),
    allow_headers=("content-type", "x-custom"),
    expose_headers=("x-amzn-requestid",),
    allow_credentials=True,
    max_age=300,
)


async def test_preflight_is_answered_without_auth_or_invocation(function_url: Served) -> None:
    called: list[bool] = []
    url = await function_url(lambda e, c: called.append(True) or "ran", cors=CORS)
    preflight = [
        ("Origin", "http://localhost:3000"),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "content-type,x-custom"),
    ]
    resp = await raw_request(port_of(url), "OPTIONS", "/any", preflight)
    assert resp.status == 200
    assert resp.header("Access-Control-Allow-Origin") == "http://localhost:3000"
    assert resp.header("Access-Control-Allow-Methods") == "GET,POST"
    assert resp.header("Access-Control-Allow-Headers") == "content-type,x-custom"
    assert resp.header("Access-Control-Allow-Credentials") == "true"
    assert resp.header("Access-Control-Max-Age") == "300"
    assert called == []
    other = [("Origin", "http://evil.example"), ("Access-Control-Request-Method", "POST")]
    refused = await raw_request(port_of(url), "OPTIONS", "/any", other)
    assert refused.header("Access-Control-Allow-Origin") is None
    assert called == []


async def test_cors_headers_on_actual_responses(function_url: Served) -> None:
    url = await function_url(
        lambda e, c: {"statusCode": 200, "headers": {"Access-Control-Allow-Origin": "*"}},
        cors=CORS,
        auth="NONE",
    )
    resp = await raw_request(port_of(url), "GET", "/", [("Origin", "http://localhost:3000")])
    # Lambda adds its configured headers next to the function's own.
    assert resp.all("Access-Control-Allow-Origin") == ["*", "http://localhost:3000"]
    assert resp.header("Access-Control-Expose-Headers") == "x-amzn-requestid"
    assert resp.header("Access-Control-Allow-Credentials") == "true"
    plain = await raw_request(port_of(url), "GET", "/")
    assert plain.all("Access-Control-Allow-Origin") == ["*"]


async def test_without_cors_config_options_reaches_the_function(function_url: Served) -> None:
    url = await function_url(lambda e, c: e["requestContext"]["http"]["method"], auth="NONE")
    resp = await raw_request(
        port_of(url),
        "OPTIONS",
        "/",
        [("Origin", "http://x"), ("Access-Control-Request-Method", "GET")],
    )
    assert resp.body == b"OPTIONS"


# --- config ----------------------------------------------------------------------------


def test_example_emulator_config_is_valid() -> None:
    from pathlib import Path

    from sigproxy.emulator.config import load_emulator_config

    root = Path(__file__).resolve().parent.parent
    config = load_emulator_config(str(root / "examples" / "emulator.yaml"), environ={})
    assert [f.name for f in config.functions] == ["hello", "router", "webhook"]
    assert config.base_dir == str(root / "examples")
    assert config.callers[0].access_key_id == "AKIDLOCALEXAMPLE0001"


def test_emulator_config_section() -> None:
    config = build_emulator_config(
        {
            "region": "eu-west-1",
            "callers": [{"access_key_id": "AKIDX", "secret_access_key": "s"}],
            "functions": [
                {"name": "a", "handler": "examples/hello.py:handler", "port": 9001},
                {"name": "b", "handler": "mod:fn", "auth": "NONE", "timeout": 30, "memory": 1024,
                 "cors": {"allow_origins": ["*"], "allow_methods": ["get"], "max_age": 5}},
            ],
        }
    )  # fmt: skip
    a, b = config.functions
    assert (a.port, a.auth, a.timeout, a.memory_mb) == (9001, "AWS_IAM", 3.0, 128)
    assert (b.auth, b.timeout, b.memory_mb) == ("NONE", 30.0, 1024)
    assert b.cors == Cors(allow_origins=("*",), allow_methods=("GET",), max_age=5)
    assert config.callers[0].user_arn == "arn:aws:iam::123456789012:user/local-dev"


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"functions": []}, "emulator.functions"),
        ({"functions": [{"name": "a", "handler": "nocolon"}]}, "emulator.functions[0].handler"),
        ({"functions": [{"name": "a", "handler": "m:f"}]}, "emulator.callers"),
        ({"functions": [{"name": "a", "handler": "m:f", "auth": "NONE", "timeout": 901}]},
         "emulator.functions[0].timeout"),
        ({"functions": [{"name": "a", "handler": "m:f", "auth": "NONE", "colour": 1}]},
         "emulator.functions[0].colour"),
        ({"region": "moon", "functions": []}, "emulator.region"),
        ({"callers": [{"access_key_id": "A"}], "functions": []}, "emulator.callers[0].secret_access_key"),
    ],
)  # fmt: skip
def test_emulator_config_errors(data: dict[str, Any], path: str) -> None:
    from sigproxy.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_emulator_config(data)
    assert info.value.path == path


async def test_aiohttp_client_roundtrip_through_proxy_and_emulator(
    function_url: Served, start_proxy: StartProxy
) -> None:
    """A plain client, the proxy, the emulator: a POST with a JSON body and a cookie."""
    url = await function_url()
    proxy = await start_proxy(
        f"upstreams:\n  - {{name: fn, url: '{url}', region: {REGION}}}\n",
        credentials=CredentialSource.static(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN),
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + "/orders?id=7", json={"item": "book"}, headers={"Cookie": "s=1; t=2"}
        ) as resp,
    ):
        assert resp.status == 200
        event = await resp.json(content_type=None)
    assert event["body"] == '{"item": "book"}'
    assert event["cookies"] == ["s=1", "t=2"]
    assert event["queryStringParameters"] == {"id": "7"}
    assert event["requestContext"]["authorizer"]["iam"]["accessKey"] == ACCESS_KEY
