"""``sigproxy demo``: the example functions as local Function URLs (AuthType AWS_IAM,
throwaway keys made for this run) with sigproxy in front, signing with those keys; one
function whose resource policy refuses the demo's caller, to show that refusal; and one
that streams server-sent events (invoke_mode RESPONSE_STREAM) through sigproxy."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
from pathlib import Path

from .app import listening_urls, running_proxy, stop_signals
from .config import parse_config
from .credentials import CredentialSource, CredentialStore
from .emulator.config import DEFAULT_ACCOUNT, Cors, EmulatorConfig, FunctionConfig, Grant
from .emulator.server import start_functions, stop_functions
from .emulator.sigv4 import Caller

REGION = "us-east-1"
# (route prefix, function name, example file)
ROUTES = (
    ("/hello", "hello", "hello.py"),
    ("/webhook", "webhook", "webhook.py"),
    ("/api", "router", "router.py"),
    ("/denied", "denied", "hello.py"),
    ("/stream", "stream", "stream.py"),
    ("/mcp", "mcp", "mcp_server.py"),
)
# The function whose resource policy grants the caller lambda:InvokeFunctionUrl only:
# since October 2025 a Function URL also needs lambda:InvokeFunction, so IAM refuses it.
DENIED = "denied"
# The function that streams its response: 20 events 100 ms apart, well within 10 s.
STREAM = "stream"
STREAM_TIMEOUT = 10.0


def examples_dir() -> Path:
    """The example handlers: inside the installed package, or the checkout's examples/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "examples", here.parent / "examples"):
        if (candidate / "hello.py").is_file():
            return candidate
    raise FileNotFoundError("the example handlers (examples/hello.py) are not installed")


def demo_caller() -> Caller:
    """Fresh temporary-style keys, known only to this process."""
    alphabet = string.ascii_uppercase + string.digits
    return Caller(
        access_key_id="ASIA" + "".join(secrets.choice(alphabet) for _ in range(16)),
        secret_access_key=secrets.token_urlsafe(30),
        session_token=secrets.token_urlsafe(48),
        account_id=DEFAULT_ACCOUNT,
        user_arn=f"arn:aws:iam::{DEFAULT_ACCOUNT}:user/sigproxy-demo",
    )


async def run_demo(
    host: str = "127.0.0.1", port: int = 8080, cors_origins: tuple[str, ...] = ()
) -> None:
    """Serve the demo until SIGINT/SIGTERM; ``cors_origins`` are page origins (such as
    ``http://localhost:3000``) whose scripts may call the demo through the proxy."""
    caller = demo_caller()
    folder = examples_dir()
    emulator = EmulatorConfig(
        host="127.0.0.1",
        region=REGION,
        callers=(caller,),
        functions=tuple(
            FunctionConfig(
                name=name,
                handler=f"{folder / file}:handler",
                auth="AWS_IAM",
                invoke_mode="RESPONSE_STREAM" if name == STREAM else "BUFFERED",
                timeout=STREAM_TIMEOUT if name == STREAM else 3.0,
                cors=Cors(allow_origins=("*",), allow_methods=("*",), allow_headers=("*",)),
                allow=(
                    (Grant(principal=caller.user_arn, actions=("lambda:InvokeFunctionUrl",)),)
                    if name == DENIED
                    else None
                ),
            )
            for _, name, file in ROUTES
        ),
        base_dir=str(folder),
    )
    async with stop_signals() as stop:
        functions = await start_functions(emulator)
        try:
            by_name = {r.function.name: r.url for r in functions}
            lines = [f"listen: {{host: '{host}', port: {port}}}", "upstreams:"]
            cors = ""
            if cors_origins:
                origins = ", ".join(f"'{o}'" for o in cors_origins)
                cors = (
                    f", cors: {{allow_origins: [{origins}], allow_methods: [GET, POST],"
                    " allow_headers: [content-type, x-signature]}"
                )
            for prefix, name, _ in ROUTES:
                lines.append(
                    f"  - {{name: {name}, url: '{by_name[name]}', path_prefix: {prefix}, "
                    f"region: {REGION}{cors}}}"
                )
            config = parse_config("\n".join(lines) + "\n", source="<demo>")
            source = CredentialSource.static(
                caller.access_key_id, caller.secret_access_key, caller.session_token
            )
            credentials = CredentialStore.static_for(config, source)
            async with running_proxy(config, credentials) as runner:
                _print_instructions(listening_urls(runner)[0], by_name)
                await stop.wait()
        finally:
            await stop_functions(functions)


def _webhook_curl(proxy: str) -> str:
    """A delivery signed the way examples/webhook.py checks it."""
    body = '{"type": "order.created", "id": 42}'
    secret = os.environ.get("WEBHOOK_SECRET", "demo-webhook-secret").encode()
    signature = hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
    return (
        f"curl -X POST -H 'Content-Type: application/json' -H 'X-Signature: sha256={signature}' "
        f"-d '{body}' {proxy}/webhook"
    )


def _print_instructions(proxy: str, functions: dict[str, str]) -> None:
    width = max(len(p) for p, _, _ in ROUTES)
    routes = "\n".join(
        f"  {proxy}{prefix:<{width}}  ->  {name:<8} {functions[name]}  (examples/{file})"
        for prefix, name, file in ROUTES
    )
    denied = "# refused by IAM (InvokeFunction missing): 403, X-Sigproxy-Diagnosis: access-denied"
    stream = "# server-sent events, one every 100 ms, arriving one by one through sigproxy"
    mcp = (
        "curl -X POST -H 'Content-Type: application/json' "
        '-H \'Accept: application/json, text/event-stream\' -d \'{"jsonrpc":"2.0","id":1,'
        '"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":40}}}\' '
        f"{proxy}/mcp    # an MCP server (examples/mcp_server.py): MCP clients use {proxy}/mcp"
    )
    print(
        f"""
sigproxy demo: a signing proxy in front of six local Function URLs (AuthType AWS_IAM).
No AWS account is involved: the functions accept only requests signed with throwaway keys
made for this run, and sigproxy signs with those keys.

{routes}

Try:
  curl '{proxy}/hello?name=John'
  curl -i '{functions["hello"]}/?name=John'    # straight to the function, unsigned: 403
  curl -X POST -H 'Content-Type: application/json' -d '{{"order": 42}}' {proxy}/api/process
  {_webhook_curl(proxy)}
  curl -i '{proxy}/denied'    {denied}
  curl -N '{proxy}/stream'    {stream}
  {mcp}

Browser: open {proxy}/hello?name=John
Postman: GET {proxy}/hello?name=John with Authorization "No Auth" (sigproxy signs for you)

Ctrl-C stops the proxy and the six functions.
""",
        flush=True,
    )
