"""The fast HTTP engine: the fasthttp-style pipeline of DESIGN section 5.

One compiled parser per connection (src/_fastparse_http.pxi) is the request
context, reused for every request; bodies are memoryview slices of the
receive buffer; the compiled validator decodes them with msgspec; response
heads are prebuilt bytes. All requests found in one read are begun
together, so a pipelined burst shares one group commit and its answers
leave, in order, in one send; on a TCP socket the commit that makes them
durable writes them, without waking the connection's task (see _Owed);
and there an idle connection is parked in the gateway's ready loop, which
reads it and begins its requests (_Owed.on_ready), so a keep-alive request
costs neither an epoll_ctl nor a scheduler step: the task wakes only for
what has to wait.
Behaviour (statuses, bodies, timeouts) is the std engine's: the same
tests run against both.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, final

import trio

from gridgate.connections.fdwait import wait_readable as _wait_readable
from gridgate.connections.ready_loop import RESUME as ready_loop_resume
from gridgate.errors import HTTPParseError
from gridgate.protocols.http.api import Answer, Done, HttpError, NeedsAuth, Pending, begin_authenticated, begin_request
from gridgate.protocols.http.parser import parser as _parser

if TYPE_CHECKING:
    from gridgate._fastparse import HTTPRequestParser
    from gridgate.connections.manager import Session
    from gridgate.protocols.services import Services

__all__ = ["serve_fast_http", "render_response"]

log = logging.getLogger("gridgate.http")

# Every status the API can answer (401, 403, 429 ... too), with RFC 9110's
# name for 413 (Python 3.11's table still has the old one).
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus} | {413: b"Content Too Large"}
_HEADS: dict[tuple[int, bytes], bytes] = {}
# whole keep-alive responses without extra headers, by (status, content type, body)
_WHOLE: dict[tuple[int, bytes, bytes], bytes] = {}
_WHOLE_MAX = 512
_WHOLE_BODY_MAX = 128
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"connection: close\r\n"
_MAX_PIPELINED = 64          # requests begun per read before their answers go out
_REQUEST, _HEAD_ONLY = _parser.REQUEST, _parser.HEAD
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
    if not extra and not close:
        # the usual answers (202 with one count, the same error again) are
        # few: whole responses, found by one lookup instead of built anew
        key = (status, content_type, body)
        whole = _WHOLE.get(key)
        if whole is not None:
            return whole
        if len(body) <= _WHOLE_BODY_MAX and len(_WHOLE) < _WHOLE_MAX:
            whole = _WHOLE[key] = b"%s%d\r\n\r\n%s" % (_head(status, content_type), len(body), body)
            return whole
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


async def _wait_answers(begun: list[Answer | Pending | bytes | int]) -> None:
    # its own frame, so no loop variable keeps a request alive after its answer
    for item in begun:
        if type(item) is Pending and not item.done.is_set():
            await item.done.wait()


def _render(entries: list[Answer | Pending | bytes | int], n: int, heads: list[Pending] | None,
            close: bool) -> bytes:
    """The first ``n`` entries owed (the ints among them mark where a read's
    requests end), as bytes; ``close`` marks the last answer."""
    if n == 2 and heads is None:                   # the usual case: one request per read
        entry = entries[0]
        if type(entry) is bytes:
            return entry
        return render_response(entry.result() if type(entry) is Pending else entry, close)  # type: ignore[arg-type]
    out: list[bytes] = []
    last = n - 1
    while last >= 0 and type(entries[last]) is int:
        last -= 1
    for i in range(last + 1):
        entry = entries[i]
        if type(entry) is int:
            continue
        if type(entry) is bytes:
            out.append(entry)
            continue
        if type(entry) is Pending:
            answer = entry.result()
            if heads is not None and entry in heads:
                heads.remove(entry)
                out.append(_head_only(answer, close and i == last))
                continue
        else:
            answer = entry                         # type: ignore[assignment]
        out.append(render_response(answer, close and i == last))
    return b"".join(out)


@final
class _Owed:
    """The answers one connection owes, in request order, and who writes them.

    On a TCP socket the answers of a read are written by the commit that
    makes the last of them durable (``Done.then``), straight to the socket
    as the MQTT session writes its PUBACKs: the connection's task is not
    woken by the commit, it only waits for its next read. That halves the
    scheduler trips of a request (issue 24). The task writes them itself
    (``held``) where the order of what it sends matters: a request with
    Connection: close, an error's answer, 100 Continue, the pipelining
    bound, the end of the connection; and on other streams (TLS, in-memory).
    """
    __slots__ = ("entries", "heads", "fd", "sock", "session", "nursery", "held", "closed", "writer", "parser",
                 "services")

    def __init__(self, fd: int, sock: trio.socket.SocketType | None, session: Session,
                 nursery: Callable[[], trio.Nursery], parser: HTTPRequestParser, services: Services) -> None:
        # answers owed, oldest first, each read's followed by an int: a
        # read's answers leave together, in one write, when all are ready
        # (an int, not a list of sizes: one list less per connection)
        self.entries: list[Answer | Pending | bytes | int] = []
        self.heads: list[Pending] | None = None   # HEAD requests answered later (a cluster node's GET)
        self.fd = fd
        self.sock = sock
        self.session = session
        self.nursery = nursery
        self.held = False          # the task is writing: a commit only wakes it
        self.closed = False        # the connection ended: its fd may be another socket's now
        # set while a task writes what the socket did not take at once
        self.writer: trio.Event | None = None
        self.parser = parser
        self.services = services

    def answered(self) -> None:
        """A Done's ``then``: a request owed here is answered."""
        if not (self.held or self.closed or self.writer is not None):
            self.write_ready()

    def write_ready(self) -> None:
        """Write the answers of every read whose answers are all ready, oldest
        first, in one write; what the socket does not take goes to a writer task."""
        entries = self.entries
        n = 0
        i = 0
        for entry in entries:
            i += 1
            if type(entry) is int:
                n = i
            elif type(entry) is Pending and not entry.done.is_set():
                break
        if not n:
            return
        payload = _render(entries, n, self.heads, False)
        del entries[:n]
        try:
            sent = os.write(self.fd, payload)
        except BlockingIOError:
            sent = 0
        except OSError as exc:              # reset or EPIPE: the task's read sees the close too
            self.closed = True
            self.session.close(f"connection lost: {exc.strerror}")
            return
        if sent < len(payload):
            self.writer = trio.Event()
            self.nursery().start_soon(self._write_rest, payload, sent)

    async def _write_rest(self, payload: bytes, sent: int) -> None:
        try:
            if not self.closed:
                assert self.sock is not None
                await _send_rest(self.sock, payload, sent)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self.closed:             # else the connection ended first: its stream is closed
                self.closed = True
                self.session.close(f"connection lost: {exc}")
        finally:
            writer, self.writer = self.writer, None
            if writer is not None:
                writer.set()
        if not (self.held or self.closed):
            self.write_ready()              # what became ready meanwhile

    def ready_fd(self) -> int:
        return self.fd

    def on_ready(self, now: float) -> object:
        """One read, run by the ready loop (gridgate.connections.ready_loop)
        while the connection's task is parked there, idle between requests:
        what the task's loop does per read, as long as nothing has to wait.
        None: every request of the read is begun (its answers leave with
        the commit), stay parked. Else, for the task: b"" (the client's end
        of sending), an OSError (reset), or _begin_read's result for a read
        that needs the task (Connection: close, an error's answer, a partial
        request and its timeout, 100 Continue, authentication, the
        pipelining bound), whose requests are begun but not yet marked."""
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            return exc
        if not data:
            return data
        self.session.last_seen = now
        parser = self.parser
        parser.feed(data)
        got = _begin_read(self, parser, self.services, self)
        state, count, close, error, auth = got
        if close or auth or error is not None or state == _REQUEST or state == _HEAD_ONLY or parser.buffered:
            return got
        if count:
            entries = self.entries
            entries.append(count)        # where this read's requests end
            if self.writer is None:
                first = entries[0]
                if type(first) is not Pending or first.done.is_set():
                    self.write_ready()   # an answer ready at once (a GET)
        return None

    async def finish(self, stream: trio.abc.Stream, services: Services, close: bool) -> None:
        """The task writes every answer owed (waiting for each), after what a
        writer task is still sending; ``close`` marks the last one."""
        self.held = True
        try:
            entries = self.entries
            services.poll_durable()
            # services.durable_timeouts sets done (expired) at the durable
            # timeout: no cancel scope per request
            await _wait_answers(entries)
            if self.writer is not None:
                await self.writer.wait()
            payload = _render(entries, len(entries), self.heads, close)
            entries.clear()
            self.heads = None
            if payload:
                await _send(stream, self.sock, self.fd, payload)
        finally:
            self.held = False


