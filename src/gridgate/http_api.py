"""What the HTTP listener answers, whichever engine parsed the request.

Both engines hand a parsed Request here and send back what it returns, so
they differ only in how they parse and frame, never in behaviour.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from gridgate.pipeline import WorkItem

if TYPE_CHECKING:
    from gridgate.gateway import Gateway

__all__ = ["Request", "HttpError", "handle_request"]

_json = msgspec.json.Encoder()
JSON = b"application/json"
_FORMATS = {
    "": "json", "application/json": "json", "text/json": "json",
    "application/x-ndjson": "ndjson", "application/ndjson": "ndjson", "application/jsonl": "ndjson",
    "application/msgpack": "msgpack", "application/x-msgpack": "msgpack", "application/vnd.msgpack": "msgpack",
}
# Whole-payload rejections and the status they map to.
_WHOLE_STATUS = {"malformed": 400, "not_object": 400, "too_large": 413}


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]          # lower-case names
    body: bytes = b""


@dataclass
class HttpError(Exception):
    status: int
    error: str
    detail: str = ""
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)

    def body(self) -> bytes:
        return _json.encode({"error": self.error, "detail": self.detail})


Answer = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]


def _ok(status: int, obj: object) -> Answer:
    return status, _json.encode(obj), JSON, []


async def handle_request(gateway: "Gateway", request: Request, engine: str) -> Answer:
    try:
        return await _route(gateway, request, engine)
    except HttpError as err:
        return err.status, err.body(), JSON, err.extra


async def _route(gw: "Gateway", req: Request, engine: str) -> Answer:
    path = req.target.split("?", 1)[0]
    if path == "/v1/telemetry":
        _allow(req, "POST")
        return await _telemetry(gw, req, engine)
    if path == "/healthz":
        _allow(req, "GET")
        return _ok(200, {"status": "ok"})
    if path == "/readyz":
        _allow(req, "GET")
        reasons = gw.not_ready_reasons()
        if reasons:
            return _ok(503, {"status": "not_ready", "reasons": reasons})
        return _ok(200, {"status": "ready"})
    if path == "/metrics":
        _allow(req, "GET")
        return 200, gw.metrics.render(), CONTENT_TYPE_LATEST.encode(), []
    if path == "/v1/connections":
        _allow(req, "GET")
        return _ok(200, {"total": len(gw.conns), "by_protocol": gw.conns.by_protocol()})
    if path.startswith("/v1/devices/") and path.count("/") == 3:
        _allow(req, "GET")
        info = gw.conns.device_info(path[len("/v1/devices/"):])
        if info is None:
            raise HttpError(404, "not_found", "device never seen")
        return _ok(200, info)
    raise HttpError(404, "not_found", f"no resource {path}")


def _allow(req: Request, method: str) -> None:
    if req.method != method:
        raise HttpError(405, "method_not_allowed", f"use {method}", [(b"allow", method.encode())])


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise HttpError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported (gzip is)")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
        if len(out) > limit:
            raise HttpError(413, "too_large", f"decompressed body exceeds max_body_bytes {limit}")
        if not d.eof:
            raise HttpError(400, "malformed", "gzip body is truncated")
    except zlib.error as exc:
        raise HttpError(400, "malformed", f"gzip body is corrupt: {exc}") from None
    return out


async def _telemetry(gw: "Gateway", req: Request, engine: str) -> Answer:
    cfg = gw.config.http
    ctype = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    fmt = _FORMATS.get(ctype)
    if fmt is None:
        raise HttpError(415, "unsupported_media_type",
                        f"Content-Type {ctype!r}; use application/json, application/x-ndjson or application/msgpack")
    body = _decompress(req.body, req.headers.get("content-encoding", "").strip().lower(), cfg.max_body_bytes)
    received_ns = time.time_ns()
    validator = gw.std_validator if engine == "std" else gw.validator
    records, rejections = validator.validate(body, fmt, "http", None, received_ns)
    done = trio.Event()
    item = WorkItem(records, rejections, "http", received_ns, done.set)
    if not gw.pipeline.try_submit(item):
        raise HttpError(503, "overloaded", "the ingest pipeline is full; retry later", [(b"retry-after", b"1")])
    with trio.move_on_after(cfg.durable_timeout_s):
        await done.wait()
    if not done.is_set():
        raise HttpError(503, "sink_unavailable", "not yet durable; retry later (it may be stored twice)",
                        [(b"retry-after", b"5")])
    if len(rejections) == 1 and rejections[0].index is None:
        whole = rejections[0]
        raise HttpError(_WHOLE_STATUS.get(whole.reason, 400), whole.reason, whole.detail)
    return _ok(202, {"accepted": len(records), "rejected": len(rejections),
                     "errors": [{"index": r.index, "reason": r.reason, "field": r.field, "detail": r.detail}
                                for r in rejections]})
