"""A webhook receiver: a JSON POST whose ``X-Signature: sha256=<hex>`` header is the
HMAC-SHA256 of the raw body with a shared secret (``WEBHOOK_SECRET``, by default
``demo-webhook-secret``), the way GitHub and Stripe sign their deliveries.

Sign a delivery with::

    body='{"type": "order.created", "id": 42}'
    sig=$(printf '%s' "$body" | openssl dgst -sha256 -hmac demo-webhook-secret | sed 's/.* //')
    curl -H "X-Signature: sha256=$sig" -H 'Content-Type: application/json' -d "$body" URL
"""

import base64
import hashlib
import hmac
import json
import os


def _response(status, payload):
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json"},
        "body": json.dumps(payload),
    }


def handler(event, context):
    if event["requestContext"]["http"]["method"] != "POST":
        return _response(405, {"error": "webhooks are delivered with POST"})
    raw = event.get("body") or ""
    body = base64.b64decode(raw) if event.get("isBase64Encoded") else raw.encode()
    secret = os.environ.get("WEBHOOK_SECRET", "demo-webhook-secret").encode()
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    given = event["headers"].get("x-signature", "")
    if not hmac.compare_digest(given, expected):
        return _response(401, {"error": "invalid or missing X-Signature"})
    try:
        delivery = json.loads(body)
    except ValueError:
        return _response(400, {"error": "the body is not JSON"})
    if not isinstance(delivery, dict):
        return _response(400, {"error": "the body must be a JSON object"})
    return _response(
        200, {"received": True, "type": delivery.get("type"), "id": delivery.get("id")}
    )
