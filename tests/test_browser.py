"""The proxy's CORS policy as a real browser applies it: headless Chromium loads a page
from one loopback origin and calls the proxy on another with ``fetch``.

A JSON body and a custom header make the browser send a real preflight first, which
the proxy must answer itself (never forwarding or signing it); then the browser sends
the POST, which must reach the fake Function URL once, correctly signed, and its answer
(and the exposed ``X-Request-Id``) must be readable by the page. From an origin the
policy doesn't allow, the browser must refuse (``TypeError: Failed to fetch``) and the
upstream must see nothing.

The browser is Debian's ``chromium`` package (``/usr/bin/chromium``). When it is missing
and the tests run as root, as on CI (``.ci/run`` runs as root on a fresh machine), the
``chromium_binary`` fixture installs it once per session with
``apt-get update -qq && apt-get install -y -qq chromium`` (bounded to 10 minutes); when
that is impossible the tests are skipped, saying why. Chromium is driven with the Chrome
DevTools Protocol over aiohttp's websocket client (no extra dependency). It only ever
talks to loopback: background networking, component updates, sync and the like are
off, no proxy is used, and every host name but 127.0.0.1 resolves to nothing, so the
few Google requests Chromium still starts on its own (sign-in's ListAccounts, update
checks) fail inside the browser, without a DNS query or a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import RunningProxy, StartProxy
from .support import FakeFunctionUrl, verify_sigv4

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
INSTALL_TIMEOUT = 600
# Launching the browser, loading the page, the preflight and the POST: generous for a
# 2-core machine, and each wait below has its own, smaller bound.
BROWSER_BUDGET = 60

# The first test may install Chromium (up to INSTALL_TIMEOUT) before its own run, which
# pytest-timeout's default of 120 s would cut short.
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 2 * BROWSER_BUDGET)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--disable-dev-shm-usage",
    "--metrics-recording-only",
    "--password-store=basic",
    "--no-proxy-server",
    "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,"
    "OptimizationGuideModelDownloading,MediaRouter,Translate,AutofillServerCommunication",
    # Nothing but loopback, even if some feature still tries to reach a host.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--remote-debugging-port=0",
)

ALLOWED_CORS = """\
    cors:
      allow_origins: ["http://127.0.0.1:*"]
      allow_methods: [GET, POST]
      allow_headers: [content-type, x-custom]
      expose_headers: [x-request-id]
      allow_credentials: false
      max_age: 600
"""

DISALLOWED_CORS = """\
    cors:
      allow_origins: ["http://localhost:3000"]
      allow_methods: [GET, POST]
      allow_headers: [content-type, x-custom]
      expose_headers: [x-request-id]
"""

# A value CI's secrets grep looks for in the test log (tests/check_log_secrets.py).
COOKIE = "sid=cookie-value-abc-browser"


def proxy_yaml(upstream_port: int, cors: str) -> str:
    return (
        "admin: {port: 0}\n"
        "upstreams:\n"
        "  - name: fn\n"
        f"    url: http://127.0.0.1:{upstream_port}\n"
        "    region: us-east-1\n"
        "    path_prefix: /fn\n" + cors
    )


def _run_bounded(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``argv`` in its own process group; on timeout kill the whole group. Returns
    (exit status or None on timeout, combined output)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """``/usr/bin/chromium``, installed with apt-get if missing and we are root (once per
    session: pytest caches a session fixture's skip too); otherwise a skip saying why."""
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0:
            pytest.skip(
                f"{CHROMIUM} is missing and the tests are not running as root, so they "
                "can't install it: run `apt-get install chromium` (Debian) to enable them"
            )
        started = time.monotonic()
        status, out = _run_bounded(
            ["bash", "-c", "apt-get update -qq && apt-get install -y -qq chromium"],
            INSTALL_TIMEOUT,
        )
        took = time.monotonic() - started
        if status is None:
            pytest.skip(
                f"installing chromium with apt-get did not finish within {INSTALL_TIMEOUT} s"
            )
        if status != 0 or not os.path.exists(CHROMIUM):
            pytest.skip(f"`apt-get install chromium` failed (exit status {status}): {_tail(out)}")
        log.info("installed chromium with apt-get in %.0f s", took)
    status, out = _run_bounded([CHROMIUM, "--headless", "--no-sandbox", "--version"], 60)
    if status != 0:
        pytest.skip(f"{CHROMIUM} --version does not run (exit status {status}): {_tail(out)}")
    log.info("using %s", next((ln for ln in out.splitlines() if "Chromium" in ln), out.strip()))
    return CHROMIUM


class DevTools:
    """A minimal Chrome DevTools Protocol client on one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    async def call(self, method: str, timeout: float = 10, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        call_id = self._next_id
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"DevTools connection ended during {method}: {msg}")
                data = json.loads(msg.data)
                if data.get("id") == call_id:
                    if "error" in data:
                        raise AssertionError(f"DevTools {method} failed: {data['error']}")
                    result: dict[str, Any] = data.get("result", {})
                    return result
                if "method" in data:
                    self.events.append(data)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        """The browser's console messages so far (CORS refusals are reported there)."""
        texts = []
        for event in self.events:
            if event["method"] == "Log.entryAdded":
                texts.append(event["params"]["entry"].get("text", ""))
            elif event["method"] == "Runtime.consoleAPICalled":
                args = event["params"].get("args", [])
                texts.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
        return texts


async def _devtools_port(profile: Path, proc: asyncio.subprocess.Process, logfile: Path) -> int:
    """The port Chromium chose, from ``<user-data-dir>/DevToolsActivePort``."""
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise AssertionError(
                f"chromium exited with status {proc.returncode} at startup: "
                f"{_tail(logfile.read_text(errors='replace'))}"
            )
        with contextlib.suppress(FileNotFoundError):
            first = active.read_text().split("\n", 1)[0].strip()
            if first.isdigit() and int(first) > 0:
                return int(first)
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"chromium wrote no DevToolsActivePort within 30 s: "
        f"{_tail(logfile.read_text(errors='replace'))}"
    )


