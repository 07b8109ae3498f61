"""Adversarial tests of the working-day feature (credentials that follow their source,
refusals retried once and explained, the clock, ``--wait-for-credentials``, ``check
--probe``) against the real ``sigproxy`` process and real loopback servers.

Signatures that reach the fake Function URLs are recomputed with awscrt
(tests/support.py) or checked by the emulator's own verifier, never with sigproxy's
signer. Tests that fail here document a defect found from outside; those that pass pin
behaviour the other tests do not name.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from sigproxy.emulator.config import DEFAULT_ACCOUNT, EmulatorConfig, FunctionConfig
from sigproxy.emulator.server import start_functions, stop_functions
from sigproxy.emulator.sigv4 import Caller

from .conftest import one_upstream
from .support import FakeFunctionUrl, Recorded, raw_request, verify_sigv4
from .test_process import ROOT, serve_process, write
from .test_working_day import files_env, key_of, metric, write_keys

HANDLER = str(Path(__file__).resolve().parents[1] / "examples" / "hello.py") + ":handler"
KEY_A = "AKIDDAYADVERSARY00A1"
SECRET_A = "day-adv-secret-A-never-LOGGED"
KEY_B = "AKIDDAYADVERSARY00B2"
SECRET_B = "day-adv-secret-B-never-LOGGED"
UNRECOGNIZED = b'{"message":"The security token included in the request is invalid."}'


def amz(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


def expired_message(rec: Recorded, ahead: float) -> bytes | None:
    """What a service whose clock is ``ahead`` seconds ahead says of ``rec``'s signature:
    ``None`` when its time is within the five minutes, else the "Signature expired" body."""
    server = time.time() + ahead
    date = rec.header("X-Amz-Date") or ""
    signed = datetime.datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    if abs(signed.timestamp() - server) <= 300:
        return None
    return json.dumps(
        {
            "message": f"Signature expired: {date} is now earlier than "
            f"{amz(server - 300)} ({amz(server)} - 5 min.)"
        }
    ).encode()


def refuse(kind: str, body: bytes = UNRECOGNIZED, status: int = 403) -> web.Response:
    return web.Response(
        status=status,
        body=body,
        content_type="application/json",
        headers={"x-amzn-ErrorType": kind},
    )


def sigproxy_lines(log: str) -> list[str]:
    """The log without the access lines."""
    return [line for line in log.splitlines() if " sigproxy.access: " not in line]


async def wait_for_line(served_lines: list[str], text: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(text in line for line in served_lines):
            return True
        await asyncio.sleep(0.1)
    return False


# --- a raw loopback server: answers exactly the bytes a test gives (no Date of its own) ---


class RawServer:
    """An HTTP/1.1 server on loopback that records each request and answers with the
    bytes ``respond(rec)`` returns: a test decides every header, Date included."""

    def __init__(self, respond: Callable[[Recorded], bytes | list[tuple[bytes, float]]]) -> None:
        self.respond = respond
        self.requests: list[Recorded] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [
                    (k.strip(), v.strip())
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                ]
                length = int({k.lower(): v for k, v in headers}.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                rec = Recorded(method, target, headers, body)
                self.requests.append(rec)
                answer = self.respond(rec)
                for data, delay in [(answer, 0.0)] if isinstance(answer, bytes) else answer:
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(data)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def http(status: int, headers: list[tuple[str, object]], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- credential_process scripts ------------------------------------------------------


def credential_process(tmp_path: Path, key: str = KEY_A, secret: str = SECRET_A) -> Path:
    """A credential_process for [default] that prints ``key``; while the file ``hang``
    exists next to it, it writes its pid to ``hung.pid`` and sleeps a minute instead."""
    script = tmp_path / "cred-process.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{tmp_path}/hang" ]; then echo $$ > "{tmp_path}/hung.pid"; exec sleep 60; fi\n'
        f'echo \'{{"Version": 1, "AccessKeyId": "{key}", '
        f'"SecretAccessKey": "{secret}"}}\'\n'
    )
    script.chmod(0o755)
    (tmp_path / "config").write_text(f"[default]\ncredential_process = {script}\n")
    return script


@contextlib.contextmanager
def reap_hung(tmp_path: Path) -> Iterator[None]:
    """Kill the sleeping credential_process a test left behind (by its pid)."""
    try:
        yield
    finally:
        pid_file = tmp_path / "hung.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)


# === defects ============================================================================


async def test_hanging_credential_process_does_not_hold_a_refused_request(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """The upstream refuses the key; sigproxy resolves the source again, and the
    credential_process hangs (a helper waiting on a prompt, a stuck network call).
    botocore runs it without a timeout. The refused request must still be answered
    (with the upstream's refusal) in bounded time, not held for as long as the helper
    hangs. Today it is held forever, and so is every later refused request."""
    credential_process(tmp_path)
    path = write(tmp_path, one_upstream(upstream.port))
    with reap_hung(tmp_path):
        async with serve_process(path, env=files_env(tmp_path)) as served:
            assert (await raw_request(served.port, "GET", "/ok")).status == 200
            (tmp_path / "hang").write_text("")

            async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
                return refuse("UnrecognizedClientException")

            upstream.answer = answer
            try:
                resp = await asyncio.wait_for(raw_request(served.port, "GET", "/refused"), 10)
            except TimeoutError:
                pytest.fail("a refused request was held >10 s by a hanging credential_process")
            assert resp.status == 403
            assert resp.header("X-Sigproxy-Diagnosis") == "unrecognized-client"
            served.proc.kill()


async def test_sigterm_stops_while_a_credential_process_hangs(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """A config-file change makes sigproxy resolve the chain again (off the loop), and the
    credential_process hangs. SIGTERM must still stop sigproxy within its grace period;
    today the process waits for the hung worker thread and does not exit."""
    credential_process(tmp_path)
    path = write(tmp_path, "grace_period: 1\n" + one_upstream(upstream.port))
    with reap_hung(tmp_path):
        async with serve_process(path, env=files_env(tmp_path)) as served:
            assert (await raw_request(served.port, "GET", "/ok")).status == 200
            (tmp_path / "hang").write_text("")
            with (tmp_path / "config").open("a") as fh:
                fh.write("region = us-east-1\n")  # a changed file: resolve again
            deadline = time.monotonic() + 6
            while not (tmp_path / "hung.pid").exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert (tmp_path / "hung.pid").exists(), "sigproxy did not run the process again"
            served.proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.wait_for(served.proc.wait(), 10)
            except TimeoutError:
                pytest.fail("sigproxy did not exit within 10 s of SIGTERM (grace_period: 1)")
            assert code == 0


async def test_wait_for_credentials_starts_while_a_credential_process_hangs(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """``serve --wait-for-credentials`` promises to start without credentials and say on
    /readyz what is missing. A credential_process that hangs at start must not keep it
    from listening; today no listening line ever comes."""
    credential_process(tmp_path)
    (tmp_path / "hang").write_text("")
    path = write(tmp_path, one_upstream(upstream.port))
    with reap_hung(tmp_path):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sigproxy", "serve", "--config", path, "--port", "0",
            "--wait-for-credentials",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=files_env(tmp_path),
            cwd=ROOT,
        )  # fmt: skip
        assert proc.stderr is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(10):
                while not any("sigproxy listening on" in line for line in lines):
                    raw = await proc.stderr.readline()
                    assert raw, "sigproxy exited:\n" + "".join(lines)
                    lines.append(raw.decode())
        except TimeoutError:
            pytest.fail("no 'listening' within 10 s:\n" + "".join(lines))
        finally:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("case", "process"),
    [
        ("missing-command", "/nonexistent/aws-cred-helper --profile dev"),
        ("not-json", "NOTJSON"),
    ],
)
async def test_a_broken_credential_process_is_one_line_not_a_traceback(
    upstream: FakeFunctionUrl, tmp_path: Path, case: str, process: str
) -> None:
    """A credential_process that does not exist (a typo, a tool not installed) or prints
    something that is not JSON: ``check`` must say so in one line and exit 2 (as for
    every other credential problem), and ``serve --wait-for-credentials`` must start and
    wait. Today both die with a Python traceback (FileNotFoundError, JSONDecodeError)
    and exit 1, because only botocore's own exception types are caught."""
    if process == "NOTJSON":
        script = tmp_path / "notjson.sh"
        script.write_text("#!/bin/sh\necho 'please log in first'\n")
        script.chmod(0o755)
        process = str(script)
    (tmp_path / "config").write_text(f"[default]\ncredential_process = {process}\n")
    path = write(tmp_path, one_upstream(upstream.port))
    env = files_env(tmp_path)
    check = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigproxy", "check", "--offline", "--config", path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(check.communicate(), 30)
    text = err.decode()
    assert "Traceback" not in text, text[-600:]
    assert check.returncode == 2
    assert (
        text.strip()
        .splitlines()[-1]
        .startswith("sigproxy: error: upstreams[0] (fn): no usable AWS credentials")
    )

    async with serve_process(path, "--wait-for-credentials", env=env) as served:
        assert served.admin_port is not None
        ready = await raw_request(served.admin_port, "GET", "/readyz")
        assert ready.status == 503
        assert (
            "credential_process" in ready.body.decode() or "custom-process" in ready.body.decode()
        )
        assert (await raw_request(served.port, "GET", "/x")).status == 503
        assert await served.stop() == 0
    assert "Traceback" not in served.log()


async def test_an_unchanged_credential_failure_is_not_logged_every_poll(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """The credentials file is deleted (or left half-written, or ``aws sso logout`` empties
    the SSO cache) while sigproxy signs with the keys it loaded. It keeps them, rightly;
    but it resolves the whole chain again on every 2 s poll and logs the same WARNING
    each time: 30 lines a minute for as long as the file stays so. The failed stamp is
    never recorded, so nothing settles."""
    write_keys(tmp_path, KEY_A, SECRET_A)
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, env=files_env(tmp_path)) as served:
        assert (await raw_request(served.port, "GET", "/a")).status == 200
        (tmp_path / "credentials").unlink()
        await asyncio.sleep(9)
        resp = await raw_request(served.port, "GET", "/b")
        assert resp.status == 200  # the old keys stay in use
        verify_sigv4(
            upstream.last, region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None
        )
        assert await served.stop() == 0
    failures = [line for line in served.log().splitlines() if "credential refresh failed" in line]
    assert 1 <= len(failures) <= 2, "\n".join(failures)


async def test_credentials_that_cannot_be_refreshed_warn_once_not_every_five_seconds(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Temporary credentials in the environment with AWS_CREDENTIAL_EXPIRATION 9 minutes
    ahead: nothing can refresh them. The README promises one WARNING saying when they
    expire and what to run. Today a 'credential refresh failed' WARNING comes every 5 s
    as well (over a hundred before they expire), pointing at a botocore warning that
    sigproxy itself suppresses."""
    env = files_env(tmp_path)
    expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=9)
    env.update(
        AWS_ACCESS_KEY_ID=KEY_A,
        AWS_SECRET_ACCESS_KEY=SECRET_A,
        AWS_SESSION_TOKEN="day-adv-token-never-LOGGED",
        AWS_CREDENTIAL_EXPIRATION=expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, env=env) as served:
        for _ in range(12):
            assert (await raw_request(served.port, "GET", "/x")).status == 200
            await asyncio.sleep(1)
        verify_sigv4(
            upstream.last,
            region="us-east-1",
            access_key=KEY_A,
            secret_key=SECRET_A,
            token="day-adv-token-never-LOGGED",
        )
        assert await served.stop() == 0
    warnings = [
        line for line in served.log().splitlines() if "WARNING sigproxy.credentials" in line
    ]
    assert sum("expire at" in line for line in warnings) == 1, "\n".join(warnings)
    assert len(warnings) <= 2, "\n".join(warnings)


async def test_an_error_type_with_a_namespace_prefix_is_diagnosed(tmp_path: Path) -> None:
    """AWS error types may carry a Smithy namespace before ``#`` as well as a ``:`` suffix
    (botocore strips both: ``code.split(':', 1)[0].rsplit('#', 1)[-1]``). sigproxy strips
    only the suffix: ``com.amazon.coral.service#UnrecognizedClientException`` gets no
    diagnosis and no retry, and ``check --probe`` calls such a URL ``not-iam``, 'the
    function ran once', which is wrong and alarming."""
    kind = "com.amazon.coral.service#UnrecognizedClientException"

    def respond(rec: Recorded) -> bytes:
        return http(
            403,
            [
                ("x-amzn-ErrorType", kind),
                ("x-amzn-RequestId", "11111111-2222-3333-4444-555555555555"),
                ("Content-Type", "application/json"),
                ("Content-Length", len(UNRECOGNIZED)),
            ],
            UNRECOGNIZED,
        )

    write_keys(tmp_path, KEY_A, SECRET_A)
    env = files_env(tmp_path)
    async with RawServer(respond) as server:
        path = write(tmp_path, one_upstream(server.port))
        async with serve_process(path, env=env) as served:
            resp = await raw_request(served.port, "GET", "/x")
            assert resp.status == 403
            assert resp.body == UNRECOGNIZED
            assert resp.header("X-Sigproxy-Diagnosis") == "unrecognized-client"
            assert await served.stop() == 0
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sigproxy", "check", "--probe", "--config", path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(probe.communicate(), 30)
    row = next(line for line in out.decode().splitlines() if line.startswith("fn "))
    assert "not-iam" not in row and "ran once" not in row, row
    assert "unknown-key" in row, row


async def test_an_upstream_date_that_flaps_does_not_log_a_warning_per_response(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Answers whose Date alternates between right and 2 minutes ahead (two frontends,
    one with a bad clock; a cache replaying answers): each one flips the signing offset
    and writes a WARNING, one per response, unbounded. Refusals are logged once a minute
    per upstream and cause; the skew warnings should be bounded too."""
    n = 0

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        nonlocal n
        n += 1
        when = time.time() + (120 if n % 2 else 0)
        return web.json_response(
            {"n": n}, headers={"Date": email.utils.formatdate(when, usegmt=True)}
        )

    upstream.answer = answer
    write_keys(tmp_path, KEY_A, SECRET_A)
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, env=files_env(tmp_path)) as served:
        for i in range(30):
            assert (await raw_request(served.port, "GET", f"/{i}")).status == 200
        for rec in upstream.requests:
            verify_sigv4(rec, region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None)
        assert await served.stop() == 0
    skew_lines = [
        line for line in served.log().splitlines() if "clock" in line and "WARNING" in line
    ]
    assert len(skew_lines) <= 4, f"{len(skew_lines)} clock warnings for 30 requests"


async def test_a_chunked_signature_expired_refusal_still_corrects_the_clock(tmp_path: Path) -> None:
    """The upstream's clock is 10 minutes ahead and its refusal arrives chunked (as an
    intermediary may re-frame it), with no Date header. The body is small, but sigproxy
    reads a refusal's body only when it has a Content-Length or has fully arrived, so
    it calls this 'invalid-signature', logs advice about keys and regions, and does not
    correct the clock: the client gets 403 where a retry would have given 200."""
    ahead = 600.0

    def respond(rec: Recorded) -> bytes | list[tuple[bytes, float]]:
        msg = expired_message(rec, ahead)
        if msg is None:
            return http(200, [("Content-Length", 2)], b"ok")
        head = http(
            403,
            [("x-amzn-ErrorType", "InvalidSignatureException"), ("Transfer-Encoding", "chunked")],
        )
        return [
            (head, 0.0),
            (f"{len(msg):x}\r\n".encode() + msg + b"\r\n", 0.2),
            (b"0\r\n\r\n", 0.0),
        ]

    write_keys(tmp_path, KEY_A, SECRET_A)
    async with RawServer(respond) as server:
        path = write(tmp_path, one_upstream(server.port))
        async with serve_process(path, env=files_env(tmp_path)) as served:
            resp = await raw_request(served.port, "GET", "/x")
            assert resp.header("X-Sigproxy-Diagnosis") != "invalid-signature"
            assert resp.status == 200, resp.body
            assert await served.stop() == 0


# === behaviour that holds ===============================================================


async def test_a_5mb_post_refused_then_retried_sends_the_identical_body(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """The key is rotated in place (same size and mtime, so the poll cannot see it) and the
    upstream refuses the old one: a 5 MiB POST is sent again with the new key, the same
    bytes both times, and the client gets the function's answer for them."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if key_of(rec) == KEY_A:
            return refuse("UnrecognizedClientException")
        return web.json_response({"sha256": hashlib.sha256(rec.body).hexdigest()})

    upstream.answer = answer
    creds = write_keys(tmp_path, KEY_A, SECRET_A)
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, env=files_env(tmp_path)) as served:
        before = os.stat(creds)
        with open(creds, "r+") as fh:
            text = fh.read().replace(KEY_A, KEY_B).replace(SECRET_A, SECRET_B)
            fh.seek(0)
            fh.write(text)
        os.utime(creds, ns=(before.st_atime_ns, before.st_mtime_ns))
        await asyncio.sleep(2.5)
        body = os.urandom(5 * 1024 * 1024)
        resp = await raw_request(served.port, "POST", "/big?x=1", body=body)
        assert resp.status == 200
        assert json.loads(resp.body) == {"sha256": hashlib.sha256(body).hexdigest()}
        first, second = upstream.requests
        assert first.body == second.body == body
        verify_sigv4(first, region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None)
        verify_sigv4(second, region="us-east-1", access_key=KEY_B, secret_key=SECRET_B, token=None)
        assert await served.stop() == 0
    for secret in (SECRET_A, SECRET_B):
        assert secret not in served.log()


async def test_a_refusal_storm_retries_each_request_once_and_resolves_once(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """100 concurrent POSTs, all refused (UnrecognizedClientException), with a
    credential_process that hands out a new key each run: one resolve for the whole
    storm, each request sent exactly twice, every client gets the refusal with its
    diagnosis; the refusal WARNING is written once."""
    calls = tmp_path / "calls"
    script = tmp_path / "rotating.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'echo x >> "{calls}"\n'
        f'n=$(wc -l < "{calls}" | tr -d " ")\n'
        'echo "{\\"Version\\": 1, \\"AccessKeyId\\": \\"AKIDSTORMKEY0000000$n\\", '
        '\\"SecretAccessKey\\": \\"storm-secret-$n-never-LOGGED\\"}"\n'
    )
    script.chmod(0o755)
    (tmp_path / "config").write_text(f"[default]\ncredential_process = {script}\n")

    # No refusal leaves until all 100 first attempts have arrived: every one of them is
    # signed with the start's key, however the loop schedules the clients (a request
    # signed after the resolve carries the new key, and is rightly not sent again).
    storm_in = asyncio.Event()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if len(upstream.requests) >= 100:
            storm_in.set()
        await asyncio.wait_for(storm_in.wait(), 20)
        return refuse("UnrecognizedClientException")

    upstream.answer = answer
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, env=files_env(tmp_path)) as served:
        answers = await asyncio.gather(
            *(raw_request(served.port, "POST", f"/s{i}", body=b"%d" % i) for i in range(100))
        )
        assert {a.status for a in answers} == {403}
        assert {a.header("X-Sigproxy-Diagnosis") for a in answers} == {"unrecognized-client"}
        assert all(a.body == UNRECOGNIZED for a in answers)
        assert len(upstream.requests) == 200
        assert len(calls.read_text().splitlines()) == 2  # start, and one resolve
        by_key: dict[str, int] = {}
        for rec in upstream.requests:
            by_key[key_of(rec)] = by_key.get(key_of(rec), 0) + 1
        assert by_key == {"AKIDSTORMKEY00000001": 100, "AKIDSTORMKEY00000002": 100}
        verify_sigv4(
            upstream.last,
            region="us-east-1",
            access_key="AKIDSTORMKEY00000002",
            secret_key="storm-secret-2-never-LOGGED",
            token=None,
        )
        # Within the next 5 s nothing new is resolved, and nothing is sent twice.
        await asyncio.gather(*(raw_request(served.port, "GET", f"/t{i}") for i in range(20)))
        assert len(upstream.requests) == 220
        assert len(calls.read_text().splitlines()) == 2
        assert served.admin_port is not None
        assert (
            await metric(
                served.admin_port,
                'sigproxy_upstream_auth_failures_total{reason="unrecognized-client",upstream="fn"}',
            )
            == 220.0
        )
        assert await served.stop() == 0
    log = served.log()
    assert log.count("refused the request (unrecognized-client") == 1
    assert "never-LOGGED" not in log
    assert "Traceback" not in log


