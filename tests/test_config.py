from __future__ import annotations

from pathlib import Path

import pytest

from sigproxy.config import DEFAULT_MAX_BODY_BYTES, load_config, parse_config
from sigproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
URL = "https://abc123.lambda-url.us-east-1.on.aws"


def up(**fields: object) -> str:
    base: dict[str, object] = {"name": "fn", "url": URL}
    base.update(fields)
    inner = ", ".join(f"{k}: {v}" for k, v in base.items() if v is not None)
    return "upstreams:\n  - {" + inner + "}\n"


def test_defaults_and_region_from_url() -> None:
    config = parse_config(up())
    assert config.listen.host == "127.0.0.1"
    assert config.listen.port == 8080
    (u,) = config.upstreams
    assert u.region == "us-east-1"
    assert u.service == "lambda"
    assert u.auth == "aws_iam"
    assert u.path_prefix == "/"
    assert u.match_host is None
    assert u.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 6291456
    assert (u.timeout.connect, u.timeout.read) == (5.0, 900.0)
    assert u.origin == URL
    assert u.host_header == "abc123.lambda-url.us-east-1.on.aws"
    assert u.base_path == ""
    assert u.credentials.describe() == "default chain"


def test_full_upstream() -> None:
    text = """
listen: {host: 0.0.0.0, port: 9000}
allow_unauthenticated: true
log_level: debug
upstreams:
  - name: orders_v2
    url: https://x9.execute-api.eu-central-1.amazonaws.com/prod/
    path_prefix: /orders/
    host: Orders.Localhost
    service: execute-api
    credentials: {profile: dev, role_arn: "arn:aws:iam::123456789012:role/r", external_id: e,
                  session_name: s-1, duration_seconds: 3600}
    timeout: {connect: 1.5, read: 30}
    max_body_bytes: 1024
"""
    config = parse_config(text)
    u = config.upstreams[0]
    assert config.listen.port == 9000
    assert config.log_level == "debug"
    assert u.region == "eu-central-1"
    assert u.service == "execute-api"
    assert u.base_path == "/prod"
    assert u.path_prefix == "/orders"
    assert u.match_host == "orders.localhost"
    assert u.credentials.role_arn == "arn:aws:iam::123456789012:role/r"
    assert u.credentials.duration_seconds == 3600
    assert (
        u.credentials.describe() == "assume-role arn:aws:iam::123456789012:role/r via profile dev"
    )
    assert (u.timeout.connect, u.timeout.read) == (1.5, 30.0)
    assert u.max_body_bytes == 1024


def test_loopback_http_with_port_and_ipv6() -> None:
    config = parse_config(
        "upstreams:\n"
        "  - {name: a, url: 'http://127.0.0.1:9999/base', region: eu-west-1}\n"
        "  - {name: b, url: 'http://[::1]:80', region: eu-west-1, path_prefix: /b}\n"
        "  - {name: c, url: 'http://localhost', auth: none, path_prefix: /c}\n"
    )
    a, b, c = config.upstreams
    assert (a.origin, a.host_header, a.base_path) == (
        "http://127.0.0.1:9999",
        "127.0.0.1:9999",
        "/base",
    )
    assert (b.origin, b.host_header) == ("http://[::1]", "[::1]")
    assert c.region == ""


def test_env_expansion(tmp_path: Path) -> None:
    text = (
        "listen: {port: '${PORT}'}\n"
        "upstreams:\n"
        "  - name: fn\n"
        "    url: ${FN_URL}\n"
        "    path_prefix: ${PREFIX:-/api}\n"
        "    region: ${REGION:-us-east-1}\n"
        "    timeout: {read: '${READ:-60}'}\n"
        "    credentials: {profile: 'cost$$center'}\n"
    )
    env = {"PORT": "8123", "FN_URL": URL, "REGION": ""}
    config = parse_config(text, environ=env)
    u = config.upstreams[0]
    assert config.listen.port == 8123
    assert u.url == URL
    assert u.path_prefix == "/api"
    assert u.region == "us-east-1"  # empty variable takes the default, like the shell's :-
    assert u.timeout.read == 60.0
    assert u.credentials.profile == "cost$center"


