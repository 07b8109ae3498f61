"""The pure core imports no I/O library: each module of it, imported alone in a fresh
interpreter, leaves aiohttp, botocore, prometheus-client and asyncio's event loops out."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
