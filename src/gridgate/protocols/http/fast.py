"""The fast HTTP engine: the fasthttp-style pipeline of DESIGN section 5.

One compiled parser per connection (src/_fastparse_http.pxi) is the request
context, reused for every request; bodies are memoryview slices of the
receive buffer; the compiled validator decodes them with msgspec; response
heads are prebuilt bytes. All requests found in one read are begun before
the first is awaited, so a pipelined burst shares one group commit and its
answers leave, in order, in one send. Behaviour (statuses, bodies,
timeouts) is the std engine's: the same tests run against both.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

import trio

from gridgate.errors import HTTPParseError
from gridgate.protocols.http.api import Answer, HttpError, NeedsAuth, Pending, begin_authenticated, begin_request
from gridgate.protocols.http.parser import parser as _parser

if TYPE_CHECKING:
    from gridgate.connections.manager import Session
    from gridgate.protocols.services import Services

__all__ = ["serve_fast_http", "render_response"]

log = logging.getLogger("gridgate.http")

# Every status the API can answer (401, 403, 429 ... too), with RFC 9110's
# name for 413 (Python 3.11's table still has the old one).
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus} | {413: b"Content Too Large"}
_HEADS: dict[tuple[int, bytes], bytes] = {}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"connection: close\r\n"
_MAX_PIPELINED = 64          # requests begun per read before their answers go out
_READ_SIZE = 65536


def _head(status: int, content_type: bytes) -> bytes:
    head = _HEADS.get((status, content_type))
    if head is None:
        reason = _REASONS.get(status, b"Status")
        head = (b"HTTP/1.1 %d %s\r\nserver: gridgate\r\ncontent-type: %s\r\ncontent-length: "
                % (status, reason, content_type))
        if len(_HEADS) < 256:
            _HEADS[(status, content_type)] = head
    return head


def render_response(answer: Answer, close: bool) -> bytes:
    status, body, content_type, extra = answer
    parts = [_head(status, content_type), b"%d\r\n" % len(body)]
    for name, value in extra:
        parts.append(name + b": " + value + b"\r\n")
    if close:
        parts.append(_CLOSE)
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def _head_only(answer: Answer, close: bool) -> bytes:
    """The response to a HEAD: the GET answer's head, its Content-Length included."""
    data = render_response(answer, close)
    return data[:len(data) - len(answer[1])]


