"""The proof the builtin signer needs before it may be the default: it is byte-identical
to the AWS SigV4 test suite and to botocore's signer.

1. Every case of the official AWS Signature Version 4 test suite (vendored, unchanged,
   in ``tests/data/aws4_testsuite``) is parsed from its raw ``.req`` by this module's own
   parser and signed with :func:`sigproxy.signing.authorization`; the canonical request,
   the string to sign and the ``Authorization`` header must equal the suite's files.
2. :class:`~sigproxy.signing.Signer` and :class:`~sigproxy.signing.BotocoreSigner` return
   the same header list on a table of awkward targets (every method, with and without a
   session token, several hosts, regions, services and timestamps) and on random targets
   and bodies (hypothesis), also when they read the clock themselves.
3. The derived key both signers share equals botocore's own uncached derivation, and
   some builtin signatures are re-checked by AWS's C signer (awscrt).
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import hmac
import re
import string
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sigproxy.botocore_signer import BotocoreSigner
from sigproxy.canonical import InvalidTarget, normalize_path, normalize_query, split_target
from sigproxy.signing import Signer, SigningKeys, authorization, signing_key

from .support import Recorded, verify_sigv4

# --------------------------------------------------------------------------------------
# 1. The AWS SigV4 test suite
# --------------------------------------------------------------------------------------

SUITE = Path(__file__).resolve().parent / "data" / "aws4_testsuite"
SUITE_ACCESS_KEY = "AKIDEXAMPLE"
SUITE_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_REGION = "us-east-1"
SUITE_SERVICE = "service"
SUITE_TIMESTAMP = "20150830T123600Z"
SUITE_CASE_COUNT = 34  # cases in the botocore 1.43.11 copy; guards against finding none

TOKEN_HEADER = "X-Amz-Security-Token"
# The suite's two ways of carrying a session token that its .req does not show (the
# .sreq, the request as sent, has the header in both):
# - get-vanilla-with-session-token: the .creq signs the token. The signer adds the header
#   from the credentials, which is what Signer does for temporary credentials.
TOKEN_SIGNED_FROM_CREDENTIALS = frozenset({"get-vanilla-with-session-token"})
# - post-sts-header-after: "the X-Amz-Security-Token header is added to the request after
#   you calculate the signature" (post-sts-token/readme.txt): it is not signed, so the
#   case is signed without it. (sigproxy itself always signs the token; the case still
#   checks authorization() on the headers it is given.)
TOKEN_ADDED_AFTER_SIGNING = frozenset({"post-sts-header-after"})

# The .sreq of get-vanilla-with-session-token shows a made-up signature (its hex digits are
# the token's, rotated), not the one its own .creq, .sts and .authz give; the .authz is
# what this module checks, so only the rest of that .sreq header is compared.
SREQ_SIGNATURE_IS_NOT_THE_AUTHZ = frozenset({"get-vanilla-with-session-token"})


@dataclass(frozen=True)
class RawRequest:
    """An HTTP/1.1 request as written in a suite file."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(r"\r?\n")


def parse_request(data: bytes) -> RawRequest:
    """Parse a raw request: request line, header lines (LF or CRLF; an obs-folded
    continuation line, one starting with a space or tab, joins the previous value with a
    single space as RFC 9112 section 5.2 says), then the body after the first empty line.
    Header values are kept as written: trimming them is the signer's job."""
    end = _HEAD_END.search(data)
    head, body = (data[: end.start()], data[end.end() :]) if end else (data, b"")
    request_line, *header_lines = _LINE_END.split(head.decode("utf-8"))
    if header_lines and not header_lines[-1]:
        header_lines.pop()  # the last header line's own line end, at the end of the file
    # The target may contain spaces (normalize-path/get-space): method first, version last.
    method, _, rest = request_line.partition(" ")
    target, _, version = rest.rpartition(" ")
    assert method and target and version.startswith("HTTP/"), request_line
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        if line[:1] in (" ", "\t"):
            assert headers, f"continuation line without a header: {line!r}"
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.lstrip(" \t"))
            continue
        name, colon, value = line.partition(":")
        assert colon and name and name == name.strip(), f"malformed header line: {line!r}"
        headers.append((name, value))
    return RawRequest(method, target, headers, body)


@dataclass(frozen=True, order=True)
class SuiteCase:
    """One directory of the suite: ``<dir>/<name>.req``, ``.creq``, ``.sts``, ..."""

    directory: Path
    name: str

    @property
    def id(self) -> str:
        return self.directory.relative_to(SUITE).as_posix()

    def read(self, suffix: str) -> bytes:
        return (self.directory / f"{self.name}{suffix}").read_bytes()

    def text(self, suffix: str) -> str:
        return self.read(suffix).decode("utf-8")


