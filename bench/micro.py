"""Micro-benchmark: the compiled hot path against its pure-Python twin.

    python -m bench.micro [--quick] [--json FILE]

Prints ns per packet / per reading for each implementation and the ratio,
measured in one run on one machine (compare the ratios, not the absolute
numbers). Best of several repeats of a timed loop, the twin's and the compiled side's
repeats taken in turns (best_ns_pair); nothing here is asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import msgspec

from gridgate import _fastparse
from gridgate.ingest import validator_py as _payload_py
from gridgate.ingest.rules import PayloadRules
from gridgate.protocols import wsmask_py as _wsmask_py
from gridgate.protocols.mqtt import codec5_py as _mqtt5_py, codec_py as _mqtt_py, v5
from gridgate.protocols.mqtt.codec5 import compiled_codec5
from gridgate.protocols.mqtt.events import PUBACK

SAMPLE = {"device_id": "meter-0001", "timestamp_ms": 1732406400123, "temperature": 23.5,
          "temperature_unit": "C", "battery_mv": 3700, "location": "shanghai/factory-a",
          "tags": {"vendor": "huawei"}}


def _connect() -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x0ameter-0001"
    return b"\x10" + bytes([len(body)]) + body


def _connect5() -> bytes:
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x0ameter-0001"
    return b"\x10" + bytes([len(body)]) + body


def _publish5(mid: int, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH as an MQTT 5 meter sends it, built by hand (not with the
    code under test): the topic with its alias, then Payload Format Indicator,
    Message Expiry, Content Type, Response Topic, Correlation Data (the packet
    id) and a new W3C trace context per reading as two User Properties."""
    def s(raw: bytes) -> bytes:
        return len(raw).to_bytes(2, "big") + raw
    props = (b"\x01\x01" + b"\x02" + (3600).to_bytes(4, "big") + b"\x03" + s(b"application/json")
             + b"\x08" + s(b"devices/meter-0001/replies") + b"\x09" + s(mid.to_bytes(4, "big"))
             + b"\x23\x00\x01" + b"\x26" + s(b"traceparent")
             + s(b"00-4bf92f3577b34da6a3ce929d%06x-00f067aa0ba902b7-01" % mid)
             + b"\x26" + s(b"tracestate") + s(b"rojo=00f067aa0ba902b7"))
    assert 128 <= len(props) < 16384    # a two-byte Property Length
    body = (s(b"devices/meter-0001/telemetry") + mid.to_bytes(2, "big")
            + bytes([len(props) & 0x7F | 0x80, len(props) >> 7]) + props + payload)
    assert 128 <= len(body) < 16384     # a two-byte remaining length
    return bytes([0x32, len(body) & 0x7F | 0x80, len(body) >> 7]) + body


def _loops(fn: Callable[[], object], min_time: float) -> int:
    """How many calls of fn take at least `min_time` s (a power of two)."""
    loops = 1
    while True:
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        if time.perf_counter_ns() - t0 >= min_time * 1e9:
            return loops
        loops *= 2


