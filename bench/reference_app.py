"""The outside reference of the pipelines bench: a minimal ASGI ingest app
served by uvicorn with the httptools parser (llhttp, C), doing the same
decode and validation as gridgate's fast engine (msgspec and gridgate's
compiled validator) and answering 202 with the same body.

It writes nothing: no batching, no SQLite commit, no waiting for durable.
That flatters it; the report says so next to its numbers.

    uvicorn bench.reference_app:app --http httptools
"""
from __future__ import annotations

import time

from gridgate import _fastparse
from gridgate.ingest.rules import PayloadRules

_validator = _fastparse.Validator(PayloadRules())
_FORMATS = {b"application/json": "json", b"application/x-ndjson": "ndjson", b"application/msgpack": "msgpack"}
_JSON = [(b"content-type", b"application/json")]


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] != "/v1/telemetry" or scope["method"] != "POST":
        await _answer(send, 404, b'{"error":"not_found"}')
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    ctype = dict(scope["headers"]).get(b"content-type", b"application/json").split(b";")[0].strip()
    fmt = _FORMATS.get(ctype)
    if fmt is None:
        await _answer(send, 415, b'{"error":"unsupported_media_type"}')
        return
    records, rejections = _validator.validate(body, fmt, "http", None, time.time_ns())
    if not rejections:
        await _answer(send, 202, b'{"accepted":%d,"rejected":0,"errors":[]}' % len(records))
    else:
        await _answer(send, 202, b'{"accepted":%d,"rejected":%d,"errors":[]}' % (len(records), len(rejections)))


async def _answer(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": _JSON + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
