"""The ``sigproxy`` command: flags to config, logging set-up, exit codes.

Exit status: 0 success, 2 a user error (bad config, no credentials, port taken),
1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from . import __version__
from .config import LOG_FORMATS, LOG_LEVELS, Config, load_config, with_listen
from .config import warnings as config_warnings
from .errors import ConfigError, ListenError, SigproxyError
from .logs import setup_logging
from .notify import Notifier
from .workers import WORKER_FDS_FLAG, Supervisor, worker_count, worker_handoff

if TYPE_CHECKING:
    from .credentials import CredentialStore

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("sigproxy")
T = TypeVar("T")


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
        p.add_argument(
            "--log-format", choices=LOG_FORMATS, default=None, help="override log_format"
        )

    serve_p = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy: sign what reaches the listen address and forward it to the "
        "upstream the config's table names. SIGHUP reloads the config; SIGTERM drains.",
    )
    add_config(serve_p)
    serve_p.add_argument(
        "--workers",
        default="1",
        help="worker processes sharing the listening socket: a number or auto (one per CPU); "
        "default 1",
    )
    serve_p.add_argument(WORKER_FDS_FLAG, default=None, help=argparse.SUPPRESS)
    serve_p.add_argument("--host", default=None, help="override listen.host")
    serve_p.add_argument(
        "--port", type=int, default=None, help="override listen.port (0: any free port)"
    )
    serve_p.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="override admin.port (0: any free port, logged at start)",
    )
    serve_p.add_argument(
        "--wait-for-credentials",
        action="store_true",
        help="start even when an upstream has no AWS credentials yet: /readyz and its "
        "requests answer 503 saying what is missing until they appear (a file written, "
        "aws sso login), then it serves without a restart",
    )

    check_p = sub.add_parser(
        "check",
        help="validate the config, resolve credentials and print the route table",
        description="Validate the config, resolve every upstream's credentials and print the "
        "route table; exit 0, or 2 with one line naming the problem. --probe also tries "
        "each upstream and prints what it answered.",
    )
    add_config(check_p)
    check_p.add_argument(
        "--no-credentials",
        action="store_true",
        help="validate the config and print the routes without resolving credentials "
        "(in CI, without AWS access)",
    )
    check_p.add_argument(
        "--offline",
        action="store_true",
        help="skip the DNS lookup of each upstream's host",
    )
    check_p.add_argument(
        "--probe",
        action="store_true",
        help="also connect to every upstream (DNS, TCP, TLS) and, for aws_iam ones, send one "
        "request with a wrong signature that cannot run the function, to learn whether the URL "
        "accepts the credentials; exit 2 unless every upstream passes",
    )

    demo_p = sub.add_parser(
        "demo",
        help="the example functions as local Function URLs with sigproxy in front",
        description="Start the example functions as local Function URLs (AuthType AWS_IAM, "
        "throwaway keys) and sigproxy in front of them, offline; Ctrl-C stops them all.",
    )
    demo_p.add_argument("--host", default="127.0.0.1", help="proxy listen host (default 127.0.0.1)")
    demo_p.add_argument(
        "--port", type=int, default=8080, help="proxy port (default 8080; 0: any free port)"
    )
    demo_p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default info")
    demo_p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a page origin whose scripts may call the demo (http://localhost:3000); repeatable",
    )

    emu_p = sub.add_parser(
        "emulate",
        help="serve Python handlers as local Lambda Function URLs",
        description="Serve the functions of the config's emulator section, or one --handler.",
    )
    emu_p.add_argument("--config", "-c", default=None, help="YAML file with an emulator section")
    emu_p.add_argument("--handler", help="module:function or path/to/file.py:function")
    emu_p.add_argument("--name", default=None, help="function name (default: from the handler)")
    emu_p.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    emu_p.add_argument("--host", default="127.0.0.1", help="listen host (default 127.0.0.1)")
    emu_p.add_argument(
        "--auth", choices=("AWS_IAM", "NONE"), default="AWS_IAM", help="default AWS_IAM"
    )
    emu_p.add_argument("--region", default="us-east-1", help="default us-east-1")
    emu_p.add_argument("--timeout", type=float, default=3.0, help="seconds (Lambda's default 3)")
    emu_p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default info")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "emulate":
        return _emulate(args)
    if args.command == "serve" and args.worker_fds is not None:
        return _worker(args)
    try:
        config = load_config(args.config)
        config = _apply_overrides(config, args)
    except ConfigError as exc:
        return _fail(f"{args.config}: {exc}")
    setup_logging(args.log_level or config.log_level, args.log_format or config.log_format)
    for warning in config_warnings(config):
        log.warning("%s", warning)
    try:
        from .upstream import verify_context

        verify_context()  # an unreadable AWS_CA_BUNDLE is said now, once, in one line
        if args.command == "check":
            return _check(config, args)
        return _serve(config, args.config, args)
    except SigproxyError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return EXIT_OK


def _apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    config = with_listen(config, getattr(args, "host", None), getattr(args, "port", None))
    admin_port = getattr(args, "admin_port", None)
    if admin_port is None:
        return config
    if not 0 <= admin_port <= 65535:
        raise ConfigError("--admin-port", f"must be between 0 and 65535, got {admin_port}")
    if config.admin is None:
        raise ConfigError("--admin-port", "the admin listener is off (admin: false in the config)")
    return dataclasses.replace(config, admin=dataclasses.replace(config.admin, port=admin_port))


def _fail(message: str) -> int:
    print(f"sigproxy: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check(config: Config, args: argparse.Namespace) -> int:
    from .credentials import CredentialStore

    if args.probe and (args.offline or args.no_credentials):
        flag = "--offline" if args.offline else "--no-credentials"
        return _fail(
            f"--probe cannot be combined with {flag}: it looks up and connects to every "
            "upstream and signs with its credentials"
        )
    for warning in _region_warnings(config):
        log.warning("%s", warning)
    if not args.offline and not args.probe:  # the probe looks each host up itself
        for warning in _dns_warnings(config):
            log.warning("%s", warning)
    store = None if args.no_credentials else CredentialStore.resolve(config)
    rows = [("PREFIX", "HOST", "UPSTREAM", "URL", "REGION", "SERVICE", "AUTH", "CREDENTIALS")]
    for upstream in config.upstreams:
        if upstream.auth != "aws_iam":
            creds = "-"
        elif store is None:
            creds = f"{upstream.credentials.describe()} (not resolved)"
        else:
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
    for upstream in config.upstreams:
        # Which way serve will go: the environment's HTTPS_PROXY/NO_PROXY decide unseen.
        if upstream.egress is not None:
            print(f"{upstream.name}: through egress proxy {upstream.egress.url}")  # no password
        if upstream.connect_to is not None:
            host, port = upstream.connect_to
            print(f"{upstream.name}: connecting to {host}:{port}")
    print(f"config OK: {config.source}, {len(config.upstreams)} upstream(s)")
    if store is None or not args.probe:
        return EXIT_OK
    from .probe import format_report, probe_all

    results = run(probe_all(config, store))
    print()
    for line in format_report(results, args.config):
        print(line)
    return EXIT_OK if all(r.passed for r in results) else EXIT_USAGE


def _region_warnings(config: Config) -> list[str]:
    """Regions botocore's own partition data does not know for the service: a typo
    (us-esat-1) signs for a region that refuses every request. A warning, since a new
    region can be newer than the installed botocore."""
    import difflib

    import botocore.session

    session = botocore.session.get_session()
    found = []
    for upstream in config.upstreams:
        if upstream.auth != "aws_iam" or not upstream.region:
            continue
        known = {
            region
            for partition in session.get_available_partitions()
            for region in session.get_available_regions(upstream.service, partition)
        }
        if known and upstream.region not in known:
            # Swapped letters (us-esat-1) first, then whatever difflib finds closest.
            close = [r for r in sorted(known) if sorted(r) == sorted(upstream.region)]
            close = close or difflib.get_close_matches(upstream.region, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            found.append(
                f"upstream {upstream.name!r}: {upstream.region} is not a region botocore "
                f"knows for {upstream.service}{hint}"
            )
    return found


def _is_address(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _dns_warnings(config: Config) -> list[str]:
    """Upstream hosts that do not resolve: a typo in the URL, or no network here."""
    import concurrent.futures
    import socket

    # Through an egress proxy (it resolves the name) or with connect_to (another address
    # is dialled), serve never looks the URL's host up: neither does this check.
    hosts = sorted(
        {
            u.url_host
            for u in config.upstreams
            if not _is_address(u.url_host) and u.egress is None and u.connect_to is None
        }
    )
    found = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        lookups = {h: pool.submit(socket.getaddrinfo, h, 443) for h in hosts}
        for host, lookup in lookups.items():
            try:
                lookup.result(timeout=5)
            except concurrent.futures.TimeoutError:
                found.append(f"DNS lookup of {host} took over 5 s (offline? pass --offline)")
            except (OSError, UnicodeError) as exc:  # UnicodeError: not a valid name at all
                reason = getattr(exc, "strerror", None) or str(exc)
                found.append(
                    f"DNS lookup of {host} failed: {reason} (a typo in the url, or no network "
                    "here: --offline skips this check)"
                )
    return found


def _serve(config: Config, path: str, args: argparse.Namespace) -> int:
    from .app import serve
    from .credentials import CredentialStore

    def load() -> Config:
        return _apply_overrides(load_config(path), args)

    workers = worker_count(args.workers)
    if workers > 1:
        # The supervisor signs nothing: only the workers resolve credentials.
        _log_routes(config, None)
        worker_args = ["--config", path]
        # Workers check every reload against the address really listened on.
        for flag, value in (
            ("--log-level", args.log_level),
            ("--log-format", args.log_format),
            ("--host", args.host),
            ("--admin-port", None if args.admin_port is None else str(args.admin_port)),
        ):
            if value:
                worker_args += [flag, value]
        if args.wait_for_credentials:
            worker_args.append("--wait-for-credentials")
        return run(Supervisor(config, worker_args, workers, load).run())
    store = CredentialStore.resolve(config, wait=args.wait_for_credentials)
    _log_routes(config, store)
    run(
        serve(config, store, load, wait_for_credentials=args.wait_for_credentials),
        tls_listener=config.listen.tls is not None,
    )
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    """One worker of ``serve --workers``: the config and sockets its supervisor handed
    over; the config file is read again only on reload."""
    from .app import serve
    from .credentials import CredentialStore

    try:
        handoff = worker_handoff(args.worker_fds)
    except (OSError, EOFError, pickle.UnpicklingError, ConfigError) as exc:
        return _fail(f"--worker-fds: {exc} (this flag is for sigproxy's own supervisor)")
    config = handoff.config
    setup_logging(args.log_level or config.log_level, args.log_format or config.log_format)

    def load() -> Config:
        return _apply_overrides(load_config(args.config), args)

    def ready() -> None:
        os.write(handoff.ready_fd, b"r")
        os.close(handoff.ready_fd)

    try:
        store = CredentialStore.resolve(config, wait=args.wait_for_credentials)
        run(
            serve(
                config,
                store,
                load,
                wait_for_credentials=args.wait_for_credentials,
                sockets=(handoff.proxy, handoff.admin),
                notifier=Notifier(environ={}),
                on_ready=ready,
                # Set by the supervisor before this process started, as prometheus-client
                # needs: its values then go to files there, added up by /metrics.
                multiprocess_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
            ),
            tls_listener=config.listen.tls is not None,
        )
    except SigproxyError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _log_routes(config: Config, store: CredentialStore | None) -> None:
    for upstream in config.upstreams:
        source = None if store is None else store.get(upstream.name)
        if source is not None and source.pending:
            creds = f"{source.description} (none yet: waiting for them)"
        elif source is not None:
            creds = f"{source.description} ({source.method})"
        elif upstream.auth == "aws_iam":
            creds = f"{upstream.credentials.describe()} (resolved by each worker)"
        else:
            creds = "-"
        via = ""
        if upstream.connect_to is not None:
            via += f", connecting to {upstream.connect_to[0]}:{upstream.connect_to[1]}"
        if upstream.egress is not None:
            via += f", through egress proxy {upstream.egress.url}"  # the password hidden
        log.info(
            "route %s%s -> %s (%s, %s, credentials: %s%s)",
            upstream.match_host or "",
            upstream.path_prefix,
            upstream.url,
            upstream.region or "no region",
            upstream.auth,
            creds,
            via,
        )


def run(coro: Coroutine[Any, Any, T], *, tls_listener: bool = False) -> T:
    """Run on uvloop when it is installed (the [speed] extra), else asyncio's loop.

    A TLS listener runs on asyncio's loop: uvloop's server-side ``start_tls`` does not
    report a failed handshake (plain HTTP sent to the TLS port, a client that gives up)
    until its timeout, and handshakes on sockets a supervisor handed over time out."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not tls_listener:
        # Not run inside the except: the whole program would run with the ImportError
        # as the exception being handled, and every exception raised in it would carry
        # it as its __context__ (httptools' callback errors lost theirs to it).
        with contextlib.suppress(ImportError):
            import uvloop  # type: ignore[import-not-found,unused-ignore]

            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    setup_logging(args.log_level)
    if not 0 <= args.port <= 65535:
        return _fail(f"--port: must be between 0 and 65535, got {args.port}")
    for origin in args.cors_origin:
        if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?", origin):
            return _fail(f"--cors-origin: {origin!r} is not an origin like http://localhost:3000")
    try:
        run(run_demo(args.host, args.port, tuple(args.cors_origin)))
    except ListenError as exc:
        return _fail(str(exc))
    except SigproxyError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _emulate(args: argparse.Namespace) -> int:
    from .emulator.config import load_emulator_config
    from .emulator.handlers import HandlerLoadError
    from .emulator.run import config_from_flags, run_emulator

    setup_logging(args.log_level)
    try:
        if not 0 <= args.port <= 65535:
            raise ConfigError("--port", f"must be between 0 and 65535, got {args.port}")
        if args.config and args.handler:
            raise ConfigError("--handler", "give either --config or --handler, not both")
        if args.config:
            config = load_emulator_config(args.config)
        elif args.handler:
            name = args.name or args.handler.rpartition(":")[0].rsplit("/", 1)[-1]
            config = config_from_flags(
                args.handler,
                name=name.removesuffix(".py").replace(".", "-") or "function",
                port=args.port,
                auth=args.auth,
                region=args.region,
                timeout=args.timeout,
                host=args.host,
            )
        else:
            raise ConfigError("", "give --config FILE (with an emulator section) or --handler")
        run(run_emulator(config))
    except ConfigError as exc:
        where = f"{args.config}: " if args.config else ""
        return _fail(f"{where}{exc}")
    except HandlerLoadError as exc:
        return _fail(f"cannot load handler: {exc}")
    except SigproxyError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot listen: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass
    return EXIT_OK
