"""Logging set-up: text or JSON lines on stderr, and the rules that keep secrets out.

Never logged, at any level: signed Authorization headers, secret keys, session tokens,
cookies, query values. sigproxy's own lines name paths without queries; botocore's debug
output (canonical requests carry the session token) is held at WARNING; aiohttp's
protocol errors lose the raw request line they would quote.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import Any

# Attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}


# Control characters, and the surrogate escapes that stand for bytes that were not UTF-8.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\\\udc80-\udcff]")


def printable(text: str) -> str:
    """``text`` from a client, safe for a log line: control characters (a newline would
    forge a whole line), backslashes and undecodable bytes as ``\\xNN``."""
    if not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()) & 0xFF:02x}", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RedactProtocolErrors(logging.Filter):
    """aiohttp logs a malformed request with the raw request line, query values and all,
    in its exception text. Keep the record, drop the raw bytes: log the exception's type
    and the first line of its message only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = str(getattr(exc, "message", None) or exc).strip()
            first = detail.splitlines()[0] if detail else ""
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {first}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    protect_secrets()


def protect_secrets() -> None:
    """Keep other libraries' log lines free of secrets whatever the root level is.
    Called by the CLI and by every app factory, so embedding sigproxy is safe too."""
    # botocore's debug output includes canonical requests, which carry session tokens; its
    # warnings are tracebacks of credential failures that sigproxy reports itself, in one
    # line with the next step.
    botocore_logger = logging.getLogger("botocore")
    if botocore_logger.getEffectiveLevel() < logging.ERROR:
        botocore_logger.setLevel(logging.ERROR)
    # urllib3 (botocore's HTTP, for SSO and STS) logs request lines with their queries.
    urllib3_logger = logging.getLogger("urllib3")
    if urllib3_logger.getEffectiveLevel() < logging.WARNING:
        urllib3_logger.setLevel(logging.WARNING)
    server_logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RedactProtocolErrors) for f in server_logger.filters):
        server_logger.addFilter(RedactProtocolErrors())