def _owe(owed: _Owed, parser: HTTPRequestParser, started: Answer | Pending, on_done: _Owed | None) -> bool:
    """Add a begun request's answer to what ``owed`` owes; True: it closes."""
    if parser.method == "HEAD" and type(started) is not Pending:
        # RFC 9110 9.3.2: GET's answer without its body, rendered now
        owed.entries.append(_head_only(started, not parser.keep_alive))
    else:
        if type(started) is Pending:
            if parser.method == "HEAD":
                owed.heads = (owed.heads or []) + [started]
            if on_done is not None and type(started.done) is Done and parser.keep_alive:
                started.done.then = on_done
        owed.entries.append(started)
    return not parser.keep_alive


def _begin_read(owed: _Owed, parser: HTTPRequestParser, services: Services,
                on_done: _Owed | None) -> tuple[int, int, bool, HTTPParseError | None, bool]:
    """Begin every request the parser holds, up to what has to wait:
    (the parser's state, requests begun, the last one closes, the parse
    error met, the current request needs authentication first)."""
    state = 0
    count = 0
    try:
        while len(owed.entries) < _MAX_PIPELINED:
            state = parser.next()
            if state != _REQUEST:
                break
            started = begin_request(services, parser, "fast")
            if type(started) is NeedsAuth:
                # the parser keeps this request while the check waits: nothing else reads it
                return state, count, False, None, True
            count += 1
            if _owe(owed, parser, started, on_done):
                return state, count, True, None, False
    except HTTPParseError as exc:
        return state, count, False, exc, False
    return state, count, False, None, False


