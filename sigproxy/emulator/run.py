"""``sigproxy emulate``: serve the configured functions until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os

from ..app import stop_signals
from ..errors import ConfigError
from .config import DEFAULT_ACCOUNT, EmulatorConfig, FunctionConfig
from .server import start_functions, stop_functions
from .sigv4 import Caller

log = logging.getLogger("sigproxy.emulator")


async def run_emulator(config: EmulatorConfig) -> None:
    async with stop_signals() as stop:
        running = await start_functions(config)
        try:
            if config.clock_offset:
                log.info(
                    "clock_offset: the emulator's clock runs %+g s from real time",
                    config.clock_offset,
                )
            for r in running:
                fn = r.function
                log.info(
                    "function %s (%s, AuthType %s, %s, timeout %gs) at %s",
                    fn.name,
                    fn.handler,
                    fn.auth,
                    fn.invoke_mode,
                    fn.timeout,
                    r.url,
                )
                print(f"{fn.name}\t{r.url}\t{fn.auth}\t{fn.handler}", flush=True)
            await stop.wait()
        finally:
            await stop_functions(running)


def config_from_flags(
    handler: str,
    *,
    name: str,
    port: int,
    auth: str,
    region: str,
    timeout: float,
    host: str,
) -> EmulatorConfig:
    """One function from command-line flags. AWS_IAM accepts requests signed with the
    credentials in this environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for
    temporary ones, AWS_SESSION_TOKEN)."""
    callers: tuple[Caller, ...] = ()
    if auth == "AWS_IAM":
        key = os.environ.get("AWS_ACCESS_KEY_ID")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise ConfigError(
                "--auth",
                "AWS_IAM needs the caller's keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or use --auth NONE, or a config file with emulator.callers)",
            )
        callers = (
            Caller(
                access_key_id=key,
                secret_access_key=secret,
                session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
                account_id=DEFAULT_ACCOUNT,
                user_arn=f"arn:aws:iam::{DEFAULT_ACCOUNT}:user/local-dev",
            ),
        )
    if timeout <= 0 or timeout > 900:
        raise ConfigError("--timeout", "must be more than 0 and at most 900 seconds")
    return EmulatorConfig(
        host=host,
        region=region,
        callers=callers,
        functions=(
            FunctionConfig(name=name, handler=handler, port=port, auth=auth, timeout=timeout),  # type: ignore[arg-type]
        ),
        base_dir=os.getcwd(),
    )
