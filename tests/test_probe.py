"""``sigproxy check --probe`` as a real process against real loopback servers: the local
Function URL emulator (AWS_IAM and NONE, an expired token, a clock ahead), a closed port,
a ``.invalid`` host and HTTPS with a trustme CA trusted or not."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp.test_utils import TestServer

from sigproxy.emulator.config import build_emulator_config
from sigproxy.emulator.handlers import load_handler
from sigproxy.emulator.server import FunctionUrl, start_functions, stop_functions
from sigproxy.probe import STEP_TIMEOUT

from .support import ACCESS_KEY, SECRET_KEY, SESSION_TOKEN
from .test_process import creds_env, run_cli, write

REGION = "us-east-1"
COLUMNS = ["UPSTREAM", "URL", "DNS", "TCP", "TLS", "ANSWER", "VERDICT", "MEANING"]
OTHER_SECRET = "oThEr-secret-NEVER-printed-77"
OTHER_TOKEN = "oThEr-token-NEVER-printed-99"

# Counts its runs in a file next to it: the probe must not run an AWS_IAM function.
HANDLER = """\
import pathlib

def handler(event, context):
    with pathlib.Path(__file__).with_name("invocations").open("a") as f:
        f.write("ran\\n")
    return {"statusCode": 200, "body": "ran"}
"""


def caller(**extra: Any) -> dict[str, Any]:
    return {
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "session_token": SESSION_TOKEN,
        **extra,
    }


@dataclass
class Emulator:
    urls: dict[str, str]
    folder: Path

    @property
    def invocations(self) -> int:
        path = self.folder / "invocations"
        return len(path.read_text().splitlines()) if path.exists() else 0


@contextlib.asynccontextmanager
async def emulator(
    tmp_path: Path, *functions: tuple[str, str], callers: list[dict[str, Any]], **settings: Any
) -> AsyncIterator[Emulator]:
    """The emulator in this process, one function per (name, AuthType)."""
    folder = tmp_path / "functions"
    folder.mkdir(exist_ok=True)
    (folder / "handler.py").write_text(HANDLER)
    config = build_emulator_config(
        {
            "region": REGION,
            "callers": callers,
            "functions": [
                {"name": name, "handler": "handler.py:handler", "auth": auth}
                for name, auth in functions
            ],
            **settings,
        },
        str(folder),
    )
    running = await start_functions(config)
    try:
        yield Emulator({r.function.name: r.url for r in running}, folder)
    finally:
        await stop_functions(running)


def upstreams(*entries: str) -> str:
    return "admin: false\nupstreams:\n" + "".join(f"  - {e}\n" for e in entries)


def iam(name: str, url: str) -> str:
    return f"{{name: {name}, url: '{url}', region: {REGION}, path_prefix: /{name}}}"


def open_(name: str, url: str) -> str:
    return f"{{name: {name}, url: '{url}', auth: none, path_prefix: /{name}}}"


@dataclass
class Probe:
    result: subprocess.CompletedProcess[str]
    rows: dict[str, dict[str, str]]
    summary: str
    seconds: float


async def probe(tmp_path: Path, config_text: str, env: dict[str, str] | None = None) -> Probe:
    """Run ``sigproxy check --probe`` (off the loop, so this loop's servers answer it)
    and read its table by the header's column positions."""
    path = write(tmp_path, config_text)
    started = time.monotonic()
    result = await asyncio.to_thread(
        run_cli, "check", "--probe", "--config", path, env=env or creds_env()
    )
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    for secret in (SECRET_KEY, SESSION_TOKEN, OTHER_SECRET, OTHER_TOKEN):
        assert secret not in output
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("UPSTREAM "))
    header = lines[header_at]
    assert header.split() == COLUMNS
    starts = [header.index(name) for name in COLUMNS]
    rows = {}
    for line in lines[header_at + 1 : -1]:
        cells = [
            line[start:end].strip()
            for start, end in zip(starts, [*starts[1:], len(line)], strict=True)
        ]
        rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return Probe(result, rows, lines[-1], seconds)


async def test_ok_and_reachable_exit_0_and_nothing_runs(tmp_path: Path) -> None:
    async with emulator(
        tmp_path, ("signed", "AWS_IAM"), ("public", "NONE"), callers=[caller()]
    ) as emu:
        run = await probe(
            tmp_path,
            upstreams(iam("orders", emu.urls["signed"] + "/v1"), open_("web", emu.urls["public"])),
        )
        assert run.result.returncode == 0, run.result.stdout + run.result.stderr
        orders = run.rows["orders"]
        assert (orders["DNS"], orders["TCP"], orders["TLS"]) == ("ok", "ok", "n/a")
        assert orders["ANSWER"] == "403 InvalidSignatureException"
        assert orders["VERDICT"] == "ok"
        assert "default chain (env)" in orders["MEANING"]
        web = run.rows["web"]
        assert (web["DNS"], web["TCP"], web["ANSWER"], web["VERDICT"]) == (
            "ok",
            "ok",
            "-",
            "reachable",
        )
        assert "no request sent" in web["MEANING"]
        assert run.summary.startswith("probe OK: 2 upstream(s)")
        assert run.summary.endswith(f"next: sigproxy serve --config {tmp_path / 'sigproxy.yaml'}")
        # The route table of plain `check` comes first, unchanged.
        route_table = run.result.stdout.split("\n\n")[0].splitlines()
        assert route_table[0].split()[:3] == ["PREFIX", "HOST", "UPSTREAM"]
        assert route_table[-1].startswith("config OK: ")
        # Neither function ran: the signed probe was refused, the public one never asked.
        assert emu.invocations == 0


