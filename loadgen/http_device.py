"""One simulated device posting readings over HTTP/1.1 keep-alive.

Requests are built once per device and pipelined up to ``--inflight``;
responses come back in order, so a FIFO of intended send times is all the
bookkeeping latency needs. A non-2xx answer counts as an error.
"""
from __future__ import annotations

from collections import deque

import msgspec
import trio

from loadgen.device import READING, Device, DeviceOptions
from loadgen.stats import Stats

__all__ = ["HttpDevice"]

_CONTENT_TYPES = {"json": b"application/json", "msgpack": b"application/msgpack"}


class HttpDevice(Device):
    """Posts ``--batch`` readings per request, up to ``--inflight`` pipelined."""

    def __init__(self, index: int, opts: DeviceOptions, stats: Stats, local_address: str | None) -> None:
        super().__init__(index, opts, stats, local_address)
        reading = {"device_id": self.client_id, **READING}
        obj = reading if opts.batch == 1 else [reading] * opts.batch
        body = msgspec.msgpack.encode(obj) if opts.payload == "msgpack" else msgspec.json.encode(obj)
        self.request = (b"POST /v1/telemetry HTTP/1.1\r\nHost: " + opts.host.encode() + b"\r\nContent-Type: "
                        + _CONTENT_TYPES[opts.payload] + b"\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body)
        self.inflight: deque[float] = deque()      # intended times, in request order

    def owed(self) -> list[float]:
        return list(self.inflight)

    async def connect(self) -> trio.abc.Stream:
        with trio.fail_after(self.opts.connect_timeout):
            return await self.open_stream(self.opts.host, self.opts.port, local_address=self.local_address)

    def _frames(self, dues: list[float]) -> bytes:
        self.inflight.extend(dues)
        return self.request * len(dues)

    async def pinger(self, stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()   # HTTP has no keepalive packets; the server's reaper allows 300 s

    async def reader(self, stream: trio.abc.Stream) -> None:
        buf = b""
        stats, batch = self.stats, self.opts.batch
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            buf += data
            now = trio.current_time()
            answered = False
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                length = 0
                for line in buf[:head_end].lower().split(b"\r\n")[1:]:
                    if line.startswith(b"content-length:"):
                        length = int(line[15:])
                        break
                if len(buf) < head_end + 4 + length:
                    break
                status = int(buf[9:12])
                buf = buf[head_end + 4 + length:]
                if 100 <= status < 200:
                    continue
                due = self.inflight.popleft()
                if 200 <= status < 300:
                    stats.acked += batch
                    stats.histogram.record_value(min(max(int((now - due) * 1e6), 1), 60_000_000), batch)
                else:
                    stats.errors += 1
                answered = True
            if answered:
                self.ack_event.set()
