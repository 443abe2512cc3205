"""The std HTTP engine: the net/http-style pipeline of DESIGN section 5.

h11 parses (a fresh request object per request), bodies are decoded with
``json.loads`` and judged by the pure-Python validator. It is complete and
correct, and it is the baseline the fast (Cython) engine is measured
against. Routing and answers live in gridgate.http_api, shared by both
engines.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import h11
import trio

from gridgate.http_api import HttpError, Request, handle_request

if TYPE_CHECKING:
    from gridgate.connmanager import Session
    from gridgate.gateway import Gateway

__all__ = ["serve_std_http"]

log = logging.getLogger("gridgate.http")

_SERVER = b"gridgate"


async def serve_std_http(stream: trio.abc.Stream, gateway: "Gateway", session: "Session") -> None:
    cfg = gateway.config.http
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_header_bytes)

    async def send(event) -> None:
        data = conn.send(event)
        if data:
            await stream.send_all(data)

    async def next_event(timeout: float):
        with trio.move_on_after(timeout) as scope:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                if conn.they_are_waiting_for_100_continue:
                    await send(h11.InformationalResponse(status_code=100, headers=[]))
                data = await stream.receive_some(65536)
                session.last_seen = trio.current_time()
                conn.receive_data(data)
        assert scope.cancelled_caught
        return None

    async def respond(status: int, body: bytes, content_type: bytes, extra: list | None = None) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"server", _SERVER), *(extra or [])]
        await send(h11.Response(status_code=status, headers=headers))
        await send(h11.Data(data=body))
        await send(h11.EndOfMessage())

    with session.read_scope:
        while True:
            try:
                event = await next_event(cfg.header_timeout_s)
                if event is None:
                    session.close_reason = "request head timeout"
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    return
                names = [name for name, _ in event.headers]
                if names.count(b"content-length") > 1 or (b"content-length" in names
                                                          and b"transfer-encoding" in names):
                    # request smuggling shapes (RFC 9112 section 6.3): refuse, never guess
                    raise h11.RemoteProtocolError("conflicting Content-Length / Transfer-Encoding framing",
                                                  error_status_hint=400)
                request = Request(method=event.method.decode("ascii", "replace"),
                                  target=event.target.decode("ascii", "replace"),
                                  headers={k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers})
                body_parts: list[bytes] = []
                size = 0
                limit = cfg.max_body_bytes
                too_large = False
                while True:
                    ev = await next_event(cfg.body_timeout_s)
                    if ev is None:
                        session.close_reason = "request body timeout"
                        await respond(408, b'{"error": "timeout", "detail": "request body too slow"}',
                                      b"application/json", [(b"connection", b"close")])
                        return
                    if isinstance(ev, h11.Data):
                        size += len(ev.data)
                        if size > limit:
                            too_large = True
                            break
                        body_parts.append(bytes(ev.data))
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                if too_large:
                    await respond(413, b'{"error": "too_large", "detail": "request body exceeds max_body_bytes"}',
                                  b"application/json", [(b"connection", b"close")])
                    return
                request.body = b"".join(body_parts)
                status, body, content_type, extra = await handle_request(gateway, request, engine="std")
                await respond(status, body, content_type, extra)
            except h11.RemoteProtocolError as exc:
                gateway.metrics.protocol_errors.labels("http", "bad_request").inc()
                session.close_reason = f"bad request: {exc}"
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    body = HttpError(status, "bad_request", str(exc)).body()
                    try:
                        await respond(status, body, b"application/json", [(b"connection", b"close")])
                    except h11.LocalProtocolError:
                        pass
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
