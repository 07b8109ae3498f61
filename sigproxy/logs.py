"""Logging set-up: text or JSON lines on stderr, and the rules that keep secrets out.

Never logged, at any level: signed Authorization headers, secret keys, session tokens,
cookies, query values. sigproxy's own lines name paths without queries; botocore's debug
output (canonical requests carry the session token) is held at ERROR; the emulator's
aiohttp server loses the raw request line its protocol errors would quote (sigproxy's
own HTTP layer never quotes a client's bytes).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import sys
import time
from typing import IO, Any

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


def _json_time(created: float) -> str:
    return datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _json_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _JSON.encode(out)


# What json.dumps(out, default=str) builds for every call, built once.
_JSON = json.JSONEncoder(default=str)


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


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` with ``logging.Formatter``'s very bytes, cheaper: the local time
    of a second is formatted once for every record in it, not once a record."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")  # one tuple: swapped whole, thread-safe

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        """``asctime`` for a record created at ``created`` (epoch seconds)."""
        second = int(created)
        cached, prefix = self._second
        if second != cached:
            # A local time has whole seconds (localtime() drops the fraction), so the
            # second's text serves every record of it.
            prefix = time.strftime(self.default_time_format, self.converter(created))
            self._second = (second, prefix)
        return f"{prefix},{int(msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        message = record.message = record.getMessage()
        asctime = record.asctime = self.formatTime(record)
        s = f"{asctime} {record.levelname} {record.name}: {message}"
        if record.exc_info or record.exc_text or record.stack_info:
            # The rare tail, as logging.Formatter.format writes it.
            if record.exc_info and not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            if record.exc_text:
                if s[-1:] != "\n":
                    s = s + "\n"
                s = s + record.exc_text
            if record.stack_info:
                if s[-1:] != "\n":
                    s = s + "\n"
                s = s + self.formatStack(record.stack_info)
        return s


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes once per event-loop turn: the lines of a turn are
    kept, the first schedules their write with ``loop.call_soon``, and they go out in one
    ``write`` (one system call for a line-buffered stderr) as the loop turns again.

    Written at once, after what is kept (so the order holds): a record of WARNING or
    above, and any record logged with no event loop running in its thread (start-up,
    shutdown, executor threads). ``flush()`` writes what is kept; ``close()`` and
    ``logging.shutdown`` (at exit) call it, so no line is lost unless the process
    ends without running exit handlers (``os._exit``, SIGKILL)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._last: logging.LogRecord | None = None
        self._scheduled: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self._last = record
        self._keep(line, record.levelno)

    def keep(self, line: str) -> None:
        """An INFO line formatted already (see :class:`AccessLog`), kept like a record's."""
        self.acquire()
        try:
            self._keep(line, logging.INFO)
        finally:
            self.release()

    def _keep(self, line: str, level: int) -> None:
        """The caller holds the handler's lock."""
        self._pending.append(line)
        if level >= logging.WARNING:
            self._write()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write()
            return
        if self._scheduled is not loop:
            # (A loop that stopped before its turn came keeps a stale mark; a new loop
            # schedules again, and flush() at exit writes what the old one left.)
            self._scheduled = loop
            loop.call_soon(self._turn)

    def _turn(self) -> None:
        self.acquire()
        try:
            self._scheduled = None
            self._write()
        finally:
            self.release()

    def _write(self) -> None:
        """Write what is kept. The caller holds the handler's lock."""
        pending = self._pending
        if not pending:
            return
        text = pending[0] if len(pending) == 1 else "".join(pending)
        pending.clear()
        record, self._last = self._last, None
        try:
            self.stream.write(text)
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            if record is not None:
                self.handleError(record)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
            super().flush()
        finally:
            self.release()

    def close(self) -> None:
        self.flush()
        super().close()

    def setStream(self, stream: IO[str]) -> IO[str] | None:
        self.flush()
        return super().setStream(stream)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = BatchingStreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    protect_secrets()


