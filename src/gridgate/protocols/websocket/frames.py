"""The WebSocket frame layer of the server side (RFC 6455 section 5), sans-IO.

``FrameDecoder.feed(data)`` takes the bytes of one read and returns every
complete message and control frame in them, in order, as ``(opcode,
payload)`` pairs: fragments are joined into one message, client frames
unmasked, text checked to be UTF-8 (and handed on as its bytes: the
readings' decoders take bytes). The encoders build the server's frames
(never masked). Nothing here does I/O.

Why not wsproto's frame layer, which the gateway used through
trio-websocket: per frame it makes a ``Frame``, a ``Header``, ``RsvBits``,
an ``Opcode`` enum, a masker object and an event object, and its buffer
deletes the front of a bytearray after every frame (a 64 KiB read of small
messages is moved once per message). Here one read costs one pass with an
index over the buffer; a message of one frame costs a header parse, one
unmasking and one tuple. wsproto stays the reference: the tests check the
two agree on arbitrary bytes.

Errors: ``WebSocketError`` with the close code to answer (1002 a broken
frame, 1007 text that is not UTF-8, 1009 a message over
``max_message_bytes``, judged from the frame header before the payload is
buffered), carrying the events complete before it. After a close frame or
an error nothing more is decoded.
"""
from __future__ import annotations

import codecs
from typing import Final

from gridgate.protocols.wsmask import wsmask

__all__ = [
    "OP_CONTINUATION", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
    "CLOSE_PROTOCOL_ERROR", "CLOSE_INVALID_PAYLOAD", "CLOSE_TOO_BIG", "CLOSE_NO_STATUS",
    "WebSocketError", "FrameDecoder", "encode_frame", "encode_close",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_NO_STATUS: Final = 1005          # a close frame without a code (never sent)
CLOSE_INVALID_PAYLOAD: Final = 1007
CLOSE_TOO_BIG: Final = 1009
# Codes a peer may send (section 7.4): the defined ones below 3000, any in 3000-4999.
_DEFINED_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))
_MAX_CONTROL_PAYLOAD = 125