@contextlib.asynccontextmanager
async def headless_chromium(binary: str, workdir: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium with a fresh profile, and a DevTools session on a new blank
    page. The browser's process group is killed on the way out, whatever happened."""
    profile = workdir / "chromium-profile"
    profile.mkdir()
    logfile = workdir / "chromium.log"
    with logfile.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            # Whatever Chromium keeps outside its profile (~/.pki) stays in the test's dir.
            env=dict(os.environ, HOME=str(workdir)),
            start_new_session=True,
        )
    try:
        port = await _devtools_port(profile, proc, logfile)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as resp:
                assert resp.status == 200, await resp.text()
                target = await resp.json(content_type=None)
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                devtools = DevTools(ws)
                await devtools.call("Runtime.enable")
                await devtools.call("Log.enable")
                await devtools.call("Page.enable")
                yield devtools
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await proc.wait()


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sigproxy browser test</title>
<link rel="icon" href="data:,"></head>
<body><pre id="result"></pre>
<script>
(async () => {
  const out = document.getElementById("result");
  let result;
  try {
    const r = await fetch(%(url)s, %(init)s);
    result = {
      ok: true,
      status: r.status,
      requestId: r.headers.get("x-request-id"),
      body: await r.text(),
    };
  } catch (e) {
    result = {ok: false, name: e.name, message: e.message};
  }
  out.textContent = JSON.stringify(result);
  out.dataset.done = "1";
})();
</script></body></html>
"""

RESULT_JS = """(() => {
  const el = document.getElementById("result");
  return el && el.dataset.done ? el.textContent : null;
})()"""


class Page:
    """The test page's own server (origin A), serving whatever page was last set."""

    def __init__(self) -> None:
        self.html = ""
        self.set_cookie: str | None = None
        self.port = 0

    def app(self) -> web.Application:
        async def index(request: web.Request) -> web.Response:
            resp = web.Response(text=self.html, content_type="text/html")
            if self.set_cookie is not None:
                resp.headers["Set-Cookie"] = self.set_cookie
            return resp

        app = web.Application()
        app.router.add_get("/", index)
        return app

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, url: str, init: dict[str, Any]) -> None:
        self.html = PAGE % {"url": json.dumps(url), "init": json.dumps(init)}


