"""AWS credentials per upstream: resolved at startup with botocore, refreshed off the loop.

botocore does the work of finding credentials (environment, shared files and profiles,
SSO, ``credential_process``, container and EKS Pod Identity endpoints, web identity /
IRSA, IMDS) and of assuming roles. What botocore does not do is stay off an event loop:
its refresh happens inside ``get_frozen_credentials()`` and blocks. So a
:class:`CredentialSource` keeps the last frozen credentials it fetched, serves them from
the loop without I/O, and runs botocore's refresh in a worker thread, one at a time per
source, when botocore says a refresh is due. A failed refresh keeps the old credentials
in use while they are still valid; when nothing valid is left, requests get
:class:`~sigproxy.errors.CredentialsUnavailable` (503).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import botocore.session
from botocore.config import Config as BotocoreConfig
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    Credentials,
    DeferredRefreshableCredentials,
    ReadOnlyCredentials,
)
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    LoginError,
    SSOTokenLoadError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
)

from .config import Config, CredentialsSpec
from .errors import CredentialsError, CredentialsUnavailable

log = logging.getLogger("sigproxy.credentials")

# STS calls made for assume-role: fail fast rather than hold requests for botocore's
# default 60 s timeouts.
_STS_CLIENT_CONFIG = BotocoreConfig(
    connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"}
)


def _expiry_epoch(credentials: Credentials) -> float | None:
    # botocore has no public accessor for the expiry; RefreshableCredentials has kept it
    # in ``_expiry_time`` (an aware datetime) since 2014. Static credentials have none.
    expiry = getattr(credentials, "_expiry_time", None)
    return expiry.timestamp() if expiry is not None else None


class CredentialSource:
    """One set of credentials (one :class:`CredentialsSpec`), shared by its upstreams."""

    def __init__(
        self,
        credentials: Credentials,
        description: str,
        *,
        min_validity: float = 30.0,
        retry_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._credentials = credentials
        self.description = description
        self._min_validity = min_validity
        self._retry_interval = retry_interval
        self._clock = clock
        self._frozen: ReadOnlyCredentials | None = None
        self._expiry: float | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._next_attempt = 0.0
        self.last_error: str | None = None
        self.refreshes: dict[str, int] = {"success": 0, "failure": 0}

    @classmethod
    def static(cls, access_key: str, secret_key: str, token: str | None = None) -> CredentialSource:
        """Fixed credentials (tests, the local emulator)."""
        source = cls(Credentials(access_key, secret_key, token, method="static"), "static")
        source.load()
        return source

    @property
    def method(self) -> str:
        """botocore's name for where the credentials came from (``env``, ``sso``, ...)."""
        return str(getattr(self._credentials, "method", None) or "unknown")

    @property
    def expiry(self) -> float | None:
        """Epoch seconds at which the credentials in use expire; ``None`` if they don't."""
        return self._expiry

    def load(self) -> None:
        """Fetch credentials now, blocking. Used once at startup, before listening."""
        self._frozen, self._expiry = self._fetch()

    def _fetch(self) -> tuple[ReadOnlyCredentials, float | None]:
        frozen = self._credentials.get_frozen_credentials()
        if not frozen.access_key or not frozen.secret_key:
            raise CredentialsError("the credentials found have no access key or secret key")
        return frozen, _expiry_epoch(self._credentials)

    def _usable(self, now: float) -> bool:
        if self._frozen is None:
            return False
        return self._expiry is None or now < self._expiry - self._min_validity

    async def get(self) -> ReadOnlyCredentials:
        """Credentials to sign with now; never blocks the loop on botocore."""
        frozen = self._frozen
        if frozen is not None and self._expiry is None:
            return frozen
        now = self._clock()
        if now >= self._next_attempt and self._refresh_due():
            self._start_refresh()
        if self._usable(now):
            assert self._frozen is not None
            return self._frozen
        if self._refresh is None and now >= self._next_attempt:
            self._start_refresh()
        if self._refresh is not None:
            await asyncio.shield(self._refresh)
        if self._usable(self._clock()):
            assert self._frozen is not None
            return self._frozen
        reason = self.last_error or "the credentials have expired"
        raise CredentialsUnavailable(
            f"no valid AWS credentials ({self.description}): {reason}",
        )

    def _refresh_due(self) -> bool:
        needed = getattr(self._credentials, "refresh_needed", None)
        return bool(needed()) if needed is not None else False

    def _start_refresh(self) -> None:
        if self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._run_refresh())

    async def _run_refresh(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            frozen, expiry = await loop.run_in_executor(None, self._fetch)
        except Exception as exc:  # any provider failure: keep what we have
            self.last_error = _describe_error(exc)
            self.refreshes["failure"] += 1
            self._next_attempt = self._clock() + self._retry_interval
            still = "still valid" if self._usable(self._clock()) else "none valid left"
            log.warning(
                "credential refresh failed for %s (%s): %s",
                self.description,
                still,
                self.last_error,
            )
        else:
            unchanged = frozen == self._frozen
            self._frozen, self._expiry = frozen, expiry
            if unchanged and self._refresh_due():
                # Inside its advisory window botocore logs a failed refresh and hands back
                # the old credentials instead of raising.
                self.last_error = "the provider gave no new credentials (see botocore's warning)"
                self.refreshes["failure"] += 1
                log.warning(
                    "credential refresh failed for %s (%s): %s",
                    self.description,
                    "still valid" if self._usable(self._clock()) else "none valid left",
                    self.last_error,
                )
            else:
                log.info("credentials refreshed for %s", self.description)
                self.last_error = None
                self.refreshes["success"] += 1
            # botocore asks for a refresh on every call inside its advisory window; if a
            # provider keeps handing out short-lived credentials, don't ask it each request.
            self._next_attempt = self._clock() + self._retry_interval
        finally:
            self._refresh = None


def _describe_error(exc: BaseException, spec: CredentialsSpec | None = None) -> str:
    """botocore's words (they name profiles, roles and endpoints, never secret values)
    and, where the cause is known, the next step."""
    text = (str(exc) or type(exc).__name__).replace("\n", " ")
    profile = (spec.profile if spec else None) or os.environ.get("AWS_PROFILE") or "default"
    step = None
    if isinstance(exc, SSOTokenLoadError | UnauthorizedSSOTokenError | TokenRetrievalError):
        step = f"run: aws sso login --profile {profile}"
    elif isinstance(exc, LoginError):
        step = f"run: aws login --profile {profile}"
    elif isinstance(exc, EndpointConnectionError):
        step = "check that this machine reaches that endpoint (network, DNS, HTTPS_PROXY)"
    elif isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "AccessDenied" and spec is not None and spec.role_arn:
            step = (
                f"the trust policy of {spec.role_arn} must allow the source identity to call "
                "sts:AssumeRole (and the identity's own policy must allow it on that role)"
            )
        elif code in ("InvalidClientTokenId", "ExpiredToken", "SignatureDoesNotMatch"):
            step = "the source credentials are not valid: refresh them, or run aws configure"
    return f"{text} ({step})" if step else text


def _unreadable_aws_files() -> list[str]:
    """The shared credentials and config files that exist but this process may not read:
    botocore skips them silently, and then reports a missing profile."""
    paths = [
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
    ]
    unreadable = []
    for path in (os.path.expanduser(p) for p in paths):
        if os.path.exists(path) and not os.access(path, os.R_OK):
            unreadable.append(path)
    return unreadable


class CredentialStore:
    """The credential source of every ``aws_iam`` upstream, by upstream name."""

    def __init__(
        self,
        sources: Mapping[str, CredentialSource],
        by_spec: Mapping[CredentialsSpec, CredentialSource] | None = None,
    ) -> None:
        self._sources = dict(sources)
        self._by_spec = dict(by_spec or {})

    def get(self, upstream_name: str) -> CredentialSource | None:
        return self._sources.get(upstream_name)

    def items(self) -> list[tuple[str, CredentialSource]]:
        return list(self._sources.items())

    @classmethod
    def resolve(cls, config: Config, previous: CredentialStore | None = None) -> CredentialStore:
        """Find credentials for every ``aws_iam`` upstream now (blocking: run it before
        serving, or off the loop on reload).

        Upstreams with the same ``credentials`` settings share one source, and on a reload
        a source whose settings are unchanged is kept (with its refresh state).
        Raises :class:`CredentialsError` naming the upstream when any are missing.
        """
        by_spec: dict[CredentialsSpec, CredentialSource] = {}
        sources: dict[str, CredentialSource] = {}
        kept = previous._by_spec if previous is not None else {}
        for i, upstream in enumerate(config.upstreams):
            if upstream.auth != "aws_iam":
                continue
            source = by_spec.get(upstream.credentials) or kept.get(upstream.credentials)
            if source is None:
                try:
                    source = _resolve_spec(upstream.credentials, upstream.region)
                except CredentialsError as exc:
                    raise CredentialsError(
                        f"upstreams[{i}] ({upstream.name}): no usable AWS credentials from "
                        f"{upstream.credentials.describe()}: {exc}"
                    ) from None
            by_spec[upstream.credentials] = source
            sources[upstream.name] = source
        return cls(sources, by_spec)

    @classmethod
    def static_for(cls, config: Config, source: CredentialSource) -> CredentialStore:
        """Use one given source for every ``aws_iam`` upstream (tests, demos)."""
        return cls({u.name: source for u in config.upstreams if u.auth == "aws_iam"})


def _resolve_spec(spec: CredentialsSpec, region: str) -> CredentialSource:
    try:
        session = botocore.session.Session(profile=spec.profile)
        credentials = session.get_credentials()
        if credentials is None:
            raise CredentialsError(
                "none found (looked in the environment, shared credentials and config "
                "files, SSO, container and instance metadata; set AWS_PROFILE or "
                "credentials.profile, or run aws configure)"
            )
        if spec.role_arn:
            credentials = _assume_role(session, credentials, spec, region)
        source = CredentialSource(credentials, spec.describe())
        source.load()
    except (CredentialsError, BotoCoreError, ClientError) as exc:
        text = str(exc) if isinstance(exc, CredentialsError) else _describe_error(exc, spec)
        unreadable = _unreadable_aws_files()
        if unreadable:
            text += (
                f"; permission denied reading {', '.join(unreadable)} (this process runs as "
                f"uid {os.getuid()}: make the file readable to it)"
            )
        raise CredentialsError(text) from None
    return source


def _assume_role(
    session: botocore.session.Session,
    source_credentials: Credentials,
    spec: CredentialsSpec,
    region: str,
) -> Credentials:
    assert spec.role_arn is not None
    extra: dict[str, Any] = {"RoleSessionName": spec.session_name or "sigproxy"}
    if spec.external_id:
        extra["ExternalId"] = spec.external_id
    if spec.duration_seconds:
        extra["DurationSeconds"] = spec.duration_seconds
    client_creator = functools.partial(
        session.create_client, region_name=region or None, config=_STS_CLIENT_CONFIG
    )
    fetcher = AssumeRoleCredentialFetcher(
        client_creator=client_creator,
        source_credentials=source_credentials,
        role_arn=spec.role_arn,
        extra_args=extra,
    )
    return DeferredRefreshableCredentials(
        refresh_using=fetcher.fetch_credentials, method="assume-role"
    )
