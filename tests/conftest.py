from __future__ import annotations

import datetime
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from sigproxy.app import create_proxy, make_runner
from sigproxy.config import Config, parse_config
from sigproxy.credentials import CredentialSource, CredentialStore
from sigproxy.proxy import Proxy

from .support import ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, FakeFunctionUrl, Recorded

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """No test sees the developer's AWS setup, and botocore never probes instance
    metadata (no traffic may leave loopback)."""
    import os

    for name in list(os.environ):
        if name.startswith(("AWS_", "SIGPROXY_")):
            monkeypatch.delenv(name)
    env = {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeFunctionUrl:
    """A running fake Function URL; ``upstream.port`` is its port."""
    fake = FakeFunctionUrl()
    # No access log: it would print the query strings the tests send as secrets.
    server = await aiohttp_server(fake.app(), access_log=None)
    fake.port = server.port
    return fake


def static_source() -> CredentialSource:
    return CredentialSource.static(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)


@dataclass
class RunningProxy:
    config: Config
    port: int
    registry: CollectorRegistry

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """Start the proxy app with sigproxy's own runner on a free loopback port.

    ``await start_proxy(yaml_text, credentials=None)``: ``credentials`` defaults to one
    static source (the test keys, with a session token) for every aws_iam upstream.
    """
    runners: list[web.BaseRunner] = []
    proxies: list[Proxy] = []

    async def start(
        yaml_text: str, credentials: CredentialStore | CredentialSource | None = None
    ) -> RunningProxy:
        config = parse_config(yaml_text)
        if credentials is None:
            credentials = static_source()
        if isinstance(credentials, CredentialSource):
            credentials = CredentialStore.static_for(config, credentials)
        registry = CollectorRegistry()
        proxy = create_proxy(config, credentials=credentials, registry=registry)
        proxies.append(proxy)
        runner = make_runner(proxy, shutdown_timeout=2)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return RunningProxy(config, port, registry)

    yield start
    for runner in runners:
        await runner.cleanup()
    for proxy in proxies:
        await proxy.close()


def one_upstream(port: int, **extra: object) -> str:
    """YAML for a proxy with one aws_iam upstream at ``/`` on the fake server (and the
    admin listener on a free port, so test processes never fight over 9090)."""
    lines = [
        "admin: {port: 0}",
        "upstreams:",
        "  - name: fn",
        f"    url: http://127.0.0.1:{port}",
        "    region: us-east-1",
    ]
    for key, value in extra.items():
        lines.append(f"    {key}: {value}")
    return "\n".join(lines) + "\n"


# --- a local STS for assume-role -------------------------------------------------------


class FakeSts:
    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.recorded: list[Recorded] = []
        self.fail = False
        self.lifetime = 3600

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.recorded.append(
            Recorded(
                request.method,
                request.raw_path,
                [(k.decode(), v.decode()) for k, v in request.raw_headers],
                body,
            )
        )
        form = dict((await request.post()).items())
        self.calls.append({k: str(v) for k, v in form.items()})
        if self.fail:
            return web.Response(
                status=403,
                content_type="text/xml",
                text="<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>"
                "<Message>not authorized to assume role</Message></Error>"
                "<RequestId>r</RequestId></ErrorResponse>",
            )
        n = len(self.calls)
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.lifetime)
        return web.Response(
            content_type="text/xml",
            text=f"""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<AssumeRoleResult><Credentials>
<AccessKeyId>ASIAASSUMED{n:09d}</AccessKeyId><SecretAccessKey>assumed-secret-{n}</SecretAccessKey>
<SessionToken>assumed-token-{n}</SessionToken><Expiration>{expiry:%Y-%m-%dT%H:%M:%SZ}</Expiration>
</Credentials><AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/invoke/s</Arn>
<AssumedRoleId>AROAEXAMPLE:s</AssumedRoleId></AssumedRoleUser></AssumeRoleResult>
<ResponseMetadata><RequestId>req-{n}</RequestId></ResponseMetadata></AssumeRoleResponse>""",
        )


@pytest.fixture
async def sts(
    aiohttp_server: Callable[..., Awaitable[TestServer]], monkeypatch: pytest.MonkeyPatch
) -> FakeSts:
    fake = FakeSts()
    # No access log: it would print the query strings the tests send as secrets.
    server = await aiohttp_server(fake.app(), access_log=None)
    # botocore's per-service endpoint override: the real STS client talks to the fake.
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{server.port}")
    return fake
