"""One simulated device on the gateway's WebSocket channel ``/v1/ws``.

Each message is an envelope ``{"seq": n, "readings": [...K readings...]}``
(a text JSON message, or a binary MessagePack one), built once per device:
only ``n`` is spliced in per message. The gateway answers each envelope,
after durable and in order, with ``{"ack": n, "accepted", "rejected",
"errors"}``; up to ``--inflight`` envelopes are unacknowledged per device.
A downlink ``{"command": {"id", ...}}`` is answered with
``{"command_ack": id}`` and counted.

The WebSocket client is this module, on the device's own raw socket, the
way ``mqtt_device`` drives MQTT: the upgrade request and its 101 go
through wsproto's sans-IO handshake (status, ``Upgrade``, ``Connection``
and ``Sec-WebSocket-Accept`` checked there), then frames are written and
read on the socket directly: each window of frames in one write; a read
of error-free acks of the oldest envelopes in flight, in order (what the
gateway sends), compared whole with the bytes those acks must be (one
bytes format of their seqs); else, a read of nothing but
such acks in any order matched by one regular expression (C); anything
else parsed frame by frame; the acks of a read recorded together.
trio-websocket, used before, spent over 100 us of CPU per reading in its
reader task and message channel, and wsproto's per-message events would
cost more than the gateway spends on a reading: the load generator must
not be what it measures. By default the devices' sockets are served by
one task per process (``ws_mux``, ``mqtt_mux.Mux``); ``--no-mux`` gives
each device a reader and a sender task (``reader``, ``Device.sender``).

Every frame is masked with its own key from ``os.urandom`` (RFC 6455
5.3: fresh and unpredictable per frame, so that the bytes on the wire are
not chosen by whoever chose the payload). The keys come in bulk (one
``os.urandom`` call per 1,024 frames), and a window's frames are masked
in one call of gridgate's compiled ``ws_mask_frames`` (each frame's key
XORed over its zero key field and its payload, 8 bytes at a time; the
twin, ``gridgate.protocols.wsmask_py``, when the extension is not built).
Before, the window and its mask stream were XORed as two Python integers:
building the stream (a key repeated per frame) and the two big-integer
conversions cost about 0.75 us per reading, a quarter of the rest: a
window of 10 frames of 178 bytes 7.2 us then, 0.3 us now (thread CPU,
best of 9). Against one gateway on 2 shared cores, 4 alternating rounds
of 8 s, ``loadgen_cpu_us_per_reading_steady``: at load average 6-7,
5.1-5.8 against 6.0-6.3 us at 20 devices x 10 in flight, 4.3-4.8 against
5.0-5.8 at 100 x 10; on a quieter box (3x the readings per second),
3.9-4.7 against 4.8-5.7 at 20 x 10, 3.5-4.7 against 3.9-6.1 at 100 x 10
(0.4-1.4 us less in each pair).

Then a text window became one ``%`` format of its seqs (a format per seq
width and window size, up to ``_MAX_FORMATS_N`` frames, escaped), no more a
list of each seq's digits joined and kept for the acks' check; a read of
acks is checked against one format of the same kind; and on the mux the
acks' latencies go to its ``LatencyTally`` (``latencies``) instead of a
``record_value`` per read. A window of 10 frames 4.9 -> 3.9 us, a read of
its 10 acks taken 7.0 -> 5.1 us (best of 3 x 2,000, perf_counter). Against
one gateway, 20 devices x 10 in flight, 3 alternating rounds of 6 s (a CI
run on the same 2 cores, load average about 2): user + sys CPU per acked
reading 3.3-3.8 against 4.6-5.3 us (``_steady``), user 2.3-2.7 against
3.2-4.0, sys 1.05-1.15 against 1.35-1.4 (the kernel's send, recv and
epoll_wait: the floor, about a tenth of a read's syscalls per reading).
On the quiet box after that run, 4 alternating rounds: 3.5-3.8 against
3.9-4.2 us. What is left of a read of 10 acks (10 readings) is about 9 us
of this module's Python (the window 4, the read 5), 4 of the mux's per-read
calls (``_read``, ``_take``, ``_fill``, ``take_dues``, ``_write``), the
kernel's send and recv, and a sixth of a Trio wake-up.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import quote

import msgspec
import trio
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from gridgate.protocols.wsmask import wsmask
from loadgen.device import READING, Device, DeviceOptions
from loadgen.mqtt_device import RawSocketStream  # the one driver of a raw socket (see connect)
from loadgen.stats import Stats

if TYPE_CHECKING:
    from loadgen.mqtt_mux import LatencyTally

__all__ = ["WsDevice", "MaskKeys", "build_envelope", "client_frame", "handshake", "parse_frames"]

_RECEIVE_BYTES = 65536
_MAX_HEAD_BYTES = 16384              # of the server's handshake answer
_MAX_FRAME_BYTES = 1 << 20           # of one frame from the server
_MAX_FORMATS_N = 64                 # windows and reads of acks up to this many frames keep their format
_KEY_POOL_KEYS = 1024                # masking keys drawn from os.urandom per call
_ZERO_KEY = b"\x00\x00\x00\x00"     # the key field of an unmasked frame (masking XORs the key into it)
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


class MaskKeys:
    """Masking keys from ``os.urandom``, drawn in bulk: ``take(n)`` is ``4 n``
    bytes never handed out before, n keys. One per process (``KEYS``)."""

    __slots__ = ("_pool", "_pos")

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        need, pos = 4 * n, self._pos
        if pos + need > len(self._pool):
            self._pool, pos = os.urandom(4 * max(_KEY_POOL_KEYS, n)), 0
        self._pos = pos + need
        return self._pool[pos:pos + need]


KEYS = MaskKeys()


def _frame_head(opcode: int, n: int) -> bytes:
    """A final masked client frame's header for an ``n``-byte payload, up to
    (not including) its 4-byte masking key."""
    if n <= 125:
        return bytes((0x80 | opcode, 0x80 | n))
    if n <= 0xFFFF:
        return bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    return bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")


# ws_mask_frames(window, frame_bytes, key_at, keys): frame i of the window, from key_at (its zero key
# field) to its end, XOR keys[4 i:4 i + 4] repeated
_mask_frames = wsmask.ws_mask_frames


@functools.cache
def _layout(opcode: int, n: int) -> tuple[bytes, int, int]:
    """How a frame of an ``n``-byte payload is built and masked: its header
    up to the key with the zero key after it (the unmasked frame is that,
    then the payload), where its key field starts, and its length."""
    head = _frame_head(opcode, n)
    return head + _ZERO_KEY, len(head), len(head) + 4 + n


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with a fresh key."""
    pre, key_at, frame_bytes = _layout(opcode, len(payload))
    return _mask_frames(pre + payload, frame_bytes, key_at, KEYS.take(1))


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