async def test_signature_expired_without_a_date_header_is_corrected_from_the_message(
    tmp_path: Path,
) -> None:
    """An upstream 10 minutes ahead that sends no Date header at all: the time in its
    'Signature expired' message is enough to correct the clock and retry once."""
    ahead = 600.0

    def respond(rec: Recorded) -> bytes:
        msg = expired_message(rec, ahead)
        if msg is None:
            return http(200, [("Content-Length", 2)], b"ok")
        return http(
            403,
            [("x-amzn-ErrorType", "InvalidSignatureException"), ("Content-Length", len(msg))],
            msg,
        )

    write_keys(tmp_path, KEY_A, SECRET_A)
    async with RawServer(respond) as server:
        path = write(tmp_path, one_upstream(server.port))
        async with serve_process(path, env=files_env(tmp_path)) as served:
            assert (await raw_request(served.port, "POST", "/a", body=b"1")).status == 200
            assert (await raw_request(served.port, "POST", "/b", body=b"2")).status == 200
            assert [r.body for r in server.requests] == [b"1", b"1", b"2"]
            for rec in server.requests:
                verify_sigv4(
                    rec, region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None
                )
            assert served.admin_port is not None
            skew = await metric(served.admin_port, 'sigproxy_clock_skew_seconds{upstream="fn"}')
            assert skew is not None and 590 <= skew <= 610
            assert await served.stop() == 0


