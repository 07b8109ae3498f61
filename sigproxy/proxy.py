"""The request handler: admit, route, read and hash the body, sign, forward, stream back.

:meth:`Proxy.handle` reads top to bottom like the request's way through the proxy; each
step is one call into the module that owns it (:mod:`~sigproxy.inbound` admission,
:mod:`~sigproxy.routing`, :mod:`~sigproxy.headers`, :mod:`~sigproxy.signing`,
:mod:`~sigproxy.upstream`), and every refusal is a :class:`~sigproxy.errors.ProxyError`
answered in JSON by :meth:`Proxy._refuse`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import time
from dataclasses import dataclass

from .canonical import split_target
from .config import Config
from .cors import CorsPolicy
from .credentials import POLL_INTERVAL
from .diagnosis import HEADER as DIAGNOSIS_HEADER
from .diagnosis import MAX_BODY as REFUSAL_BODY
from .diagnosis import SIGNATURE_EXPIRED, Refusal, classify, explain
from .errors import (
    BadRequest,
    BodyTooLarge,
    ExpectationFailed,
    Forbidden,
    OverCapacity,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_body,
    upstream_failure,
)
from .headers import Client, request_headers, response_headers
from .http1 import BodyError, Request
from .inbound import (
    check_client,
    check_framing,
    check_host,
    check_method,
    check_site,
    check_token,
    is_preflight,
)
from .logs import AccessLog, printable
from .metrics import NO_UPSTREAM, Metrics
from .retries import Budget, Plan, failure_reason, retry_after, status_reason
from .routing import Route, RouteTable, Target
from .signing import EMPTY_SHA256, Credentials
from .upstream import UpstreamClient, UpstreamError, UpstreamResponse

log = logging.getLogger("sigproxy.proxy")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# Status recorded (never sent) when the client disconnected, as nginx does.
CLIENT_GONE = 499
_WARN_EVERY = 60.0  # seconds between log lines for the same upstream failure


@dataclass(slots=True)
class _Outcome:
    """What the access log and the metrics are told about one request."""

    upstream: str = NO_UPSTREAM
    status: int = 0
    sent: int = 0
    received: int = 0
    upstream_time: float | None = None
    path: str | None = None
    error: str | None = None
    cors: CorsPolicy | None = None


@dataclass(slots=True)
class _Refused:
    """An upstream refusal (see :mod:`sigproxy.diagnosis`) and its body, when it was read
    to classify it (then it is relayed from here)."""

    refusal: Refusal
    body: bytes | None
    whole: bool = True
    """``body`` is all of it; else its start, and the rest is still to stream."""


class Proxy:
    """Owns the current route table, the upstream client, the request body memory budget
    and the per-request work."""

    def __init__(
        self, table: RouteTable, metrics: Metrics, client: UpstreamClient | None = None
    ) -> None:
        self.table = table
        self.metrics = metrics
        self.client = client if client is not None else UpstreamClient()
        self.bodies = MemoryBudget(table.config.limits.body_memory_bytes)
        self._warned: dict[tuple[str, str], float] = {}
        self._poller: asyncio.Task[None] | None = None
        self._budgets: dict[str, Budget] = {}
        self.access = AccessLog(logging.getLogger("sigproxy.access"))

    def start(self) -> None:
        """Start following the credentials' sources (files, logins, expiry) in the
        background; :meth:`close` stops it."""
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_credentials())

    async def _poll_credentials(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self.table.credentials.poll()
            except Exception:  # a bug here must not end the polling for good
                log.exception("credential polling failed")

    def swap(self, table: RouteTable) -> None:
        """Serve new requests from ``table``; requests in flight finish on the old one.
        Pools of upstreams the new table no longer has are closed; the clock skew learnt
        from an upstream is kept."""
        for name, target in table.targets.items():
            old = self.table.targets.get(name)
            if old is not None and old.origin == target.origin:
                target.signer.clock.offset = old.signer.clock.offset
                target.signer.clock.skew = old.signer.clock.skew
        self.table = table
        self.bodies.capacity = table.config.limits.body_memory_bytes
        self.client.retain(t.origin for t in table.targets.values())

    async def close(self) -> None:
        """Close the upstream connections (after the listener has stopped)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self.client.close()

    async def handle(self, request: Request) -> None:
        """Answer one request on the proxy port (:mod:`sigproxy.http1` calls it)."""
        started = time.perf_counter()
        request_id = _request_id(request)
        self.metrics.in_flight.inc()
        outcome = _Outcome()
        try:
            await self._proxy(request, self.table, request_id, outcome)
        except ProxyError as exc:
            await self._refuse(request, exc, request_id, outcome)
        except (asyncio.CancelledError, ConnectionError):
            outcome.status = CLIENT_GONE
            raise
        except Exception:
            outcome.status = 500
            log.exception("request %s: unexpected error", request_id)
            self.metrics.proxy_errors.labels("internal").inc()
            if request.started:
                request.reset()
            else:
                body = error_body("internal_error", "sigproxy failed unexpectedly", request_id)
                request.force_close()
                await _json_response(request, 500, body, {"X-Request-Id": request_id})
        finally:
            self._account(request, request_id, outcome, time.perf_counter() - started)

    async def _proxy(
        self, request: Request, table: RouteTable, request_id: str, outcome: _Outcome
    ) -> None:
        config = table.config
        # Admission: who and what, before anything is routed, read or told.
        check_client(request, config)
        check_host(request, table.hosts)
        check_method(request, config)
        check_framing(request)
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            raise ExpectationFailed("only 'Expect: 100-continue' is supported")
        if is_preflight(request):
            # Browsers send preflights without credentials: answered here, before the
            # token, never forwarded or signed, and telling nothing about other routes.
            await self._preflight(request, table, request_id, outcome)
            return
        if config.inbound_auth is not None:
            check_token(request, config.inbound_auth)

        route = table.resolve(request.raw_path, request.headers.get("Host"))
        target = route.target
        outcome.upstream, outcome.path, outcome.cors = (
            target.upstream.name,
            route.incoming,
            target.cors,
        )
        check_site(request, target.cors, allow_navigation=config.allow_cross_site_navigation)

        body, held = await self._receive(request, target.upstream.max_body_bytes, config)
        try:
            outcome.received = len(body)
            headers = self._headers(request, target, config, request_id)
            up, refused = await self._exchange(request.method, route, headers, body, outcome)
        finally:
            # The body has gone upstream: its memory is free for others while the
            # answer streams back, which may take minutes.
            self.bodies.release(held)
            del body
        try:
            await self._relay(request, target, up, request_id, outcome, refused)
        finally:
            up.release()

    async def _preflight(
        self, request: Request, table: RouteTable, request_id: str, outcome: _Outcome
    ) -> None:
        """Answer a CORS preflight. Preflights come without tokens, so a refused one tells
        nothing about routes: a path with no route, an upstream without a cors section
        and an origin the policy does not list all get the same answer."""
        headers = request.headers
        origin = headers["Origin"]
        target: Target | None
        try:
            target = table.resolve(request.raw_path, headers.get("Host")).target
        except ProxyError:
            target = None
        if target is not None:
            outcome.upstream = target.upstream.name  # for the metrics, never the client
        if target is None or target.cors is None or not target.cors.allows_origin(origin):
            raise Forbidden(
                "CORS preflight refused: this page's origin may not call this path",
                code="cors_refused",
            )
        granted = target.cors.preflight(
            origin,
            headers["Access-Control-Request-Method"],
            headers.get("Access-Control-Request-Headers", "").split(","),
        )
        if isinstance(granted, str):
            raise Forbidden(f"CORS preflight refused: {granted}", code="cors_refused")
        outcome.status = 204
        await request.respond(204, [("X-Request-Id", request_id), *granted])

    async def _receive(self, request: Request, limit: int, config: Config) -> tuple[bytes, int]:
        """The whole request body and the bytes of the memory budget it holds (the
        caller releases them). ``100 Continue`` is sent only now, when the body is
        wanted: after admission, routing and the length check."""
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(
                f"request body of {length} bytes is over the limit of {limit} bytes",
                limit=limit,
            )
        if not request.body_exists:
            return b"", 0
        budget = self.bodies
        held = 0
        if length is not None:
            if not budget.take(length):
                raise _over_capacity()
            held = length
        try:
            if length is not None and request.complete:
                return request.read_buffered(), held  # it came with the request head
            await request.send_continue()
            chunks: list[bytes] = []
            size = 0
            async with asyncio.timeout(config.client_timeouts.body):
                while chunk := await request.read_chunk():
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge(
                            f"request body is over the limit of {limit} bytes", limit=limit
                        )
                    if size > held:  # chunked: the budget is taken as the body arrives
                        if not budget.take(size - held):
                            raise _over_capacity()
                        held = size
                    chunks.append(chunk)
            return b"".join(chunks), held
        except TimeoutError:
            budget.release(held)
            raise RequestTimeout(
                f"the request body did not arrive within {config.client_timeouts.body:g} seconds"
            ) from None
        except BodyError:
            budget.release(held)
            raise BadRequest(
                "the request body's chunked framing or trailers are malformed"
            ) from None
        except BaseException:
            budget.release(held)
            raise

    @staticmethod
    def _headers(
        request: Request, target: Target, config: Config, request_id: str
    ) -> list[tuple[str, str]]:
        upstream = target.upstream
        return request_headers(
            request.headers.items(),
            host=upstream.host_header,
            signed=upstream.auth == "aws_iam",
            client=Client(request.remote or "", request.scheme, request.headers.get("Host")),
            request_id=request_id,
            token_header=config.inbound_auth.header if config.inbound_auth else None,
        )

    async def _exchange(
        self,
        method: str,
        route: Route,
        headers: list[tuple[str, str]],
        body: bytes,
        outcome: _Outcome,
    ) -> tuple[UpstreamResponse, _Refused | None]:
        """Sign, send, and read a refusal; try again what :mod:`sigproxy.retries` says
        may be, each attempt signed afresh. A refusal that credentials from the source or
        a corrected clock can cure is sent once more too: the service refused it before
        running the function, so this is safe for every method."""
        target = route.target
        name = target.upstream.name
        digest = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        unsigned = len(headers)
        plan = Plan(target.upstream.retries)
        budget = self._budgets.setdefault(name, Budget())
        budget.active += 1
        cured = False
        retrying = False
        try:
            while True:
                del headers[unsigned:]
                offset = target.signer.clock.offset
                used = await self._sign(method, route, digest, headers)
                try:
                    up = await self._attempt(route, method, headers, body, outcome)
                except ProxyError as exc:
                    if retrying:  # that retry is over
                        budget.retrying -= 1
                        retrying = False
                    wait = self._may_retry(plan, budget, name, exc.retry, None)
                    if wait is None:
                        raise
                    retrying = await self._backoff(plan, budget, name, exc.retry, wait)
                    continue
                if retrying:
                    budget.retrying -= 1
                    retrying = False
                try:
                    refused = await self._refusal(target, up, used is not None)
                    known = refused is not None and refused.refusal is not _NOT_A_REFUSAL
                    if known and used is not None and not cured:
                        assert refused is not None
                        cure = await self._cure(target, refused.refusal, used, offset)
                        if cure is not None:
                            cured = True
                            self.metrics.upstream_retries.labels(name, cure).inc()
                            up.release()
                            continue
                    reason = None if known else status_reason(method, up.status)
                    if reason is None:
                        return up, refused
                    after = retry_after(up.headers.get("Retry-After"), time.time())
                    wait = self._may_retry(plan, budget, name, reason, after)
                    if wait is None:
                        return up, refused
                except BaseException:
                    up.release()
                    raise
                # Not held while waiting: another request may use the connection.
                up.release()
                retrying = await self._backoff(plan, budget, name, reason, wait)
        finally:
            budget.active -= 1
            if retrying:
                budget.retrying -= 1

    def _may_retry(
        self,
        plan: Plan,
        budget: Budget,
        upstream: str,
        reason: str | None,
        after: float | None,
    ) -> float | None:
        """The wait before trying again for ``reason``, or ``None``: no reason, or the
        attempts, the deadline or the budget are used up."""
        if reason is None:
            return None
        wait = plan.next_wait(after, random.random)
        if wait is None:
            return None
        if not budget.allows(plan.policy):
            self._warn(
                upstream,
                "retry-budget",
                f"upstream {upstream}: not retrying ({reason}): the retry budget is used up "
                f"({budget.retrying} retries in flight for {budget.active} requests)",
            )
            return None
        return wait

    async def _backoff(
        self, plan: Plan, budget: Budget, upstream: str, reason: str | None, wait: float
    ) -> bool:
        """Wait, holding a place in the budget that a client leaving gives back; the
        retry is counted once it goes ahead. Returns True: a retry is now in flight."""
        budget.retrying += 1
        try:
            await asyncio.sleep(wait)
        except BaseException:
            budget.retrying -= 1
            raise
        plan.retries += 1
        self.metrics.upstream_retries.labels(upstream, reason or "").inc()
        return True

    async def _sign(
        self, method: str, route: Route, digest: str, headers: list[tuple[str, str]]
    ) -> Credentials | None:
        """Add the SigV4 headers; returns the credentials signed with (``None`` for an
        ``auth: none`` upstream)."""
        target = route.target
        if target.credentials is None:
            if target.upstream.content_sha256_header:
                # CloudFront (Origin Access Control) signs this one itself, and needs the
                # body's hash from the caller: the one the client sent may be wrong.
                headers[:] = [h for h in headers if h[0].lower() != "x-amz-content-sha256"]
                headers.append(("X-Amz-Content-SHA256", digest))
            return None
        creds = await target.credentials.get()
        t0 = time.perf_counter()
        headers.extend(target.signer.sign(method, route.outgoing, digest, creds))
        self.metrics.signing_duration.observe(time.perf_counter() - t0)
        return creds

    async def _attempt(
        self,
        route: Route,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes,
        outcome: _Outcome,
    ) -> UpstreamResponse:
        t0 = time.perf_counter()
        up = await self._send(route, method, headers, body)
        outcome.upstream_time = time.perf_counter() - t0
        target = route.target
        date = up.headers.get("Date")
        signed = target.credentials is not None
        if date is not None and signed and target.signer.clock.observe(date):
            self._skewed(target, "its Date header")
        return up

    async def _refusal(self, target: Target, up: UpstreamResponse, signed: bool) -> _Refused | None:
        """The upstream's refusal (counted and logged), or ``None`` for any other answer.
        A refusal's body is read here when it is small (the service's are), to tell
        the causes apart; a large one is left to stream."""
        if up.status not in (401, 403) or "x-amzn-ErrorType" not in up.headers:
            return None
        body: bytes | None = None
        whole = True
        length = up.content_length
        if length is None or length <= REFUSAL_BODY:
            body, whole = await self._read_start(target, up)
        refusal = classify(up.status, up.headers["x-amzn-ErrorType"], body or b"", signed=signed)
        if refusal is None:
            return None if body is None else _Refused(_NOT_A_REFUSAL, body, whole)
        name = target.upstream.name
        self.metrics.upstream_auth_failures.labels(name, refusal.diagnosis).inc()
        self._warn(
            name,
            refusal.diagnosis,
            explain(
                refusal,
                upstream=name,
                credentials=_describe(target),
                url=target.upstream.url,
            ),
        )
        return _Refused(refusal, body, whole)

    async def _read_start(self, target: Target, up: UpstreamResponse) -> tuple[bytes, bool]:
        """Up to :data:`~sigproxy.diagnosis.MAX_BODY` bytes of the body (chunked ones
        too), and whether that is all of it."""
        chunks: list[bytes] = []
        size = 0
        try:
            while size <= REFUSAL_BODY:
                chunk = await up.read_chunk()
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)
                size += len(chunk)
        except UpstreamError as exc:
            raise self._failed(target.upstream.name, exc) from exc
        return b"".join(chunks), False

    async def _cure(
        self, target: Target, refusal: Refusal, used: Credentials, offset: float
    ) -> str | None:
        """Why the refused request is worth sending again (``clock``: the correction
        changed since it was signed with ``offset``; ``credentials``: the source has
        others than those refused, ``used``), or ``None``."""
        if refusal.diagnosis == SIGNATURE_EXPIRED:
            clock = target.signer.clock
            if refusal.server_time is not None and clock.measured(
                refusal.server_time - time.time()
            ):
                self._skewed(target, "a refused signature")
            return "clock" if clock.offset != offset else None
        if not refusal.credentials_problem or target.credentials is None:
            return None
        if await target.credentials.renew(used) is None:
            return None
        name = target.upstream.name
        self._warn(
            name,
            "retried",
            f"upstream {name} refused credentials from {target.credentials.description} "
            f"({refusal.diagnosis}): sending it again with the ones the source has now",
            logging.INFO,
        )
        return "credentials"

    def _skewed(self, target: Target, seen_in: str) -> None:
        clock = target.signer.clock
        assert clock.skew is not None
        name = target.upstream.name
        if clock.offset:
            line = (
                f"upstream {name}: this machine's clock is {-clock.skew:+.0f} s off the "
                f"upstream's (from {seen_in}); signing with the corrected time. Set the clock "
                "(NTP): SigV4 refuses signatures more than 5 minutes off"
            )
        else:
            line = (
                f"upstream {name}: the clock skew is gone ({-clock.skew:+.0f} s, from "
                f"{seen_in}); signing with this machine's time again"
            )
        # An upstream whose Date flaps would otherwise write a line per answer.
        self._warn(name, "clock-skew", line)

    async def _send(
        self, route: Route, method: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """Send the signed request; returns once the response head has arrived."""
        upstream = route.target.upstream
        try:
            return await self.client.request(
                route.target.origin,
                method,
                route.outgoing,
                headers,
                body,
                connect_timeout=upstream.timeout.connect,
                read_timeout=upstream.timeout.read,
            )
        except UpstreamError as exc:
            raise self._failed(upstream.name, exc) from exc

    def _failed(self, upstream: str, exc: UpstreamError) -> ProxyError:
        """What the client is told of a failed exchange (and whether it may be retried);
        the cause goes to the log once a minute."""
        self._warn(upstream, str(exc), f"upstream {upstream}: {exc} ({exc.kind})")
        failure = upstream_failure(exc.kind, str(exc), upstream)
        failure.retry = failure_reason(exc.kind, exc.sent, getattr(exc, "status", None))
        return failure

    def _warn(self, upstream: str, cause: str, line: str, level: int = logging.WARNING) -> None:
        """``line`` at WARNING (or ``level``), once a minute per upstream and cause: a
        failing upstream under load must not write a line per request."""
        now = time.monotonic()
        key = (upstream, cause)
        if now - self._warned.get(key, -_WARN_EVERY) < _WARN_EVERY:
            return
        if len(self._warned) > 1000:  # causes carry addresses: stay bounded
            self._warned.clear()
        self._warned[key] = now
        log.log(level, "%s", line)

    async def _relay(
        self,
        request: Request,
        target: Target,
        up: UpstreamResponse,
        request_id: str,
        outcome: _Outcome,
        refused: _Refused | None = None,
    ) -> None:
        """Send the upstream's answer to the client: at once when it is whole in memory,
        else streamed as it arrives. A refusal gets ``X-Sigproxy-Diagnosis``."""
        length = up.content_length
        sized = length is not None and "Transfer-Encoding" not in up.headers
        read = refused.body if refused is not None and request.method != "HEAD" else None
        if read is not None and refused is not None and refused.whole:
            whole = True
        else:
            whole = (
                read is None
                and sized
                and request.method != "HEAD"
                and up.status not in (204, 304)
                and up.complete
            )
        # The upstream's reason phrase is not passed on: the status says it all, and a
        # phrase with control bytes would not survive the trip. No Content-Type is
        # invented for a body that came without one.
        kept, undecodable = response_headers(up.headers.items(), cors=target.cors is not None)
        for name in undecodable:
            log.warning("request %s: dropped upstream header %s: not valid UTF-8", request_id, name)
        if target.cors is not None:
            kept.extend(target.cors.response_headers(request.headers.get("Origin")))
        kept.append(("X-Request-Id", request_id))
        if refused is not None and refused.refusal is not _NOT_A_REFUSAL:
            kept.append((DIAGNOSIS_HEADER, refused.refusal.diagnosis))
        outcome.status = CLIENT_GONE
        if whole:
            # A body that came with the head goes out with the headers in one write,
            # where streaming costs one each.
            body = read if read is not None else up.read_buffered()
            try:
                await request.respond(up.status, kept, body)
            except ConnectionError:
                return
            outcome.status, outcome.sent = up.status, len(body)
            return
        try:
            await request.start(up.status, kept, length if sized else None)
        except ConnectionError:
            return
        outcome.sent, outcome.status = await self._stream(
            request, up, target.upstream.name, request_id, read or b""
        )

    async def _stream(
        self,
        request: Request,
        up: UpstreamResponse,
        upstream: str,
        request_id: str,
        start: bytes = b"",
    ) -> tuple[int, int]:
        """Copy the upstream body to the client as it arrives, after ``start`` (what of it
        was read already); returns (bytes, status)."""
        sent = 0
        if start:
            try:
                await request.write(start)
            except ConnectionError:
                return sent, CLIENT_GONE
            sent = len(start)
        while True:
            try:
                chunk = await up.read_chunk()
            except UpstreamError as exc:
                # Headers are out; the only honest signal left is a reset connection, so
                # the client never mistakes a truncated body for a whole one.
                self.metrics.upstream_errors.labels(upstream, exc.kind).inc()
                log.warning(
                    "request %s: upstream %s failed mid-response after %d bytes: %s",
                    request_id,
                    upstream,
                    sent,
                    exc,
                )
                request.reset()
                return sent, up.status
            if not chunk:
                break
            try:
                await request.write(chunk)
            except ConnectionError:
                log.debug("request %s: client went away after %d bytes", request_id, sent)
                return sent, CLIENT_GONE
            sent += len(chunk)
        try:
            await request.end()
        except ConnectionError:
            return sent, CLIENT_GONE
        return sent, up.status

    async def _refuse(
        self, request: Request, exc: ProxyError, request_id: str, outcome: _Outcome
    ) -> None:
        outcome.status = exc.status
        outcome.error = exc.code
        self.metrics.proxy_errors.labels(exc.reason).inc()
        if isinstance(exc, UpstreamUnreachable | UpstreamTimeout):
            kind = exc.extra.get("kind", "connect")
            self.metrics.upstream_errors.labels(outcome.upstream, kind).inc()
        body = error_body(exc.code, exc.message, request_id, **exc.extra)
        headers = {**exc.headers, "X-Request-Id": request_id}
        extra: list[tuple[str, str]] = []
        if outcome.cors is not None and exc.code != "cors_refused":
            # So a page allowed to call the upstream can read why it failed.
            extra = outcome.cors.response_headers(request.headers.get("Origin"))
        outcome.sent = len(body)
        if exc.closes or not request.complete:
            # Refused before its body was read (or while it was): nothing more is taken
            # from this client, and the connection closes after the answer.
            request.force_close()
        if request.started:  # the answer had begun: a reset is all that is left
            request.reset()
            return
        try:
            await _json_response(request, exc.status, body, headers, extra)
        except ConnectionError:
            outcome.status = CLIENT_GONE

    def _account(
        self, request: Request, request_id: str, outcome: _Outcome, elapsed: float
    ) -> None:
        """Metrics and the access log line for one finished request."""
        m = self.metrics
        m.in_flight.dec()
        m.request_done(
            outcome.upstream, request.method, outcome.status, elapsed, outcome.upstream_time
        )
        if outcome.received or outcome.sent:
            m.bytes_done(outcome.upstream, outcome.received, outcome.sent)
        access = self.access
        if not access.enabled:
            return
        raw = printable(split_target(request.raw_path)[0])
        access.write(
            request_id,
            outcome.upstream,
            printable(request.method),
            raw if outcome.path is None else outcome.path,
            raw,
            outcome.status,
            outcome.received,
            outcome.sent,
            elapsed,
            outcome.upstream_time,
            outcome.error,
        )


class MemoryBudget:
    """Bytes of request bodies held in memory at once, process-wide. Taking is
    all-or-nothing: a request that would go over is refused, never queued."""

    __slots__ = ("capacity", "used")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.capacity:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size


def _over_capacity() -> OverCapacity:
    return OverCapacity(
        "sigproxy is holding as many request bodies in memory as limits.body_memory_bytes "
        "allows; retry shortly"
    )


async def _json_response(
    request: Request,
    status: int,
    body: bytes,
    headers: dict[str, str],
    extra: list[tuple[str, str]] | None = None,
) -> None:
    out = [("Content-Type", "application/json"), *headers.items()]
    if extra:
        out.extend(extra)
    await request.respond(status, out, body)


def _request_id(request: Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given and _REQUEST_ID_RE.match(given):
        return given
    return os.urandom(16).hex()


# A 401/403 with an error type that is not a refusal sigproxy knows: its body may have
# been read, and is relayed as it is.
_NOT_A_REFUSAL = Refusal("", "", "")


def _describe(target: Target) -> str:
    source = target.credentials
    return "-" if source is None else f"{source.description} ({source.method})"
