"""Credential resolution with botocore (profiles, env, assume-role against a local STS)
and the off-loop refresh rules."""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import DeferredRefreshableCredentials

from sigproxy.config import parse_config
from sigproxy.credentials import CredentialSource, CredentialStore
from sigproxy.errors import CredentialsError, CredentialsUnavailable

from .conftest import FakeSts, StartProxy, one_upstream
from .support import FakeFunctionUrl, raw_request, verify_sigv4


def write_profiles(env: dict[str, str]) -> None:
    Path(env["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        "[default]\naws_access_key_id = AKIDDEFAULTPROFILE01\naws_secret_access_key = default-secret\n"
        "[dev]\naws_access_key_id = AKIDDEVPROFILE000001\naws_secret_access_key = dev-secret\n"
        "aws_session_token = dev-token\n"
    )


async def resolve(config_text: str) -> CredentialStore:
    config = parse_config(config_text)
    # Blocking by design (startup); off the loop here because fakes share this loop.
    return await asyncio.get_running_loop().run_in_executor(None, CredentialStore.resolve, config)


async def test_named_profile_signs(
    upstream: FakeFunctionUrl, start_proxy: StartProxy, aws_env: dict[str, str]
) -> None:
    write_profiles(aws_env)
    text = one_upstream(upstream.port, credentials="{profile: dev}")
    store = await resolve(text)
    source = store.get("fn")
    assert source is not None
    assert (source.description, source.method) == ("profile dev", "shared-credentials-file")
    proxy = await start_proxy(text, credentials=store)
    assert (await raw_request(proxy.port, "GET", "/")).status == 200
    verify_sigv4(
        upstream.last,
        region="us-east-1",
        access_key="AKIDDEVPROFILE000001",
        secret_key="dev-secret",
        token="dev-token",
    )


async def test_default_chain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENVIRONMENT1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    store = await resolve(one_upstream(1))
    source = store.get("fn")
    assert source is not None
    assert source.method == "env"
    creds = await source.get()
    assert (creds.access_key, creds.token) == ("AKIDFROMENVIRONMENT1", None)
    assert source.expiry is None


async def test_upstreams_with_same_settings_share_a_source(aws_env: dict[str, str]) -> None:
    write_profiles(aws_env)
    text = (
        "upstreams:\n"
        "  - {name: a, url: 'http://127.0.0.1:1', region: us-east-1, path_prefix: /a, credentials: {profile: dev}}\n"
        "  - {name: b, url: 'http://127.0.0.1:1', region: us-east-1, path_prefix: /b, credentials: {profile: dev}}\n"
        "  - {name: c, url: 'http://127.0.0.1:1', region: us-east-1, path_prefix: /c}\n"
        "  - {name: d, url: 'http://127.0.0.1:1', path_prefix: /d, auth: none}\n"
    )
    store = await resolve(text)
    assert store.get("a") is store.get("b")
    assert store.get("c") is not store.get("a")
    assert store.get("d") is None


@pytest.mark.parametrize(
    ("credentials", "fragment"),
    [
        (None, "none found"),
        ("{profile: nope}", "could not be found"),
    ],
)
async def test_missing_credentials_name_the_upstream(
    credentials: str | None, fragment: str
) -> None:
    extra = {"credentials": credentials} if credentials else {}
    with pytest.raises(CredentialsError) as info:
        await resolve(one_upstream(1, **extra))
    message = str(info.value)
    assert message.startswith("upstreams[0] (fn): no usable AWS credentials from ")
    assert fragment in message


# --- assume-role against a local STS --------------------------------------------------


ROLE = "arn:aws:iam::123456789012:role/invoke"


async def test_assume_role_on_top_of_profile(
    sts: FakeSts, upstream: FakeFunctionUrl, start_proxy: StartProxy, aws_env: dict[str, str]
) -> None:
    write_profiles(aws_env)
    text = one_upstream(
        upstream.port,
        credentials=f"{{profile: dev, role_arn: '{ROLE}', external_id: ext-42, "
        "session_name: ci-run, duration_seconds: 1800}",
    )
    store = await resolve(text)
    assert sts.calls == [
        {
            "Action": "AssumeRole",
            "Version": "2011-06-15",
            "RoleArn": ROLE,
            "RoleSessionName": "ci-run",
            "ExternalId": "ext-42",
            "DurationSeconds": "1800",
        }
    ]
    # The STS call itself was made with the profile's keys, for sts in us-east-1.
    sts_auth = sts.recorded[0].header("Authorization") or ""
    assert "Credential=AKIDDEVPROFILE000001/" in sts_auth
    assert "/us-east-1/sts/aws4_request" in sts_auth
    assert sts.recorded[0].header("X-Amz-Security-Token") == "dev-token"
    source = store.get("fn")
    assert source is not None
    assert source.method == "assume-role"
    assert source.expiry is not None
    assert 3500 < source.expiry - time.time() <= 3600
    proxy = await start_proxy(text, credentials=store)
    assert (await raw_request(proxy.port, "POST", "/run", body=b"{}")).status == 200
    verify_sigv4(
        upstream.last,
        region="us-east-1",
        access_key="ASIAASSUMED000000001",
        secret_key="assumed-secret-1",
        token="assumed-token-1",
    )


async def test_assume_role_denied_is_a_startup_error(sts: FakeSts, aws_env: dict[str, str]) -> None:
    write_profiles(aws_env)
    sts.fail = True
    with pytest.raises(CredentialsError) as info:
        await resolve(one_upstream(1, credentials=f"{{role_arn: '{ROLE}'}}"))
    message = str(info.value)
    assert "assume-role" in message and "AccessDenied" in message
    assert "default-secret" not in message


async def test_assumed_credentials_near_expiry_refresh_in_background(
    sts: FakeSts, upstream: FakeFunctionUrl, start_proxy: StartProxy, aws_env: dict[str, str]
) -> None:
    """Credentials inside botocore's 15-minute refresh window are refreshed off-loop
    while requests keep being signed with the still-valid ones."""
    write_profiles(aws_env)
    sts.lifetime = 14 * 60
    text = one_upstream(upstream.port, credentials=f"{{role_arn: '{ROLE}'}}")
    store = await resolve(text)
    proxy = await start_proxy(text, credentials=store)
    assert (await raw_request(proxy.port, "GET", "/1")).status == 200
    verify_sigv4(
        upstream.last,
        region="us-east-1",
        access_key="ASIAASSUMED000000001",
        secret_key="assumed-secret-1",
        token="assumed-token-1",
    )
    for _ in range(100):
        if len(sts.calls) >= 2:
            break
        await asyncio.sleep(0.02)
    assert len(sts.calls) == 2
    await asyncio.sleep(0.05)
    assert (await raw_request(proxy.port, "GET", "/2")).status == 200
    verify_sigv4(
        upstream.last,
        region="us-east-1",
        access_key="ASIAASSUMED000000002",
        secret_key="assumed-secret-2",
        token="assumed-token-2",
    )


# --- refresh rules, with botocore's refreshable credentials and a local refresh function


class Issuer:
    """A refresh function for botocore's DeferredRefreshableCredentials."""

    def __init__(self, lifetime: float, delay: float = 0.0) -> None:
        self.lifetime = lifetime
        self.delay = delay
        self.fail = False
        self.calls = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
            n = self.calls
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("issuer unavailable")
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.lifetime)
        return {
            "access_key": f"ASIAREFRESH{n:09d}",
            "secret_key": f"refresh-secret-{n}",
            "token": f"refresh-token-{n}",
            "expiry_time": expiry.isoformat(),
        }


