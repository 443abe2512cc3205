"""The fuzz targets' checks: one input -> the compiled hot path and its
pure-Python twin run on it, and any disagreement raises ``Disagreement``.

Plain functions of ``bytes`` with no atheris in them, so the same checks run
under the fuzzer (fuzz/run.py), in the normal suite over the committed corpus
(tests/test_fuzz_corpus.py) and under the sanitizers (``make test-asan``).

Input layout, the same for every target so that a seed is readable: byte 0
picks the configuration (limits, format, ...), byte 1 seeds the read
boundaries of the chunked feed, the rest is what a peer sends. What a peer
sends is copied into a ``bytes`` object of its own, exactly its size, so that
an overread in the compiled code leaves the allocation (and, under
AddressSanitizer with PYTHONMALLOC=malloc, hits a redzone) rather than
reading the fuzzer's neighbouring bytes.

Only the codecs' own error classes may escape a parser (MQTTProtocolError,
of which the 5.0 codec's MQTT5Error is one, HTTPParseError,
ProxyProtocolError); the validator never raises; the WebSocket masking
refuses bad arguments with ValueError or TypeError, the same class from both
sides (compared as ``outcome``s). The PROXY
protocol parser has no compiled side: its target checks that whole, chunked
and byte-wise feeds agree and that a peeking shell never reads past the header. Anything else escapes these
functions as it is: a crash to the fuzzer, a failure to pytest.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from types import ModuleType
from typing import Any

from gridgate import _fastparse
from gridgate.errors import HTTPParseError, MQTTProtocolError
from gridgate.ingest import validator_py
from gridgate.ingest.rules import PayloadRules
from gridgate.protocols import wsmask_py
from gridgate.protocols.http import parser_py
from gridgate.protocols.mqtt import codec5_py, codec_py, v5
from gridgate.protocols.mqtt.codec5 import compiled_codec5
from gridgate.protocols.mqtt.events import Connect
from gridgate.protocols.proxy_protocol import (
    NEED_DATA,
    PROXY_ERROR_REASONS,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
)

__all__ = ["Disagreement", "TARGETS", "check_mqtt", "check_mqtt5", "check_http", "check_validator", "check_proxy",
           "check_wsmask", "split_input"]


class Disagreement(AssertionError):
    """The compiled code and its twin differ on one input."""


def split_input(data: bytes) -> tuple[int, int, bytes]:
    """(config byte, cut seed byte, payload as a bytes object of its own)."""
    config = data[0] if len(data) > 0 else 0
    seed = data[1] if len(data) > 1 else 0
    return config, seed, bytes(bytearray(data[2:]))


def cuts(payload: bytes, seed: int) -> list[bytes]:
    """The payload cut into up to 8 reads at places the seed picks (each a bytes object of its own)."""
    rng = random.Random(seed)
    points = sorted({rng.randrange(len(payload) + 1) for _ in range(rng.randrange(9))}) if payload else []
    edges = [0, *points, len(payload)]
    return [bytes(bytearray(payload[a:b])) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def agree(what: str, compiled: object, twin: object, data: bytes) -> None:
    if compiled != twin:
        raise Disagreement(f"{what}: compiled {compiled!r} != twin {twin!r} on input {data!r}")


# -- MQTT 3.1.1 codec ---------------------------------------------------------------------------

MQTT_MAX_PACKET = (64, 4096, 1 << 20, 268_435_460)


def run_mqtt(impl: ModuleType, reads: list[bytes], max_packet_bytes: int) -> list[object]:
    """What the codec did, read by read: events and state after each, then the error if any."""
    codec = impl.MQTTCodec(max_packet_bytes=max_packet_bytes)
    trace: list[object] = []
    try:
        for chunk in reads:
            events = codec.feed(chunk)
            trace.append((events, codec.connected, codec.protocol_level, codec.buffered))
    except MQTTProtocolError as exc:
        trace.append(("error", exc.reason, exc.return_code))
        if exc.reason not in codec_py.MQTT_ERROR_REASONS or exc.return_code not in (None, 1, 2):
            raise Disagreement(f"{impl.__name__}: undocumented error {exc!r}") from exc
        # dead after the first error: every later feed raises an equal error
        try:
            codec.feed(b"\x00")
        except MQTTProtocolError as again:
            if again != exc:
                raise Disagreement(f"{impl.__name__}: {again!r} after {exc!r}") from again
        else:
            raise Disagreement(f"{impl.__name__}: feed after {exc!r} did not raise") from exc
    return trace


class Clock:
    """Deterministic receive times for take_publishes: a fixed start, +3 ns a call."""

    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 3
        return self.now


def run_take_publishes(impl: ModuleType, validator: Any, events: list[object], client_id: str) -> list[object]:
    """An MQTT session's walk over one read's events: take_publishes from each
    run of PUBLISHes, stepping over the other events, QoS 2 ids in one set."""
    unreleased: set[int] = {1}
    clock = Clock()
    trace: list[object] = []
    start, next_ns = 0, 0
    while start < len(events):
        records: list[object] = []
        rejections: list[object] = []
        pubacks: list[int] = []
        pubrecs: list[int] = []
        stop, next_ns, first = impl.take_publishes(
            events, start, f"devices/{client_id}/telemetry", validator.validate_into, "mqtt", client_id, next_ns,
            clock, unreleased, records, rejections, pubacks, pubrecs)
        trace.append((stop, next_ns, first, records, rejections, pubacks, pubrecs, sorted(unreleased)))
        start = stop if stop > start else start + 1
    return trace


def outcome(call: Callable[[], object]) -> object:
    """A call's result, or the class of the ValueError/TypeError it raised (encoders refuse misuse with those)."""
    try:
        return call()
    except (ValueError, TypeError) as exc:
        return type(exc)


