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


async def _send(stream: trio.abc.Stream, sock: trio.socket.SocketType | None, fd: int, data: bytes) -> None:
    """The rare sends (100 Continue, an error's answer); answers go by _write_now."""
    if sock is None:
        await stream.send_all(data)
    else:
        sent = _write_now(fd, data)
        if sent < len(data):
            await _send_rest(sock, data, sent)


def _write_now(fd: int, data: bytes) -> int:
    """Write what the socket takes now, without a scheduler round trip: an
    answer nearly always fits the send buffer. This task is the only reader
    and writer of its socket, so SocketStream's conflict detection and the
    trio socket's try-then-wait wrapper would only cost time."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:               # reset or EPIPE: as SocketStream reports it
        raise trio.BrokenResourceError(str(exc)) from exc


async def _send_rest(sock: trio.socket.SocketType, data: bytes, sent: int) -> None:
    """A short write: wait for the socket for the rest."""
    view = memoryview(data)[sent:]
    try:
        while view:
            sent = await sock.send(view)
            view = view[sent:]
    except OSError as exc:
        raise trio.BrokenResourceError(str(exc)) from exc


async def _wait_answers(begun: list[Answer | Pending | bytes]) -> None:
    # its own frame, so no loop variable keeps a request alive after its answer
    for item in begun:
        if type(item) is Pending and not item.done.is_set():
            await item.done.wait()


def _render_all(begun: list[Answer | Pending | bytes], heads: list[int] | None, close: bool) -> bytes:
    out: list[bytes] = []
    last = len(begun) - 1
    for i, entry in enumerate(begun):
        if isinstance(entry, bytes):
            out.append(entry)
            continue
        answer = entry.result() if type(entry) is Pending else entry
        if heads is not None and i in heads:
            out.append(_head_only(answer, close and i == last))
        else:
            out.append(render_response(answer, close and i == last))
    return b"".join(out)


async def serve_fast_http(stream: trio.abc.Stream, services: Services, session: Session) -> None:
    # What an idle connection holds is kept small (issue 24: RSS per
    # connection): one frame (reads are inlined, no closures), no cancel
    # scope of its own (a graceful stop cancels the connection's scope,
    # which ends an idle read as a read scope would), and nothing of its
    # last request (the answered list is emptied, the parser drops its read).
    cfg = services.config.http
    http = _parser
    parser = http.HTTPRequestParser(cfg.max_header_bytes, cfg.max_body_bytes)
    REQUEST, HEAD = http.REQUEST, http.HEAD
    sock: trio.socket.SocketType | None = None
    fd = -1
    if isinstance(stream, trio.SocketStream):
        # Straight to the file descriptor (see _write_now); other streams
        # (TLS, WebSocket, in-memory) go through the Stream API.
        sock = stream.socket
        fd = sock.fileno()
    wait_readable = trio.lowlevel.wait_readable
    read = os.read
    # https with a verified client certificate: the identity of every request on it
    certificate = services.auth.certificate("http", stream) if services.auth is not None else None
    inf = float("inf")
    deadline = inf               # for the head or body now arriving; inf while idle
    phase = 0                    # 0 idle (the reaper watches), 1 head arriving, 2 body arriving
    continued = False            # 100 Continue sent for the current request
    begun: list[Answer | Pending | bytes] = []
    started: Answer | Pending | NeedsAuth | None
    data: bytes | bytearray | None
    while True:
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
                started = None
                continued = False
                if not parser.keep_alive:
                    close = True
                    break
        except HTTPParseError as exc:
            error = exc
        if begun:
            services.poll_durable()
            # services.durable_timeouts sets done (expired) at the durable
            # timeout: no cancel scope per request
            await _wait_answers(begun)
            payload = _render_all(begun, heads, close)
            begun.clear()
            if sock is None:
                await stream.send_all(payload)
            else:
                sent = _write_now(fd, payload)
                if sent < len(payload):
                    await _send_rest(sock, payload, sent)
            del payload
            phase = 0
        if error is not None:
            services.metrics.protocol_errors.labels("http", error.error).inc()
            session.close_reason = f"bad request: {error}"
            body = HttpError(error.status, error.error, error.detail).body()
            await _send(stream, sock, fd, render_response((error.status, body, b"application/json", []), True))
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
                await _send(stream, sock, fd, _CONTINUE)
        elif parser.buffered:
            if phase != 1:
                phase = 1
                deadline = trio.current_time() + cfg.header_timeout_s
        else:
            phase = 0
            deadline = inf
        data = None
        try:
            if sock is None:
                if deadline == inf:          # idle: no cancel scope to build
                    data = await stream.receive_some(_READ_SIZE)
                else:
                    with trio.move_on_at(deadline):
                        data = await stream.receive_some(_READ_SIZE)
            elif deadline == inf:
                # Wait first, then read: the next request of a client with one
                # in flight is sent only after it got our answer, so a read
                # right away would nearly always be a wasted EAGAIN syscall.
                while data is None:
                    await wait_readable(fd)
                    try:
                        data = read(fd, _READ_SIZE)
                    except BlockingIOError:
                        pass
            else:
                with trio.move_on_at(deadline):
                    while data is None:
                        await wait_readable(fd)
                        try:
                            data = read(fd, _READ_SIZE)
                        except BlockingIOError:
                            pass
        except OSError as exc:           # reset by the peer: SocketStream would say BrokenResourceError
            raise trio.BrokenResourceError(str(exc)) from exc
        if data is None:
            if state == HEAD:
                session.close_reason = "request body timeout"
                body = b'{"error":"timeout","detail":"request body too slow"}'
                await _send(stream, sock, fd, render_response((408, body, b"application/json", []), True))
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
