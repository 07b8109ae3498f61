"""The ``sigproxy`` command: flags to config, logging set-up, exit codes.

Exit status: 0 success, 2 a user error (bad config, no credentials, port taken),
1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .app import serve
from .config import LOG_LEVELS, Config, Listen, load_config
from .credentials import CredentialStore
from .errors import ConfigError, SigproxyError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("sigproxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sigproxy",
        description="SigV4 signing reverse proxy for AWS Lambda Function URLs.",
    )
    parser.add_argument("--version", action="version", version=f"sigproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            "-c",
            default=os.environ.get("SIGPROXY_CONFIG", "sigproxy.yaml"),
            help="YAML config file (default: $SIGPROXY_CONFIG or ./sigproxy.yaml)",
        )
        p.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="override log_level")

    serve_p = sub.add_parser("serve", help="run the proxy")
    add_config(serve_p)
    serve_p.add_argument("--host", default=None, help="override listen.host")
    serve_p.add_argument(
        "--port", type=int, default=None, help="override listen.port (0: any free port)"
    )

    check_p = sub.add_parser(
        "check", help="validate the config, resolve credentials and print the route table"
    )
    add_config(check_p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        config = _apply_overrides(config, args)
    except ConfigError as exc:
        return _fail(f"{args.config}: {exc}")
    _setup_logging(args.log_level or config.log_level)
    try:
        if args.command == "check":
            return _check(config)
        return _serve(config)
    except SigproxyError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return EXIT_OK


def _apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    host = getattr(args, "host", None)
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError("--port", f"must be between 0 and 65535, got {port}")
    if host is None and port is None:
        return config
    listen = Listen(
        host=host if host is not None else config.listen.host,
        port=port if port is not None else config.listen.port,
    )
    return dataclasses.replace(config, listen=listen)


def _fail(message: str) -> int:
    print(f"sigproxy: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # botocore's debug output includes canonical requests, which carry session tokens.
    # No level of ours lets it through.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").disabled = True
    server_logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RedactProtocolErrors) for f in server_logger.filters):
        server_logger.addFilter(RedactProtocolErrors())


class RedactProtocolErrors(logging.Filter):
    """aiohttp logs a malformed request with the raw request line, query values and all,
    in its exception text. Keep the record, drop the raw bytes: log the exception's type
    and the first line of its message only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = getattr(exc, "message", None) or str(exc)
            first = str(detail).strip().splitlines()[0] if str(detail).strip() else ""
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {first}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _check(config: Config) -> int:
    store = CredentialStore.resolve(config)
    rows = [("PREFIX", "HOST", "UPSTREAM", "URL", "REGION", "SERVICE", "AUTH", "CREDENTIALS")]
    for upstream in config.upstreams:
        source = store.get(upstream.name)
        creds = "-" if source is None else f"{source.description} ({source.method})"
        rows.append(
            (
                upstream.path_prefix,
                upstream.match_host or "*",
                upstream.name,
                upstream.url,
                upstream.region or "-",
                upstream.service,
                upstream.auth,
                creds,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"config OK: {config.source}, {len(config.upstreams)} upstream(s)")
    return EXIT_OK


def _serve(config: Config) -> int:
    store = CredentialStore.resolve(config)
    for upstream in config.upstreams:
        source = store.get(upstream.name)
        log.info(
            "route %s%s -> %s (%s, %s, credentials: %s)",
            upstream.match_host or "",
            upstream.path_prefix,
            upstream.url,
            upstream.region or "no region",
            upstream.auth,
            "-" if source is None else f"{source.description} ({source.method})",
        )
    asyncio.run(serve(config, store))
    return EXIT_OK