async def test_an_emulator_ten_minutes_behind_keeps_working(tmp_path: Path) -> None:
    """The other way round from test_refusals_e2e: the Function URL's clock is 10
    minutes *behind* ('Signature not yet current'). The client never notices."""
    good = Caller(KEY_A, SECRET_A, DEFAULT_ACCOUNT, f"arn:aws:iam::{DEFAULT_ACCOUNT}:user/adv")
    config = EmulatorConfig(
        region="us-east-1",
        callers=(good,),
        clock_offset=-600,
        functions=(FunctionConfig(name="behind", handler=HANDLER),),
    )
    running = await start_functions(config)
    try:
        write_keys(tmp_path, KEY_A, SECRET_A)
        url = running[0].url
        path = write(
            tmp_path,
            f"admin: {{port: 0}}\nupstreams:\n  - {{name: fn, url: '{url}', region: us-east-1}}\n",
        )
        async with serve_process(path, env=files_env(tmp_path)) as served:
            for i in range(3):
                resp = await raw_request(served.port, "GET", f"/?name=n{i}")
                assert resp.status == 200, resp.body
                assert resp.header("X-Sigproxy-Diagnosis") is None
            assert served.admin_port is not None
            skew = await metric(served.admin_port, 'sigproxy_clock_skew_seconds{upstream="fn"}')
            assert skew is not None and -610 <= skew <= -590
            assert await served.stop() == 0
        assert "not yet current" in served.log()
    finally:
        await stop_functions(running)


