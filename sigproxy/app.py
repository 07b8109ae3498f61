"""The app factory and the server that runs it: wiring and lifecycle, no request logic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from .config import Config
from .credentials import CredentialStore
from .errors import ListenError
from .metrics import Metrics
from .proxy import Proxy

log = logging.getLogger("sigproxy")

PROXY_KEY = web.AppKey("proxy", Proxy)
METRICS_KEY = web.AppKey("metrics", Metrics)


def create_app(
    config: Config,
    *,
    credentials: CredentialStore | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """Build the proxy application.

    ``credentials`` defaults to resolving every upstream's credentials now (blocking);
    ``registry`` defaults to a fresh registry, so apps never share metrics by accident.
    """
    store = credentials if credentials is not None else CredentialStore.resolve(config)
    metrics = Metrics(registry)
    proxy = Proxy(config, store, metrics)
    app = web.Application()
    app[PROXY_KEY] = proxy
    app[METRICS_KEY] = metrics
    # One catch-all route: the proxy port claims no paths of its own.
    app.router.add_route("*", "/{tail:.*}", proxy.handle, expect_handler=proxy.expect)

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        await proxy.open()
        yield
        await proxy.close()

    app.cleanup_ctx.append(client_session)
    return app


def make_runner(app: web.Application, *, shutdown_timeout: float = 30.0) -> web.AppRunner:
    """An AppRunner set up the way sigproxy serves: a client that disconnects cancels
    its handler (and so its upstream request), and aiohttp's own access log (which would
    print query strings) is off in favour of sigproxy's; request bodies are not
    decompressed."""
    return web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        # Request bodies go upstream byte for byte, Content-Encoding and all: the hash
        # is of what is sent, and the function decides what to do with gzip.
        auto_decompress=False,
    )


@contextlib.asynccontextmanager
async def stop_signals() -> AsyncIterator[asyncio.Event]:
    """An event set by SIGTERM or SIGINT. The handlers stay installed until the block
    ends, so a second signal can't kill requests that are still finishing."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def start_proxy(config: Config, credentials: CredentialStore) -> web.AppRunner:
    """Set up the app and open its listening socket; returns the runner to clean up."""
    runner = make_runner(create_app(config, credentials=credentials))
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(
            f"cannot listen on {config.listen.host}:{config.listen.port}: {exc.strerror or exc}"
        ) from None
    for address in listening_urls(runner):
        log.info("sigproxy listening on %s", address)
    return runner


async def serve(config: Config, credentials: CredentialStore) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let requests finish."""
    async with stop_signals() as stop:
        runner = await start_proxy(config, credentials)
        try:
            await stop.wait()
            log.info("stopping: no new connections, letting requests in flight finish")
        finally:
            await runner.cleanup()
    log.info("stopped")


def listening_urls(runner: web.BaseRunner) -> list[str]:
    """``http://host:port`` for each socket the runner listens on."""
    return [_format_address(a) for a in runner.addresses]


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"
    return str(address)
