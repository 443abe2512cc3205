"""The std HTTP engine: the net/http-style pipeline of DESIGN section 5.

h11 parses (a fresh request object per request), bodies are decoded with
``json.loads`` and judged by the pure-Python validator. It is complete and
correct, and it is the baseline the fast (Cython) engine is measured
against. Routing and answers live in gridgate.protocols.http.api, shared by both
engines.
"""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import h11
import trio

from gridgate.errors import HTTPParseError
from gridgate.protocols.http.api import HttpError, Request, handle_request

if TYPE_CHECKING:
    from gridgate.connections.manager import Session
    from gridgate.protocols.services import Services

__all__ = ["serve_std_http", "StdRequestReader", "check_raw_head"]

log = logging.getLogger("gridgate.http")

_SERVER = b"gridgate"

# What h11's next_event returns: an event, or its NEED_DATA or PAUSED sentinel
H11Event = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


# h11 is lenient where request smuggling lives: it folds obs-fold lines,
# collapses identical or comma-listed Content-Length values, accepts bare LF
# line ends and control bytes in values, and parses any HTTP/d.d. It also
# normalizes them away before we see the request, so the std engine checks
# the raw head itself against the strict grammar that both engines share
# (gridgate/protocols/http/parser_py.py). One C-level regex match per request: the price of
# safety, kept cheap.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_VALUE_BYTE = rb"[\x21-\x7e\x80-\xff]"
_STRICT_HEAD = re.compile(
    _TOKEN + rb" [\x21-\x7e]+ HTTP/1\.[01]\r\n"
    rb"(?:" + _TOKEN + rb":[ \t]*(?:" + _VALUE_BYTE + rb"(?:[ \t\x21-\x7e\x80-\xff]*" + _VALUE_BYTE
    + rb")?)?[ \t]*\r\n)*\r\n")
_OTHER_VERSION = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\r\n")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*([^\r]*)", re.IGNORECASE)
_TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding:", re.IGNORECASE)