def suite_cases() -> list[SuiteCase]:
    return sorted(SuiteCase(req.parent, req.stem) for req in SUITE.rglob("*.req"))


CASES = suite_cases()


def signed_headers(case: SuiteCase, req: RawRequest) -> list[tuple[str, str]]:
    """All headers of the .req (the suite signs every header it shows), plus the session
    token where the case has the signer add it (see TOKEN_SIGNED_FROM_CREDENTIALS)."""
    sent = parse_request(case.read(".sreq"))
    only_sent = [v for v in sent.values(TOKEN_HEADER) if v not in req.values(TOKEN_HEADER)]
    headers = list(req.headers)
    if case.name in TOKEN_SIGNED_FROM_CREDENTIALS:
        assert len(only_sent) == 1, f"{case.id}: expected a token in the .sreq only"
        headers.append((TOKEN_HEADER, only_sent[0]))
    elif case.name in TOKEN_ADDED_AFTER_SIGNING:
        assert len(only_sent) == 1, f"{case.id}: expected a token in the .sreq only"
    else:
        assert not only_sent, f"{case.id}: a token appears in the .sreq only: signed or not?"
    return headers


def suite_path(raw_path: str) -> str:
    """The path handed to authorization() for a suite request.

    sigproxy sends normalize_path()'s output, which is already percent-encoded once
    (``/ሴ`` goes out as ``/%E1%88%B4``), and signs it the way AWS checks every service but
    S3: canonical_uri() encodes it again (``/%25E1%2588%25B4``). The suite instead models
    the path before any encoding: its canonical URI is the raw path encoded exactly once
    (get-utf8 expects ``/%E1%88%B4``, get-space ``/example%20space/``). So the normalized
    path (dot and empty segments removed, as the normalize-path cases want) is decoded
    back before canonical_uri() encodes it once. No suite path contains a ``%``, so the
    decoding only undoes what normalize_path() itself encoded.
    """
    assert "%" not in raw_path, f"suite path already encoded: {raw_path!r}"
    return unquote(normalize_path(raw_path))


def _show(text: str) -> list[str]:
    return [repr(line) for line in text.split("\n")]


def assert_same(case: str, what: str, computed: str, expected: str) -> None:
    if computed != expected:
        diff = difflib.unified_diff(
            _show(expected), _show(computed), "expected", "computed", lineterm=""
        )
        pytest.fail(f"{case}: {what} differs from the suite\n" + "\n".join(diff))


def sign_case(case: SuiteCase, secret_key: str = SUITE_SECRET_KEY) -> tuple[str, str, str]:
    """(Authorization, canonical request, string to sign) for a suite case."""
    req = parse_request(case.read(".req"))
    raw_path, raw_query = split_target(req.target)
    return authorization(
        req.method,
        suite_path(raw_path),
        normalize_query(raw_query),
        signed_headers(case, req),
        hashlib.sha256(req.body).hexdigest(),
        SUITE_ACCESS_KEY,
        secret_key,
        SUITE_TIMESTAMP,
        SUITE_REGION,
        SUITE_SERVICE,
    )


def test_the_whole_suite_is_found() -> None:
    assert len(CASES) == SUITE_CASE_COUNT, [case.id for case in CASES]
    assert (SUITE / "LICENSE").is_file() and (SUITE / "NOTICE").is_file()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_aws_sigv4_suite(case: SuiteCase) -> None:
    header, creq, sts = sign_case(case)
    assert_same(case.id, "canonical request", creq, case.text(".creq"))
    assert_same(case.id, "string to sign", sts, case.text(".sts"))
    assert_same(case.id, "Authorization", header, case.text(".authz"))
    # The signed request (.sreq) carries the same header: a check of the data and parser.
    (sent,) = parse_request(case.read(".sreq")).values("Authorization")
    if case.name in SREQ_SIGNATURE_IS_NOT_THE_AUTHZ:
        assert sent.rsplit("=", 1)[0] == f" {header}".rsplit("=", 1)[0]
        assert sent != f" {header}"
    else:
        assert sent == f" {header}"


def test_suite_parser_joins_folded_lines_and_keeps_the_body() -> None:
    folded = parse_request(
        b"GET /a b?x=1 HTTP/1.1\r\nHost:h\r\nMy-Header1:value1\r\n  value2\n\tvalue3\r\n\r\nbody\r\n"
    )
    assert (folded.method, folded.target) == ("GET", "/a b?x=1")
    assert folded.headers == [("Host", "h"), ("My-Header1", "value1 value2 value3")]
    assert folded.body == b"body\r\n"
    assert parse_request(b"GET / HTTP/1.1\nHost:h").body == b""


