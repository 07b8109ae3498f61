"""Requests through the running proxy to a fake Function URL: what arrives is what was
signed, recomputed from the wire bytes by awscrt (AWS's C signer), not by botocore."""

from __future__ import annotations

import hashlib
import json

import pytest

from .conftest import StartProxy, one_upstream
from .support import FakeFunctionUrl, raw_request, verify_sigv4


def prefixed(port: int, signer: str = "builtin") -> str:
    return (
        f"signer: {signer}\n"
        "upstreams:\n"
        "  - name: orders\n"
        f"    url: http://127.0.0.1:{port}/base\n"
        "    region: eu-west-1\n"
        "    path_prefix: /orders\n"
    )


TARGETS = [
    # (client target, target that must reach the Function URL)
    ("/orders", "/base"),
    ("/orders/", "/base/"),
    ("/orders/a%20b", "/base/a%20b"),
    ("/orders/a+b", "/base/a+b"),
    ("/orders/a%2fb", "/base/a%2Fb"),
    ("/orders/%7Euser/x.json", "/base/~user/x.json"),
    ("/orders/a:b@c!$&'()*,;=", "/base/a:b@c!$&'()*,;="),
    ("/orders/caf%C3%A9", "/base/caf%C3%A9"),
    ("/orders/x/./y/../z", "/base/x/z"),
    ("/orders//x///y", "/base/x/y"),
    ("/orders/%E2%82%AC/", "/base/%E2%82%AC/"),
    ("/orders?q=a+b", "/base?q=a%20b"),
    ("/orders?q=a%2Bb", "/base?q=a%2Bb"),
    ("/orders?q=a%20b&q=c", "/base?q=a%20b&q=c"),
    ("/orders?b=2&a=1&B=3&a=0", "/base?b=2&a=1&B=3&a=0"),
    ("/orders?flag&empty=&=v", "/base?flag=&empty=&=v"),
    (
        "/orders?list=a,b,c&next=https://x.y/z?a=b",
        "/base?list=a%2Cb%2Cc&next=https%3A%2F%2Fx.y%2Fz%3Fa%3Db",
    ),
    ("/orders?k=%7e&t=~&u=%C3%BC", "/base?k=~&t=~&u=%C3%BC"),
    ("/orders?pct=%25&bin=%FF%00", "/base?pct=%25&bin=%FF%00"),
    ("/orders/p%25/q?x=1#fragment", "/base/p%25/q?x=1"),
]


@pytest.mark.parametrize("signer", ["builtin", "botocore"])
@pytest.mark.parametrize(("client_target", "expected"), TARGETS)
async def test_awkward_targets_arrive_as_signed(
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    client_target: str,
    expected: str,
    signer: str,
) -> None:
    proxy = await start_proxy(prefixed(upstream.port, signer))
    resp = await raw_request(proxy.port, "GET", client_target)
    assert resp.status == 200, resp.body
    rec = upstream.last
    assert rec.raw_target == expected
    assert rec.header("Host") == f"127.0.0.1:{upstream.port}"
    verify_sigv4(rec, region="eu-west-1")


BODIES = [
    ("GET", b"", []),
    ("POST", b"", []),
    (
        "POST",
        json.dumps({"name": "John", "n": [1, 2, 3], "s": "é"}).encode(),
        [("Content-Type", "application/json")],
    ),
    ("PUT", bytes(range(256)) * 4, [("Content-Type", "application/octet-stream")]),
    ("PATCH", b"a=1&b=2", [("Content-Type", "application/x-www-form-urlencoded")]),
    ("DELETE", b"x" * 100_000, []),
    # Near the 6 MB Function URL limit: sent as a stream, hashed whole.
    ("POST", bytes(range(256)) * (5 * 4096), [("Content-Type", "application/octet-stream")]),
]


@pytest.mark.parametrize(("method", "body", "headers"), BODIES)
async def test_bodies_are_hashed_and_forwarded(
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
    method: str,
    body: bytes,
    headers: list[tuple[str, str]],
) -> None:
    proxy = await start_proxy(one_upstream(upstream.port))
    resp = await raw_request(
        proxy.port, method, "/fn?x=1", headers, body if body or method != "GET" else None
    )
    assert resp.status == 200
    rec = upstream.last
    assert rec.method == method
    assert rec.body == body
    assert rec.header("X-Amz-Content-SHA256") == hashlib.sha256(body).hexdigest()
    for name, value in headers:
        assert rec.header(name) == value
    verify_sigv4(rec, region="us-east-1")


async def test_chunked_client_body(upstream: FakeFunctionUrl, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(one_upstream(upstream.port))
    chunks = [b'{"part": 1,', b' "more": "' + b"z" * 70_000 + b'"}']
    resp = await raw_request(proxy.port, "POST", "/", chunked_body=chunks)
    assert resp.status == 200
    rec = upstream.last
    assert rec.body == b"".join(chunks)
    assert rec.header("Transfer-Encoding") is None
    assert rec.header("Content-Length") == str(len(rec.body))
    verify_sigv4(rec, region="us-east-1")


async def test_permanent_credentials_send_no_token(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    from sigproxy.credentials import CredentialSource

    source = CredentialSource.static("AKIDPERMANENT0000001", "permanent-secret")
    proxy = await start_proxy(
        one_upstream(upstream.port, service="execute-api"), credentials=source
    )
    resp = await raw_request(proxy.port, "POST", "/x", body=b"{}")
    assert resp.status == 200
    verify_sigv4(
        upstream.last,
        region="us-east-1",
        service="execute-api",
        access_key="AKIDPERMANENT0000001",
        secret_key="permanent-secret",
        token=None,
    )


async def test_a_wrong_secret_is_caught(upstream: FakeFunctionUrl, start_proxy: StartProxy) -> None:
    """The verifier itself can fail: a signature made with other keys is refused."""
    proxy = await start_proxy(one_upstream(upstream.port))
    await raw_request(proxy.port, "GET", "/a?b=c")
    with pytest.raises(AssertionError, match="signature mismatch"):
        verify_sigv4(upstream.last, region="us-east-1", secret_key="not-the-secret")


async def test_unrepresentable_target_is_400_and_not_forwarded(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(one_upstream(upstream.port))
    for target in ("/a%zz", "/a?b=%G0", "/a?b=%"):
        resp = await raw_request(proxy.port, "GET", target)
        assert resp.status == 400, target
        body = json.loads(resp.body)
        assert body["error"] == "bad_request"
        assert "percent-encoding" in body["message"]
        assert resp.header(
            "Content-Type",
        ).startswith("application/json")  # type: ignore[union-attr]
    assert upstream.requests == []
    ok = await raw_request(proxy.port, "GET", "/still-serving")
    assert ok.status == 200
