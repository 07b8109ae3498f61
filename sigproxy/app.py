"""The app factory and the server that runs it: wiring and lifecycle, no request logic."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from .admin import CredentialCollector, ServerState, admin_handler
from .config import Config, ListenTls, check_exposure
from .credentials import CredentialStore
from .errors import ConfigError, CredentialsError, ListenError, listen_failure
from .http1 import Http1Server
from .listener import Listener, TlsListener
from .logs import protect_secrets
from .metrics import Metrics
from .notify import Notifier
from .proxy import Proxy
from .routing import RouteTable
from .upstream import UpstreamClient

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("sigproxy")


def create_proxy(
    config: Config,
    *,
    credentials: CredentialStore | None = None,
    registry: CollectorRegistry | None = None,
    client: UpstreamClient | None = None,
    multiprocess_dir: str | None = None,
) -> Proxy:
    """Build the proxy: route table, metrics, upstream client and request handler.

    ``credentials`` defaults to resolving every upstream's credentials now (blocking);
    ``registry`` defaults to a fresh registry, so proxies never share metrics by accident;
    ``client`` to a new upstream client (TLS verified with the system's CAs), which
    :meth:`Proxy.close` closes; ``multiprocess_dir`` is a ``serve --workers`` worker's
    shared metrics directory.
    """
    protect_secrets()
    store = credentials if credentials is not None else CredentialStore.resolve(config)
    metrics = Metrics(registry, multiprocess_dir=multiprocess_dir)
    proxy = Proxy(RouteTable(config, store), metrics, client)
    metrics.add_collector(CredentialCollector(lambda: proxy.table))
    return proxy


def proxy_server(proxy: Proxy, *, idle_timeout: float | None = None) -> Http1Server:
    """The proxy port's HTTP/1.1 server (:mod:`sigproxy.http1`): a client that
    disconnects cancels its handler (and so its upstream request); request bodies pass
    as they came (never decompressed); parser errors are answered in JSON; heads and
    connections are capped by ``limits``; a connection that sends no complete request
    head within ``idle_timeout`` seconds (default ``client_timeouts.header``) is closed.
    The proxy's upstream connections are closed by :meth:`Proxy.close`, after it."""
    config = proxy.table.config
    errors = proxy.metrics.proxy_errors
    return Http1Server(
        proxy.handle,
        limits=config.limits,
        what="proxy listener",
        header_timeout=config.client_timeouts.header if idle_timeout is None else idle_timeout,
        write_timeout=config.client_timeouts.write,
        # Refusals made before a handler ran count with the handler's own.
        on_refusal=lambda code: errors.labels(code).inc(),
    )


def make_runner(
    proxy: Proxy, *, shutdown_timeout: float = 30.0, idle_timeout: float | None = None
) -> web.BaseRunner:
    """The proxy port as an aiohttp runner, for a program that starts its sites with
    aiohttp (``web.TCPSite(runner, host, port)``): :func:`proxy_server` under aiohttp's
    runner, which starts and stops any protocol factory with ``pre_shutdown()`` and
    ``shutdown()``. ``sigproxy serve`` itself does not load aiohttp."""
    from aiohttp import web

    server = proxy_server(proxy, idle_timeout=idle_timeout)
    return web.ServerRunner(server, shutdown_timeout=shutdown_timeout)  # type: ignore[arg-type]


def admin_server(proxy: Proxy, state: ServerState) -> Http1Server:
    """The admin listener's server, bounded like the proxy port."""
    config = proxy.table.config
    return Http1Server(
        admin_handler(proxy, proxy.metrics, state),
        limits=config.limits,
        what="admin listener",
        header_timeout=config.client_timeouts.header,
        write_timeout=config.client_timeouts.write,
    )


@contextlib.asynccontextmanager
async def stop_signals() -> AsyncIterator[asyncio.Event]:
    """An event set by SIGTERM or SIGINT. The handlers stay installed until the block
    ends, so a second signal can't kill requests that are still finishing; after it,
    SIGTERM is ignored while the process exits."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # The process is on its way out with its status decided: a second SIGTERM (an
        # impatient supervisor, `docker stop` retried) must not turn exit 0 into a kill.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.asynccontextmanager
async def running_proxy(config: Config, credentials: CredentialStore) -> AsyncIterator[Listener]:
    """The proxy listening on ``config.listen`` for the block (no admin listener, no
    signals: ``sigproxy demo``'s); stopped and its upstream connections closed after."""
    proxy = create_proxy(config, credentials=credentials)
    runner = Listener(proxy_server(proxy), grace=config.grace_period)
    tls = _tls_listener(config.listen.tls, config)
    proxy.start()
    try:
        await _listen(runner, config.listen.host, config.listen.port, "proxy", tls=tls)
        _log_listening("sigproxy", runner, config.listen.scheme)
        yield runner
    finally:
        await runner.cleanup()
        await proxy.close()


async def _listen(
    runner: Listener,
    host: str,
    port: int,
    what: str,
    sock: socket.socket | None = None,
    *,
    tls: TlsListener | None = None,
) -> None:
    """Open ``runner``'s listening socket, serving TLS with ``tls``'s context when given;
    the caller logs it once every listener is up."""
    try:
        await runner.start(host, port, sock, tls=tls)
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(listen_failure(what, host, port, exc)) from None


def _log_listening(what: str, runner: Listener, scheme: str = "http") -> None:
    for address in listening_urls(runner, scheme):
        log.info("%s listening on %s", what, address)


def _tls_listener(spec: ListenTls | None, config: Config) -> TlsListener | None:
    """The proxy listener's TLS, its handshakes bounded like a request head."""
    if spec is None:
        return None
    return TlsListener(spec, handshake_timeout=config.client_timeouts.header)


class Server:
    """A running sigproxy: the proxy and admin listeners, SIGHUP reload, graceful stop
    on SIGTERM/SIGINT, and systemd notifications."""

    def __init__(
        self,
        config: Config,
        credentials: CredentialStore,
        *,
        load: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
        sockets: tuple[socket.socket, socket.socket | None] | None = None,
        multiprocess_dir: str | None = None,
        wait_for_credentials: bool = False,
    ) -> None:
        """``sockets``: listening sockets made by a supervisor (``--workers``) to serve
        on instead of binding (proxy, admin); ``multiprocess_dir``: where the workers'
        metrics are added up; ``wait_for_credentials``: a reload may lack credentials
        too (``serve --wait-for-credentials``)."""
        self.config = config
        self._wait = wait_for_credentials
        self._sock: socket.socket | None = sockets[0] if sockets else None
        self._admin_sock: socket.socket | None = sockets[1] if sockets else None
        self._load = load
        self.notifier = notifier or Notifier()
        self.state = ServerState()
        self.proxy = create_proxy(
            config, credentials=credentials, multiprocess_dir=multiprocess_dir
        )
        self.metrics = self.proxy.metrics
        self._runner = Listener(proxy_server(self.proxy), grace=config.grace_period)
        self._tls: TlsListener | None = None
        self._admin: Listener | None = None
        self._reload_lock = asyncio.Lock()
        self.on_ready: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        config = self.config
        # Everything loaded so far (botocore's data, the config) lives as long
        # as the process: keep it out of the collector's full passes, which otherwise
        # stall every request for tens of milliseconds. Collect first, so no start-up
        # garbage (botocore sessions hold cycles) is frozen with it.
        gc.collect()
        gc.freeze()
        raise_open_files_limit()
        # The files are read again: they may have changed since the config was checked.
        self._tls = _tls_listener(config.listen.tls, config)
        self.proxy.start()
        await _listen(
            self._runner, config.listen.host, config.listen.port, "proxy", self._sock, tls=self._tls
        )
        if config.admin is not None:
            self._admin = Listener(admin_server(self.proxy, self.state), grace=5.0)
            try:
                await _listen(
                    self._admin, config.admin.host, config.admin.port, "admin", self._admin_sock
                )
            except ListenError:
                await self._runner.cleanup()
                await self.proxy.close()
                raise
        # Only now: "listening" means every listener is.
        _log_listening("sigproxy", self._runner, config.listen.scheme)
        if self._admin is not None:
            _log_listening("admin", self._admin)
        self.state.listening = True
        self.notifier.ready(f"serving {len(config.upstreams)} upstream(s)")
        if self.on_ready is not None:
            self.on_ready()
        if self.notifier.watchdog_interval is not None:
            self._spawn(self.notifier.watchdog())

    async def reload(self) -> bool:
        """Re-read the config; swap in its routes and credentials, or keep the old ones."""
        if self._load is None:
            log.warning("reload requested, but there is no config file to re-read")
            return False
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                config = self._load()
                # Listen changes wait for a restart: the new config must be safe on the
                # socket that stays open.
                check_exposure(dataclasses.replace(config, listen=self.config.listen))
                store = await asyncio.get_running_loop().run_in_executor(
                    None,
                    functools.partial(
                        CredentialStore.resolve,
                        config,
                        self.proxy.table.credentials,
                        wait=self._wait,
                    ),
                )
                table = RouteTable(config, store)
                # Renewed certificate files, for the listener that stays open (its
                # listen.tls: changes to the section itself wait for a restart).
                context = self._tls.reload() if self._tls is not None else None
            except (ConfigError, CredentialsError) as exc:
                self.metrics.config_reloads.labels("failure").inc()
                log.error("reload rejected, still serving the previous config: %s", exc)
                return False
            finally:
                self.notifier.ready()
            for what, old, new in (
                ("listen", self.config.listen, config.listen),
                ("admin", self.config.admin, config.admin),
                ("grace_period", self.config.grace_period, config.grace_period),
                ("client_timeouts.header", self.config.client_timeouts.header,
                 config.client_timeouts.header),
                ("client_timeouts.write", self.config.client_timeouts.write,
                 config.client_timeouts.write),
                ("limits.max_header_bytes", self.config.limits.max_header_bytes,
                 config.limits.max_header_bytes),
                ("limits.max_client_connections", self.config.limits.max_client_connections,
                 config.limits.max_client_connections),
            ):  # fmt: skip
                if old != new:
                    log.warning("reload: %s changes take effect at the next restart", what)
            self.proxy.swap(table)
            if self._tls is not None and context is not None:
                self._tls.use(context)
                log.info("reload: new TLS handshakes use %s", self._tls.spec.cert)
            self.config = config
            logging.getLogger().setLevel(config.log_level.upper())
            self.metrics.config_reloads.labels("success").inc()
            log.info("config reloaded: %d upstream(s)", len(config.upstreams))
            return True

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to grace_period), close."""
        self.state.stopping = True
        self.notifier.stopping()
        log.info(
            "stopping: no new connections, letting requests in flight finish (up to %gs)",
            self.config.grace_period,
        )
        for task in self._tasks:
            task.cancel()
        await self._runner.cleanup()
        if self._admin is not None:
            await self._admin.cleanup()
        await self.proxy.close()
        log.info("stopped")

    async def run(self, parent: int | None = None) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads. A worker (``parent`` is its
        supervisor's pid) also stops when its supervisor is gone."""
        loop = asyncio.get_running_loop()
        async with stop_signals() as stop:
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
            if parent is not None:
                self._spawn(_watch_parent(parent, stop))
            try:
                await self.start()
                try:
                    await stop.wait()
                finally:
                    await self.stop()
            finally:
                loop.remove_signal_handler(signal.SIGHUP)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def serve(
    config: Config,
    credentials: CredentialStore,
    load: Callable[[], Config] | None = None,
    *,
    sockets: tuple[socket.socket, socket.socket | None] | None = None,
    notifier: Notifier | None = None,
    on_ready: Callable[[], None] | None = None,
    multiprocess_dir: str | None = None,
    wait_for_credentials: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, reloading ``load()`` on SIGHUP."""
    server = Server(
        config,
        credentials,
        load=load,
        sockets=sockets,
        notifier=notifier,
        multiprocess_dir=multiprocess_dir,
        wait_for_credentials=wait_for_credentials,
    )
    server.on_ready = on_ready
    await server.run(parent=os.getppid() if sockets is not None else None)


def raise_open_files_limit() -> None:
    """Every client connection may hold an upstream one too: a soft limit of 1,024 open
    files (systemd's default) would run out long before limits.max_client_connections.
    Raised to the hard limit, as Go's runtime does; never lowered."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit from %d: %s", soft, exc)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    # No event tells a process its parent died; polling getppid() once a second does.
    while os.getppid() == parent:  # noqa: ASYNC110
        await asyncio.sleep(1)
    log.error("the supervisor (pid %d) is gone; stopping", parent)
    stop.set()


def listening_urls(runner: Listener | web.BaseRunner, scheme: str = "http") -> list[str]:
    """``http://host:port`` (or ``scheme``'s) for each socket the runner listens on."""
    return [_format_address(a, scheme) for a in runner.addresses]


def _format_address(address: object, scheme: str = "http") -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        host = f"[{host}]" if ":" in str(host) else host
        return f"{scheme}://{host}:{port}"
    return str(address)