async def handshake(stream: trio.abc.Stream | RawSocketStream, host_header: str, resource: str,
                    subprotocol: str | None = None) -> bytes:
    """The WebSocket upgrade on ``stream``, by wsproto's client handshake
    (ConnectionError if refused or wrong); returns the bytes that came after
    the 101's head (frames the server sent at once)."""
    hs = H11Handshake(ConnectionType.CLIENT)
    await stream.send_all(hs.send(Request(host=host_header, target=resource,
                                          subprotocols=[subprotocol] if subprotocol else [])))
    answer = b""
    while (end := answer.find(b"\r\n\r\n")) < 0:
        if len(answer) > _MAX_HEAD_BYTES:
            raise ConnectionError("WebSocket handshake failed: the answer's head is too long")
        chunk = await stream.receive_some(_RECEIVE_BYTES)
        if not chunk:
            raise ConnectionError("WebSocket handshake failed: closed before the answer")
        answer += chunk
    try:
        # the head only: what follows a 101 is frames, which are this module's
        hs.receive_data(answer[:end + 4])
    except RemoteProtocolError as exc:
        raise ConnectionError(f"WebSocket handshake failed: {exc}") from None
    for event in hs.events():
        if isinstance(event, AcceptConnection):
            return answer[end + 4:]
        if isinstance(event, RejectConnection):
            raise ConnectionError(f"WebSocket handshake refused: HTTP {event.status_code}")
    raise ConnectionError("WebSocket handshake failed: no answer in the head")


