"""One simulated device on the gateway's WebSocket channel ``/v1/ws``.

Each message is an envelope ``{"seq": n, "readings": [...K readings...]}``
(a text JSON message, or a binary MessagePack one), built once per device:
only ``n`` is spliced in per message. The gateway answers each envelope,
after durable and in order, with ``{"ack": n, "accepted", "rejected",
"errors"}``; up to ``--inflight`` envelopes are unacknowledged per device.
A downlink ``{"command": {"id", ...}}`` is answered with
``{"command_ack": id}`` and counted.

The WebSocket client is this module, on the device's own raw socket, the
way ``mqtt_device`` drives MQTT: the upgrade request written by hand and
its 101 checked (status and ``Sec-WebSocket-Accept``), each window of
frames in one write (headers per seq width made once), a read of nothing
but error-free acks matched and its seqs taken by one regular expression
each (C), anything else parsed frame by frame, the acks of a read recorded
together. trio-websocket, used before, spent over 100 us of CPU per
reading in its reader task and message channel, far more than the gateway
it measured.

Frames are masked with the all-zero key. RFC 6455 wants a fresh,
unpredictable key per frame so that a browser's script cannot steer the
bytes a proxy sees; a load generator is not that script, the gateway
unmasks every frame the same way whatever the key, and a zero key lets
each frame be built from bytes encoded once.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import os
import re
from collections import Counter
from urllib.parse import quote

import msgspec
import trio

from loadgen.device import READING, Device, DeviceOptions
from loadgen.mqtt_device import RawSocketStream  # the one driver of a raw socket (see connect)
from loadgen.stats import Stats

__all__ = ["WsDevice", "build_envelope", "client_frame", "handshake", "parse_frames"]

_RECEIVE_BYTES = 65536
_MAX_HEAD_BYTES = 16384              # of the server's handshake answer
_MAX_FRAME_BYTES = 1 << 20           # of one frame from the server
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ZERO_MASK = b"\x00\x00\x00\x00"
_NONES = itertools.repeat(None)
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class _Command(msgspec.Struct):
    id: str


class _ServerMessage(msgspec.Struct):
    """An ack or a command; other fields (``errors``, a command's type and
    payload) are skipped by the decoder."""
    ack: int | None = None
    accepted: int = 0
    rejected: int = 0
    command: _Command | None = None


_decode_json = msgspec.json.Decoder(_ServerMessage).decode
_decode_msgpack = msgspec.msgpack.Decoder(_ServerMessage).decode


def build_envelope(readings: list[dict[str, object]], fmt: str) -> tuple[bytes, bytes]:
    """``(head, tail)`` of ``{"seq": n, "readings": readings}``: a message is
    ``head + n + tail``, n as decimal digits (JSON) or a MessagePack uint32."""
    if fmt == "msgpack":
        # fixmap of 2, "seq", uint32 (0xce + 4 bytes, valid for every n < 2**32), "readings", array
        whole = msgspec.msgpack.encode({"seq": 0xFFFFFFFF, "readings": readings})
        marker = b"\xa3seq\xce\xff\xff\xff\xff"
    else:
        whole = msgspec.json.encode({"seq": 0, "readings": readings})
        marker = b'"seq":0'
    cut = whole.index(marker) + len(marker)
    return whole[:cut - (4 if fmt == "msgpack" else 1)], whole[cut:]


def _frame_head(opcode: int, n: int) -> bytes:
    """A final client frame's header for an ``n``-byte payload, masked with the zero key."""
    if n <= 125:
        return bytes((0x80 | opcode, 0x80 | n)) + _ZERO_MASK
    if n <= 0xFFFF:
        return bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big") + _ZERO_MASK
    return bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big") + _ZERO_MASK


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (zero mask: the payload goes out as it is)."""
    return _frame_head(opcode, len(payload)) + payload


def parse_frames(buf: bytes | bytearray) -> tuple[list[tuple[int, bytes]], bytes | bytearray]:
    """The whole server frames at the start of ``buf`` as ``(opcode,
    payload)`` (the gateway neither masks nor fragments; a fragment would
    be handed on as its own payload), and the rest of ``buf``."""
    frames: list[tuple[int, bytes]] = []
    pos, end = 0, len(buf)
    while end - pos >= 2:
        opcode, n = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
        start = pos + 2
        if n == 126:
            start += 2
            if start > end:
                break
            n = int.from_bytes(buf[pos + 2:start], "big")
        elif n == 127:
            start += 8
            if start > end:
                break
            n = int.from_bytes(buf[pos + 2:start], "big")
            if n > _MAX_FRAME_BYTES:
                raise ConnectionError(f"the server sent a frame of {n} bytes")
        if start + n > end:
            break
        frames.append((opcode, bytes(buf[start:start + n])))
        pos = start + n
    return frames, buf[pos:]


@functools.cache
def _acks_pattern(batch: int) -> re.Pattern[bytes]:
    """One text frame of ``{"ack":n,"accepted":batch,"rejected":0,"errors":[]}``
    exactly as gridgate writes it (a length byte under 126, no spaces), ``n``
    captured. When the matches of a read add up to its whole length they tile
    it: the read is nothing but such acks. The length byte is not compared
    with the payload: such a read is gridgate's acks; anything else takes
    ``parse_frames``."""
    return re.compile(rb'\x81[\x00-\x7d]\{"ack":(\d+),"accepted":%d,"rejected":0,"errors":\[\]\}' % batch)


def _accept_token(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


async def handshake(stream: trio.abc.Stream | RawSocketStream, host_header: str, resource: str,
                    subprotocol: str | None = None) -> bytes:
    """The WebSocket upgrade on ``stream`` (ConnectionError if refused or
    wrong); returns the bytes that came after the 101's head."""
    key = base64.b64encode(os.urandom(16))
    offer = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    await stream.send_all(
        f"GET {resource} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        if len(answer) > _MAX_HEAD_BYTES:
            raise ConnectionError("WebSocket handshake failed: the answer's head is too long")
        chunk = await stream.receive_some(_RECEIVE_BYTES)
        if not chunk:
            raise ConnectionError("WebSocket handshake failed: closed before the answer")
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[1] != b"101":
        raise ConnectionError(f"WebSocket handshake failed: {status_line.decode('latin-1')!r}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    if headers.get(b"sec-websocket-accept") != _accept_token(key):
        raise ConnectionError("WebSocket handshake failed: wrong Sec-WebSocket-Accept")
    return bytes(rest)


class WsDevice(Device):
    """Sends seq'd envelopes of ``--batch`` readings, up to ``--inflight`` unacknowledged."""

    def __init__(self, index: int, opts: DeviceOptions, stats: Stats, local_address: str | None) -> None:
        super().__init__(index, opts, stats, local_address)
        self.resource = "/v1/ws?device_id=" + quote(self.client_id, safe="")
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        self.host_header = f"{host}:{opts.port}"
        head, tail = build_envelope([READING] * opts.batch, opts.payload)
        self.binary = opts.payload == "msgpack"
        self.head, self.tail = head, tail
        if self.binary:
            # the seq is always 4 bytes: the frame header is the same for every message
            self.frame_head = _frame_head(OP_BINARY, len(head) + 4 + len(tail)) + head
        else:
            # a text frame's header depends on the seq's width: one per width, made on first use
            self.fixed = len(head) + len(tail)
            self.text_heads: dict[int, bytes] = {}
        self.next_seq = 1
        self.inflight: dict[int, float] = {}        # seq -> intended send time
        self._buf = b""                              # what the handshake read beyond the 101
        self._pong: trio.Event | None = None
        # One writer at a time (the sender; rarely the reader's command acks and
        # pongs, or the pinger): a flag, not a trio.Lock, whose acquire is a
        # scheduler round trip on every window.
        self._sending = False
        self._send_done: trio.Event | None = None

    # -- connection ----------------------------------------------------------------

    async def connect(self) -> trio.abc.Stream | RawSocketStream:
        with trio.fail_after(self.opts.connect_timeout):
            stream: trio.abc.Stream | RawSocketStream
            stream = await self.open_stream(self.opts.host, self.opts.port, local_address=self.local_address)
            if isinstance(stream, trio.SocketStream):
                # one syscall per read and per write (SocketStream tries each
                # read before waiting: an EAGAIN per read) and no per-call layers
                stream = RawSocketStream.take(stream)
            try:
                self._buf = await self._handshake(stream)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return stream

    async def _handshake(self, stream: trio.abc.Stream | RawSocketStream) -> bytes:
        return await handshake(stream, self.host_header, self.resource)

    async def say_goodbye(self, stream: trio.abc.Stream | RawSocketStream) -> None:
        await self._send(stream, client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))

    # -- traffic ----------------------------------------------------------------------

    async def _send(self, stream: trio.abc.Stream | RawSocketStream, data: bytes) -> None:
        while self._sending:          # rare: another task is mid-write
            if self._send_done is None:
                self._send_done = trio.Event()
            await self._send_done.wait()
        self._sending = True
        try:
            await stream.send_all(data)
        finally:
            self._sending = False
            if self._send_done is not None:
                self._send_done.set()
                self._send_done = None

    def _frames(self, dues: list[float]) -> bytes:
        inflight, seq = self.inflight, self.next_seq
        parts: list[bytes] = []
        if self.binary:
            frame_head, tail = self.frame_head, self.tail
            for due in dues:
                inflight[seq] = due
                parts += (frame_head, seq.to_bytes(4, "big"), tail)
                seq += 1
        else:
            heads, tail = self.text_heads, self.tail
            for due in dues:
                inflight[seq] = due
                digits = b"%d" % seq
                head = heads.get(len(digits))
                if head is None:
                    head = heads[len(digits)] = _frame_head(OP_TEXT, self.fixed + len(digits)) + self.head
                parts += (head, digits, tail)
                seq += 1
        self.next_seq = seq
        return b"".join(parts)

    async def send(self, stream: trio.abc.Stream | RawSocketStream, dues: list[float]) -> None:
        frames = self._frames(dues)
        self.stats.sent += len(dues) * self.opts.batch
        await self._send(stream, frames)

    async def reader(self, stream: trio.abc.Stream | RawSocketStream) -> None:
        buf: bytes | bytearray
        buf, self._buf = self._buf, b""
        batch = self.opts.batch
        acks = _acks_pattern(batch).findall
        # an ack's length less its seq's digits
        fixed = len(b'\x81_{"ack":,"accepted":%d,"rejected":0,"errors":[]}' % batch)
        while True:
            if buf:
                seqs = acks(buf)
                if seqs and len(seqs) * fixed + sum(map(len, seqs)) == len(buf):
                    # the usual read: nothing but whole JSON acks of a full batch, no errors, read in C
                    self._acked(list(map(int, seqs)), batch)
                    buf = b""
                else:
                    frames, buf = parse_frames(buf)
                    if frames:
                        await self._handle(stream, frames)
            data = await stream.receive_some(_RECEIVE_BYTES)
            if not data:
                raise ConnectionError("WebSocket closed by the server (no close frame)")
            buf = buf + data if buf else data

    async def _handle(self, stream: trio.abc.Stream | RawSocketStream, frames: list[tuple[int, bytes]]) -> None:
        """The frames of one read: acks recorded together, commands answered."""
        stats, inflight = self.stats, self.inflight
        dues: list[tuple[float, int]] = []
        answers = []
        for opcode, payload in frames:
            if opcode == OP_TEXT or opcode == OP_BINARY:
                try:
                    m = _decode_json(payload) if opcode == OP_TEXT else _decode_msgpack(payload)
                except msgspec.DecodeError:
                    stats.errors += 1       # not an ack nor a command: the server broke the protocol
                    continue
                if m.ack is not None:
                    due = inflight.pop(m.ack, None)
                    if due is None:
                        continue
                    if m.accepted:
                        dues.append((due, m.accepted))
                    if m.rejected:
                        stats.rejected += m.rejected
                        stats.errors += m.rejected
                    elif m.accepted != self.opts.batch:
                        stats.errors += 1   # an ack that accounts for fewer readings than were sent
                elif m.command is not None:
                    ack = {"command_ack": m.command.id}
                    answers.append(client_frame(OP_BINARY, msgspec.msgpack.encode(ack)) if self.binary
                                   else client_frame(OP_TEXT, msgspec.json.encode(ack)))
                    stats.commands += 1
            elif opcode == OP_PING:
                answers.append(client_frame(OP_PONG, payload))
            elif opcode == OP_PONG:
                if self._pong is not None:
                    self._pong.set()
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                raise ConnectionError(f"WebSocket closed by the server: {code} {payload[2:].decode(errors='replace')}")
        if dues:
            self._record(dues, trio.current_time())
        if answers:
            await self._send(stream, b"".join(answers))

    def _acked(self, seqs: list[int], batch: int) -> None:
        """The acks of a read of nothing but acks that each accept ``batch`` readings."""
        dues = [due for due in map(self.inflight.pop, seqs, _NONES) if due is not None]
        if not dues:
            return
        now, stats = trio.current_time(), self.stats
        first = dues[0]
        # closed loop: a window sent at once shares one intended time
        groups = ((first, len(dues)),) if dues.count(first) == len(dues) else Counter(dues).items()
        for due, count in groups:
            stats.histogram.record_value(min(max(int((now - due) * 1e6), 1), 60_000_000), count * batch)
        stats.acked += len(dues) * batch
        self.ack_event.set()

    def _record(self, dues: list[tuple[float, int]], now: float) -> None:
        """Count the acked readings; each distinct intended time's latency is
        recorded once with its count (a window sent together shares one)."""
        stats = self.stats
        groups: Counter[float] = Counter()
        for due, accepted in dues:
            groups[due] += accepted
        acked = 0
        for due, count in groups.items():
            acked += count
            stats.histogram.record_value(min(max(int((now - due) * 1e6), 1), 60_000_000), count)
        stats.acked += acked
        self.ack_event.set()

    async def pinger(self, stream: trio.abc.Stream | RawSocketStream) -> None:
        """A WebSocket ping whenever nothing was sent for keepalive/2 seconds;
        no pong in time means the connection is dead."""
        interval = max(self.opts.keepalive / 2, 0.5)
        while True:
            await trio.sleep(interval)
            if trio.current_time() - self.last_send >= interval:
                self._pong = trio.Event()
                await self._send(stream, client_frame(OP_PING, b""))
                with trio.move_on_after(max(interval, 10.0)) as wait:
                    await self._pong.wait()
                if wait.cancelled_caught:
                    raise ConnectionError("no pong to a WebSocket ping")
                self.last_send = trio.current_time()