def encode_all(impl: ModuleType, seed: int, stream: bytes) -> list[object]:
    """The server's encoders on arguments cut from the stream: a topic (its bytes
    decoded with its invalid bytes as lone surrogates or as U+FFFD, so invalid topics come too), a payload,
    QoS and flags from the seed, packet ids and SUBACK codes from the bytes."""
    cut = stream[0] if stream else 0
    topic = stream[1:1 + cut].decode("utf-8", "surrogateescape" if seed & 64 else "replace")
    payload = stream[1 + cut:]
    qos, pid = seed & 3, int.from_bytes(payload[:2], "big") if seed & 4 else seed >> 3
    ids = [int.from_bytes(payload[i:i + 2], "big") for i in range(0, min(len(payload), 64) - 1, 2)]
    return [
        outcome(lambda: impl.encode_publish(topic, payload, qos, pid, bool(seed & 32), bool(seed & 128))),
        outcome(lambda: impl.encode_suback(pid, payload[:300])),
        outcome(lambda: impl.encode_acks(4 + (seed & 3), ids)),
        outcome(lambda: impl.encode_connack(bool(seed & 32), seed & 7)),
    ]


def check_mqtt_encoders(data: bytes) -> None:
    """Both sets of encoders give the same bytes or refuse alike, and a PUBLISH
    they encode decodes back to its fields."""
    _config, seed, stream = split_input(data)
    encoded = encode_all(_fastparse, seed, stream)
    agree("MQTT encoders", encoded, encode_all(codec_py, seed, stream), data)
    if type(encoded[0]) is bytes:
        for impl in (_fastparse, codec_py):
            events = impl.MQTTCodec(max_packet_bytes=1 << 20).feed(ROUND_TRIP_CONNECT + encoded[0])
            publish = events[1]
            again = impl.encode_publish(publish.topic, publish.payload, publish.qos, publish.packet_id,
                                        publish.retain, publish.dup)
            agree(f"{impl.__name__}: PUBLISH encoded, decoded, encoded again", again, encoded[0], data)


# a CONNECT of client id "c" (MQTT 3.1.1, clean session)
ROUND_TRIP_CONNECT = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c"