async def serve_fast_http(stream: trio.abc.Stream, services: Services, session: Session) -> None:
    cfg = services.config.http
    http = _parser
    parser = http.HTTPRequestParser(cfg.max_header_bytes, cfg.max_body_bytes)
    REQUEST, HEAD = http.REQUEST, http.HEAD
    receive_some: Callable[[int], Awaitable[bytes | bytearray]] = stream.receive_some
    send_all: Callable[[bytes], Awaitable[None]] = stream.send_all
    sock = getattr(stream, "socket", None)
    if isinstance(stream, trio.SocketStream) and sock is not None:
        # Straight to the file descriptor: SocketStream's conflict detection
        # and the trio socket's try-then-wait wrapper are a measurable share
        # of a small request, and this task is the only reader and writer of
        # its socket.
        fd = sock.fileno()

        async def receive_some(max_bytes: int) -> bytes:
            # Wait first, then read: the next request of a client with one in
            # flight is sent only after it got our answer, so a read right
            # away would nearly always be a wasted EAGAIN syscall. Data that
            # is already there makes the wait return at the next pass.
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    return os.read(fd, max_bytes)
                except BlockingIOError:
                    continue

        async def send_all(data: bytes) -> None:
            # An answer nearly always fits the socket's send buffer: write it
            # now, without the scheduler round trip an awaited send costs.
            # Only a short write waits for the socket. (The task still yields
            # once per request: it awaits the durable commit or the next read.)
            try:
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                view = memoryview(data)[sent:]
                while view:
                    sent = await sock.send(view)
                    view = view[sent:]
            except OSError as exc:       # reset or EPIPE: as SocketStream reports it
                raise trio.BrokenResourceError(str(exc)) from exc
    # https with a verified client certificate: the identity of every request on it
    certificate = services.auth.certificate("http", stream) if services.auth is not None else None
    inf = float("inf")
    deadline = inf               # for the head or body now arriving; inf while idle
    phase = 0                    # 0 idle (the reaper watches), 1 head arriving, 2 body arriving
    continued = False            # 100 Continue sent for the current request
    with session.read_scope:
        while True:
            begun: list[Answer | Pending | bytes] = []
            heads: list[int] | None = None   # HEAD requests answered later (a cluster node's GET)
            close = False
            error: HTTPParseError | None = None
            state = 0
            try:
                while len(begun) < _MAX_PIPELINED:
                    state = parser.next()
                    if state != REQUEST:
                        break
                    started = begin_request(services, parser, "fast")
                    if type(started) is NeedsAuth:
                        # the parser keeps this request while the check waits: nothing else reads it
                        started = await begin_authenticated(services, parser, "fast", session.remote, certificate)
                    if parser.method == "HEAD" and type(started) is not Pending:
                        # RFC 9110 9.3.2: GET's answer without its body, rendered now
                        begun.append(_head_only(started, not parser.keep_alive))
                    else:
                        if parser.method == "HEAD":
                            heads = (heads or []) + [len(begun)]
                        begun.append(started)
                    continued = False
                    if not parser.keep_alive:
                        close = True
                        break
            except HTTPParseError as exc:
                error = exc
            if begun:
                out: list[bytes] = []
                last = len(begun) - 1
                services.poll_durable()
                # services.durable_timeouts sets done (expired) at the durable
                # timeout: no cancel scope per request
                for item in begun:
                    if type(item) is Pending:
                        await item.done.wait()
                for i, entry in enumerate(begun):
                    if isinstance(entry, bytes):
                        out.append(entry)
                        continue
                    answer = entry.result() if type(entry) is Pending else entry
                    if heads is not None and i in heads:
                        out.append(_head_only(answer, close and i == last))
                    else:
                        out.append(render_response(answer, close and i == last))
                await send_all(b"".join(out))
                phase = 0
            if error is not None:
                services.metrics.protocol_errors.labels("http", error.error).inc()
                session.close_reason = f"bad request: {error}"
                body = HttpError(error.status, error.error, error.detail).body()
                await send_all(render_response((error.status, body, b"application/json", []), True))
                return
            if close:
                return
            if state == REQUEST:         # the pipelining bound: answer, then go on parsing
                continue
            # slowloris: a head must arrive within header_timeout_s of its first
            # byte, a body within body_timeout_s of its head
            if state == HEAD:
                if phase != 2:
                    phase = 2
                    deadline = trio.current_time() + cfg.body_timeout_s
                if parser.expect_continue and not continued:
                    continued = True
                    await send_all(_CONTINUE)
            elif parser.buffered:
                if phase != 1:
                    phase = 1
                    deadline = trio.current_time() + cfg.header_timeout_s
            else:
                phase = 0
                deadline = inf
            data = None
            try:
                if deadline == inf:          # idle: no cancel scope to build
                    data = await receive_some(_READ_SIZE)
                else:
                    with trio.move_on_at(deadline):
                        data = await receive_some(_READ_SIZE)
            except OSError as exc:           # reset by the peer: SocketStream would say BrokenResourceError
                raise trio.BrokenResourceError(str(exc)) from exc
            if data is None:
                if state == HEAD:
                    session.close_reason = "request body timeout"
                    body = b'{"error":"timeout","detail":"request body too slow"}'
                    await send_all(render_response((408, body, b"application/json", []), True))
                else:
                    session.close_reason = "request head timeout"
                return
            if not data:
                return
            session.last_seen = trio.current_time()
            if phase == 0:
                phase = 1
                deadline = session.last_seen + cfg.header_timeout_s
            parser.feed(data)
