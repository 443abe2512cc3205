"""Micro-benchmark of the MQTT codecs: compiled (gridgate._fastparse) against
their pure-Python twins (gridgate.protocols.mqtt.codec_py for 3.1.1,
codec5_py for 5.0), the 5.0 rows beside the 3.1.1 ones.

    .venv/bin/python -m bench.micro_mqtt [--quick] [--json FILE]

``run()`` returns one row per case, ``{"case", "py_ns", "c_ns", "ratio"}``,
in nanoseconds per packet (per ack for encode_acks). Each number is the best
of several repeats of a ``time.perf_counter_ns`` loop, both implementations
in one process on one machine: compare the ratios, not the absolute numbers.
The garbage collector stays on, as in the gateway. Nothing is asserted.

The decode cases feed 64 KiB reads, as the gateway's ``receive_some(65536)``
does: "aligned" reads hold whole packets only; "stream" cuts one long stream
into 64 KiB reads, so one packet per read straddles two reads (the usual case
on a busy connection). All packets of a case share one topic, as a device's
do, except the "new topic" case, which defeats the compiled codec's cache of
the last topic. The 5.0 cases decode PUBLISHes with properties as MQTT 5
meters send them (Payload Format Indicator, Content Type, a W3C trace
context as two User Properties; then the same with a Topic Alias in place of
the topic) and with an empty property block (as gridgate-loadgen sends), and
encode the PUBACKs session5 sends: 0x00 (the two-byte-shorter form) and 0x99
with a Reason String. Their ratio is issue 21's ">= 10x its twin" figure.
Each case alternates the two implementations' timed loops (best_ns_pair).
"""
from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable

from bench.micro import best_ns_pair
from gridgate import _fastparse
from gridgate.protocols.mqtt import codec5_py as _mqtt5_py, codec_py as _mqtt_py, v5
from gridgate.protocols.mqtt.codec5 import compiled_codec5
from gridgate.protocols.mqtt.events import PUBACK

READ_SIZE = 65536
TOPIC = "devices/meter-0001/telemetry"
# a typical reading, 120 bytes of JSON
PAYLOAD = (b'{"device_id":"meter-0001","timestamp_ms":1732406400123,"temperature":23.5,'
           b'"battery_mv":3700,"tags":{"vendor":"acme-01"}}')
assert len(PAYLOAD) == 120


