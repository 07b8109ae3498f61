"""Which proxy an upstream goes through (sigproxy.egress, pure) and the config keys of
issue 14 (egress_proxy, connect_to, retries, content_sha256_header)."""

from __future__ import annotations

import base64

import pytest

from sigproxy.config import parse_config
from sigproxy.egress import bypassed, from_environment, parse_proxy_url
from sigproxy.errors import ConfigError

HOST = "abc123.lambda-url.us-east-1.on.aws"
URL = f"https://{HOST}"


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "expected"),
    [
        ("*", HOST, 443, True),
        (HOST, HOST, 443, True),
        ("lambda-url.us-east-1.on.aws", HOST, 443, True),  # a suffix on a label boundary
        (".on.aws", HOST, 443, True),
        ("*.on.aws", HOST, 443, True),
        ("url.us-east-1.on.aws", HOST, 443, False),  # not on a label boundary: -url
        ("example.com, " + HOST.upper(), HOST, 443, True),
        (f"{HOST}:443", HOST, 443, True),
        (f"{HOST}:8443", HOST, 443, False),
        ("10.0.0.0/8", "10.1.2.3", 443, True),
        ("10.0.0.0/8", "11.1.2.3", 443, False),
        ("10.1.2.3", "10.1.2.3", 443, True),
        ("::1", "::1", 443, True),
        ("[fd00::1]:443", "fd00::1", 443, True),
        ("", HOST, 443, False),
        (" , ,", HOST, 443, False),
    ],
)
def test_no_proxy(no_proxy: str, host: str, port: int, expected: bool) -> None:
    assert bypassed(host, port, no_proxy) is expected


def test_environment_variables_in_curls_order() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "ALL_PROXY": "x:3"}
    assert from_environment("https", HOST, 443, env) == ("https_proxy", "http://lower:2")
    assert from_environment("https", HOST, 443, {"HTTPS_PROXY": "h:1"}) == ("HTTPS_PROXY", "h:1")
    assert from_environment("https", HOST, 443, {"all_proxy": "a:1"}) == ("all_proxy", "a:1")
    # http_proxy does not apply to https upstreams.
    assert from_environment("https", HOST, 443, {"http_proxy": "h:1"}) is None
    assert from_environment("http", "fn.internal", 80, {"HTTP_PROXY": "h:1"}) == (
        "HTTP_PROXY",
        "h:1",
    )
    # no_proxy first, then NO_PROXY; loopback is never proxied from the environment.
    assert from_environment("https", HOST, 443, {**env, "no_proxy": HOST}) is None
    assert from_environment("https", HOST, 443, {**env, "NO_PROXY": ".on.aws"}) is None
    assert from_environment("http", "127.0.0.1", 9000, env) is None
    assert from_environment("http", "localhost", 9000, env) is None


def test_proxy_url_credentials_are_a_header_never_shown() -> None:
    proxy = parse_proxy_url("http://us%40er:p%3Ass@proxy.corp:3128", "egress_proxy")
    assert (proxy.host, proxy.port) == ("proxy.corp", 3128)
    assert proxy.authorization == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert proxy.url == "http://***@proxy.corp:3128"
    assert "p:ss" not in repr(proxy) and "p%3Ass" not in repr(proxy)
    assert parse_proxy_url("proxy.corp", "x").url == "http://proxy.corp:80"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("https://proxy:3128", "https:// proxies are not supported"),
        ("socks5://proxy:1080", "socks5:// proxies are not supported"),
        ("http://proxy:3128/path", "only http://[user:password@]host:port"),
        ("http://:3128", "it has no host"),
        ("http://proxy:99999", "is not a valid proxy URL"),
    ],
)
def test_bad_proxy_urls_are_one_line(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"upstreams: [{{name: fn, url: '{URL}'}}]\negress_proxy: '{value}'\n")
    assert str(info.value).startswith("egress_proxy: ")
    assert fragment in str(info.value)


def test_bad_proxy_in_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            f"upstreams: [{{name: fn, url: '{URL}'}}]\n", environ={"HTTPS_PROXY": "socks5://p:1"}
        )
    assert str(info.value).startswith("HTTPS_PROXY (environment): ")