def check_mqtt(data: bytes) -> None:
    """Config bits 0-1: max_packet_bytes; bit 2: also fed one byte per read;
    bit 3: the events then go through take_publishes (a session's step over
    them: topic check, validation, acks), compiled and twin, each with the
    compiled and the twin validator; bit 4: the server's encoders instead,
    on arguments cut from the stream (check_mqtt_encoders)."""
    config, seed, stream = split_input(data)
    if config & 16:
        check_mqtt_encoders(data)
        return
    max_packet = MQTT_MAX_PACKET[config & 3]
    plans = [[stream], cuts(stream, seed)]
    if config & 4 and len(stream) <= 2048:
        plans.append([stream[i:i + 1] for i in range(len(stream))])
    traces = []
    for reads in plans:
        twin = run_mqtt(codec_py, reads, max_packet)
        agree(f"MQTT codec, {len(reads)} reads", run_mqtt(_fastparse, reads, max_packet), twin, data)
        traces.append(twin)
    if config & 8:
        events: list[object] = [e for step in traces[1] if type(step) is tuple and type(step[0]) is list
                                for e in step[0]]
        client_id = next((e.client_id for e in events if type(e) is Connect), "") or "m1"
        walks = [run_take_publishes(impl, validator, events, client_id)
                 for impl in (_fastparse, codec_py) for validator in VALIDATORS[0]]
        for walk in walks[1:]:
            agree("take_publishes", walk, walks[0], data)


# -- MQTT 5.0 codec ------------------------------------------------------------------------------

MQTT5_COMPILED = compiled_codec5(_fastparse)
MQTT5_MAX_PACKET = (64, 4096, 1 << 20, codec5_py.MAX_PACKET_BYTES)
MQTT5_ALIAS_MAX = (0, 1, 4, 65535)
# What a stream may start with (config bits 5-6), so that the fuzzer reaches the
# connected states without first having to find a valid CONNECT: nothing; a
# CONNECT with Session Expiry 60; one with an Authentication Method (AUTH is
# then allowed); one with a Will.
MQTT5_HEADS = (
    b"",
    b"\x10\x15\x00\x04MQTT\x05\x02\x00\x3c\x05\x11\x00\x00\x00\x3c\x00\x03m-1",
    b"\x10\x18\x00\x04MQTT\x05\x02\x00\x3c\x08\x15\x00\x05SCRAM\x00\x03m-1",
    b"\x10\x1d\x00\x04MQTT\x05\x0e\x00\x3c\x00\x00\x03m-1\x02\x01\x01\x00\x03w/t\x00\x03bye",
)
_CONNACK_CODES = v5.REASON_CODES_BY_PACKET[v5.CONNACK]
# an error is answered with a DISCONNECT, or with a CONNACK while in the CONNECT (0x84 is CONNACK's only)
_ERROR_CODES = v5.REASON_CODES_BY_PACKET[v5.DISCONNECT] | _CONNACK_CODES


def run_mqtt5(impl: Any, reads: list[bytes], max_packet_bytes: int, alias_max: int) -> list[object]:
    """What the 5.0 codec did, read by read: events and state after each, then the error if any."""
    codec = impl.MQTT5Codec(max_packet_bytes=max_packet_bytes, topic_alias_maximum=alias_max)
    trace: list[object] = []
    try:
        for chunk in reads:
            events = codec.feed(chunk)
            trace.append((events, codec.connected, codec.buffered))
    except v5.MQTT5Error as exc:
        trace.append(("error", exc.reason_code, exc.return_code, exc.reason))
        if exc.reason_code not in _ERROR_CODES or exc.return_code not in (None, *_CONNACK_CODES):
            raise Disagreement(f"{_name(impl)}: undocumented error {exc!r}") from exc
        try:
            codec.feed(b"\xc0\x00")
        except v5.MQTT5Error as again:
            if again != exc:
                raise Disagreement(f"{_name(impl)}: {again!r} after {exc!r}") from again
        else:
            raise Disagreement(f"{_name(impl)}: feed after {exc!r} did not raise") from exc
    return trace


def _name(impl: Any) -> str:
    return "compiled" if impl is MQTT5_COMPILED else "twin"