async def test_an_upstream_lying_in_its_date_does_not_touch_another_upstreams_clock(
    tmp_path: Path,
) -> None:
    """One upstream answers with a Date in year 9999, another with garbage; a third, the
    emulator with a right clock, keeps being signed with this machine's time."""
    good = Caller(KEY_A, SECRET_A, DEFAULT_ACCOUNT, f"arn:aws:iam::{DEFAULT_ACCOUNT}:user/adv")
    running = await start_functions(
        EmulatorConfig(
            region="us-east-1",
            callers=(good,),
            functions=(FunctionConfig(name="honest", handler=HANDLER),),
        )
    )
    dates = {"future": "Fri, 31 Dec 9999 23:59:59 GMT", "garbage": "yesterday-ish"}

    def liar(which: str) -> Callable[[Recorded], bytes]:
        return lambda rec: http(200, [("Date", dates[which]), ("Content-Length", 2)], b"ok")

    try:
        write_keys(tmp_path, KEY_A, SECRET_A)
        async with RawServer(liar("future")) as future, RawServer(liar("garbage")) as garbage:
            path = write(
                tmp_path,
                "admin: {port: 0}\nupstreams:\n"
                f"  - {{name: honest, url: '{running[0].url}', region: us-east-1, path_prefix: /h}}\n"
                f"  - {{name: future, url: 'http://127.0.0.1:{future.port}', region: us-east-1, path_prefix: /f}}\n"
                f"  - {{name: garbage, url: 'http://127.0.0.1:{garbage.port}', region: us-east-1, path_prefix: /g}}\n",
            )
            async with serve_process(path, env=files_env(tmp_path)) as served:
                for _ in range(2):
                    for prefix in ("/f", "/g", "/h"):
                        resp = await raw_request(served.port, "GET", prefix + "/?name=adv")
                        assert resp.status == 200, (prefix, resp.body)
                assert garbage.requests[-1].header("X-Amz-Date") is not None
                assert (
                    abs(
                        datetime.datetime.strptime(
                            garbage.requests[-1].header("X-Amz-Date") or "", "%Y%m%dT%H%M%SZ"
                        )
                        .replace(tzinfo=datetime.UTC)
                        .timestamp()
                        - time.time()
                    )
                    < 60
                )
                assert (future.requests[-1].header("X-Amz-Date") or "").startswith("9999")
                assert await served.stop() == 0
            assert "Traceback" not in served.log()
    finally:
        await stop_functions(running)


