"""Server-sent events from a streaming function (``invoke_mode: RESPONSE_STREAM``):
``GET /`` -> 20 events ``data: {"n": 0}`` .. ``data: {"n": 19}``, one every 100 ms, each
sent to the client as soon as it is produced.

A streaming handler returns (or, as here, is) an iterator of str or bytes chunks. Its
first item may be a dict with the response's ``statusCode``, ``headers`` and ``cookies``,
like the metadata of Node's ``awslambda.HttpResponseStream.from(responseStream, ...)``.
"""

import json
import time

EVENTS = 20
INTERVAL = 0.1  # seconds


def handler(event, context):
    yield {
        "statusCode": 200,
        "headers": {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    }
    for n in range(EVENTS):
        if n:
            time.sleep(INTERVAL)
        yield f"data: {json.dumps({'n': n})}\n\n"
