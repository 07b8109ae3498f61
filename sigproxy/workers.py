"""``sigproxy serve --workers N``: a supervisor and N worker processes.

The supervisor binds the listening sockets (so ``--port 0`` and privileged set-ups work
as with one process), starts each worker as a fresh ``python -m sigproxy serve`` that
serves those inherited sockets with the config the supervisor validated (handed over as a
file descriptor, as uvicorn hands its workers their Config: a config file edited since
cannot stop a replacement from starting), and stays the one process signals and systemd
talk to: SIGTERM/SIGINT drain every worker, SIGHUP checks the file and then reloads every
worker, a worker that dies is started again. A supervisor that gives up exits 1, so
systemd's ``Restart=on-failure`` starts it again. Metrics add up across workers through
prometheus-client's multiprocess mode: each worker writes its values to a shared directory,
and /metrics sums them, so Prometheus scrapes one target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import Config
from .errors import ConfigError, ListenError, SigproxyError, listen_failure
from .notify import Notifier

log = logging.getLogger("sigproxy.workers")

WORKER_FDS_FLAG = "--worker-fds"
_RESTART_WINDOW = 10.0  # seconds: more than _MAX_RESTARTS deaths in it gives up
_MAX_RESTARTS = 5


def worker_count(value: str) -> int:
    """``auto`` (one per CPU) or a positive number."""
    if value == "auto":
        return os.cpu_count() or 1
    if value.isdigit() and 1 <= int(value) <= 256:
        return int(value)
    raise ConfigError("--workers", f"must be a number from 1 to 256 or auto, got {value!r}")


def bind(host: str, port: int, what: str, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server(
            (host, port), family=family, backlog=1024, reuse_port=reuse_port
        )
    except OSError as exc:
        raise ListenError(listen_failure(what, host, port, exc)) from None
    sock.set_inheritable(True)
    return sock


def _log_listening(what: str, sock: socket.socket, scheme: str = "http") -> None:
    addr = sock.getsockname()
    shown = f"[{addr[0]}]" if sock.family == socket.AF_INET6 else addr[0]
    log.info("%s listening on %s://%s:%d", what, scheme, shown, addr[1])


class Supervisor:
    """``load`` re-reads the config file (with the command line's overrides) on SIGHUP;
    what it returns is what workers started from then on are handed."""

    def __init__(
        self,
        config: Config,
        worker_args: Sequence[str],
        workers: int,
        load: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.load = load
        self.worker_args = list(worker_args)
        self.workers = workers
        self.notifier = Notifier()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._deaths: list[float] = []
        self._stopping = False
        self._gave_up = False

    async def run(self) -> int:
        config = self.config
        # One listening socket per worker, all on the same port with SO_REUSEPORT: the
        # kernel spreads connections over them. A single shared socket would let
        # whichever worker wakes first take every connection.
        host = config.listen.host
        first = bind(host, config.listen.port, "proxy", reuse_port=True)
        port = first.getsockname()[1]
        self._proxy_socks = [first]
        admin_sock = None
        try:
            for _ in range(self.workers - 1):
                self._proxy_socks.append(bind(host, port, "proxy", reuse_port=True))
            if config.admin is not None:
                admin_sock = bind(config.admin.host, config.admin.port, "admin")
        except ListenError:
            for sock in self._proxy_socks:
                sock.close()
            raise
        # Only now: "listening" means every listener is.
        # Plain sockets: each worker serves TLS on its own with the listen.tls files.
        _log_listening("sigproxy", first, config.listen.scheme)
        if admin_sock is not None:
            _log_listening("admin", admin_sock)
        metrics_dir = tempfile.mkdtemp(prefix="sigproxy-metrics-")
        ready_r, ready_w = os.pipe()
        self._admin_fd = admin_sock.fileno() if admin_sock else -1
        self._ready_w = ready_w
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)  # the supervisor is the one systemd hears from
        self._env = env
        self._slot_of: dict[int, int] = {}
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            for slot in range(self.workers):
                await self._spawn(slot)
            await self._wait_ready(ready_r, stop)
            if stop.is_set():
                return await self._stop(metrics_dir)
            self.notifier.ready(f"{self.workers} workers serving")
            log.info("%d workers ready", self.workers)
            watchdog = asyncio.create_task(self.notifier.watchdog())
            watcher = asyncio.create_task(self._watch(stop))
            await stop.wait()
            watchdog.cancel()
            watcher.cancel()
            code = await self._stop(metrics_dir)
            return 1 if self._gave_up else code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for fd in (ready_r, ready_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            for sock in self._proxy_socks:
                sock.close()
            if admin_sock is not None:
                admin_sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    async def _spawn(self, slot: int) -> None:
        """Start the worker for ``slot``, serving that slot's socket (a replacement
        takes over the socket of the worker it replaces) with the current config."""
        handoff = tempfile.TemporaryFile()  # noqa: SIM115 - the worker reads and closes it
        handoff.write(pickle.dumps(self.config))
        handoff.flush()
        handoff.seek(0)
        fd_list = [
            self._proxy_socks[slot].fileno(),
            self._admin_fd,
            self._ready_w,
            handoff.fileno(),
        ]
        fds = ",".join(str(fd) for fd in fd_list)
        with handoff:
            proc = await self._exec(fds, [fd for fd in fd_list if fd >= 0])
        self._procs[proc.pid] = proc
        self._slot_of[proc.pid] = slot
        log.info("worker %d started", proc.pid)

    async def _exec(self, fds: str, pass_fds: list[int]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sigproxy",
            "serve",
            *self.worker_args,
            WORKER_FDS_FLAG,
            fds,
            pass_fds=pass_fds,
            env=self._env,
            stdin=asyncio.subprocess.DEVNULL,
            # Signals come from the supervisor only, not also from a terminal's Ctrl-C.
            start_new_session=True,
        )

    async def _wait_ready(self, ready_r: int, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        got = 0
        deadline = time.monotonic() + 60
        while got < self.workers and not stop.is_set():
            if any(p.returncode is not None for p in self._procs.values()):
                raise ListenError("a worker exited while starting; see its log lines above")
            if time.monotonic() > deadline:
                raise ListenError("workers did not start within 60 seconds")
            ready = await loop.run_in_executor(None, _read_ready, ready_r)
            got += len(ready)

    async def _watch(self, stop: asyncio.Event) -> None:
        """Start a worker again when one dies; give up when they keep dying."""
        while not stop.is_set():
            waits = {asyncio.ensure_future(p.wait()): pid for pid, p in self._procs.items()}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for fut in pending:
                fut.cancel()
            for fut in done:
                pid = waits[fut]
                code = self._procs.pop(pid).returncode
                if self._stopping:
                    continue
                log.error("worker %d exited with status %s; starting another", pid, code)
                _mark_dead(pid, self._env["PROMETHEUS_MULTIPROC_DIR"])
                now = time.monotonic()
                self._deaths = [t for t in self._deaths if now - t < _RESTART_WINDOW]
                self._deaths.append(now)
                if len(self._deaths) > _MAX_RESTARTS:
                    log.error(
                        "workers keep exiting (%d in %gs); stopping with status 1",
                        len(self._deaths),
                        _RESTART_WINDOW,
                    )
                    self._gave_up = True
                    stop.set()
                    return
                await self._spawn(self._slot_of.pop(pid))

    def _reload(self) -> None:
        self.notifier.reloading()
        if self.load is not None:
            try:
                self.config = self.load()
            except SigproxyError as exc:
                log.error("reload rejected, still serving the previous config: %s", exc)
                self.notifier.ready()
                return
        log.info("reload: signalling %d workers", len(self._procs))
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)
        self.notifier.ready()

    async def _stop(self, metrics_dir: str) -> int:
        self._stopping = True
        self.notifier.stopping()
        log.info("stopping %d workers", len(self._procs))
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        procs = list(self._procs.values())
        try:
            async with asyncio.timeout(self.config.grace_period + 5):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for proc in procs:
                if proc.returncode is None:
                    log.error("worker %d did not stop in time; killing it", proc.pid)
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        log.info("stopped")
        return 0


def _read_ready(fd: int) -> bytes:
    import select

    readable, _, _ = select.select([fd], [], [], 0.5)
    return os.read(fd, 64) if readable else b""


def _mark_dead(pid: int, metrics_dir: str) -> None:
    # A dead worker's in-flight gauge must not count any more.
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Handoff:
    """What a worker is handed by its supervisor."""

    config: Config
    proxy: socket.socket
    admin: socket.socket | None
    ready_fd: int
    """Written to (one byte) once the worker serves, then closed."""


def worker_handoff(value: str) -> Handoff:
    """The ``--worker-fds`` a supervisor passed: ``proxy,admin,ready,config`` (admin is
    -1 without an admin listener)."""
    proxy_fd, admin_fd, ready_fd, config_fd = (int(x) for x in value.split(","))
    with os.fdopen(config_fd, "rb") as fh:
        # Written by the supervisor that started this process, from its validated config.
        config = pickle.load(fh)  # noqa: S301
    if not isinstance(config, Config):
        raise ConfigError("--worker-fds", "the supervisor handed over no config")
    proxy = socket.socket(fileno=proxy_fd)
    admin = socket.socket(fileno=admin_fd) if admin_fd >= 0 else None
    return Handoff(config, proxy, admin, ready_fd)
