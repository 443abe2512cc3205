"""Writes the seed corpus, fuzz/corpus/TARGET/, from the test suite's vectors.

    python fuzz/make_corpus.py

Each seed is the input layout of fuzz/targets.py: a config byte, a cut seed
byte, then the bytes of a test vector: MQTT streams built with
tests/mqtt_frames.py as tests/protocols/mqtt/test_mqtt_codec.py builds them
(every ill-formed string of its section 1.5.3 table in every place), the
HTTP requests of tests/protocols/http/test_http_parser.py (its refusal table,
its byte-exact early refusals and its chunk grammar), and the readings of
tests/ingest/test_payload.py (the design sample and every rejection, as JSON
and as MessagePack). File names are the content's sha1 (libFuzzer's naming),
so rerunning rewrites the same files; inputs the fuzzer found and that were
added by hand stay.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from mqtt_frames import (  # noqa: E402 (tests/ is put on the path just above)
    gen_connack,
    gen_connect,
    gen_disconnect,
    gen_packet,
    gen_pingreq,
    gen_puback,
    gen_pubcomp,
    gen_publish,
    gen_pubrec,
    gen_pubrel,
    gen_subscribe,
    gen_unsubscribe,
)


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mqtt_seeds() -> list[bytes]:
    codec_tests = load("tests/protocols/mqtt/test_mqtt_codec.py")
    connect = gen_connect("meter-1")
    seeds = [
        connect,
        connect + gen_publish("t/meter-1", payload=b'{"temperature":21.5}') + gen_pingreq() + gen_disconnect(),
        connect + gen_publish("a/b", qos=1, mid=7, payload=b"x" * 40, retain=True) + gen_puback(7),
        connect + gen_publish("a/b", qos=2, mid=9, payload=b"{}", dup=True) + gen_pubrel(9) + gen_pubrec(3)
        + gen_pubcomp(3),
        connect + gen_subscribe(1, [("a/+/b", 1), ("#", 2), ("c/#", 0)]) + gen_unsubscribe(2, ["a/+/b", "c/#"]),
        gen_connect("c", keepalive=60, clean_session=False, will_topic="w/t", will_payload=b"bye", will_qos=1,
                    will_retain=True, username="u", password=b"p"),
        gen_connect("old", proto_name=b"MQIsdp", proto_ver=3),
        gen_connect("", clean_session=False),                        # identifier_rejected
        gen_connect("c", proto_ver=5),                                # unsupported_protocol
        connect + connect,                                            # duplicate_connect
        gen_publish("a", payload=b"{}"),                              # expected_connect
        connect + gen_connack(0),                                     # unexpected_packet
        connect + gen_disconnect() + gen_pingreq(),                   # data_after_disconnect
        connect + gen_packet(0x30, b"\x00\x01a" + b"p" * 200),        # over the 64-byte limit
        connect + b"\x30\xff\xff\xff\xff\x01",                        # 5-byte remaining length
        connect + gen_packet(0x32, b"\x00\x01a\x00\x00"),              # packet id 0
        connect + gen_packet(0x36, b"\x00\x01a\x00\x01"),              # QoS 3
        connect + gen_subscribe(1, [("a/#/b", 0)]),                   # bad filter
        connect + gen_subscribe(1, [("a", 3)]),                       # QoS 3 requested
        connect + gen_packet(0x82, b"\x00\x01"),                      # no topic filter
        # for take_publishes: the telemetry topics, every QoS, JSON and MessagePack, a batch, a redelivery
        connect + gen_publish("devices/meter-1/telemetry", qos=1, mid=3, payload=b'{"temperature": 21.5}')
        + gen_publish("telemetry", qos=2, mid=1, payload=b'[{"x": 1}, {"x": "a"}]') + gen_pingreq()
        + gen_publish("telemetry", qos=2, mid=4, payload=b"\x81\xa1x\x01")
        + gen_publish("telemetry", qos=2, mid=4, dup=True, payload=b"\x81\xa1x\x01"),
        connect + gen_publish("devices/other/telemetry", qos=1, mid=2, payload=b'{"x": 1}')
        + gen_publish("telemetry", payload=b"") + gen_publish("telemetry", payload=b" {\"x\": 2}"),
    ]
    for raw in codec_tests.ILL_FORMED.values():
        seeds += [codec_tests._string_in(where, raw) for where in codec_tests.WHERE]
    return seeds


def http_seeds() -> list[bytes]:
    parser_tests = load("tests/protocols/http/test_http_parser.py")
    refusals = [args[0] for mark in parser_tests.test_refusals.pytestmark if mark.name == "parametrize"
                for args in mark.args[1]]
    post = parser_tests.post
    seeds = [
        post(b'{"device_id":"m","temperature":21.5}') + post(b"[]"),
        post(b'{"a":1}', b"Content-Encoding: gzip\r\nExpect: 100-continue\r\nAuthorization: Bearer x\r\n"),
        b"GET /healthz HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\nGARBAGE",
        *refusals,
        *[data for data, _status in parser_tests.EARLY],
        *[parser_tests.CHUNKED + chunks + post(b"[]") for chunks in parser_tests.GOOD_CHUNKS],
        *[parser_tests.CHUNKED + chunks for chunks in parser_tests.BAD_CHUNKS],
    ]
    return seeds


def validator_seeds() -> list[tuple[int, bytes]]:
    payload_tests = load("tests/ingest/test_payload.py")
    readings: list[object] = [payload_tests.SAMPLE, [payload_tests.SAMPLE, payload_tests.SAMPLE],
                              *[row[0] for row in payload_tests.REJECTIONS]]
    seeds: list[tuple[int, bytes]] = []
    for reading in readings:
        seeds.append((0, json.dumps(reading).encode()))               # json, no device id
        seeds.append((1 | 4, msgspec.msgpack.encode(reading)))         # msgpack, device id from the connection
    seeds.append((2, b"\n".join(json.dumps(r).encode() for r in readings[:4])))  # ndjson
    seeds += [(0, raw) for raw in (b"NaN", b'{"x": NaN}', b'{"x": 1e400}', b"{", b"", b'"\\ud800"',
                                   b"\xef\xbb\xbf{}", b'{"x": 1}x', b"\xff")]
    seeds += [(1, b"\xc1"), (1, msgspec.msgpack.encode({"x": float("nan")}))]
    return seeds


def proxy_seeds() -> list[tuple[int, bytes]]:
    """Config bit 0 set: a v1 listener; bit 3: also fed byte by byte. The
    parser tests' refusal tables and valid headers of every kind, each with
    the first bytes of a CONNECT after it."""
    from proxy_headers import ssl_tlv, tlv, v1, v2

    parser_tests = load("tests/protocols/test_proxy_protocol.py")
    seeds: list[tuple[int, bytes]] = []
    for test, version in ((parser_tests.test_v1_refusals, 1), (parser_tests.test_v2_refusals, 2)):
        for mark in test.pytestmark:
            if mark.name == "parametrize":
                seeds += [(version & 1, args[0]) for args in mark.args[1]]
    tail = b"\x10\x0c\x00\x04MQTT"
    seeds += [
        (1 | 8, v1("192.0.2.7", "10.0.0.1", 56324, 1883) + tail),
        (1, v1("2001:db8::7", "2001:db8::1", 1, 65535) + tail),
        (1, b"PROXY UNKNOWN whatever\r\n" + tail),
        (8, v2("192.0.2.7", "10.0.0.1", 56324, 1883, tlvs=ssl_tlv("meter-7"), crc=True) + tail),
        (0, v2("2001:db8::7", "2001:db8::1", 4000, 8883, tlvs=tlv(1, b"mqtt") + tlv(2, b"gw")) + tail),
        (0, v2(unix=(b"/run/a.sock", b"/run/b.sock")) + tail),
        (0, v2(command=0) + tail),
        (2, v2("192.0.2.7", "10.0.0.1", 1, 2, tlvs=tlv(0xE0, b"x" * 40))),       # over a 52-byte cap
    ]
    return seeds


def mqtt5_seeds() -> list[tuple[int, bytes]]:
    """tests/protocols/mqtt/test_codec5.py's error tables as streams (config: 4096-byte
    limit, alias maximum 4, no head: each stream brings its CONNECT), a few valid
    streams with every PUBLISH property, and arguments for the encoders (bit 7)."""
    t = load("tests/protocols/mqtt/test_codec5.py")

    def params(test: object) -> list[tuple]:
        return [args for mark in test.pytestmark if mark.name == "parametrize"  # type: ignore[attr-defined]
                for args in mark.args[1]]

    every = t.block(b"\x01\x01", b"\x02" + t.u32(60), b"\x03" + t.pack_string("application/json"),
                    b"\x08" + t.pack_string("devices/m1/r"), b"\x09" + t.pack_string(b"\x01\x02"),
                    b"\x23" + t.u16(3), b"\x26" + t.pack_string("traceparent") + t.pack_string("00-ab-cd-01"))
    alias = t.block(b"\x23" + t.u16(3))
    streams = [
        t.CONNECT + t.publish5("devices/m1/telemetry", b'{"t":1}', 1, 9, every) + t.publish5("", b"2", 1, 10, alias)
        + t.packet(0x40, t.u16(7) + b"\x10" + t.block(b"\x1f" + t.pack_string("why"))) + t.packet(0x62, t.u16(8))
        + b"\xc0\x00" + t.packet(0xE0, b"\x00"),
        t.CONNECT + t.packet(0x82, t.u16(5) + t.block(b"\x0b\x2a") + t.pack_string("a/+/#") + b"\x2d")
        + t.packet(0xA2, t.u16(3) + b"\x00" + t.pack_string("a/b")),
        t.AUTH_CONNECT + t.packet(0xF0, b"\x18" + t.block(b"\x15" + t.pack_string("SCRAM-SHA-256"))),
    ]
    seeds = [(1 | 16, s) for s in streams]
    seeds += [(1 | 16, data) for data, _code in params(t.test_connect_errors_answer_with_connack)]
    seeds += [(1 | 16, t.CONNECT + data) for data, _code, _alias in params(t.test_publish_errors)]
    seeds += [(1 | 16, t.CONNECT + t.packet(0x82, body)) for body, _code in params(t.test_subscribe_errors)]
    seeds += [(1 | 16, t.CONNECT + t.packet(0xA2, body)) for body, _code in params(t.test_unsubscribe_errors)]
    seeds += [(1 | 16, connect + t.packet(0xF0, body)) for connect, body, _code in params(t.test_auth_errors)]
    seeds += [(1 | 16, t.CONNECT + t.packet(0xE0, body)) for body, _event in params(t.test_disconnect)]
    # the encoders: topic length, topic, then packet id, codes and property bytes (fuzz/targets.py mqtt5_arguments)
    seeds += [(128, bytes([len(topic)]) + topic + rest) for topic, rest in (
        (b"devices/m1/commands", b"\x00\x07\x99\x00\x87\x00" + b"\x03abc" * 30),
        (b"t", b"\x00\x01\x00\x8f\x00" + bytes(range(0, 120, 3))),
        (b"a/+", b"\xff\xff\x92"), (b"", b"\x00\x00\x18\x00\x00\x00\x00\x06\x00\x01\xe9"),
        # no properties, then a Reason String alone (the 17th property of the table)
        (b"devices/m1/commands", b"\x00\x07\x00\x00" + b"\x01" * 30),
        (b"devices/m1/commands", b"\x00\x07\x99\x00" + b"\x01" * 16 + b"\x03why!" + b"\x01" * 10 + b"{}"))]
    return seeds


def wsmask_seeds() -> list[tuple[int, bytes] | tuple[int, bytes, int]]:
    """fuzz/targets.py check_wsmask's layouts. Unmasking (config bit 0 clear): a key
    and a payload of the lengths tests/protocols/websocket/test_wsmask.py tries
    (each side of the 8-byte steps and of the twin's 2048-byte switch, and a
    200-byte reading), as every kind of buffer and as the decoder's two slices
    (bit 5), and keys of other lengths (bit 2). Masking windows (bit 0): one
    frame, the load generator's window of 10 frames of 178 bytes, short and
    empty payloads; then arguments to refuse (bit 2)."""
    key = bytes.fromhex("37fa213d")
    seeds: list[tuple[int, bytes] | tuple[int, bytes, int]] = []
    lengths = [*range(0, 18), 63, 64, 65, 200, 2047, 2048, 2049, 4000]
    for i, n in enumerate(lengths):
        payload = bytes((7 * j + n) & 0xFF for j in range(n))
        seeds.append(((i % 4) << 3 | (32 if i % 5 == 0 else 0), key + payload))
    seeds += [(4, b"\x01\x02\x03" + b"Hello"), (4, b"")]
    for key_at, payload_bytes, count in ((2, 5, 1), (6, 172, 10), (0, 0, 3), (14, 3, 2), (4, 9, 4), (2, 12, 10)):
        # the seed byte picks key_at
        frame = bytes(key_at + 4) + b"p" * payload_bytes
        stream = bytes([payload_bytes]) + frame * count + bytes(range(4 * count))
        seeds.append((1 | (count % 4) << 3, stream, key_at))
    seeds += [(1 | 4, bytes([frame_bytes & 0xFF, (key_at * 8) & 0xFF, cut]) + rest)
              for frame_bytes, key_at, cut, rest in ((5, 2, 128, b"a" * 10 + b"k" * 8), (5, -1, 128, b"a" * 18),
                                                    (11, 2, 187, b"\x81\x85\0\0\0\0Hello" + key), (0, 0, 0, b""),
                                                    (-5, 0, 200, b"a" * 20))]
    return seeds


def write(target: str, seeds: Sequence[tuple[int, bytes] | tuple[int, bytes, int]]) -> int:
    """Each seed as (config, payload[, seed byte]); without one the seed byte is the payload's length."""
    folder = ROOT / "fuzz" / "corpus" / target
    folder.mkdir(parents=True, exist_ok=True)
    for config, payload, *cut_seed in seeds:
        data = bytes([config, cut_seed[0] if cut_seed else len(payload) & 0xFF]) + payload
        (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return len(seeds)


def main() -> None:
    # MQTT: the 4096-byte limit, and 64 for the stream made to exceed it; every 4th fed byte by byte,
    mqtt = mqtt_seeds()
    # and every other one's events through take_publishes
    write("mqtt", [((0 if b"p" * 200 in s else 1) | (4 if i % 4 == 0 else 0) | (8 if i % 2 == 0 or b"telemetry" in s
                                                                                else 0), s)
                   for i, s in enumerate(mqtt)])
    # HTTP: head 256 and body 64 (the test file's limits); every 4th also byte by byte
    http = http_seeds()
    write("http", [(1 | (1 << 2) | (16 if i % 4 == 0 else 0), s) for i, s in enumerate(http)])
    # the encoders (config bit 4): topic length, topic, payload; the cut seed picks QoS, flags and ids
    write("mqtt", [(16, bytes([len(topic)]) + topic + payload) for topic, payload in (
        (b"devices/m1/commands", b'{"type": "REBOOT"}'), (b"t", b""), (b"a/+", b"x"), (b"", b"\x00\x01\x02\x80"),
        (b"\xed\xa0\x80", b"p"), ("\u00e9/\U0001f600".encode(), b"\x00\x07" + b"y" * 40))])
    write("validator", validator_seeds())
    write("proxy", proxy_seeds())
    write("mqtt5", mqtt5_seeds())
    write("wsmask", wsmask_seeds())
    for target in ("mqtt", "http", "validator", "proxy", "mqtt5", "wsmask"):
        print(target, len(list((ROOT / "fuzz" / "corpus" / target).iterdir())))


if __name__ == "__main__":
    main()
