"""The ``emulator:`` section: the local Function URLs, their handlers, auth and CORS."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import CORS_KEYS, Section, optional_section, parse_yaml, read_text
from ..errors import ConfigError
from .sigv4 import Caller

DEFAULT_ACCOUNT = "123456789012"
_ACCOUNT_RE = re.compile(r"^\d{12}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_METHOD_RE = re.compile(r"^(\*|[A-Z]{1,6})$")

AuthType = Literal["AWS_IAM", "NONE"]


@dataclass(frozen=True, slots=True)
class Cors:
    """A Function URL's CORS settings, as in Lambda's ``Cors`` API object."""

    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: int = 0


@dataclass(frozen=True, slots=True)
class FunctionConfig:
    name: str
    handler: str
    port: int = 0
    auth: AuthType = "AWS_IAM"
    timeout: float = 3.0
    memory_mb: int = 128
    cors: Cors | None = None

    @property
    def url_id(self) -> str:
        """A stable 32-character id, like the real ``<url-id>``."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    host: str = "127.0.0.1"
    region: str = "us-east-1"
    account_id: str = DEFAULT_ACCOUNT
    callers: tuple[Caller, ...] = ()
    functions: tuple[FunctionConfig, ...] = ()
    base_dir: str = field(default=".", compare=False)

    def caller_map(self) -> dict[str, Caller]:
        return {c.access_key_id: c for c in self.callers}

    def function_arn(self, function: FunctionConfig) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account_id}:function:{function.name}"


def load_emulator_config(path: str, environ: Mapping[str, str] | None = None) -> EmulatorConfig:
    """Read the ``emulator:`` section of the YAML file at ``path``."""
    import os.path

    data = parse_yaml(read_text(path), environ)
    if not isinstance(data, dict) or data.get("emulator") is None:
        raise ConfigError("emulator", "is required: the file has no emulator section")
    return build_emulator_config(data["emulator"], os.path.dirname(os.path.abspath(path)))


def build_emulator_config(data: Any, base_dir: str = ".") -> EmulatorConfig:
    s = Section(data, "emulator", ("host", "region", "account_id", "callers", "functions"))
    region = s.text("region", "us-east-1") or "us-east-1"
    if not _REGION_RE.match(region):
        raise ConfigError(s.at("region"), f"{region!r} is not an AWS region name")
    account = s.text("account_id", DEFAULT_ACCOUNT) or DEFAULT_ACCOUNT
    if not _ACCOUNT_RE.match(account):
        raise ConfigError(s.at("account_id"), "must be 12 digits")
    callers = tuple(
        _caller(Section(raw, f"emulator.callers[{i}]", _CALLER_KEYS), account)
        for i, raw in enumerate(_list(s, "callers"))
    )
    functions: list[FunctionConfig] = []
    seen: set[str] = set()
    for i, raw in enumerate(_list(s, "functions")):
        fn = _function(Section(raw, f"emulator.functions[{i}]", _FUNCTION_KEYS))
        if fn.name in seen:
            raise ConfigError(f"emulator.functions[{i}].name", f"duplicate name {fn.name!r}")
        seen.add(fn.name)
        functions.append(fn)
    if not functions:
        raise ConfigError(s.at("functions"), "list at least one function")
    if any(f.auth == "AWS_IAM" for f in functions) and not callers:
        raise ConfigError(
            s.at("callers"), "AWS_IAM functions need at least one caller whose keys they accept"
        )
    return EmulatorConfig(
        host=s.text("host", "127.0.0.1") or "127.0.0.1",
        region=region,
        account_id=account,
        callers=callers,
        functions=tuple(functions),
        base_dir=base_dir,
    )


def _list(s: Section, key: str) -> list[Any]:
    value = s.data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(s.at(key), "must be a list")
    return value


_CALLER_KEYS = ("access_key_id", "secret_access_key", "session_token", "account_id", "user_arn")


def _caller(c: Section, default_account: str) -> Caller:
    key = c.text("access_key_id")
    secret = c.text("secret_access_key")
    if not key:
        raise ConfigError(c.at("access_key_id"), "is required")
    if not secret:
        raise ConfigError(c.at("secret_access_key"), "is required")
    account = c.text("account_id", default_account) or default_account
    if not _ACCOUNT_RE.match(account):
        raise ConfigError(c.at("account_id"), "must be 12 digits")
    return Caller(
        access_key_id=key,
        secret_access_key=secret,
        session_token=c.text("session_token"),
        account_id=account,
        user_arn=c.text("user_arn", f"arn:aws:iam::{account}:user/local-dev")
        or f"arn:aws:iam::{account}:user/local-dev",
    )


_FUNCTION_KEYS = ("name", "handler", "port", "auth", "timeout", "memory", "cors")


def _function(f: Section) -> FunctionConfig:
    name = f.text("name")
    if not name or not _NAME_RE.match(name):
        raise ConfigError(f.at("name"), "is required: 1-64 letters, digits, - and _")
    handler = f.text("handler")
    if not handler or ":" not in handler:
        raise ConfigError(f.at("handler"), "is required: 'module:function' or 'file.py:function'")
    auth = f.choice("auth", "AWS_IAM", ("AWS_IAM", "NONE"))
    timeout = f.seconds("timeout", 3.0)
    if timeout > 900:
        raise ConfigError(f.at("timeout"), "Lambda functions run at most 900 seconds")
    return FunctionConfig(
        name=name,
        handler=handler,
        port=f.integer("port", 0, 0, 65535) or 0,
        auth=auth,  # type: ignore[arg-type]
        timeout=timeout,
        memory_mb=f.integer("memory", 128, 128, 10240) or 128,
        cors=optional_section(f, "cors", CORS_KEYS, _cors, None),
    )


def _cors(c: Section) -> Cors:
    strings = c.strings
    methods = tuple(m.upper() for m in strings("allow_methods"))
    for m in methods:
        if not _METHOD_RE.match(m):
            raise ConfigError(c.at("allow_methods"), f"{m!r} is not an HTTP method or *")
    credentials = c.data.get("allow_credentials", False)
    if not isinstance(credentials, bool):
        raise ConfigError(c.at("allow_credentials"), "must be true or false")
    return Cors(
        allow_origins=strings("allow_origins"),
        allow_methods=methods,
        allow_headers=tuple(h.lower() for h in strings("allow_headers")),
        expose_headers=tuple(h.lower() for h in strings("expose_headers")),
        allow_credentials=credentials,
        max_age=c.integer("max_age", 0, 0, 86400) or 0,
    )