def _string(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def _connect() -> bytes:
    body = _string(b"MQTT") + bytes((4, 0x02, 0, 60)) + _string(b"meter-0001")
    return bytes((0x10, len(body))) + body


def _publish(topic: bytes, qos: int, packet_id: int) -> bytes:
    # built by hand (not with the code under test); remaining length < 16384
    body = _string(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + PAYLOAD
    n = len(body)
    length = bytes((n,)) if n < 128 else bytes(((n & 0x7F) | 0x80, n >> 7))
    return bytes((0x30 | (qos << 1),)) + length + body


def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _connect5() -> bytes:
    body = _string(b"MQTT") + bytes((5, 0x02, 0, 60)) + b"\x00" + _string(b"meter-0001")
    return bytes((0x10, len(body))) + body


def _trace_props(packet_id: int) -> bytes:
    """Payload Format Indicator 1, Content Type, traceparent and tracestate User Properties."""
    traceparent = b"00-4bf92f3577b34da6a3ce929d%06x-00f067aa0ba902b7-01" % packet_id
    return (b"\x01\x01" + b"\x03" + _string(b"application/json") + b"\x26" + _string(b"traceparent")
            + _string(traceparent) + b"\x26" + _string(b"tracestate") + _string(b"rojo=00f067aa0ba902b7"))


def _publish5(topic: bytes, packet_id: int, props: bytes) -> bytes:
    """A QoS 1 MQTT 5 PUBLISH, built by hand (not with the code under test)."""
    body = _string(topic) + packet_id.to_bytes(2, "big") + _vbi(len(props)) + props + PAYLOAD
    return b"\x32" + _vbi(len(body)) + body


def _aligned_read5(kind: str) -> tuple[bytes, int]:
    """As many whole MQTT 5 PUBLISH packets as fit in one 64 KiB read. kind: "props" (the topic and
    the trace properties), "alias" (the first sets Topic Alias 1, the rest send it with an empty
    topic, with the trace properties) or "empty" (the topic, no properties)."""
    packets, size, i = [], 0, 0
    while True:
        i += 1
        if kind == "empty":
            p = _publish5(TOPIC.encode(), i, b"")
        elif kind == "alias":
            alias = b"\x23\x00\x01"
            p = _publish5(TOPIC.encode() if i == 1 else b"", i, alias + _trace_props(i))
        else:
            p = _publish5(TOPIC.encode(), i, _trace_props(i))
        if size + len(p) > READ_SIZE:
            return b"".join(packets), len(packets)
        packets.append(p)
        size += len(p)


def _decode5(read: bytes):
    def make(impl):
        connect = _connect5()

        def run():
            codec = impl.MQTT5Codec(1 << 20, 16)
            codec.feed(connect)
            codec.feed(read)
        return run
    return make


def _aligned_read(qos: int, new_topic: bool = False) -> tuple[bytes, int]:
    """As many whole PUBLISH packets as fit in one 64 KiB read."""
    packets, size, i = [], 0, 0
    while True:
        i += 1
        topic = f"devices/meter-{i:04d}/telemetry".encode() if new_topic else TOPIC.encode()
        p = _publish(topic, qos, i % 65535 + 1)
        if size + len(p) > READ_SIZE:
            return b"".join(packets), len(packets)
        packets.append(p)
        size += len(p)


def _stream_reads(qos: int, reads: int = 16) -> tuple[list[bytes], int]:
    """A stream of PUBLISH packets cut into 64 KiB reads regardless of packet boundaries."""
    one = [_publish(TOPIC.encode(), qos, i % 65535 + 1) for i in range(1, reads * READ_SIZE // 100)]
    stream = b"".join(one)
    cut = reads * READ_SIZE
    count = 0
    total = 0
    for p in one:  # packets wholly inside the first `cut` bytes
        if total + len(p) > cut:
            break
        total += len(p)
        count += 1
    return [stream[i:i + READ_SIZE] for i in range(0, cut, READ_SIZE)], count


def _decode_aligned(read: bytes):
    def make(impl):
        codec = impl.MQTTCodec()
        codec.feed(_connect())
        feed = codec.feed
        return lambda: feed(read)
    return make


def _decode_stream(reads: list[bytes]):
    def make(impl):
        connect = _connect()

        def run():
            codec = impl.MQTTCodec()
            codec.feed(connect)
            for r in reads:
                codec.feed(r)
        return run
    return make


def cases() -> list[tuple[str, int, Callable]]:
    read1, n1 = _aligned_read(1)
    read0, n0 = _aligned_read(0)
    read_new, n_new = _aligned_read(1, new_topic=True)
    stream, n_stream = _stream_reads(1)
    ids = list(range(1, 101))
    return [
        (f"decode PUBLISH QoS 1, 120 B JSON, {n1} per aligned 64 KiB read", n1, _decode_aligned(read1)),
        (f"decode PUBLISH QoS 0, 120 B JSON, {n0} per aligned 64 KiB read", n0, _decode_aligned(read0)),
        (f"decode PUBLISH QoS 1, stream in 64 KiB reads ({len(stream)} reads)", n_stream, _decode_stream(stream)),
        (f"decode PUBLISH QoS 1, a new topic each packet ({n_new} per read)", n_new, _decode_aligned(read_new)),
        ("encode_acks of 100 PUBACKs, per ack", 100, lambda impl: (lambda: impl.encode_acks(PUBACK, ids))),
    ]


def cases5() -> list[tuple[str, int, Callable]]:
    props, n_props = _aligned_read5("props")
    alias, n_alias = _aligned_read5("alias")
    empty, n_empty = _aligned_read5("empty")
    why = v5.Properties(reason_string="out_of_range: temperature")
    return [
        (f"5.0 decode PUBLISH QoS 1 with 4 properties (format, content type, trace context), {n_props} per "
         "aligned 64 KiB read", n_props, _decode5(props)),
        (f"5.0 decode PUBLISH QoS 1, Topic Alias + the same 4 properties, {n_alias} per read", n_alias,
         _decode5(alias)),
        (f"5.0 decode PUBLISH QoS 1, empty property block, {n_empty} per read", n_empty, _decode5(empty)),
        ("5.0 encode PUBACK 0x00", 1, lambda impl: (lambda: impl.encode_puback(7, 0x00, None, None))),
        ("5.0 encode PUBACK 0x99 with Reason String 'out_of_range: temperature'", 1,
         lambda impl: (lambda: impl.encode_puback(7, 0x99, why, 1 << 20))),
    ]


def run(quick: bool = False) -> list[dict]:
    """One row per case: ns per packet (per ack) of each implementation and the ratio."""
    repeats, min_time = (3, 0.05) if quick else (7, 0.2)
    rows = []
    compiled5 = compiled_codec5(_fastparse)
    for (name, units, make), (twin, compiled) in [*((c, (_mqtt_py, _fastparse)) for c in cases()),
                                                  *((c, (_mqtt5_py, compiled5)) for c in cases5())]:
        py_ns, c_ns = best_ns_pair(make(twin), make(compiled), units, repeats, min_time)
        rows.append({"case": name, "py_ns": round(py_ns, 1), "c_ns": round(c_ns, 1),
                     "ratio": round(py_ns / c_ns, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter repeats (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = run(args.quick)
    print(f"# MQTT codecs (3.1.1 and 5.0), {platform.python_implementation()} {platform.python_version()} "
          f"{platform.machine()}; ns per packet, best of repeats")
    print("| case | pure Python ns | Cython ns | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['py_ns']:,.1f} | {r['c_ns']:,.1f} | {r['ratio']}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