async def test_unknown_key_exit_2(tmp_path: Path) -> None:
    env = creds_env()
    env.update(
        AWS_ACCESS_KEY_ID="AKIDNOTKNOWNTOTHEEMU",
        AWS_SECRET_ACCESS_KEY=OTHER_SECRET,
        AWS_SESSION_TOKEN=OTHER_TOKEN,
    )
    async with emulator(tmp_path, ("signed", "AWS_IAM"), callers=[caller()]) as emu:
        run = await probe(tmp_path, upstreams(iam("orders", emu.urls["signed"])), env)
    assert run.result.returncode == 2
    row = run.rows["orders"]
    assert row["ANSWER"] == "403 UnrecognizedClientException"
    assert row["VERDICT"] == "unknown-key"
    assert "does not know the access key of default chain (env)" in row["MEANING"]
    assert run.summary.startswith("probe FAILED for 1 of 1 upstream(s): orders (unknown-key)")
    assert "next: " in run.summary and run.summary.endswith("again")


async def test_a_url_without_auth_as_an_aws_iam_upstream_is_not_iam(tmp_path: Path) -> None:
    async with emulator(tmp_path, ("public", "NONE"), callers=[caller()]) as emu:
        run = await probe(tmp_path, upstreams(iam("orders", emu.urls["public"])))
        assert emu.invocations == 1  # the one request the probe sent ran the function
    assert run.result.returncode == 2
    row = run.rows["orders"]
    assert (row["ANSWER"], row["VERDICT"]) == ("200", "not-iam")
    assert "the function ran once" in row["MEANING"]
    assert "set auth: none, or AuthType AWS_IAM on the URL" in row["MEANING"]


async def test_expired_token(tmp_path: Path) -> None:
    expired = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    expired_at = expired.strftime("%Y-%m-%dT%H:%M:%SZ")
    async with emulator(
        tmp_path, ("signed", "AWS_IAM"), callers=[caller(expires_at=expired_at)]
    ) as emu:
        run = await probe(tmp_path, upstreams(iam("orders", emu.urls["signed"])))
    assert run.result.returncode == 2
    row = run.rows["orders"]
    assert row["ANSWER"] == "403 ExpiredTokenException"
    assert row["VERDICT"] == "expired-token"
    assert "session token of default chain (env) has expired" in row["MEANING"]


async def test_clock_skew_names_the_offset(tmp_path: Path) -> None:
    async with emulator(
        tmp_path, ("signed", "AWS_IAM"), callers=[caller()], clock_offset=600
    ) as emu:
        run = await probe(tmp_path, upstreams(iam("orders", emu.urls["signed"])))
    assert run.result.returncode == 2
    row = run.rows["orders"]
    assert row["ANSWER"] == "403 InvalidSignatureException"
    assert row["VERDICT"] == "clock-skew"
    m = re.search(r"this machine's clock is (\d+) s behind the service's", row["MEANING"])
    assert m is not None, row["MEANING"]
    assert 595 <= int(m.group(1)) <= 605
    assert "timedatectl set-ntp true" in row["MEANING"]