def test_upstream_setting_wins_over_global_and_environment() -> None:
    text = (
        "egress_proxy: http://global:1\n"
        "upstreams:\n"
        f"  - {{name: a, url: '{URL}'}}\n"
        f"  - {{name: b, url: '{URL}', path_prefix: /b, egress_proxy: none}}\n"
        f"  - {{name: c, url: '{URL}', path_prefix: /c, egress_proxy: 'http://own:2'}}\n"
    )
    config = parse_config(text, environ={"HTTPS_PROXY": "http://env:3"})
    assert [u.egress.url if u.egress else None for u in config.upstreams] == [
        "http://global:1",
        None,
        "http://own:2",
    ]
    off = parse_config(text.replace("http://global:1", "none"), environ={"HTTPS_PROXY": "e:3"})
    assert [u.egress.url if u.egress else None for u in off.upstreams] == [
        None,
        None,
        "http://own:2",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("connect_to: '10.0.0.5'", "upstreams[0].connect_to: '10.0.0.5' must be host:port"),
        ("connect_to: 'a b:443'", "upstreams[0].connect_to: 'a b' is not an IP address or host"),
        (
            "connect_to: 'bad..name:443'",
            "upstreams[0].connect_to: 'bad..name' is not an IP address or host name",
        ),
        (
            "auth: aws_iam, content_sha256_header: true",
            "upstreams[0].content_sha256_header: only applies to auth: none upstreams",
        ),
        ("retries: {attempts: 0}", "upstreams[0].retries.attempts: must be between 1 and 10"),
        (
            "retries: {backoff_base: 2, backoff_max: 1}",
            "upstreams[0].retries.backoff_base: must not be more than retries.backoff_max",
        ),
        ("retries: {budget_percent: 101}", "upstreams[0].retries.budget_percent: must be between"),
    ],
)
def test_issue_14_keys_fail_in_one_line(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"upstreams: [{{name: fn, url: '{URL}', {extra}}}]\n")
    assert str(info.value).startswith(message), str(info.value)


def test_connect_to_forms() -> None:
    for given, parsed in [
        ("10.0.0.5:443", ("10.0.0.5", 443)),
        ("[fd00::5]:8443", ("fd00::5", 8443)),
        (
            "VPCE-1.lambda.us-east-1.vpce.amazonaws.com:443",
            ("vpce-1.lambda.us-east-1.vpce.amazonaws.com", 443),
        ),
        ("localhost:9000", ("localhost", 9000)),
    ]:
        config = parse_config(f"upstreams: [{{name: fn, url: '{URL}', connect_to: '{given}'}}]\n")
        assert config.upstreams[0].connect_to == parsed


def test_the_proxy_password_is_in_no_repr() -> None:
    config = parse_config(
        "egress_proxy: 'http://u:pw-never-LOGGED@g:1'\n"
        f"upstreams: [{{name: fn, url: '{URL}', egress_proxy: 'http://u:pw-never-LOGGED@p:2'}}]\n"
    )
    assert "pw-never-LOGGED" not in repr(config)
    assert config.upstreams[0].egress is not None
    assert config.upstreams[0].egress.authorization is not None


def test_connect_to_counts_for_the_environment() -> None:
    env = {"HTTPS_PROXY": "http://corp:3128", "NO_PROXY": "10.0.0.0/8"}
    assert from_environment("https", HOST, 443, env) == ("HTTPS_PROXY", "http://corp:3128")
    # An SSH tunnel on loopback, a VPC endpoint the environment lists: reached directly.
    assert from_environment("https", HOST, 443, env, ("127.0.0.1", 8443)) is None
    assert from_environment("https", HOST, 443, env, ("10.0.12.34", 443)) is None
    assert from_environment("https", HOST, 443, env, ("192.0.2.7", 443)) is not None


@pytest.mark.parametrize("password", ["a/b", "a#b", "a?b"])
def test_a_password_urlsplit_cannot_read_is_not_quoted(password: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_proxy_url(f"http://me:Hunter2{password}Secret@proxy:3128", "egress_proxy")
    assert "Hunter2" not in str(info.value) and "Secret" not in str(info.value)
