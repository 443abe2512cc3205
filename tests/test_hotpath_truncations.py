"""Every valid input cut short, each cut handed over as a bytes object of its
own: the compiled hot path and its pure-Python twin must agree on it.

The compiled code runs with Cython's bounds checks off and reads the buffer
through raw pointers, so the reads most likely to run past a buffer are the
ones at its very end: a length field, a packet or a line that stops where the
bytes stop. Random input reaches such an end only by chance; these tests cut
at every byte. Each cut is copied into its own exact-size bytes object, so
under ``make test-asan`` (PYTHONMALLOC=malloc) a read past it leaves the
allocation and AddressSanitizer reports it (a read of the length field of a
CONNECT with remaining length 0, with the check in ``_mq_u16`` taken out, was
caught this way). In the normal suite they are agreement tests like any other.
"""
from __future__ import annotations

import json

import msgspec
import pytest

from gridgate import _fastparse
from gridgate.errors import HTTPParseError, MQTTProtocolError
from gridgate.ingest import validator_py as _payload_py
from gridgate.ingest.rules import PayloadRules
from gridgate.protocols.http import parser_py as _http_py
from gridgate.protocols.mqtt import codec_py as _mqtt_py
from mqtt_frames import (
    gen_connect,
    gen_pingreq,
    gen_puback,
    gen_publish,
    gen_pubrel,
    gen_subscribe,
    gen_unsubscribe,
    pack_remaining_length,
)

CONNECT = gen_connect("meter-1")
PACKETS = {
    "connect": gen_connect("c", keepalive=60, clean_session=False, will_topic="w/t", will_payload=b"bye",
                           will_qos=1, will_retain=True, username="u", password=b"pw"),
    "connect-3.1": gen_connect("old", proto_name=b"MQIsdp", proto_ver=3),
    "publish-qos0": gen_publish("t/a", payload=b"{}"),
    "publish-qos2": gen_publish("t/\u00e9", qos=2, mid=513, payload=b'{"x": 1}'),
    "subscribe": gen_subscribe(7, [("a/+/b", 1), ("#", 2)]),
    "unsubscribe": gen_unsubscribe(8, ["a/+/b", "c/#"]),
    "puback": gen_puback(9),
    "pubrel": gen_pubrel(10),
    "pingreq": gen_pingreq(),
}


def own(data: bytes | bytearray) -> bytes:
    """A bytes object of its own, exactly len(data) long (not a cached or shared one)."""
    return bytes(bytearray(data))


def body_of(frame: bytes) -> bytes:
    i = 1
    while frame[i] & 0x80:
        i += 1
    return frame[i + 1:]


def decode(impl, reads: list[bytes]):
    codec = impl.MQTTCodec(max_packet_bytes=4096)
    events = []
    try:
        for chunk in reads:
            events.extend(codec.feed(chunk))
    except MQTTProtocolError as exc:
        return events, (exc.reason, exc.return_code)
    return events, None


def mqtt_cuts(name: str) -> list[bytes]:
    """The packet's body cut at every length, each with its remaining length
    saying so (the packet ends where the bytes end), after a CONNECT unless it
    is one; and the whole packet cut at every byte (the rest never comes)."""
    frame = PACKETS[name]
    body = body_of(frame)
    before = b"" if name.startswith("connect") else CONNECT
    short = [before + frame[:1] + pack_remaining_length(k) + body[:k] for k in range(len(body) + 1)]
    return short + [before + frame[:k] for k in range(len(frame))]


@pytest.mark.parametrize("name", PACKETS)
def test_mqtt_packets_cut_short_agree(name):
    for stream in mqtt_cuts(name):
        whole = decode(_mqtt_py, [own(stream)])
        assert decode(_fastparse, [own(stream)]) == whole, stream
        # the packet held back and completed from the next read: the compiled
        # codec copies it into a bytes object of exactly its size
        for at in (len(stream) - 1, len(stream) - 2):
            if at > 0:
                reads = [own(stream[:at]), own(stream[at:])]
                assert decode(_fastparse, reads) == decode(_mqtt_py, reads), (stream, at)


HTTP_REQUESTS = [
    b"POST /v1/telemetry HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 7\r\n"
    b"Authorization: Bearer abc\r\nExpect: 100-continue\r\nContent-Encoding: gzip\r\n\r\n{\"a\":1}",
    b"\r\nPOST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n4;name=\"v\\\"\"\r\n[1,2\r\n0\r\n"
    b"X-Trailer: 1\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
]


def parse(impl, data: bytes):
    parser = impl.HTTPRequestParser(256, 64)
    out = []
    try:
        parser.feed(data)
        while (state := parser.next()) == impl.REQUEST:
            out.append((parser.method, parser.target, parser.http_version, parser.headers, bytes(parser.body),
                        parser.keep_alive, parser.content_length, parser.chunked, parser.authorization))
        out.append((state, parser.buffered, parser.head_done))
    except HTTPParseError as exc:
        out.append((exc.status, exc.error))
    return out


@pytest.mark.parametrize("index", range(len(HTTP_REQUESTS)))
def test_http_requests_cut_short_agree(index):
    request = HTTP_REQUESTS[index]
    for k in range(len(request) + 1):
        assert parse(_fastparse, own(request[:k])) == parse(_http_py, own(request[:k])), request[:k]


READING = {"device_id": "meter-0001", "timestamp_ms": 1732406400123, "temperature": 23.5, "temperature_unit": "C",
           "battery_mv": 3700, "location": "shanghai/factory-a", "tags": {"vendor": "huawei"},
           "metrics": {"voltage": 229.5, "e": -1.5e-3}}
PAYLOADS = {
    "json": json.dumps([READING, {"device_id": "m\u00e9\\", "x": 1}]).encode(),
    "msgpack": msgspec.msgpack.encode([READING, {"device_id": "m", "x": 2**40, "y": -1.5}]),
    "ndjson": json.dumps(READING).encode() + b"\n" + json.dumps({"device_id": "m", "x": 1}).encode(),
}
RULES = PayloadRules()


@pytest.mark.parametrize("fmt", PAYLOADS)
def test_payloads_cut_short_agree(fmt):
    compiled, twin = _fastparse.Validator(RULES), _payload_py.Validator(RULES)
    payload = PAYLOADS[fmt]
    for k in range(len(payload) + 1):
        cut = own(payload[:k])
        assert compiled.validate(cut, fmt, "mqtt", None, 10**18) == twin.validate(cut, fmt, "mqtt", None, 10**18)
