"""Hello: ``GET /?name=John`` -> ``{"message": "Hello, John!"}``; 400 without a name."""

import json


def handler(event, context):
    name = (event.get("queryStringParameters") or {}).get("name")
    if not name:
        return {
            "statusCode": 400,
            "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"error": "missing query parameter 'name'"}),
        }
    return {
        "statusCode": 200,
        "headers": {"Content-Type": "application/json"},
        "body": json.dumps({"message": f"Hello, {name}!"}),
    }
