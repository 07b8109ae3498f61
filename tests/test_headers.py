"""The header policy as a table: what goes upstream, what comes back (sigproxy.headers)."""

from __future__ import annotations

import pytest

from sigproxy.errors import BadRequest
from sigproxy.headers import Client, is_utf8, request_headers, response_headers

CLIENT = Client(address="10.0.0.9", scheme="http", host="127.0.0.1:8080")


def upstream_bound(
    incoming: list[tuple[str, str]],
    *,
    signed: bool = True,
    client: Client = CLIENT,
    token_header: str | None = None,
) -> list[tuple[str, str]]:
    return request_headers(
        incoming,
        host="abc.lambda-url.us-east-1.on.aws",
        signed=signed,
        client=client,
        request_id="rid-1",
        token_header=token_header,
    )


FORWARDED = [
    ("X-Forwarded-For", "10.0.0.9"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Host", "127.0.0.1:8080"),
    ("X-Request-Id", "rid-1"),
]


@pytest.mark.parametrize(
    ("incoming", "signed", "token_header", "kept"),
    [
        # Ordinary end-to-end headers pass in order, repeats and case kept.
        (
            [("Accept", "a/b"), ("x-custom", "1"), ("X-Custom", "2"), ("Cookie", "c=1")],
            True,
            None,
            [("Accept", "a/b"), ("x-custom", "1"), ("X-Custom", "2"), ("Cookie", "c=1")],
        ),
        # Hop-by-hop (RFC 9110 7.6.1) and the ones the proxy sets itself go.
        (
            [
                ("Connection", "keep-alive"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("Proxy-Authorization", "Basic eA=="),
                ("TE", "trailers"),
                ("Trailer", "X-T"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Host", "127.0.0.1:8080"),
                ("Content-Length", "3"),
                ("Expect", "100-continue"),
                ("X-Request-Id", "client-chosen"),
                ("Accept", "*/*"),
            ],
            True,
            None,
            [("Accept", "*/*")],
        ),
        # Headers a Connection header names are hop-by-hop for this message; the ones
        # the proxy sets itself stay whatever it names.
        (
            [
                ("Connection", "close, X-Secret-Hop, Host, X-Request-Id"),
                ("X-Secret-Hop", "1"),
                ("X-Other", "2"),
            ],
            True,
            None,
            [("X-Other", "2")],
        ),
        # On a signed route the client's own Authorization and X-Amz-* would contradict
        # the proxy's signature.
        (
            [
                ("Authorization", "AWS4-HMAC-SHA256 stale"),
                ("X-Amz-Date", "20000101T000000Z"),
                ("x-amz-security-token", "old"),
                ("X-Amzn-Trace-Id", "Root=1"),
            ],
            True,
            None,
            [("X-Amzn-Trace-Id", "Root=1")],
        ),
        # auth: none passes them through: the function may want its own Authorization.
        (
            [("Authorization", "Bearer app-token"), ("X-Amz-Meta", "m")],
            False,
            None,
            [("Authorization", "Bearer app-token"), ("X-Amz-Meta", "m")],
        ),
        # The inbound_auth header is the proxy's, never the function's.
        (
            [("X-Proxy-Token", "secret-token-0123456789"), ("Accept", "*/*")],
            False,
            "x-proxy-token",
            [("Accept", "*/*")],
        ),
        # Valid UTF-8 beyond ASCII passes as it is.
        ([("X-Name", "café")], True, None, [("X-Name", "café")]),
    ],
)
def test_request_headers(
    incoming: list[tuple[str, str]],
    signed: bool,
    token_header: str | None,
    kept: list[tuple[str, str]],
) -> None:
    out = upstream_bound(incoming, signed=signed, token_header=token_header)
    assert out == [("Host", "abc.lambda-url.us-east-1.on.aws"), *kept, *FORWARDED]


@pytest.mark.parametrize(
    ("prior", "client", "expected"),
    [
        ([], CLIENT, [("X-Forwarded-For", "10.0.0.9")]),
        (
            [("X-Forwarded-For", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")],
            CLIENT,
            [("X-Forwarded-For", "1.1.1.1, 2.2.2.2, 10.0.0.9")],
        ),
        (
            [("X-Forwarded-For", "1.1.1.1")],
            Client("", "http", None),
            [("X-Forwarded-For", "1.1.1.1")],
        ),
        ([], Client("", "http", None), []),
    ],
)
def test_forwarded_for_is_rebuilt(
    prior: list[tuple[str, str]], client: Client, expected: list[tuple[str, str]]
) -> None:
    out = upstream_bound(prior, client=client)
    assert [h for h in out if h[0] == "X-Forwarded-For"] == expected
    # Forwarded-Host only when the client sent a Host.
    assert any(h[0] == "X-Forwarded-Host" for h in out) is (client.host is not None)


def test_a_value_that_is_not_utf8_is_refused_not_altered() -> None:
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")  # as aiohttp hands it over
    with pytest.raises(BadRequest, match="X-Name is not valid UTF-8"):
        upstream_bound([("X-Name", undecodable)])


@pytest.mark.parametrize(
    ("incoming", "cors", "kept", "dropped"),
    [
        (
            [("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")],
            False,
            [("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")],
            [],
        ),
        # Framing and the request id are the proxy's.
        (
            [
                ("Content-Length", "2"),
                ("Transfer-Encoding", "chunked"),
                ("Connection", "close, X-Hop"),
                ("X-Hop", "1"),
                ("X-Request-Id", "upstream's"),
                ("ETag", '"v1"'),
            ],
            False,
            [("ETag", '"v1"')],
            [],
        ),
        # With a CORS policy the upstream's own Access-Control-* give way to it.
        (
            [("Access-Control-Allow-Origin", "*"), ("Vary", "Accept")],
            True,
            [("Vary", "Accept")],
            [],
        ),
        ([("Access-Control-Allow-Origin", "*")], False, [("Access-Control-Allow-Origin", "*")], []),
        # A value that is not UTF-8 is dropped and named, never sent altered.
        (
            [("X-Bad", b"\xff".decode("utf-8", "surrogateescape")), ("X-Good", "1")],
            False,
            [("X-Good", "1")],
            ["X-Bad"],
        ),
    ],
)
def test_response_headers(
    incoming: list[tuple[str, str]], cors: bool, kept: list[tuple[str, str]], dropped: list[str]
) -> None:
    assert response_headers(incoming, cors=cors) == (kept, dropped)


@pytest.mark.parametrize(
    ("headers", "tokens"),
    [
        ([], set()),
        ([("Connection", "close")], {"close"}),
        (
            [("connection", " Keep-Alive , X-A,,"), ("Connection", "x-b")],
            {"keep-alive", "x-a", "x-b"},
        ),
        ([("X-Connection", "x-a")], set()),
    ],
)
def test_the_names_connection_lists_are_dropped_both_ways(
    headers: list[tuple[str, str]], tokens: set[str]
) -> None:
    """Exactly the names the Connection headers list (trimmed, any case, empty items
    ignored, several Connection headers added up) are hop-by-hop."""
    listed = [(t.upper(), "v") for t in sorted(tokens)]
    others = [h for h in headers if h[0].lower() != "connection"]
    incoming = [*headers, *listed, ("X-Kept", "1")]
    assert response_headers(incoming, cors=False) == ([*others, ("X-Kept", "1")], [])
    sent = upstream_bound(incoming, signed=False)
    assert sent == [
        ("Host", "abc.lambda-url.us-east-1.on.aws"),
        *others,
        ("X-Kept", "1"),
        *FORWARDED,
    ]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("plain", True),
        ("café", True),
        ("\U0001f600", True),
        (b"\xe9".decode("utf-8", "surrogateescape"), False),
    ],
)
def test_is_utf8(value: str, ok: bool) -> None:
    assert is_utf8(value) is ok
