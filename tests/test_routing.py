from __future__ import annotations

import re

import pytest

from sigproxy.config import parse_config
from sigproxy.credentials import CredentialSource, CredentialStore
from sigproxy.errors import BadRequest, Forbidden, NoRoute
from sigproxy.routing import Router, RouteTable

CONFIG = """
upstreams:
  - {name: root, url: "https://r.lambda-url.us-east-1.on.aws", auth: none}
  - {name: orders, url: "https://o.lambda-url.us-east-1.on.aws/v1", path_prefix: /orders, auth: none}
  - {name: orders-eu, url: "https://e.lambda-url.eu-west-1.on.aws", path_prefix: /orders/eu/, auth: none}
  - {name: hosted, url: "https://h.lambda-url.us-east-1.on.aws", host: api.localhost, auth: none}
  - {name: hosted-orders, url: "https://ho.lambda-url.us-east-1.on.aws", host: api.localhost,
     path_prefix: /orders, auth: none}
"""


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(parse_config(CONFIG).upstreams)


@pytest.mark.parametrize(
    ("host", "path", "upstream", "sent_path"),
    [
        ("127.0.0.1:8080", "/", "root", "/"),
        ("127.0.0.1:8080", "/x/y", "root", "/x/y"),
        ("127.0.0.1:8080", "/orders", "orders", "/v1"),
        ("127.0.0.1:8080", "/orders/", "orders", "/v1/"),
        ("127.0.0.1:8080", "/orders/42", "orders", "/v1/42"),
        ("127.0.0.1:8080", "/ordersx", "root", "/ordersx"),  # segment boundary
        ("127.0.0.1:8080", "/orders/eu", "orders-eu", "/"),  # longest prefix wins
        ("127.0.0.1:8080", "/orders/eu/7", "orders-eu", "/7"),
        ("127.0.0.1:8080", "/orders/europe", "orders", "/v1/europe"),
        ("api.localhost:8080", "/anything", "hosted", "/anything"),
        ("API.LOCALHOST", "/orders/1", "hosted-orders", "/1"),  # host before plain prefix
        ("api.localhost.", "/x", "hosted", "/x"),
        ("other.localhost", "/orders/1", "orders", "/v1/1"),
        (None, "/orders", "orders", "/v1"),
    ],
)
def test_match(router: Router, host: str | None, path: str, upstream: str, sent_path: str) -> None:
    match = router.match(host, path)
    assert match is not None
    assert (match.upstream.name, match.path) == (upstream, sent_path)


def test_no_match_without_catch_all() -> None:
    router = Router(
        parse_config(
            "upstreams: [{name: a, url: 'https://a.lambda-url.us-east-1.on.aws', "
            "path_prefix: /orders, auth: none}]"
        ).upstreams
    )
    assert router.match("h", "/ordersx") is None
    assert router.match("h", "/") is None
    assert router.match("h", "/order") is None
    assert router.prefixes == ("/orders",)
    found = router.match("h", "/orders/x")
    assert found is not None
    assert found.path == "/x"


def test_prefixes_name_hosts(router: Router) -> None:
    assert router.prefixes == (
        "/",
        "/orders",
        "/orders/eu",
        "api.localhost/",
        "api.localhost/orders",
    )


# --- RouteTable.resolve: the request target as it arrived -> the route ----------------

RESOLVE_CONFIG = (
    CONFIG
    + """
  - {name: local, url: "http://127.0.0.1:9001/base", path_prefix: /local, auth: none}
"""
)


@pytest.fixture(scope="module")
def table() -> RouteTable:
    config = parse_config(RESOLVE_CONFIG)
    return RouteTable(config, CredentialStore({}))


