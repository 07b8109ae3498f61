"""Every refusal of the local Function URL emulator through the real ``sigproxy serve``:
the client gets the service's status and body with ``X-Sigproxy-Diagnosis``, the metric
counts it, and a clock 10 minutes off is corrected without the client noticing.

The emulator checks each signature with its own SigV4 code (hashlib, written from the
specification), not with sigproxy's signer.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sigproxy.emulator.config import DEFAULT_ACCOUNT, EmulatorConfig, FunctionConfig, Grant
from sigproxy.emulator.server import RunningFunction, start_functions, stop_functions
from sigproxy.emulator.sigv4 import Caller

from .support import raw_request
from .test_process import serve_process, write
from .test_working_day import metric

HANDLER = str(Path(__file__).resolve().parents[1] / "examples" / "hello.py") + ":handler"
USER = f"arn:aws:iam::{DEFAULT_ACCOUNT}:user/e2e"
GOOD = Caller("AKIDE2EGOODKEY000001", "e2e-good-never-LOGGED", DEFAULT_ACCOUNT, USER)
TOKEN = "e2e-token-never-LOGGED-expired"
EXPIRED = Caller(
    "ASIAE2EEXPIRED000001",
    "e2e-expired-never-LOGGED",
    DEFAULT_ACCOUNT,
    USER,
    session_token=TOKEN,
    expires_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1),
)
SECRETS = (GOOD.secret_access_key, EXPIRED.secret_access_key, TOKEN, "e2e-wrong-never-LOGGED")


def emulator(offset: float = 0.0) -> EmulatorConfig:
    return EmulatorConfig(
        region="us-east-1",
        callers=(GOOD, EXPIRED),
        clock_offset=offset,
        functions=(
            FunctionConfig(name="open", handler=HANDLER),
            FunctionConfig(
                name="denied",
                handler=HANDLER,
                allow=(Grant(principal=USER, actions=("lambda:InvokeFunctionUrl",)),),
            ),
        ),
    )


@pytest.fixture
async def functions() -> AsyncIterator[dict[str, str]]:
    """URLs of the emulator's functions by name (its clock right), and ``skewed``: the
    open function of an emulator whose clock is 10 minutes ahead."""
    running: list[RunningFunction] = []
    try:
        running += await start_functions(emulator())
        skewed = await start_functions(emulator(offset=600))
        running += skewed
        urls = {r.function.name: r.url for r in running[:2]}
        urls["skewed"] = skewed[0].url
        yield urls
    finally:
        await stop_functions(running)


def env_with_profiles(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "credentials").write_text(
        f"[good]\naws_access_key_id = {GOOD.access_key_id}\n"
        f"aws_secret_access_key = {GOOD.secret_access_key}\n"
        f"[wrongsecret]\naws_access_key_id = {GOOD.access_key_id}\n"
        "aws_secret_access_key = e2e-wrong-never-LOGGED\n"
        "[unknown]\naws_access_key_id = AKIDE2ENOBODYKNOWS01\n"
        "aws_secret_access_key = e2e-wrong-never-LOGGED\n"
        f"[expired]\naws_access_key_id = {EXPIRED.access_key_id}\n"
        f"aws_secret_access_key = {EXPIRED.secret_access_key}\n"
        f"aws_session_token = {TOKEN}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SIGPROXY_"))}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "credentials"),
        AWS_CONFIG_FILE=str(tmp_path / "config"),
        AWS_EC2_METADATA_DISABLED="true",
        HOME=str(tmp_path),
        PYTHONUNBUFFERED="1",
    )
    return env


ROUTES = [
    # (upstream name, function, profile or None for auth: none, diagnosis or None)
    ("ok", "open", "good", None),
    ("badsecret", "open", "wrongsecret", "invalid-signature"),
    ("unknown", "open", "unknown", "unrecognized-client"),
    ("expired", "open", "expired", "expired-token"),
    ("denied", "denied", "good", "access-denied"),
    ("unsigned", "open", None, "not-signed"),
    ("skewed", "skewed", "good", None),
]


def config(urls: dict[str, str]) -> str:
    lines = ["admin: {port: 0}", "upstreams:"]
    for name, function, profile, _ in ROUTES:
        auth = f"credentials: {{profile: {profile}}}" if profile else "auth: none"
        lines.append(
            f"  - {{name: {name}, url: '{urls[function]}', path_prefix: /{name}, "
            f"region: us-east-1, {auth}}}"
        )
    return "\n".join(lines) + "\n"


async def test_every_refusal_is_explained(functions: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path, config(functions))
    async with serve_process(path, env=env_with_profiles(tmp_path)) as served:
        assert served.admin_port is not None
        for name, _, _, diagnosis in ROUTES:
            resp = await raw_request(served.port, "GET", f"/{name}/?name=e2e")
            if diagnosis is None:
                assert resp.status == 200, (name, resp.body)
                assert json.loads(resp.body) == {"message": "Hello, e2e!"}
                assert resp.header("X-Sigproxy-Diagnosis") is None
                continue
            assert resp.status == 403, (name, resp.status, resp.body)
            assert resp.header("X-Sigproxy-Diagnosis") == diagnosis, name
            # The service's own answer, unchanged.
            assert resp.header("x-amzn-ErrorType") is not None
            assert set(json.loads(resp.body)) <= {"message", "Message"}
            counted = await metric(
                served.admin_port,
                f'sigproxy_upstream_auth_failures_total{{reason="{diagnosis}",upstream="{name}"}}',
            )
            assert counted == 1.0, (name, counted)
        assert await served.stop() == 0
    log = served.log()
    for _, _, _, diagnosis in ROUTES:
        if diagnosis is not None:
            assert f"refused the request ({diagnosis};" in log
    assert "lambda:InvokedViaFunctionUrl" in log  # the statements to add for access-denied
    assert "Set auth: aws_iam" in log
    for secret in SECRETS:
        assert secret not in log


async def test_a_clock_ten_minutes_off_keeps_working(
    functions: dict[str, str], tmp_path: Path
) -> None:
    """The emulator's clock runs 10 minutes ahead of this machine's: the first request
    is refused for its time, corrected and sent again; the client sees only 200s."""
    path = write(tmp_path, config(functions))
    async with serve_process(path, env=env_with_profiles(tmp_path)) as served:
        assert served.admin_port is not None
        for i in range(4):
            resp = await raw_request(served.port, "POST", f"/skewed/?name=t{i}", body=b"{}")
            assert resp.status == 200, resp.body
            assert json.loads(resp.body) == {"message": f"Hello, t{i}!"}
        # One refusal in all: the first request's; the rest were signed corrected.
        refused = await metric(
            served.admin_port,
            'sigproxy_upstream_auth_failures_total{reason="signature-expired",upstream="skewed"}',
        )
        assert refused == 1.0
        skew = await metric(served.admin_port, 'sigproxy_clock_skew_seconds{upstream="skewed"}')
        assert skew is not None and 595 <= skew <= 602
        # Upstreams whose clock is right keep signing with this machine's time.
        assert (await raw_request(served.port, "GET", "/ok/?name=x")).status == 200
        ok_skew = await metric(served.admin_port, 'sigproxy_clock_skew_seconds{upstream="ok"}')
        assert ok_skew is not None and abs(ok_skew) < 5
        assert await served.stop() == 0
    log = served.log()
    assert re.search(r"upstream skewed: this machine's clock is -(599|600|601) s off", log)
    assert "signing with the corrected time" in log