def check_raw_head(head: bytes | bytearray, max_header_bytes: int, max_body_bytes: int) -> None:
    """Refuse what h11 would let through; raises HTTPParseError."""
    if len(head) > max_header_bytes:
        raise HTTPParseError(431, "header_too_large", "request head exceeds max_header_bytes")
    line_end = head.find(b"\r\n")
    version = head[line_end - 8:line_end] if line_end >= 8 else b""
    if _STRICT_HEAD.fullmatch(head) is None:
        if _OTHER_VERSION.match(head) and version not in (b"HTTP/1.0", b"HTTP/1.1"):
            raise HTTPParseError(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
        if re.search(rb"\r\n[ \t]", head[:-2]):
            raise HTTPParseError(400, "bad_request", "obs-fold (a header line starting with whitespace) is refused")
        raise HTTPParseError(400, "bad_request", "malformed request head")
    lengths = _CONTENT_LENGTH.findall(head)
    if len(lengths) > 1:
        raise HTTPParseError(400, "bad_request", "more than one Content-Length")
    if lengths:
        value = lengths[0].rstrip(b" \t")
        if not value.isdigit():
            raise HTTPParseError(400, "bad_request", "Content-Length is not a decimal number")
        if len(value) > 18 or int(value) > max_body_bytes:
            raise HTTPParseError(413, "too_large", "request body exceeds max_body_bytes")
    if _TRANSFER_ENCODING.search(head):
        if lengths:
            raise HTTPParseError(400, "bad_request", "both Transfer-Encoding and Content-Length")
        if version == b"HTTP/1.0":
            raise HTTPParseError(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")


def _h11_error(exc: h11.ProtocolError) -> HTTPParseError:
    status = exc.error_status_hint
    error = {431: "header_too_large", 501: "not_implemented"}.get(status, "bad_request")
    return HTTPParseError(status, error, str(exc))


class StdRequestReader:
    """h11's server state machine plus the raw-head refusals above; sans-IO.

    ``next_event()`` returns h11 events (Request, Data, EndOfMessage,
    ConnectionClosed) or h11.NEED_DATA, and raises HTTPParseError for every
    refusal, h11's own included. ``raw_buffered`` tells whether bytes of a
    next request already wait (the header timeout starts with them).
    """

    def __init__(self, max_header_bytes: int = 16384, max_body_bytes: int = 1048576) -> None:
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._raw = bytearray()          # bytes fed since the current request began
        self._body_size = 0

    @property
    def raw_buffered(self) -> bool:
        return bool(self._raw)

    def receive_data(self, data: bytes | bytearray) -> None:
        self._raw += data
        # h11 annotates bytes; it only appends data to its own bytearray buffer
        self.conn.receive_data(data)  # type: ignore[arg-type]

    def next_event(self) -> H11Event:
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _h11_error(exc) from None
        if type(event) is h11.Request:
            unparsed = len(self.conn.trailing_data[0])
            check_raw_head(self._raw[:len(self._raw) - unparsed], self.max_header_bytes, self.max_body_bytes)
            self._body_size = 0
        elif type(event) is h11.Data:
            self._body_size += len(event.data)
            if self._body_size > self.max_body_bytes:
                raise HTTPParseError(413, "too_large", "request body exceeds max_body_bytes")
        elif type(event) is h11.EndOfMessage and event.headers:
            raise HTTPParseError(400, "bad_request", "trailer fields are not supported")
        return event

    def send(self, event: h11.Event) -> bytes:
        return self.conn.send(event) or b""

    def start_next_cycle(self) -> None:
        self.conn.start_next_cycle()
        self._raw = bytearray(self.conn.trailing_data[0])


async def serve_std_http(stream: trio.abc.Stream, services: Services, session: Session) -> None:
    cfg = services.config.http
    reader = StdRequestReader(cfg.max_header_bytes, cfg.max_body_bytes)
    conn = reader.conn

    async def send(event: h11.Event) -> None:
        data = reader.send(event)
        if data:
            await stream.send_all(data)

    # A timeout parameter, not the caller's cancel scope: the timeout of an
    # idle keep-alive connection's next head starts at its first byte.
    async def next_event(timeout: float, idle_ok: bool = False) -> H11Event | None:  # noqa: ASYNC109
        # Between requests a keep-alive connection may sit idle (the reaper
        # watches that); the header timeout runs from the first byte of a head.
        deadline = trio.current_time() + timeout
        if idle_ok and not reader.raw_buffered:
            deadline = float("inf")
        while True:
            event = reader.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:
                await send(h11.InformationalResponse(status_code=100, headers=[]))
            with trio.move_on_at(deadline):
                data = await stream.receive_some(65536)
                session.last_seen = trio.current_time()
                reader.receive_data(data)
                if deadline == float("inf"):
                    deadline = trio.current_time() + timeout
                continue
            return None

    async def respond(status: int, body: bytes, content_type: bytes,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"server", _SERVER), *(extra or [])]
        # one write per response, as net/http's buffered writer does
        await stream.send_all(reader.send(h11.Response(status_code=status, headers=headers))
                              + reader.send(h11.Data(data=body)) + reader.send(h11.EndOfMessage()))

    with session.read_scope:
        while True:
            try:
                event = await next_event(cfg.header_timeout_s, idle_ok=True)
                if event is None:
                    session.close_reason = "request head timeout"
                    return
                if type(event) is not h11.Request:    # ConnectionClosed
                    return
                request = Request(method=event.method.decode("ascii", "replace"),
                                  target=event.target.decode("ascii", "replace"),
                                  headers={k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers})
                body_parts: list[bytes] = []
                while True:
                    ev = await next_event(cfg.body_timeout_s)
                    if ev is None:
                        session.close_reason = "request body timeout"
                        await respond(408, b'{"error": "timeout", "detail": "request body too slow"}',
                                      b"application/json", [(b"connection", b"close")])
                        return
                    if type(ev) is h11.Data:
                        body_parts.append(bytes(ev.data))
                    elif type(ev) is h11.EndOfMessage:
                        break
                    else:                              # closed mid-body
                        return
                request.body = b"".join(body_parts)
                status, body, content_type, extra = await handle_request(services, request, engine="std")
                await respond(status, body, content_type, extra)
            except HTTPParseError as exc:
                services.metrics.protocol_errors.labels("http", exc.error).inc()
                session.close_reason = f"bad request: {exc}"
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    body = HttpError(exc.status, exc.error, exc.detail).body()
                    try:
                        await respond(exc.status, body, b"application/json", [(b"connection", b"close")])
                    except h11.LocalProtocolError:
                        pass
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                reader.start_next_cycle()
            except h11.LocalProtocolError:
                return
