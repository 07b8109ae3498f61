"""Credential resolution with botocore (profiles, env, assume-role against a local STS)
and the off-loop refresh rules."""

from __future__ import annotations

import asyncio
import datetime
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