@pytest.mark.parametrize(
    ("raw_target", "host", "upstream", "outgoing", "incoming"),
    [
        # Origin form: routed by Host and the normalised path, prefix replaced.
        ("/orders/42?b=2&a=1", "127.0.0.1:8080", "orders", "/v1/42?b=2&a=1", "/orders/42"),
        ("/%6Frders/./42", "localhost", "orders", "/v1/42", "/orders/42"),
        ("/orders/eu/x", None, "orders-eu", "/x", "/orders/eu/x"),
        ("/orders/x", "API.localhost:8080", "hosted-orders", "/x", "/orders/x"),
        ("/a+b?q=a+b", "localhost", "root", "/a+b?q=a%20b", "/a+b"),
        ("/local/x", "localhost", "local", "/base/x", "/local/x"),
        # Absolute form: the Function URL's own host, its base path kept.
        ("http://o.lambda-url.us-east-1.on.aws/v1/7", "ignored", "orders", "/v1/7", "/v1/7"),
        ("http://O.LAMBDA-URL.us-east-1.on.aws./v1", None, "orders", "/v1", "/v1"),
        ("http://r.lambda-url.us-east-1.on.aws", None, "root", "/", "/"),
        # Absolute form naming the proxy itself: routed as a path.
        ("http://127.0.0.1:8080/orders/1", "localhost", "orders", "/v1/1", "/orders/1"),
    ],
)
def test_resolve(
    table: RouteTable,
    raw_target: str,
    host: str | None,
    upstream: str,
    outgoing: str,
    incoming: str,
) -> None:
    route = table.resolve(raw_target, host)
    assert (route.target.upstream.name, route.outgoing, route.incoming) == (
        upstream,
        outgoing,
        incoming,
    )


@pytest.mark.parametrize(
    ("raw_target", "error", "code"),
    [
        ("*", BadRequest, "bad_request"),
        ("https://o.lambda-url.us-east-1.on.aws/x", BadRequest, "bad_request"),
        ("o.lambda-url.us-east-1.on.aws:443", BadRequest, "bad_request"),
        ("/a%zz", BadRequest, "bad_request"),
        ("/a\x01b", BadRequest, "bad_request"),
        ("http://evil.example/orders", Forbidden, "host_not_allowed"),
        ("http://127.0.0.1:8080/nowhere", NoRoute, "no_route"),
    ],
)
def test_resolve_refusals(raw_target: str, error: type, code: str) -> None:
    # Without the "/" route, so that a path can go unrouted.
    no_root = RouteTable(
        parse_config(
            RESOLVE_CONFIG.replace(
                '  - {name: root, url: "https://r.lambda-url.us-east-1.on.aws", auth: none}\n', ""
            )
        ),
        CredentialStore({}),
    )
    with pytest.raises(error) as refused:
        no_root.resolve(raw_target, "localhost")
    assert refused.value.code == code
    if code == "no_route":
        assert refused.value.extra["prefixes"] == list(no_root.router.prefixes)
    # The message never echoes the target's host or path.
    assert "evil" not in str(refused.value)


def test_origins_carry_the_pool_settings(table: RouteTable) -> None:
    local = table.targets["local"].origin
    assert (local.scheme, local.host, local.port, local.name) == (
        "http",
        "127.0.0.1",
        9001,
        "local",
    )
    orders = table.targets["orders"].origin
    assert (orders.host, orders.port, orders.tls) == ("o.lambda-url.us-east-1.on.aws", 443, True)
    assert (orders.max_connections, orders.idle_timeout) == (1024, 15.0)


def test_the_readme_quick_start_request_reaches_the_example_upstream() -> None:
    """The README's first real request, against config.example.yaml, is routed to an
    upstream (it used to get 404: the example's orders route needed Host
    orders.localhost), and its forward-proxy example names a host of the table."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    (target,) = re.findall(r"curl '(http://127\.0\.0\.1:8080[^']*)'", quick)
    config = parse_config((root / "config.example.yaml").read_text())
    source = CredentialSource.static("AKIDEXAMPLE", "example-secret")
    table = RouteTable(config, CredentialStore.static_for(config, source))
    route = table.resolve(target.removeprefix("http://127.0.0.1:8080"), "127.0.0.1:8080")
    assert route.target.upstream.name == "orders"
    (forward,) = re.findall(r"curl -x http://127\.0\.0\.1:8080 '([^']+)'", readme)
    assert table.resolve(forward, None).target.upstream.name == "orders"