def source_for(issuer: Issuer, **kwargs: Any) -> CredentialSource:
    creds = DeferredRefreshableCredentials(refresh_using=issuer, method="test-issuer")
    kwargs.setdefault("retry_interval", 0.0)
    source = CredentialSource(creds, "test issuer", **kwargs)
    source.load()
    return source


async def test_refresh_is_single_flight_and_off_loop() -> None:
    issuer = Issuer(lifetime=12 * 60, delay=0.5)  # inside the refresh window at once
    source = await asyncio.get_running_loop().run_in_executor(None, source_for, issuer)
    assert issuer.calls == 1
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(source.get() for _ in range(50)))
    # All served at once with the still-valid credentials, no waiting on the refresh.
    assert {r.access_key for r in results} == {"ASIAREFRESH000000001"}
    await asyncio.sleep(0.8)
    tick_task.cancel()
    assert issuer.calls == 2  # one refresh for 50 concurrent requests
    assert ticks >= 40  # the loop kept turning during the 0.5 s refresh
    assert threading.main_thread().name not in issuer.threads
    assert (await source.get()).access_key == "ASIAREFRESH000000002"


async def test_failed_refresh_keeps_valid_credentials(caplog: pytest.LogCaptureFixture) -> None:
    issuer = Issuer(lifetime=12 * 60)
    source = source_for(issuer)
    issuer.fail = True
    first = await source.get()
    await asyncio.sleep(0.1)
    again = await source.get()
    assert first.access_key == again.access_key == "ASIAREFRESH000000001"
    assert source.refreshes["failure"] >= 1
    assert source.last_error is not None
    assert "credential refresh failed for test issuer (still valid)" in caplog.text


async def test_nothing_valid_left_is_503(
    upstream: FakeFunctionUrl, start_proxy: StartProxy
) -> None:
    issuer = Issuer(lifetime=20)  # expires within min_validity: never usable
    source = await asyncio.get_running_loop().run_in_executor(None, source_for, issuer)
    issuer.fail = True
    with pytest.raises(CredentialsUnavailable, match="issuer unavailable"):
        await source.get()
    proxy = await start_proxy(one_upstream(upstream.port), credentials=source)
    resp = await raw_request(proxy.port, "GET", "/")
    assert resp.status == 503
    body = json.loads(resp.body)
    assert body["error"] == "credentials_unavailable"
    assert "issuer unavailable" in body["message"]
    assert upstream.requests == []
    # The issuer recovers: the next request waits for a fresh set and goes through.
    issuer.fail = False
    issuer.lifetime = 3600
    resp = await raw_request(proxy.port, "GET", "/")
    assert resp.status == 200
    rec = upstream.last
    assert rec.header(
        "X-Amz-Security-Token",
    ).startswith("refresh-token-")  # type: ignore[union-attr]
    assert rec.header("X-Amz-Content-SHA256") == hashlib.sha256(b"").hexdigest()