async def test_a_region_other_than_the_urls_is_wrong_scope_not_ok(tmp_path: Path) -> None:
    """The refusal is InvalidSignatureException, as for a mismatch, but about the scope:
    nothing was learnt about the key."""
    async with emulator(tmp_path, ("signed", "AWS_IAM"), callers=[caller()]) as emu:
        entry = f"{{name: orders, url: '{emu.urls['signed']}', region: eu-west-1}}"
        run = await probe(tmp_path, upstreams(entry))
    assert run.result.returncode == 2
    row = run.rows["orders"]
    assert row["ANSWER"] == "403 InvalidSignatureException"
    assert row["VERDICT"] == "wrong-scope"
    assert "not 'eu-west-1'" in row["MEANING"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_closed_port_and_unknown_host(tmp_path: Path) -> None:
    port = closed_port()
    run = await probe(
        tmp_path,
        upstreams(
            iam("closed", f"http://127.0.0.1:{port}"),
            iam("nowhere", "https://sigproxy-probe-test.invalid"),
        ),
    )
    assert run.result.returncode == 2
    closed = run.rows["closed"]
    assert (closed["DNS"], closed["TCP"], closed["ANSWER"]) == ("ok", "failed", "-")
    assert closed["VERDICT"] == "connect-failed"
    assert f"connection refused by 127.0.0.1:{port}" in closed["MEANING"]
    nowhere = run.rows["nowhere"]
    # No network, or a resolver that never answers: the step timeout bounds it.
    if nowhere["VERDICT"] == "timeout":
        assert nowhere["DNS"] == "timeout"
        assert "no DNS answer for sigproxy-probe-test.invalid within 5 s" in nowhere["MEANING"]
    else:
        assert (nowhere["DNS"], nowhere["TCP"], nowhere["TLS"]) == ("failed", "-", "-")
        assert nowhere["VERDICT"] == "dns-failed"
        assert "DNS lookup of sigproxy-probe-test.invalid failed: " in nowhere["MEANING"]
    assert run.seconds < STEP_TIMEOUT + 20
    assert run.summary.startswith("probe FAILED for 2 of 2 upstream(s): closed (connect-failed)")


# --- HTTPS --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def tls_function_url(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path, ca: trustme.CA
) -> int:
    """An AWS_IAM emulator function served over TLS with a certificate from ``ca``."""
    folder = tmp_path / "functions"
    folder.mkdir(exist_ok=True)
    (folder / "handler.py").write_text(HANDLER)
    config = build_emulator_config(
        {
            "region": REGION,
            "callers": [caller()],
            "functions": [{"name": "tls", "handler": "handler.py:handler"}],
        },
        str(folder),
    )
    fn = config.functions[0]
    app = FunctionUrl(fn, config, load_handler(fn.handler, folder)).app()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    server = await aiohttp_server(app, ssl=ctx, access_log=None)
    assert server.port is not None
    return server.port


async def test_https_with_an_untrusted_ca_is_tls_failed(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path, ca: trustme.CA
) -> None:
    port = await tls_function_url(aiohttp_server, tmp_path, ca)
    env = creds_env()
    env.pop("SSL_CERT_FILE", None)  # the system CAs, which do not include this one
    run = await probe(tmp_path, upstreams(iam("secure", f"https://localhost:{port}")), env)
    assert run.result.returncode == 2
    row = run.rows["secure"]
    assert (row["DNS"], row["TCP"], row["TLS"], row["ANSWER"]) == ("ok", "ok", "failed", "-")
    assert row["VERDICT"] == "tls-failed"
    assert re.search(
        r"certificate verify failed: [a-z]+ [a-z ]+ \(for a private CA", row["MEANING"]
    )
    assert "unable to get local issuer certificate" in row["MEANING"]


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "AWS_CA_BUNDLE"])
async def test_https_trusted_through_ssl_cert_file_or_aws_ca_bundle(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    ca: trustme.CA,
    variable: str,
) -> None:
    port = await tls_function_url(aiohttp_server, tmp_path, ca)
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    env = creds_env()
    env.pop("SSL_CERT_FILE", None)
    env[variable] = str(pem)
    run = await probe(tmp_path, upstreams(iam("secure", f"https://localhost:{port}")), env)
    assert run.result.returncode == 0, run.result.stdout
    row = run.rows["secure"]
    assert (row["TLS"], row["ANSWER"], row["VERDICT"]) == (
        "ok",
        "403 InvalidSignatureException",
        "ok",
    )


# --- usage ----------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--offline", "--no-credentials"])
def test_probe_with_offline_or_no_credentials_is_a_usage_error(tmp_path: Path, flag: str) -> None:
    path = write(tmp_path, upstreams(iam("orders", "http://127.0.0.1:9")))
    result = run_cli("check", "--probe", flag, "--config", path, env=creds_env())
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"sigproxy: error: --probe cannot be combined with {flag}: it looks up and connects "
        "to every upstream and signs with its credentials"
    ]


def test_probe_without_credentials_is_the_one_line_check_error(tmp_path: Path) -> None:
    path = write(tmp_path, upstreams(iam("orders", "http://127.0.0.1:9")))
    result = run_cli("check", "--probe", "--config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sigproxy: error: upstreams[0] (orders): no usable AWS credentials")


async def test_each_step_is_bounded_and_upstreams_are_probed_at_once(tmp_path: Path) -> None:
    """A port that takes the connection and never says a word: over https the TLS
    handshake times out, over http the answer does. Both in one run of about one step
    timeout, not two."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        run = await probe(
            tmp_path,
            upstreams(
                iam("handshake", f"https://127.0.0.1:{port}"),
                iam("answer", f"http://127.0.0.1:{port}"),
            ),
        )
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert run.result.returncode == 2
    handshake = run.rows["handshake"]
    assert (handshake["TCP"], handshake["TLS"], handshake["VERDICT"]) == (
        "ok",
        "timeout",
        "timeout",
    )
    assert handshake["MEANING"] == f"TLS handshake with 127.0.0.1:{port} unfinished within 5 s"
    answer = run.rows["answer"]
    assert (answer["TCP"], answer["ANSWER"], answer["VERDICT"]) == ("ok", "-", "timeout")
    assert answer["MEANING"] == f"no answer from 127.0.0.1:{port} within 5 s"
    assert STEP_TIMEOUT <= run.seconds < 2 * STEP_TIMEOUT