class WsDevice(Device):
    """Sends seq'd envelopes of ``--batch`` readings, up to ``--inflight`` unacknowledged."""

    # where acks' latencies are tallied when the mux runs this device (its
    # ``LatencyTally``, flushed to the histogram by the mux), else None
    latencies: LatencyTally | None = None

    def __init__(self, index: int, opts: DeviceOptions, stats: Stats, local_address: str | None) -> None:
        super().__init__(index, opts, stats, local_address)
        self.resource = "/v1/ws?device_id=" + quote(self.client_id, safe="")
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        self.host_header = f"{host}:{opts.port}"
        head, tail = build_envelope([READING] * opts.batch, opts.payload)
        self.binary = opts.payload == "msgpack"
        self.head, self.tail = head, tail
        # A frame's layout (its unmasked start up to the seq, where its key
        # field starts, its length) by the seq's width: the binary seq is
        # always 4 bytes, a text one's digits vary. Made on first use.
        self.opcode = OP_BINARY if self.binary else OP_TEXT
        self.layouts: dict[int, tuple[bytes, bytes, int, int]] = {}
        # a window of n text frames is one bytes format of its n seqs (the
        # ``%``s of the envelope escaped), masked in one call: by (width, n)
        self._windows: dict[tuple[int, int], tuple[bytes, int, int]] = {}
        self._width, self._width_start, self._width_end = 1, 1, 10   # text seqs in [start, end) have width digits
        self.next_seq = 1
        self.inflight: dict[int, float] = {}        # seq -> intended send time
        self._buf = b""                              # what the handshake or the last read left unparsed
        self._acks = _acks_pattern(opts.batch).findall
        # an ack frame's length less its seq's digits
        self._ack_fixed = len(b'\x81_{"ack":,"accepted":%d,"rejected":0,"errors":[]}' % opts.batch)
        self._ack_tail = b',"accepted":%d,"rejected":0,"errors":[]}' % opts.batch
        # k in-order acks of width-digit seqs as one bytes format of their seqs: by (width, k)
        self._ack_reads: dict[tuple[int, int], bytes] = {}
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

    def _layout(self, width: int) -> tuple[bytes, bytes, int, int]:
        """The layout of this device's frames whose seq is ``width`` bytes:
        the unmasked frame's start up to the seq, what joins one frame's seq
        to the next one's (the tail, then the next start), where a frame's
        key field starts and a frame's length (see ``_layout``)."""
        pre, key_at, frame_bytes = _layout(self.opcode, len(self.head) + width + len(self.tail))
        pre += self.head
        layout = self.layouts[width] = (pre, self.tail + pre, key_at, frame_bytes)
        return layout

    def _frames(self, dues: list[float]) -> bytes:
        seq, n = self.next_seq, len(dues)
        end = seq + n
        self.inflight.update(zip(range(seq, end), dues, strict=False))       # as long as each other
        self.next_seq = end
        keys = KEYS.take(n)
        if self.binary:
            pre, joint, key_at, frame_bytes = self.layouts.get(4) or self._layout(4)
            return _mask_frames(pre + joint.join([s.to_bytes(4, "big") for s in range(seq, end)]) + self.tail,
                                frame_bytes, key_at, keys)
        if seq < self._width_start or end > self._width_end:
            self._width_start = 10 ** (len(b"%d" % seq) - 1)
            self._width, self._width_end = len(b"%d" % seq), 10 * self._width_start
            if end > self._width_end:
                # the window crosses a power of ten: two frame lengths, one frame at a time
                return b"".join(self._frame(b"%d" % s, keys[4 * i:4 * i + 4]) for i, s in enumerate(range(seq, end)))
        fmt, key_at, frame_bytes = self._windows.get((self._width, n)) or self._window(self._width, n)
        # the window unmasked (its seqs' digits formatted in one go), masked in one call
        return _mask_frames(fmt % tuple(range(seq, end)), frame_bytes, key_at, keys)

    def _window(self, width: int, n: int) -> tuple[bytes, int, int]:
        """The format of a window of ``n`` text frames of ``width``-digit seqs,
        where a frame's key field starts and a frame's length. Kept for the
        window sizes up to ``_MAX_FORMATS_N`` (a window's is a window's bytes)."""
        pre, joint, key_at, frame_bytes = self.layouts.get(width) or self._layout(width)
        pre, joint, tail = (x.replace(b"%", b"%%") for x in (pre, joint, self.tail))
        made = (pre + joint.join([b"%d"] * n) + tail, key_at, frame_bytes)
        if n <= _MAX_FORMATS_N:
            self._windows[width, n] = made
        return made

    def _frame(self, digits: bytes, key: bytes) -> bytes:
        pre, _, key_at, frame_bytes = self.layouts.get(len(digits)) or self._layout(len(digits))
        return _mask_frames(pre + digits + self.tail, frame_bytes, key_at, key)

    async def send(self, stream: trio.abc.Stream | RawSocketStream, dues: list[float]) -> None:
        frames = self._frames(dues)
        self.stats.sent += len(dues) * self.opts.batch
        await self._send(stream, frames)

    async def reader(self, stream: trio.abc.Stream | RawSocketStream) -> None:
        if self._buf:
            answers = self.take_read(b"", trio.current_time())
            if answers:
                await self._send(stream, answers)
        while True:
            data = await stream.receive_some(_RECEIVE_BYTES)
            if not data:
                raise ConnectionError("WebSocket closed by the server (no close frame)")
            answers = self.take_read(data, trio.current_time())
            if answers:
                await self._send(stream, answers)

    def take_read(self, data: bytes, now: float) -> bytes:
        """One read from the server (after what the last one left): its acks
        counted and recorded as of ``now``; returns the frames it asks for
        (command acks, pongs), b"" when none. ConnectionError on a close frame."""
        buf = self._buf + data if self._buf else data
        if not buf:
            return b""
        inflight = self.inflight
        if inflight and not self.binary:
            # The usual read: error-free acks of the oldest envelopes in flight,
            # in order (the gateway acks in order), so the read can only be one
            # byte string, built (one format of their seqs) and compared whole:
            # no per-ack parsing. In flight are the seqs up to next_seq, the
            # oldest first (if one is missing, the comparison fails and the
            # read is parsed).
            owed = len(inflight)
            first = self.next_seq - owed
            width = len(b"%d" % first)
            k, rest = divmod(len(buf), self._ack_fixed + width)
            if not rest and k <= owed and len(b"%d" % (first + k - 1)) == width:
                fmt = self._ack_reads.get((width, k)) or self._ack_read(width, k)
                seqs = range(first, first + k)
                if buf == fmt % tuple(seqs):
                    self._buf = b""
                    dues = list(map(inflight.pop, seqs, _NONES))
                    due = dues[0]
                    if due is not None and dues.count(due) == k:
                        # closed loop: the acks of one window sent at once, one
                        # intended time; _acked and _latency in line (a Python
                        # call is a tenth of a read's Python time at one ack per read)
                        count = k * self.opts.batch
                        self.stats.acked += count
                        us = min(max(int((now - due) * 1e6), 1), 60_000_000)
                        if self.latencies is not None:
                            self.latencies.add(us, count)
                        else:
                            self.stats.histogram.record_value(us, count)
                        self.ack_event.set()
                    else:
                        self._count(dues, self.opts.batch, now)
                    return b""
        seqs = self._acks(buf)
        if seqs and len(seqs) * self._ack_fixed + sum(map(len, seqs)) == len(buf):
            # the usual read: nothing but whole JSON acks of a full batch, no errors, read in C
            self._buf = b""
            self._acked(list(map(int, seqs)), self.opts.batch, now)
            return b""
        frames, self._buf = parse_frames(buf)
        return self._take_frames(frames, now) if frames else b""

    def _ack_read(self, width: int, k: int) -> bytes:
        """The format of a read of ``k`` acks of ``width``-digit seqs (their
        seqs the arguments): each ack is its frame head, ``{"ack":``, the seq
        and the ack's tail. Kept for k up to ``_MAX_FORMATS_N``."""
        one = (b'\x81%c{"ack":' % (self._ack_fixed + width - 2)).replace(b"%", b"%%") + b"%d" + self._ack_tail
        fmt = one * k
        if k <= _MAX_FORMATS_N:
            self._ack_reads[width, k] = fmt
        return fmt

    def _take_frames(self, frames: list[tuple[int, bytes]], now: float) -> bytes:
        """The frames of one read: acks recorded together; returns the answers (commands, pings) owed."""
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
                self.got_pong()
            elif opcode == OP_CLOSE:
                if dues:            # popped from the window: acked, not owed again
                    self._record(dues, now)
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                raise ConnectionError(f"WebSocket closed by the server: {code} {payload[2:].decode(errors='replace')}")
        if dues:
            self._record(dues, now)
        return b"".join(answers)

    def got_pong(self) -> None:
        if self._pong is not None:
            self._pong.set()

    def _acked(self, seqs: Iterable[int], batch: int, now: float) -> None:
        """The acks of a read of nothing but acks that each accept ``batch`` readings."""
        self._count(list(map(self.inflight.pop, seqs, _NONES)), batch, now)

    def _count(self, dues: list[float | None], batch: int, now: float) -> None:
        """Count the acks whose intended times were ``dues`` (None: an ack of
        nothing in flight), ``batch`` readings each, and record their latencies."""
        if None in dues:            # an ack of nothing in flight (a duplicate): not counted
            dues = [due for due in dues if due is not None]
            if not dues:
                return
        first = dues[0]
        # closed loop: a window sent at once shares one intended time
        if dues.count(first) == len(dues):
            self._latency(now - first, len(dues) * batch)
        else:
            for due, count in Counter(dues).items():
                self._latency(now - due, count * batch)
        self.stats.acked += len(dues) * batch
        self.ack_event.set()

    def _latency(self, seconds: float, count: int) -> None:
        """``count`` readings acked ``seconds`` after their intended send time:
        into the mux's tally when the mux runs this device (``record_value``
        is Python, 2.8 us a call), else into the histogram."""
        us = min(max(int(seconds * 1e6), 1), 60_000_000)
        if self.latencies is not None:
            self.latencies.add(us, count)
        else:
            self.stats.histogram.record_value(us, count)

    def _record(self, dues: list[tuple[float, int]], now: float) -> None:
        """Count the acked readings; each distinct intended time's latency is
        recorded once with its count (a window sent together shares one)."""
        groups: Counter[float] = Counter()
        for due, accepted in dues:
            groups[due] += accepted
        acked = 0
        for due, count in groups.items():
            acked += count
            self._latency(now - due, count)
        self.stats.acked += acked
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