@pytest.fixture
async def page(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Page:
    served = Page()
    server = await aiohttp_server(served.app(), access_log=None)
    served.port = server.port
    return served


async def run_page(binary: str, workdir: Path, page: Page) -> tuple[dict[str, Any], list[str]]:
    """Open the page in headless Chromium and wait for what its fetch wrote into the DOM.
    Returns (that result, the browser's console messages)."""
    async with asyncio.timeout(BROWSER_BUDGET), headless_chromium(binary, workdir) as devtools:
        nav = await devtools.call("Page.navigate", url=page.origin + "/")
        assert not nav.get("errorText"), f"navigation to {page.origin} failed: {nav}"
        deadline = time.monotonic() + 20
        while True:
            text = await devtools.evaluate(RESULT_JS)
            if text is not None:
                break
            assert time.monotonic() < deadline, (
                f"the page wrote no result within 20 s; console: {devtools.console_errors()}"
            )
            await asyncio.sleep(0.1)
        result: dict[str, Any] = json.loads(text)
        return result, devtools.console_errors()


def counted(proxy: RunningProxy, method: str, status: int) -> float:
    value = proxy.registry.get_sample_value(
        "sigproxy_requests_total", {"upstream": "fn", "method": method, "status": str(status)}
    )
    return value or 0.0


POST_JSON = {
    "method": "POST",
    "headers": {"Content-Type": "application/json", "X-Custom": "yes"},
    "body": json.dumps({"hello": "browser"}),
}


def assert_signed_post(upstream: FakeFunctionUrl, result: dict[str, Any]) -> None:
    assert [r.method for r in upstream.requests] == ["POST"], (
        "the preflight must be answered by the proxy, and the POST forwarded once"
    )
    rec = upstream.last
    assert rec.raw_target == "/echo?x=1"
    assert json.loads(rec.body) == {"hello": "browser"}
    assert rec.header("Content-Type") == "application/json"
    assert rec.header("X-Custom") == "yes"
    assert rec.header("X-Request-Id") == result["requestId"]
    verify_sigv4(rec, region="us-east-1")


async def test_allowed_origin_preflight_then_signed_post(
    chromium_binary: str,
    tmp_path: Path,
    page: Page,
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy(proxy_yaml(upstream.port, ALLOWED_CORS))
    page.calls(f"{proxy.url}/fn/echo?x=1", POST_JSON)

    result, console = await run_page(chromium_binary, tmp_path, page)

    assert result["ok"], f"fetch failed in the browser: {result}; console: {console}"
    assert result["status"] == 200
    assert json.loads(result["body"]) == {"ok": True, "target": "/echo?x=1"}
    # Readable by the page only because the policy exposes it.
    assert result["requestId"], "X-Request-Id was not exposed to the page"
    assert_signed_post(upstream, result)
    # The browser did send a preflight, and the proxy answered it itself.
    assert counted(proxy, "OPTIONS", 204) == 1
    assert counted(proxy, "POST", 200) == 1


async def test_disallowed_origin_is_refused_and_nothing_is_forwarded(
    chromium_binary: str,
    tmp_path: Path,
    page: Page,
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy(proxy_yaml(upstream.port, DISALLOWED_CORS))
    page.calls(f"{proxy.url}/fn/echo?x=1", POST_JSON)

    result, console = await run_page(chromium_binary, tmp_path, page)

    assert not result["ok"], f"the browser let a disallowed origin read the answer: {result}"
    assert result["name"] == "TypeError"
    assert result["message"] == "Failed to fetch"
    assert upstream.requests == []
    # Refused at the preflight (not, say, a connection failure), and no POST followed.
    assert counted(proxy, "OPTIONS", 403) == 1
    assert counted(proxy, "POST", 200) == 0
    assert any("CORS policy" in text and page.origin in text for text in console), console


async def test_credentialed_fetch_with_an_explicit_origin(
    chromium_binary: str,
    tmp_path: Path,
    page: Page,
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
) -> None:
    # Cookies ignore ports: one set by the page's server goes to the proxy as well, but
    # only on a fetch with credentials, which the policy must allow for this origin.
    page.set_cookie = f"{COOKIE}; Path=/; SameSite=Lax"
    cors = ALLOWED_CORS.replace('["http://127.0.0.1:*"]', f'["{page.origin}"]').replace(
        "allow_credentials: false", "allow_credentials: true"
    )
    proxy = await start_proxy(proxy_yaml(upstream.port, cors))
    page.calls(f"{proxy.url}/fn/echo?x=1", {**POST_JSON, "credentials": "include"})

    result, console = await run_page(chromium_binary, tmp_path, page)

    assert result["ok"], f"credentialed fetch failed in the browser: {result}; console: {console}"
    assert result["status"] == 200
    assert json.loads(result["body"]) == {"ok": True, "target": "/echo?x=1"}
    assert result["requestId"]
    assert_signed_post(upstream, result)
    assert upstream.last.header("Cookie") == COOKIE
    assert counted(proxy, "OPTIONS", 204) == 1


async def test_credentialed_fetch_refused_without_allow_credentials(
    chromium_binary: str,
    tmp_path: Path,
    page: Page,
    upstream: FakeFunctionUrl,
    start_proxy: StartProxy,
) -> None:
    page.set_cookie = f"{COOKIE}; Path=/; SameSite=Lax"
    proxy = await start_proxy(proxy_yaml(upstream.port, ALLOWED_CORS))
    page.calls(f"{proxy.url}/fn/echo?x=1", {**POST_JSON, "credentials": "include"})

    result, _ = await run_page(chromium_binary, tmp_path, page)

    # The preflight's answer lacks Access-Control-Allow-Credentials: the browser stops
    # there, so the cookie never reaches the proxy and nothing is signed or forwarded.
    assert not result["ok"], result
    assert result["message"] == "Failed to fetch"
    assert upstream.requests == []
