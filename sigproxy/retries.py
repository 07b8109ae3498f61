"""When an upstream exchange is tried again, how long to wait, and the budget that keeps
retries from multiplying an outage. Pure: the proxy owns the I/O and the clock.

What is retried (each attempt signed afresh by the proxy):

* a connection that failed before anything was sent (connect, TLS, a connection cut
  during the handshake, the egress proxy, a connect timeout): every method, since the
  upstream never saw the request; not a tunnel the egress proxy refused with 407, 403 or
  another status that is its configuration (502, 503, 504 from it are retried);
* ``429``: Lambda refused before invoking the function (concurrency exhausted): every
  method, after ``Retry-After`` when the answer gives one;
* ``502``, ``503``, ``504``: only idempotent methods, since the function may have run;
* the credential and clock refusals of :mod:`sigproxy.diagnosis` (the proxy's ``_cure``).

Never a response whose bytes reached the client: retries happen before the answer is
relayed. Backoff is "full jitter" (a random wait up to ``base * 2**n``, at most
``backoff_max``), and no attempt starts after the deadline. The budget is Envoy's: retries
in flight at most ``budget_percent`` of the requests in flight, or ``min_concurrency``.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Retries

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Transport failure kinds (sigproxy.upstream) worth another try when the request never
# left: not "busy", sigproxy's own pool being full.
NOT_SENT = frozenset({"connect", "tls", "proxy", "timeout", "closed"})
# An egress proxy that could not reach the Function URL this time (Squid's answers to a
# DNS or connect failure beyond it); any other refusal is its configuration.
PROXY_TRANSIENT = frozenset({502, 503, 504})


def status_reason(method: str, status: int) -> str | None:
    """The retry reason for an answer with ``status``, or ``None``: not retried."""
    if status == 429:
        return "429"
    if status in (502, 503, 504) and method in IDEMPOTENT:
        return str(status)
    return None


def failure_reason(kind: str, sent: bool, proxy_status: int | None = None) -> str | None:
    """The retry reason for a transport failure of ``kind``, or ``None``: only when the
    request was never ``sent``, and not when the egress proxy refused the tunnel with a
    status other than 502/503/504 (a 407 or 403 is its configuration, not chance)."""
    if sent or kind not in NOT_SENT:
        return None
    if proxy_status is not None and proxy_status not in PROXY_TRANSIENT:
        return None
    return kind


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds an answer's ``Retry-After`` (seconds, or an HTTP date) asks to wait."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() takes "²" too
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, float(when) - now)


def backoff(policy: Retries, retry: int, random: Callable[[], float]) -> float:
    """The wait before retry number ``retry`` (1 for the first): full jitter."""
    ceiling = min(policy.backoff_max, policy.backoff_base * 2.0 ** (retry - 1))
    return random() * ceiling


@dataclass
class Budget:
    """Requests and retries in flight to one upstream (Envoy's retry budget)."""

    active: int = 0
    retrying: int = 0

    def allows(self, policy: Retries) -> bool:
        """Whether one more retry may start now."""
        limit = max(policy.min_concurrency, policy.budget_percent * self.active // 100)
        return self.retrying < limit


@dataclass
class Plan:
    """One request's retries: how many were made, and when its first attempt started."""

    policy: Retries
    started: float = field(default_factory=time.monotonic)
    retries: int = 0

    def next_wait(self, after: float | None, random: Callable[[], float]) -> float | None:
        """The wait before the next attempt, or ``None`` when there is none: attempts
        or time are used up, or the upstream asks to wait past the deadline."""
        if self.retries + 1 >= self.policy.attempts:
            return None
        wait = backoff(self.policy, self.retries + 1, random)
        if after is not None:
            wait = max(wait, after)
        if time.monotonic() + wait > self.started + self.policy.deadline:
            return None
        return wait
