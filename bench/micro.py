"""Micro-benchmark: the compiled hot path against its pure-Python twin.

    python -m bench.micro [--quick] [--json FILE]

Prints ns per packet / per reading for each implementation and the ratio,
measured in one run on one machine (compare the ratios, not the absolute
numbers). Best of several repeats of a timed loop; nothing here is asserted.
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
from gridgate.protocols.mqtt import codec_py as _mqtt_py
from gridgate.protocols.mqtt.events import PUBACK

SAMPLE = {"device_id": "meter-0001", "timestamp_ms": 1732406400123, "temperature": 23.5,
          "temperature_unit": "C", "battery_mv": 3700, "location": "shanghai/factory-a",
          "tags": {"vendor": "huawei"}}


def _connect() -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x0ameter-0001"
    return b"\x10" + bytes([len(body)]) + body


def best_ns(fn: Callable[[], object], units: int, repeats: int, min_time: float) -> float:
    """Best ns per unit over `repeats` timed loops of at least `min_time` s."""
    loops = 1
    while True:
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        if time.perf_counter_ns() - t0 >= min_time * 1e9:
            break
        loops *= 2
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / (loops * units))
    return best


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

    return [
        (f"MQTT decode PUBLISH QoS 1 ({len(payload)} B JSON, {n1} per 64 KiB read), per packet", n1, decode(chunk1)),
        (f"MQTT decode PUBLISH QoS 0 ({n0} per 64 KiB read), per packet", n0, decode(chunk0)),
        ("MQTT encode_acks of 100 PUBACKs, per ack", 100, lambda impl: (lambda: impl.encode_acks(PUBACK, ids))),
        ("validate the DESIGN section 3 sample reading, JSON", 1, validate(payload, "json")),
        ("validate the sample reading, MessagePack", 1, validate(sample_mp, "msgpack")),
        ("validate a JSON batch of 100 readings, per reading", 100, validate(batch, "json")),
    ]


def run(quick: bool = False) -> list[dict]:
    repeats, min_time = (3, 0.05) if quick else (7, 0.2)
    rows = []
    for name, units, make in cases():
        py_ns = best_ns(make(_mqtt_py if name.startswith("MQTT") else _payload_py), units, repeats, min_time)
        c_ns = best_ns(make(_fastparse), units, repeats, min_time)
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