def _text(raw: bytes, seed: int) -> str:
    """raw as a str, its invalid bytes as lone surrogates or U+FFFD (so invalid strings come too)."""
    return raw.decode("utf-8", "surrogateescape" if seed & 64 else "replace")


def mqtt5_arguments(seed: int, stream: bytes) -> tuple[Any, ...]:
    """The encoders' arguments cut from the stream: a topic, a payload, a packet id,
    reason codes and a Properties whose every field comes from the bytes (wrong
    types and out of range values too)."""
    cut = stream[0] if stream else 0
    topic = _text(stream[1:1 + cut % 40], seed)
    rest = stream[1 + cut % 40:]
    pid = int.from_bytes(rest[:2], "big") if seed & 4 else seed >> 3
    code = rest[2] if len(rest) > 2 else 0
    codes = list(rest[3:3 + (seed & 3) + 1])
    fields: dict[str, object] = {}
    pos = 3 + (seed & 3) + 1
    for spec in v5.PROPERTIES:
        if pos >= len(rest):
            break
        pick, pos = rest[pos], pos + 1
        if pick % 3:
            continue
        chunk, pos = rest[pos:pos + 1 + pick % 7], pos + 1 + pick % 7
        if spec.type == v5.UTF8_PAIR:
            fields[spec.attr] = ((_text(chunk[:2], seed), _text(chunk[2:], seed)),) * (1 + pick % 2)
        elif spec.type in (v5.UTF8, v5.BINARY):
            fields[spec.attr] = _text(chunk, seed) if (spec.type == v5.UTF8) != bool(pick & 64) else chunk
        elif spec.type == v5.VBI:
            fields[spec.attr] = (int.from_bytes(chunk, "big"),) * (1 + pick % 2)
        else:
            fields[spec.attr] = int.from_bytes(chunk, "big") if pick & 128 == 0 else str(pick)
    props = v5.Properties(**fields) if not seed & 2 or fields else None  # type: ignore[arg-type]
    max_size = None if seed & 32 else 8 + cut
    return topic, rest[pos:], (seed >> 1) & 3, pid, code, codes, props, max_size, bool(seed & 128)


def encode5_all(impl: Any, args: tuple[Any, ...]) -> list[object]:
    topic, payload, qos, pid, code, codes, props, max_size, flag = args
    return [
        outcome(lambda: impl.encode_connack(flag, code, props, max_size)),
        outcome(lambda: impl.encode_publish(topic, payload, qos, pid, flag, flag, props)),
        outcome(lambda: impl.encode_puback(pid, code, props, max_size)),
        outcome(lambda: impl.encode_pubrec(pid, code, props, max_size)),
        outcome(lambda: impl.encode_pubrel(pid, code, props, max_size)),
        outcome(lambda: impl.encode_pubcomp(pid, code, props, max_size)),
        outcome(lambda: impl.encode_suback(pid, codes, props, max_size)),
        outcome(lambda: impl.encode_unsuback(pid, codes, props, max_size)),
        outcome(lambda: impl.encode_disconnect(code, props, max_size)),
        outcome(lambda: impl.encode_auth(code, props, max_size)),
    ]


def check_mqtt5_encoders(data: bytes) -> None:
    """Both sets of 5.0 encoders give the same bytes or refuse alike, and what they
    encode as a client could send it (PUBLISH, the acks) both codecs decode alike."""
    _config, seed, stream = split_input(data)
    args = mqtt5_arguments(seed, stream)
    encoded = encode5_all(MQTT5_COMPILED, args)
    agree("MQTT 5.0 encoders", encoded, encode5_all(codec5_py, args), data)
    for raw in encoded[1:6]:
        if type(raw) is bytes:
            reads = [MQTT5_HEADS[1] + raw]
            agree("MQTT 5.0 codec on an encoder's packet", run_mqtt5(MQTT5_COMPILED, reads, 1 << 20, 65535),
                  run_mqtt5(codec5_py, reads, 1 << 20, 65535), data)