class AccessLog:
    """The access log line of one request, as ``logger.info`` would log it (the same
    message, arguments and ``extra`` fields) without its stack walk (``findCaller``): the
    record is made with ``logger.makeRecord`` and passed to ``logger.handle``, so
    filters, handlers and formatters see it as before. Its ``pathname``, ``lineno`` and
    ``funcName`` are logging's "unknown" values.

    The caller checks ``enabled`` first (and may skip building its arguments), then calls
    ``write``; both follow level changes (``setLevel``, a reload) as they happen."""

    FORMAT = "%s %s %s %s %s in=%d out=%d total_ms=%.1f upstream_ms=%s%s%s"

    __slots__ = ("logger",)

    def _direct(self) -> BatchingStreamHandler | None:
        """The handler to give a formatted line to directly: when the access logger's
        records would reach only sigproxy's own stderr handler (set up by
        :func:`setup_logging`), with no filter or other handler on the way to see the
        record itself. Otherwise None, and a record is made and handled."""
        logger: logging.Logger | None = self.logger
        root = logging.root
        while logger is not None and logger is not root:
            if logger.handlers or logger.filters or not logger.propagate:
                return None
            logger = logger.parent
        if root.filters or len(root.handlers) != 1:
            return None
        handler = root.handlers[0]
        if type(handler) is not BatchingStreamHandler or handler.filters:
            return None
        if handler.level > logging.INFO or handler.terminator != "\n":
            return None
        formatter = type(handler.formatter)
        if formatter is not TextFormatter and formatter is not JsonFormatter:
            return None
        return handler

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    @property
    def enabled(self) -> bool:
        """Whether an INFO record of the logger goes anywhere (logging caches this per
        logger, and clears the cache on every level change)."""
        return self.logger.isEnabledFor(logging.INFO)

    def write(
        self,
        request_id: str,
        upstream: str,
        method: str,
        path: str,
        raw: str,
        status: int,
        received: int,
        sent: int,
        elapsed: float,
        upstream_time: float | None,
        error: str | None,
    ) -> None:
        """Log one finished request. ``method``, ``path`` and ``raw`` (the path as the
        client sent it) are printable already (:func:`printable`); ``elapsed`` and
        ``upstream_time`` are seconds."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        upstream_ms = None if upstream_time is None else round(upstream_time * 1000, 1)
        total = elapsed * 1000
        args = (
            request_id,
            upstream,
            method,
            path,
            status,
            received,
            sent,
            total,
            "-" if upstream_ms is None else upstream_ms,
            "" if raw == path else f" raw={raw}",
            "" if error is None else f" error={error}",
        )
        # The extra fields (none of these names is a LogRecord attribute: checked once,
        # at import), in the order makeRecord(extra=...) would set them.
        fields = {
            "request_id": request_id,
            "upstream": upstream,
            "method": method,
            "path": path,
            "raw_path": raw,
            "status": status,
            "bytes_in": received,
            "bytes_out": sent,
            "total_ms": round(total, 1),
            "upstream_ms": upstream_ms,
            "error": error,
        }
        handler = self._direct()
        if handler is not None:
            # The line the record would have become, without the record: sigproxy's own
            # handler and formatters, and nothing on the way that could see a record.
            created = time.time()
            msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
            message = self.FORMAT % args
            formatter = handler.formatter
            if isinstance(formatter, TextFormatter):
                line = f"{formatter.stamp(created, msecs)} INFO {logger.name}: {message}"
            else:
                head = {
                    "time": _json_time(created),
                    "level": "info",
                    "logger": logger.name,
                    "message": message,
                }
                line = _JSON.encode(head | fields)
            handler.keep(line + "\n")
            return
        record = logger.makeRecord(
            logger.name,
            logging.INFO,
            "(unknown file)",
            0,
            self.FORMAT,
            args,
            None,
            "(unknown function)",
        )
        record.__dict__.update(fields)
        logger.handle(record)


ACCESS_FIELDS = (
    "request_id",
    "upstream",
    "method",
    "path",
    "raw_path",
    "status",
    "bytes_in",
    "bytes_out",
    "total_ms",
    "upstream_ms",
    "error",
)
assert not _STANDARD.intersection(ACCESS_FIELDS)


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
