"""AWS credentials per upstream: resolved with botocore, refreshed off the loop, and
following their source through a working day.

botocore does the work of finding credentials (environment, shared files and profiles,
SSO, ``aws login``, ``credential_process``, container and EKS Pod Identity endpoints,
web identity / IRSA, IMDS) and of assuming roles. What botocore does not do is stay off
an event loop, or notice that a file it read once has changed. So a
:class:`CredentialSource`:

* keeps the last frozen credentials it fetched and serves them from the loop without
  I/O; botocore's refresh before expiry runs in a worker thread, one at a time;
* is polled every couple of seconds (:meth:`CredentialStore.poll`): a cheap ``stat`` of
  the shared credentials and config files and the SSO and login caches, off the loop,
  and the whole chain resolved again when one changed: a key pasted into
  ``~/.aws/credentials`` or an ``aws sso login`` is used within seconds, and the old
  credentials only until the new ones are loaded;
* resolves again once, single-flight, when the upstream refused credentials it signed
  with (:meth:`CredentialSource.renew`), so the refused request can be sent again;
* with ``serve --wait-for-credentials``, starts without any and tries again until some
  appear.

A failed refresh keeps the old credentials in use while they are still valid; when
nothing valid is left, requests get :class:`~sigproxy.errors.CredentialsUnavailable`
(503) with the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

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


# How often the watched files are looked at, and how soon after a refusal the source may
# be resolved again (a steady stream of refusals must not become a stream of STS calls).
POLL_INTERVAL = 2.0
RENEW_INTERVAL = 5.0
# Credentials that can't be refreshed get a WARNING this long before they expire.
EXPIRY_WARNING = 10 * 60.0

Stamp = tuple[tuple[str, int, int, int] | None, ...]


def aws_files() -> tuple[str, ...]:
    """What a change of means new credentials may be there: the shared credentials and
    config files, and the caches ``aws sso login`` and ``aws login`` write."""
    home = os.path.expanduser("~/.aws")
    return (
        os.path.expanduser(
            os.environ.get("AWS_SHARED_CREDENTIALS_FILE", os.path.join(home, "credentials"))
        ),
        os.path.expanduser(os.environ.get("AWS_CONFIG_FILE", os.path.join(home, "config"))),
        os.path.join(home, "sso", "cache"),
        os.path.join(home, "login", "cache"),
    )


def stamp(paths: Sequence[str]) -> Stamp:
    """(inode, mtime, size) of each path, ``None`` for those missing: blocking, cheap."""
    out: list[tuple[str, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((path, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def next_step(method: str, profile: str | None) -> str:
    """What the user does to give a source of this kind (botocore's ``method``) new
    credentials."""
    name = profile or os.environ.get("AWS_PROFILE") or "default"
    steps = {
        "sso": f"run: aws sso login --profile {name}",
        "login": f"run: aws login --profile {name}",
        "env": "restart sigproxy with new AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
        "(and AWS_SESSION_TOKEN) in its environment, or put keys in the credentials file",
        "shared-credentials-file": f"write new keys for [{name}] into "
        f"{aws_files()[0]} (aws configure --profile {name}); sigproxy reads them within "
        "seconds",
        "config-file": f"write new keys for profile {name} into {aws_files()[1]}; "
        "sigproxy reads them within seconds",
        "custom-process": f"check that the credential_process of profile {name} works "
        "when run by hand",
        "assume-role": "check that the source credentials are valid and may assume the role",
        "assume-role-with-web-identity": "check AWS_WEB_IDENTITY_TOKEN_FILE and the role's "
        "trust policy",
        "container-role": "check the container credentials endpoint "
        "(AWS_CONTAINER_CREDENTIALS_FULL_URI / _RELATIVE_URI)",
        "iam-role": "check the instance profile and that IMDS is reachable",
    }
    return steps.get(
        method,
        f"run aws configure --profile {name}, aws sso login --profile {name}, or set "
        "AWS_PROFILE to a profile that has credentials",
    )


# serve --wait-for-credentials waits this long for each source at start.
LOAD_WAIT = 5.0
# How long a request waits for credentials being resolved (after a refusal, or when none
# are valid) before it is answered with what is known: a provider may hang for minutes.
WAIT = 5.0

T = TypeVar("T")


async def _wait(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), WAIT)


async def _off_loop(fn: Callable[[], T]) -> T:
    """``fn()`` in a daemon thread: botocore blocks, and a provider that hangs (a
    credential_process waiting for input) must neither hold the loop nor, as a thread of
    the loop's executor would, keep the process from exiting on SIGTERM."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, failed: bool) -> None:
        if future.done():
            return
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value: Any = fn()
        except BaseException as exc:  # handed to the awaiting task
            value, failed = exc, True
        else:
            failed = False
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, value, failed)

    threading.Thread(target=run, name="sigproxy-credentials", daemon=True).start()
    return await future


