"""One simulated MQTT device: its own connection, publishing readings.

Frames are built once per device with gridgate's own encoder (only the
2-byte packet id changes between PUBLISH packets), acks are parsed straight
from the socket buffer, and every window of readings goes out in one
``send_all``: the load generator must not be slower than what it measures.
"""
from __future__ import annotations

import struct

import msgspec
import trio

from gridgate.protocols.mqtt.codec import codec
from loadgen.device import READING, Device, DeviceOptions
from loadgen.stats import Stats

__all__ = ["MqttDevice", "build_connect"]


def build_connect(client_id: str, keepalive: int) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", keepalive) + struct.pack("!H", len(cid)) + cid
    return b"\x10" + bytes([len(body)]) + body


def _payload(batch: int, fmt: str) -> bytes:
    obj = READING if batch == 1 else [READING] * batch
    return msgspec.msgpack.encode(obj) if fmt == "msgpack" else msgspec.json.encode(obj)


class MqttDevice(Device):
    """Publishes ``--batch`` readings per PUBLISH at ``--qos``, up to ``--inflight`` unacknowledged."""

    goodbye = b"\xe0\x00"  # DISCONNECT

    def __init__(self, index: int, opts: DeviceOptions, stats: Stats, local_address: str | None) -> None:
        super().__init__(index, opts, stats, local_address)
        payload = _payload(opts.batch, opts.payload)
        topic = f"devices/{self.client_id}/telemetry"
        if opts.qos:
            template = codec.encode_publish(topic, payload, opts.qos, 1)
            cut = len(template) - len(payload) - 2
            self.head, self.tail = template[:cut], template[cut + 2:]
        else:
            self.frame0 = codec.encode_publish(topic, payload, 0)
        self.windowed = bool(opts.qos)
        self.connect_frame = build_connect(self.client_id, opts.keepalive)
        self.next_pid = 1
        self.inflight: dict[int, float] = {}        # packet id -> intended send time

    # -- one connection --------------------------------------------------------

    async def connect(self) -> trio.abc.Stream:
        with trio.fail_after(self.opts.connect_timeout):
            stream = await self.open_stream(self.opts.host, self.opts.port, local_address=self.local_address)
            try:
                await stream.send_all(self.connect_frame)
                connack = b""
                while len(connack) < 4:
                    chunk = await stream.receive_some(4 - len(connack))
                    if not chunk:
                        raise ConnectionError("closed before CONNACK")
                    connack += chunk
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        if connack[0] != 0x20 or connack[3] != 0:
            await trio.aclose_forcefully(stream)
            raise ConnectionError(f"CONNACK refused, return code {connack[3]}")
        return stream

    async def reader(self, stream: trio.abc.Stream) -> None:
        buf = b""
        stats = self.stats
        batch = self.opts.batch
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            buf = buf + data if buf else data
            now = trio.current_time()
            pos, end = 0, len(buf)
            acked = False
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
                if first == 0x40 and length == 2:
                    pid = (buf[i] << 8) | buf[i + 1]
                    due = self.inflight.pop(pid, None)
                    if due is not None:
                        stats.acked += batch
                        stats.histogram.record_value(
                            min(max(int((now - due) * 1e6), 1), 60_000_000), batch)
                        acked = True
                pos = i + length
            buf = buf[pos:]
            if acked:
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

    async def pinger(self, stream: trio.abc.Stream) -> None:
        interval = max(self.opts.keepalive / 2, 0.5)
        while True:
            await trio.sleep(interval)
            if trio.current_time() - self.last_send >= interval:
                await stream.send_all(b"\xc0\x00")
                self.last_send = trio.current_time()
