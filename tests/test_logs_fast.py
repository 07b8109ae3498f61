"""The cheap logging path (issue 16): the text formatter writes logging.Formatter's very
bytes, the stderr handler writes once per event-loop turn without losing or reordering a
line, and AccessLog makes the record ``logger.info`` made."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from sigproxy.logs import (
    TEXT_FORMAT,
    AccessLog,
    BatchingStreamHandler,
    JsonFormatter,
    TextFormatter,
)

from .test_process import ROOT


class CountingStream:
    """A file-like object that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1

    @property
    def text(self) -> str:
        return "".join(self.writes)


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def record_at(
    created: float, msg: str = "m %s", args: Any = ("x",), **kw: Any
) -> logging.LogRecord:
    rec = logging.LogRecord("sigproxy.t", logging.INFO, __file__, 1, msg, args, None, **kw)
    rec.created = created
    rec.msecs = int((created - int(created)) * 1000) + 0.0
    return rec


def both(rec: logging.LogRecord, ours: logging.Formatter) -> tuple[str, str]:
    plain = logging.Formatter(TEXT_FORMAT)
    return ours.format(copy.copy(rec)), plain.format(copy.copy(rec))


def test_text_lines_are_logging_formatters_bytes_across_seconds() -> None:
    ours = TextFormatter()  # one instance: its per-second cache is exercised
    base = float(int(time.time()))
    moments = [
        base + 0.0,
        base + 0.0004,
        base + 0.5,
        base + 0.999,
        base + 0.9999999,
        base + 1.0,
        base + 1.001,
        base + 0.25,  # back to an earlier second (clock stepped back)
        base + 3600.123,
        base + 86400 * 180 + 0.9995,  # half a year on: the other side of a DST change
        base + 86400 * 180 + 1.0,
    ]
    for created in moments:
        got, want = both(record_at(created), ours)
        assert got == want, created
    # A real record of now, levels, and a message with % in it.
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        rec = logging.LogRecord("aiohttp.x", level, __file__, 1, "100%% %s", ("é\\",), None)
        got, want = both(rec, ours)
        assert got == want


def test_text_tail_exception_and_stack_as_logging_writes_them() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc = sys.exc_info()
    ours = TextFormatter()
    for kw in ({"exc_info": exc}, {"sinfo": "Stack (most recent call last):\n  here"}):
        rec = record_at(time.time(), **{k: v for k, v in kw.items() if k == "sinfo"})
        if "exc_info" in kw:
            rec.exc_info = exc  # type: ignore[assignment]
        got, want = both(rec, ours)
        assert got == want
        assert "\n" in got
    rec = record_at(time.time(), msg="ends with newline\n", args=None)
    rec.exc_text = "cached traceback text"
    got, want = both(rec, ours)
    assert got == want


