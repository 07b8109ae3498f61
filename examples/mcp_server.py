"""A stateless MCP server (Model Context Protocol, Streamable HTTP transport) as a Lambda
handler behind a Function URL: ``POST /mcp`` (or ``/``) with one JSON-RPC message in, one JSON
answer out (``application/json``, no SSE stream, no ``Mcp-Session-Id``): the stateless,
JSON-response shape AWS's own MCP-on-Lambda samples use, written with the standard
library only so the function needs no layer.

Tools: ``add(a, b)`` and ``echo(text)``. Methods: ``initialize``, ``ping``,
``tools/list``, ``tools/call``; notifications (``notifications/initialized``) get
``202 Accepted``. ``GET`` and ``DELETE`` get ``405``: there is no standalone event stream
and no session to end, which the MCP client accepts.
"""

import base64
import json

SERVER_INFO = {"name": "lambda-mcp-example", "version": "1.0.0"}
# Newest first; an initialize asking for another version gets the newest (the spec's rule).
PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")

TOOLS = [
    {
        "name": "add",
        "description": "Add two integers.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
    {
        "name": "echo",
        "description": "Return the text it is given.",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
]

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602


class RpcError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _http(status, payload=None, headers=None):
    out = {"statusCode": status, "headers": dict(headers or {})}
    if payload is not None:
        out["headers"]["Content-Type"] = "application/json"
        out["body"] = json.dumps(payload)
    else:
        out["body"] = ""
    return out


def _error(id_, code, message):
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def _text(text, is_error=False):
    return {"content": [{"type": "text", "text": text}], "isError": is_error}


def _call_tool(params):
    name = params.get("name")
    args = params.get("arguments") or {}
    if name == "add":
        a, b = args.get("a"), args.get("b")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b)):
            # A tool's own failure is a result with isError, for the model to read.
            return _text("add needs two integers, a and b", is_error=True)
        return _text(str(a + b))
    if name == "echo":
        text = args.get("text")
        if not isinstance(text, str):
            return _text("echo needs a string, text", is_error=True)
        return _text(text)
    raise RpcError(INVALID_PARAMS, f"unknown tool: {name!r}")


def _answer(method, params):
    if method == "initialize":
        asked = params.get("protocolVersion")
        return {
            "protocolVersion": asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0],
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": SERVER_INFO,
        }
    if method == "ping":
        return {}
    if method == "tools/list":
        return {"tools": TOOLS}
    if method == "tools/call":
        return _call_tool(params)
    raise RpcError(METHOD_NOT_FOUND, f"method not found: {method}")


def _handle(message):
    """The response to one JSON-RPC message; None for a notification or a response."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return _error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 message")
    if "method" not in message:
        return None  # a response to a request of ours: we send none
    if "id" not in message:
        return None  # a notification (notifications/initialized, cancelled, ...)
    params = message.get("params") or {}
    try:
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "params must be an object")
        return {"jsonrpc": "2.0", "id": message["id"], "result": _answer(message["method"], params)}
    except RpcError as exc:
        return _error(message["id"], exc.code, exc.message)


def handler(event, context):
    http = event["requestContext"]["http"]
    # "/" too: behind a proxy route whose prefix (/mcp) is stripped, as in `sigproxy demo`.
    if event.get("rawPath", "/") not in ("/", "/mcp", "/mcp/"):
        return _http(404, {"error": "not found: the MCP endpoint is /mcp"})
    if http["method"] != "POST":
        return _http(405, {"error": "method not allowed: stateless, POST only"}, {"Allow": "POST"})
    headers = event.get("headers") or {}
    version = headers.get("mcp-protocol-version")
    if version is not None and version not in PROTOCOL_VERSIONS:
        return _http(400, _error(None, INVALID_REQUEST, f"unsupported protocol version {version}"))
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        body = base64.b64decode(body).decode("utf-8", "replace")
    try:
        message = json.loads(body)
    except ValueError:
        return _http(400, _error(None, PARSE_ERROR, "parse error: the body is not JSON"))
    if isinstance(message, list):  # a batch (protocol 2025-03-26)
        answers = [a for a in (_handle(m) for m in message) if a is not None]
        return _http(200, answers) if answers else _http(202)
    answer = _handle(message)
    return _http(202) if answer is None else _http(200, answer)
