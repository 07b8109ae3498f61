"""The open-loop load generator and its tiny HTTP/1.1 response reader.

The open-loop generator is wrk2's idea (wrk2 is not in Debian): requests are scheduled
at a fixed rate whatever the server does, spread over ``conns`` keep-alive connections,
and each request's latency counts from its *scheduled* send time, so a server that
stalls is charged for the requests queued behind the stall (no coordinated omission).
Run it in its own process (``python -m harness.load ...``, see :func:`run_open_loop`)
so it shares no event loop with what it measures.

Every loop is bounded in time: each request by ``request_timeout``, the whole run by
the schedule plus ``request_timeout`` + 5 s, after which unfinished requests are counted
as such.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass

from .measure import run_child

REQUEST_TIMEOUT_S = 10.0  # per request, in every generator (wrk's --timeout too)


# --------------------------------------------------------------------------- reader


class ConnectionClosed(ConnectionError):
    """The server closed the connection before a complete response."""


@dataclass(frozen=True)
class Response:
    status: int
    consumed: int  # bytes of the buffer this response took
    close: bool  # the server closes the connection after it


def parse_response(buf: bytes | bytearray, eof: bool = False) -> Response | None:
    """The complete HTTP/1.1 response at the start of ``buf``, or None while more bytes
    are needed. ``eof``: the connection has closed, so a body without a length ends with
    the buffer. Raises ValueError for what is not an HTTP/1.x response."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line, *lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"bad status line {status_line[:80]!r}")
    status = int(code)
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip().lower()
    connection = headers.get("connection", "")
    close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    pos = end + 4
    if 100 <= status < 200:  # an interim response: the real one follows
        final = parse_response(buf[pos:], eof)
        return None if final is None else Response(final.status, pos + final.consumed, final.close)
    if status in (204, 304):
        return Response(status, pos, close)
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                while True:  # trailers, then the empty line
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        return None
                    if eol == pos:
                        return Response(status, pos + 2, close)
                    pos = eol + 2
            if len(buf) < pos + size + 2:
                return None
            pos += size + 2
    if "content-length" in headers:
        length = int(headers["content-length"])
        return None if len(buf) < pos + length else Response(status, pos + length, close)
    # Neither: the body runs until the server closes the connection.
    return Response(status, len(buf), True) if eof else None


class _Conn(asyncio.Protocol):
    """One keep-alive client connection: one request at a time, its status as a future."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._deliver(eof=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._deliver(eof=True)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionClosed("connection closed before a response"))

    def _deliver(self, eof: bool) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            parsed = parse_response(self.buf, eof)
        except ValueError as exc:
            waiter.set_exception(exc)
            return
        if parsed is not None:
            del self.buf[: parsed.consumed]
            if parsed.close:
                self.close()
            waiter.set_result(parsed.status)

    def request(self, data: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


# --------------------------------------------------------------------------- open loop


def percentile(sorted_values: list[float], p: float) -> float | None:
    """The nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass
class OpenLoopResult:
    """One open-loop run. Counts without a ``_total`` are of the measured window only."""

    rate: float
    seconds: float
    warmup: float
    connections: int
    body_bytes: int
    scheduled_total: int  # requests scheduled, warm-up included
    sent: int  # requests written to a connection, warm-up included
    scheduled: int  # requests scheduled in the measured window
    ok: int  # of those, answered with a 2xx status
    errors: dict[str, int]  # of those, the others by kind ("status 500", "timeout", ...)
    warmup_errors: int  # requests of the warm-up that failed, whatever the kind
    achieved_rps: float  # ok / seconds
    p50_ms: float | None  # latencies of the ok requests, from the scheduled send time
    p90_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    max_ms: float | None
    send_lag_p99_ms: float | None  # scheduled time to the moment a connection took it
    generator_cpu_share: float  # the generator's own CPU seconds per wall-clock second
    proxy_cpu_per_1k: float | None = None  # filled in by a caller measuring the server