def handler_pair() -> tuple[logging.Logger, CountingStream, BatchingStreamHandler]:
    stream = CountingStream()
    handler = BatchingStreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger(f"sigproxy.test_fast.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger, stream, handler


async def test_a_loop_turns_lines_go_out_in_one_write() -> None:
    logger, stream, handler = handler_pair()
    plain_stream = CountingStream()
    plain = logging.StreamHandler(plain_stream)  # type: ignore[arg-type]
    plain.setFormatter(logging.Formatter(TEXT_FORMAT))
    logger.addHandler(plain)
    for i in range(50):
        logger.info("line %d", i)
    assert stream.writes == []  # kept for the turn
    assert len(plain_stream.writes) == 50
    await asyncio.sleep(0)  # one turn
    assert len(stream.writes) == 1
    assert stream.text == plain_stream.text  # the same bytes, in one write
    assert stream.text.count("\n") == 50
    # The next turn's lines: again one write.
    logger.debug("a")
    logger.info("b")
    await asyncio.sleep(0)
    assert len(stream.writes) == 2
    assert stream.writes[1].endswith(
        "sigproxy.test_fast" + stream.writes[1].split("sigproxy.test_fast", 1)[1]
    )
    assert stream.writes[1].count("\n") == 2
    handler.close()


async def test_warning_and_above_go_out_at_once_after_what_is_kept() -> None:
    logger, stream, handler = handler_pair()
    logger.info("first")
    logger.info("second")
    logger.warning("third")
    assert len(stream.writes) == 1  # all three, in order, now
    lines = stream.text.splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["first", "second", "third"]
    assert " WARNING " in lines[2]
    logger.error("fourth")
    assert len(stream.writes) == 2
    await asyncio.sleep(0)
    assert len(stream.writes) == 2  # nothing was left to write
    handler.close()


async def test_close_and_flush_write_what_is_kept() -> None:
    logger, stream, handler = handler_pair()
    logger.info("kept")
    handler.flush()
    assert stream.text.endswith("kept\n")
    logger.info("kept too")
    handler.close()  # logging.shutdown() at exit flushes, then closes, each handler
    assert stream.text.endswith("kept too\n")
    await asyncio.sleep(0)
    assert stream.text.count("kept") == 2


def test_with_no_loop_running_a_line_goes_out_at_once() -> None:
    logger, stream, handler = handler_pair()
    logger.info("one")
    logger.debug("two")
    assert len(stream.writes) == 2
    assert stream.text.endswith("two\n")
    handler.close()


def test_a_loop_that_stops_before_its_turn_loses_nothing() -> None:
    logger, stream, handler = handler_pair()
    loop = asyncio.new_event_loop()
    try:

        async def log_and_stop() -> None:
            logger.info("in the last turn")
            loop.stop()

        task = loop.create_task(log_and_stop())
        loop.run_forever()  # stops before the write is due
        assert task.done()
        assert stream.writes == []
        logger.info("after, with no loop")  # writes what the stopped loop left, in order
        assert stream.text.splitlines()[0].endswith("in the last turn")
        assert stream.text.splitlines()[1].endswith("after, with no loop")
        # A new loop writes again, though the old one kept its mark.
        loop2 = asyncio.new_event_loop()
        try:

            async def again() -> None:
                logger.info("new loop")
                await asyncio.sleep(0)
                assert stream.text.endswith("new loop\n")

            loop2.run_until_complete(again())
        finally:
            loop2.close()
    finally:
        loop.close()
        handler.close()


@pytest.mark.parametrize(
    "ending",
    [
        "loop.stop()",  # the loop never turns again; exit handlers write the lines
        "raise SystemExit(3)",
    ],
)
def test_lines_of_the_last_turn_reach_stderr_at_exit(ending: str) -> None:
    script = f"""
import asyncio, logging
from sigproxy.logs import setup_logging
setup_logging("info")
log = logging.getLogger("sigproxy.exit")
loop = asyncio.new_event_loop()
async def main():
    for i in range(3):
        log.info("line %d", i)
    {ending}
loop.create_task(main())
try:
    loop.run_forever()
except SystemExit:
    raise
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    lines = proc.stderr.splitlines()
    assert [line.split(": ", 1)[1] for line in lines if "sigproxy.exit" in line] == [
        "line 0",
        "line 1",
        "line 2",
    ], proc.stderr


ARGS = {
    "request_id": "3f2a",
    "upstream": "orders",
    "method": "POST",
    "path": "/orders/a b",
    "raw": "/orders/a%20b",
    "status": 502,
    "received": 5,
    "sent": 120,
    "elapsed": 0.012345,
    "upstream_time": 0.00444,
    "error": "connect",
}


def logged_as_today(logger: logging.Logger, a: dict[str, Any]) -> None:
    """What Proxy._account logged before AccessLog (the caller's printable() applied)."""
    raw, path = a["raw"], a["path"]
    upstream_ms = None if a["upstream_time"] is None else round(a["upstream_time"] * 1000, 1)
    logger.info(
        "%s %s %s %s %s in=%d out=%d total_ms=%.1f upstream_ms=%s%s%s",
        a["request_id"],
        a["upstream"],
        a["method"],
        path,
        a["status"],
        a["received"],
        a["sent"],
        a["elapsed"] * 1000,
        "-" if upstream_ms is None else upstream_ms,
        "" if raw == path else f" raw={raw}",
        "" if a["error"] is None else f" error={a['error']}",
        extra={
            "request_id": a["request_id"],
            "upstream": a["upstream"],
            "method": a["method"],
            "path": path,
            "raw_path": raw,
            "status": a["status"],
            "bytes_in": a["received"],
            "bytes_out": a["sent"],
            "total_ms": round(a["elapsed"] * 1000, 1),
            "upstream_ms": upstream_ms,
            "error": a["error"],
        },
    )


VARIANTS = [
    ARGS,
    {**ARGS, "raw": ARGS["path"], "error": None, "upstream_time": None, "status": 200},
    {**ARGS, "upstream": "none", "method": "BREW", "received": 0, "sent": 0, "elapsed": 0.0},
]


@pytest.mark.parametrize("a", VARIANTS)
def test_access_record_is_the_one_logger_info_made(a: dict[str, Any]) -> None:
    logger = logging.getLogger("sigproxy.access.fasttest")
    keep = Keep()
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        logged_as_today(logger, a)
        AccessLog(logger).write(**a)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(logging.NOTSET)
    want, got = keep.records
    assert got.msg == want.msg
    assert got.args == want.args
    assert got.getMessage() == want.getMessage()
    assert (got.name, got.levelno, got.levelname) == (want.name, want.levelno, want.levelname)
    assert (got.exc_info, got.exc_text, got.stack_info) == (None, None, None)
    differ = {"created", "msecs", "relativeCreated", "pathname", "filename", "module", "lineno", "funcName"}  # fmt: skip
    mine = {k: v for k, v in got.__dict__.items() if k not in differ}
    theirs = {k: v for k, v in want.__dict__.items() if k not in differ}
    assert mine == theirs  # every extra field, and every other attribute
    for key in ("request_id", "raw_path", "total_ms", "upstream_ms", "error"):
        assert key in got.__dict__
    # JSON: the same object, but for the time.
    fmt = JsonFormatter()
    j_want, j_got = json.loads(fmt.format(want)), json.loads(fmt.format(got))
    j_want.pop("time")
    j_got.pop("time")
    assert j_got == j_want
    assert j_got["status"] == a["status"] and j_got["path"] == a["path"]
    # Text: the same line, but for the time.
    text = TextFormatter()
    assert text.format(got).split(" ", 2)[2] == text.format(want).split(" ", 2)[2]


def test_access_log_follows_levels_and_filters() -> None:
    logger = logging.getLogger("sigproxy.access.fasttest2")
    keep = Keep()
    logger.addHandler(keep)
    access = AccessLog(logger)
    try:
        logger.setLevel(logging.WARNING)
        assert not access.enabled
        access.write(**ARGS)
        assert keep.records == []
        logger.setLevel(logging.INFO)  # a reload
        assert access.enabled
        access.write(**ARGS)
        assert len(keep.records) == 1

        class Drop(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                return False

        drop = Drop()
        logger.addFilter(drop)
        access.write(**ARGS)
        assert len(keep.records) == 1
        logger.removeFilter(drop)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(logging.NOTSET)


def test_access_log_reaches_caplog(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sigproxy.access"):
        AccessLog(logging.getLogger("sigproxy.access")).write(**ARGS)
    (rec,) = [r for r in caplog.records if r.name == "sigproxy.access"]
    assert rec.getMessage() == (
        "3f2a orders POST /orders/a b 502 in=5 out=120 total_ms=12.3 upstream_ms=4.4"
        " raw=/orders/a%20b error=connect"
    )
    assert rec.__dict__["bytes_out"] == 120


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("a", VARIANTS)
def test_access_line_written_directly_is_the_records_line(fmt: str, a: dict[str, Any]) -> None:
    """With setup_logging's own handler as the only one, AccessLog writes the line
    without a record; it is the line the record made (as logger.info's, but for the
    time), and a filter anywhere on the way brings the record back."""
    import sigproxy.logs as logs

    saved = logging.root.handlers[:], logging.root.level
    stream = CountingStream()
    try:
        logs.setup_logging("info", fmt)
        handler = logging.root.handlers[0]
        assert isinstance(handler, BatchingStreamHandler)
        handler.setStream(stream)  # type: ignore[arg-type]
        logger = logging.getLogger("sigproxy.access")
        access = AccessLog(logger)
        assert access._direct() is handler
        logged_as_today(logger, a)
        access.write(**a)
        handler.flush()
        want, got = stream.text.splitlines()
        if fmt == "json":
            j_want, j_got = json.loads(want), json.loads(got)
            assert list(j_got) == list(j_want)  # the same keys in the same order
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", j_got["time"])
            j_want.pop("time")
            j_got.pop("time")
            assert j_got == j_want
        else:
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", got[:24])
            assert got[24:] == want[24:]
        # Anything that could see the record: the record path again.
        blocked = logging.Filter("nothing")
        logging.getLogger("sigproxy").addFilter(blocked)
        try:
            assert access._direct() is None
        finally:
            logging.getLogger("sigproxy").removeFilter(blocked)
        handler.addFilter(blocked)
        try:
            assert access._direct() is None
        finally:
            handler.removeFilter(blocked)
    finally:
        logging.root.handlers[:], level = saved
        logging.root.setLevel(level)
