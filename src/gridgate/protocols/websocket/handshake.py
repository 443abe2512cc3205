"""The HTTP upgrade that opens a WebSocket connection (RFC 6455 section 4).

wsproto's ``H11Handshake`` parses the request and writes the answers: the
handshake happens once per connection, so its cost does not matter, and it
is the same code trio-websocket used for us, so what clients saw of the
handshake does not change. trio-websocket itself is not used: its
connection object starts a reader task per connection and cannot hand over
the raw stream after the handshake.

``read_upgrade`` returns the request; the caller decides, then ``accept``
(101) or ``reject`` (an HTTP error with a JSON body). Anything the client
sends after its request, before our answer, is dropped: a client waits for
the 101 before it sends frames (RFC 6455 section 4.1).
"""
from __future__ import annotations

import msgspec
import trio
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = ["Upgrade", "read_upgrade"]

_RECEIVE_BYTES = 16384


class Upgrade:
    """A parsed upgrade request on ``stream``, awaiting our answer."""

    __slots__ = ("stream", "request", "_handshake")

    def __init__(self, stream: trio.abc.Stream, request: Request, handshake: H11Handshake) -> None:
        self.stream = stream
        self.request = request
        self._handshake = handshake

    @property
    def path(self) -> str:
        return self.request.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.request.target.partition("?")[2]

    @property
    def subprotocols(self) -> list[str]:
        return list(self.request.subprotocols)

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of the request header ``name`` (lower case)."""
        return [v for k, v in self.request.extra_headers if k.lower() == name]

    async def accept(self, subprotocol: str | None) -> None:
        """Answer 101; the stream carries WebSocket frames from here on."""
        await self.stream.send_all(self._handshake.send(AcceptConnection(subprotocol=subprotocol)))

    async def reject(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await _reject(self.stream, self._handshake, status, headers, body)


async def _reject(stream: trio.abc.Stream, handshake: H11Handshake, status: int,
                  headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    try:
        answer = handshake.send(RejectConnection(status_code=status, has_body=True, headers=headers))
        answer += handshake.send(RejectData(data=body, body_finished=True))
    except LocalProtocolError:
        # h11 refuses to answer a request it could not parse at all: the same answer by hand
        answer = (f"HTTP/1.1 {status} \r\n".encode() + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
                  + b"connection: close\r\n\r\n" + body)
    try:
        await stream.send_all(answer)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass        # the client left; the caller closes the stream either way


async def read_upgrade(stream: trio.abc.Stream) -> Upgrade | str:
    """The client's upgrade request, or why there is none (the client left,
    or sent something that is not a WebSocket upgrade: answered 400 or 426
    as wsproto judges it). The caller bounds the wait. The request is
    bounded by h11 (16 KiB of head at most)."""
    handshake = H11Handshake(ConnectionType.SERVER)
    while True:
        try:
            data = await stream.receive_some(_RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            return "client left during the handshake"
        try:
            handshake.receive_data(bytes(data))
            for event in handshake.events():
                if isinstance(event, Request):
                    return Upgrade(stream, event, handshake)
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            extra = list(hint.headers) if isinstance(hint, RejectConnection) else []
            body = msgspec.json.encode({"error": "bad_request", "detail": f"not a WebSocket upgrade: {exc}"})
            await _reject(stream, handshake, status, [*extra, (b"content-type", b"application/json")], body)
            return f"bad upgrade request: {exc}"