async def test_odd_refusals_keep_status_and_body(tmp_path: Path) -> None:
    """401 instead of 403, a HEAD refusal (length but no body), a 1 MiB refusal body that
    trickles in, a type with a ':' namespace suffix: status and body unchanged, the
    diagnosis added, nothing hangs."""
    big = b'{"message":"' + b"x" * (1 << 20) + b'"}'
    answers: dict[str, bytes | list[tuple[bytes, float]]] = {
        "/401": http(
            401,
            [
                ("x-amzn-ErrorType", "UnrecognizedClientException"),
                ("Content-Length", len(UNRECOGNIZED)),
            ],
            UNRECOGNIZED,
        ),
        "/head": http(403, [("x-amzn-ErrorType", "AccessDeniedException"), ("Content-Length", 24)]),
        "/big": [
            (
                http(
                    403,
                    [("x-amzn-ErrorType", "ExpiredTokenException"), ("Content-Length", len(big))],
                ),
                0.0,
            ),
            (big[:1000], 0.1),
            (big[1000:], 0.1),
        ],
        "/suffix": http(
            403,
            [
                (
                    "x-amzn-ErrorType",
                    "UnrecognizedClientException:http://internal.amazon.com/coral/com.amazon.coral.service/",
                ),
                ("Content-Length", len(UNRECOGNIZED)),
            ],
            UNRECOGNIZED,
        ),
    }
    write_keys(tmp_path, KEY_A, SECRET_A)
    async with RawServer(lambda rec: answers[rec.raw_target]) as server:
        path = write(tmp_path, one_upstream(server.port))
        async with serve_process(path, env=files_env(tmp_path)) as served:
            resp = await asyncio.wait_for(raw_request(served.port, "POST", "/401", body=b"{}"), 10)
            assert (resp.status, resp.body) == (401, UNRECOGNIZED)
            assert resp.header("X-Sigproxy-Diagnosis") == "unrecognized-client"
            resp = await asyncio.wait_for(raw_request(served.port, "GET", "/big"), 10)
            assert (resp.status, resp.body) == (403, big)
            assert resp.header("X-Sigproxy-Diagnosis") == "expired-token"
            resp = await asyncio.wait_for(raw_request(served.port, "GET", "/suffix"), 10)
            assert resp.header("X-Sigproxy-Diagnosis") == "unrecognized-client"
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(
                b"HEAD /head HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /401 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 403")
            assert b"X-Sigproxy-Diagnosis: access-denied" in head
            assert rest.startswith(b"HTTP/1.1 401"), rest[:80]  # no body after the HEAD answer
            for rec in server.requests:
                verify_sigv4(
                    rec, region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None
                )
            assert await served.stop() == 0
    assert "Traceback" not in served.log()


