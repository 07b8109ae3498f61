"""A working day with real credentials, against the real ``sigproxy serve`` process: the
credentials file rewritten mid-run, an upstream that starts refusing the old key, no
credentials at start (``--wait-for-credentials``), and every refusal explained.

Every signature that reaches the fake Function URL is recomputed with awscrt
(tests/support.py), not with sigproxy's signer.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

from aiohttp import web

from .conftest import one_upstream
from .support import FakeFunctionUrl, Recorded, raw_request, verify_sigv4
from .test_process import serve_process, write

KEY_A = "AKIDWORKINGDAYKEY0A1"
SECRET_A = "secret-A-never-LOGGED-1f2e3d"
KEY_B = "AKIDWORKINGDAYKEY0B2"
SECRET_B = "secret-B-never-LOGGED-9c8b7a"


def files_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose only credentials are the files under ``tmp_path`` (nothing
    from the developer's machine, no instance metadata)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SIGPROXY_"))}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "credentials"),
        AWS_CONFIG_FILE=str(tmp_path / "config"),
        AWS_EC2_METADATA_DISABLED="true",
        HOME=str(tmp_path),  # ~/.aws/sso/cache and friends: empty
        PYTHONUNBUFFERED="1",
    )
    return env


def write_keys(tmp_path: Path, key: str, secret: str) -> Path:
    path = tmp_path / "credentials"
    path.write_text(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    return path


def key_of(rec: Recorded) -> str:
    m = re.search(r"Credential=([^/]+)/", rec.header("Authorization") or "")
    assert m, rec.header("Authorization")
    return m.group(1)


async def metric(port: int, series: str) -> float | None:
    """The value of one series (name and labels exactly as exposed) on /metrics."""
    resp = await raw_request(port, "GET", "/metrics")
    assert resp.status == 200
    for line in resp.body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return None


async def test_rewritten_credentials_file_is_used_without_restart(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    write_keys(tmp_path, KEY_A, SECRET_A)
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, env=files_env(tmp_path)) as served:
        assert (await raw_request(served.port, "GET", "/1")).status == 200
        verify_sigv4(
            upstream.last, region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None
        )
        write_keys(tmp_path, KEY_B, SECRET_B)
        deadline = time.monotonic() + 10
        statuses = []
        while key_of(upstream.last) != KEY_B and time.monotonic() < deadline:
            statuses.append((await raw_request(served.port, "GET", "/2")).status)
            await asyncio.sleep(0.1)
        # No client saw a failure while the file changed under the proxy.
        assert set(statuses) == {200}
        verify_sigv4(
            upstream.last, region="us-east-1", access_key=KEY_B, secret_key=SECRET_B, token=None
        )
        # Picked up by the poll (every 2 s), without any refusal.
        assert len(upstream.requests) == len(statuses) + 1
        assert await served.stop() == 0
    log = served.log()
    assert "credentials for default chain changed (a credentials file changed)" in log
    for secret in (SECRET_A, SECRET_B):
        assert secret not in log


async def test_upstream_refusing_the_old_key_is_retried_once_with_the_new(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """The key is rotated: the upstream refuses the old one before sigproxy's poll has
    seen the new file. The client still gets 200; the upstream saw one refused request
    signed with the old key and one signed afresh with the new key."""
    refuse = False

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if refuse and key_of(rec) == KEY_A:
            return web.Response(
                status=403,
                body=b'{"message":"The security token included in the request is invalid."}',
                content_type="application/json",
                headers={"x-amzn-ErrorType": "UnrecognizedClientException"},
            )
        return web.json_response({"ok": True})

    upstream.answer = answer
    creds = write_keys(tmp_path, KEY_A, SECRET_A)
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, env=files_env(tmp_path)) as served:
        assert (await raw_request(served.port, "GET", "/first")).status == 200
        # Rewritten in place with the same size and modification time: the cheap stat
        # sees no change (as on file systems with coarse timestamps), so only the
        # refusal can make sigproxy look again.
        before = os.stat(creds)
        with open(creds, "r+") as fh:
            text = fh.read().replace(KEY_A, KEY_B).replace(SECRET_A, SECRET_B)
            fh.seek(0)
            fh.write(text)
        os.utime(creds, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(creds).st_size == before.st_size
        await asyncio.sleep(2.5)  # a poll or more has run, and seen nothing
        refuse = True
        seen = len(upstream.requests)
        resp = await raw_request(served.port, "POST", "/rotated", body=b'{"n": 1}')
        assert resp.status == 200, resp.body
        assert resp.header("X-Sigproxy-Diagnosis") is None
        tries = upstream.requests[seen:]
        assert [key_of(r) for r in tries] == [KEY_A, KEY_B]
        assert tries[0].body == tries[1].body == b'{"n": 1}'
        verify_sigv4(
            tries[0], region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None
        )
        verify_sigv4(
            tries[1], region="us-east-1", access_key=KEY_B, secret_key=SECRET_B, token=None
        )
        # Signed afresh: its own date and signature.
        assert tries[0].header("Authorization") != tries[1].header("Authorization")
        # Later requests go straight out with the new key.
        assert (await raw_request(served.port, "GET", "/after")).status == 200
        assert key_of(upstream.last) == KEY_B
        assert len(upstream.requests) == seen + 3
        assert served.admin_port is not None
        failures = await metric(
            served.admin_port,
            'sigproxy_upstream_auth_failures_total{reason="unrecognized-client",upstream="fn"}',
        )
        assert failures == 1.0
        assert await served.stop() == 0
    log = served.log()
    assert "refused the request (unrecognized-client" in log
    assert "sending it again with the ones the source has now" in log


async def test_refusal_with_nothing_new_is_passed_on_with_its_diagnosis(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """A key the upstream does not know, and no other in the source: one attempt (never
    a loop), the upstream's status and body unchanged, plus the diagnosis header; the
    log explains it once, not once per request."""
    refusal = b'{"message":"The security token included in the request is invalid."}'

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        return web.Response(
            status=403,
            body=refusal,
            content_type="application/json",
            headers={"x-amzn-ErrorType": "UnrecognizedClientException"},
        )

    upstream.answer = answer
    write_keys(tmp_path, KEY_A, SECRET_A)
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, env=files_env(tmp_path)) as served:
        for i in range(5):
            resp = await raw_request(served.port, "GET", f"/n{i}")
            assert resp.status == 403
            assert resp.body == refusal
            assert resp.header("x-amzn-ErrorType") == "UnrecognizedClientException"
            assert resp.header("X-Sigproxy-Diagnosis") == "unrecognized-client"
        assert len(upstream.requests) == 5
        for rec in upstream.requests:
            verify_sigv4(rec, region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None)
        assert await served.stop() == 0
    log = served.log()
    assert log.count("refused the request (unrecognized-client") == 1
    assert "is not one AWS knows" in log


async def test_a_function_that_answers_403_itself_is_left_alone(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        return web.json_response({"error": "you may not"}, status=403)

    upstream.answer = answer
    write_keys(tmp_path, KEY_A, SECRET_A)
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, env=files_env(tmp_path)) as served:
        resp = await raw_request(served.port, "DELETE", "/thing")
        assert resp.status == 403
        assert json.loads(resp.body) == {"error": "you may not"}
        assert resp.header("X-Sigproxy-Diagnosis") is None
        assert len(upstream.requests) == 1
        assert await served.stop() == 0
    assert "refused the request" not in served.log()


async def test_wait_for_credentials_from_nothing_to_serving(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    env = files_env(tmp_path)
    async with serve_process(path, "--wait-for-credentials", env=env) as served:
        assert served.admin_port is not None
        ready = await raw_request(served.admin_port, "GET", "/readyz")
        assert ready.status == 503
        reasons = json.loads(ready.body)["reasons"]
        assert len(reasons) == 1
        assert reasons[0].startswith("upstream fn: no AWS credentials yet (default chain)")
        assert "aws configure" in reasons[0]
        resp = await raw_request(served.port, "GET", "/early")
        assert resp.status == 503
        body = json.loads(resp.body)
        assert body["error"] == "credentials_unavailable"
        assert "no AWS credentials yet" in body["message"] and "aws configure" in body["message"]
        assert upstream.requests == []

        write_keys(tmp_path, KEY_A, SECRET_A)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready = await raw_request(served.admin_port, "GET", "/readyz")
            if ready.status == 200:
                break
            await asyncio.sleep(0.2)
        assert ready.status == 200, ready.body
        resp = await raw_request(served.port, "GET", "/later")
        assert resp.status == 200
        verify_sigv4(
            upstream.last, region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None
        )
        assert await served.stop() == 0
    log = served.log()
    assert "no AWS credentials yet" in log
    assert "credentials for default chain found" in log
    assert "Traceback" not in log


async def test_without_the_flag_missing_credentials_stop_the_start(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigproxy", "serve", "--config", path, "--port", "0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=files_env(tmp_path),
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("sigproxy: error: upstreams[0] (fn): no usable AWS credentials")
    assert "Traceback" not in err.decode()
