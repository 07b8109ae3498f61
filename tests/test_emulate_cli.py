"""``sigproxy emulate`` as a real process: handlers served as local Function URLs, with
AWS_IAM checked against keys from the environment or the config, and its errors."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from awscrt import auth as crt_auth
from awscrt import http as crt_http

from .support import (
    ACCESS_KEY,
    SECRET_KEY,
    SESSION_TOKEN,
    RawResponse,
    drain_lines,
    raw_request,
    stop_process,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HELLO = "examples/hello.py:handler"


def creds_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_SESSION_TOKEN=SESSION_TOKEN,
        PYTHONUNBUFFERED="1",
    )
    return env


def plain_env() -> dict[str, str]:
    # The autouse aws_env fixture has removed every AWS credential from os.environ.
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Function:
    name: str
    url: str
    auth: str
    handler: str

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


@dataclass
class Emulated:
    proc: asyncio.subprocess.Process
    functions: dict[str, Function]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    drains: list[asyncio.Task[None]] = field(default_factory=list)

    def log(self) -> str:
        return "".join(self.stderr)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        return await stop_process(self.proc, self.drains, sig)


@contextlib.asynccontextmanager
async def emulate(*args: str, env: dict[str, str], count: int = 1) -> AsyncIterator[Emulated]:
    """Start ``sigproxy emulate ARGS`` and read its ``count`` function lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigproxy", "emulate", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    running = Emulated(proc, {})
    running.drains.append(asyncio.create_task(drain_lines(proc.stderr, running.stderr)))
    try:
        async with asyncio.timeout(30):
            while len(running.functions) < count:
                raw = await proc.stdout.readline()
                if not raw:
                    await proc.wait()
                    await asyncio.gather(*running.drains)
                    raise AssertionError(
                        f"emulate exited ({proc.returncode}) before listing its functions:\n"
                        + running.log()
                    )
                text = raw.decode()
                running.stdout.append(text)
                fields = text.rstrip("\n").split("\t")
                assert len(fields) == 4, f"not name<TAB>url<TAB>auth<TAB>handler: {text!r}"
                fn = Function(*fields)
                assert re.fullmatch(r"http://127\.0\.0\.1:\d+", fn.url), fn.url
                running.functions[fn.name] = fn
        running.drains.append(asyncio.create_task(drain_lines(proc.stdout, running.stdout)))
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for task in running.drains:
            task.cancel()
        await asyncio.gather(*running.drains, return_exceptions=True)


def sign(
    method: str,
    fn: Function,
    target: str,
    body: bytes = b"",
    *,
    region: str = "us-east-1",
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    token: str | None = SESSION_TOKEN,
) -> list[tuple[str, str]]:
    """SigV4 headers for a request to ``fn`` (service lambda), from AWS's C signer."""
    request = crt_http.HttpRequest(method, target, crt_http.HttpHeaders([("host", fn.host)]))
    config = crt_auth.AwsSigningConfig(
        algorithm=crt_auth.AwsSigningAlgorithm.V4,
        signature_type=crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
        credentials_provider=crt_auth.AwsCredentialsProvider.new_static(
            access_key, secret_key, token
        ),
        region=region,
        service="lambda",
        date=datetime.datetime.now(datetime.UTC),
        signed_body_value=hashlib.sha256(body).hexdigest(),
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
        use_double_uri_encode=True,
        should_normalize_uri_path=True,
    )
    crt_auth.aws_sign_request(request, config).result(timeout=10)
    return [(k, v) for k, v in request.headers if k.lower() != "host"]


async def call(
    fn: Function,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
) -> RawResponse:
    return await raw_request(fn.port, method, target, headers, body, host=fn.host)


def body_json(resp: RawResponse) -> object:
    return json.loads(resp.body)


# --- one handler from flags ---------------------------------------------------------------


