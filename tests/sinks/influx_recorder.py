"""A recording HTTP proxy in front of a real influxd, for tests.

InfluxDB keeps one point per series and timestamp: a point written twice is
overwritten, so counting points in the database cannot show a duplicate
write. This proxy sits between the sink and influxd, on loopback, and records
what the sink *sent*: every ``POST /write`` body (gunzipped, one entry per
line) with the outcome the sink saw, the status it was answered or no answer
at all. Other requests (``/query``: CREATE DATABASE) are forwarded and not
recorded.

Failures, as the sink sees them:

* influxd down (connection refused or lost): the proxy closes the sink's
  connection without an answer, as a dead server would;
* ``drop_answers(n)``: the next ``n`` writes that influxd stores (204) lose
  their answer: the sink's connection is closed instead, so the sink must
  count as failed a write whose points did land (the failure that makes a
  re-send unavoidable).

    proxy = RecordingInfluxProxy(influx.url)
    await nursery.start(proxy.run)
    ... point the sink at proxy.url ...
    with trio.fail_after(30):
        await proxy.wait_until(lambda: proxy.points_landed() >= 500)
"""
from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import httpx
import trio

__all__ = ["RecordingInfluxProxy", "WriteRequest", "point_key", "sends_by_point"]

_RECEIVE_BYTES = 65536
# Answer headers passed back to the sink (the body is re-framed with its own length).
_ANSWER_HEADERS = ("content-type", "x-influxdb-error", "x-influxdb-version")
# The series of a line: measurement and tag set, up to the first unescaped space.
_SERIES = re.compile(rb"(?:[^ \\]|\\.)*")


@dataclass
class WriteRequest:
    """One ``POST /write`` as the sink sent it.

    Attributes:
        index: its place in arrival order.
        lines: the line-protocol lines of its (gunzipped) body.
        landed: influxd answered 204: its points are stored.
        answered: the status the sink received; None while in flight or when
            the sink got no answer (influxd down, or an injected lost answer).
        done: the exchange is over (answered, or the connection closed).
    """

    index: int
    lines: list[bytes] = field(repr=False)
    landed: bool = False
    answered: int | None = None
    done: bool = False

    @property
    def ok(self) -> bool:
        """The sink was told the write succeeded."""
        return self.answered == 204


def point_key(line: bytes) -> tuple[bytes, int]:
    """What InfluxDB identifies a point by: (measurement and tag set, timestamp)."""
    match = _SERIES.match(line)
    assert match is not None          # the pattern matches the empty string
    return match.group(), int(line.rsplit(b" ", 1)[1])


def sends_by_point(writes: list[WriteRequest]) -> dict[tuple[bytes, int], list[tuple[WriteRequest, bytes]]]:
    """Every point's sends, in arrival order: (the write carrying it, its line)."""
    out: dict[tuple[bytes, int], list[tuple[WriteRequest, bytes]]] = {}
    for write in writes:
        for line in write.lines:
            out.setdefault(point_key(line), []).append((write, line))
    return out


class _NoAnswer(Exception):
    """Close the sink's connection without answering its request."""


class RecordingInfluxProxy:
    """See the module docstring. ``run`` serves until cancelled."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.writes: list[WriteRequest] = []
        self.port: int | None = None
        self._drop = 0
        self._changed = trio.Event()
        self._client: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the proxy is not running")
        return f"http://127.0.0.1:{self.port}"

    def drop_answers(self, count: int = 1) -> None:
        """Let the next ``count`` writes land in influxd but never answer the sink."""
        self._drop += count

    def points_landed(self) -> int:
        """Lines of the writes influxd stored (a re-sent point counts again)."""
        return sum(len(w.lines) for w in self.writes if w.landed)

    def failed_writes(self) -> list[WriteRequest]:
        """Writes that are over and were not answered 204."""
        return [w for w in self.writes if w.done and not w.ok]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, checked after every change to
        ``writes``. Bound it with ``trio.fail_after``."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[RecordingInfluxProxy] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with httpx.AsyncClient(base_url=self.upstream, trust_env=False, timeout=30.0) as client:
            self._client = client
            task_status.started(self)
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                await self._exchange(conn, stream, *request)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (_NoAnswer, h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass          # the sink went away, or it gets no answer: close
        finally:
            await trio.aclose_forcefully(stream)

    async def _next_event(self, conn: h11.Connection, stream: trio.SocketStream) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await stream.receive_some(_RECEIVE_BYTES))

    async def _read_request(self, conn: h11.Connection,
                            stream: trio.SocketStream) -> tuple[h11.Request, bytes] | None:
        """The next request and its whole body; None when the sink closed between requests."""
        event = await self._next_event(conn, stream)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError(f"expected a request, got {event!r}")
        body = bytearray()
        while True:
            part = await self._next_event(conn, stream)
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                return event, bytes(body)
            else:
                raise h11.RemoteProtocolError(f"request cut short: {part!r}")

    async def _exchange(self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request,
                        body: bytes) -> None:
        assert self._client is not None
        headers = {name.decode(): value.decode() for name, value in request.headers
                   if name in (b"content-type", b"content-encoding")}
        record = None
        if request.method == b"POST" and request.target.split(b"?", 1)[0] == b"/write":
            text = gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body
            record = WriteRequest(len(self.writes), text.splitlines())
            self.writes.append(record)
            self._notify()
        try:
            try:
                answer = await self._client.request(request.method.decode(), request.target.decode(),
                                                    content=body, headers=headers)
            except httpx.HTTPError:
                raise _NoAnswer from None              # influxd is down: so is the "server"
            if record is not None:
                record.landed = answer.status_code == 204
                if record.landed and self._drop:
                    self._drop -= 1
                    raise _NoAnswer                    # stored, but the sink never hears of it
            out = [(name, answer.headers[name]) for name in _ANSWER_HEADERS if name in answer.headers]
            if answer.status_code != 204:
                out.append(("content-length", str(len(answer.content))))
            await stream.send_all(conn.send(h11.Response(status_code=answer.status_code, headers=out)))
            if answer.status_code != 204 and answer.content:
                await stream.send_all(conn.send(h11.Data(data=answer.content)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            if record is not None:
                record.answered = answer.status_code
        finally:
            if record is not None:
                record.done = True
                self._notify()
