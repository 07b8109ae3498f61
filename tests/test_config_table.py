"""The declarative config: each coercer, ${VAR} for every type, defaults that come from
the dataclasses, and config.example.yaml against the keys the dataclasses declare."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sigproxy.config import (
    CORS_KEYS,
    SCHEMA,
    Admin,
    Choice,
    ClientTimeouts,
    Coercer,
    Config,
    CredentialsSpec,
    Int,
    Key,
    Limits,
    Listen,
    ListOf,
    OrNone,
    Schema,
    Text,
    Timeouts,
    Upstream,
    boolean,
    key,
    parse_config,
    parse_yaml,
    seconds,
    section,
    spec,
    text,
)
from sigproxy.emulator.config import SCHEMA as EMULATOR
from sigproxy.emulator.config import EmulatorConfig, FunctionConfig, build_emulator_config
from sigproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
HOST = "abc123.lambda-url.us-east-1.on.aws"
URL = f"https://{HOST}"
UPSTREAM = f"upstreams: [{{name: fn, url: '{URL}'}}]\n"


def expanded(value: str) -> Any:
    """``value`` as a ``${VAR}`` expansion hands it to a coercer."""
    return parse_yaml("v: ${V}", {"V": value})["v"]


@dataclasses.dataclass(frozen=True)
class Point:
    x: int = key(0, Int(0, 9))
    y: int = key(0, Int(0, 9))


@dataclasses.dataclass(frozen=True)
class Named:
    name: str = dataclasses.field(metadata=spec(text))


POINT = section(Point)
LOWER = Text(re.compile(r"[a-z]+"), "{!r} is not lower-case letters", str.lower)

# --- each coercer: what it reads, and the exact error for what it refuses ----------------

VALID: list[tuple[Coercer[Any], Any, Any]] = [
    (text, " a b ", "a b"),
    (text, "", ""),
    (text, expanded("x"), "x"),
    (LOWER, "AbC", "abc"),
    (Int(1, 10), 1, 1),
    (Int(1, 10), 10, 10),
    (Int(1, 10), expanded(" 7 "), 7),
    (Int(-5, 5), expanded("-3"), -3),
    (seconds, 1, 1.0),
    (seconds, 2.5, 2.5),
    (seconds, 86400, 86400.0),
    (seconds, expanded("0.5"), 0.5),
    (seconds, expanded("60"), 60.0),
    (boolean, True, True),
    (boolean, False, False),
    *[(boolean, expanded(w), True) for w in ("true", "yes", "on", "1", "TRUE", " Yes ")],
    *[(boolean, expanded(w), False) for w in ("false", "no", "off", "0", "Off")],
    (Choice(("a", "b")), "b", "b"),
    (Choice(("a", "b")), expanded("a"), "a"),
    (ListOf(text), [" a", "b "], ("a", "b")),
    (ListOf(text), [], ()),
    (ListOf(Int(0, 9)), [expanded("3"), 4], (3, 4)),
    (POINT, {}, Point()),
    (POINT, {"x": 1}, Point(x=1)),
    (POINT, {"x": None, "y": ""}, Point()),  # null and empty are left out
    (POINT, {"y": expanded("2")}, Point(y=2)),
    (OrNone(POINT), {"x": 2}, Point(x=2)),
    (OrNone(POINT), True, Point()),
    (OrNone(POINT), False, None),
    (OrNone(POINT), expanded("off"), None),
    (OrNone(POINT), expanded("yes"), Point()),
]

INVALID: list[tuple[Coercer[Any], Any, str]] = [
    (text, 5, "must be a string, got an integer"),
    (text, 1.5, "must be a string, got a number"),
    (text, True, "must be a string, got a boolean"),
    (text, [1], "must be a string, got a list"),
    (text, {}, "must be a string, got a mapping"),
    (LOWER, "a1", "'a1' is not lower-case letters"),
    (Int(1, 10), 0, "must be between 1 and 10, got 0"),
    (Int(1, 10), 11, "must be between 1 and 10, got 11"),
    (Int(1, 10), expanded("11"), "must be between 1 and 10, got 11"),
    (Int(1, 10), "5", "must be an integer, got a string"),  # quoted in YAML: a string
    (Int(1, 10), True, "must be an integer, got a boolean"),
    (Int(1, 10), 1.0, "must be an integer, got a number"),
    (Int(1, 10), expanded("five"), "must be an integer, got a string"),
    (Int(1, 10), expanded("1.5"), "must be an integer, got a string"),
    (seconds, 0, "must be more than 0 and at most 86400, got 0"),
    (seconds, -1.5, "must be more than 0 and at most 86400, got -1.5"),
    (seconds, 86401, "must be more than 0 and at most 86400, got 86401"),
    (seconds, expanded("0"), "must be more than 0 and at most 86400, got 0.0"),
    (seconds, "5", "must be a number of seconds, got a string"),
    (seconds, True, "must be a number of seconds, got a boolean"),
    (seconds, expanded("soon"), "must be a number of seconds, got a string"),
    (boolean, "yes", "must be true or false, got a string"),  # quoted in YAML: a string
    (boolean, 1, "must be true or false, got an integer"),
    (boolean, expanded("maybe"), "must be true or false, got a string"),
    (Choice(("a", "b")), "c", "must be one of a, b, got 'c'"),
    (Choice(("a", "b")), expanded("c"), "must be one of a, b, got 'c'"),
    (Choice(("a", "b")), 1, "must be a string, got an integer"),
    (ListOf(text), "a", "must be a list of strings"),
    (ListOf(text), {"a": 1}, "must be a list of strings"),
    (ListOf(text, "names", nonempty=True), [], "must be a non-empty list of names"),
    (POINT, 5, "must be a mapping, got an integer"),
    (POINT, [], "must be a mapping, got a list"),
    (OrNone(POINT), 5, "must be a mapping, true or false, got an integer"),
    (OrNone(POINT), expanded("maybe"), "must be a mapping, true or false, got a string"),
]

# The errors some coercers report at a path inside the value.
INVALID_INSIDE: list[tuple[Coercer[Any], Any, str]] = [
    (ListOf(text), ["a", 1], "k[1]: must be a string, got an integer"),
    (ListOf(Int(0, 9)), [expanded("10")], "k[0]: must be between 0 and 9, got 10"),
    (POINT, {"z": 1}, "k.z: unknown key; known keys: x, y"),
    (POINT, {"xx": 1}, "k.xx: unknown key (did you mean 'x'?); known keys: x, y"),
    (POINT, {1: 1}, "k.1: unknown key; known keys: x, y"),
    (POINT, {"x": "a"}, "k.x: must be an integer, got a string"),
    (section(Named), {}, "k.name: is required"),
    (section(Named), {"name": ""}, "k.name: is required"),
    (OrNone(POINT), {"y": 10}, "k.y: must be between 0 and 9, got 10"),
]


@pytest.mark.parametrize(("coerce", "value", "expected"), VALID)
def test_coercer_reads(coerce: Coercer[Any], value: Any, expected: Any) -> None:
    got = coerce(value, "k")
    assert got == expected
    assert type(got) is type(expected)  # never the expansion's str subclass


@pytest.mark.parametrize(("coerce", "value", "message"), INVALID)
def test_coercer_refuses(coerce: Coercer[Any], value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        coerce(value, "a.b")
    assert (info.value.path, str(info.value)) == ("a.b", f"a.b: {message}")


@pytest.mark.parametrize(("coerce", "value", "message"), INVALID_INSIDE)
def test_coercer_names_the_inner_path(coerce: Coercer[Any], value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        coerce(value, "k")
    assert str(info.value) == message


# --- ${VAR} works for every type, anywhere ------------------------------------------------

EXPANDS: list[tuple[str, dict[str, str], Callable[[Config], Any], Any]] = [
    ("listen: {host: '${H}'}", {"H": "127.0.0.2"}, lambda c: c.listen.host, "127.0.0.2"),
    ("listen: {port: '${P}'}", {"P": "9001"}, lambda c: c.listen.port, 9001),
    ("limits: {max_header_bytes: '${M}'}", {"M": "2048"}, lambda c: c.limits.max_header_bytes, 2048),
    ("grace_period: ${G}", {"G": "2.5"}, lambda c: c.grace_period, 2.5),
    ("client_timeouts: {body: '${B}'}", {"B": "7"}, lambda c: c.client_timeouts.body, 7.0),
    ("allow_cross_site_navigation: ${X}", {"X": "yes"}, lambda c: c.allow_cross_site_navigation, True),
    ("allow_unauthenticated: ${X}", {"X": "on"}, lambda c: c.allow_unauthenticated, True),
    ("allow_unauthenticated: ${X}", {"X": "0"}, lambda c: c.allow_unauthenticated, False),
    ("admin: ${A}", {"A": "off"}, lambda c: c.admin, None),
    ("admin: {enabled: '${A}'}", {"A": "no"}, lambda c: c.admin, None),
    ("admin: {port: '${A}'}", {"A": "9100"}, lambda c: c.admin, Admin(port=9100)),
    ("log_level: ${L}", {"L": "debug"}, lambda c: c.log_level, "debug"),
    ("signer: ${S:-botocore}", {}, lambda c: c.signer, "botocore"),
    ("allowed_hosts: ['${H}', b.example]", {"H": "Svc.Example."}, lambda c: c.allowed_hosts, ("svc.example", "b.example")),
    ("allowed_methods: ['${M}', POST]", {"M": "get"}, lambda c: c.allowed_methods, ("GET", "POST")),
    ("allowed_clients: ['${C}']", {"C": "10.0.0.0/8"}, lambda c: str(c.allowed_clients[0]), "10.0.0.0/8"),
    ("listen: {port: '${P:-}'}", {}, lambda c: c.listen.port, 8080),  # empty: the default
]  # fmt: skip

UPSTREAM_EXPANDS: list[tuple[str, dict[str, str], Callable[[Upstream], Any], Any]] = [
    ("region: '${R}'", {"R": "us-east-1"}, lambda u: u.region, "us-east-1"),
    ("region: '${R:-}'", {}, lambda u: u.region, "us-east-1"),  # empty: from the URL
    ("auth: '${A}'", {"A": "none"}, lambda u: u.auth, "none"),
    ("max_connections: '${N}'", {"N": "5"}, lambda u: u.max_connections, 5),
    ("timeout: {read: '${T}'}", {"T": "30"}, lambda u: u.timeout.read, 30.0),
    ("credentials: {role_arn: 'arn:aws:iam::123456789012:role/r', duration_seconds: '${D}'}",
     {"D": "900"}, lambda u: u.credentials.duration_seconds, 900),
    ("cors: {allow_origins: ['${O}'], allow_credentials: '${C}'}", {"O": "https://a.example", "C": "1"},
     lambda u: (u.cors and u.cors.allow_origins, u.cors and u.cors.allow_credentials), (("https://a.example",), True)),
    ("cors: '${C}'", {"C": "false"}, lambda u: u.cors, None),
]  # fmt: skip

EXPANSION_ERRORS: list[tuple[str, dict[str, str], str]] = [
    ("listen: {port: '${P}'}", {"P": "http"}, "listen.port: must be an integer, got a string"),
    ("listen: {port: '${P}'}", {}, "listen.port: environment variable P is not set"),
    ("grace_period: ${G}", {"G": "0"}, "grace_period: must be more than 0 and at most 86400, got 0.0"),
    ("allow_cross_site_navigation: ${X}", {"X": "maybe"}, "allow_cross_site_navigation: must be true or false, got a string"),
    ("log_level: ${L}", {"L": "loud"}, "log_level: must be one of debug, info, warning, error, got 'loud'"),
    ("allowed_hosts: ['${H}']", {"H": "a:1"}, "allowed_hosts[0]: 'a:1' is not a host name (without a port), a pattern like *.example.com, or \"*\""),
    ("allowed_methods: ['${M}']", {"M": "connect"}, "allowed_methods[0]: 'CONNECT' is not a method sigproxy forwards"),
    ("admin: ${A}", {"A": "maybe"}, "admin: must be a mapping, true or false, got a string"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "env", "get", "expected"), EXPANDS)
def test_var_expands_for_every_type(
    line: str, env: dict[str, str], get: Callable[[Config], Any], expected: Any
) -> None:
    assert get(parse_config(line + "\n" + UPSTREAM, environ=env)) == expected


@pytest.mark.parametrize(("fields", "env", "get", "expected"), UPSTREAM_EXPANDS)
def test_var_expands_in_upstreams(
    fields: str, env: dict[str, str], get: Callable[[Upstream], Any], expected: Any
) -> None:
    text = f"upstreams:\n  - {{name: fn, url: '{URL}', {fields}}}\n"
    assert get(parse_config(text, environ=env).upstreams[0]) == expected


@pytest.mark.parametrize(("line", "env", "message"), EXPANSION_ERRORS)
def test_var_expansion_errors(line: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(line + "\n" + UPSTREAM, environ=env)
    assert str(info.value) == message


# --- defaults come from the dataclasses -----------------------------------------------


def walk(schema: Schema[Any], path: str = "") -> Iterator[tuple[str, Schema[Any], str, Key]]:
    """(key path, its schema, key, Key) for every key, into nested sections; the items
    of a list of sections are ``key[]``."""
    for name, (_, k) in schema.keys.items():
        at = f"{path}.{name}" if path else name
        yield at, schema, name, k
        inner: Any = k.coerce
        if isinstance(inner, OrNone):
            inner = inner.schema
        if isinstance(inner, ListOf):
            inner, at = inner.item, f"{at}[]"
        if isinstance(inner, Schema):
            yield from walk(inner, at)


def all_keys() -> Iterator[tuple[str, Schema[Any], str, Key]]:
    yield from walk(SCHEMA)
    yield from walk(EMULATOR, "emulator")


def test_every_default_is_the_dataclass_default() -> None:
    """A default is written once, on the field; the only keys whose default is not their
    field's are the ones listed here (for classes sigproxy.config doesn't own)."""
    differs = {}
    for path, schema, name, k in all_keys():
        attr = schema.keys[name][0]
        if attr is None:
            continue  # an extra key: no field
        own = {f.name: f.default for f in dataclasses.fields(schema.cls)}[attr]
        if k.default != own:
            differs[path] = k.default
    assert differs == {
        "upstreams[].cors.expose_headers": ("X-Request-Id",),  # CorsConfig is in cors.py
        "emulator.callers[].account_id": "",  # Caller is in sigv4.py: "" = the emulator's
        "emulator.callers[].user_arn": "",
    }


@pytest.mark.parametrize("cls", [Listen, Admin, Timeouts, CredentialsSpec, ClientTimeouts, Limits])
def test_an_empty_section_is_the_dataclass(cls: type[Any]) -> None:
    (schema,) = {s for _, s, _, _ in all_keys() if s.cls is cls}
    assert schema({}, "s") == cls()


def test_a_minimal_file_is_the_dataclass_defaults() -> None:
    config = parse_config(UPSTREAM)
    upstream = Upstream(
        name="fn", url=URL, scheme="https", host_header=HOST, origin=URL, base_path="",
        region="us-east-1", url_host=HOST,
    )  # fmt: skip
    assert config == Config(listen=Listen(), upstreams=(upstream,))
    emulator = build_emulator_config(
        {"functions": [{"name": "a", "handler": "m:f", "auth": "NONE"}]}
    )
    assert emulator == EmulatorConfig(
        functions=(FunctionConfig(name="a", handler="m:f", auth="NONE"),)
    )


def test_the_emulator_reads_the_same_cors_keys() -> None:
    (cors,) = {s for _, s, name, _ in walk(EMULATOR) if name == "allow_origins"}
    assert tuple(cors.keys) == CORS_KEYS


def test_a_new_key_is_one_field() -> None:
    """What adding ``limits.max_foo`` takes: the field, with its default and coercer."""

    @dataclasses.dataclass(frozen=True)
    class Limits2:
        max_header_bytes: int = key(64 * 1024, Int(1024, 1 << 20))
        max_foo: int = key(5, Int(1, 10))

    schema = section(Limits2)
    assert schema({}, "limits").max_foo == 5
    assert schema({"max_foo": expanded("7")}, "limits").max_foo == 7
    with pytest.raises(ConfigError, match=r"^limits\.max_foo: must be between 1 and 10, got 11$"):
        schema({"max_foo": 11}, "limits")
    with pytest.raises(
        ConfigError, match=r"did you mean 'max_foo'\?\); known keys: max_header_bytes, max_foo$"
    ):
        schema({"max_fo": 1}, "limits")


# --- config.example.yaml documents every key, and only known keys ------------------------


def uncommented(path: Path) -> Any:
    """The file's YAML with its commented-out keys (``# key: value``) put back."""
    text = re.sub(r"(?m)^( *)# ?( *[a-z_]+:( .*)?)$", r"\1\2", path.read_text())
    return yaml.safe_load(text)