async def test_auth_none_serves_unsigned_requests_and_stops_on_sigterm() -> None:
    async with emulate("--handler", HELLO, "--auth", "NONE", "--port", "0", env=plain_env()) as emu:
        assert list(emu.functions) == ["hello"]
        fn = emu.functions["hello"]
        assert (fn.auth, fn.handler) == ("NONE", HELLO)
        async with aiohttp.ClientSession() as session, session.get(fn.url + "/?name=Ann") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            assert re.fullmatch(r"[0-9a-f-]{36}", resp.headers["x-amzn-RequestId"])
            assert await resp.json() == {"message": "Hello, Ann!"}
        missing = await call(fn, "GET", "/")
        assert missing.status == 400
        assert await emu.stop(signal.SIGTERM) == 0
    assert "Traceback" not in emu.log(), emu.log()
    assert "START RequestId:" in emu.log() and "REPORT RequestId:" in emu.log()


async def test_aws_iam_checks_signatures_with_the_environment_keys() -> None:
    async with emulate("--handler", HELLO, env=creds_env()) as emu:
        fn = emu.functions["hello"]
        assert fn.auth == "AWS_IAM"

        unsigned = await call(fn, "GET", "/?name=Ann")
        assert unsigned.status == 403
        assert body_json(unsigned) == {"Message": "Forbidden"}

        signed = await call(fn, "GET", "/?name=Ann", sign("GET", fn, "/?name=Ann"))
        assert signed.status == 200, signed.body
        assert body_json(signed) == {"message": "Hello, Ann!"}

        # The 200 above is not vacuous: the wrong secret, region or a missing token fail.
        for wrong in (
            sign("GET", fn, "/?name=Ann", secret_key="not-the-secret"),
            sign("GET", fn, "/?name=Ann", region="eu-west-1"),
            sign("GET", fn, "/?name=Ann", token=None),
            sign("GET", fn, "/?name=Bob"),  # signed for another query
        ):
            resp = await call(fn, "GET", "/?name=Ann", wrong)
            assert resp.status == 403, resp.body
            assert resp.header("x-amzn-ErrorType") in (
                "InvalidSignatureException",
                "UnrecognizedClientException",
            )

        assert await emu.stop() == 0
    log = emu.log()
    assert "Traceback" not in log
    assert SECRET_KEY not in log and SESSION_TOKEN not in log


async def test_a_real_sigproxy_in_front_of_the_emulator(tmp_path: Path) -> None:
    """The local dev setup: ``sigproxy serve`` signing with the same environment keys
    the emulated AWS_IAM function accepts."""
    async with emulate("--handler", HELLO, env=creds_env()) as emu:
        fn = emu.functions["hello"]
        config = tmp_path / "sigproxy.yaml"
        config.write_text(
            f"upstreams:\n  - {{name: hello, url: '{fn.url}', path_prefix: /hello, "
            "region: us-east-1}\n"
        )
        proxy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sigproxy", "serve", "--config", str(config), "--port", "0",
            "--admin-port", "0",  # whatever else listens on 9090 here
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=creds_env(),
            cwd=ROOT,
        )  # fmt: skip
        assert proxy.stderr is not None
        proxy_log: list[str] = []
        drain: asyncio.Task[None] | None = None
        try:
            port = None
            async with asyncio.timeout(30):
                while port is None:
                    raw = await proxy.stderr.readline()
                    assert raw, "sigproxy exited before listening:\n" + "".join(proxy_log)
                    proxy_log.append(raw.decode())
                    m = re.search(r"sigproxy listening on http://127\.0\.0\.1:(\d+)", proxy_log[-1])
                    port = int(m.group(1)) if m else None
            drain = asyncio.create_task(drain_lines(proxy.stderr, proxy_log))
            url = f"http://127.0.0.1:{port}/hello"
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "?name=Ann") as resp:
                    assert resp.status == 200
                    assert await resp.json() == {"message": "Hello, Ann!"}
                async with session.get(url + "/?name=Ann%20Lee&x=a+b") as resp:
                    assert resp.status == 200
                    assert await resp.json() == {"message": "Hello, Ann Lee!"}
            proxy.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proxy.wait(), 20) == 0
            await asyncio.wait_for(drain, 5)
        finally:
            if proxy.returncode is None:
                proxy.kill()
                await proxy.wait()
            if drain is not None and not drain.done():
                drain.cancel()
        assert await emu.stop() == 0
    assert "Traceback" not in "".join(proxy_log) + emu.log()
    assert ": 403 for " not in emu.log()


