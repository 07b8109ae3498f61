"""Listening sockets for :class:`~sigproxy.http1.Http1Server`: bound to a host and
port or a supervisor's socket, plain or TLS, and their graceful stop.

With TLS, every handshake uses the listener's context as it is then, so a reload that
swaps it leaves open connections alone. The server makes each connection's protocol at
the accept, so a connection counts against ``limits.max_client_connections`` from its
first byte (over the cap it is closed before any handshake work); the protocol hears of
the connection once the handshake is done, or of its loss if it never is.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

from .config import ListenTls
from .http1 import Connection, Http1Server
from .tls import server_context

log = logging.getLogger("sigproxy")

BACKLOG = 128


class Listener:
    """One listening socket serving ``server``; :meth:`cleanup` stops accepting, lets
    requests in hand finish within ``grace`` seconds, then closes every connection."""

    def __init__(self, server: Http1Server, *, grace: float) -> None:
        self.server = server
        self.grace = grace
        self._listening: asyncio.Server | None = None
        self._tls: TlsListener | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(
        self,
        host: str,
        port: int,
        sock: socket.socket | None = None,
        *,
        tls: TlsListener | None = None,
    ) -> None:
        """Listen on ``sock`` (a supervisor's) or bind ``host:port``; raises OSError."""
        loop = asyncio.get_running_loop()
        self._tls = tls
        factory: Callable[[], asyncio.Protocol] = self.server if tls is None else self._accept_tls
        if sock is not None:
            self._listening = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
        else:
            self._listening = await loop.create_server(
                factory, host, port, backlog=BACKLOG, reuse_address=True
            )

    @property
    def addresses(self) -> list[Any]:
        if self._listening is None:
            return []
        return [s.getsockname() for s in self._listening.sockets]

    async def cleanup(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            listening.close()
        for task in list(self._handshakes):
            task.cancel()
        # Requests that arrived before the socket closed start being handled first.
        await asyncio.sleep(0)
        self.server.pre_shutdown()
        await self.server.shutdown(self.grace)
        if listening is not None:
            await listening.wait_closed()

    def _accept_tls(self) -> asyncio.Protocol:
        return _Handshake(self._handshake)

    def _handshake(self, transport: asyncio.Transport, guard: _Handshake) -> None:
        server = self.server
        protocol = server()
        if not isinstance(protocol, Connection):  # over the cap: logged by the server
            # No 503 can be said before a handshake: counted all the same.
            if server.on_refusal is not None:
                server.on_refusal("too_many_connections")
            transport.abort()
            return
        transport.pause_reading()  # the ClientHello is for the TLS layer
        task = asyncio.get_running_loop().create_task(self._start_tls(transport, guard, protocol))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _start_tls(
        self, transport: asyncio.Transport, guard: _Handshake, protocol: Connection
    ) -> None:
        tls = self._tls
        assert tls is not None
        try:
            secure = await asyncio.get_running_loop().start_tls(
                transport,
                guard,
                tls.context,
                server_side=True,
                ssl_handshake_timeout=tls.handshake_timeout,
            )
        except asyncio.CancelledError:  # the listener is stopping
            transport.abort()
            protocol.connection_lost(None)  # never connected: it only gives its place back
            raise
        except Exception as exc:
            transport.abort()
            protocol.connection_lost(exc)
            tls.refused(transport, exc)
            return
        if secure is None:  # only for a transport that is closing already
            protocol.connection_lost(None)
            return
        guard.hand_over(secure, protocol)


class TlsListener:
    """The proxy listener's TLS: the context new handshakes use, made from ``spec``'s
    files, and made again from them by :meth:`reload`."""

    def __init__(self, spec: ListenTls, *, handshake_timeout: float) -> None:
        self.spec = spec
        self.handshake_timeout = handshake_timeout
        self.context: ssl.SSLContext = server_context(spec)
        self._quiet_until = 0.0

    def reload(self) -> ssl.SSLContext:
        """A context from the files as they are now (raises ConfigError); the caller swaps
        it in with :meth:`use` once the rest of the reload has succeeded."""
        return server_context(self.spec)

    def use(self, context: ssl.SSLContext) -> None:
        # Handshakes from now on; a connection keeps the context it was made with.
        self.context = context

    def refused(self, transport: asyncio.BaseTransport, exc: BaseException) -> None:
        """Log a failed handshake: at INFO at most once a minute (a port scanner or a
        client without a certificate must not flood the log), else at DEBUG."""
        now = time.monotonic()
        level = logging.INFO if now >= self._quiet_until else logging.DEBUG
        if level == logging.INFO:
            self._quiet_until = now + 60
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else "a client"
        log.log(
            level,
            "proxy listener: TLS handshake with %s failed: %s (more within a minute are "
            "logged at debug)",
            address,
            _handshake_failure(exc, self.handshake_timeout),
        )


def _handshake_failure(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason == "HTTP_REQUEST":
        return "a plain HTTP request; this listener speaks HTTPS (https:// URLs)"
    if isinstance(exc, ssl.SSLError) and exc.reason == "TLSV1_ALERT_UNKNOWN_CA":
        return "the client does not trust the listener's certificate (tlsv1 alert unknown ca)"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, ConnectionAbortedError | TimeoutError):
        return f"no handshake within {timeout:g}s (client_timeouts.header)"
    if isinstance(exc, ConnectionError):
        return "the client closed the connection"
    return re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc)) or type(exc).__name__


class _Handshake(asyncio.Protocol):
    """A TLS connection's protocol until the server's takes over: on the accepted
    transport, it asks for the handshake; during it, it stands in for the server's
    protocol, and what arrives before the handover (a request sent together with the
    handshake's last flight, an end of stream, the loss of the connection) is passed on."""

    __slots__ = ("_early", "_eof", "_lost", "_protocol", "_start")

    def __init__(self, start: Callable[[asyncio.Transport, _Handshake], None]) -> None:
        self._start = start
        self._protocol: asyncio.Protocol | None = None
        self._early: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._start(cast(asyncio.Transport, transport), self)

    def hand_over(self, transport: asyncio.Transport, protocol: asyncio.Protocol) -> None:
        if self._lost is not None:
            protocol.connection_lost(self._lost[0])
            return
        transport.set_protocol(protocol)
        self._protocol = protocol
        protocol.connection_made(transport)
        for data in self._early:
            protocol.data_received(data)
        self._early.clear()
        if self._eof:
            protocol.eof_received()

    def data_received(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.data_received(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self._protocol is not None:
            return self._protocol.eof_received()
        self._eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._protocol is not None:
            self._protocol.connection_lost(exc)
        else:
            self._lost = (exc,)