async def open_loop(
    port: int,
    rate: float,
    seconds: float,
    warmup: float = 0.0,
    body_bytes: int = 1024,
    conns: int = 32,
    request_timeout: float = REQUEST_TIMEOUT_S,
    host: str = "127.0.0.1",
) -> OpenLoopResult:
    """POST ``body_bytes`` bytes to ``host:port`` at ``rate`` requests/s for ``warmup``
    (not counted) then ``seconds`` seconds, open loop, over ``conns`` connections."""
    loop = asyncio.get_running_loop()
    request = (
        f"POST / HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {body_bytes}\r\n\r\n"
    ).encode() + b"x" * body_bytes
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    send_lags: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    sent = warmup_errors = 0
    start = time.perf_counter() + 0.2
    measure_from = start + warmup
    end = measure_from + seconds
    total = int((warmup + seconds) * rate)

    async def one(conn: _Conn | None) -> tuple[str | None, _Conn | None]:
        """Send one request: (error kind or None, the connection to use next)."""
        nonlocal sent
        try:
            if conn is None or conn.closed:
                conn = None
                try:
                    connecting = loop.create_connection(_Conn, host, port)
                    _, new = await asyncio.wait_for(connecting, request_timeout)
                except (OSError, TimeoutError):
                    return "connect error", None
                conn = new
            waiter = conn.request(request)
            sent += 1
            status = await asyncio.wait_for(waiter, request_timeout)
        except ConnectionClosed:
            kind = "connection closed"
        except TimeoutError:
            kind = "timeout"
        except ValueError:
            kind = "bad response"
        except OSError as exc:
            kind = type(exc).__name__
        else:
            return (None if 200 <= status < 300 else f"status {status}"), conn
        if conn is not None:
            conn.close()
        return kind, None

    async def worker() -> None:
        nonlocal warmup_errors
        conn: _Conn | None = None
        try:
            while (t_sched := await queue.get()) is not None:
                t_send = time.perf_counter()
                error, conn = await one(conn)
                t_done = time.perf_counter()
                if t_sched < measure_from:
                    warmup_errors += error is not None
                    continue
                send_lags.append(t_send - t_sched)
                if error is None:
                    latencies.append(t_done - t_sched)
                else:
                    errors[error] += 1
        finally:
            if conn is not None:
                conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(conns)]
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    i = scheduled = 0
    while i < total:
        now = time.perf_counter()
        while i < total and (t := start + i / rate) <= now:
            queue.put_nowait(t)
            scheduled += t >= measure_from
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
    for _ in workers:
        queue.put_nowait(None)
    deadline = max(0.0, end - time.perf_counter()) + request_timeout + 5
    _, pending = await asyncio.wait(workers, timeout=deadline)
    for task in pending:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    if unfinished := scheduled - len(send_lags):
        errors["unfinished at the deadline"] += unfinished
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
    latencies.sort()
    send_lags.sort()
    return OpenLoopResult(
        rate=rate,
        seconds=seconds,
        warmup=warmup,
        connections=conns,
        body_bytes=body_bytes,
        scheduled_total=total,
        sent=sent,
        scheduled=scheduled,
        ok=len(latencies),
        errors=dict(errors),
        warmup_errors=warmup_errors,
        achieved_rps=round(len(latencies) / seconds, 1),
        p50_ms=ms(percentile(latencies, 50)),
        p90_ms=ms(percentile(latencies, 90)),
        p99_ms=ms(percentile(latencies, 99)),
        p999_ms=ms(percentile(latencies, 99.9)),
        max_ms=ms(latencies[-1] if latencies else None),
        send_lag_p99_ms=ms(percentile(send_lags, 99)),
        generator_cpu_share=round(cpu / max(time.perf_counter() - start, 1e-9), 3),
    )


def run_open_loop(
    port: int,
    rate: float,
    seconds: float,
    warmup: float,
    body_bytes: int,
    conns: int,
    timeout: float = REQUEST_TIMEOUT_S,
) -> OpenLoopResult:
    """:func:`open_loop` in its own process."""
    args = [str(x) for x in (port, rate, seconds, warmup, body_bytes, conns, timeout)]
    line = run_child("load", args, timeout=warmup + seconds + timeout + 60)
    return OpenLoopResult(**json.loads(line))


# --------------------------------------------------------------------------- child entry


def main(argv: list[str]) -> int:
    """``PORT RATE SECONDS WARMUP BODY CONNS TIMEOUT``: one run, its result as JSON."""
    if len(argv) != 7:
        print(f"usage: python -m harness.load {main.__doc__}; got {argv}", file=sys.stderr)
        return 2
    port, rate, seconds, warmup, body, conns, timeout = argv
    numbers = (int(port), float(rate), float(seconds), float(warmup), int(body), int(conns))
    result = asyncio.run(open_loop(*numbers, request_timeout=float(timeout)))
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