# --- a config file --------------------------------------------------------------------------

CONFIG_CALLER_KEY = "AKIDEMULATORCONFIG01"
CONFIG_CALLER_SECRET = "cfg-secret-9d1e7a"
ALICE = "arn:aws:iam::123456789012:user/alice"


def write_config(tmp_path: Path) -> Path:
    """An emulator section with two example handlers copied next to the config file, so
    their relative paths resolve from the file's folder, not the working directory."""
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    for name in ("router.py", "hello.py"):
        shutil.copy(EXAMPLES / name, handlers / name)
    path = tmp_path / "emulator.yaml"
    path.write_text(
        f"""\
emulator:
  region: eu-west-1
  callers:
    - access_key_id: {CONFIG_CALLER_KEY}
      secret_access_key: {CONFIG_CALLER_SECRET}
      user_arn: {ALICE}
  functions:
    - name: api
      handler: handlers/router.py:handler
      auth: AWS_IAM
      cors:
        allow_origins: ['https://app.example']
        allow_methods: [GET, POST]
        allow_headers: [Content-Type]
        max_age: 60
    - name: greet
      handler: handlers/hello.py:handler
      auth: NONE
      cors:
        allow_origins: ['*']
"""
    )
    return path


async def test_config_file_serves_every_function(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    async with emulate("--config", str(path), env=plain_env(), count=2) as emu:
        api, greet = emu.functions["api"], emu.functions["greet"]
        assert (api.auth, api.handler) == ("AWS_IAM", "handlers/router.py:handler")
        assert (greet.auth, greet.handler) == ("NONE", "handlers/hello.py:handler")
        assert api.port != greet.port

        # NONE: unsigned requests are invoked; CORS "*" answers any origin.
        resp = await call(greet, "GET", "/?name=Ann", [("Origin", "https://x.example")])
        assert resp.status == 200
        assert body_json(resp) == {"message": "Hello, Ann!"}
        assert resp.header("Access-Control-Allow-Origin") == "*"

        # AWS_IAM: unsigned is refused ...
        body = b'{"order": 7}'
        json_type = ("Content-Type", "application/json")
        resp = await call(api, "POST", "/process", [json_type], body)
        assert resp.status == 403
        assert body_json(resp) == {"Message": "Forbidden"}

        # ... signed with the configured caller, for the configured region, is accepted
        # and the function sees who called.
        def signed(region: str) -> list[tuple[str, str]]:
            return sign(
                "POST",
                api,
                "/process",
                body,
                region=region,
                access_key=CONFIG_CALLER_KEY,
                secret_key=CONFIG_CALLER_SECRET,
                token=None,
            )

        resp = await call(
            api,
            "POST",
            "/process",
            [json_type, ("Origin", "https://app.example")] + signed("eu-west-1"),
            body,
        )
        assert resp.status == 200, resp.body
        payload = body_json(resp)
        assert isinstance(payload, dict)
        assert payload["processed"] == {"order": 7}
        assert payload["caller"] == {
            "userArn": ALICE,
            "accountId": "123456789012",
            "accessKey": CONFIG_CALLER_KEY,
        }
        assert resp.header("Access-Control-Allow-Origin") == "https://app.example"

        # The environment's keys are not callers of a config-file emulator, and a
        # signature for another region is refused.
        resp = await call(
            api, "POST", "/process", [json_type] + sign("POST", api, "/process", body), body
        )
        assert resp.status == 403
        resp = await call(api, "POST", "/process", [json_type] + signed("us-east-1"), body)
        assert resp.status == 403

        # A CORS preflight is answered by the URL itself, before auth.
        resp = await call(
            api,
            "OPTIONS",
            "/process",
            [("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST")],
        )
        assert resp.status == 200
        assert resp.header("Access-Control-Allow-Origin") == "https://app.example"
        assert resp.header("Access-Control-Allow-Methods") == "GET,POST"
        assert resp.header("Access-Control-Allow-Headers") == "content-type"
        assert resp.header("Access-Control-Max-Age") == "60"
        resp = await call(
            api,
            "OPTIONS",
            "/process",
            [("Origin", "https://evil.example"), ("Access-Control-Request-Method", "POST")],
        )
        assert resp.header("Access-Control-Allow-Origin") is None

        assert await emu.stop() == 0
    assert "Traceback" not in emu.log()
    assert CONFIG_CALLER_SECRET not in emu.log()


# --- errors ---------------------------------------------------------------------------------


def run_emulate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sigproxy", "emulate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        cwd=ROOT,
        check=False,
    )