class WebSocketError(Exception):
    """The peer broke the protocol; ``code`` is the close code to answer with.
    ``events`` are the messages and control frames complete before the broken
    frame in the same ``feed`` (they arrived intact and are still handled)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.events: list[tuple[int, bytes]] = []


# Compiled (src/_fastparse_ws.pxi) unless the twins run (gridgate.hotpath): every client frame's
# payload goes through it.
_unmask = wsmask.ws_unmask


class FrameDecoder:
    """Client-to-server frames in, ``(opcode, payload)`` out.

    ``opcode`` is OP_TEXT or OP_BINARY for a whole message (``payload`` its
    bytes, UTF-8 checked for text), OP_PING or OP_PONG with their payload,
    OP_CLOSE once (``close_code`` and ``close_reason`` set; CLOSE_NO_STATUS
    when the frame had no code). What is buffered between calls is at most one
    frame, and a frame is never longer than ``max_message_bytes`` plus its
    header: the limit is checked before its payload is waited for.
    """

    __slots__ = ("max_message_bytes", "_buf", "_waiting", "_have", "_need", "_message", "_opcode", "_utf8",
                 "closed", "close_code", "close_reason")

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buf = b""                        # the start of a frame whose header is incomplete
        # A frame whose header was read but not its whole payload: its pieces,
        # joined once ``_need`` bytes are in (not once per read: a big frame
        # over many reads would be copied again at every read).
        self._waiting: list[bytes] = []
        self._have = 0
        self._need = 0
        # The fragments of the message being received, joined as they come: a
        # list of them would let a peer hold a Python object per empty fragment.
        self._message = bytearray()
        self._opcode = 0                       # that message's opcode; 0: none started
        self._utf8: codecs.IncrementalDecoder | None = None   # for a fragmented text message only
        self.closed = False
        self.close_code = CLOSE_NO_STATUS
        self.close_reason = ""

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete frame and the fragments of an unfinished message."""
        return len(self._buf) + self._have + len(self._message)

    def feed(self, data: bytes | bytearray) -> list[tuple[int, bytes]]:
        """Every complete message and control frame in what has arrived."""
        if self.closed:
            return []
        if self._need:
            self._waiting.append(bytes(data))
            self._have += len(data)
            if self._have < self._need:
                return []
            buf = b"".join(self._waiting)
            self._waiting, self._have, self._need = [], 0, 0
        else:
            buf = self._buf + data if self._buf else bytes(data)
        events: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        try:
            while end - pos >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                opcode = b0 & 0x0F
                if opcode not in _OPCODES:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"invalid opcode {opcode:#x}")
                fin = b0 & 0x80
                control = opcode & 0x08
                if control and not fin:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                length = b1 & 0x7F
                head = 2
                if length == 126:
                    if end - pos < 4:
                        break
                    length = (buf[pos + 2] << 8) | buf[pos + 3]
                    head = 4
                    if length <= _MAX_CONTROL_PAYLOAD:
                        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "payload length used 2 bytes when 1 would do")
                elif length == 127:
                    if end - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                    head = 10
                    if length <= 0xFFFF:
                        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "payload length used 8 bytes when 2 would do")
                    if length >> 63:
                        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "8-byte payload length with the top bit set")
                if control and length > _MAX_CONTROL_PAYLOAD:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "control frame payload over 125 bytes")
                if b0 & 0x70:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bit set (no extension was agreed)")
                if not b1 & 0x80:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "client frame not masked")
                if not control and len(self._message) + length > self.max_message_bytes:
                    raise WebSocketError(CLOSE_TOO_BIG, f"message over {self.max_message_bytes} bytes")
                start = pos + head + 4
                stop = start + length
                if stop > end:
                    self._waiting, self._have, self._need = [buf[pos:]], end - pos, stop - pos
                    pos = end
                    break
                payload = _unmask(buf[start:stop], buf[pos + head:start])
                pos = stop
                if control:
                    if opcode == OP_CLOSE:
                        self._close(payload)
                        events.append((OP_CLOSE, payload))
                        pos = end
                        break
                    events.append((opcode, payload))
                    continue
                if opcode == OP_CONTINUATION:
                    if not self._opcode:
                        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation frame with no message started")
                    opcode = self._opcode
                elif self._opcode:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message before the last one finished")
                elif fin:              # a whole message in one frame: nearly every message
                    if opcode == OP_TEXT and not payload.isascii():
                        _check_utf8(payload)
                    events.append((opcode, payload))
                    continue
                else:
                    self._opcode = opcode
                    if opcode == OP_TEXT:
                        self._utf8 = codecs.getincrementaldecoder("utf-8")()
                if self._utf8 is not None:
                    try:
                        self._utf8.decode(payload, bool(fin))
                    except UnicodeDecodeError as exc:
                        raise WebSocketError(CLOSE_INVALID_PAYLOAD, f"text message is not UTF-8: {exc}") from None
                self._message += payload
                if fin:
                    events.append((opcode, bytes(self._message)))
                    self._message = bytearray()
                    self._opcode = 0
                    self._utf8 = None
        except WebSocketError as exc:
            exc.events = events
            self.closed = True
            self._buf = b""
            self._message = bytearray()
            raise
        self._buf = buf[pos:] if pos < end else b""
        return events

    def _close(self, payload: bytes) -> None:
        self.closed = True
        self._buf = b""
        if not payload:
            return
        if len(payload) == 1:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code = int.from_bytes(payload[:2], "big")
        if not (code in _DEFINED_CLOSE_CODES or 3000 <= code <= 4999):
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"close frame with code {code}, which a peer may not send")
        try:
            self.close_reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise WebSocketError(CLOSE_INVALID_PAYLOAD, "close reason is not UTF-8") from None
        self.close_code = code


def _check_utf8(payload: bytes) -> None:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebSocketError(CLOSE_INVALID_PAYLOAD, f"text message is not UTF-8: {exc}") from None


def encode_frame(opcode: int, payload: bytes | bytearray | memoryview) -> bytes:
    """One unmasked, final frame (the server never masks nor fragments)."""
    n = len(payload)
    if n <= 125:
        return bytes((0x80 | opcode, n)) + payload
    if n <= 0xFFFF:
        return bytes((0x80 | opcode, 126, n >> 8, n & 0xFF)) + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut (at a character boundary) to fit in 123 bytes."""
    raw = reason.encode("utf-8")
    if len(raw) > _MAX_CONTROL_PAYLOAD - 2:
        raw = raw[:_MAX_CONTROL_PAYLOAD - 2].decode("utf-8", errors="ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + raw)
