"""Test helpers: a fake Function URL that records raw bytes, an independent SigV4
verifier (AWS's C signer from ``awscrt``), and a raw HTTP/1.1 client that sends request
targets byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from awscrt import auth as crt_auth
from awscrt import http as crt_http

ACCESS_KEY = "AKIDSIGPROXYTEST0001"
SECRET_KEY = "sEcReT-never-LOGGED-4f1c9a7e2b"
SESSION_TOKEN = "ToKeN-never-LOGGED-88d2e0c3a5"


@dataclass
class Recorded:
    """One request as it reached the fake Function URL."""

    method: str
    raw_target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lower = name.lower()
        return [v for k, v in self.headers if k.lower() == lower]


Handler = Callable[[web.Request, Recorded], Awaitable[web.StreamResponse]]


async def _default_answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
    return web.json_response({"ok": True, "target": rec.raw_target})


@dataclass
class FakeFunctionUrl:
    """An aiohttp app standing in for a Lambda Function URL; records what arrives."""

    requests: list[Recorded] = field(default_factory=list)
    answer: Handler = _default_answer
    port: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = Recorded(
            method=request.method,
            raw_target=request.raw_path,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            body=body,
        )
        self.requests.append(rec)
        return await self.answer(request, rec)

    @property
    def last(self) -> Recorded:
        assert self.requests, "no request reached the upstream"
        return self.requests[-1]


_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[^,]+), "
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)


def verify_sigv4(
    rec: Recorded,
    *,
    region: str,
    service: str = "lambda",
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    token: str | None = SESSION_TOKEN,
) -> None:
    """Recompute the signature of ``rec`` from the bytes that arrived with awscrt and
    assert it equals the one sent. Also checks the body hash and the signed header set."""
    authz = rec.header("Authorization")
    assert authz is not None, "no Authorization header arrived"
    m = _AUTH_RE.match(authz)
    assert m, f"malformed Authorization header: {authz[:60]}..."
    assert m["key"] == access_key
    assert m["region"] == region
    assert m["service"] == service
    expected_signed = ["host", "x-amz-content-sha256", "x-amz-date"]
    if token:
        expected_signed.append("x-amz-security-token")
        assert rec.header("X-Amz-Security-Token") == token
    else:
        assert rec.header("X-Amz-Security-Token") is None
    assert m["signed"].split(";") == expected_signed
    body_hash = hashlib.sha256(rec.body).hexdigest()
    assert rec.header("X-Amz-Content-SHA256") == body_hash, "payload hash does not match body"
    amz_date = rec.header("X-Amz-Date")
    assert amz_date is not None
    assert amz_date[:8] == m["date"]
    when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    host = rec.header("Host")
    assert host is not None
    assert len(rec.all("Host")) == 1

    request = crt_http.HttpRequest(
        rec.method, rec.raw_target, crt_http.HttpHeaders([("host", host)])
    )
    config = crt_auth.AwsSigningConfig(
        algorithm=crt_auth.AwsSigningAlgorithm.V4,
        signature_type=crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
        credentials_provider=crt_auth.AwsCredentialsProvider.new_static(
            access_key, secret_key, token
        ),
        region=region,
        service=service,
        date=when,
        signed_body_value=body_hash,
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
        use_double_uri_encode=True,
        should_normalize_uri_path=True,
    )
    crt_auth.aws_sign_request(request, config).result(timeout=10)
    expected = dict(request.headers)["Authorization"]
    assert authz == expected, (
        f"signature mismatch for {rec.method} {rec.raw_target!r}:\n sent     {authz}\n"
        f" expected {expected}"
    )


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for k, v in self.headers:
            if k.lower() == lower:
                return v
        return None

    def all(self, name: str) -> list[str]:
        lower = name.lower()
        return [v for k, v in self.headers if k.lower() == lower]


async def raw_request(
    port: int,
    method: str,
    target: str | bytes,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    *,
    chunked_body: list[bytes] | None = None,
    host: str = "127.0.0.1",
) -> RawResponse:
    """Send one HTTP/1.1 request exactly as given (``Connection: close``) and read the
    whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        target_bytes = target if isinstance(target, bytes) else target.encode("utf-8")
        lines = [method.encode() + b" " + target_bytes + b" HTTP/1.1"]
        all_headers = [("Host", host), ("Connection", "close"), *(headers or [])]
        if body is not None:
            all_headers.append(("Content-Length", str(len(body))))
        if chunked_body is not None:
            all_headers.append(("Transfer-Encoding", "chunked"))
        lines += [f"{k}: {v}".encode("latin-1") for k, v in all_headers]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        if body:
            writer.write(body)
        if chunked_body is not None:
            for chunk in chunked_body:
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """Parse one HTTP/1.1 response (Content-Length, chunked, or until close)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ")[1])
    headers = []
    for line in header_lines:
        if line:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
    resp = RawResponse(status, headers, b"")
    te = (resp.header("Transfer-Encoding") or "").lower()
    if "chunked" in te:
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        resp.body = b"".join(parts)
    elif resp.header("Content-Length") is not None:
        resp.body = await reader.readexactly(int(resp.header("Content-Length") or 0))
    elif status not in (204, 304) and not 100 <= status < 200:
        resp.body = await reader.read()
    return resp


async def drain_lines(stream: asyncio.StreamReader, into: list[str]) -> None:
    """Keep reading a child process's output into ``into`` so its pipe never fills."""
    async for raw in stream:
        into.append(raw.decode(errors="replace"))


async def stop_process(
    proc: asyncio.subprocess.Process, drains: list[asyncio.Task[None]], sig: int
) -> int:
    """Signal a child process (if still running), wait for it and for its output."""
    if proc.returncode is None:
        proc.send_signal(sig)
    code = await asyncio.wait_for(proc.wait(), 20)
    await asyncio.wait_for(asyncio.gather(*drains), 5)
    return code


ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def loopback_server(handle: ConnectionHandler) -> AsyncIterator[int]:
    """``handle`` for each connection to a 127.0.0.1 port (yielded). At the end the
    server closes, and so do its connections: their writers are closed and their
    handlers cancelled, then awaited (at most 5 s)."""
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[None]] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        writers.append(writer)
        await handle(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for writer in writers:
            writer.close()
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await server.wait_closed()
