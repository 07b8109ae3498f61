"""A small router on method + path that tells the caller who they are, from the IAM
identity Lambda puts in ``requestContext.authorizer.iam``.

``GET /health`` -> ``{"status": "ok"}``; ``POST /process`` -> the JSON it was sent,
with the caller; anything else -> 404.
"""

import base64
import json


def _response(status, payload):
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json"},
        "body": json.dumps(payload),
    }


def _caller(event):
    iam = (event["requestContext"].get("authorizer") or {}).get("iam") or {}
    return {
        "userArn": iam.get("userArn"),
        "accountId": iam.get("accountId"),
        "accessKey": iam.get("accessKey"),
    }


def handler(event, context):
    method = event["requestContext"]["http"]["method"]
    path = event["rawPath"]
    if (method, path) == ("GET", "/health"):
        return _response(200, {"status": "ok", "caller": _caller(event)})
    if (method, path) == ("POST", "/process"):
        raw = event.get("body") or ""
        body = base64.b64decode(raw) if event.get("isBase64Encoded") else raw.encode()
        try:
            data = json.loads(body or b"null")
        except ValueError:
            return _response(400, {"error": "the body is not JSON"})
        return _response(
            200,
            {"processed": data, "caller": _caller(event), "requestId": context.aws_request_id},
        )
    return _response(404, {"error": "not found", "method": method, "path": path})