def check_mqtt5(data: bytes) -> None:
    """Config bits 0-1: max_packet_bytes; bit 2: also fed one byte per read;
    bits 3-4: topic_alias_maximum; bits 5-6: what the stream starts with
    (MQTT5_HEADS); bit 7: the server's encoders instead, on arguments cut from
    the stream (check_mqtt5_encoders)."""
    config, seed, stream = split_input(data)
    if config & 128:
        check_mqtt5_encoders(data)
        return
    max_packet, alias_max = MQTT5_MAX_PACKET[config & 3], MQTT5_ALIAS_MAX[(config >> 3) & 3]
    stream = MQTT5_HEADS[(config >> 5) & 3] + stream
    plans = [[stream], cuts(stream, seed)]
    if config & 4 and len(stream) <= 2048:
        plans.append([stream[i:i + 1] for i in range(len(stream))])
    for reads in plans:
        agree(f"MQTT 5.0 codec, {len(reads)} reads", run_mqtt5(MQTT5_COMPILED, reads, max_packet, alias_max),
              run_mqtt5(codec5_py, reads, max_packet, alias_max), data)


# -- HTTP/1.1 request parser ----------------------------------------------------------------------

HTTP_MAX_HEAD = (64, 256, 16384, 16384)
HTTP_MAX_BODY = (0, 64, 4096, 1 << 20)
HTTP_FIELDS = ("method", "target", "http_version", "headers", "keep_alive", "expect_continue", "content_type",
               "content_encoding", "authorization", "content_length", "chunked", "has_length")


def run_http(impl: ModuleType, reads: list[bytes], max_head: int, max_body: int) -> list[object]:
    """What the parser did, read by read: each next() state, each request's fields, then the error if any."""
    parser = impl.HTTPRequestParser(max_head, max_body)
    trace: list[object] = []
    try:
        for chunk in reads:
            parser.feed(chunk)
            while True:
                state = parser.next()
                trace.append((state, parser.buffered, parser.head_done))
                if state != impl.REQUEST:
                    break
                trace.append(tuple(getattr(parser, name) for name in HTTP_FIELDS) + (bytes(parser.body),))
                if not parser.keep_alive:
                    return trace
    except HTTPParseError as exc:
        trace.append(("error", exc.status, exc.error))
        if exc.status not in (400, 413, 431, 501, 505):
            raise Disagreement(f"{impl.__name__}: undocumented status {exc!r}") from exc
    return trace


def check_http(data: bytes) -> None:
    """Config bits 0-1: max_header_bytes; bits 2-3: max_body_bytes; bit 4: also one byte per read."""
    config, seed, stream = split_input(data)
    max_head, max_body = HTTP_MAX_HEAD[config & 3], HTTP_MAX_BODY[(config >> 2) & 3]
    plans = [[stream], cuts(stream, seed)]
    if config & 16 and len(stream) <= 2048:
        plans.append([stream[i:i + 1] for i in range(len(stream))])
    for reads in plans:
        agree(f"HTTP parser, {len(reads)} reads", run_http(_fastparse, reads, max_head, max_body),
              run_http(parser_py, reads, max_head, max_body), data)


# -- payload validator ----------------------------------------------------------------------------

FORMATS = ("json", "msgpack", "ndjson", "json")
RULES = (PayloadRules(), PayloadRules(max_fields=6, max_tags=4))
NOW = 1_732_406_400_000_000_000
VALIDATORS: list[tuple[Any, Any]] = [(_fastparse.Validator(rules), validator_py.Validator(rules)) for rules in RULES]


def run_validator(validator: Any, payload: bytes | memoryview, fmt: str, device_id: str | None) -> object:
    result = validator.validate(payload, fmt, "mqtt", device_id, NOW)
    records: list[object] = ["earlier"]
    rejections: list[object] = ["earlier"]
    count = validator.validate_into(payload, fmt, "mqtt", device_id, NOW, records, rejections)
    return result, count, records, rejections