async def serve_fast_http(stream: trio.abc.Stream, services: Services, session: Session) -> None:
    # What an idle connection holds is kept small (issue 24: RSS per
    # connection): one frame (reads are inlined, no closures), no cancel
    # scope of its own (a graceful stop cancels the connection's scope,
    # which ends an idle read as a read scope would), and nothing of its
    # last request (answers leave the owed list, the parser drops its read).
    cfg = services.config.http
    http = _parser
    parser = http.HTTPRequestParser(cfg.max_header_bytes, cfg.max_body_bytes)
    HEAD = http.HEAD
    sock: trio.socket.SocketType | None = None
    fd = -1
    if isinstance(stream, trio.SocketStream):
        # Straight to the file descriptor (see _write_now); other streams
        # (TLS, WebSocket, in-memory) go through the Stream API.
        sock = stream.socket
        fd = sock.fileno()
    owed = _Owed(fd, sock, session, services.connection_nursery, parser, services)
    entries = owed.entries
    # a commit writes the answers itself only on a plain socket (see _Owed)
    on_done = owed if sock is not None else None
    # On a plain socket, an idle connection is parked in the gateway's ready
    # loop, which reads it and begins its requests (_Owed.on_ready): no
    # epoll_ctl and no scheduler step per request; this task wakes only for
    # what has to wait.
    ready_loop = services.ready_loop if sock is not None else None
    # fdwait's: a parked connection holds one 48-byte object, not trio's five
    # frames and abort closure, and a wake-up runs through fewer frames
    wait_readable = _wait_readable
    read = os.read
    # trio.current_time() without its two wrappers (the run's clock: a
    # MockClock in tests)
    clock = trio.lowlevel.current_clock()
    # https with a verified client certificate: the identity of every request on it
    certificate = services.auth.certificate("http", stream) if services.auth is not None else None
    inf = float("inf")
    deadline = inf               # for the head or body now arriving; inf while idle
    phase = 0                    # 0 idle (the reaper watches), 1 head arriving, 2 body arriving
    continued = False            # 100 Continue sent for the current request
    # a read the ready loop took and began, handed to this task to finish
    handed: tuple[int, int, bool, HTTPParseError | None, bool] | None = None
    got: object
    data: bytes | bytearray | None
    try:
        while True:
            if handed is None:
                state, count, close, error, auth = _begin_read(owed, parser, services, on_done)
            else:
                state, count, close, error, auth = handed
                handed = None
            while auth:
                started = await begin_authenticated(services, parser, "fast", session.remote, certificate)
                count += 1
                close = _owe(owed, parser, started, on_done)
                del started              # nothing of a begun request stays in this frame
                if close:
                    break
                state, begun, close, error, auth = _begin_read(owed, parser, services, on_done)
                count += begun
            if count:
                continued = False
                entries.append(count)        # where this read's requests end
                if close or error is not None or state == _REQUEST or on_done is None:
                    # the task answers: the last answer closes, an error's
                    # answer follows, the pipelining bound, another stream
                    await owed.finish(stream, services, close)
                else:
                    services.poll_durable()
                    # a commit that came meanwhile found this read's end not yet
                    # marked: write now; else (the usual case) the commit will
                    if entries and owed.writer is None:
                        first = entries[0]
                        if type(first) is not Pending or first.done.is_set():
                            owed.write_ready()
                phase = 0
            if error is not None:
                if entries or owed.writer is not None:
                    await owed.finish(stream, services, False)
                services.metrics.protocol_errors.labels("http", error.error).inc()
                session.close_reason = f"bad request: {error}"
                body = HttpError(error.status, error.error, error.detail).body()
                await _send(stream, sock, fd, render_response((error.status, body, b"application/json", []), True))
                return
            if close:
                return
            if state == _REQUEST:        # the pipelining bound: answered, now go on parsing
                continue
            # slowloris: a head must arrive within header_timeout_s of its first
            # byte, a body within body_timeout_s of its head
            if state == HEAD:
                if phase != 2:
                    phase = 2
                    deadline = clock.current_time() + cfg.body_timeout_s
                if parser.expect_continue and not continued:
                    continued = True
                    if entries or owed.writer is not None:   # the answers owed come first
                        await owed.finish(stream, services, False)
                    await _send(stream, sock, fd, _CONTINUE)
            elif parser.buffered:
                if phase != 1:
                    phase = 1
                    deadline = clock.current_time() + cfg.header_timeout_s
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
                    if ready_loop is not None and not ready_loop.closed:
                        got = await ready_loop.park(owed)
                        if type(got) is tuple:
                            # a read the loop began but could not finish: as
                            # after a read of this task's (phase 0 -> 1)
                            handed = got
                            phase = 1
                            deadline = session.last_seen + cfg.header_timeout_s
                            continue
                        if isinstance(got, OSError):
                            raise got
                        if got is ready_loop_resume:
                            ready_loop = None    # the loop stopped: read as before
                            continue
                        data = got               # type: ignore[assignment]  # b"": the client's end of sending
                    else:
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
            if not data:
                # a timeout or the client's end of sending: what is owed is
                # still answered (a client may half-close and wait), as before
                if entries or owed.writer is not None:
                    await owed.finish(stream, services, False)
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
            session.last_seen = clock.current_time()
            if phase == 0:
                phase = 1
                deadline = session.last_seen + cfg.header_timeout_s
            parser.feed(data)
    finally:
        owed.closed = True