# --- following the source: renew after a refusal, waiting, expiry warnings ------------


class Rotating:
    """A resolve function for a CredentialSource: hands out ``keys`` (changed by the test)
    and counts its calls and threads."""

    def __init__(self) -> None:
        self.keys: tuple[str, str] | None = ("AKIDROTATING00000001", "rotating-secret-1")
        self.calls = 0
        self.threads: set[str] = set()

    def __call__(self) -> tuple[Any, Any]:
        from botocore.credentials import Credentials

        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.keys is None:
            raise CredentialsError("none found (write some)")
        creds = Credentials(*self.keys, method="shared-credentials-file")
        return creds, creds.get_frozen_credentials()


async def test_renew_is_single_flight_rate_limited_and_off_loop() -> None:
    rotating = Rotating()
    source = CredentialSource(None, "rotating", resolve=rotating)
    await asyncio.get_running_loop().run_in_executor(None, source.load)
    used = await source.get()
    assert rotating.calls == 1
    # Nothing new in the source: no retry.
    assert await source.renew(used) is None
    assert rotating.calls == 2
    # A storm of refusals right after: no further look at the source for a few seconds.
    rotating.keys = ("AKIDROTATING00000002", "rotating-secret-2")
    assert await asyncio.gather(*(source.renew(used) for _ in range(20))) == [None] * 20
    assert rotating.calls == 2
    assert threading.main_thread().name not in rotating.threads
    assert (await source.get()).access_key == "AKIDROTATING00000001"


async def test_renew_returns_the_new_credentials_once_loaded() -> None:
    rotating = Rotating()
    source = CredentialSource(None, "rotating", resolve=rotating)
    source.load()
    used = await source.get()
    rotating.keys = ("AKIDROTATING00000002", "rotating-secret-2")
    results = await asyncio.gather(*(source.renew(used) for _ in range(10)))
    assert rotating.calls == 2  # one reload for ten refused requests
    assert {r.access_key for r in results if r is not None} == {"AKIDROTATING00000002"}
    assert None not in results
    assert (await source.get()).access_key == "AKIDROTATING00000002"


async def test_pending_source_answers_503_with_the_next_step_until_found(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rotating = Rotating()
    rotating.keys = None
    source = CredentialSource(None, "profile dev", resolve=rotating, profile="dev")
    with pytest.raises(CredentialsError):
        source.load()
    assert source.pending
    with pytest.raises(CredentialsUnavailable) as info:
        await source.get()
    message = info.value.message
    assert message.startswith("no AWS credentials yet (profile dev)")
    assert "aws configure --profile dev" in message
    # Polls retry; the same reason is not logged at WARNING again and again.
    for _ in range(3):
        source._next_attempt = 0.0
        await source.poll()
    assert rotating.calls == 4
    said = [
        r
        for r in caplog.records
        if r.levelname == "WARNING" and "refresh failed for profile dev" in r.getMessage()
    ]
    assert len(said) == 1
    rotating.keys = ("AKIDROTATING00000009", "rotating-secret-9")
    source._next_attempt = 0.0
    await source.poll()
    assert not source.pending
    assert (await source.get()).access_key == "AKIDROTATING00000009"
    assert "credentials for profile dev found (retrying)" in caplog.text


async def test_expiry_that_cannot_be_refreshed_is_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuer = Issuer(lifetime=8 * 60)  # inside the 10-minute warning
    source = source_for(issuer)
    issuer.fail = True
    for _ in range(4):
        await source.poll()
        await asyncio.sleep(0.01)
    assert issuer.calls >= 2
    warnings = [r for r in caplog.records if "cannot be refreshed" in r.getMessage()]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert warnings[0].levelname == "WARNING"
    assert line.startswith("credentials for test issuer (test-issuer) expire at ")
    assert "(in 7 min)" in line or "(in 8 min)" in line
    assert "issuer unavailable" in line


async def test_sso_profile_without_login_says_the_command(aws_env: dict[str, str]) -> None:
    Path(aws_env["AWS_CONFIG_FILE"]).write_text(
        "[profile dev]\nsso_session = corp\nsso_account_id = 111122223333\n"
        "sso_role_name = Dev\nregion = us-east-1\n"
        "[sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\n"
        "sso_region = us-east-1\n"
    )
    config = parse_config(one_upstream(1, credentials="{profile: dev}"))
    store = await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(CredentialStore.resolve, config, wait=True)
    )
    source = store.get("fn")
    assert source is not None and source.pending
    assert source.last_error is not None
    assert "aws sso login --profile dev" in source.last_error
    with pytest.raises(CredentialsError, match="aws sso login --profile dev"):
        await asyncio.get_running_loop().run_in_executor(None, CredentialStore.resolve, config)