def test_suite_detects_a_wrong_secret_or_scope() -> None:
    """The suite test can fail: a mutated secret changes only the signature, and a wrong
    region or time changes the string to sign."""
    case = next(case for case in CASES if case.name == "get-vanilla")
    header, creq, sts = sign_case(case, secret_key=SUITE_SECRET_KEY[:-1] + "X")
    assert creq == case.text(".creq")
    assert sts == case.text(".sts")
    assert header != case.text(".authz")
    assert header.rsplit("=", 1)[0] == case.text(".authz").rsplit("=", 1)[0]
    for region, timestamp in [("us-west-2", SUITE_TIMESTAMP), (SUITE_REGION, "20150830T123601Z")]:
        other, _, other_sts = authorization(
            "GET",
            "/",
            "",
            [("Host", "example.amazonaws.com"), ("X-Amz-Date", SUITE_TIMESTAMP)],
            hashlib.sha256(b"").hexdigest(),
            SUITE_ACCESS_KEY,
            SUITE_SECRET_KEY,
            timestamp,
            region,
            SUITE_SERVICE,
        )
        assert other_sts != case.text(".sts")
        assert other != case.text(".authz")


# --------------------------------------------------------------------------------------
# 2. Builtin Signer against BotocoreSigner
# --------------------------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
UPSTREAMS = [
    # (host, region, service)
    ("x.lambda-url.eu-west-1.on.aws", "eu-west-1", "lambda"),
    ("127.0.0.1:8080", "us-east-1", "lambda"),
    ("abc123.execute-api.ap-southeast-2.amazonaws.com", "ap-southeast-2", "execute-api"),
    ("localhost:9000", "cn-north-1", "es"),
]
TIMESTAMPS = [
    "20150830T123600Z",
    "20240228T235959Z",  # the day before a leap day
    "20240229T000000Z",
    "20251231T235959Z",  # the last second of a year
    "20260101T000000Z",
    "20261121T235959Z",
    "20261122T000000Z",
]
# Not tests/support.py's secrets: BotocoreSigner runs botocore's add_auth(), which logs
# each canonical request (token included) at DEBUG, and the test run's log file is
# grepped for those secrets (tests/check_log_secrets.py).
ACCESS = "AKIDSIGNERSTEST00001"
SECRET = "signers/Test+Secret0123456789abcdefghij"
TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE//signers+test+token/0123456789=="
TOKENS = [TOKEN, None]
JSON_BODY = b'{"name": "John", "s": "\xc3\xa9"}'

TARGETS = [
    pytest.param("/", id="root"),
    pytest.param("/fn", id="plain"),
    pytest.param("/a/b/", id="trailing-slash"),
    pytest.param("/a%2fb", id="encoded-slash"),
    pytest.param("/a%2Fb/c%2F", id="encoded-slash-upper"),
    pytest.param("/%7Euser/x.json", id="encoded-tilde"),
    pytest.param("/~user/-._", id="unreserved"),
    pytest.param("/caf%C3%A9", id="encoded-utf8"),
    pytest.param("/café/ü/€", id="raw-utf8"),
    pytest.param("/emoji/😀", id="emoji"),
    pytest.param("/a b/c d", id="spaces"),
    pytest.param("/a+b", id="plus-in-path"),
    pytest.param("/a:b@c!$&'()*,;=", id="reserved-in-path"),
    pytest.param('/q"<>`{|}^\\', id="unsafe-in-path"),
    pytest.param("/x/./y/../z", id="dot-segments"),
    pytest.param("/a/%2e%2e/b", id="encoded-dot-segment"),
    pytest.param("//x///y", id="empty-segments"),
    pytest.param("/p%25/q", id="encoded-percent"),
    pytest.param("/deep/" + "/".join(f"s{i}" for i in range(60)) + "/", id="deep"),
    pytest.param("/fn?q=a+b", id="plus-is-space"),
    pytest.param("/fn?q=a%2Bb", id="encoded-plus"),
    pytest.param("/fn?q=a%20b&q=c", id="repeated-key"),
    pytest.param("/fn?b=2&a=1&B=3&a=0&a=10", id="unsorted-repeated"),
    pytest.param("/fn?flag&empty=&=v", id="no-equals-empty-values"),
    pytest.param("/fn?a=1&&b=2&", id="empty-pieces"),
    pytest.param("/fn?a=b=c&k%3Dx=1", id="equals-in-value-and-key"),
    pytest.param("/fn?r=!$'()*,;:@/?&t=~&k=%7e", id="reserved-in-query"),
    pytest.param("/fn?list=a,b,c&next=https://x.y/z?a=b", id="url-in-query"),
    pytest.param("/fn?ü=ü&é&e=%f0%9f%98%80", id="utf8-query"),
    pytest.param("/fn?pct=%25&bin=%FF%00", id="binary-query"),
    pytest.param("/a%2Fb/c d?c=%2F&d=/", id="path-and-query"),
    pytest.param("/fn?x=1#fragment", id="fragment"),
    pytest.param("/fn?" + "&".join(f"k{i % 37}=v{i}" for i in range(300)), id="long-query"),
]


