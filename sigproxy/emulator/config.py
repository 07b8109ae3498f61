"""The ``emulator:`` section: the local Function URLs, their handlers, auth, resource
policies (``allow``) and CORS, the callers whose keys they accept, and the emulator's
clock."""

# ruff: noqa: RUF009 - key() returns a dataclasses.field(), not a shared default value

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..config import (
    Choice,
    Int,
    Key,
    ListOf,
    OrNone,
    Schema,
    Seconds,
    Section,
    Text,
    _type_name,
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
# The Function URL's InvokeMode: the whole result at once (6 MB), or a stream of chunks
# sent as the function produces them (200 MB).
InvokeMode = Literal["BUFFERED", "RESPONSE_STREAM"]
INVOKE_MODES: tuple[InvokeMode, ...] = ("BUFFERED", "RESPONSE_STREAM")

# Since October 2025 a Function URL call needs both actions on the function
# (https://docs.aws.amazon.com/lambda/latest/dg/urls-auth.html).
ACTIONS = ("lambda:InvokeFunctionUrl", "lambda:InvokeFunction")
MAX_CLOCK_OFFSET = 86400.0
_PRINCIPAL = Text(
    re.compile(r"\*|\d{12}|arn:aws[a-z-]*:(iam|sts)::\d{12}:[\w+=,.@/:-]+"),
    '{!r} is not an IAM ARN, a 12-digit account id or "*"',
)


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
class Grant:
    """One statement of the function's resource policy: ``principal`` (an IAM ARN, an
    account id or ``*``) may call ``actions``."""

    principal: str = field(
        metadata=spec(_PRINCIPAL, 'is required: an IAM ARN, a 12-digit account id or "*"')
    )
    actions: tuple[str, ...] = field(
        metadata=spec(
            ListOf(Choice(ACTIONS), "actions", nonempty=True),
            "is required: lambda:InvokeFunctionUrl and/or lambda:InvokeFunction",
        )
    )


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
    invoke_mode: InvokeMode = key("BUFFERED", Choice(INVOKE_MODES))
    """BUFFERED: the handler returns the response; RESPONSE_STREAM: it returns an
    iterator (or async iterator) of chunks, sent as they come (see server.py)."""
    timeout: float = key(3.0, seconds)
    memory_mb: int = key(128, Int(128, 10240), yaml="memory")
    cors: Cors | None = key(None, OrNone(section(Cors)))
    allow: tuple[Grant, ...] | None = key(None, ListOf(section(Grant), "grants"))
    """The resource policy; None (no ``allow`` key): every caller may invoke."""

    @property
    def url_id(self) -> str:
        """A stable 32-character id, like the real ``<url-id>``."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:32]

    def missing_actions(self, principals: Collection[str]) -> tuple[str, ...]:
        """The :data:`ACTIONS` that no ``allow`` entry for one of ``principals`` grants;
        empty when the request may invoke the function. The grants add up: one entry
        may give one action and another the other."""
        if self.allow is None:
            return ()
        granted = {a for g in self.allow if g.principal in principals for a in g.actions}
        return tuple(a for a in ACTIONS if a not in granted)


def _function(s: Section) -> FunctionConfig:
    function = s.build(FunctionConfig)
    if function.timeout > 900:
        raise ConfigError(s.at("timeout"), "Lambda functions run at most 900 seconds")
    return function


def _utc_time(value: Any, path: str) -> datetime.datetime:
    """An ISO-8601 time with its zone (``2026-11-30T12:00:00Z``), as aware UTC. YAML
    reads it unquoted as a datetime already."""
    example = "an ISO-8601 time like 2026-11-30T12:00:00Z"
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ConfigError(path, f"{value.strip()!r} is not {example}") from None
    if not isinstance(value, datetime.datetime):
        raise ConfigError(path, f"must be {example}, got {_type_name(value)}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigError(path, f"{value.isoformat()} has no zone: end it with Z (UTC)")
    return value.astimezone(datetime.UTC)


def _caller(s: Section) -> Caller:
    caller = s.build(Caller)
    if caller.expires_at is not None and caller.session_token is None:
        raise ConfigError(
            s.at("expires_at"), "only temporary credentials expire: give session_token too"
        )
    return caller


# Caller belongs to .sigv4, so its keys are listed here. account_id and user_arn left
# out ("") come from the emulator's account_id: see _emulator.
_CALLER = Schema(
    Caller,
    _caller,
    keys={
        "access_key_id": Key(text),
        "secret_access_key": Key(text),
        "session_token": Key(text),
        "expires_at": Key(_utc_time, default=None),
        "account_id": Key(_ACCOUNT, default=""),
        "user_arn": Key(text, default=""),
    },
)


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    host: str = key("127.0.0.1", text)
    region: str = key("us-east-1", _REGION)
    account_id: str = key(DEFAULT_ACCOUNT, _ACCOUNT)
    # Seconds the emulator's clock runs ahead of real time (negative: behind).
    clock_offset: float = key(0.0, Seconds(-MAX_CLOCK_OFFSET, MAX_CLOCK_OFFSET))
    """Seconds the emulator's clock (SigV4 window, token expiry, event time, Date
    headers) runs ahead of real time; negative: behind."""
    callers: tuple[Caller, ...] = key((), ListOf(_CALLER, "callers"))
    functions: tuple[FunctionConfig, ...] = key(
        (), ListOf(Schema(FunctionConfig, _function), "functions")
    )
    base_dir: str = field(default=".", compare=False)

    def now(self) -> datetime.datetime:
        """The emulator's clock: real time plus ``clock_offset``."""
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.clock_offset)

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
