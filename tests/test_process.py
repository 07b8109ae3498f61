"""The real ``sigproxy`` process: CLI exit codes and messages, serving, SIGTERM, memory
while a 64 MiB response streams through, and secrets kept out of its logs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .conftest import FakeSts, one_upstream
from .support import (
    ACCESS_KEY,
    SECRET_KEY,
    SESSION_TOKEN,
    FakeFunctionUrl,
    Recorded,
    raw_request,
    verify_sigv4,
)

ROOT = Path(__file__).resolve().parent.parent


def creds_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_SESSION_TOKEN=SESSION_TOKEN,
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if args and args[0] == "check" and "--offline" not in args and "--probe" not in args:
        # No DNS lookups of the tests' made-up Function URL hosts: nothing leaves loopback.
        # (--probe tests name loopback upstreams, and --probe refuses --offline.)
        args = (*args, "--offline")
    return subprocess.run(
        [sys.executable, "-m", "sigproxy", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else dict(os.environ),
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def write(tmp_path: Path, text: str, name: str = "sigproxy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_check_prints_route_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "upstreams:\n"
        "  - {name: orders, url: 'https://abc.lambda-url.eu-west-1.on.aws/v1', path_prefix: /orders}\n"
        "  - {name: open, url: 'https://def.lambda-url.us-east-1.on.aws', auth: none, host: open.localhost}\n",
    )
    result = run_cli("check", "--config", path, env=creds_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "PREFIX",
        "HOST",
        "UPSTREAM",
        "URL",
        "REGION",
        "SERVICE",
        "AUTH",
        "CREDENTIALS",
    ]
    assert lines[1].split() == [
        "/orders", "*", "orders", "https://abc.lambda-url.eu-west-1.on.aws/v1", "eu-west-1",
        "lambda", "aws_iam", "default", "chain", "(env)",
    ]  # fmt: skip
    assert lines[2].split() == [
        "/", "open.localhost", "open", "https://def.lambda-url.us-east-1.on.aws", "us-east-1",
        "lambda", "none", "-",
    ]  # fmt: skip
    assert lines[3] == f"config OK: {path}, 2 upstream(s)"
    assert SECRET_KEY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, r"no config file .*missing\.yaml \(give --config PATH"),
        ("upstreams: [", r"invalid YAML: line 1"),
        (
            "upstreams:\n  - {name: a, url: 'http://10.1.2.3'}\n",
            r"upstreams\[0\]\.url: plain http:// is only allowed",
        ),
        (
            "upstreams:\n  - {name: a, url: 'https://example.com'}\n",
            r"upstreams\[0\]\.region: is required",
        ),
        (
            "upstreams:\n  - {name: a, url: 'https://a.lambda-url.us-east-1.on.aws', retry: 3}\n",
            r"upstreams\[0\]\.retry: unknown key \(did you mean 'retries'\?\)",
        ),
    ],
)
@pytest.mark.parametrize("command", ["check", "serve"])
def test_config_errors_exit_2_with_one_line(
    tmp_path: Path, text: str | None, expected: str, command: str
) -> None:
    path = str(tmp_path / "missing.yaml") if text is None else write(tmp_path, text)
    result = run_cli(command, "--config", path, env=creds_env())
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sigproxy: error: {path}: ")
    assert re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["check", "serve"])
def test_no_credentials_exit_2(tmp_path: Path, command: str) -> None:
    path = write(
        tmp_path, "upstreams:\n  - {name: orders, url: 'https://abc.lambda-url.eu-west-1.on.aws'}\n"
    )
    result = run_cli(command, "--config", path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "sigproxy: error: upstreams[0] (orders): no usable AWS credentials from default chain: "
        "none found (looked in the environment, shared credentials and config files, SSO, "
        "container and instance metadata; set AWS_PROFILE or credentials.profile, or run aws "
        "configure)"
    )


def test_version_and_console_script() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("sigproxy ")
    script = Path(sys.executable).parent / "sigproxy"
    assert script.exists(), "console script not installed (pip install -e .)"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 0
    assert "serve" in result.stdout and "check" in result.stdout


def test_usage_error_exits_2() -> None:
    result = run_cli("serve", "--port", "notaport")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


# --- a served process -------------------------------------------------------------------


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    port: int
    stderr: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None
    admin_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.stderr)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 20)
        if self.drain is not None:
            await asyncio.wait_for(self.drain, 5)
        return code


@contextlib.asynccontextmanager
async def serve_process(
    config_path: str, *args: str, env: dict[str, str] | None = None, scheme: str = "http"
) -> AsyncIterator[Served]:
    """Run ``sigproxy serve`` until it has logged that it listens (proxy, and admin when
    the config has it on), draining its stderr into ``Served.stderr``. ``scheme`` is the
    proxy listener's (https with listen.tls); the admin listener is always http."""
    with open(config_path) as fh:
        expect_admin = "admin: false" not in fh.read()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigproxy", "serve", "--config", config_path, "--port", "0", *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else creds_env(),
        cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    port = admin_port = None
    try:
        while port is None or (expect_admin and admin_port is None):
            raw = await asyncio.wait_for(proc.stderr.readline(), 30)
            if not raw:
                raise AssertionError("sigproxy exited before listening:\n" + "".join(lines))
            line = raw.decode()
            lines.append(line)
            # Any address (0.0.0.0, [::]): the tests connect to 127.0.0.1 all the same.
            m = re.search(
                r"(sigproxy|admin) listening on (https?)://(?:\[[^\]]*\]|[^/:]+):(\d+)", line
            )
            if m and m.group(1) == "sigproxy":
                assert m.group(2) == scheme, line
                port = int(m.group(3))
            elif m:
                assert m.group(2) == "http", line  # the admin listener stays plain
                admin_port = int(m.group(3))
        served = Served(proc, port, lines, admin_port=admin_port)

        async def drain() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                lines.append(raw.decode())

        served.drain = asyncio.create_task(drain())
        yield served
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        # Into the run's log file too, where .ci/run greps for secrets.
        logging.getLogger("tests.sigproxy-process").debug("stderr:\n%s", "".join(lines))