def check_validator(data: bytes) -> None:
    """Config bits 0-1: format; bit 2: a device id from the connection; bit 3: the
    tight rules (6 fields, 4 tags); bit 4: the payload as a memoryview slice of a
    larger buffer (as MQTT hands it over)."""
    config, _seed, payload = split_input(data)
    fmt = FORMATS[config & 3]
    device_id = "meter-1" if config & 4 else None
    compiled, twin = VALIDATORS[(config >> 3) & 1]
    view: bytes | memoryview = memoryview(b"\0" + payload + b"\0")[1:-1] if config & 16 else payload
    agree(f"validator, {fmt}", run_validator(compiled, view, fmt, device_id),
          run_validator(twin, view, fmt, device_id), data)


# -- PROXY protocol header ----------------------------------------------------------------------
# Pure Python (read once per connection, not the hot path): no compiled side.
# The checks are the parser's own promises: only ProxyProtocolError escapes,
# any split of the bytes gives the same outcome, and header_part never lets a
# shell consume a byte past the header.

PROXY_MAX_HEADER = (1024, 52, 4096, 65551)


def run_proxy(version: int, reads: list[bytes], max_header: int) -> object:
    parser = ProxyHeaderParser(1 if version == 1 else 2, max_header_bytes=max_header)
    try:
        for i, chunk in enumerate(reads):
            parser.receive_data(chunk)
            event = parser.next_event()
            if event is not NEED_DATA:
                return ("header", event, parser.trailing + b"".join(reads[i + 1:]))
        return "need_data"
    except ProxyProtocolError as exc:
        if exc.reason not in PROXY_ERROR_REASONS:
            raise Disagreement(f"undocumented reason {exc!r}") from exc
        return ("error", exc.reason, exc.detail)


def peek_and_take(version: int, payload: bytes, window: int, max_header: int) -> tuple[object, int]:
    """What the shell ends with (blind reads of header_bytes_certain, else a
    peek of ``window`` bytes and header_part), and how many bytes it consumed."""
    parser = ProxyHeaderParser(1 if version == 1 else 2, max_header_bytes=max_header)
    pos = 0
    try:
        while parser.next_event() is NEED_DATA and pos < len(payload):
            take = parser.header_bytes_certain() or parser.header_part(payload[pos:pos + window])
            if take < 1:
                raise Disagreement(f"took {take} bytes before the header ended, on {payload!r}")
            parser.receive_data(payload[pos:pos + take])
            pos += take
        return parser.next_event(), pos
    except ProxyProtocolError as exc:
        return ("error", exc.reason), pos


def check_proxy(data: bytes) -> None:
    """config bit 0: a v1 listener (else v2); bits 1-2: max_header_bytes; bit 3: also byte by byte."""
    config, seed, payload = split_input(data)
    version = 1 if config & 1 else 2
    max_header = PROXY_MAX_HEADER[(config >> 1) & 3]
    whole = run_proxy(version, [payload], max_header)
    splits = [cuts(payload, seed)]
    if config & 8:
        splits.append([payload[i:i + 1] for i in range(len(payload))])
    for reads in splits:
        other = run_proxy(version, reads, max_header)
        if other != whole:
            raise Disagreement(f"proxy: {whole!r} whole but {other!r} in {len(reads)} reads, on {data!r}")
    result, consumed = peek_and_take(version, payload, 1 + seed % 64, max_header)
    if isinstance(result, ProxyHeader) and consumed != result.length:
        raise Disagreement(f"proxy: consumed {consumed} bytes of a {result.length}-byte header, on {data!r}")


# -- WebSocket masking ---------------------------------------------------------------------------
# Every client frame's payload goes through ws_unmask, and the load generator's
# windows of frames through ws_mask_frames; the release build has Cython's
# bounds checks off and walks 8 bytes at a time, so the lengths around the
# word boundaries and the arguments it must refuse matter most.


def mask_reference(data: bytes, key: bytes) -> bytes:
    """The byte-by-byte definition (RFC 6455 5.3), for the inputs both implementations accept."""
    return bytes(b ^ key[i & 3] for i, b in enumerate(data))


def as_buffer(data: bytes, kind: int, offset: int) -> bytes | bytearray | memoryview:
    """``data`` as bytes, a bytearray, or a memoryview that starts ``offset`` bytes
    into a buffer and ends at its end (an overread still leaves the allocation)."""
    if kind == 1:
        return bytearray(data)
    if kind >= 2:
        return memoryview(bytes(offset) + data)[offset:]
    return data