def yaml_keys(data: Any, path: str = "") -> set[str]:
    found = set()
    if isinstance(data, dict):
        for name, value in data.items():
            at = f"{path}.{name}" if path else name
            found |= {at} | yaml_keys(value, at)
    elif isinstance(data, list):
        for item in data:
            found |= yaml_keys(item, f"{path}[]")
    return found


def test_example_keys_are_all_known() -> None:
    declared = {path for path, *_ in all_keys()}
    assert yaml_keys(uncommented(ROOT / "config.example.yaml")) - declared == set()
    emulator = uncommented(ROOT / "examples" / "emulator.yaml")
    assert yaml_keys(emulator) - declared == set()


def test_example_shows_every_key() -> None:
    documented = yaml_keys(uncommented(ROOT / "config.example.yaml"))
    declared = {path for path, *_ in walk(SCHEMA)} - {"emulator"}
    # admin.enabled predates `admin: false` and is kept for files that use it.
    assert declared - documented == {"admin.enabled"}
    emulator = yaml_keys(uncommented(ROOT / "examples" / "emulator.yaml"))
    assert {p for p, *_ in walk(EMULATOR, "emulator")} - emulator == set()


def test_example_config_still_parses() -> None:
    """The example as shipped (keys commented out stay out) is a valid config."""
    config = parse_config((ROOT / "config.example.yaml").read_text(), environ={})
    assert [u.name for u in config.upstreams] == ["orders", "public", "cdn"]