def canonical_target(raw_target: str) -> str:
    """The target sigproxy sends (and signs) for a client's raw target."""
    raw_path, raw_query = split_target(raw_target)
    path, query = normalize_path(raw_path), normalize_query(raw_query)
    assert (normalize_path(path), normalize_query(query)) == (path, query)
    return f"{path}?{query}" if query else path


def credentials(token: str | None, secret: str = SECRET) -> ReadOnlyCredentials:
    return ReadOnlyCredentials(ACCESS, secret, token)


Headers = list[tuple[str, str]]


def sign_both(
    upstream: tuple[str, str, str],
    method: str,
    target: str,
    body_sha256: str,
    creds: ReadOnlyCredentials,
) -> tuple[Headers, Headers]:
    """(builtin headers, botocore headers) for one request. botocore's add_auth() reads
    its own clock; the builtin signer is given the time botocore signed at."""
    reference = BotocoreSigner(*upstream).sign(method, target, body_sha256, creds)
    builtin = Signer(*upstream).sign_at(method, target, body_sha256, creds, _amz_date(reference))
    return builtin, reference


@pytest.mark.parametrize("upstream", UPSTREAMS, ids=[u[0] for u in UPSTREAMS])
@pytest.mark.parametrize("raw_target", TARGETS)
def test_builtin_equals_botocore_on_awkward_targets(
    raw_target: str, upstream: tuple[str, str, str]
) -> None:
    target = canonical_target(raw_target)
    for method in METHODS:
        body = JSON_BODY if method in ("POST", "PUT", "PATCH") else b""
        digest = hashlib.sha256(body).hexdigest()
        for token in TOKENS:
            builtin, reference = sign_both(upstream, method, target, digest, credentials(token))
            assert builtin == reference, (
                f"{method} {target} token={token is not None}:\n"
                f" builtin  {builtin}\n botocore {reference}"
            )


def test_the_differential_can_fail() -> None:
    """A different region, target, body hash or token changes the botocore headers, and
    the builtin signer follows (the comparison is not between two constants)."""
    upstream = UPSTREAMS[0]
    digest = hashlib.sha256(b"").hexdigest()
    builtin, reference = sign_both(upstream, "GET", "/a?b=c", digest, credentials(TOKEN))
    stamp = _amz_date(reference)
    others = [
        (("x", "eu-west-2", "lambda"), "/a?b=c", digest, credentials(TOKEN)),
        (upstream, "/a?b=d", digest, credentials(TOKEN)),
        (upstream, "/a?b=c", "0" * 64, credentials(TOKEN)),
        (upstream, "/a?b=c", digest, credentials("other")),
    ]
    for other_upstream, target, other_digest, creds in others:
        other_builtin, other_reference = sign_both(
            other_upstream, "GET", target, other_digest, creds
        )
        assert other_builtin == other_reference
        assert other_reference[0] != reference[0] or _amz_date(other_reference) != stamp
        again = Signer(*upstream).sign_at("GET", target, other_digest, creds, stamp)
        assert again[0] != builtin[0] or other_upstream != upstream


@pytest.mark.parametrize("token", TOKENS, ids=["token", "no-token"])
@pytest.mark.parametrize("raw_target", TARGETS)
def test_builtin_signature_verified_by_awscrt(raw_target: str, token: str | None) -> None:
    """AWS's C signer recomputes the builtin signature from the request as sent."""
    target = canonical_target(raw_target)
    # awscrt's URI parser (the verifier, not sigproxy) refuses any path containing ":/";
    # no table target has one.
    assert ":/" not in target.partition("?")[0]
    host, region, service = UPSTREAMS[0]
    body = JSON_BODY
    for timestamp in TIMESTAMPS:  # day, month, year and leap-day boundaries
        headers = Signer(host, region, service).sign_at(
            "POST", target, hashlib.sha256(body).hexdigest(), credentials(token), timestamp
        )
        rec = Recorded("POST", target, [("Host", host), *headers], body)
        verify_sigv4(
            rec, region=region, service=service, access_key=ACCESS, secret_key=SECRET, token=token
        )