def check_wsmask_unmask(config: int, seed: int, stream: bytes) -> object:
    """Config bit 2: the key is ``seed % 9`` bytes (4 or not), else 4; bits 3-4: the
    kind of buffer; bit 5: key and payload as the decoder passes them, two
    slices of one frame (``buf[pos + head:start]``, ``buf[start:stop]``)."""
    key_len = seed % 9 if config & 4 else 4
    key, payload = bytes(bytearray(stream[:key_len])), bytes(bytearray(stream[key_len:]))
    kind, offset = (config >> 3) & 3, seed & 7
    if config & 32:
        frame = bytes(offset) + key + payload
        args: tuple[object, object] = (frame[offset + len(key):], frame[offset:offset + len(key)])
    else:
        args = (as_buffer(payload, kind, offset), as_buffer(key, 3 - kind, offset))
    compiled = outcome(lambda: _fastparse.ws_unmask(*args))
    agree("ws_unmask", compiled, outcome(lambda: wsmask_py.ws_unmask(*args)), stream)
    if len(key) == 4:
        agree("ws_unmask against the byte-by-byte reference", compiled, mask_reference(payload, key), stream)
    elif compiled is not ValueError:
        raise Disagreement(f"ws_unmask: a {len(key)}-byte key gave {compiled!r}, not a ValueError")
    return compiled


def check_wsmask_frames(config: int, seed: int, stream: bytes) -> object:
    """Config bit 2 clear: well-formed arguments (key_at ``seed % 16``, payload
    bytes the stream's first byte, as many frames as the rest holds, then their
    keys); set: arbitrary ones (frame_bytes and key_at from the stream's first
    two bytes, signed, the window cut at the third), to be refused alike."""
    kind, offset = (config >> 3) & 3, seed & 7
    head, rest = stream[:3], stream[3:]
    if config & 4:
        frame_bytes = int.from_bytes(head[:1] or b"\0", "big", signed=True)
        key_at = int.from_bytes(head[1:2] or b"\0", "big", signed=True) // 8
        cut = head[2] * len(rest) // 255 if len(head) > 2 else 0
        window, keys = rest[:cut], rest[cut:]
    else:
        key_at = seed % 16
        frame_bytes = key_at + 4 + (head[0] if head else 0)
        count = len(stream[1:]) // (frame_bytes + 4)
        window = stream[1:1 + count * frame_bytes]
        keys = stream[1 + count * frame_bytes:1 + count * (frame_bytes + 4)]
    window, keys = bytes(bytearray(window)), bytes(bytearray(keys))
    args = (as_buffer(window, kind, offset), frame_bytes, key_at, as_buffer(keys, 3 - kind, offset))
    compiled = outcome(lambda: _fastparse.ws_mask_frames(*args))
    agree("ws_mask_frames", compiled, outcome(lambda: wsmask_py.ws_mask_frames(*args)), stream)
    if not config & 4 and compiled != b"".join(
            window[i:i + key_at] + mask_reference(window[i + key_at:i + frame_bytes], keys[j:j + 4])
            for i, j in zip(range(0, len(window), frame_bytes), range(0, len(keys), 4), strict=True)):
        raise Disagreement(f"ws_mask_frames: {compiled!r} is not the byte-by-byte masking of {stream!r}")
    return compiled


def check_wsmask(data: bytes) -> None:
    """Config bit 0 clear: ws_unmask; set: ws_mask_frames (each its own layout
    above). Compiled and twin must give the same bytes, or refuse with the same
    error class, and what they accept must be the byte-by-byte masking."""
    config, seed, stream = split_input(data)
    (check_wsmask_frames if config & 1 else check_wsmask_unmask)(config, seed, stream)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "mqtt": check_mqtt,
    "mqtt5": check_mqtt5,
    "http": check_http,
    "validator": check_validator,
    "proxy": check_proxy,
    "wsmask": check_wsmask,
}
