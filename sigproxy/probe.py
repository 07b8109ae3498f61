"""``sigproxy check --probe``: whether each upstream can be reached and, for ``aws_iam``
upstreams, whether its Function URL accepts the credentials, without running the function.

Per upstream, each step bounded by :data:`STEP_TIMEOUT`: DNS, TCP connect, TLS (https
URLs; verified against the system CAs, ``SSL_CERT_FILE`` or ``AWS_CA_BUNDLE`` as the
transport does, SNI the URL host), then for ``aws_iam`` one ``GET`` of the URL's base
path signed with the real access key and scope but a deliberately wrong signature. A
Function URL with AuthType AWS_IAM refuses a wrong clock, access key or session token
before it compares signatures (as the emulator's verifier does, in the service's order),
so its refusal (read with :func:`sigproxy.diagnosis.classify`) tells which of them is
wrong, and a signature mismatch means all of them are right. The function cannot run
unless the URL checks no signature at all (AuthType NONE), which is then the verdict.
``auth: none`` upstreams stop after TLS: any request would run the function.

This module owns the steps, the :class:`ProbeResult` and its verdict, and the table.
It never sends or prints the secret key; the session token goes only in its header.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

import aiohappyeyeballs

from . import __version__
from .config import Config, Upstream
from .credentials import CredentialSource, CredentialStore
from .diagnosis import (
    ACCESS_DENIED,
    EXPIRED_TOKEN,
    INVALID_SIGNATURE,
    MAX_BODY,
    SIGNATURE_EXPIRED,
    UNRECOGNIZED_CLIENT,
    Refusal,
    classify,
)
from .errors import CredentialsUnavailable
from .logs import printable
from .routing import Origin, origin_of
from .signing import EMPTY_SHA256, Signer
from .upstream import (
    HAPPY_EYEBALLS_DELAY,
    ConnectRefused,
    open_tunnel,
    proxy_failure,
    route_text,
    verify_context,
)

STEP_TIMEOUT: Final = 5.0
# A response head larger than this is not a Function URL's (Envoy's limit is 60 KiB).
MAX_HEAD: Final = 64 * 1024

OK: Final = "ok"
REACHABLE: Final = "reachable"
NOT_IAM: Final = "not-iam"
UNKNOWN_KEY: Final = "unknown-key"
EXPIRED: Final = "expired-token"
CLOCK_SKEW: Final = "clock-skew"
DENIED: Final = "access-denied"
WRONG_SCOPE: Final = "wrong-scope"
UNEXPECTED: Final = "unexpected"
NO_CREDENTIALS: Final = "no-credentials"
DNS_FAILED: Final = "dns-failed"
CONNECT_FAILED: Final = "connect-failed"
TLS_FAILED: Final = "tls-failed"
TIMEOUT: Final = "timeout"
PASSED: Final = frozenset({OK, REACHABLE})
T = TypeVar("T")

_FAILED_VERDICT: Final = {"dns": DNS_FAILED, "tcp": CONNECT_FAILED, "tls": TLS_FAILED}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One upstream's row: each step's outcome (``ok``, ``failed``, ``timeout``, ``-``
    not run, ``n/a``), the answer to the probe request, the verdict and what it means."""

    upstream: str
    url: str
    dns: str
    tcp: str
    tls: str
    answer: str
    verdict: str
    meaning: str

    @property
    def passed(self) -> bool:
        return self.verdict in PASSED


class _Stop(Exception):
    """A step ended the probe of one upstream with this verdict."""

    def __init__(self, verdict: str, meaning: str) -> None:
        super().__init__(meaning)
        self.verdict = verdict
        self.meaning = meaning


async def probe_all(
    config: Config, store: CredentialStore, *, step_timeout: float = STEP_TIMEOUT
) -> list[ProbeResult]:
    """Probe every upstream of ``config`` at once; results in config order."""
    ssl_context = verify_context()
    return list(
        await asyncio.gather(
            *(
                probe_upstream(u, store.get(u.name), ssl_context, step_timeout=step_timeout)
                for u in config.upstreams
            )
        )
    )