def _raising_module(tmp_path: Path) -> tuple[list[str], str]:
    module = tmp_path / "boom.py"
    module.write_text(
        "def handler(event, context):\n    return 1\n\nraise RuntimeError('boom at import')\n"
    )
    return (
        ["--handler", f"{module}:handler", "--auth", "NONE"],
        r"importing .*boom\.py failed: RuntimeError\('boom at import'\)",
    )


def _no_emulator_section(tmp_path: Path) -> tuple[list[str], str]:
    path = tmp_path / "proxy-only.yaml"
    path.write_text("upstreams:\n  - {name: a, url: 'https://a.lambda-url.us-east-1.on.aws'}\n")
    return ["--config", str(path)], re.escape(f"{path}: emulator: ") + ".*no emulator section"


def _unknown_function_key(tmp_path: Path) -> tuple[list[str], str]:
    path = tmp_path / "colour.yaml"
    path.write_text(
        "emulator:\n"
        "  functions:\n"
        f"    - {{name: hello, handler: '{EXAMPLES / 'hello.py'}:handler', auth: NONE, colour: red}}\n"
    )
    return ["--config", str(path)], re.escape(f"{path}: emulator.functions[0].colour: unknown key")


ErrorCase = Callable[[Path], tuple[list[str], str]]

ERROR_CASES: dict[str, ErrorCase] = {
    "missing handler file": lambda _: (
        ["--handler", "examples/missing.py:handler", "--auth", "NONE"],
        r"cannot load handler: .*no such file .*examples/missing\.py",
    ),
    "handler without colon": lambda _: (
        ["--handler", "examples/hello.py", "--auth", "NONE"],
        r"'examples/hello\.py'.* must be 'module:function' or 'path/to/file\.py:function'",
    ),
    "module raises on import": _raising_module,
    "AWS_IAM without keys": lambda _: (
        ["--handler", HELLO, "--auth", "AWS_IAM"],
        r"--auth: AWS_IAM needs the caller's keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    ),
    "config without emulator section": _no_emulator_section,
    "unknown key in a function": _unknown_function_key,
    "neither config nor handler": lambda _: ([], r"give --config FILE"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_exit_2_with_one_line(tmp_path: Path, case: str) -> None:
    args, expected = ERROR_CASES[case](tmp_path)
    result = run_emulate(*args, env=plain_env())
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sigproxy: error: "), lines[0]
    assert re.search(expected, lines[0]), lines[0]


def test_port_taken_exits_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_emulate(
            "--handler", HELLO, "--auth", "NONE", "--port", str(port), env=plain_env()
        )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sigproxy: error: cannot listen"), lines[0]
    assert "Traceback" not in result.stderr


def test_port_out_of_range_exits_2() -> None:
    result = run_emulate("--handler", HELLO, "--auth", "NONE", "--port", "70000", env=plain_env())
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sigproxy: error: "), result.stderr
