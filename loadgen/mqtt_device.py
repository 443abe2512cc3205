"""One simulated MQTT device: its own connection, publishing readings.

Frames are built once per device with gridgate's own encoder (only the
2-byte packet id changes between PUBLISH packets), every window of readings
goes out in one write, a read of nothing but PUBACKs is parsed in one
C-level pass (``array``) and its latencies recorded once per intended send
time, and a TCP connection's socket is driven directly (``RawSocketStream``):
the load generator must not be slower than what it measures.
"""
from __future__ import annotations

import itertools
import socket
import struct
import sys
from array import array
from collections import Counter

import msgspec
import trio

from gridgate.protocols.mqtt import v5
from gridgate.protocols.mqtt.codec import codec
from gridgate.protocols.mqtt.codec5 import codec5
from loadgen.device import READING, Device, DeviceOptions
from loadgen.stats import Stats
from loadgen.tls import TlsSocketStream, client_context

__all__ = ["MqttDevice", "RawSocketStream", "build_connect"]

_PUBACK_FIRST, _PUBACK_SECOND = b"\x40", b"\x02"     # a PUBACK: 0x40, remaining length 2, packet id
_NONES = itertools.repeat(None)


def _ack_ids(pubacks: bytes) -> array:
    """The packet ids of a run of whole PUBACKs (4 bytes each: 0x40 0x02 and a big-endian id)."""
    words = array("H", pubacks)
    if sys.byteorder == "little":
        words.byteswap()
    return words[1::2]


def build_connect(client_id: str, keepalive: int, version: int = 4, problem_info: bool = True) -> bytes:
    """CONNECT with Clean Session/Start; MQTT 5 (``version`` 5) with a property
    block holding Request Problem Information 0 when ``problem_info`` is off."""
    cid = client_id.encode()
    props = b""
    if version == 5:
        block = b"" if problem_info else b"\x17\x00"
        props = bytes([len(block)]) + block
    body = (b"\x00\x04MQTT" + bytes([version]) + b"\x02" + struct.pack("!H", keepalive) + props
            + struct.pack("!H", len(cid)) + cid)
    return b"\x10" + bytes([len(body)]) + body


def _payload(batch: int, fmt: str) -> bytes:
    obj = READING if batch == 1 else [READING] * batch
    return msgspec.msgpack.encode(obj) if fmt == "msgpack" else msgspec.json.encode(obj)


async def _read_connack(stream: trio.abc.Stream | RawSocketStream | TlsSocketStream) -> bytes:
    """One whole CONNACK, as its first four bytes in 3.1.1's shape (type, 2,
    flags, return or reason code): 5.0's carries properties after them. The
    server sends nothing else before the device's first PUBLISH, so reading
    past the CONNACK takes nothing that matters."""
    data = b""
    while True:
        if len(data) >= 2:
            try:
                length, body = v5.decode_vbi(data, 1, len(data))
            except v5.MQTT5Error as exc:
                raise ConnectionError(f"malformed CONNACK: {exc}") from None
            if length >= 0 and len(data) >= body + length:
                # fixed header byte, then flags and code at the body's start
                return data[:1] + bytes([2]) + data[body:body + 2]
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ConnectionError("closed before CONNACK")
        data += chunk
        if len(data) > 65536:
            raise ConnectionError("CONNACK too long")


class RawSocketStream:
    """The socket of a connected ``trio.SocketStream``, driven directly: a
    write is one ``send`` (waiting for the socket only when the kernel's
    buffer is full), a read waits for the socket to be readable and takes
    what is there with one ``recv``. The same bytes on the wire as
    ``SocketStream``, without its per-call layers (conflict detector, error
    translation, the socket wrapper's checkpoints), which cost more CPU than
    a window of PUBLISHes. Like ``SocketStream``, two tasks sending at once is
    an error (``trio.BusyResourceError``), never interleaved bytes."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._sending = False

    @classmethod
    def take(cls, stream: trio.SocketStream) -> RawSocketStream:
        """Take over ``stream``'s socket (``stream`` is left detached and unusable)."""
        return cls(socket.socket(fileno=stream.socket.detach()))

    async def send_all(self, data: bytes) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            sock, view, sent = self.socket, memoryview(data), 0
            while sent < len(view):
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.socket)
            try:
                return self.socket.recv(max_bytes)
            except BlockingIOError:
                continue

    async def aclose(self) -> None:
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


