"""``sigproxy serve --workers N`` as a real process tree: requests served by every worker,
metrics that add up across workers, reload and graceful stop through the supervisor, a
dead worker replaced, systemd hearing from the supervisor only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sigproxy.errors import ConfigError
from sigproxy.workers import worker_count

from .conftest import FakeSts, one_upstream
from .support import FakeFunctionUrl, Recorded, raw_request, verify_sigv4
from .test_credentials import ROLE
from .test_operations import scrape, value
from .test_process import creds_env, serve_process, write


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


async def wait_for(pred, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def requests_counted(pid: int) -> float:
    """sigproxy_requests_total as written by one worker to its multiprocess file."""
    from prometheus_client.mmap_dict import MmapedDict

    files = list(Path(tempfile.gettempdir()).glob(f"sigproxy-metrics-*/counter_{pid}.db"))
    assert len(files) == 1, files
    total = 0.0
    for key, count, *_ in MmapedDict.read_all_values_from_file(str(files[0])):
        if key.startswith('["sigproxy_requests", "sigproxy_requests_total"'):
            total += count
    return total


def test_worker_count() -> None:
    assert worker_count("3") == 3
    assert worker_count("auto") >= 1
    for bad in ("0", "-1", "many", "999"):
        with pytest.raises(ConfigError):
            worker_count(bad)


async def test_workers_serve_and_metrics_add_up(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, "--workers", "2") as served:
        await wait_for(lambda: "2 workers ready" in served.log())
        workers = children(served.proc.pid)
        assert len(workers) == 2
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> int:
                async with session.post(f"{served.url}/n/{i}", data=b"{}") as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one(i) for i in range(60)))
        assert set(statuses) == {200}
        verify_sigv4(upstream.last, region="us-east-1")
        m = await scrape(served.admin_port or 0)
        total = value(m, "sigproxy_requests_total", upstream="fn", method="POST", status="200")
        assert total == 60  # summed over both workers
        assert value(m, "sigproxy_requests_in_flight") == 0
        # Both workers took part (SO_REUSEPORT spreads new connections): each worker's
        # own counter file holds some of the requests.
        per_worker = {pid: requests_counted(pid) for pid in workers}
        assert sum(per_worker.values()) == 60
        assert all(n > 0 for n in per_worker.values()), per_worker
        assert await served.stop() == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


async def test_reload_and_graceful_stop_reach_every_worker(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.raw_target.endswith("/slow"):
            await asyncio.wait_for(release.wait(), 20)
        return web.json_response({"target": rec.raw_target})

    upstream.answer = answer
    path = write(tmp_path, one_upstream(upstream.port, path_prefix="/old"))
    async with serve_process(path, "--workers", "2") as served:
        await wait_for(lambda: "2 workers ready" in served.log())
        Path(path).write_text(one_upstream(upstream.port, path_prefix="/new"))
        served.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: served.log().count("config reloaded") == 2)
        results = await asyncio.gather(
            *(raw_request(served.port, "GET", "/new/x") for _ in range(20))
        )
        assert {r.status for r in results} == {200}
        old = await asyncio.gather(*(raw_request(served.port, "GET", "/old/x") for _ in range(10)))
        assert {r.status for r in old} == {404}
        slow = asyncio.create_task(raw_request(served.port, "GET", "/new/slow"))
        await wait_for(lambda: any(r.raw_target == "/slow" for r in upstream.requests))
        served.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert served.proc.returncode is None  # draining
        release.set()
        resp = await asyncio.wait_for(slow, 10)
        assert resp.status == 200
        assert await served.stop() == 0


async def test_a_dead_worker_is_replaced(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, "--workers", "2") as served:
        await wait_for(lambda: "2 workers ready" in served.log())
        first = children(served.proc.pid)
        victim = first[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: "starting another" in served.log())
        await wait_for(
            lambda: len(children(served.proc.pid)) == 2 and victim not in children(served.proc.pid)
        )
        for _ in range(10):
            assert (await raw_request(served.port, "GET", "/")).status == 200
        assert await served.stop() == 0


async def test_supervisor_alone_notifies_systemd(upstream: FakeFunctionUrl, tmp_path: Path) -> None:
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    messages: list[str] = []

    async def until(text: str) -> None:
        deadline = time.monotonic() + 15
        while not any(m.startswith(text) for m in messages):
            left = deadline - time.monotonic()
            assert left > 0, messages
            messages.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), left)).decode())

    env = creds_env()
    env["NOTIFY_SOCKET"] = sock_path
    path = write(tmp_path, one_upstream(upstream.port))
    try:
        async with serve_process(path, "--workers", "2", env=env) as served:
            await until("READY=1")
            served.proc.send_signal(signal.SIGHUP)
            await until("RELOADING=1")
            served.proc.send_signal(signal.SIGTERM)
            await until("STOPPING=1")
            assert await served.stop() == 0
    finally:
        sock.close()
    lifecycle = [m.split("\n")[0] for m in messages if m != "WATCHDOG=1"]
    assert lifecycle == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert messages[0] == "READY=1\nSTATUS=2 workers serving"


async def test_a_replacement_worker_starts_from_the_validated_config(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """The reproduced outage: the file is edited into invalid YAML (not reloaded yet) and
    a worker dies. Its replacement is handed the config the supervisor validated, so it
    serves; the supervisor never gives up and stops the healthy worker."""
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, "--workers", "2") as served:
        await wait_for(lambda: "2 workers ready" in served.log())
        Path(path).write_text("upstreams: [this is: not: valid yaml\n")
        for round_ in range(3):
            victim = children(served.proc.pid)[0]
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda n=round_ + 1: served.log().count("starting another") == n)
            await wait_for(
                lambda v=victim: (
                    len(children(served.proc.pid)) == 2 and v not in children(served.proc.pid)
                )
            )
            await asyncio.sleep(0.5)  # long enough for a replacement that would exit 2
            assert len(children(served.proc.pid)) == 2, served.log()
        results = await asyncio.gather(*(raw_request(served.port, "GET", "/x") for _ in range(20)))
        assert {r.status for r in results} == {200}
        verify_sigv4(upstream.last, region="us-east-1")
        # A reload of the broken file is refused by the supervisor; the workers keep going.
        served.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload rejected" in served.log())
        assert (await raw_request(served.port, "GET", "/y")).status == 200
        assert "workers keep exiting" not in served.log()
        assert await served.stop() == 0


async def test_a_supervisor_that_gives_up_exits_1(
    upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """Workers that keep dying make the supervisor stop, and with a failure status, so
    systemd's Restart=on-failure starts it again (it used to exit 0)."""
    path = write(tmp_path, one_upstream(upstream.port))
    async with serve_process(path, "--workers", "2") as served:
        await wait_for(lambda: "2 workers ready" in served.log())
        deadline = time.monotonic() + 20
        while served.proc.returncode is None and time.monotonic() < deadline:
            for pid in children(served.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.2)
        code = await asyncio.wait_for(served.proc.wait(), 20)
        assert code == 1, served.log()
        assert "workers keep exiting" in served.log()


async def test_the_supervisor_resolves_no_credentials(
    sts: FakeSts, upstream: FakeFunctionUrl, tmp_path: Path
) -> None:
    """With assume-role, every credential resolution is an STS call: each worker makes
    one, the supervisor (which signs nothing) none."""
    path = write(
        tmp_path,
        one_upstream(upstream.port, credentials=f"{{role_arn: '{ROLE}'}}"),
    )
    env = dict(creds_env(), AWS_ENDPOINT_URL_STS=os.environ["AWS_ENDPOINT_URL_STS"])
    async with serve_process(path, "--workers", "2", env=env) as served:
        await wait_for(lambda: "2 workers ready" in served.log())
        assert (await raw_request(served.port, "GET", "/x")).status == 200
        assert len(sts.calls) == 2, sts.calls
        assert await served.stop() == 0