async def test_serve_signs_and_stops_on_sigterm(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        resp = await raw_request(served.port, "POST", "/hello?name=John", body=b'{"a": 1}')
        assert resp.status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop(signal.SIGTERM) == 0
    log = served.log()
    assert "stopped" in log
    assert "Traceback" not in log


def profile_dev(tmp_path: Path, aws_config: str) -> tuple[str, dict[str, str]]:
    """A sigproxy config whose upstream signs with profile dev, defined by ``aws_config``,
    and an environment with no other credentials: (config path, environment)."""
    (tmp_path / "aws-config").write_text(aws_config)
    path = write(
        tmp_path,
        "upstreams:\n  - {name: fn, url: 'http://127.0.0.1:9', region: us-east-1,"
        " credentials: {profile: dev}}\n",
    )
    env = dict(creds_env(), AWS_CONFIG_FILE=str(tmp_path / "aws-config"), HOME=str(tmp_path))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    return path, env


def test_aws_login_profile_is_read_by_botocore_as_it_is(tmp_path: Path) -> None:
    """A profile made by `aws login` (login_session) needs botocore's login provider,
    which needs awscrt when it is installed (the test extra installs it): the command
    must leave botocore's imports alone, so the error is the login's own next step, not
    a missing dependency."""
    path, env = profile_dev(
        tmp_path, "[profile dev]\nlogin_session = arn:aws:iam::123456789012:user/dev\n"
    )
    result = run_cli("check", "--config", path, env=env)
    assert result.returncode == 2
    assert "botocore[crt]" not in result.stderr
    assert "aws login" in result.stderr
    assert "Traceback" not in result.stderr


async def test_sigterm_lets_a_request_in_flight_finish(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        arrived.set()
        await asyncio.wait_for(release.wait(), 20)
        return web.Response(text="finished")

    upstream.answer = answer
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        pending = asyncio.create_task(raw_request(served.port, "GET", "/slow"))
        await asyncio.wait_for(arrived.wait(), 10)
        served.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert served.proc.returncode is None  # still draining
        release.set()
        resp = await asyncio.wait_for(pending, 10)
        assert (resp.status, resp.body) == (200, b"finished")
        assert await served.stop() == 0


async def test_open_files_limit_is_raised_to_the_hard_limit(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Under systemd's default soft limit of 1,024 files, 1,024 clients each holding an
    upstream connection would run out of descriptors: serve raises it to the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit is too low to see a change")
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the child
    try:
        path = write(tmp_path, one_upstream(upstream.port))
        async with serve_process(path) as served:
            limits = Path(f"/proc/{served.proc.pid}/limits").read_text()
            (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
            child_soft, child_hard = line.split()[3:5]
            assert child_soft == child_hard != "256", line
            assert await served.stop() == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


async def test_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(tmp_path, one_upstream(1))
        result = await asyncio.to_thread(
            run_cli, "serve", "--config", path, "--port", str(port), env=creds_env()
        )
    assert result.returncode == 2
    assert f"sigproxy: error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_admin_port_in_use_names_the_admin_listener(tmp_path: Path, workers: str) -> None:
    """A busy admin port (Prometheus's own default, 9090, often is) says which listener
    could not open and what to do, and nothing claims to be listening first."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(
            tmp_path, one_upstream(1).replace("admin: {port: 0}", f"admin: {{port: {port}}}")
        )
        result = await asyncio.to_thread(
            run_cli, "serve", "--config", path, "--port", "0", "--workers", workers, env=creds_env()
        )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [
        f"sigproxy: error: cannot listen on 127.0.0.1:{port} for the admin listener: Address "
        "already in use (set admin.port, --admin-port 0 for any free port, or admin: false)"
    ]
    assert "listening on" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_admin_port_flag(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    """--admin-port moves the admin listener (0: any free port, logged); with admin: false
    it is an error that says so."""
    path = write(tmp_path, one_upstream(upstream.port).replace("admin: {port: 0}\n", ""))
    async with serve_process(path, "--admin-port", "0") as served:
        assert served.admin_port not in (None, 9090)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{served.admin_port}/healthz") as resp:
                assert resp.status == 200
        assert await served.stop() == 0
    off = write(
        tmp_path,
        "admin: false\n" + one_upstream(upstream.port).replace("admin: {port: 0}\n", ""),
        "off.yaml",
    )
    result = run_cli("serve", "--config", off, "--admin-port", "0", env=creds_env())
    assert result.returncode == 2
    assert "--admin-port: the admin listener is off" in result.stderr


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert m
    return int(m.group(1))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_64_mib_response_keeps_memory_bounded(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    chunk = os.urandom(1 << 20)
    total = 64

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.raw_target != "/big":
            return web.Response(text="small")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = total * len(chunk)
        await resp.prepare(request)
        for _ in range(total):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    upstream.answer = answer
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        # Warm up so imports and pools are counted in the baseline.
        for _ in range(3):
            assert (await raw_request(served.port, "GET", "/warm")).status == 200
        before = peak_rss_kib(served.proc.pid)
        digest = hashlib.sha256()
        received = 0
        async with aiohttp.ClientSession() as session, session.get(served.url + "/big") as resp:
            assert resp.status == 200
            async for data in resp.content.iter_chunked(1 << 16):
                digest.update(data)
                received += len(data)
                await asyncio.sleep(0)  # a client reading at its own pace
        after = peak_rss_kib(served.proc.pid)
        assert received == total * len(chunk)
        assert digest.hexdigest() == hashlib.sha256(chunk * total).hexdigest()
        growth_mib = (after - before) / 1024
        # Whole-response buffering would add >= 64 MiB; streaming adds socket buffers only.
        assert growth_mib < 16, f"peak RSS grew {growth_mib:.1f} MiB while streaming 64 MiB"
        assert await served.stop() == 0


async def test_secrets_never_reach_logs_even_at_debug(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    path = write(tmp_path, one_upstream(upstream.port, max_body_bytes=10))
    async with serve_process(path, "--log-level", "debug") as served:
        resp = await raw_request(
            served.port,
            "POST",
            "/login?password=hunter2-query-value&token=qv-77",
            [("Cookie", "session=cookie-value-abc"), ("Authorization", "Bearer client-bearer-xyz")],
            b'{"a":1}',
        )
        assert resp.status == 200
        sent_signature = (upstream.last.header("Authorization") or "").split("Signature=")[1]
        too_big = await raw_request(served.port, "POST", "/x?secret=qv-88", body=b"y" * 100)
        assert too_big.status == 413
        missing = await raw_request(served.port, "GET", "/bad%zz?k=qv-99")
        assert missing.status == 400
        # A request line aiohttp's parser refuses: its error text quotes the whole line.
        refused = await raw_request(served.port, "GET", "/café?api_key=qv-111".encode())
        assert refused.status == 400
        assert await served.stop() == 0
    log = served.log()
    assert "POST /login" in log  # the access log line is there, without its query
    assert "Invalid char in url path" in log  # the refused line is logged, redacted
    for secret in (
        SECRET_KEY,
        SESSION_TOKEN,
        sent_signature,
        "hunter2-query-value",
        "qv-77",
        "qv-88",
        "qv-99",
        "qv-111",
        "cookie-value-abc",
        "client-bearer-xyz",
    ):
        assert secret not in log, f"{secret!r} leaked into the log"


def test_the_readme_synopsis_lists_every_flag_and_every_command_describes_itself() -> None:
    """The README's command synopsis names every flag each subcommand has (the hidden
    worker flag aside), and each subcommand's --help has a description line."""
    import argparse

    from sigproxy.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    synopsis = readme.split("## Command line", 1)[1].split("```", 2)[1]
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        assert command.description, f"sigproxy {name} --help has no description"
        lines = [line for line in synopsis.splitlines() if f"sigproxy {name}" in line]
        assert lines, f"no synopsis line for sigproxy {name}"
        text = synopsis[synopsis.index(lines[0]) :].split("\nsigproxy ", 1)[0]
        for action in command._actions:
            if action.help == argparse.SUPPRESS or not action.option_strings:
                continue
            long = max(action.option_strings, key=len)
            if long == "--help":
                continue
            assert long in text, f"sigproxy {name} {long} is not in the README synopsis"


# --- credential failures: one line, the next step, no botocore traceback ----------------


def test_sso_profile_not_logged_in_is_one_line_naming_aws_sso_login(tmp_path: Path) -> None:
    path, env = profile_dev(
        tmp_path,
        "[profile dev]\nsso_session = corp\nsso_account_id = 123456789012\n"
        "sso_role_name = invoke\nregion = us-east-1\n"
        "[sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\n"
        "sso_region = us-east-1\n",
    )
    for command in ("check", "serve"):
        result = run_cli(command, "--config", path, env=env)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr  # one line, nothing before it
        assert result.stderr.rstrip().endswith("(run: aws sso login --profile dev)")
        assert "Traceback" not in result.stderr


async def test_a_refused_assume_role_is_one_line_naming_the_trust_policy(
    sts: FakeSts, tmp_path: Path
) -> None:
    sts.fail = True
    role = "arn:aws:iam::123456789012:role/invoke"
    path = write(tmp_path, one_upstream(1, credentials=f"{{role_arn: '{role}'}}"))
    result = await asyncio.to_thread(run_cli, "check", "--config", path, env=creds_env())
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "not authorized to assume role" in result.stderr
    assert f"the trust policy of {role} must allow" in result.stderr
    assert "Traceback" not in result.stderr


def _others_can_run(path: str) -> bool:
    """Whether a user who is neither owner nor group can execute ``path`` (every folder
    above it searchable by others)."""
    current = Path(path).resolve()
    for folder in current.parents:
        if not folder.stat().st_mode & 0o001:
            return False
    return bool(current.stat().st_mode & 0o001)


@pytest.mark.skipif(
    os.getuid() != 0 or not _others_can_run(sys.executable),
    reason="needs root, and an interpreter another user may run (pyenv under /root is not)",
)
def test_an_unreadable_credentials_file_says_permission_denied() -> None:
    """The compose file mounts ~/.aws (written 0600) into a container running as uid
    10001: botocore skips an unreadable file silently and reports no credentials."""
    with tempfile.TemporaryDirectory(prefix="sigproxy-perm-") as folder:  # pytest's are 0700
        _unreadable_credentials(Path(folder))


def _unreadable_credentials(shared: Path) -> None:
    shared.chmod(0o755)
    creds = shared / "credentials"
    creds.write_text("[dev]\naws_access_key_id = AKIDUNREADABLE0001\naws_secret_access_key = s\n")
    creds.chmod(0o600)  # root's, as ~/.aws/credentials is its owner's
    config = shared / "sigproxy.yaml"
    config.write_text(
        "upstreams:\n  - {name: fn, url: 'http://127.0.0.1:9', region: us-east-1,"
        " credentials: {profile: dev}}\n"
    )
    config.chmod(0o644)
    env = dict(creds_env(), AWS_SHARED_CREDENTIALS_FILE=str(creds), HOME=str(shared))
    env["AWS_CONFIG_FILE"] = str(shared / "no-config")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "sigproxy", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        user=65534,
        group=65534,
    )
    assert result.returncode == 2
    assert f"permission denied reading {creds}" in result.stderr
    assert "uid 65534" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


# --- sigproxy check catches the likely mistakes ---------------------------------------


def _check_without_aws(path: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"))
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    return subprocess.run(
        [sys.executable, "-m", "sigproxy", "check", "--config", path, "--no-credentials", *flags],
        capture_output=True, text=True, env=env, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip


def test_check_warns_about_likely_mistakes_and_runs_without_credentials(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "upstreams:\n"
        "  - {name: typo, url: 'https://abc.lambda-url.us-esat-1.on.aws'}\n"
        "  - {name: pasted, url: 'https://def.lambda-url.eu-west-1.on.aws/prod', path_prefix: /p}\n"
        "  - {name: api, url: 'https://x1y2.execute-api.eu-west-1.amazonaws.com', path_prefix: /api}\n"
        "  - {name: api-as-lambda, url: 'https://z9.execute-api.eu-west-1.amazonaws.com',"
        " path_prefix: /z, service: lambda}\n",
    )
    result = _check_without_aws(path, tmp_path, "--offline")  # no DNS for made-up hosts
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert (
        "'typo': us-esat-1 is not a region botocore knows for lambda (did you mean us-east-1?)"
        in err
    )
    assert (
        "'pasted': its url has a path (/prod), which becomes a base path: /p/x is sent as /prod/x"
        in err
    )
    assert "'api-as-lambda': an API Gateway URL signed for service lambda" in err
    assert "DNS lookup" not in err
    assert "Traceback" not in err
    table = {line.split()[2]: line.split() for line in result.stdout.splitlines()[1:-1]}
    assert table["api"][5] == "execute-api"  # inferred from the host
    assert table["api-as-lambda"][5] == "lambda"
    assert result.stdout.count("(not resolved)") == 4


def test_check_looks_each_host_up(tmp_path: Path) -> None:
    """A host that cannot resolve is a warning naming it. This one fails in the resolver
    library itself (a label over 63 characters), so no query leaves the machine."""
    host = "a" * 64 + ".lambda-url.us-east-1.on.aws"
    path = write(tmp_path, f"upstreams:\n  - {{name: bad-host, url: 'https://{host}'}}\n")
    result = _check_without_aws(path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"DNS lookup of {host} failed" in result.stderr
    assert "--offline skips this check" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_config_file_says_where_one_comes_from(tmp_path: Path) -> None:
    result = run_cli("check", "--config", str(tmp_path / "sigproxy.yaml"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "give --config PATH or set SIGPROXY_CONFIG" in result.stderr
    assert result.stderr.rstrip().endswith("cp config.example.yaml sigproxy.yaml)")