class MqttDevice(Device):
    """Publishes ``--batch`` readings per PUBLISH at ``--qos``, up to ``--inflight`` unacknowledged."""

    goodbye = b"\xe0\x00"  # DISCONNECT

    def __init__(self, index: int, opts: DeviceOptions, stats: Stats, local_address: str | None) -> None:
        super().__init__(index, opts, stats, local_address)
        payload = _payload(opts.batch, opts.payload)
        topic = f"devices/{self.client_id}/telemetry"
        encode = codec5.encode_publish if opts.mqtt_version == 5 else codec.encode_publish
        if opts.qos:
            template = encode(topic, payload, opts.qos, 1)
            # the packet id comes before 5.0's property block (empty here: one zero byte)
            cut = len(template) - len(payload) - (1 if opts.mqtt_version == 5 else 0) - 2
            self.head, self.tail = template[:cut], template[cut + 2:]
        else:
            self.frame0 = encode(topic, payload, 0)
        self.windowed = bool(opts.qos)
        self.connect_frame = build_connect(self.client_id, opts.keepalive, opts.mqtt_version, opts.problem_info)
        self.next_pid = 1
        self.inflight: dict[int, float] = {}        # packet id -> intended send time
        self._buf = b""                             # the start of a packet a read left incomplete

    # -- one connection --------------------------------------------------------

    async def connect(self) -> trio.abc.Stream | RawSocketStream | TlsSocketStream:
        self._buf = b""
        with trio.fail_after(self.opts.connect_timeout):
            stream = await self.open_stream(self.opts.host, self.opts.port, local_address=self.local_address)
            if self.opts.tls:
                context = client_context(self.opts.cafile)
                if isinstance(stream, trio.SocketStream):
                    stream = await TlsSocketStream.handshake(stream, context, self.opts.host)
                else:           # a test's in-memory stream: trio's own TLS over it
                    stream = trio.SSLStream(stream, context, server_hostname=self.opts.host)
            elif isinstance(stream, trio.SocketStream):
                stream = RawSocketStream.take(stream)
            try:
                await stream.send_all(self.connect_frame)
                connack = await _read_connack(stream)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        code = connack[3]             # _read_connack: type, 2, flags, code, in 3.1.1 and 5.0 alike
        if connack[0] != 0x20 or code != 0:
            await trio.aclose_forcefully(stream)
            raise ConnectionError(f"CONNACK refused, {'reason' if self.opts.mqtt_version == 5 else 'return'} code "
                                  f"{code:#04x}")
        return stream

    async def reader(self, stream: trio.abc.Stream | RawSocketStream | TlsSocketStream) -> None:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.take_acks(data, trio.current_time())

    def take_acks(self, data: bytes, now: float) -> None:
        """Count the PUBACKs among ``data`` (and what an earlier read left
        over), recording each one's latency as of ``now``."""
        buf = self._buf + data if self._buf else data
        n = len(buf) >> 2
        if n and buf[0::4] == _PUBACK_FIRST * n and buf[1::4] == _PUBACK_SECOND * n:
            # the usual read: nothing but whole PUBACKs (the rest, if any,
            # is the start of one more), parsed in one C-level pass
            dues = list(map(self.inflight.pop, _ack_ids(buf[:n << 2]), _NONES))
            self._buf = buf[n << 2:]
        else:
            dues, self._buf = self._acks_one_by_one(buf)
        if dues:
            self._record(dues, now)

    def _acks_one_by_one(self, buf: bytes) -> tuple[list[float | None], bytes]:
        """The intended times of the PUBACKs among the whole packets at the
        start of ``buf`` (other packets are skipped), and the rest of ``buf``."""
        dues: list[float | None] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first = buf[pos]
            # remaining length varint
            length, mult, i = 0, 1, pos + 1
            while i < end:
                byte = buf[i]
                length += (byte & 0x7F) * mult
                i += 1
                if not byte & 0x80:
                    break
                mult *= 128
            else:
                break
            if i + length > end:
                break
            if first == 0x40 and length >= 2:
                due = self.inflight.pop((buf[i] << 8) | buf[i + 1], None)
                if length >= 3 and buf[i + 2] >= 0x80:
                    # MQTT 5: the reading was refused (0x99 invalid, 0x97 quota, ...): not acked
                    self._refused(buf[i + 2], buf[i + 3:i + length])
                else:
                    dues.append(due)
            pos = i + length
        return dues, buf[pos:]

    def _refused(self, code: int, rest: bytes) -> None:
        """A reading an MQTT 5 PUBACK refused; ``rest``: what follows its reason code."""
        stats = self.stats
        reason = ""
        if rest:
            try:
                reason = v5.decode_properties(rest, 0, len(rest), v5.PUBACK)[0].reason_string or ""
            except v5.MQTT5Error:
                reason = "(malformed properties)"
        key = f"{code:#04x}" + (f" {reason}" if reason else "")
        stats.refusals[key] = stats.refusals.get(key, 0) + self.opts.batch
        stats.rejected += self.opts.batch
        stats.errors += 1
        self.ack_event.set()          # its slot in the window is free

    def _record(self, dues: list[float | None], now: float) -> None:
        """Count the acked readings and record each one's latency from its
        intended send time; readings sent together share an intended time, so
        each distinct time is recorded once with its count (the same histogram
        as one record per reading). ``None``: an ack of nothing in flight."""
        stats, batch = self.stats, self.opts.batch
        first = dues[0]
        # closed loop: a window sent at once shares one intended time
        groups = ((first, len(dues)),) if dues.count(first) == len(dues) else Counter(dues).items()
        acked = 0
        for due, count in groups:
            if due is not None:
                acked += count
                stats.histogram.record_value(min(max(int((now - due) * 1e6), 1), 60_000_000), count * batch)
        if acked:
            stats.acked += acked * batch
            self.ack_event.set()

    def _frames(self, dues: list[float]) -> bytes:
        if not self.opts.qos:
            return self.frame0 * len(dues)
        parts = []
        head, tail, inflight = self.head, self.tail, self.inflight
        for due in dues:
            pid = self.next_pid
            while pid in inflight:
                pid = pid % 65535 + 1
            self.next_pid = pid % 65535 + 1
            inflight[pid] = due
            parts.append(head)
            parts.append(pid.to_bytes(2, "big"))
            parts.append(tail)
        return b"".join(parts)

    async def pinger(self, stream: trio.abc.Stream | RawSocketStream | TlsSocketStream) -> None:
        interval = max(self.opts.keepalive / 2, 0.5)
        while True:
            await trio.sleep(interval)
            if trio.current_time() - self.last_send >= interval:
                await stream.send_all(b"\xc0\x00")
                self.last_send = trio.current_time()
