"""MQTT over WebSocket load for ``python -m bench ws``: DEVICES connections
to ``/mqtt`` (subprotocol ``mqtt``), each a CONNECT and then QoS 1
PUBLISHes of one reading, one binary message per PUBLISH (as paho and
browsers' MQTT clients send them), up to --inflight unacknowledged, for
--duration seconds; every window in one write. Prints one JSON line:
``{"acked", "sent", "errors", "cpu_s"}`` (its own user + sys CPU over the
run). gridgate-loadgen has no MQTT-over-WebSocket mode; this is the
smallest driver that gives the gateway's /mqtt path the same shape of load
as ``gridgate-loadgen mqtt``.

    python -m bench.mqtt_ws_driver --target HOST:PORT [--devices N] [--inflight W] [--duration S]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys

import msgspec
import trio

from gridgate.protocols.mqtt.codec import codec
from loadgen.device import READING
from loadgen.mqtt_device import RawSocketStream, build_connect
from loadgen.ws_device import OP_BINARY, client_frame, handshake, parse_frames

CONNECT_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 10.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Totals:
    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.errors = 0


async def device(index: int, host: str, port: int, inflight: int, deadline: float, totals: Totals) -> None:
    client_id = f"mqttws-{index:06d}"
    payload = msgspec.json.encode(READING)
    template = codec.encode_publish(f"devices/{client_id}/telemetry", payload, 1, 1)
    cut = len(template) - len(payload) - 2
    head, tail = template[:cut], template[cut + 2:]
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = RawSocketStream.take(await trio.open_tcp_stream(host, port))
            buf = await handshake(stream, f"{host}:{port}", "/mqtt", subprotocol="mqtt")
            await stream.send_all(client_frame(OP_BINARY, build_connect(client_id, 60)))
            mqtt = b""
            while len(mqtt) < 4:
                frames, buf = parse_frames(buf)
                mqtt += b"".join(p for _, p in frames)
                if len(mqtt) < 4:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise ConnectionError("closed before CONNACK")
                    buf += chunk
            if mqtt[:4] != b"\x20\x02\x00\x00":
                raise ConnectionError(f"CONNACK refused: {mqtt[:4]!r}")
    except (OSError, ConnectionError, trio.TooSlowError):
        totals.errors += 1
        return
    pending: set[int] = set()
    next_pid = 1
    rest = mqtt[4:]
    try:
        while trio.current_time() < deadline or pending:
            if trio.current_time() < deadline and len(pending) < inflight:
                window = inflight - len(pending)
                parts: list[bytes] = []
                for _ in range(window):
                    pending.add(next_pid)
                    # each frame masked with its own key (RFC 6455 5.3), so no header is reused
                    parts.append(client_frame(OP_BINARY, head + next_pid.to_bytes(2, "big") + tail))
                    next_pid = next_pid % 65535 + 1
                totals.sent += window
                await stream.send_all(b"".join(parts))
            with trio.move_on_at(max(deadline, trio.current_time()) + DRAIN_TIMEOUT_S) as drain:
                chunk = await stream.receive_some(65536)
            if drain.cancelled_caught:
                totals.errors += len(pending)
                return
            if not chunk:
                raise ConnectionError("server closed the connection")
            frames, buf = parse_frames(buf + chunk if buf else chunk)
            rest += b"".join(p for _, p in frames)
            n = len(rest) >> 2
            for i in range(n):                 # PUBACKs: 0x40 0x02 and the packet id
                pid = (rest[4 * i + 2] << 8) | rest[4 * i + 3]
                if rest[4 * i] == 0x40 and pid in pending:
                    pending.discard(pid)
                    totals.acked += 1
            rest = rest[n << 2:]
    except (OSError, ConnectionError):
        totals.errors += 1
    finally:
        await trio.aclose_forcefully(stream)


async def run(host: str, port: int, devices: int, inflight: int, duration: float) -> dict[str, float]:
    totals = Totals()
    cpu0 = _cpu_s()
    deadline = trio.current_time() + duration
    async with trio.open_nursery() as nursery:
        for i in range(devices):
            nursery.start_soon(device, i, host, port, inflight, deadline, totals)
    return {"sent": totals.sent, "acked": totals.acked, "errors": totals.errors, "cpu_s": _cpu_s() - cpu0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mqtt_ws_driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--inflight", type=int, default=10)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    print(json.dumps(trio.run(run, host, int(port), args.devices, args.inflight, args.duration)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