# --- rules across keys keep their one-line messages ---------------------------------------

RULES: list[tuple[str, str]] = [
    (f"upstreams: [{{name: fn, url: '{URL}', region: us-west-2}}]",
     "upstreams[0].region: us-west-2 does not match the region in the URL (us-east-1)"),
    ("upstreams: [{name: fn, url: 'https://example.com'}]",
     "upstreams[0].region: is required: it cannot be read from the URL host (only <id>.lambda-url.<region>.on.aws and API Gateway hosts carry it)"),
    (f"upstreams: [{{name: fn, url: '{URL}', auth: none, credentials: {{profile: p}}}}]",
     "upstreams[0].credentials: is not used when auth is none; remove it"),
    (f"upstreams: [{{name: fn, url: '{URL}', credentials: {{session_name: ab}}}}]",
     "upstreams[0].credentials.session_name: only applies together with role_arn"),
    (f"upstreams: [{{name: fn, url: '{URL}', cors: {{allow_origins: ['*'], allow_credentials: true}}}}]",
     "upstreams[0].cors.allow_origins: \"*\" cannot be combined with allow_credentials (the Fetch standard forbids it); list the origins"),
    (f"upstreams: [{{name: fn, url: '{URL}', cors: {{max_age: 5}}}}]",
     "upstreams[0].cors.allow_origins: list the origins allowed (or \"*\")"),
    (f"upstreams: [{{name: fn, url: '{URL}'}}, {{name: fn, url: '{URL}', path_prefix: /b}}]",
     "upstreams[1].name: duplicate name 'fn' (also upstreams[0])"),
    (f"upstreams: [{{name: a, url: '{URL}', host: h.example}}, {{name: b, url: '{URL}', host: H.example.}}]",
     "upstreams[1].path_prefix: host h.example and prefix / are already routed to upstream 'a'"),
    ("admin: {port: 8080}\n" + UPSTREAM, "admin.port: 8080 is the proxy's own port (listen.port)"),
    ("inbound_auth: {header: X-T}\n" + UPSTREAM, "inbound_auth: needs at least one token (tokens: [${VAR}] or tokens_file)"),
    ("inbound_auth: {tokens: [short]}\n" + UPSTREAM, "inbound_auth: tokens must be at least 16 printable characters without spaces"),
    ("allowed_hosts: ['*']\n" + UPSTREAM,
     "allowed_hosts: \"*\" accepts any Host header, which lets web pages on other sites reach the proxy through DNS rebinding; list the names instead, or set inbound_auth as well"),
    ("upstreams: [{name: '', url: ''}]", "upstreams[0].name: is required"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), RULES)
def test_rules_across_keys(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    assert str(info.value) == message
