"""What floods of hostile or greedy clients make a real ``sigproxy serve`` hold.

A measurement run by hand, not a test (tests/test_holes.py asserts the bounds). From the
repo root::

    python bench/flood_bench.py [heads|bodies|conns ...]

Everything runs on 127.0.0.1: a stand-in Function URL (in this process) that reads each
request, waits 0.5 s and answers, the real proxy (``python -m sigproxy serve``, default
config: default limits, the admin listener on a free port, log_level info; static fake
credentials from the environment), and one flood:

* ``heads``: 130 connections each trickling 128 headers of 8 KB (about 1 MB of head per
  connection, as the review that found the hole sent);
* ``bodies``: 100 concurrent 6 MiB uploads (the Function URL limit);
* ``conns``: 1,500 concurrent slow requests.

For each it prints the answers the clients got, the proxy's resident memory before and
its peak (VmHWM) after, and for ``conns`` how many upstream connections were opened.
Every loop is bounded; the proxy is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import resource
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def memory_mib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: int(re.search(key + r":\s+(\d+)", status).group(1)) // 1024  # type: ignore[union-attr]
        for key in ("VmRSS", "VmHWM")
    }


async def start_upstream(peers: set[int]) -> tuple[web.AppRunner, int]:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername")[1])
        await asyncio.sleep(0.5)
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def start_proxy(upstream_port: int) -> tuple[asyncio.subprocess.Process, int]:
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)  # noqa: SIM115
    config.write(
        "admin: {host: 127.0.0.1, port: 0}\nupstreams:\n"
        f"  - {{name: fn, url: 'http://127.0.0.1:{upstream_port}', region: us-east-1}}\n"
    )
    config.close()
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID="AKIDFLOODBENCH",
        AWS_SECRET_ACCESS_KEY="flood-bench-secret",  # noqa: S106 - a fake, for signing only
        AWS_EC2_METADATA_DISABLED="true",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigproxy", "serve", "--config", config.name, "--port", "0",
        "--log-level", "info",
        stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        if not line:
            raise SystemExit("sigproxy exited before listening")
        m = re.search(r"sigproxy listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            break

    async def drain() -> None:
        assert proc.stderr is not None
        async for _ in proc.stderr:
            pass

    asyncio.get_running_loop().create_task(drain())
    return proc, int(m.group(1))


async def heads(port: int) -> list[str]:
    async def one() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            for i in range(128):
                writer.write(b"X-H%d: " % i + b"a" * 8000 + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            return (await asyncio.wait_for(reader.read(), 20))[:12].decode() or "closed"
        except (ConnectionError, TimeoutError) as exc:
            return type(exc).__name__
        finally:
            writer.close()

    return await asyncio.gather(*(one() for _ in range(130)))


async def bodies(port: int) -> list[str]:
    body = b"x" * (6 * MIB)

    async def one() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST /u HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), 60))[:12].decode() or "closed"
        except (ConnectionError, TimeoutError) as exc:
            return type(exc).__name__
        finally:
            writer.close()

    return await asyncio.gather(*(one() for _ in range(100)))


async def conns(port: int) -> list[str]:
    async def one() -> str:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            return answer[:12].decode() or "closed"
        except (OSError, TimeoutError) as exc:
            return type(exc).__name__

    return await asyncio.gather(*(one() for _ in range(1500)))


FLOODS: dict[str, Callable[[int], Awaitable[list[str]]]] = {
    "heads": heads,
    "bodies": bodies,
    "conns": conns,
}


async def run(name: str) -> None:
    peers: set[int] = set()
    upstream, upstream_port = await start_upstream(peers)
    proc, port = await start_proxy(upstream_port)
    try:
        await asyncio.sleep(0.5)
        before = memory_mib(proc.pid)
        answers = collections.Counter(await FLOODS[name](port))
        after = memory_mib(proc.pid)
        print(f"{name}: answers {dict(answers)}")
        print(
            f"  proxy RSS {before['VmRSS']} MiB before, peak {after['VmHWM']} MiB "
            f"(+{after['VmHWM'] - before['VmRSS']} MiB)"
        )
        if name == "conns":
            print(f"  upstream connections opened: {len(peers)}")
    finally:
        proc.terminate()
        await proc.wait()
        await upstream.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("floods", nargs="*", metavar="|".join(FLOODS), help="default: all")
    args = parser.parse_args()
    unknown = set(args.floods) - set(FLOODS)
    if unknown:
        parser.error(f"unknown flood(s): {', '.join(sorted(unknown))}")
    # This process holds 1,500 client sockets for the conns flood.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    for name in args.floods or FLOODS:
        asyncio.run(run(name))


if __name__ == "__main__":
    main()