def _check_keys(frozen: ReadOnlyCredentials) -> None:
    if not frozen.access_key or not frozen.secret_key:
        raise CredentialsError("the credentials found have no access key or secret key")


class CredentialSource:
    """One set of credentials (one :class:`CredentialsSpec`), shared by its upstreams.

    ``resolve`` finds the credentials again from scratch and fetches them (botocore's
    chain, blocking);
    ``watch`` lists the files whose change means it should. Without ``resolve`` (fixed
    credentials, tests) only botocore's own refresh applies.
    """

    def __init__(
        self,
        credentials: Credentials | None,
        description: str,
        *,
        resolve: Callable[[], tuple[Credentials, ReadOnlyCredentials]] | None = None,
        watch: Sequence[str] = (),
        profile: str | None = None,
        min_validity: float = 30.0,
        retry_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._credentials = credentials
        self.description = description
        self._resolve = resolve
        self._watch = tuple(watch)
        self._profile = profile
        self._min_validity = min_validity
        self._retry_interval = retry_interval
        self._clock = clock
        self._frozen: ReadOnlyCredentials | None = None
        self._expiry: float | None = None
        self._stamp: Stamp | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._next_attempt = 0.0
        self._renewed_at = -RENEW_INTERVAL
        self._warned_expiry: float | None = None
        self._said: str | None = None  # the state the last refresh WARNING named
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

    @property
    def pending(self) -> bool:
        """No credentials were ever loaded (``serve --wait-for-credentials``)."""
        return self._frozen is None

    @property
    def next_step(self) -> str:
        return next_step(self.method, self._profile)

    def load(self, timeout: float | None = None) -> None:
        """Fetch credentials now, blocking. Used once at startup, before listening.
        Raises :class:`CredentialsError` saying why there are none, or that the provider
        gave no answer within ``timeout`` seconds (it may still be working, in a daemon
        thread: its answer is dropped, and :meth:`poll` asks again)."""
        if timeout is None:
            self._install(*self._load(), self._seen())
            return
        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(self._load())
            except BaseException as exc:  # handed to the caller below
                result.append(exc)
            done.set()

        threading.Thread(target=run, name="sigproxy-credentials", daemon=True).start()
        if not done.wait(timeout):
            raise CredentialsError(
                f"the credential provider gave no answer within {timeout:g} s "
                "(a credential_process waiting for input?)"
            )
        if isinstance(result[0], BaseException):
            raise result[0]
        credentials, frozen, expiry = result[0]
        self._install(credentials, frozen, expiry, self._seen())

    def _seen(self) -> Stamp | None:
        return stamp(self._watch) if self._watch else None

    def _load(self) -> tuple[Credentials, ReadOnlyCredentials, float | None]:
        """Resolve (when this source can) and fetch, blocking: run it off the loop."""
        if self._resolve is not None:
            credentials, frozen = self._resolve()
            _check_keys(frozen)
            return credentials, frozen, _expiry_epoch(credentials)
        if self._credentials is None:
            raise CredentialsError("none found")
        frozen, expiry = self._fetch(self._credentials)
        return self._credentials, frozen, expiry

    def _reload(self) -> tuple[Stamp | None, Any]:
        """What the watched files look like, then the load's result or its exception;
        blocking. The stamp is taken first: a change during the load is seen next time."""
        seen = self._seen()
        try:
            return seen, self._load()
        except Exception as exc:  # any provider failure: the caller keeps what it has
            return seen, exc

    def _install(
        self,
        credentials: Credentials,
        frozen: ReadOnlyCredentials,
        expiry: float | None,
        seen: Stamp | None,
    ) -> bool:
        """Use these from now on; True when they differ from those in use."""
        changed = self._frozen is not None and frozen != self._frozen
        self._credentials, self._frozen, self._expiry = credentials, frozen, expiry
        if seen is not None:
            self._stamp = seen
        return changed

    @staticmethod
    def _fetch(credentials: Credentials) -> tuple[ReadOnlyCredentials, float | None]:
        frozen = credentials.get_frozen_credentials()
        _check_keys(frozen)
        return frozen, _expiry_epoch(credentials)

    def _usable(self, now: float) -> bool:
        if self._frozen is None:
            return False
        return self._expiry is None or now < self._expiry - self._min_validity

    async def get(self) -> ReadOnlyCredentials:
        """Credentials to sign with now; never blocks the loop on botocore."""
        frozen = self._frozen
        if frozen is not None and self._expiry is None:
            return frozen
        if frozen is None:
            raise self._unavailable()
        now = self._clock()
        if now >= self._next_attempt and self._refresh_due():
            self._start(self._run_refresh())
        if self._usable(now):
            return frozen
        if self._refresh is None and now >= self._next_attempt:
            self._start(self._run_refresh())
        if self._refresh is not None:
            await _wait(self._refresh)
        if self._usable(self._clock()):
            assert self._frozen is not None
            return self._frozen
        raise self._unavailable()

    def _unavailable(self) -> CredentialsUnavailable:
        if self._frozen is None:
            reason = self.last_error or "none found yet"
            return CredentialsUnavailable(
                f"no AWS credentials yet ({self.description}): {reason}; {self.next_step}",
            )
        reason = self.last_error or "the credentials have expired"
        return CredentialsUnavailable(
            f"no valid AWS credentials ({self.description}): {reason}; {self.next_step}",
        )

    async def renew(self, used: object) -> ReadOnlyCredentials | None:
        """The upstream refused ``used``: resolve from the source again (at most once
        every few seconds, one at a time) and return the credentials to sign with
        instead, or ``None`` when the source has nothing different."""
        if self._frozen is not None and self._frozen != used:
            return self._frozen  # already replaced since that request was signed
        if self._refresh is not None:
            await _wait(self._refresh)
        elif time.monotonic() - self._renewed_at >= RENEW_INTERVAL:
            self._renewed_at = time.monotonic()
            await _wait(self._start(self._run_reload("the upstream refused them")))
        frozen = self._frozen
        return frozen if frozen is not None and frozen != used else None

    async def poll(self) -> None:
        """Called every few seconds: resolve again when a watched file changed or while
        there are none; refresh before expiry; warn of an expiry nothing can prevent."""
        if self._refresh is not None:
            return
        now = self._clock()
        if self._resolve is not None:
            changed = False
            if self._watch:
                seen = await asyncio.get_running_loop().run_in_executor(None, stamp, self._watch)
                changed = seen != self._stamp
            if changed or (self._frozen is None and now >= self._next_attempt):
                why = "a credentials file changed" if changed else "retrying"
                await asyncio.shield(self._start(self._run_reload(why)))
                return
        if self._expiry is not None and now >= self._next_attempt and self._refresh_due():
            await asyncio.shield(self._start(self._run_refresh()))
        self._warn_expiry(self._clock())

    def _warn_expiry(self, now: float) -> None:
        expiry = self._expiry
        if expiry is None or expiry - now > EXPIRY_WARNING or self.last_error is None:
            return
        if self._warned_expiry == expiry:
            return
        self._warned_expiry = expiry
        at = time.strftime("%H:%M:%SZ", time.gmtime(expiry))
        log.warning(
            "credentials for %s (%s) expire at %s (in %d min) and cannot be refreshed: %s; %s",
            self.description,
            self.method,
            at,
            max(0, int((expiry - now) // 60)),
            self.last_error,
            self.next_step,
        )

    def _refresh_due(self) -> bool:
        needed = getattr(self._credentials, "refresh_needed", None)
        return bool(needed()) if needed is not None else False

    def _start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        if self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(work)
        else:
            work.close()
        return self._refresh

    async def _run_reload(self, why: str) -> None:
        """Resolve from the source again, off the loop; keep what we have on failure."""
        try:
            seen, loaded = await _off_loop(self._reload)
            if isinstance(loaded, Exception):
                # Until the files change again, or the retry interval passes while there
                # are none: a broken file is not read (and reported) every poll.
                self._stamp = seen
                self._failed(loaded)
                return
            first = self._frozen is None
            credentials, frozen, expiry = loaded
            if self._install(credentials, frozen, expiry, seen) or first:
                log.warning(
                    "credentials for %s %s (%s): signing with them from now on",
                    self.description,
                    "found" if first else "changed",
                    why,
                )
            self.last_error = None
            self.refreshes["success"] += 1
            self._next_attempt = self._clock() + self._retry_interval
        finally:
            self._refresh = None

    async def _run_refresh(self) -> None:
        """botocore's refresh of the credentials in use, off the loop."""
        credentials = self._credentials
        assert credentials is not None
        try:
            frozen, expiry = await _off_loop(functools.partial(self._fetch, credentials))
        except Exception as exc:  # any provider failure: keep what we have
            self._failed(exc)
        else:
            unchanged = frozen == self._frozen
            self._install(credentials, frozen, expiry, None)
            if unchanged and self._refresh_due():
                # Inside its advisory window botocore logs a failed refresh and hands back
                # the old credentials instead of raising.
                self._failed(None)
            else:
                log.info("credentials refreshed for %s", self.description)
                self.last_error = None
                self.refreshes["success"] += 1
            # botocore asks for a refresh on every call inside its advisory window; if a
            # provider keeps handing out short-lived credentials, don't ask it each request.
            self._next_attempt = self._clock() + self._retry_interval
        finally:
            self._refresh = None

    def _failed(self, exc: BaseException | None) -> None:
        previous = (self._said, self.last_error)
        if exc is None:
            self.last_error = (
                "the provider handed back the same credentials (botocore could not refresh them)"
            )
        elif isinstance(exc, CredentialsError):
            self.last_error = str(exc)
        else:
            self.last_error = _describe_error(exc)
        self.refreshes["failure"] += 1
        self._next_attempt = self._clock() + self._retry_interval
        if self._frozen is None:
            state = "none yet"
        else:
            state = "still valid" if self._usable(self._clock()) else "none valid left"
        # Retries come every few seconds: say it again only when something changed.
        level = logging.DEBUG if previous == (state, self.last_error) else logging.WARNING
        self._said = state
        log.log(
            level,
            "credential refresh failed for %s (%s): %s",
            self.description,
            state,
            self.last_error,
        )


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

    async def poll(self) -> None:
        """One round of :meth:`CredentialSource.poll` over the distinct sources."""
        for source in {id(s): s for s in self._sources.values()}.values():
            await source.poll()

    @classmethod
    def resolve(
        cls, config: Config, previous: CredentialStore | None = None, *, wait: bool = False
    ) -> CredentialStore:
        """Find credentials for every ``aws_iam`` upstream now (blocking: run it before
        serving, or off the loop on reload).

        Upstreams with the same ``credentials`` settings share one source, and on a reload
        a source whose settings are unchanged is kept (with its refresh state).
        Raises :class:`CredentialsError` naming the upstream when any are missing, unless
        ``wait``: then that source starts empty (:attr:`CredentialSource.pending`) and
        keeps looking.
        """
        by_spec: dict[CredentialsSpec, CredentialSource] = {}
        sources: dict[str, CredentialSource] = {}
        kept = previous._by_spec if previous is not None else {}
        for i, upstream in enumerate(config.upstreams):
            if upstream.auth != "aws_iam":
                continue
            source = by_spec.get(upstream.credentials) or kept.get(upstream.credentials)
            if source is None:
                source = _source(upstream.credentials, upstream.region)
                try:
                    # Waiting: a provider that does not answer must not keep the
                    # listeners closed; the source keeps asking in the background.
                    source.load(timeout=LOAD_WAIT if wait else None)
                except CredentialsError as exc:
                    if not wait:
                        raise CredentialsError(
                            f"upstreams[{i}] ({upstream.name}): no usable AWS credentials "
                            f"from {upstream.credentials.describe()}: {exc}"
                        ) from None
                    source.last_error = str(exc)
                    log.warning(
                        "upstream %s: no AWS credentials yet from %s (%s); answering 503 "
                        "until they appear: %s",
                        upstream.name,
                        upstream.credentials.describe(),
                        exc,
                        source.next_step,
                    )
            by_spec[upstream.credentials] = source
            sources[upstream.name] = source
        return cls(sources, by_spec)

    @classmethod
    def static_for(cls, config: Config, source: CredentialSource) -> CredentialStore:
        """Use one given source for every ``aws_iam`` upstream (tests, demos)."""
        return cls({u.name: source for u in config.upstreams if u.auth == "aws_iam"})


def _source(spec: CredentialsSpec, region: str) -> CredentialSource:
    """A source that resolves ``spec`` with botocore each time it loads."""
    return CredentialSource(
        None,
        spec.describe(),
        resolve=functools.partial(_chain, spec, region),
        watch=aws_files(),
        profile=spec.profile,
    )


def _chain(spec: CredentialsSpec, region: str) -> tuple[Credentials, ReadOnlyCredentials]:
    """botocore's credential chain for ``spec`` (and the role on top), from scratch:
    a new session reads the files and caches again. Blocking."""
    try:
        session = botocore.session.Session(profile=spec.profile)
        _bound_credential_process(session)
        credentials = session.get_credentials()
        if credentials is None:
            raise CredentialsError(
                "none found (looked in the environment, shared credentials and config "
                "files, SSO, container and instance metadata; set AWS_PROFILE or "
                "credentials.profile, or run aws configure)"
            )
        if spec.role_arn:
            credentials = _assume_role(session, credentials, spec, region)
        # Fetched here, so a provider's failure is told with the next step.
        frozen = credentials.get_frozen_credentials()
    except Exception as exc:  # botocore's, and what a broken credential_process raises
        text = str(exc) if isinstance(exc, CredentialsError) else _describe_error(exc, spec)
        if not isinstance(exc, CredentialsError | BotoCoreError | ClientError):
            # botocore lets a credential_process that can't start, or prints no JSON,
            # raise what Python raised.
            text = (
                f"the profile's credential_process failed: {text} (run it by hand: it must "
                'print JSON with "Version": 1, "AccessKeyId" and "SecretAccessKey")'
            )
        unreadable = _unreadable_aws_files()
        if unreadable:
            text += (
                f"; permission denied reading {', '.join(unreadable)} (this process runs as "
                f"uid {os.getuid()}: make the file readable to it)"
            )
        raise CredentialsError(text) from None
    return credentials, frozen


# botocore waits for a credential_process as long as it runs; sigproxy gives it this long.
PROCESS_TIMEOUT = 30.0


class _BoundedPopen(subprocess.Popen[bytes]):
    """A ``credential_process`` that does not finish in :data:`PROCESS_TIMEOUT` seconds
    (waiting for a prompt nobody answers, a stuck network call) is killed and reported."""

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[Any, Any]:
        try:
            return super().communicate(input, PROCESS_TIMEOUT if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            super().communicate()
            raise CredentialsError(
                f"the credential_process did not finish within {PROCESS_TIMEOUT:g} s and was "
                "stopped (run it by hand to see what it waits for)"
            ) from None


def _bound_credential_process(session: botocore.session.Session) -> None:
    # botocore's ProcessProvider has taken the Popen to use as ``_popen`` since 2017
    # (tests/test_botocore_contract.py checks it).
    resolver = session.get_component("credential_provider")
    provider = resolver.get_provider("custom-process")
    provider._popen = _BoundedPopen


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
