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

__all__ = ["serve_std_http", "StdRequestReader", "scan_raw_head"]

log = logging.getLogger("gridgate.http")

_SERVER = b"gridgate"

# What h11's next_event returns: an event, or its NEED_DATA or PAUSED sentinel
H11Event = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


# h11 is lenient where request smuggling lives: it folds obs-fold lines,
# collapses identical or comma-listed Content-Length values, accepts bare LF
# line ends and control bytes in values, and parses any HTTP/d.d; and it
# waits for the end of a head before it judges any of it. So the std engine
# holds each head back from h11 until it has checked the raw bytes itself,
# line by line as they arrive, against the strict grammar that both engines
# share (gridgate/protocols/http/parser_py.py): a complete line must match
# its regex, and the line still arriving must be a prefix of one, so a head
# is refused at its first bad byte.
MAX_EMPTY_LINES = 4              # empty lines ignored before a request line (RFC 9112 2.2)
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"         # OWS field-value OWS


def _prefixes(*atoms: bytes) -> bytes:
    """A pattern for any prefix of the concatenated atoms (each one byte)."""
    pattern = b""
    for atom in reversed(atoms):
        pattern = atom + (b"(?:" + pattern + b")?" if pattern else b"")
    return pattern


_EMPTY_LINES = re.compile(rb"(?:\r\n)*")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_VERSION_SO_FAR = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/([0-9])(?:\.([0-9])?)?")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):" + _VALUE)
_REQUEST_LINE_PREFIX = re.compile(
    rb"(?:" + _TOKEN + rb"(?: (?:[\x21-\x7e]+(?: (?:"
    + _prefixes(b"H", b"T", b"T", b"P", b"/", b"[0-9]", rb"\.", b"[0-9]", b"\r") + rb")?)?)?)?|\r)?")
_HEADER_LINE_PREFIX = re.compile(rb"(?:" + _TOKEN + rb"(?::" + _VALUE + rb"\r?)?|\r)?")
_WHOLE_HEAD = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/([0-9]\.[0-9])\r\n(?:" + _TOKEN + rb":" + _VALUE
                         + rb"\r\n)*\r\n")
# on a lower-cased head
_FRAMING_FIELD = re.compile(rb"\r\n(content-length|transfer-encoding|host|authorization):[ \t]*([^\r]*)")
_LEADING_DIGITS = re.compile(rb"[0-9]*")
_OWS_ONLY = re.compile(rb"[ \t]*")
_TE_FIELD = re.compile(rb"(?<=\n)transfer-encoding:[^\r]*\r\n", re.IGNORECASE)
_CODING = re.compile(_TOKEN)


def _bad(detail: str) -> HTTPParseError:
    return HTTPParseError(400, "bad_request", detail)


