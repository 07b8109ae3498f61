"""The ``emulator:`` section: the local Function URLs, their handlers, auth and CORS."""

# ruff: noqa: RUF009 - key() returns a dataclasses.field(), not a shared default value

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..config import (
    Choice,
    Int,
    Key,
    ListOf,
    OrNone,
    Schema,
    Section,
    Text,
    boolean,
    key,
    parse_yaml,
    read_text,
    seconds,
    section,
    spec,
    text,
)
from ..errors import ConfigError
from .sigv4 import Caller

DEFAULT_ACCOUNT = "123456789012"
_ACCOUNT = Text(re.compile(r"\d{12}"), "must be 12 digits")
_REGION = Text(re.compile(r"[a-z]{2}(-[a-z]+)+-\d+"), "{!r} is not an AWS region name")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_METHOD = Text(re.compile(r"\*|[A-Z]{1,6}"), "{!r} is not an HTTP method or *", str.upper)
_LOWER = Text(normalize=str.lower)

AuthType = Literal["AWS_IAM", "NONE"]
AUTH_TYPES: tuple[AuthType, ...] = ("AWS_IAM", "NONE")


@dataclass(frozen=True, slots=True)
class Cors:
    """A Function URL's CORS settings, as in Lambda's ``Cors`` API object."""

    allow_origins: tuple[str, ...] = key((), ListOf(text))
    allow_methods: tuple[str, ...] = key((), ListOf(_METHOD))
    allow_headers: tuple[str, ...] = key((), ListOf(_LOWER))
    expose_headers: tuple[str, ...] = key((), ListOf(_LOWER))
    allow_credentials: bool = key(False, boolean)
    max_age: int = key(0, Int(0, 86400))


@dataclass(frozen=True, slots=True)
class FunctionConfig:
    name: str = field(
        metadata=spec(
            Text(_NAME_RE, "{!r} must be 1-64 letters, digits, - and _"),
            "is required: 1-64 letters, digits, - and _",
        )
    )
    handler: str = field(
        metadata=spec(
            Text(re.compile(r".*:.*"), "{!r} must be 'module:function' or 'file.py:function'"),
            "is required: 'module:function' or 'file.py:function'",
        )
    )
    port: int = key(0, Int(0, 65535))
    auth: AuthType = key("AWS_IAM", Choice(AUTH_TYPES))
    timeout: float = key(3.0, seconds)
    memory_mb: int = key(128, Int(128, 10240), yaml="memory")
    cors: Cors | None = key(None, OrNone(section(Cors)))

    @property
    def url_id(self) -> str:
        """A stable 32-character id, like the real ``<url-id>``."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:32]


def _function(s: Section) -> FunctionConfig:
    function = s.build(FunctionConfig)
    if function.timeout > 900:
        raise ConfigError(s.at("timeout"), "Lambda functions run at most 900 seconds")
    return function


# Caller belongs to .sigv4, so its keys are listed here. account_id and user_arn left
# out ("") come from the emulator's account_id: see _emulator.
_CALLER = section(
    Caller,
    keys={
        "access_key_id": Key(text),
        "secret_access_key": Key(text),
        "session_token": Key(text),
        "account_id": Key(_ACCOUNT, default=""),
        "user_arn": Key(text, default=""),
    },
)


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    host: str = key("127.0.0.1", text)
    region: str = key("us-east-1", _REGION)
    account_id: str = key(DEFAULT_ACCOUNT, _ACCOUNT)
    callers: tuple[Caller, ...] = key((), ListOf(_CALLER, "callers"))
    functions: tuple[FunctionConfig, ...] = key(
        (), ListOf(Schema(FunctionConfig, _function), "functions")
    )
    base_dir: str = field(default=".", compare=False)

    def caller_map(self) -> dict[str, Caller]:
        return {c.access_key_id: c for c in self.callers}

    def function_arn(self, function: FunctionConfig) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account_id}:function:{function.name}"


def _emulator(s: Section) -> EmulatorConfig:
    """Callers default to the emulator's account; function names are unique; AWS_IAM
    functions need a caller."""
    config = s.build(EmulatorConfig)
    callers = tuple(_in_account(c, c.account_id or config.account_id) for c in config.callers)
    seen: set[str] = set()
    for i, function in enumerate(config.functions):
        if function.name in seen:
            raise ConfigError(s.at(f"functions[{i}].name"), f"duplicate name {function.name!r}")
        seen.add(function.name)
    if not config.functions:
        raise ConfigError(s.at("functions"), "list at least one function")
    if any(f.auth == "AWS_IAM" for f in config.functions) and not callers:
        raise ConfigError(
            s.at("callers"), "AWS_IAM functions need at least one caller whose keys they accept"
        )
    return replace(config, callers=callers)


def _in_account(caller: Caller, account: str) -> Caller:
    user_arn = caller.user_arn or f"arn:aws:iam::{account}:user/local-dev"
    return replace(caller, account_id=account, user_arn=user_arn)


SCHEMA = Schema(EmulatorConfig, _emulator)


def load_emulator_config(path: str, environ: Mapping[str, str] | None = None) -> EmulatorConfig:
    """Read the ``emulator:`` section of the YAML file at ``path``."""
    import os.path

    data = parse_yaml(read_text(path), environ)
    if not isinstance(data, dict) or data.get("emulator") is None:
        raise ConfigError("emulator", "is required: the file has no emulator section")
    return build_emulator_config(data["emulator"], os.path.dirname(os.path.abspath(path)))


def build_emulator_config(data: Any, base_dir: str = ".") -> EmulatorConfig:
    return replace(SCHEMA(data, "emulator"), base_dir=base_dir)
