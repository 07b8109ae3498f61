"""A refusal reaches a client that is still sending. When sigproxy answers before it has
read the whole request (a body over the limit, a head over the limit, a misdirected
Host), closing at once would make the kernel answer the unread bytes with a reset, and a
client still sending reads "connection reset" instead of the answer: Python's urllib
does, and any client on Windows, whose kernel drops received data on a reset. So the
connection lingers: FIN after the answer, what arrives is dropped until the client
closes, for a bounded time. Against the real ``sigproxy serve`` process, with urllib and
blocking raw sockets (no client library to smooth the reset away), over HTTP and TLS."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import one_upstream
from .support import FakeFunctionUrl, raw_request
from .test_listener_tls import Pki, pki, serve_tls, tls_config
from .test_process import serve_process, write

__all__ = ["pki"]  # a fixture

BIG = 8_000_000  # over the default 6 MiB body limit


def urllib_post(url: str, size: int, context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    """POST ``size`` bytes with the standard library, which sends the whole body before
    it reads a byte of the answer: (status, JSON error body). Any other outcome (a reset
    above all) raises."""
    # (S310: the tests' own http:// and https:// URLs)
    request = urllib.request.Request(url, data=b"x" * size, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:  # noqa: S310
            return resp.status, {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def send_all_then_read(port: int, head: bytes, body: bytes) -> tuple[bytes, str]:
    """Send ``head`` and ``body`` whole on a blocking socket, half-close, read to the end:
    (what was read, how it ended: "eof", or the error's name). A reset on the send is
    reported as such, whatever was read after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError as err:
            return b"", type(err).__name__
        got = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError as err:
                return got, type(err).__name__
            if not data:
                return got, "eof"
            got += data


def status_and_error(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


async def test_urllib_uploading_over_the_limit_reads_the_413(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Twice on fresh connections, 8 MB and 7 MB: each an HTTPError 413 with its JSON,
    never a ConnectionResetError; nothing reached the upstream; the proxy serves on."""
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        for size in (BIG, 7_000_000):
            status, error = await asyncio.to_thread(urllib_post, served.url + "/f", size)
            assert status == 413
            assert error["error"] == "body_too_large"
        assert upstream.requests == []
        assert (await raw_request(served.port, "GET", "/after")).status == 200
        assert await served.stop() == 0
    assert "Traceback" not in served.log()


REFUSED = {
    "body over the limit": (
        b"POST /f HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % BIG,
        b"b" * BIG,
        413,
        "body_too_large",
    ),
    "chunked body over the limit": (
        b"POST /f HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"".join(b"10000\r\n%s\r\n" % (b"c" * 0x10000) for _ in range(120)) + b"0\r\n\r\n",
        413,
        "body_too_large",
    ),
    "head over the limit": (
        b"GET /f HTTP/1.1\r\nHost: localhost\r\n",
        b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 4000) for i in range(400)) + b"\r\n",
        431,
        "headers_too_large",
    ),
    "misdirected Host with a body": (
        b"POST /f HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 4000000\r\n\r\n",
        b"m" * 4_000_000,
        421,
        "host_not_allowed",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_a_client_sending_its_whole_request_reads_the_refusal(
    upstream: FakeFunctionUrl, tmp_path: Path, case: str
) -> None:
    head, body, status, error = REFUSED[case]
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        got, end = await asyncio.to_thread(send_all_then_read, served.port, head, body)
        assert end == "eof", f"{case}: the client saw {end} (read {got[:60]!r})"
        assert status_and_error(got) == (status, error)
        assert upstream.requests == []
        assert (await raw_request(served.port, "GET", "/after")).status == 200
        assert await served.stop() == 0


async def test_over_tls_urllib_reads_the_413(upstream: FakeFunctionUrl, pki: Pki) -> None:
    """The TLS listener (no half-close in TLS) lingers the same way."""
    path = write(pki.folder, tls_config(upstream.port))
    async with serve_tls(path) as served:
        url = f"https://localhost:{served.port}/f"
        status, error = await asyncio.to_thread(urllib_post, url, BIG, pki.client())
        assert status == 413
        assert error["error"] == "body_too_large"
        assert upstream.requests == []
        assert await served.stop() == 0


def refuse_then_keep_sending(port: int, seconds: float) -> tuple[bytes, bool, float, str]:
    """A head over the limit, then 1 KiB every 20 ms for up to ``seconds``, reading what
    comes: (what was read, whether the answer ended in a FIN, seconds from the refusal
    until a send failed, how the sending ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /f HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"p" * 200_000)
        sock.setblocking(False)
        got, fin, refused_at = b"", False, 0.0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sock.send(b"q" * 1024)
            except BlockingIOError:
                pass
            except OSError as err:
                return got, fin, time.monotonic() - refused_at, type(err).__name__
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ConnectionError):
                data = None  # (a reset shows on the next send)
            if data == b"":
                fin = True
            elif data:
                if not got:
                    refused_at = time.monotonic()
                got += data
            time.sleep(0.02)
        return got, fin, time.monotonic() - refused_at, "still open"


async def test_lingering_is_bounded_by_the_header_timeout(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """A client that never stops sending after its refusal is cut within the linger
    time (here the 1 s header timeout, shorter than 10 s), having read the 431 first."""
    path = write(tmp_path, "client_timeouts: {header: 1}\n" + one_upstream(upstream.port))
    async with serve_process(path) as served:
        got, fin, after, end = await asyncio.to_thread(refuse_then_keep_sending, served.port, 8)
        assert status_and_error(got) == (431, "headers_too_large")
        assert fin, "the answer was not followed by a FIN"
        assert end != "still open"
        assert 0.8 <= after <= 3.0, f"cut {after:.2f} s after the refusal ({end})"
        assert (await raw_request(served.port, "GET", "/after")).status == 200
        assert await served.stop() == 0


async def test_a_stop_does_not_wait_for_lingering_connections(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """SIGTERM while a refused client keeps its connection open (up to 10 s of linger):
    the process exits at once, 0."""
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /f HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"p" * 200_000)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 431 ")
        started = time.monotonic()
        assert await served.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5
        writer.close()


def over_the_cap(port: int, seconds: float) -> tuple[bytes, float, str]:
    """A request sent at once, then 1 KiB every 20 ms: (what was read, seconds from the
    answer until a send failed, how the sending ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /f HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n")
        sock.setblocking(False)
        got, answered, deadline = b"", 0.0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError as err:
                return got, time.monotonic() - answered, type(err).__name__
            if data and not got:
                answered = time.monotonic()
            got += data or b""
            try:
                sock.send(b"q" * 1024)
            except BlockingIOError:
                pass
            except OSError as err:
                return got, time.monotonic() - answered, type(err).__name__
            time.sleep(0.02)
        return got, time.monotonic() - answered, "still open"


async def test_a_connection_over_the_cap_reads_its_503_then_is_cut_within_a_second(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Over limits.max_client_connections, a client whose request is already sent reads
    the 503 too_many_connections (not a reset); if it keeps sending, it is cut after
    about a second (these connections are over the cap: they linger briefly)."""
    path = write(tmp_path, "limits: {max_client_connections: 1}\n" + one_upstream(upstream.port))
    async with serve_process(path) as served:
        _, holder = await asyncio.open_connection("127.0.0.1", served.port)
        await asyncio.sleep(0.2)
        got, after, end = await asyncio.to_thread(over_the_cap, served.port, 6)
        assert status_and_error(got) == (503, "too_many_connections")
        assert end != "still open"
        assert after <= 3.0, f"cut {after:.2f} s after the answer"
        holder.close()
        await asyncio.sleep(0.2)
        assert (await raw_request(served.port, "GET", "/after")).status == 200
        assert await served.stop() == 0
