"""One simulated MQTT device: its own connection, publishing readings.

Frames are built once per device with gridgate's own encoder (only the
2-byte packet id changes between PUBLISH packets), acks are parsed straight
from the socket buffer, and every window of readings goes out in one
``send_all``: the load generator must not be slower than what it measures.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import msgspec
import trio

from gridgate.protocols.mqtt.codec import codec
from loadgen.schedule import Schedule
from loadgen.stats import Stats

__all__ = ["DeviceOptions", "run_device", "build_connect"]

OFFLINE_BUFFER = 500          # readings a device keeps while disconnected (the seed's edge cache)


@dataclass(frozen=True)
class DeviceOptions:
    host: str
    port: int
    qos: int = 1
    inflight: int = 10
    batch: int = 1
    rate_per_device: float = 0.0          # readings/s; 0 = closed loop
    payload: str = "json"
    idle: bool = False
    keepalive: int = 60
    client_prefix: str = "loadgen"
    connect_timeout: float = 10.0
    drain_timeout: float = 10.0
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    protocol: str = "mqtt"                # "mqtt", "http" or "ws"


def build_connect(client_id: str, keepalive: int) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", keepalive) + struct.pack("!H", len(cid)) + cid
    return b"\x10" + bytes([len(body)]) + body


def _payload(device_id: str, batch: int, fmt: str) -> bytes:
    reading = {"temperature": 21.5, "battery_mv": 3700, "humidity": 40.0, "location": "loadgen/site-a"}
    obj = reading if batch == 1 else [reading] * batch
    return msgspec.msgpack.encode(obj) if fmt == "msgpack" else msgspec.json.encode(obj)


class _Device:
    def __init__(self, index: int, opts: DeviceOptions, stats: Stats, local_address: str | None) -> None:
        self._identity(index, opts, stats, local_address)
        payload = _payload(self.client_id, opts.batch, opts.payload)
        topic = f"devices/{self.client_id}/telemetry"
        if opts.qos:
            template = codec.encode_publish(topic, payload, opts.qos, 1)
            cut = len(template) - len(payload) - 2
            self.head, self.tail = template[:cut], template[cut + 2:]
        else:
            self.frame0 = codec.encode_publish(topic, payload, 0)
        self.connect_frame = build_connect(self.client_id, opts.keepalive)
        self.next_pid = 1
        self.inflight: dict[int, float] = {}        # packet id -> intended send time
        self.replay: list[float] = []               # intended times of readings owed after a drop
        self.ack_event = trio.Event()
        self.last_send = 0.0

    # The interface run_device drives (HttpDevice and WsDevice implement it too):
    # connect() -> stream; reader/pinger/sender(stream) run together; drain();
    # say_goodbye(stream) after a clean end; close(stream) always; owed(),
    # inflight and replay for what a dropped connection owes. ``background``
    # is a nursery that lives as long as the device, for connections that
    # need helper tasks of their own (the WebSocket client's reader).
    background: trio.Nursery | None = None

    def _identity(self, index: int, opts: DeviceOptions, stats: Stats, local_address: str | None) -> None:
        """What every kind of device starts from (HttpDevice and WsDevice too)."""
        self.opts = opts
        self.stats = stats
        self.local_address = local_address
        self.client_id = f"{opts.client_prefix}-{index:06d}"

    # -- one connection --------------------------------------------------------

    async def connect(self) -> trio.SocketStream:
        with trio.fail_after(self.opts.connect_timeout):
            stream = await trio.open_tcp_stream(self.opts.host, self.opts.port, local_address=self.local_address)
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

    async def reader(self, stream: trio.SocketStream) -> None:
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

    async def sender(self, stream: trio.SocketStream, schedule: Schedule | None, deadline: float) -> None:
        opts, stats = self.opts, self.stats
        window = opts.inflight
        while True:
            now = trio.current_time()
            if now >= deadline:
                return
            free = window - len(self.inflight) if opts.qos else window
            if free <= 0:
                self.ack_event = trio.Event()
                with trio.move_on_at(deadline):
                    await self.ack_event.wait()
                continue
            dues: list[float] = []
            if self.replay:
                dues, self.replay = self.replay[:free], self.replay[free:]
                stats.replayed += len(dues) * opts.batch
            if schedule is None:  # closed loop: as fast as the window allows
                dues.extend([now] * (free - len(dues)))
            else:
                while len(dues) < free and schedule.next_due() <= now:
                    due = schedule.advance()
                    if now - due > 0.01:
                        stats.behind += opts.batch
                    dues.append(due)
                if not dues:
                    with trio.move_on_at(min(schedule.next_due(), deadline)):
                        await trio.sleep_forever()
                    continue
            await self.send(stream, dues)
            self.last_send = now
            if not opts.qos:
                await trio.lowlevel.checkpoint()

    async def send(self, stream: trio.SocketStream, dues: list[float]) -> None:
        """Send one message per intended time in ``dues`` (all in one write)
        and count them in ``stats.sent``.

        Counted before the write: ``_frames`` has put them in flight, so if
        the write fails they are owed (``unacked_at_drop``) and resent, and
        acked == sent - unacked_at_drop holds exactly."""
        frames = self._frames(dues)
        self.stats.sent += len(dues) * self.opts.batch
        await stream.send_all(frames)

    async def pinger(self, stream: trio.SocketStream) -> None:
        interval = max(self.opts.keepalive / 2, 0.5)
        while True:
            await trio.sleep(interval)
            if trio.current_time() - self.last_send >= interval:
                await stream.send_all(b"\xc0\x00")
                self.last_send = trio.current_time()

    def owed(self) -> list[float]:
        """Intended times of what was sent and not acknowledged."""
        return list(self.inflight.values())

    goodbye = b"\xe0\x00"  # DISCONNECT

    async def say_goodbye(self, stream: trio.SocketStream) -> None:
        """End a connection cleanly (the caller bounds the time)."""
        if self.goodbye:
            await stream.send_all(self.goodbye)

    async def close(self, stream: trio.SocketStream) -> None:
        await trio.aclose_forcefully(stream)

    async def drain(self) -> None:
        """Wait (bounded) for the acks still owed at the end of the run."""
        with trio.move_on_after(self.opts.drain_timeout):
            while self.inflight:
                self.ack_event = trio.Event()
                await self.ack_event.wait()


async def run_device(index: int, opts: DeviceOptions, stats: Stats, start: float, deadline: float,
                     local_address: str | None = None, rng: random.Random | None = None) -> None:
    """Run one device until ``deadline``: connect (with backoff), publish, and
    after a drop reconnect and replay what it buffered."""
    rng = rng or random.Random(index)
    if opts.protocol == "http":
        from loadgen.http_device import HttpDevice
        dev: _Device = HttpDevice(index, opts, stats, local_address)
    elif opts.protocol == "ws":
        from loadgen.ws_device import WsDevice
        dev = WsDevice(index, opts, stats, local_address)
    else:
        dev = _Device(index, opts, stats, local_address)
    async with trio.open_nursery() as background:
        dev.background = background
        await _run_connections(dev, opts, stats, start, deadline, rng)
        background.cancel_scope.cancel()


async def _run_connections(dev: _Device, opts: DeviceOptions, stats: Stats, start: float, deadline: float,
                           rng: random.Random) -> None:
    schedule = None
    if opts.rate_per_device > 0 and not opts.idle:
        # spread devices over the first period so they do not all fire at once
        schedule = Schedule(start, opts.rate_per_device / opts.batch, offset=rng.random() * opts.batch / opts.rate_per_device)
    attempt = 0
    was_connected = False
    while trio.current_time() < deadline:
        try:
            stream = await dev.connect()
        except (OSError, ConnectionError, trio.TooSlowError):
            stats.errors += 1
            delay = min(opts.backoff_max, opts.backoff_base * 2 ** attempt) * rng.uniform(0.5, 1.5)
            attempt += 1
            await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))
            continue
        attempt = 0
        stats.connects += 1
        stats.connected += 1
        stats.peak_connected = max(stats.peak_connected, stats.connected)
        if was_connected:
            stats.reconnects += 1
        was_connected = True
        if schedule is not None:
            _buffer_missed(dev, schedule, stats)
        clean = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dev.reader, stream)
                nursery.start_soon(dev.pinger, stream)
                if opts.idle:
                    await trio.sleep_until(deadline)
                else:
                    await dev.sender(stream, schedule, deadline)
                    await dev.drain()
                nursery.cancel_scope.cancel()
            clean = True
            with trio.move_on_after(2):
                await dev.say_goodbye(stream)
        except* (OSError, ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
            if not clean:
                stats.errors += 1
        finally:
            stats.connected -= 1
            await dev.close(stream)
        if clean:
            return
        # dropped: what was in flight is owed again (a real device resends QoS 1)
        stats.unacked_at_drop += len(dev.inflight) * opts.batch
        dev.replay = sorted(dev.replay + dev.owed())[-OFFLINE_BUFFER:]
        dev.inflight.clear()
        delay = min(opts.backoff_max, opts.backoff_base) * rng.uniform(0.5, 1.5)
        await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))


def _buffer_missed(dev: _Device, schedule: Schedule, stats: Stats) -> None:
    """Readings that fell due while disconnected go to the offline buffer
    (at most OFFLINE_BUFFER; older ones are dropped, as on a real device)."""
    now = trio.current_time()
    missed = []
    while schedule.next_due() <= now:
        missed.append(schedule.advance())
    owed = dev.replay + missed
    if len(owed) > OFFLINE_BUFFER:
        stats.dropped += (len(owed) - OFFLINE_BUFFER) * dev.opts.batch
        owed = owed[-OFFLINE_BUFFER:]
    dev.replay = owed
