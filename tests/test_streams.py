"""Idle and long streams through the real ``sigproxy serve`` process: the upstream read
timeout is a time between bytes, a slow client holds the upstream back instead of
growing the proxy's memory, and a client that leaves ends the upstream stream at once.
(Scaled down: a heartbeat every 0.4 s against a 1.2 s read timeout stands for one every
20 s against 60 s.)"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

from aiohttp import web

from .support import FakeFunctionUrl, Recorded, verify_sigv4
from .test_process import serve_process, write

HEAD = b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def streaming(upstream: FakeFunctionUrl, chunks: int, every: float, size: int) -> dict[str, object]:
    """The upstream answers with ``chunks`` chunks of ``size`` bytes, one every ``every``
    seconds; the returned dict says how far it got and how it ended."""
    state: dict[str, object] = {"sent": 0, "ended": None}

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = b"x" * size
        try:
            for _ in range(chunks):
                await response.write(chunk)
                state["sent"] = int(str(state["sent"])) + len(chunk)
                if every:
                    await asyncio.sleep(every)
            await response.write_eof()
            state["ended"] = ("done", time.monotonic())
        except (ConnectionError, asyncio.CancelledError) as exc:
            state["ended"] = (type(exc).__name__, time.monotonic())
            raise
        return response

    upstream.answer = answer
    return state


def config(port: int, read: float) -> str:
    return (
        "admin: false\n"
        "client_timeouts: {header: 1, body: 1}\n"
        "upstreams:\n"
        f"  - {{name: fn, url: 'http://127.0.0.1:{port}', region: us-east-1, "
        f"timeout: {{read: {read}, idle: 1}}}}\n"
    )


async def read_all(port: int) -> tuple[bytes, list[float]]:
    """The raw answer and when each piece of it arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD)
    await writer.drain()
    data = b""
    arrivals = []
    try:
        while piece := await reader.read(1 << 16):
            data += piece
            arrivals.append(time.monotonic())
            if data.endswith(b"\r\n0\r\n\r\n"):
                break
    except ConnectionResetError:
        pass
    writer.close()
    return data, arrivals


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_heartbeat_keeps_a_stream_alive_past_the_read_timeout(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """A heartbeat every 0.4 s for 4 s with a 1.2 s read timeout: the whole stream
    arrives, the pieces spread over the 4 s (relayed as they come, not buffered)."""
    state = streaming(upstream, chunks=10, every=0.4, size=16)
    async with serve_process(write(tmp_path, config(upstream.port, read=1.2))) as served:
        t0 = time.monotonic()
        data, arrivals = await read_all(served.port)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert data.endswith(b"\r\n0\r\n\r\n")  # a clean end: nothing was cut
        assert data.count(b"x" * 16) == 10
        assert arrivals[-1] - t0 >= 3.5  # longer than the read timeout, three times over
        assert len(arrivals) >= 8  # piece by piece
        assert state["ended"] is not None and state["ended"][0] == "done"  # type: ignore[index]
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0


async def test_silence_longer_than_the_read_timeout_cuts_the_stream(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    streaming(upstream, chunks=2, every=2.5, size=16)
    async with serve_process(write(tmp_path, config(upstream.port, read=1.0))) as served:
        data, _ = await read_all(served.port)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert not data.endswith(b"\r\n0\r\n\r\n")  # cut (reset), never a clean end
        assert await served.stop() == 0
    assert "failed mid-response" in served.log()


async def test_a_slow_client_holds_back_the_upstream_not_the_proxys_memory(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """200 MB streamed to a client that stops reading for 3 s: the upstream is held back
    (it gets nowhere near 200 MB sent), the proxy's RSS stays flat, and when the client
    reads again all 200 MB arrive."""
    total = 200 * 1024 * 1024
    size = 256 * 1024
    state = streaming(upstream, chunks=total // size, every=0, size=size)
    async with serve_process(write(tmp_path, config(upstream.port, read=30))) as served:
        pid = served.proc.pid
        before = rss_kib(pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port, limit=1 << 16)
        writer.transport.set_write_buffer_limits(0)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        writer.write(HEAD)
        await writer.drain()
        got = len(await reader.read(1 << 16))
        peak = 0
        for _ in range(30):  # 3 s without reading
            await asyncio.sleep(0.1)
            peak = max(peak, rss_kib(pid))
        sent_while_paused = int(str(state["sent"]))
        assert sent_while_paused < 32 * 1024 * 1024, sent_while_paused
        assert peak - before < 40 * 1024, (before, peak)  # KiB: flat, not ~200 MB
        while piece := await reader.read(1 << 20):
            got += len(piece)
            peak = max(peak, rss_kib(pid))
        writer.close()
        assert got > total  # the body plus the chunked framing and the head
        assert peak - before < 40 * 1024, (before, peak)
        assert await served.stop() == 0


async def test_a_client_that_leaves_ends_the_upstream_stream_at_once(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    state = streaming(upstream, chunks=1000, every=0.05, size=16)
    async with serve_process(write(tmp_path, config(upstream.port, read=30))) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(HEAD)
        await writer.drain()
        assert (await reader.read(1 << 16)).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.3)
        writer.close()
        left = time.monotonic()
        deadline = left + 5
        while state["ended"] is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ended = state["ended"]
        assert ended is not None, "the upstream stream was still running 5 s later"
        kind, when = ended  # type: ignore[misc]
        assert kind != "done"
        assert when - left < 1.0
        assert int(str(state["sent"])) < 1000 * 16
        assert await served.stop() == 0
    assert os.path.exists(f"/proc/{served.proc.pid}") is False
