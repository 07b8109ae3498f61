"""Processes under test: start, wait until they listen, stop; their CPU time and memory.

Every server is started in its own session, so stopping it stops its whole process group
(a supervisor's workers included), and each one is stopped on exit, errors and Ctrl-C
included (the Runner registers the stop with an ExitStack). CPU time is utime+stime of a
process and all its descendants, read from /proc; memory is VmHWM/VmRSS from
/proc/PID/status.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import BENCH_DIR, REPO_ROOT

START_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def harness_env() -> dict[str, str]:
    """Environment for a ``python -m harness.<module>`` child: bench/ on PYTHONPATH."""
    paths = [str(BENCH_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def harness_cmd(module: str, *args: str) -> list[str]:
    """The command line of a harness module run as a child process."""
    return [sys.executable, "-m", f"harness.{module}", *args]


def run_child(module: str, args: list[str], timeout: float) -> str:
    """Run ``python -m harness.<module> ARGS`` to the end; the last line it printed."""
    r = subprocess.run(
        harness_cmd(module, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **harness_env()},
    )
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"harness.{module} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self, during: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited during {during}:\n{self.log_text()[-3000:]}")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server we started (its own session) and everything in its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    # Workers left behind by a supervisor that exited share its process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def wait_for_port(server: Server, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive("start-up")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", server.port), 0.5),
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not accept connections on {server.port} in {timeout}s")


def wait_for_log(server: Server, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
    """The first match of ``pattern`` in the server's log, waiting for it to appear."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(pattern, server.log_text()):
            return m
        server.check_alive("start-up")
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} logged nothing matching {pattern!r} in {timeout}s")


class Runner:
    """Starts servers in their own sessions and stops each one, also on errors."""

    def __init__(self, stack: contextlib.ExitStack, tmp: Path) -> None:
        self.stack = stack
        self.tmp = tmp
        # Log files by the first word of the server's name (sigproxy, envoy, nginx, ...).
        self.logs: dict[str, list[Path]] = collections.defaultdict(list)
        # Stopped already: the exit callback must not signal a pid that may be reused.
        self.stopped: set[subprocess.Popen[bytes]] = set()

    def start(
        self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None
    ) -> Server:
        """Start ``cmd`` (output to a log file) and wait until ``port`` accepts."""
        log_path = self.tmp / f"{name.replace(' ', '_')}-{port}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.stack.callback(self._stop_proc, proc)
        server = Server(name, proc, port, log_path)
        self.logs[name.split(" ")[0]].append(log_path)
        wait_for_port(server)
        return server

    def _stop_proc(self, proc: subprocess.Popen[bytes]) -> None:
        if proc not in self.stopped:
            stop_group(proc)
            self.stopped.add(proc)

    def stop(self, server: Server) -> None:
        self._stop_proc(server.proc)


def tree_cpu(root: int) -> dict[int, float]:
    """utime+stime in seconds of ``root`` and each of its descendants (threads included)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parent[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    found: dict[int, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in ticks:
            found[pid] = ticks[pid] / CLK_TCK
        todo.extend(children.get(pid, ()))
    return found


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    """CPU seconds each process of the tree used between two tree_cpu() readings."""
    return {pid: t - before.get(pid, 0.0) for pid, t in after.items()}


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status, e.g. VmHWM (peak RSS) or VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def tree_hwm_kb(root: int) -> dict[int, int]:
    """VmHWM (KiB) of ``root`` and each of its descendants: per worker, should it fork."""
    found = {}
    for pid in tree_cpu(root):
        with contextlib.suppress(OSError, KeyError, ValueError):
            found[pid] = proc_status_kb(pid, "VmHWM")
    return found


@dataclass
class LogSummary:
    """What a kind of server logged: its distinct lines (count first) and, apart, how
    many access-log lines it wrote (one per request: too many to list)."""

    lines: list[str]
    access_lines: int = 0


def summarize_logs(
    paths: list[Path], access_marker: str | None = None, limit: int = 15
) -> LogSummary:
    """Distinct lines of the log files, timestamps, thread ids and loopback ports left out
    so repeats collapse; lines containing ``access_marker`` are only counted."""
    counts: collections.Counter[str] = collections.Counter()
    access = 0
    for path in paths:
        if not path.exists():
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if access_marker and access_marker in line:
                    access += 1
                    continue
                key = re.sub(r"^\[[^\]]*\]\[\d+\]", "", line.strip())
                key = re.sub(r"^\d{4}-\d\d-\d\d[ T][\d:.,]+\s*", "", key)
                key = re.sub(r"(127\.0\.0\.1):\d+", r"\1:PORT", key)
                key = re.sub(r"\bworker \d+\b", "worker PID", key)
                if key:
                    counts[key] += 1
    return LogSummary([f"{n}x {line[:400]}" for line, n in counts.most_common(limit)], access)
