"""Helpers for tests that run the gateway inside the test's own Trio run:
configs, custom sinks that record or hold back writes, and raw MQTT/HTTP
exchanges over in-memory streams."""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio
import trio.testing

import gridgate
from gridgate.config import Config, HTTPConfig, MQTTConfig, ServiceConfig, SpoolConfig, WebSocketConfig
from gridgate.ingest.records import Record
from mqtt_frames import gen_connack, gen_connect


def make_config(tmp_path, **sections) -> Config:
    return Config(
        service=ServiceConfig(environment="test", service_name="gg"),
        mqtt=sections.pop("mqtt", MQTTConfig(listen="")),
        http=sections.pop("http", HTTPConfig(listen="")),
        websocket=sections.pop("websocket", WebSocketConfig(listen="")),
        spool=sections.pop("spool", SpoolConfig(data_dir=str(tmp_path / "data"))),
        **sections,
    )


class MemorySink:
    """A custom sink (DESIGN section 7) that keeps what it is given."""

    def __init__(self) -> None:
        self.batches: list[list[Record]] = []
        self.closed = False

    async def write(self, batch: Sequence[Record]) -> None:
        self.batches.append(list(batch))

    async def aclose(self) -> None:
        self.closed = True


async def read_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {buf!r}")
        buf += chunk
    return buf


class Clock:
    """Deterministic ns for the take_publishes tests: a fixed start, then
    +`step` per call."""

    def __init__(self, start: int = 1_000, step: int = 0) -> None:
        self.now, self.step = start, step

    def __call__(self) -> int:
        now = self.now
        self.now += self.step
        return now


async def read_packet(stream: trio.abc.Stream) -> bytes:
    """One whole MQTT packet: fixed header, remaining length, body."""
    head = await read_exactly(stream, 1)
    length, shift = 0, 0
    while True:
        byte = await read_exactly(stream, 1)
        head += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    return head + await read_exactly(stream, length)


async def wait_closed(stream: trio.abc.Stream) -> None:
    """Return when the server closed its end."""
    while await stream.receive_some(1024):
        pass


@asynccontextmanager
async def serving(config: Config, sink=None, timeout: float = 20) -> AsyncIterator[tuple]:
    """A gateway, and a nursery for its connection handlers; graceful stop at the end."""
    with trio.fail_after(timeout):
        async with trio.open_nursery() as gateway_nursery:
            gateway = await gateway_nursery.start(gridgate.serve, config, sink)
            async with trio.open_nursery() as nursery:
                yield gateway, nursery
            gateway.stop()


async def connect_memory(gateway, nursery, client_id: str, keepalive: int = 0):
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    await client.send_all(gen_connect(client_id, keepalive=keepalive))
    assert await read_exactly(client, 4) == gen_connack(0)
    return client


class GatedSink(MemorySink):
    """A sink whose writes wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.waiting = 0

    async def write(self, batch):
        self.waiting += 1
        await self.gate.wait()
        await super().write(batch)


READING = b'{"device_id": "meter-1", "temperature": 21.5}'


def post(body: bytes = READING, extra: bytes = b"") -> bytes:
    return (b"POST /v1/telemetry HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def read_response(stream: trio.abc.Stream, buf: bytearray) -> tuple[int, dict, bytes]:
    """One response off a keep-alive stream (``buf`` keeps what follows it)."""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(bytes(buf))
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower().decode(): v.strip().decode() for k, v in (ln.split(b":", 1) for ln in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(bytes(buf))
        rest += chunk
    buf[:] = rest[length:]
    return int(lines[0].split()[1]), headers, rest[:length]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out
