"""A Python stand-in for a Function URL, run in its own process::

    python -m harness.upstream PORT

It reads each request's body and answers, without looking at signatures:

* ``/stream``: a streamed response, the first chunk at once, then STREAM_CHUNKS - 1 more
  chunks STREAM_INTERVAL_S apart (time to first byte);
* ``/big``: BIG_BYTES of body (peak memory of a proxy streaming it);
* anything else: ``{"ok":true}`` (bench/proxy_bench.py's upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from aiohttp import web

STREAM_CHUNKS = 5  # first at once, then one every STREAM_INTERVAL_S
STREAM_INTERVAL_S = 0.025
BIG_BYTES = 64 * 1024 * 1024


async def handler(request: web.BaseRequest) -> web.StreamResponse:
    await request.read()
    if request.path == "/big":
        chunk = b"x" * (256 * 1024)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = BIG_BYTES
        await resp.prepare(request)
        for _ in range(BIG_BYTES // len(chunk)):
            await resp.write(chunk)
    elif request.path == "/stream":
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        await resp.write(b"first chunk\n")
        for i in range(1, STREAM_CHUNKS):
            await asyncio.sleep(STREAM_INTERVAL_S)
            await resp.write(f"chunk {i}\n".encode())
    else:
        return web.Response(body=b'{"ok":true}', content_type="application/json")
    await resp.write_eof()
    return resp


async def serve(port: int) -> None:
    runner = web.ServerRunner(web.Server(handler, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(int(sys.argv[1])))
