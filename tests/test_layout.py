"""The pure core imports no I/O library: each module of it, imported alone in a fresh
interpreter, leaves aiohttp, botocore, prometheus-client and asyncio's event loops out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FakeFunctionUrl, one_upstream
from .support import raw_request
from .test_process import serve_process, write

PURE = [
    "config",
    "canonical",
    "hosts",
    "routing",
    "headers",
    "signing",
    "diagnosis",
    "egress",
    "retries",
    "cors",
    "errors",
]
IO = ("aiohttp", "botocore", "prometheus_client", "multidict", "yarl")


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io_library(module: str) -> None:
    code = (
        "import sys, importlib\n"
        f"importlib.import_module('sigproxy.{module}')\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {IO!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"sigproxy.{module} imports {result.stdout.strip()}"


async def test_serve_runs_without_aiohttp(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    """`sigproxy serve` (proxy port, admin listener, upstream side) is sigproxy.http1 on
    httptools: aiohttp, which the emulator and the demo use, is not in the serving
    process (about 10 MiB per worker). Checked in the real process's memory map."""
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        resp = await raw_request(served.port, "POST", "/x", [], b"{}")
        assert resp.status == 200
        assert served.admin_port is not None
        metrics = await raw_request(served.admin_port, "GET", "/metrics")
        assert metrics.status == 200 and b"sigproxy_requests_total" in metrics.body
        maps = Path(f"/proc/{served.proc.pid}/maps").read_text()
        assert "httptools" in maps
        assert "aiohttp" not in maps
        assert await served.stop() == 0