def test_awscrt_refuses_a_tampered_builtin_signature() -> None:
    """The awscrt check above can fail."""
    host, region, service = UPSTREAMS[0]
    digest = hashlib.sha256(b"").hexdigest()
    headers = Signer(host, region, service).sign("GET", "/a?b=c", digest, credentials(None))
    rec = Recorded("GET", "/a?b=d", [("Host", host), *headers], b"")
    with pytest.raises(AssertionError, match="signature mismatch"):
        verify_sigv4(
            rec, region=region, service=service, access_key=ACCESS, secret_key=SECRET, token=None
        )


_target_chars = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
_raw_text = st.lists(
    st.one_of(
        _target_chars,
        st.sampled_from(
            [*"%+=&/?#.~:@!$'()*,;[] "]
            + ["%2F", "%2f", "%2B", "%20", "%25", "%7E", "%C3%A9", "%FF", "%00", "..", "./"]
        ),
    ),
    max_size=40,
).map("".join)
_tokens = st.one_of(st.none(), st.text(string.ascii_letters + string.digits + "/+=", max_size=80))
_secrets = st.text(string.ascii_letters + string.digits + "/+", min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    path=_raw_text,
    query=_raw_text,
    body=st.binary(max_size=512),
    method=st.sampled_from(METHODS),
    upstream=st.sampled_from(UPSTREAMS),
    token=_tokens,
    secret=_secrets,
)
def test_builtin_equals_botocore_on_random_targets(
    path: str,
    query: str,
    body: bytes,
    method: str,
    upstream: tuple[str, str, str],
    token: str | None,
    secret: str,
) -> None:
    raw_target = "/" + path + (f"?{query}" if query else "")
    try:
        target = canonical_target(raw_target)
    except InvalidTarget:
        target = ""
    assume(target)  # a target sigproxy refuses is never signed
    digest = hashlib.sha256(body).hexdigest()
    builtin, reference = sign_both(upstream, method, target, digest, credentials(token, secret))
    assert builtin == reference


_AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")


def _amz_date(headers: Headers) -> str:
    values = [value for name, value in headers if name == "X-Amz-Date"]
    assert len(values) == 1 and _AMZ_DATE.match(values[0]), headers
    return values[0]


def test_both_signers_read_the_utc_clock() -> None:
    """sign() reads the clock (each signer its own): the X-Amz-Date is the current UTC
    second, and the headers are exactly what both sign for that time given explicitly."""
    upstream = UPSTREAMS[0]
    digest = hashlib.sha256(b"").hexdigest()
    creds = credentials(TOKEN)
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    builtin = Signer(*upstream).sign("GET", "/fn?a=1", digest, creds)
    reference = BotocoreSigner(*upstream).sign("GET", "/fn?a=1", digest, creds)
    after = datetime.datetime.now(datetime.UTC)
    for headers in (builtin, reference):
        stamp = _amz_date(headers)
        when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        assert before - datetime.timedelta(seconds=2) <= when <= after, (stamp, before, after)
        assert Signer(*upstream).sign_at("GET", "/fn?a=1", digest, creds, stamp) == headers


def test_shared_signing_key_matches_botocore_derivation() -> None:
    """Both signers take their keys from a :class:`SigningKeys` cache, so the differential
    tests cannot see a key bug: check the cached key against botocore's own uncached
    derivation, past the cache size so the cache is emptied and refilled."""
    combos = [
        (secret, stamp, region, service)
        for secret in (SECRET, SUITE_SECRET_KEY, "other/secret+1")
        for stamp in TIMESTAMPS
        for region, service in [(u[1], u[2]) for u in UPSTREAMS]
    ]
    assert len(combos) > 64
    keys = SigningKeys()
    for _ in range(2):  # second round partly from the cache
        for secret, stamp, region, service in combos:
            request = AWSRequest(method="GET", url="https://example.amazonaws.com/")
            request.context["timestamp"] = stamp
            string_to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{region}/{service}\nabc"
            creds = ReadOnlyCredentials(SUITE_ACCESS_KEY, secret, None)
            expected = SigV4Auth(creds, service, region).signature(string_to_sign, request)
            key = keys.get(secret, stamp[:8], region, service)
            assert key == signing_key(secret, stamp[:8], region, service)
            assert hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest() == expected
            assert len(keys) <= 64