def _timed(fn: Callable[[], object], loops: int, units: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(loops):
        fn()
    return (time.perf_counter_ns() - t0) / (loops * units)


def best_ns(fn: Callable[[], object], units: int, repeats: int, min_time: float) -> float:
    """Best ns per unit over `repeats` timed loops of at least `min_time` s."""
    loops = _loops(fn, min_time)
    return min(_timed(fn, loops, units) for _ in range(repeats))


def best_ns_pair(twin: Callable[[], object], compiled: Callable[[], object], units: int, repeats: int,
                 min_time: float) -> tuple[float, float]:
    """best_ns of both sides with their timed loops taken in turns (twin, compiled,
    twin, ...): on a machine shared with other work, a busy spell then slows
    both sides instead of one, so the ratio moves less than with one side's
    repeats all before the other's."""
    loops = (_loops(twin, min_time), _loops(compiled, min_time))
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((twin, compiled)):
            best[i] = min(best[i], _timed(fn, loops[i], units))
    return best[0], best[1]


def cases() -> list[tuple[str, int, Callable[[object], Callable[[], object]]]]:
    payload = msgspec.json.encode(SAMPLE)
    connect = _connect()

    def publish_chunk(qos: int) -> tuple[bytes, int]:
        one = []
        for mid in range(1, 100_000):
            topic = b"devices/meter-0001/telemetry"
            body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + payload
            one.append(bytes([0x30 | (qos << 1), len(body) & 0x7F | 0x80, len(body) >> 7]) + body)
            if sum(map(len, one)) > 65536 - 256:
                break
        return b"".join(one), len(one)

    chunk1, n1 = publish_chunk(1)
    chunk0, n0 = publish_chunk(0)
    five = []
    for mid in range(1, 100_000):
        five.append(_publish5(mid, payload))
        if sum(map(len, five)) > 65536 - 512:
            break
    chunk5, n5 = b"".join(five), len(five)
    connect5 = _connect5()

    def decode5(make_impl):
        codec = make_impl.MQTT5Codec

        def run():
            c = codec(topic_alias_maximum=16)
            c.feed(connect5)
            c.feed(chunk5)
        return run

    why = v5.Properties(reason_string="out_of_range: temperature")

    def decode(chunk: bytes):
        def make(impl):
            def run():
                codec = impl.MQTTCodec()
                codec.feed(connect)
                codec.feed(chunk)
            return run
        return make

    ids = list(range(1, 101))
    rules = PayloadRules()
    now = time.time_ns()
    sample_mp = msgspec.msgpack.encode(SAMPLE)
    batch = msgspec.json.encode([SAMPLE] * 100)

    def validate(raw: bytes, fmt: str):
        def make(impl):
            v = impl.Validator(rules)
            return lambda: v.validate(raw, fmt, "mqtt", None, now)
        return make

    # a client frame of a 200-byte payload (7-bit length, key, payload), cut as FrameDecoder.feed cuts it
    frame = b"\x81\xc8" + bytes.fromhex("37fa213d") + bytes(range(200))

    def unmask(impl):
        ws_unmask = impl.ws_unmask
        return lambda: ws_unmask(frame[6:206], frame[2:6])

    return [
        (f"MQTT decode PUBLISH QoS 1 ({len(payload)} B JSON, {n1} per 64 KiB read), per packet", n1, decode(chunk1)),
        (f"MQTT decode PUBLISH QoS 0 ({n0} per 64 KiB read), per packet", n0, decode(chunk0)),
        ("MQTT encode_acks of 100 PUBACKs, per ack", 100, lambda impl: (lambda: impl.encode_acks(PUBACK, ids))),
        (f"MQTT 5 decode PUBLISH QoS 1 with 8 properties ({len(five[0])} B, {n5} per 64 KiB read), per packet", n5,
         decode5),
        ("MQTT 5 encode PUBACK 0x99 with a Reason String", 1,
         lambda impl: (lambda: impl.encode_puback(7, 0x99, why, 1 << 20))),
        ("validate the DESIGN section 3 sample reading, JSON", 1, validate(payload, "json")),
        ("validate the sample reading, MessagePack", 1, validate(sample_mp, "msgpack")),
        ("validate a JSON batch of 100 readings, per reading", 100, validate(batch, "json")),
        ("WebSocket unmask a 200 B frame payload (the decoder's two slices)", 1, unmask),
    ]


def run(quick: bool = False) -> list[dict]:
    repeats, min_time = (3, 0.05) if quick else (7, 0.2)
    rows = []
    for name, units, make in cases():
        if name.startswith("MQTT 5"):
            twins: tuple[object, object] = (_mqtt5_py, compiled_codec5(_fastparse))
        elif name.startswith("WebSocket"):
            twins = (_wsmask_py, _fastparse)
        else:
            twins = (_mqtt_py if name.startswith("MQTT") else _payload_py, _fastparse)
        py_ns, c_ns = best_ns_pair(make(twins[0]), make(twins[1]), units, repeats, min_time)
        rows.append({"case": name, "py_ns": round(py_ns, 1), "c_ns": round(c_ns, 1), "ratio": round(py_ns / c_ns, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = run(args.quick)
    print(f"# {platform.python_implementation()} {platform.python_version()}, {platform.machine()}, "
          f"compiled module {_fastparse.__file__.rsplit('/', 1)[-1]}")
    print("| case | pure Python ns | Cython ns | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['py_ns']:,.0f} | {r['c_ns']:,.0f} | {r['ratio']}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