class _Framing:
    """The rules of the fields that frame a request, applied field by field
    in the order they came, then at the end of the head."""

    __slots__ = ("version", "max_body_bytes", "hosts", "authorizations", "te_fields", "has_length", "te",
                 "te_chunked", "te_other")

    def __init__(self, version: bytes, max_body_bytes: int) -> None:
        if version not in (b"1.0", b"1.1"):
            raise HTTPParseError(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
        self.version = version
        self.max_body_bytes = max_body_bytes
        self.hosts = self.authorizations = self.te_fields = 0
        self.has_length = self.te = self.te_chunked = self.te_other = False

    def field(self, name: bytes, value: bytes, complete: bool = True) -> None:
        """One field: ``name`` lower-case, ``value`` without its OWS; or, not
        ``complete``, what has arrived of a value (leading OWS stripped),
        judged as far as it goes and not recorded."""
        if name == b"content-length":
            if self.has_length:
                raise _bad("more than one Content-Length")
            if self.te:
                raise _bad("both Transfer-Encoding and Content-Length")
            digits = _LEADING_DIGITS.match(value).group()  # type: ignore[union-attr]  # [0-9]* always matches
            significant = digits.lstrip(b"0")
            # the digits come first: a length past the limit is refused
            # before any bad byte after it
            if len(significant) > 18 or int(significant or b"0") > self.max_body_bytes:
                raise HTTPParseError(413, "too_large", "request body exceeds max_body_bytes")
            if _OWS_ONLY.fullmatch(value, len(digits)) is None or (complete and not digits):
                raise _bad("Content-Length is not a decimal number")
            if complete:
                self.has_length = True
        elif name == b"transfer-encoding":
            if self.version == b"1.0":
                raise _bad("Transfer-Encoding in an HTTP/1.0 request")
            if self.has_length:
                raise _bad("both Transfer-Encoding and Content-Length")
            chunked, other = self.te_chunked, self.te_other
            codings = [c.strip(b" \t") for c in value.split(b",")]
            for k, coding in enumerate(codings):
                if not coding:
                    continue
                if chunked:
                    raise _bad("a transfer coding after chunked")
                if not _CODING.fullmatch(coding):
                    raise _bad("malformed transfer coding")
                if complete or k < len(codings) - 1:
                    chunked = chunked or coding.lower() == b"chunked"
                    other = other or coding.lower() != b"chunked"
            if complete:
                self.te, self.te_chunked, self.te_other = True, chunked, other
                self.te_fields += 1 if value.lower() == b"chunked" else 2
        elif name == b"host":
            if self.hosts:
                raise _bad("more than one Host header")
            self.hosts += complete
        elif name == b"authorization":
            # Two credentials in one request: which one a proxy checked is a guess.
            if self.authorizations:
                raise _bad("more than one Authorization header")
            self.authorizations += complete

    def end(self) -> None:
        if self.version == b"1.1" and self.hosts == 0:
            raise _bad("HTTP/1.1 needs exactly one Host header")
        if self.te and not self.te_chunked:
            raise _bad("the final transfer coding is not chunked")
        if self.te and self.te_other:
            raise HTTPParseError(501, "not_implemented", "only Transfer-Encoding: chunked is supported")


def _judge_version_so_far(line: bytes) -> None:
    """A request line whose version so far is well-formed and not 1.0 or
    1.1 gets 505 whatever follows (judged left to right, as the fast parsers)."""
    m = _VERSION_SO_FAR.match(line)
    if m is not None and (m.group(1) != b"1" or m.group(2) not in (None, b"0", b"1")):
        raise HTTPParseError(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")


def scan_raw_head(raw: bytes | bytearray, max_header_bytes: int,
                  max_body_bytes: int) -> tuple[int, int, bool, bool]:
    """Judge the head at the start of ``raw`` as far as it has arrived.

    Returns:
        (start, end, chunked, fold_te): the head is raw[start:end] (start
        skips the ignored empty lines), or end is -1 while what arrived is a
        valid beginning; chunked: the body is; fold_te: its Transfer-Encoding
        is valid but not the one ``chunked`` field h11 accepts (empty list
        elements, several fields).

    Raises:
        HTTPParseError: at the first line that cannot be part of a valid head.
    """
    window = bytes(raw[:max_header_bytes])
    start = _EMPTY_LINES.match(window).end()  # type: ignore[union-attr]  # (?:...)* always matches
    if start // 2 > MAX_EMPTY_LINES:
        raise _bad("too many empty lines before the request line")
    end = window.find(b"\r\n\r\n", start)
    framing: _Framing | None = None
    whole = _WHOLE_HEAD.fullmatch(window, start, end + 4) if end >= 0 else None
    if whole is not None:
        # The common case, a whole head and every line well-formed: one match,
        # then only the fields that frame the request, in their order.
        # (Lower-cased: these fields' rules ignore case, and re.IGNORECASE is slow.)
        framing = _Framing(whole.group(1), max_body_bytes)
        for name, value in _FRAMING_FIELD.findall(window.lower(), start, end + 2):
            framing.field(name, value.rstrip(b" \t"))
        framing.end()
        return start, end + 4, framing.te, framing.te_fields > 1
    lines = window[start:end if end >= 0 else len(window)].split(b"\r\n")
    partial = lines.pop() if end < 0 else None
    for line in lines:                    # judged in order: the first bad line is the answer
        if framing is None:
            m = _REQUEST_LINE.fullmatch(line)
            if m is None:
                _judge_version_so_far(line)
                raise _bad("malformed request line")
            framing = _Framing(m.group(3), max_body_bytes)
            continue
        m = _HEADER_LINE.fullmatch(line)
        if m is None:
            raise _bad("malformed header line (obs-fold, bare CR or LF, a control byte...)")
        framing.field(m.group(1).lower(), line[m.end(1) + 1:].strip(b" \t"))
    if partial is not None:
        if not lines:
            # the version's digits come before any bad byte after them
            _judge_version_so_far(partial)
        prefix = _HEADER_LINE_PREFIX if lines else _REQUEST_LINE_PREFIX
        if prefix.fullmatch(partial) is None:
            raise _bad("malformed request head")
        name, colon, value = partial.partition(b":")
        if framing is not None and colon:
            # a framing field's value is judged as far as it has arrived
            framing.field(name.lower(), value.rstrip(b"\r").lstrip(b" \t"), complete=False)
        if len(raw) > max_header_bytes:
            raise HTTPParseError(431, "header_too_large", "request head exceeds max_header_bytes")
        return start, -1, False, False
    assert framing is not None    # a whole head has a request line (CRLF CRLF is found after one)
    framing.end()
    return start, end + 4, framing.te, framing.te_fields > 1


MAX_CHUNK_DIGITS = 20
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|"
                         + _QUOTED + rb"))?)*")
_LONG_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{%d}" % (MAX_CHUNK_DIGITS + 1))
# A chunk line still arriving: a beginning of one, so it is refused at its first bad byte.
_EXT = rb"[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
_CHUNK_LINE_PREFIX = re.compile(
    rb"[0-9A-Fa-f]*|[0-9A-Fa-f]+(?:" + _EXT + rb")*(?:[ \t]+|[ \t]*;[ \t]*(?:" + _TOKEN + rb"[ \t]*(?:=[ \t]*(?:"
    + rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*\\?' + rb")?)?)?|\r)?")


class ChunkedBodyCheck:
    """The raw bytes of a chunked body, judged ahead of h11 and handed to it
    in canonical framing (``%x CRLF``, data, CRLF; trailer lines as sent):
    h11's chunk reader lets whitespace, any extension and bare CR through in
    chunk lines and bare LF or obs-fold in trailers, and refuses the
    whitespace RFC 9112 7.1.1 allows around ``;`` (the grammar is in
    gridgate/protocols/http/parser_py.py). A line is judged as it arrives
    (the part in must begin a valid one), and whole when its CRLF is in.
    Bytes after the body (the next request's) pass through unjudged."""

    def __init__(self, max_header_bytes: int, max_body_bytes: int) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.buf = bytearray()
        self.state = 0               # 0 chunk line, 1 chunk data, 2 CRLF after data, 3 trailers, 4 done
        self.remaining = 0
        self.decoded = 0

    def check(self) -> bytes:
        """Judge what has arrived; returns what h11 may have of it."""
        buf = self.buf
        out = bytearray()
        while buf:
            if self.state == 4:
                out += buf
                buf.clear()
                break
            if self.state == 1:
                take = min(self.remaining, len(buf))
                out += buf[:take]
                del buf[:take]
                self.remaining -= take
                if not self.remaining:
                    self.state = 2
                continue
            if self.state == 2:
                if buf[:2] != b"\r\n"[:len(buf[:2])]:
                    raise HTTPParseError(400, "bad_request", "chunk data not followed by CRLF")
                if len(buf) < 2:
                    break
                del buf[:2]
                out += b"\r\n"
                self.state = 0
                continue
            room = self.max_header_bytes if self.state == 0 else self.remaining
            eol = buf.find(b"\r\n", 0, room)
            line = bytes(buf[:eol] if eol >= 0 else buf[:room])
            if b"\n" in line or b"\r" in line[:-1] or (eol >= 0 and b"\r" in line):
                raise HTTPParseError(400, "bad_request", "bare CR or LF in chunk framing")
            if self.state == 0 and _LONG_CHUNK_SIZE.match(line):
                raise HTTPParseError(400, "bad_request", "chunk size has too many digits")
            if eol < 0:
                prefix = _CHUNK_LINE_PREFIX if self.state == 0 else _HEADER_LINE_PREFIX
                if prefix.fullmatch(line) is None:
                    raise HTTPParseError(400, "bad_request", "malformed chunk or trailer line")
                if len(buf) > room:
                    if self.state == 0:
                        raise HTTPParseError(400, "bad_request", "chunk line too long")
                    raise HTTPParseError(431, "header_too_large", "trailer section exceeds max_header_bytes")
                break
            if self.state == 0:
                m = _CHUNK_LINE.fullmatch(line)
                if m is None:
                    raise HTTPParseError(400, "bad_request", "bad chunk size or extension")
                size = int(m.group(1), 16)
                if size > self.max_body_bytes - self.decoded:
                    raise HTTPParseError(413, "too_large", "request body exceeds max_body_bytes")
                self.decoded += size
                self.state, self.remaining = (1, size) if size else (3, self.max_header_bytes)
                out += b"%x\r\n" % size
            else:
                if not line:
                    self.state = 4
                elif _HEADER_LINE.fullmatch(line) is None:
                    raise HTTPParseError(400, "bad_request", "malformed trailer field line")
                else:
                    self.remaining -= eol + 2
                out += line + b"\r\n"
            del buf[:eol + 2]
        return bytes(out)


def _h11_error(exc: h11.ProtocolError) -> HTTPParseError:
    status = exc.error_status_hint
    error = {431: "header_too_large", 501: "not_implemented"}.get(status, "bad_request")
    return HTTPParseError(status, error, str(exc))


class StdRequestReader:
    """h11's server state machine behind the raw-head check above; sans-IO.

    ``next_event()`` returns h11 events (Request, Data, EndOfMessage,
    ConnectionClosed) or h11.NEED_DATA, and raises HTTPParseError for every
    refusal, h11's own included. ``raw_buffered`` tells whether bytes of a
    request already wait (the header timeout starts with them). Each request
    gets a fresh h11 connection (``conn``): h11 must not see a head before it
    is checked, nor the empty lines before it, which h11 refuses.
    """

    def __init__(self, max_header_bytes: int = 16384, max_body_bytes: int = 1048576) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._raw = bytearray()          # the head arriving, held back from h11
        self._head_ok = False            # h11 has the current request's checked head
        self._eof = False
        self._body_size = 0
        self._chunked: ChunkedBodyCheck | None = None

    @property
    def raw_buffered(self) -> bool:
        return self._head_ok or bool(self._raw)

    @property
    def head_done(self) -> bool:
        """The current request's head is checked and with h11."""
        return self._head_ok

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._chunked is not None:    # to h11 through the check, in next_event
            if data:
                self._chunked.buf += data
            else:
                self._eof = True
        elif self._head_ok:
            # h11 annotates bytes; it only appends data to its own bytearray buffer
            self.conn.receive_data(data)  # type: ignore[arg-type]
        elif data:
            self._raw += data
        else:
            self._eof = True

    def next_event(self) -> H11Event:
        if not self._head_ok:
            start, end, chunked, fold_te = scan_raw_head(self._raw, self.max_header_bytes, self.max_body_bytes)
            if end < 0:
                if not self._eof:
                    return h11.NEED_DATA
                if self._raw:
                    raise HTTPParseError(400, "bad_request", "connection closed inside a request head")
                return h11.ConnectionClosed()
            self._head_ok = True
            self._body_size = 0
            head = bytes(self._raw[start:end])
            if fold_te:          # RFC 9110 5.6.1 lets a list be spread and padded; h11 does not
                head = _TE_FIELD.sub(b"", head)[:-2] + b"transfer-encoding: chunked\r\n\r\n"
            if chunked:
                self._chunked = ChunkedBodyCheck(self.max_header_bytes, self.max_body_bytes)
                self._chunked.buf += self._raw[end:]
                self.conn.receive_data(head)
            else:
                self.conn.receive_data(head + self._raw[end:])
                if self._eof:
                    self.conn.receive_data(b"")
            self._raw = bytearray()
        if self._chunked is not None:
            checked = self._chunked.check()
            if checked:
                self.conn.receive_data(checked)
            if self._eof:            # what is left in the check is a cut line: h11 says so
                self.conn.receive_data(b"")
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _h11_error(exc) from None
        if type(event) is h11.Data:
            self._body_size += len(event.data)
            if self._body_size > self.max_body_bytes:
                raise HTTPParseError(413, "too_large", "request body exceeds max_body_bytes")
        return event

    def send(self, event: h11.Event) -> bytes:
        return self.conn.send(event) or b""

    def start_next_cycle(self) -> None:
        self.conn.start_next_cycle()     # raises h11.LocalProtocolError unless both sides are done
        trailing, closed = self.conn.trailing_data
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        self._raw = bytearray(trailing)
        self._head_ok = False
        self._eof = closed
        self._chunked = None


async def serve_std_http(stream: trio.abc.Stream, services: Services, session: Session) -> None:
    cfg = services.config.http
    reader = StdRequestReader(cfg.max_header_bytes, cfg.max_body_bytes)
    # https with a verified client certificate: the identity of every request on it
    certificate = services.auth.certificate("http", stream) if services.auth is not None else None

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
            if reader.conn.they_are_waiting_for_100_continue:
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
                      extra: list[tuple[bytes, bytes]] | None = None, head: bool = False) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"server", _SERVER), *(extra or [])]
        # one write per response, as net/http's buffered writer does; a HEAD
        # gets GET's head alone (h11 refuses body bytes to a HEAD)
        await stream.send_all(reader.send(h11.Response(status_code=status, headers=headers))
                              + (b"" if head else reader.send(h11.Data(data=body))) + reader.send(h11.EndOfMessage()))

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
                status, body, content_type, extra = await handle_request(services, request, "std", session.remote,
                                                                         certificate)
                await respond(status, body, content_type, extra, head=request.method == "HEAD")
            except HTTPParseError as exc:
                services.metrics.protocol_errors.labels("http", exc.error).inc()
                session.close_reason = f"bad request: {exc}"
                if reader.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    body = HttpError(exc.status, exc.error, exc.detail).body()
                    try:
                        await respond(exc.status, body, b"application/json", [(b"connection", b"close")])
                    except h11.LocalProtocolError:
                        pass
                return
            if reader.conn.our_state is h11.MUST_CLOSE or reader.conn.their_state is h11.MUST_CLOSE:
                return
            try:
                reader.start_next_cycle()
            except h11.LocalProtocolError:
                return