async def probe_upstream(
    upstream: Upstream,
    source: CredentialSource | None,
    ssl_context: ssl.SSLContext,
    *,
    step_timeout: float = STEP_TIMEOUT,
) -> ProbeResult:
    """The steps for one upstream, stopping at the first that fails."""
    probe = _Probe(upstream, origin_of(upstream), step_timeout)
    try:
        verdict, meaning = await probe.run(source, ssl_context)
    except _Stop as stop:
        verdict, meaning = stop.verdict, stop.meaning
    except Exception as exc:  # one upstream's surprise must not hide the other rows
        verdict = UNEXPECTED
        meaning = f"the probe failed: {type(exc).__name__}: {printable(str(exc)[:200])}"
    return ProbeResult(
        upstream.name,
        upstream.url,
        probe.cells["dns"],
        probe.cells["tcp"],
        probe.cells["tls"],
        probe.cells["answer"],
        verdict,
        meaning,
    )


class _Probe:
    def __init__(self, upstream: Upstream, origin: Origin, step_timeout: float) -> None:
        self.upstream = upstream
        self.origin = origin
        self.timeout = step_timeout
        self.where = f"{origin.host}:{origin.port}{route_text(origin)}"
        self.looked_up = origin.host  # the name DNS is asked for: the proxy's, if any
        self.cells = {"dns": "-", "tcp": "-", "tls": "-" if origin.tls else "n/a", "answer": "-"}

    async def run(
        self, source: CredentialSource | None, ssl_context: ssl.SSLContext
    ) -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        # The way serve goes: to connect_to instead of the URL's host, through the egress
        # proxy's CONNECT tunnel when there is one (DNS and TCP are then the proxy's).
        host = self.origin.host
        target = self.origin.connect_to or (host, self.origin.port)
        proxy = self.origin.proxy
        dial = (proxy.host, proxy.port) if proxy is not None else target
        self.looked_up = dial[0]
        addresses = await self._step(
            "dns",
            f"no DNS answer for {dial[0]}",
            loop.getaddrinfo(*dial, type=socket.SOCK_STREAM),
        )
        sock = await self._step(
            "tcp",
            f"no TCP connection to {self.where}",
            aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
            ),
        )
        if proxy is not None:
            try:
                await self._step(
                    "tcp",
                    f"no answer to CONNECT from egress proxy {proxy.url}",
                    open_tunnel(loop, sock, proxy, *target),
                )
            except ConnectRefused as exc:
                sock.close()
                self.cells["tcp"] = "failed"
                failure = proxy_failure(exc, self.origin, proxy, self.timeout, "tunnel")
                raise _Stop(CONNECT_FAILED, str(failure)) from None
            except BaseException:
                sock.close()
                raise
        try:
            reader, writer = await self._step(
                "tls" if self.origin.tls else "tcp",
                f"TLS handshake with {self.where} unfinished"
                if self.origin.tls
                else f"no TCP connection to {self.where}",
                asyncio.open_connection(
                    sock=sock,
                    ssl=ssl_context if self.origin.tls else None,
                    server_hostname=host if self.origin.tls else None,
                    limit=MAX_HEAD,
                ),
            )
        except BaseException:
            sock.close()
            raise
        try:
            if self.upstream.auth != "aws_iam":
                return REACHABLE, "auth: none: no request sent (it would run the function)"
            if source is None:  # CredentialStore.resolve gives every aws_iam upstream one
                return NO_CREDENTIALS, "no credential source for this upstream"
            return await self._ask(source, reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    async def _step(self, name: str, late: str, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                result = await awaitable
        except TimeoutError:
            self.cells[name] = "timeout"
            raise _Stop(TIMEOUT, f"{late} within {self.timeout:g} s") from None
        except (OSError, UnicodeError) as exc:  # UnicodeError: not a valid host name
            self.cells[name] = "failed"
            raise _Stop(_FAILED_VERDICT[name], self._failure(name, exc)) from None
        self.cells[name] = "ok"
        return result

    def _failure(self, step: str, exc: Exception) -> str:
        """The cause in words, and the next step."""
        host = self.looked_up
        if step == "dns":
            reason = getattr(exc, "strerror", None) or str(exc)
            return f"DNS lookup of {host} failed: {reason} (a typo in the url, or no network)"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"certificate verify failed: {exc.verify_message} (for a private CA, point "
                "SSL_CERT_FILE or AWS_CA_BUNDLE at its PEM bundle)"
            )
        if isinstance(exc, ssl.SSLError):
            return f"TLS handshake with {self.where} failed: {exc.reason or exc}"
        if step == "tls":
            return f"{self.where} closed the connection during the TLS handshake"
        if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
            return f"connection refused by {self.where} (nothing listens there: check the port)"
        reason = getattr(exc, "strerror", None) or str(exc)
        return f"cannot connect to {self.where}: {reason}"

    async def _ask(
        self, source: CredentialSource, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, str]:
        upstream = self.upstream
        try:
            credentials = await source.get()
        except CredentialsUnavailable as exc:
            return NO_CREDENTIALS, str(exc)
        signed_at = time.time()
        # The machine's own clock, not a corrected one: a skew is what the probe reports.
        timestamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(signed_at))
        target = f"{upstream.base_path}/"
        signer = Signer(upstream.host_header, upstream.region, upstream.service)
        signed = signer.sign_at("GET", target, EMPTY_SHA256, credentials, timestamp)
        headers = [("Host", upstream.host_header)]
        headers += [(n, _wrong_signature(v) if n == "Authorization" else v) for n, v in signed]
        headers += [("User-Agent", f"sigproxy-probe/{__version__}"), ("Connection", "close")]
        head = "".join(f"{n}: {v}\r\n" for n, v in headers)
        writer.write(f"GET {target} HTTP/1.1\r\n{head}\r\n".encode())
        try:
            async with asyncio.timeout(self.timeout):
                await writer.drain()
                status, answer_headers, body = await _read_response(reader)
        except TimeoutError:
            return TIMEOUT, f"no answer from {self.where} within {self.timeout:g} s"
        except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
            return UNEXPECTED, self._bad_answer(exc)
        error_type = answer_headers.get("x-amzn-errortype")
        self.cells["answer"] = f"{status} {_kind(error_type)}".rstrip()
        refusal = classify(status, error_type, body, signed=True)
        described = f"{source.description} ({source.method})"
        return self._verdict(status, answer_headers, refusal, signed_at, described)

    def _bad_answer(self, exc: Exception) -> str:
        if isinstance(exc, asyncio.LimitOverrunError):
            return f"{self.where} sent a response head over {MAX_HEAD // 1024} KiB"
        if isinstance(exc, ValueError):
            return f"{self.where} sent an invalid HTTP response: {printable(str(exc)[:100])}"
        return f"{self.where} closed the connection without answering"

    def _verdict(
        self,
        status: int,
        headers: dict[str, str],
        refusal: Refusal | None,
        signed_at: float,
        credentials: str,
    ) -> tuple[str, str]:
        if refusal is None:
            if "x-amzn-requestid" not in headers:
                return UNEXPECTED, (
                    f"{status} without x-amzn-ErrorType or x-amzn-RequestId: not a Lambda "
                    "Function URL? check the url"
                )
            return NOT_IAM, (
                f"the function ran once ({status}): the URL checks no signature (AuthType "
                "NONE); set auth: none, or AuthType AWS_IAM on the URL"
            )
        said = printable(refusal.message[:200]) or refusal.error_type
        if refusal.diagnosis == INVALID_SIGNATURE:
            if refusal.message.startswith("Credential should be scoped"):
                return WRONG_SCOPE, (
                    f"{said} (signed for {self.upstream.region}/{self.upstream.service}: "
                    "set region and service to the URL's)"
                )
            if refusal.error_type == "IncompleteSignatureException":
                return UNEXPECTED, f"{status} {refusal.error_type}: {said}"
            return OK, (
                f"AWS_IAM URL; it knows the access key of {credentials} and its token is "
                "valid (IAM permissions are not tested)"
            )
        if refusal.diagnosis == SIGNATURE_EXPIRED:
            return CLOCK_SKEW, _skew(refusal.server_time, signed_at)
        if refusal.diagnosis == UNRECOGNIZED_CLIENT:
            return UNKNOWN_KEY, (
                f"AWS does not know the access key of {credentials} (or the token is not its): "
                "put valid keys there (aws configure, aws sso login)"
            )
        if refusal.diagnosis == EXPIRED_TOKEN:
            return EXPIRED, (
                f"the session token of {credentials} has expired: renew it (aws sso login, "
                "aws login, or new temporary keys)"
            )
        if refusal.diagnosis == ACCESS_DENIED:
            return DENIED, (
                f"refused before the signature was checked ({said}): see the function's "
                "resource policy"
            )
        return UNEXPECTED, f"{status} {refusal.error_type}: {said}"


