from __future__ import annotations

import pytest

from sigproxy.config import parse_config
from sigproxy.routing import Router

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