def test_env_value_is_not_yaml() -> None:
    config = parse_config(
        "upstreams:\n  - {name: fn, url: '" + URL + "', path_prefix: '${P}'}\n",
        environ={"P": "/a: {b: c}"},
    )
    assert config.upstreams[0].path_prefix == "/a:%20%7Bb:%20c%7D"


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("", "upstreams", "is required"),
        ("upstreams: []", "upstreams", "non-empty list"),
        ("upstreams: {a: 1}", "upstreams", "non-empty list"),
        ("- a\n- b\n", "", "must be a mapping"),
        ("listen: {port: 70000}\n" + up(), "listen.port", "between 0 and 65535"),
        ("listen: {port: eighty}\n" + up(), "listen.port", "must be an integer"),
        ("listen: {port: '${PORT}'}\n" + up(), "listen.port", "PORT is not set"),
        ("listen: {hots: x}\n" + up(), "listen.hots", "did you mean 'host'"),
        ("log_level: loud\n" + up(), "log_level", "must be one of"),
        ("signer: fast\n" + up(), "signer", "must be one of"),
        ("colour: blue\n" + up(), "colour", "unknown key"),
        (up(name=None), "upstreams[0].name", "is required"),
        (up(name="Orders"), "upstreams[0].name", "a-z, 0-9"),
        (up(url=None), "upstreams[0].url", "is required"),
        (up(url="ftp://x"), "upstreams[0].url", "https:// URL"),
        (
            up(url="http://abc.lambda-url.us-east-1.on.aws"),
            "upstreams[0].url",
            "only allowed for loopback",
        ),
        (up(url="http://10.0.0.1:8080"), "upstreams[0].url", "only allowed for loopback"),
        (up(url="'https://u:p@abc.lambda-url.us-east-1.on.aws'"), "upstreams[0].url", "user name"),
        (up(url="'https://abc.lambda-url.us-east-1.on.aws/?a=b'"), "upstreams[0].url", "query"),
        (
            up(url="'https://abc.lambda-url.us-east-1.on.aws:99999'"),
            "upstreams[0].url",
            "not a valid URL",
        ),
        (up(url="https://example.com"), "upstreams[0].region", "cannot be read from the URL"),
        (up(region="us-west-2"), "upstreams[0].region", "does not match"),
        (up(region="mars"), "upstreams[0].region", "not an AWS region"),
        (up(region=5), "upstreams[0].region", "must be a string"),
        (up(service="Lambda!"), "upstreams[0].service", "signing name"),
        (up(auth="sigv4"), "upstreams[0].auth", "aws_iam, none"),
        (up(path_prefix="orders"), "upstreams[0].path_prefix", "starting with '/'"),
        (up(path_prefix="'/a?b'"), "upstreams[0].path_prefix", "starting with '/'"),
        (up(path_prefix="/a%zz"), "upstreams[0].path_prefix", "percent-encoding"),
        (up(host="'a.localhost:8080'"), "upstreams[0].host", "without a port"),
        (up(timeout="{connect: 0}"), "upstreams[0].timeout.connect", "more than 0"),
        (up(timeout="{read: soon}"), "upstreams[0].timeout.read", "number of seconds"),
        (up(timeout="{write: 3}"), "upstreams[0].timeout.write", "unknown key"),
        (up(timeout=5), "upstreams[0].timeout", "must be a mapping"),
        (up(max_body_bytes=-1), "upstreams[0].max_body_bytes", "between 0"),
        (up(max_body_bytes="6MB"), "upstreams[0].max_body_bytes", "must be an integer"),
        (up(max_body_bytes="true"), "upstreams[0].max_body_bytes", "must be an integer"),
        (
            up(credentials="{profil: dev}"),
            "upstreams[0].credentials.profil",
            "did you mean 'profile'",
        ),
        (up(credentials="{role_arn: admin}"), "upstreams[0].credentials.role_arn", "IAM role ARN"),
        (
            up(credentials="{external_id: x}"),
            "upstreams[0].credentials.external_id",
            "only applies together with role_arn",
        ),
        (
            up(credentials="{role_arn: 'arn:aws:iam::123456789012:role/r', duration_seconds: 60}"),
            "upstreams[0].credentials.duration_seconds",
            "between 900 and 43200",
        ),
        (
            up(auth="none", credentials="{profile: dev}"),
            "upstreams[0].credentials",
            "not used when auth is none",
        ),
        (up(colour="blue"), "upstreams[0].colour", "unknown key"),
        (
            up() + "  - {name: fn, url: '" + URL + "', path_prefix: /x}\n",
            "upstreams[1].name",
            "duplicate name 'fn'",
        ),
        (
            up() + "  - {name: other, url: '" + URL + "'}\n",
            "upstreams[1].path_prefix",
            "already routed to upstream 'fn'",
        ),
        (
            up(path_prefix="/a/") + "  - {name: b, url: '" + URL + "', path_prefix: /a}\n",
            "upstreams[1].path_prefix",
            "already routed",
        ),
        ("upstreams:\n  - name: a\n    name: b\n    url: x\n", "", "duplicate key 'name'"),
        ("upstreams: [", "", "invalid YAML: line 1"),
    ],
)
def test_errors_name_the_key_path(text: str, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert info.value.path == path
    if path:
        assert message.startswith(path + ": ")
    assert fragment in message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config file .*missing\.yaml \(give --config"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(bad))


def test_example_config_is_valid() -> None:
    config = load_config(str(ROOT / "config.example.yaml"), environ={})
    assert [u.name for u in config.upstreams] == ["orders", "public", "cdn"]
    assert config.listen.port == 8080
    # An empty ${SIGPROXY_EGRESS_PROXY:-} is the key's default: the environment decides.
    assert config.egress_proxy is None
    proxied = load_config(
        str(ROOT / "config.example.yaml"), environ={"HTTPS_PROXY": "http://proxy.corp:3128"}
    )
    assert [u.egress.url if u.egress else None for u in proxied.upstreams] == [
        "http://proxy.corp:3128",
        None,  # egress_proxy: none
        "http://proxy.corp:3128",
    ]


def test_tokens_file_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config and its tokens file side by side work from any working directory, as the
    emulator's handler paths already do."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "tokens").write_text("a-token-of-sixteen-chars-or-more\n")
    (folder / "sigproxy.yaml").write_text(
        "listen: {host: 0.0.0.0}\ninbound_auth: {tokens_file: tokens}\n"
        "upstreams: [{name: a, url: 'http://127.0.0.1:1', region: us-east-1}]\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(str(folder / "sigproxy.yaml"))
    assert config.inbound_auth is not None
    assert config.inbound_auth.tokens == ("a-token-of-sixteen-chars-or-more",)
