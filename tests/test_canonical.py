"""The outgoing target: table of awkward paths and queries, and properties checked
against AWS's own C signer (awscrt) rather than against botocore alone."""

from __future__ import annotations

import hashlib

import pytest
from botocore.credentials import ReadOnlyCredentials
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sigproxy.canonical import InvalidTarget, normalize_path, normalize_query, split_target
from sigproxy.signing import Signer, SigningKeys

from .support import ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, Recorded, verify_sigv4


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/a", "/a"),
        ("/a/b/", "/a/b/"),
        ("/a%20b", "/a%20b"),
        ("/a%2fb", "/a%2Fb"),  # encoded slash stays inside its segment, hex upper-cased
        ("/%7euser", "/~user"),  # unreserved escapes are decoded
        ("/%41%42c", "/ABc"),
        ("/a+b", "/a+b"),  # plus is literal in paths
        ("/a:b@c!$&'()*,;=", "/a:b@c!$&'()*,;="),  # reserved characters keep their meaning
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/café", "/caf%C3%A9"),
        ("/a b", "/a%20b"),
        ('/q"<>`{|}^\\', "/q%22%3C%3E%60%7B%7C%7D%5E%5C"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/a/%2e%2e/b", "/b"),  # an encoded dot segment is a dot segment
        ("/a/b/..", "/a/"),
        ("/a//b///c", "/a/b/c"),
        ("//", "/"),
        ("/a%2520", "/a%2520"),  # an encoded percent stays encoded
        ("/\udcff", "/%FF"),  # an undecodable byte from the HTTP parser
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ""),
        ("a=1", "a=1"),
        ("q=a+b", "q=a%20b"),  # + is a space (form encoding)
        ("q=a%2Bb", "q=a%2Bb"),  # a literal plus arrives as %2B
        ("q=a%20b", "q=a%20b"),
        ("a=2&a=1&A=3", "a=2&a=1&A=3"),  # order, repeats and case are kept
        ("flag", "flag="),
        ("x=&y", "x=&y="),
        ("=v", "=v"),
        ("a=1&&b=2&", "a=1&b=2"),
        ("k=%7e&k2=~", "k=~&k2=~"),
        ("list=a,b,c", "list=a%2Cb%2Cc"),
        ("next=https://x.y/z?a=b", "next=https%3A%2F%2Fx.y%2Fz%3Fa%3Db"),
        ("e=%f0%9f%98%80&u=ü", "e=%F0%9F%98%80&u=%C3%BC"),
        ("bin=%FF%00", "bin=%FF%00"),
        ("a=b=c", "a=b%3Dc"),
        ("k%3Dx=1", "k%3Dx=1"),
        ("pct=%25", "pct=%25"),
    ],
)
def test_normalize_query(raw: str, expected: str) -> None:
    assert normalize_query(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["/a%", "/a%2", "/a%zz", "/a\x00b", "/a\r\nb", "/a\x7f", "noslash", "*"],
)
def test_unrepresentable_paths_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidTarget):
        normalize_path(raw)


@pytest.mark.parametrize("raw", ["a=%", "a=%g1", "a=%2", "%=1", "a=\x01"])
def test_unrepresentable_queries_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidTarget):
        normalize_query(raw)


def test_split_target_drops_fragment() -> None:
    assert split_target("/a?b=c#frag") == ("/a", "b=c")
    assert split_target("/a#f?x") == ("/a", "")
    assert split_target("/a") == ("/a", "")


_target_chars = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
_raw_text = st.lists(
    st.one_of(
        _target_chars,
        st.sampled_from(list("%+=&/?.~:@!$'()*,;") + ["%2F", "%2B", "%20", "%7E", "%C3%A9"]),
    ),
    max_size=30,
).map("".join)


def _representable(fn, raw):  # type: ignore[no-untyped-def]
    try:
        return fn(raw)
    except InvalidTarget:
        return None


@settings(max_examples=300, deadline=None)
@given(path=_raw_text, query=_raw_text)
def test_botocore_signature_of_normalized_target_matches_awscrt(path: str, query: str) -> None:
    """Whatever a client sends, the target sigproxy builds is signed by botocore exactly
    as AWS's C signer canonicalises it from the wire."""
    npath = _representable(normalize_path, "/" + path.replace("?", "%3F").replace("#", "%23"))
    nquery = _representable(normalize_query, query.replace("#", "%23"))
    if npath is None or nquery is None:
        return
    # awscrt's URI parser (the verifier, not sigproxy) rejects any path containing ":/"
    # with AWS_ERROR_MALFORMED_INPUT_STRING; botocore canonicalises it fine.
    assume(":/" not in npath)
    assert normalize_path(npath) == npath
    assert normalize_query(nquery) == nquery
    target = npath + ("?" + nquery if nquery else "")
    body = b'{"k": 1}'
    digest = hashlib.sha256(body).hexdigest()
    creds = ReadOnlyCredentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)
    headers = Signer("x.lambda-url.eu-west-1.on.aws", "eu-west-1", "lambda").sign(
        "POST", target, digest, creds
    )
    rec = Recorded(
        method="POST",
        raw_target=target,
        headers=[("Host", "x.lambda-url.eu-west-1.on.aws"), *headers],
        body=body,
    )
    verify_sigv4(rec, region="eu-west-1")


@pytest.mark.parametrize(
    ("secret", "stamp", "region", "service"),
    [
        ("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830T123600Z", "us-east-1", "iam"),
        (SECRET_KEY, "20261121T235959Z", "eu-west-1", "lambda"),
        (SECRET_KEY, "20261122T000000Z", "eu-west-1", "lambda"),
        ("other-secret", "20261122T000000Z", "ap-south-1", "execute-api"),
    ],
)
def test_cached_signing_key_matches_botocore(
    secret: str, stamp: str, region: str, service: str
) -> None:
    """The cached derived key gives botocore's own signature, first time and cached."""
    import hmac

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    creds = ReadOnlyCredentials("AKIDEXAMPLE", secret, None)
    request = AWSRequest(method="GET", url="https://example.amazonaws.com/")
    request.context["timestamp"] = stamp
    string_to_sign = (
        f"AWS4-HMAC-SHA256\n{stamp}\nscope\n" + hashlib.sha256(stamp.encode()).hexdigest()
    )
    expected = SigV4Auth(creds, service, region).signature(string_to_sign, request)
    keys = SigningKeys()
    for _ in range(2):  # derived, then from the cache
        key = keys.get(secret, stamp[:8], region, service)
        assert hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest() == expected
    assert len(keys) == 1