def _skew(server_time: float | None, signed_at: float) -> str:
    fix = "set this machine's clock (NTP: timedatectl set-ntp true)"
    if server_time is None:
        return f"this machine's clock is over 5 minutes off the service's: {fix}"
    offset = round(server_time - signed_at)
    side = "behind" if offset > 0 else "ahead of"
    return f"this machine's clock is {abs(offset)} s {side} the service's: {fix}"


def _kind(error_type: str | None) -> str:
    """The type as the answer column shows it: before any ``:namespace``, printable."""
    return printable(error_type.split(":", 1)[0].strip()[:60]) if error_type else ""


def _wrong_signature(authorization: str) -> str:
    """The Authorization header with every hex digit of its signature replaced by another:
    still well-formed, certain not to match."""
    head, sep, signature = authorization.rpartition("Signature=")
    wrong = "".join(f"{15 - int(c, 16):x}" for c in signature)
    return f"{head}{sep}{wrong}"


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """(status, headers by lower-case name, up to :data:`MAX_BODY` of the body) of one
    HTTP/1.1 response to a request sent with ``Connection: close``."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await _read_body(reader, headers)
    return int(code), headers, body


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        size = 0
        while size < MAX_BODY:
            chunk_size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if chunk_size == 0:
                break
            if chunk_size > MAX_BODY - size:
                # Enough to classify; a huge declared chunk is not buffered.
                chunks.append(await reader.readexactly(MAX_BODY - size))
                break
            chunks.append(await reader.readexactly(chunk_size))
            await reader.readexactly(2)
            size += chunk_size
        return b"".join(chunks)[:MAX_BODY]
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        try:
            return await reader.readexactly(min(int(length), MAX_BODY))
        except asyncio.IncompleteReadError as exc:
            return exc.partial
    data = b""
    while len(data) < MAX_BODY and (chunk := await reader.read(MAX_BODY - len(data))):
        data += chunk
    return data


_COLUMNS: Final = ("UPSTREAM", "URL", "DNS", "TCP", "TLS", "ANSWER", "VERDICT", "MEANING")


def format_report(results: Sequence[ProbeResult], config_path: str) -> list[str]:
    """The table, one line per upstream, and a summary line ending with the next step."""
    rows = [_COLUMNS] + [
        (r.upstream, r.url, r.dns, r.tcp, r.tls, r.answer, r.verdict, r.meaning) for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    failed = [r for r in results if not r.passed]
    if failed:
        names = ", ".join(f"{r.upstream} ({r.verdict})" for r in failed)
        lines.append(
            f"probe FAILED for {len(failed)} of {len(results)} upstream(s): {names}; next: do "
            f"what MEANING says, then run sigproxy check --probe --config {config_path} again"
        )
    else:
        lines.append(
            f"probe OK: {len(results)} upstream(s) answered as expected; next: sigproxy "
            f"serve --config {config_path}"
        )
    return lines
