"""One accepted WebSocket connection after its upgrade: the connection's
own task reads the socket, feeds ``FrameDecoder`` and gets every message of
the read at once; pings are answered, and everything owed to the peer goes
out through ``write``.

This replaces trio-websocket's connection object, whose reader task and
message channel cost several scheduler steps per message (62% of the
gateway's samples under ``/v1/ws`` load), with the MQTT session's habits:
the socket is read directly, every frame of one read is handled in one
pass, and a write goes straight to the socket when nothing is queued ahead
of it, from any task, without waiting; only what the socket does not take
waits in ``Outgoing`` for a writer task.
"""
from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from gridgate.connections.fdwait import wait_readable
from gridgate.protocols.outgoing import Outgoing
from gridgate.protocols.websocket.frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameDecoder,
    WebSocketError,
    encode_close,
    encode_frame,
)

if TYPE_CHECKING:
    from gridgate.connections.manager import Session

__all__ = ["ServerWebSocket"]

# Reads in a row that found data before the connection yields to others anyway.
_READS_PER_YIELD = 4


class ServerWebSocket:
    """The server end of one WebSocket connection on any Trio stream.

    ``receive()`` returns the data messages of the next read as ``(opcode,
    payload)``; it answers pings itself, and notes the end in ``eof`` (the
    stream ended), ``peer_close`` (the peer's close frame arrived: its code
    and reason are the decoder's) or ``error`` (the peer broke the protocol:
    the messages before the broken frame are still returned). ``transport``
    is the stream under the WebSocket (a trio.SSLStream over wss: its client
    certificate is the session's identity).
    """

    __slots__ = ("transport", "session", "decoder", "receive_bytes", "max_queued_frames", "out", "eof",
                 "peer_close", "error", "close_sent", "lost", "_fd", "_receive_some", "_start_soon", "_drained",
                 "_unyielded")

    def __init__(self, stream: trio.abc.Stream, session: Session, max_message_bytes: int, receive_bytes: int,
                 max_queued_frames: int, start_soon: Callable[[Callable[[], Awaitable[Any]]], None]) -> None:
        self.transport = stream
        self.session = session
        self.decoder = FrameDecoder(max_message_bytes)
        self.receive_bytes = receive_bytes
        # Frames owed to a peer that does not read them (acks, pongs to its
        # pings) before it stops being read: what it can make us hold is bounded.
        self.max_queued_frames = max_queued_frames
        # What the socket did not take at once, one item per frame (so its
        # length counts the acks a peer does not read), and its writer task.
        self.out: Outgoing[bytes] | None = None
        self.eof = False
        self.peer_close = False
        self.error: WebSocketError | None = None
        self.close_sent = False
        self.lost = False
        # The socket's fd when the stream is a plain TCP socket (read and
        # written directly, as the MQTT session does); -1 otherwise.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._receive_some = stream.receive_some
        self._start_soon = start_soon
        self._drained = False          # the last read came back short: the socket is most likely empty
        self._unyielded = 0

    @property
    def ended(self) -> bool:
        """Nothing more will be read: EOF, the peer's close, a protocol error or a lost connection."""
        return self.eof or self.peer_close or self.error is not None or self.lost

    # -- reading ---------------------------------------------------------------------

    async def receive(self) -> list[tuple[int, bytes]]:
        """The data messages of the next read (possibly none: a read of
        control frames or of part of a frame); [] once ``ended``."""
        if self.ended:
            return []
        out = self.out
        if out is not None and len(out) >= self.max_queued_frames:
            # The peer does not read what it is sent: stop reading it.
            self.session.paused = True
            await out.wait_sent()
            self.session.paused = False
        data = await self._read()
        if not data:
            self.eof = True
            return []
        self.session.last_seen = trio.current_time()      # any frame, ping or pong is a heartbeat
        try:
            events = self.decoder.feed(data)
        except WebSocketError as exc:
            self.error = exc
            events = exc.events
        for i, event in enumerate(events):
            if event[0] & 0x08:         # a control frame among the messages: sort them out
                self._control(events[i:])
                return [ev for ev in events if not ev[0] & 0x08]
        return events

    def _control(self, events: list[tuple[int, bytes]]) -> None:
        pongs = []
        for opcode, payload in events:
            if opcode == OP_PING:
                pongs.append(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.peer_close = True
        if pongs:
            self.write(pongs)

    async def _read(self) -> bytes | bytearray:
        fd = self._fd
        if fd < 0:
            try:
                return await self._receive_some(self.receive_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.lost = True
                return b""
        while True:
            if self._drained:
                # A short read emptied the socket: wait rather than spend a syscall on the EAGAIN.
                await wait_readable(fd)     # fdwait's: one small object, not five frames, per parked connection
                self._unyielded = 0
            try:
                data = os.read(fd, self.receive_bytes)
            except BlockingIOError:
                self._drained = True
                continue
            except OSError as exc:       # reset by the peer
                self.session.close_reason = self.session.close_reason or f"connection lost: {exc.strerror}"
                self.lost = True
                return b""
            self._drained = len(data) < self.receive_bytes
            # Only a peer that keeps the socket full is read on without waiting;
            # it yields every few reads, for fairness and cancellation.
            self._unyielded += 1
            if self._unyielded >= _READS_PER_YIELD:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
            return data

    # -- writing ---------------------------------------------------------------------

    def write(self, frames: list[bytes]) -> None:
        """Send frames to the peer in order, from any task, without waiting.

        On a TCP socket they are written at once in one call when nothing is
        queued ahead of them and the socket takes them (nearly always). The
        rest waits in ``out``, one item per frame, for the writer task.
        Nothing is written after the close frame or once the connection is lost.
        """
        if self.close_sent or self.lost:
            return
        out = self.out
        if self._fd >= 0 and (out is None or out.idle):
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:       # reset or EPIPE: the reader sees the end too
                self.lost = True
                self.session.close(f"connection lost: {exc.strerror}")
                return
            if sent == len(data):
                return
            frames = _unsent(frames, sent)
        if out is None:
            out = self.out = Outgoing(self._send_all, self._start_soon)
        for frame in frames:
            out.put(frame)

    async def _send_all(self, frames: list[bytes]) -> None:
        try:
            await self.transport.send_all(b"".join(frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.lost = True
            self.session.close("peer gone while frames were owed")

    async def flush(self) -> None:
        """Until everything written so far is sent (unbounded: the caller bounds it)."""
        if self.out is not None:
            await self.out.wait_sent()

    async def close(self, code: int, reason: str, wait_s: float) -> None:
        """The closing handshake: our close frame (an echo of the peer's code
        when the peer closed first), flushed, then the peer's close frame or
        EOF awaited for at most ``wait_s`` (closing with bytes unread would
        reset the connection and could lose the close frame on the way)."""
        if self.close_sent or self.lost:
            return
        with trio.move_on_after(wait_s):
            if self.peer_close:
                code = self.decoder.close_code
                frame = encode_frame(OP_CLOSE, b"") if code == 1005 else encode_close(code)
            else:
                frame = encode_close(code, reason)
            self.write([frame])
            self.close_sent = True
            await self.flush()
            while not (self.peer_close or self.eof or self.lost or self.error is not None):
                data = await self._read()
                if not data:
                    return
                try:
                    events = self.decoder.feed(data)
                except WebSocketError:
                    return
                self.peer_close = any(opcode == OP_CLOSE for opcode, _ in events)

    async def close_now(self, code: int, reason: str) -> None:
        """The close frame when the session was cancelled (reaped, taken over):
        sent only if nothing else is being written, and no answer awaited."""
        if self.close_sent or self.lost or not (self.out is None or self.out.idle):
            return
        self.close_sent = True
        try:
            await self.transport.send_all(encode_close(code, reason))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.lost = True


def _unsent(frames: list[bytes], sent: int) -> list[bytes]:
    """The frames, less the first ``sent`` bytes of them."""
    for i, frame in enumerate(frames):
        if sent < len(frame):
            return [frame[sent:], *frames[i + 1:]]
        sent -= len(frame)
    return []