async def test_keys_in_the_config_file_under_aws_profile_follow_edits_and_renames(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Keys under [profile dev] in the config file (not the credentials file), chosen
    with AWS_PROFILE: an edit, then a replacement by rename with the same size and mtime
    (only the inode differs), are each signed with within a few seconds."""

    def profile(n: int) -> str:
        return f"[profile dev]\naws_access_key_id = AKIDCONFIGPROFILE00{n}\naws_secret_access_key = cfg-secret-{n}-never-LOGGED\n"

    (tmp_path / "config").write_text(profile(1))
    env = dict(files_env(tmp_path), AWS_PROFILE="dev")
    path = write(tmp_path, one_upstream(upstream.port))

    async def signed_with(served_port: int, n: int) -> None:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert (await raw_request(served_port, "GET", "/k")).status == 200
            if key_of(upstream.last) == f"AKIDCONFIGPROFILE00{n}":
                break
            await asyncio.sleep(0.2)
        verify_sigv4(
            upstream.last,
            region="us-east-1",
            access_key=f"AKIDCONFIGPROFILE00{n}",
            secret_key=f"cfg-secret-{n}-never-LOGGED",
            token=None,
        )

    async with serve_process(path, env=env) as served:
        await signed_with(served.port, 1)
        (tmp_path / "config").write_text(profile(2))
        await signed_with(served.port, 2)
        st = os.stat(tmp_path / "config")
        (tmp_path / "config.new").write_text(profile(3))
        os.utime(tmp_path / "config.new", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp_path / "config.new", tmp_path / "config")
        await signed_with(served.port, 3)
        assert await served.stop() == 0
    assert "never-LOGGED" not in served.log()


SSO_START = "https://adversary-sso.awsapps.com/start"


async def test_sso_login_while_waiting_serves_without_restart(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """An SSO profile before ``aws sso login``: /readyz and requests say to run
    ``aws sso login --profile dev``. The login (its token cache written atomically, as
    botocore does) is picked up within seconds and requests are signed with the role
    credentials the SSO portal (a loopback fake, AWS_ENDPOINT_URL_SSO) hands out."""
    token = "adv-sso-bearer-never-LOGGED"
    portal_calls: list[str] = []

    async def role_credentials(request: web.Request) -> web.Response:
        portal_calls.append(request.query_string)
        if request.headers.get("x-amz-sso_bearer_token") != token:
            return web.json_response({"message": "Session token not found or invalid"}, status=401)
        return web.json_response(
            {
                "roleCredentials": {
                    "accessKeyId": "ASIAADVSSOROLEKEY001",
                    "secretAccessKey": "adv-sso-secret-never-LOGGED",
                    "sessionToken": "adv-sso-session-never-LOGGED",
                    "expiration": int((time.time() + 3600) * 1000),
                }
            }
        )

    app = web.Application()
    app.router.add_get("/federation/credentials", role_credentials)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        (tmp_path / "config").write_text(
            f"[profile dev]\nsso_start_url = {SSO_START}\nsso_region = us-east-1\n"
            "sso_account_id = 123456789012\nsso_role_name = Invoke\nregion = us-east-1\n"
        )
        env = dict(
            files_env(tmp_path),
            AWS_ENDPOINT_URL_SSO=f"http://127.0.0.1:{runner.addresses[0][1]}",
        )
        path = write(tmp_path, one_upstream(upstream.port, credentials="{profile: dev}"))
        async with serve_process(path, "--wait-for-credentials", env=env) as served:
            assert served.admin_port is not None
            ready = await raw_request(served.admin_port, "GET", "/readyz")
            assert ready.status == 503
            assert "aws sso login --profile dev" in ready.body.decode()
            resp = await raw_request(served.port, "GET", "/early")
            assert resp.status == 503
            assert "aws sso login --profile dev" in json.loads(resp.body)["message"]

            cache = tmp_path / ".aws" / "sso" / "cache"
            cache.mkdir(parents=True)
            expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=8)
            temp = cache / "login.tmp"
            temp.write_text(
                json.dumps(
                    {
                        "startUrl": SSO_START,
                        "region": "us-east-1",
                        "accessToken": token,
                        "expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                )
            )
            os.replace(
                temp,
                cache
                / (hashlib.sha1(SSO_START.encode(), usedforsecurity=False).hexdigest() + ".json"),
            )
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                if (await raw_request(served.admin_port, "GET", "/readyz")).status == 200:
                    break
                await asyncio.sleep(0.2)
            resp = await raw_request(served.port, "GET", "/later")
            assert resp.status == 200
            verify_sigv4(
                upstream.last,
                region="us-east-1",
                access_key="ASIAADVSSOROLEKEY001",
                secret_key="adv-sso-secret-never-LOGGED",
                token="adv-sso-session-never-LOGGED",
            )
            expiry = await metric(
                served.admin_port, 'sigproxy_credentials_expiry_seconds{upstream="fn"}'
            )
            assert expiry is not None and 3500 < expiry <= 3600
            assert await served.stop() == 0
        assert portal_calls == ["role_name=Invoke&account_id=123456789012"]
        log = served.log()
        assert "credentials for profile dev found" in log
        assert "never-LOGGED" not in log
    finally:
        await runner.cleanup()


async def test_wait_for_credentials_with_two_workers_and_a_reload(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """``--workers 2 --wait-for-credentials``, a SIGHUP while both still wait: each worker
    answers 503 until a key is written, then every request is signed with it."""
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(
        path, "--wait-for-credentials", "--workers", "2", env=files_env(tmp_path)
    ) as served:
        assert served.admin_port is not None
        assert {(await raw_request(served.port, "GET", "/x")).status for _ in range(6)} == {503}
        served.proc.send_signal(signal.SIGHUP)
        assert await wait_for_line(served.stderr, "config reloaded", 5)
        assert (await raw_request(served.admin_port, "GET", "/readyz")).status == 503
        write_keys(tmp_path, KEY_A, SECRET_A)
        deadline = time.monotonic() + 10
        statuses: set[int] = set()
        while time.monotonic() < deadline:
            statuses = {(await raw_request(served.port, "GET", "/y")).status for _ in range(8)}
            if statuses == {200}:
                break
            await asyncio.sleep(0.3)
        assert statuses == {200}
        statuses = {(await raw_request(served.port, "GET", "/z")).status for _ in range(8)}
        assert statuses == {200}
        for rec in upstream.requests:
            verify_sigv4(rec, region="us-east-1", access_key=KEY_A, secret_key=SECRET_A, token=None)
        assert await served.stop() == 0
    assert SECRET_A not in served.log()
