"""The MQTT 3.1.1 server codec, one suite run against both implementations
(fixture ``mqtt_impl``: ``py-mqtt`` = gridgate.protocols.mqtt.codec_py, ``c-mqtt`` =
gridgate._fastparse).

Expected bytes come from the specification's examples (section cited in the
test name or comment) and from tests/mqtt_frames.py (built with struct,
independently of the code under test). Every decode test feeds its stream
whole, one byte at a time and in random chunks (``FEEDERS``), and errors are
compared whole: reason and CONNACK return code.
"""
from __future__ import annotations

import random

import pytest

from gridgate.errors import MQTTProtocolError
from gridgate.protocols.mqtt.codec_py import MQTT_ERROR_REASONS
from gridgate.protocols.mqtt.events import (
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    Connect,
    Disconnect,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Unsubscribe,
    Will,
)
from mqtt_frames import (
    gen_connack,
    gen_connect,
    gen_disconnect,
    gen_packet,
    gen_pingreq,
    gen_pingresp,
    gen_puback,
    gen_pubcomp,
    gen_publish,
    gen_pubrec,
    gen_pubrel,
    gen_suback,
    gen_subscribe,
    gen_unsuback,
    gen_unsubscribe,
    pack_remaining_length,
    pack_string,
)

MAX_PACKET = 268_435_455 + 5  # section 2.2.3: 4 length bytes + the type byte
CONNECT = gen_connect("meter-1", keepalive=60)
CONNECT_EVENT = Connect("MQTT", 4, True, 60, "meter-1", None, None, None)


def err(reason: str, return_code: int | None = None) -> MQTTProtocolError:
    return MQTTProtocolError(reason, return_code=return_code)


# -- feeding -------------------------------------------------------------------------


def feed_whole(codec, data: bytes) -> list:
    return codec.feed(data)


def feed_bytewise(codec, data: bytes) -> list:
    events = []
    for i in range(len(data)):
        events.extend(codec.feed(data[i:i + 1]))
    return events


def _random_feeder(seed: int):
    def feed_random(codec, data: bytes) -> list:
        rng = random.Random(seed)
        events, i = [], 0
        while i < len(data):
            n = rng.choice((0, 1, 2, 3, 5, 8, 13, 64, 300))  # 0: an empty read now and then
            events.extend(codec.feed(data[i:i + n]))
            i += n
        return events
    feed_random.__name__ = f"feed_random_{seed}"
    return feed_random


FEEDERS = [feed_whole, feed_bytewise] + [_random_feeder(seed) for seed in range(4)]


def decode(impl, data: bytes, **kw) -> list:
    """The events of a valid stream, checked to be the same however it is split."""
    results = []
    for feeder in FEEDERS:
        codec = impl.MQTTCodec(**kw)
        results.append(feeder(codec, data))
        assert codec.buffered == 0
    for events in results[1:]:
        assert events == results[0]
    return results[0]


def error_of(impl, data: bytes, **kw) -> MQTTProtocolError:
    """The error a stream raises, checked to be the same however it is split."""
    errors = []
    for feeder in FEEDERS:
        codec = impl.MQTTCodec(**kw)
        with pytest.raises(MQTTProtocolError) as info:
            feeder(codec, data)
        errors.append(info.value)
        assert info.value.reason in MQTT_ERROR_REASONS
    for e in errors[1:]:
        assert (e.reason, e.return_code) == (errors[0].reason, errors[0].return_code)
    return errors[0]


# -- section 2.2.3: remaining length ----------------------------------------------------

SPEC_REMAINING_LENGTH = [  # section 2.2.3, Table 2.4 (the bounds of 1-4 byte encodings)
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"), (16384, b"\x80\x80\x01"),
    (2097151, b"\xff\xff\x7f"), (2097152, b"\x80\x80\x80\x01"), (268435455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize("value, encoded", SPEC_REMAINING_LENGTH)
def test_remaining_length_table_2_4_of_section_2_2_3_is_decoded(mqtt_impl, value, encoded):
    """The decoder reads each bound exactly: max_packet_bytes one below the
    packet size refuses it on the fixed header alone, the exact size accepts
    the header and waits for the body (only a CONNECT fixed header is fed)."""
    assert pack_remaining_length(value) == encoded
    header = b"\x10" + encoded
    size = len(header) + value
    if size - 1 >= 2:
        with pytest.raises(MQTTProtocolError) as info:
            mqtt_impl.MQTTCodec(max_packet_bytes=size - 1).feed(header)
        assert info.value == err("too_large")
    waiting = mqtt_impl.MQTTCodec(max_packet_bytes=size)
    if value == 0:
        with pytest.raises(MQTTProtocolError) as info:  # complete, and a CONNECT cannot be empty
            waiting.feed(header)
        assert info.value == err("malformed")
    else:
        assert waiting.feed(header) == []
        assert waiting.buffered == len(header)


@pytest.mark.parametrize("value, encoded", [(v, e) for v, e in SPEC_REMAINING_LENGTH if 5 <= v <= 2097152])
def test_remaining_length_table_2_4_of_section_2_2_3_round_trips(mqtt_impl, value, encoded):
    payload = b"p" * (value - 5)  # topic "t" (3 bytes) + packet id (2)
    frame = mqtt_impl.encode_publish("t", payload, 1, 7)
    assert frame[:1 + len(encoded)] == b"\x32" + encoded
    assert frame == gen_publish("t", qos=1, mid=7, payload=payload)
    codec = mqtt_impl.MQTTCodec(max_packet_bytes=len(frame))
    assert codec.feed(CONNECT + frame) == [CONNECT_EVENT, Publish("t", payload, 1, 7, False, False)]


def test_remaining_length_of_five_bytes_is_malformed_section_2_2_3(mqtt_impl):
    # the 4th length byte still has its continuation bit: refused right there
    assert error_of(mqtt_impl, CONNECT + b"\x30\xff\xff\xff\xff", max_packet_bytes=MAX_PACKET) == err("malformed")
    codec = mqtt_impl.MQTTCodec(max_packet_bytes=MAX_PACKET)
    assert codec.feed(CONNECT + b"\x40\x80\x80\x80") == [CONNECT_EVENT]
    with pytest.raises(MQTTProtocolError) as info:
        codec.feed(b"\x80")
    assert info.value == err("malformed")


def test_ten_megabyte_remaining_length_is_refused_on_the_fixed_header(mqtt_impl):
    codec = mqtt_impl.MQTTCodec(max_packet_bytes=1_048_576)
    assert codec.feed(CONNECT) == [CONNECT_EVENT]
    header = b"\x30" + pack_remaining_length(10 * 1024 * 1024)
    assert len(header) == 5
    for i in range(len(header) - 1):  # an incomplete header is only waited for
        assert codec.feed(header[i:i + 1]) == []
    with pytest.raises(MQTTProtocolError) as info:
        codec.feed(header[-1:])  # no byte of the body was ever sent
    assert info.value == err("too_large")
    assert codec.buffered == 0


def test_max_packet_bytes_is_the_whole_packet_fixed_header_included(mqtt_impl):
    frame = gen_publish("t", qos=0, payload=b"x" * 100)
    codec = mqtt_impl.MQTTCodec(max_packet_bytes=len(frame))
    assert codec.max_packet_bytes == len(frame)
    assert codec.feed(CONNECT + frame)[1:] == [Publish("t", b"x" * 100, 0, 0, False, False)]
    assert error_of(mqtt_impl, CONNECT + frame, max_packet_bytes=len(frame) - 1) == err("too_large")
    # a CONNECT is measured too
    assert error_of(mqtt_impl, CONNECT, max_packet_bytes=len(CONNECT) - 1) == err("too_large")


@pytest.mark.parametrize("bad", [0, 1, MAX_PACKET + 1, -5])
def test_max_packet_bytes_out_of_range_is_a_value_error(mqtt_impl, bad):
    with pytest.raises(ValueError):
        mqtt_impl.MQTTCodec(max_packet_bytes=bad)


def test_max_packet_bytes_range_bounds_are_accepted(mqtt_impl):
    assert mqtt_impl.MQTTCodec(max_packet_bytes=2).max_packet_bytes == 2
    assert mqtt_impl.MQTTCodec(max_packet_bytes=MAX_PACKET).max_packet_bytes == MAX_PACKET
    assert mqtt_impl.MQTTCodec().max_packet_bytes == 1_048_576


# -- section 1.5.3: UTF-8 strings --------------------------------------------------------


def test_utf8_example_of_section_1_5_3(mqtt_impl):
    # Figure 1.1 example: "A" U+2A6D4 is encoded 0x00 0x05 0x41 0xF0 0xAA 0x9B 0x94
    encoded = b"\x00\x05\x41\xf0\xaa\x9b\x94"
    assert pack_string("A\U0002a6d4") == encoded
    frame = gen_packet(0x30, encoded + b"{}")
    assert decode(mqtt_impl, CONNECT + frame)[1:] == [Publish("A\U0002a6d4", b"{}", 0, 0, False, False)]
    assert mqtt_impl.encode_publish("A\U0002a6d4", b"{}") == frame


ILL_FORMED = {  # MQTT-1.5.3-1 (ill-formed UTF-8, surrogates) and MQTT-1.5.3-2 (U+0000)
    "invalid byte": b"\xff",
    "lone continuation": b"a\x80",
    "truncated sequence": b"\xe2\x82",
    "overlong NUL": b"\xc0\x80",
    "overlong slash": b"\xe0\x80\xaf",
    "surrogate U+D800": b"\xed\xa0\x80",
    "surrogate U+DFFF": b"\xed\xbf\xbf",
    "above U+10FFFF": b"\xf4\x90\x80\x80",
    "U+0000": b"a\x00b",
}


def _string_in(where: str, raw: bytes) -> bytes:
    if where == "publish topic":
        return CONNECT + gen_publish(raw, payload=b"{}")
    if where == "client id":
        return gen_connect(raw)
    if where == "will topic":
        return gen_connect("c", will_topic=raw, will_payload=b"w")
    if where == "user name":
        return gen_connect("c", username=raw)
    if where == "subscribe filter":
        return CONNECT + gen_subscribe(1, [(raw, 0)])
    return CONNECT + gen_unsubscribe(1, [raw])


WHERE = ["publish topic", "client id", "will topic", "user name", "subscribe filter", "unsubscribe filter"]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("raw", ILL_FORMED.values(), ids=ILL_FORMED.keys())
def test_ill_formed_strings_are_bad_utf8_section_1_5_3(mqtt_impl, where, raw):
    assert error_of(mqtt_impl, _string_in(where, raw)) == err("bad_utf8")


@pytest.mark.parametrize("text", ["\u00e9", "\u20ac", "\U0001f600", "\ufeff", "a b"])
def test_well_formed_strings_decode(mqtt_impl, text):
    # U+FEFF is kept as it is (MQTT-1.5.3-3: "MUST NOT be skipped or
    # stripped"); control characters and non-characters are refused
    # (tests/protocols/mqtt/test_mqtt311_strict.py)
    events = decode(mqtt_impl, gen_connect(text, username=text) + gen_subscribe(2, [(text, 1)])
                    + gen_publish(text, payload=b"1"))
    assert events == [Connect("MQTT", 4, True, 0, text, None, text, None), Subscribe(2, [(text, 1)]),
                      Publish(text, b"1", 0, 0, False, False)]


def test_password_and_will_message_are_binary_not_utf8(mqtt_impl):
    frame = gen_connect("c", will_topic="w", will_payload=b"\xff\x00", username="u", password=b"\xff\x00\xed\xa0")
    assert decode(mqtt_impl, frame) == [
        Connect("MQTT", 4, True, 0, "c", Will("w", b"\xff\x00", 0, False), "u", b"\xff\x00\xed\xa0")]


# -- section 3.1: CONNECT -------------------------------------------------------------------


def test_connect_variable_header_example_of_section_3_1_2_10(mqtt_impl):
    # Figure 3.6: protocol name "MQTT", level 4, connect flags 0xCE (user name,
    # password, Will QoS 1, Will flag, clean session), keep alive 10.
    variable = b"\x00\x04MQTT\x04\xce\x00\x0a"
    payload = b"\x00\x02id" + b"\x00\x01w" + b"\x00\x02wp" + b"\x00\x01u" + b"\x00\x02pw"
    frame = b"\x10" + pack_remaining_length(len(variable) + len(payload)) + variable + payload
    assert frame == gen_connect("id", keepalive=10, will_topic="w", will_payload=b"wp", will_qos=1,
                                username="u", password=b"pw")
    assert decode(mqtt_impl, frame) == [Connect("MQTT", 4, True, 10, "id", Will("w", b"wp", 1, False), "u", b"pw")]


@pytest.mark.parametrize("kw, event", [
    ({}, Connect("MQTT", 4, True, 0, "c", None, None, None)),
    ({"clean_session": False, "keepalive": 65535}, Connect("MQTT", 4, False, 65535, "c", None, None, None)),
    ({"will_topic": "a/b", "will_payload": b"", "will_qos": 2, "will_retain": True},
     Connect("MQTT", 4, True, 0, "c", Will("a/b", b"", 2, True), None, None)),
    ({"username": "", "password": b""}, Connect("MQTT", 4, True, 0, "c", None, "", b"")),
    ({"username": "user"}, Connect("MQTT", 4, True, 0, "c", None, "user", None)),
])
def test_connect_fields_decode(mqtt_impl, kw, event):
    assert decode(mqtt_impl, gen_connect("c", **kw)) == [event]


def test_empty_client_id_with_clean_session_is_accepted_mqtt_3_1_3_6(mqtt_impl):
    assert decode(mqtt_impl, gen_connect("")) == [Connect("MQTT", 4, True, 0, "", None, None, None)]


def test_mqtt_3_1_connect_is_accepted(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    assert (codec.connected, codec.protocol_level) == (False, 0)
    assert codec.feed(gen_connect("old-meter", proto_name=b"MQIsdp", proto_ver=3, keepalive=30)) == [
        Connect("MQIsdp", 3, True, 30, "old-meter", None, None, None)]
    assert (codec.connected, codec.protocol_level) == (True, 3)


def test_mqtt_3_1_1_connect_sets_the_state(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    assert codec.feed(CONNECT[:5]) == []
    assert (codec.connected, codec.protocol_level, codec.buffered) == (False, 0, 5)
    assert codec.feed(CONNECT[5:]) == [CONNECT_EVENT]
    assert (codec.connected, codec.protocol_level, codec.buffered) == (True, 4, 0)


UNSUPPORTED = [(b"MQTT", 3), (b"MQTT", 5), (b"MQTT", 0), (b"MQIsdp", 4), (b"MQIsdp", 5), (b"mqtt", 4),
               (b"MQTTT", 4), (b"HTTP", 4), (b"", 4), (b"\xff\xfe", 4)]


@pytest.mark.parametrize("name, level", UNSUPPORTED)
def test_unsupported_protocol_gets_return_code_1_mqtt_3_1_2_2(mqtt_impl, name, level):
    assert error_of(mqtt_impl, gen_connect("x", proto_name=name, proto_ver=level)) == err("unsupported_protocol", 1)


def test_protocol_is_checked_before_anything_else_in_the_variable_header(mqtt_impl):
    # an MQTT 5 CONNECT (properties after keep alive) with a reserved flag
    # set and nonsense after it still gets CONNACK 0x01
    body = pack_string(b"MQTT") + b"\x05\x03\x00\x3c" + b"\x05\x11\x00\x00\x00\x0a" + b"\xff" * 3
    codec = mqtt_impl.MQTTCodec()
    with pytest.raises(MQTTProtocolError) as info:
        codec.feed(gen_packet(0x10, body))
    assert info.value == err("unsupported_protocol", 1)
    assert (codec.connected, codec.protocol_level) == (False, 0)


def test_empty_client_id_without_clean_session_gets_return_code_2_mqtt_3_1_3_8(mqtt_impl):
    assert error_of(mqtt_impl, gen_connect("", clean_session=False)) == err("identifier_rejected", 2)


@pytest.mark.parametrize("flags, statement", [
    (0x03, "MQTT-3.1.2-3 reserved flag"),
    (0x01, "MQTT-3.1.2-3 reserved flag, clean session 0"),
    (0x0A, "MQTT-3.1.2-13 Will QoS 1 without Will flag"),
    (0x12, "MQTT-3.1.2-13 Will QoS 2 without Will flag"),
    (0x1A, "MQTT-3.1.2-11 Will QoS 3 without Will flag"),
    (0x22, "MQTT-3.1.2-15 Will Retain without Will flag"),
    (0x1E, "MQTT-3.1.2-14 Will QoS 3"),
    (0x3E, "MQTT-3.1.2-14 Will QoS 3 with Will Retain"),
    (0x42, "MQTT-3.1.2-22 password without user name"),
    (0x66, "MQTT-3.1.2-22 password without user name, with a Will"),
])
def test_connect_flag_violations_are_malformed(mqtt_impl, flags, statement):
    payload = pack_string("c") + pack_string("w") + pack_string(b"m") + pack_string(b"p")
    frame = gen_packet(0x10, pack_string(b"MQTT") + bytes([4, flags, 0, 0]) + payload)
    assert error_of(mqtt_impl, frame) == err("malformed")


@pytest.mark.parametrize("topic", ["a/#", "#", "+", "a/+/b", ""])
def test_will_topic_must_be_a_valid_topic_name(mqtt_impl, topic):
    # MQTT-3.1.3-10 (a UTF-8 topic name), MQTT-3.3.2-2 / 4.7.3-1 (no wildcards, not empty)
    assert error_of(mqtt_impl, gen_connect("c", will_topic=topic, will_payload=b"bye")) == err("bad_topic")


def test_connect_fields_must_fill_the_remaining_length_exactly(mqtt_impl):
    full = gen_connect("client", keepalive=5, will_topic="will/t", will_payload=b"gone", will_qos=1,
                       username="u", password=b"secret")
    body = full[2:]
    assert full[1] == len(body)
    for k in range(len(body)):  # every truncation runs a field past the packet
        assert error_of(mqtt_impl, gen_packet(0x10, body[:k])) == err("malformed"), k
    assert error_of(mqtt_impl, gen_packet(0x10, body + b"\x00")) == err("malformed")
    # a name cut short is malformed, not an unsupported protocol
    assert error_of(mqtt_impl, gen_packet(0x10, b"\x00\x04MQ")) == err("malformed")


def test_identifier_rejected_comes_after_the_fields_are_read(mqtt_impl):
    frame = gen_connect("", clean_session=False)
    assert error_of(mqtt_impl, gen_packet(0x10, frame[2:] + b"!")) == err("malformed")


def test_first_packet_must_be_connect_mqtt_3_1_0_1(mqtt_impl):
    for frame in (gen_publish("telemetry", payload=b"{}"), gen_pingreq(), gen_subscribe(1, [("a", 0)]),
                  gen_puback(1), gen_disconnect(), gen_connack(0), b"\x00\x00", b"\xf0\x00", b"GET / HTTP/1.1\r\n"):
        assert error_of(mqtt_impl, frame) == err("expected_connect"), frame


@pytest.mark.parametrize("first", [0x11, 0x12, 0x14, 0x18, 0x1F])
def test_connect_with_fixed_header_flags_is_bad_flags_mqtt_2_2_2_2(mqtt_impl, first):
    assert error_of(mqtt_impl, gen_connect("c", first=first)) == err("bad_flags")


def test_second_connect_is_a_violation_mqtt_3_1_0_2(mqtt_impl):
    assert error_of(mqtt_impl, CONNECT + CONNECT) == err("duplicate_connect")
    assert error_of(mqtt_impl, CONNECT + gen_connect("x", proto_name=b"MQIsdp", proto_ver=3)) == err(
        "duplicate_connect")
    # decided on the first byte: a second CONNECT is refused before its body
    codec = mqtt_impl.MQTTCodec()
    codec.feed(CONNECT)
    with pytest.raises(MQTTProtocolError) as info:
        codec.feed(b"\x10")
    assert info.value == err("duplicate_connect")


# -- section 2.2: every first byte, before and after CONNECT --------------------------------------

# Table 2.2.2, written out from the specification: the flags each
# client-to-server packet type must carry. PUBLISH (3) carries DUP/QoS/RETAIN.
SPEC_FLAGS = {1: 0b0000, 4: 0b0000, 5: 0b0000, 6: 0b0010, 7: 0b0000, 8: 0b0010, 10: 0b0010, 12: 0b0000,
              14: 0b0000}
SERVER_ONLY = {2: "CONNACK", 9: "SUBACK", 11: "UNSUBACK", 13: "PINGRESP"}


def spec_first_byte_reason(first: int, connected: bool) -> str | None:
    ptype, flags = first >> 4, first & 0xF
    if not connected:
        return "expected_connect" if ptype != 1 else ("bad_flags" if flags else None)
    if ptype in (0, 15):
        return "malformed"  # 2.2.1: reserved
    if ptype == 1:
        return "duplicate_connect"
    if ptype in SERVER_ONLY:
        return "unexpected_packet"
    if ptype == 3:
        qos = (flags >> 1) & 3
        return "malformed" if qos == 3 else "bad_flags" if (flags & 8 and qos == 0) else None
    return None if flags == SPEC_FLAGS[ptype] else "bad_flags"


@pytest.mark.parametrize("connected", [False, True], ids=["before-connect", "after-connect"])
def test_every_first_byte_is_judged_as_soon_as_it_arrives_table_2_2_2(mqtt_impl, connected):
    got, expected = {}, {}
    for first in range(256):
        codec = mqtt_impl.MQTTCodec()
        if connected:
            codec.feed(CONNECT)
        try:
            assert codec.feed(bytes([first])) == []
            assert codec.buffered == 1
            got[first] = None
        except MQTTProtocolError as exc:
            got[first] = exc.reason
        expected[first] = spec_first_byte_reason(first, connected)
    assert got == expected
    # before: CONNECT 0x10 only; after: 8 types with fixed flags + 10 PUBLISH flag combinations
    assert sum(v is None for v in got.values()) == (1 if not connected else 8 + 10)


# -- section 3.3: PUBLISH -------------------------------------------------------------------------


def test_publish_variable_header_example_of_section_3_3_2_3(mqtt_impl):
    # Figure 3.11: topic name "a/b", packet identifier 10
    variable = b"\x00\x03a/b\x00\x0a"
    frame = b"\x32" + pack_remaining_length(len(variable) + 2) + variable + b"{}"
    assert frame == gen_publish("a/b", qos=1, mid=10, payload=b"{}")
    assert decode(mqtt_impl, CONNECT + frame)[1:] == [Publish("a/b", b"{}", 1, 10, False, False)]
    assert mqtt_impl.encode_publish("a/b", b"{}", qos=1, packet_id=10) == frame


@pytest.mark.parametrize("qos, retain, dup", [(q, r, d) for q in (0, 1, 2) for r in (False, True)
                                              for d in (False, True) if not (d and q == 0)])
def test_publish_flags_decode_section_3_3_1(mqtt_impl, qos, retain, dup):
    mid = 0 if qos == 0 else 77
    frame = gen_publish("telemetry", qos=qos, mid=mid, retain=retain, dup=dup, payload=b'{"x":1}')
    assert decode(mqtt_impl, CONNECT + frame)[1:] == [Publish("telemetry", b'{"x":1}', qos, mid, retain, dup)]


def test_empty_payload_is_allowed_section_3_3_3(mqtt_impl):
    events = decode(mqtt_impl, CONNECT + gen_publish("t") + gen_publish("t", qos=2, mid=65535))
    assert events[1:] == [Publish("t", b"", 0, 0, False, False), Publish("t", b"", 2, 65535, False, False)]


def test_topic_changes_and_repeats_decode_right(mqtt_impl):
    # (the compiled codec caches the last topic: repeats, changes, lookalikes)
    topics = ["a", "a", "b", "a", "ab", "a", "\u00e9", "\u00e9", "a/b", "a/c", "a/b"]
    stream = CONNECT + b"".join(gen_publish(t, payload=t.encode()) for t in topics)
    assert [(e.topic, bytes(e.payload)) for e in decode(mqtt_impl, stream)[1:]] == [(t, t.encode()) for t in topics]


@pytest.mark.parametrize("bad", ["", "a/+", "#"])
def test_a_bad_topic_after_good_ones_is_still_refused(mqtt_impl, bad):
    stream = CONNECT + gen_publish("a", payload=b"1") + gen_publish("a", payload=b"2") + gen_publish(bad)
    assert error_of(mqtt_impl, stream) == err("bad_topic")


class TestZeroCopyPayload:
    """Publish.payload is a read-only memoryview slice of an immutable bytes object."""

    def test_a_packet_inside_one_read_is_a_slice_of_that_very_object(self, mqtt_impl):
        codec = mqtt_impl.MQTTCodec()
        codec.feed(CONNECT)
        data = gen_publish("t", qos=1, mid=1, payload=b"abc") + gen_publish("u", payload=b"defg")
        first, second = codec.feed(data)
        for ev, raw in ((first, b"abc"), (second, b"defg")):
            view = ev.payload
            assert type(view) is memoryview
            assert view.obj is data
            assert view.readonly
            assert bytes(view) == view.tobytes() == raw
            assert (len(view), view.nbytes, view.ndim, view.shape, view.strides) == (len(raw), len(raw), 1,
                                                                                      (len(raw),), (1,))
            assert (view.format, view.itemsize, view.c_contiguous, view.contiguous) == ("B", 1, True, True)
            assert hash(view) == hash(raw)
            assert view[1:3] == raw[1:3] and view[::-1] == raw[::-1] and view[-1] == raw[-1]
            assert view.cast("c")[0] == raw[:1]
            with pytest.raises(TypeError):
                view[0] = 0

    def test_releasing_one_view_leaves_the_others(self, mqtt_impl):
        codec = mqtt_impl.MQTTCodec()
        codec.feed(CONNECT)
        data = b"".join(gen_publish("t", payload=bytes([65 + i]) * 3) for i in range(3))
        events = codec.feed(data)
        events[1].payload.release()
        assert [bytes(events[i].payload) for i in (0, 2)] == [b"AAA", b"CCC"]

    def test_an_empty_payload_is_an_empty_view(self, mqtt_impl):
        codec = mqtt_impl.MQTTCodec()
        codec.feed(CONNECT)
        data = gen_publish("t")
        (ev,) = codec.feed(data)
        assert type(ev.payload) is memoryview and ev.payload.obj is data and len(ev.payload) == 0

    def test_a_packet_over_two_reads_is_copied_alone(self, mqtt_impl):
        codec = mqtt_impl.MQTTCodec()
        straddling = gen_publish("t", qos=1, mid=1, payload=b"straddles")
        assert codec.feed(CONNECT + straddling[:6]) == [CONNECT_EVENT]
        data = straddling[6:] + gen_publish("t", payload=b"inside")
        first, second = codec.feed(data)
        assert first == Publish("t", b"straddles", 1, 1, False, False)
        assert type(first.payload) is memoryview and first.payload.readonly
        assert type(first.payload.obj) is bytes and first.payload.obj == straddling  # that packet only
        assert second.payload.obj is data  # the packets after it are not copied

    def test_mutable_input_is_copied_before_slicing(self, mqtt_impl):
        codec = mqtt_impl.MQTTCodec()
        codec.feed(CONNECT)
        for kind in (bytearray, memoryview):
            buf = bytearray(gen_publish("t", payload=b"abc"))
            (ev,) = codec.feed(kind(buf))
            buf[-3:] = b"zzz"
            assert ev.payload == b"abc" and type(ev.payload.obj) is bytes

    def test_bytes_subclass_is_accepted(self, mqtt_impl):
        class Sub(bytes):
            pass
        codec = mqtt_impl.MQTTCodec()
        assert codec.feed(Sub(CONNECT)) == [CONNECT_EVENT]


# -- sections 3.4-3.7, 3.12, 3.14: acknowledgements, PINGREQ, DISCONNECT ------------------------------


@pytest.mark.parametrize("frame, event", [
    (gen_puback(1), PubAck(1)), (gen_puback(65535), PubAck(65535)), (gen_pubrec(258), PubRec(258)),
    (gen_pubrel(9), PubRel(9)), (gen_pubcomp(300), PubComp(300)), (gen_pingreq(), PingReq()),
    (gen_disconnect(), Disconnect()),
])
def test_small_packets_decode(mqtt_impl, frame, event):
    assert decode(mqtt_impl, CONNECT + frame) == [CONNECT_EVENT, event]


def test_disconnect_then_nothing_is_fine_and_then_any_byte_is_a_violation(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    assert codec.feed(CONNECT + gen_disconnect()) == [CONNECT_EVENT, Disconnect()]
    assert codec.feed(b"") == []
    with pytest.raises(MQTTProtocolError) as info:
        codec.feed(b"\xc0")  # MQTT-3.14.4-1: the client closes after DISCONNECT
    assert info.value == err("data_after_disconnect")


# -- sections 3.8, 3.10: SUBSCRIBE, UNSUBSCRIBE ------------------------------------------------------


def test_subscribe_example_of_section_3_8(mqtt_impl):
    # 3.8.2: packet identifier 10 (Figure 3.21); 3.8.3, Table 3.5: "a/b" QoS 1, "c/d" QoS 2
    payload = b"\x00\x03a/b\x01\x00\x03c/d\x02"
    frame = b"\x82" + pack_remaining_length(2 + len(payload)) + b"\x00\x0a" + payload
    assert frame == gen_subscribe(10, [("a/b", 1), ("c/d", 2)])
    assert decode(mqtt_impl, CONNECT + frame)[1:] == [Subscribe(10, [("a/b", 1), ("c/d", 2)])]


def test_unsubscribe_example_of_section_3_10(mqtt_impl):
    # 3.10.2: packet identifier 10; 3.10.3, Table 3.7: "a/b", "c/d"
    payload = b"\x00\x03a/b\x00\x03c/d"
    frame = b"\xa2" + pack_remaining_length(2 + len(payload)) + b"\x00\x0a" + payload
    assert frame == gen_unsubscribe(10, ["a/b", "c/d"])
    assert decode(mqtt_impl, CONNECT + frame)[1:] == [Unsubscribe(10, ["a/b", "c/d"])]


# Section 4.7.1 / 4.7.3 examples of valid filters
VALID_FILTERS = ["sport/tennis/player1/#", "sport/#", "#", "+", "+/tennis/#", "sport/+/player1", "/+", "+/+",
                 "sport/tennis/#", "sport/+", "/", "//", "a//b", "+//+", "$SYS/#", "/finance", "a/+/+/#", " "]
# ... and invalid ones (MQTT-4.7.1-2/3, MQTT-4.7.3-1)
INVALID_FILTERS = ["sport/tennis#", "sport/tennis/#/ranking", "sport+", "#/", "##", "a/#/", "++", "+#", "#+",
                   "a/b+", "a/+b/c", "+a", ""]


@pytest.mark.parametrize("topic", VALID_FILTERS)
def test_valid_topic_filters_section_4_7_1(mqtt_impl, topic):
    stream = CONNECT + gen_subscribe(1, [(topic, 2)]) + gen_unsubscribe(2, [topic])
    assert decode(mqtt_impl, stream)[1:] == [Subscribe(1, [(topic, 2)]), Unsubscribe(2, [topic])]


@pytest.mark.parametrize("topic", INVALID_FILTERS)
def test_invalid_topic_filters_section_4_7_1(mqtt_impl, topic):
    assert error_of(mqtt_impl, CONNECT + gen_subscribe(1, [("ok", 0), (topic, 0)])) == err("bad_topic_filter")
    assert error_of(mqtt_impl, CONNECT + gen_unsubscribe(1, ["ok", topic])) == err("bad_topic_filter")


@pytest.mark.parametrize("options", [0x03, 0x04, 0x40, 0x80, 0x81, 0xFC, 0xFF])
def test_subscribe_requested_qos_reserved_bits_are_malformed_mqtt_3_8_3_4(mqtt_impl, options):
    assert error_of(mqtt_impl, CONNECT + gen_subscribe(1, [("a", 0), ("b", options)])) == err("malformed")


def test_subscribe_many_filters(mqtt_impl):
    topics = [(f"devices/m{i}/commands", i % 3) for i in range(200)]  # remaining length > 127: 2 bytes
    assert decode(mqtt_impl, CONNECT + gen_subscribe(65535, topics))[1:] == [Subscribe(65535, topics)]


# -- every violation, whole and split ---------------------------------------------------------------

C = CONNECT
VIOLATIONS = {
    # fixed header (section 2.2)
    "2.2.1 reserved type 0": (C + b"\x00\x00", "malformed"),
    "2.2.1 reserved type 15": (C + b"\xf0\x00", "malformed"),
    "2.2.3 five length bytes": (C + b"\xc0\x80\x80\x80\x80\x01", "malformed"),
    "too large": (C + gen_publish("t", payload=b"x" * 2000), "too_large"),
    "too large wins over the body": (C + gen_publish("a/+", payload=b"x" * 2000), "too_large"),
    # MQTT-2.2.2-1/2: flags of table 2.2.2
    "PUBACK flags": (C + b"\x41\x02\x00\x01", "bad_flags"),
    "PUBREC flags": (C + b"\x58\x02\x00\x01", "bad_flags"),
    "PUBREL flags 0": (C + b"\x60\x02\x00\x01", "bad_flags"),
    "PUBREL flags 3": (C + b"\x63\x02\x00\x01", "bad_flags"),
    "PUBCOMP flags": (C + b"\x7f\x02\x00\x01", "bad_flags"),
    "SUBSCRIBE flags 0": (C + gen_subscribe(1, [("a", 0)], first=0x80), "bad_flags"),
    "SUBSCRIBE flags 3": (C + gen_subscribe(1, [("a", 0)], first=0x83), "bad_flags"),
    "UNSUBSCRIBE flags 0": (C + gen_unsubscribe(1, ["a"], first=0xA0), "bad_flags"),
    "UNSUBSCRIBE flags 8": (C + gen_unsubscribe(1, ["a"], first=0xAA), "bad_flags"),
    "PINGREQ flags": (C + b"\xc1\x00", "bad_flags"),
    "DISCONNECT flags": (C + b"\xe8\x00", "bad_flags"),
    # PUBLISH (section 3.3)
    "MQTT-3.3.1-4 QoS 3": (C + gen_publish("t", first=0x36, mid=1), "malformed"),
    "MQTT-3.3.1-4 QoS 3 DUP RETAIN": (C + gen_publish("t", first=0x3F, mid=1), "malformed"),
    "MQTT-3.3.1-2 DUP on QoS 0": (C + gen_publish("t", first=0x38), "bad_flags"),
    "MQTT-3.3.1-2 DUP on QoS 0 RETAIN": (C + gen_publish("t", first=0x39), "bad_flags"),
    "MQTT-3.3.2-2 '+' in topic": (C + gen_publish("a/+/c", payload=b"{}"), "bad_topic"),
    "MQTT-3.3.2-2 '#' in topic": (C + gen_publish("a/#", payload=b"{}"), "bad_topic"),
    "MQTT-3.3.2-2 wildcard inside a level": (C + gen_publish("a/b#", payload=b"{}"), "bad_topic"),
    "MQTT-4.7.3-1 empty topic": (C + gen_publish("", payload=b"{}"), "bad_topic"),
    "MQTT-4.7.3-1 empty topic QoS 1": (C + gen_publish("", qos=1, mid=1), "bad_topic"),
    "MQTT-2.3.1-1 QoS 1 packet id 0": (C + gen_publish("t", qos=1, mid=0, payload=b"{}"), "bad_packet_id"),
    "MQTT-2.3.1-1 QoS 2 packet id 0": (C + gen_publish("t", qos=2, mid=0), "bad_packet_id"),
    "PUBLISH topic runs past the packet": (C + b"\x30\x04\x00\x05ab", "malformed"),
    "PUBLISH empty body": (C + b"\x30\x00", "malformed"),
    "PUBLISH one-byte body": (C + b"\x30\x01\x00", "malformed"),
    "PUBLISH QoS 1 without room for the packet id": (C + b"\x32\x03\x00\x01t", "malformed"),
    "PUBLISH QoS 1 half a packet id": (C + b"\x32\x04\x00\x01t\x00", "malformed"),
    # acknowledgements (sections 3.4-3.7): remaining length 2, packet id non-zero
    **{f"{name} remaining length {n}": (C + gen_packet(first, b"\x00\x01\x00"[:n]), "malformed")
       for name, first in (("PUBACK", 0x40), ("PUBREC", 0x50), ("PUBREL", 0x62), ("PUBCOMP", 0x70))
       for n in (0, 1, 3)},
    **{f"MQTT-2.3.1-1 {name} packet id 0": (C + gen_packet(first, b"\x00\x00"), "bad_packet_id")
       for name, first in (("PUBACK", 0x40), ("PUBREC", 0x50), ("PUBREL", 0x62), ("PUBCOMP", 0x70))},
    "PINGREQ with a body": (C + b"\xc0\x01\x00", "malformed"),
    "DISCONNECT with a body": (C + b"\xe0\x01\x00", "malformed"),
    # packets only servers send
    "CONNACK from a client": (C + gen_connack(0), "unexpected_packet"),
    "SUBACK from a client": (C + gen_suback(1, [0]), "unexpected_packet"),
    "UNSUBACK from a client": (C + gen_unsuback(1), "unexpected_packet"),
    "PINGRESP from a client": (C + gen_pingresp(), "unexpected_packet"),
    "CONNACK with odd flags": (C + b"\x2f\x02\x00\x00", "unexpected_packet"),
    # connection state (sections 3.1, 3.14)
    "MQTT-3.1.0-1 PUBLISH first": (gen_publish("t", payload=b"{}"), "expected_connect"),
    "MQTT-3.1.0-1 reserved type first": (b"\x00\x00", "expected_connect"),
    "MQTT-3.1.0-2 second CONNECT": (C + C, "duplicate_connect"),
    "MQTT-2.2.2-2 CONNECT flags": (gen_connect("c", first=0x12), "bad_flags"),
    "MQTT-3.14.4-1 PINGREQ after DISCONNECT": (C + gen_disconnect() + gen_pingreq(), "data_after_disconnect"),
    "MQTT-3.14.4-1 a zero byte after DISCONNECT": (C + gen_disconnect() + b"\x00", "data_after_disconnect"),
    # CONNECT (section 3.1)
    "MQTT-3.1.2-2 level 5": (gen_connect("c", proto_ver=5), "unsupported_protocol", 1),
    "MQTT-3.1.2-1 name MQIsdp with level 4": (gen_connect("c", proto_name=b"MQIsdp"), "unsupported_protocol", 1),
    "MQTT-3.1.2-3 reserved connect flag": (gen_connect("c", flags=0x03), "malformed"),
    "MQTT-3.1.2-13 Will QoS without Will": (gen_connect("c", flags=0x0A), "malformed"),
    "MQTT-3.1.2-15 Will Retain without Will": (gen_connect("c", flags=0x22), "malformed"),
    "MQTT-3.1.2-14 Will QoS 3": (gen_connect("c", will_topic="w", will_qos=3), "malformed"),
    "MQTT-3.1.2-22 password without user name": (gen_connect("c", flags=0x42), "malformed"),
    "MQTT-3.1.3-8 empty client id, CleanSession 0": (gen_connect("", clean_session=False),
                                                      "identifier_rejected", 2),
    "Will topic with a wildcard": (gen_connect("c", will_topic="a/+"), "bad_topic"),
    "Will topic empty": (gen_connect("c", will_topic=""), "bad_topic"),
    "CONNECT with a byte too many": (gen_packet(0x10, gen_connect("c")[2:] + b"\x00"), "malformed"),
    "CONNECT without the client id": (gen_packet(0x10, gen_connect("c")[2:12]), "malformed"),
    "CONNECT with a client id past the packet": (gen_packet(0x10, gen_connect("c")[2:12] + b"\x00\x05ab"),
                                                 "malformed"),
    "CONNECT user name flag without the field": (gen_connect("c", flags=0x82), "malformed"),
    "client id with U+0000": (gen_connect("a\x00"), "bad_utf8"),
    # SUBSCRIBE / UNSUBSCRIBE (sections 3.8, 3.10)
    "MQTT-2.3.1-1 SUBSCRIBE packet id 0": (C + gen_subscribe(0, [("a", 0)]), "bad_packet_id"),
    "MQTT-2.3.1-1 UNSUBSCRIBE packet id 0": (C + gen_unsubscribe(0, ["a"]), "bad_packet_id"),
    "MQTT-3.8.3-3 SUBSCRIBE without filters": (C + gen_subscribe(1, []), "malformed"),
    "MQTT-3.10.3-2 UNSUBSCRIBE without filters": (C + gen_unsubscribe(1, []), "malformed"),
    "SUBSCRIBE without a packet id": (C + gen_packet(0x82, b"\x00"), "malformed"),
    "UNSUBSCRIBE without a packet id": (C + gen_packet(0xA2, b""), "malformed"),
    "MQTT-3-8.3-4 requested QoS 3": (C + gen_subscribe(1, [("a", 3)]), "malformed"),
    "MQTT-3-8.3-4 reserved bits": (C + gen_subscribe(1, [("a", 0x41)]), "malformed"),
    "SUBSCRIBE without the QoS byte": (C + gen_packet(0x82, b"\x00\x01\x00\x01a"), "malformed"),
    "SUBSCRIBE filter past the packet": (C + gen_packet(0x82, b"\x00\x01\x00\x09a\x00"), "malformed"),
    "SUBSCRIBE half a length prefix": (C + gen_packet(0x82, b"\x00\x01\x00\x01a\x00\x00"), "malformed"),
    "UNSUBSCRIBE filter past the packet": (C + gen_packet(0xA2, b"\x00\x01\x00\x02a"), "malformed"),
    "MQTT-4.7.1-2 '#' not last": (C + gen_subscribe(1, [("a/#/b", 0)]), "bad_topic_filter"),
    "MQTT-4.7.1-3 '+' inside a level": (C + gen_unsubscribe(1, ["a+/b"]), "bad_topic_filter"),
    "MQTT-4.7.3-1 empty filter": (C + gen_subscribe(1, [("", 0)]), "bad_topic_filter"),
    "filter with U+0000": (C + gen_unsubscribe(1, ["a\x00"]), "bad_utf8"),
    "topic with a control character": (C + gen_publish("a\x1b[2J", payload=b"{}"), "bad_char"),
    "MQTT 3.1 client id over 23 bytes": (gen_connect("m" * 24, proto_name=b"MQIsdp", proto_ver=3),
                                         "identifier_rejected", 2),
}


@pytest.mark.parametrize("name", VIOLATIONS)
def test_violation(mqtt_impl, name):
    stream, reason, *rc = VIOLATIONS[name]
    assert error_of(mqtt_impl, stream, max_packet_bytes=1024) == err(reason, *rc)


def test_violations_cover_every_documented_reason():
    assert {case[1] for case in VIOLATIONS.values()} == set(MQTT_ERROR_REASONS)
    assert len(set(MQTT_ERROR_REASONS)) == len(MQTT_ERROR_REASONS) == 14


def test_precedence_first_byte_then_length_then_body(mqtt_impl):
    # the first byte decides before the (bad) length and body
    assert error_of(mqtt_impl, C + b"\x36\xff\xff\xff\xff\xff", max_packet_bytes=64) == err("malformed")
    assert error_of(mqtt_impl, C + b"\x90\xff\xff\xff\xff\xff", max_packet_bytes=64) == err("unexpected_packet")
    # the length before the body
    assert error_of(mqtt_impl, C + gen_publish("", qos=1, mid=0, payload=b"x" * 100),
                    max_packet_bytes=64) == err("too_large")
    # within the body, wire order: topic before packet id
    assert error_of(mqtt_impl, C + gen_publish("+", qos=1, mid=0)) == err("bad_topic")
    assert error_of(mqtt_impl, C + gen_subscribe(0, [])) == err("bad_packet_id")
    assert error_of(mqtt_impl, C + gen_subscribe(1, [("a#", 7)])) == err("bad_topic_filter")


# -- a dead codec, and events before an error ------------------------------------------------------


def test_after_an_error_the_codec_is_dead(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    with pytest.raises(MQTTProtocolError) as first:
        codec.feed(gen_connect("x", proto_ver=5))
    assert first.value == err("unsupported_protocol", 1)
    for data in (CONNECT, b"", gen_pingreq()):
        with pytest.raises(MQTTProtocolError) as again:
            codec.feed(data)
        assert again.value == err("unsupported_protocol", 1)
    assert (codec.connected, codec.protocol_level, codec.buffered) == (False, 0, 0)


def test_an_error_mid_read_drops_the_buffer(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    codec.feed(CONNECT + gen_publish("t", payload=b"1")[:3])
    assert codec.buffered == 3
    with pytest.raises(MQTTProtocolError) as info:
        codec.feed(gen_publish("t", payload=b"1")[3:] + b"\xd0\x00" + b"\x30\x05")
    assert info.value == err("unexpected_packet")
    assert codec.buffered == 0


# -- split and merged reads ----------------------------------------------------------------------------

STREAM = (CONNECT + gen_publish("telemetry", qos=1, mid=1, payload=b'{"temperature": 21}')
          + gen_publish("devices/meter-1/telemetry", qos=2, mid=2, payload=b"\x81\xa1x\x01")
          + gen_pubrel(2) + gen_subscribe(3, [("devices/meter-1/commands", 1), ("a/+/#", 0)]) + gen_pingreq()
          + gen_puback(4) + gen_pubrec(5) + gen_pubcomp(6)
          + gen_unsubscribe(7, ["devices/meter-1/commands"])
          + gen_publish("telemetry", qos=0, retain=True, payload=b"x" * 300)
          + gen_publish("telemetry", qos=1, mid=8, dup=True, payload=b"y" * 20000)
          + gen_publish("telemetry", qos=0) + gen_disconnect())
STREAM_EVENTS = [
    CONNECT_EVENT,
    Publish("telemetry", b'{"temperature": 21}', 1, 1, False, False),
    Publish("devices/meter-1/telemetry", b"\x81\xa1x\x01", 2, 2, False, False),
    PubRel(2), Subscribe(3, [("devices/meter-1/commands", 1), ("a/+/#", 0)]), PingReq(), PubAck(4), PubRec(5),
    PubComp(6), Unsubscribe(7, ["devices/meter-1/commands"]), Publish("telemetry", b"x" * 300, 0, 0, True, False),
    Publish("telemetry", b"y" * 20000, 1, 8, False, True), Publish("telemetry", b"", 0, 0, False, False),
    Disconnect(),
]


@pytest.mark.parametrize("feeder", FEEDERS, ids=lambda f: f.__name__)
def test_every_client_packet_type_in_one_stream_however_it_is_split(mqtt_impl, feeder):
    codec = mqtt_impl.MQTTCodec()
    assert feeder(codec, STREAM) == STREAM_EVENTS
    assert codec.buffered == 0


def test_every_prefix_returns_the_complete_packets_and_holds_the_rest(mqtt_impl):
    """Partial input returns what is complete, holds the rest, and never raises."""
    boundaries = _boundaries(STREAM)
    assert len(boundaries) == len(STREAM_EVENTS)
    n = len(STREAM)
    cuts = sorted(set(range(0, 1000)) | set(range(1000, n, 997)) | set(range(n - 40, n + 1)))
    for cut in cuts:
        codec = mqtt_impl.MQTTCodec()
        events = codec.feed(STREAM[:cut])
        complete = sum(1 for b in boundaries if b <= cut)
        assert events == STREAM_EVENTS[:complete]
        assert codec.buffered == cut - (boundaries[complete - 1] if complete else 0)
        assert codec.feed(STREAM[cut:]) == STREAM_EVENTS[complete:]
        assert codec.buffered == 0


def _boundaries(stream: bytes) -> list[int]:
    """End offset of each packet, from the fixed headers (section 2.2.3)."""
    out, pos = [], 0
    while pos < len(stream):
        i, length, mult = pos + 1, 0, 1
        while True:
            byte = stream[i]
            length += (byte & 0x7F) * mult
            mult *= 128
            i += 1
            if byte < 0x80:
                break
        pos = i + length
        out.append(pos)
    return out


def test_many_packets_in_one_read_and_one_packet_in_many_reads(mqtt_impl):
    many = [gen_publish("devices/m/telemetry", qos=1, mid=i, payload=b'{"seq": %d}' % i) for i in range(1, 501)]
    codec = mqtt_impl.MQTTCodec()
    events = codec.feed(CONNECT + b"".join(many))
    assert [e.packet_id for e in events[1:]] == list(range(1, 501))
    big = gen_publish("t", qos=1, mid=9, payload=bytes(range(256)) * 400)  # 102,400 byte payload
    assert big[1] & 0x80 and big[2] & 0x80 and not big[3] & 0x80  # a 3-byte remaining length
    pieces = [big[i:i + 1000] for i in range(0, len(big), 1000)]
    for piece in pieces[:-1]:
        assert codec.feed(piece) == []
    assert codec.buffered == len(big) - len(pieces[-1])
    assert codec.feed(pieces[-1]) == [Publish("t", bytes(range(256)) * 400, 1, 9, False, False)]
    assert codec.buffered == 0


def test_empty_reads_change_nothing(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    assert codec.feed(b"") == []
    assert codec.feed(CONNECT[:1]) == []
    assert codec.feed(b"") == []
    assert codec.feed(CONNECT[1:]) == [CONNECT_EVENT]
    assert codec.feed(b"") == []


# -- encoders -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("session_present, rc", [(False, 0), (True, 0), (False, 1), (False, 2), (False, 3),
                                                 (False, 4), (False, 5)])
def test_encode_connack_section_3_2(mqtt_impl, session_present, rc):
    assert mqtt_impl.encode_connack(session_present, rc) == gen_connack(rc, session_present=session_present)


@pytest.mark.parametrize("name, gen", [("encode_puback", gen_puback), ("encode_pubrec", gen_pubrec),
                                       ("encode_pubrel", gen_pubrel), ("encode_pubcomp", gen_pubcomp),
                                       ("encode_unsuback", gen_unsuback)])
@pytest.mark.parametrize("mid", [1, 10, 255, 256, 65535])
def test_encode_single_acks(mqtt_impl, name, gen, mid):
    assert getattr(mqtt_impl, name)(mid) == gen(mid)


def test_encode_pingresp_section_3_13(mqtt_impl):
    assert mqtt_impl.encode_pingresp() == gen_pingresp() == b"\xd0\x00"


def test_encode_suback_example_of_section_3_9(mqtt_impl):
    # 3.9.3, Table 3.6: Success - Maximum QoS 0, Success - Maximum QoS 2, Failure -> 0x00 0x02 0x80;
    # packet identifier 10 (3.9.2)
    assert mqtt_impl.encode_suback(10, [0, 2, 0x80]) == b"\x90\x05\x00\x0a\x00\x02\x80"
    assert mqtt_impl.encode_suback(10, [0, 2, 0x80]) == gen_suback(10, [0, 2, 0x80])


def test_encode_suback_long(mqtt_impl):
    codes = [0, 1, 2, 0x80] * 50  # remaining length 202: two length bytes
    assert mqtt_impl.encode_suback(65535, codes) == gen_suback(65535, codes)
    assert mqtt_impl.encode_suback(7, (c for c in [1])) == gen_suback(7, [1])


@pytest.mark.parametrize("ptype, gen", [(PUBACK, gen_puback), (PUBREC, gen_pubrec), (PUBREL, gen_pubrel),
                                        (PUBCOMP, gen_pubcomp)])
def test_encode_acks_puts_many_acks_in_one_buffer(mqtt_impl, ptype, gen):
    ids = [1, 2, 255, 256, 65535, 2]
    assert mqtt_impl.encode_acks(ptype, ids) == b"".join(gen(i) for i in ids)
    assert mqtt_impl.encode_acks(ptype, tuple(ids)) == b"".join(gen(i) for i in ids)
    assert mqtt_impl.encode_acks(ptype, iter(ids)) == b"".join(gen(i) for i in ids)
    assert mqtt_impl.encode_acks(ptype, range(1, 1001)) == b"".join(gen(i) for i in range(1, 1001))
    assert mqtt_impl.encode_acks(ptype, []) == b""


@pytest.mark.parametrize("kw", [
    {}, {"qos": 1, "packet_id": 5}, {"qos": 2, "packet_id": 65535, "dup": True}, {"retain": True},
    {"qos": 1, "packet_id": 1, "retain": True, "dup": True},
])
@pytest.mark.parametrize("payload", [b"", b'{"type":"REBOOT"}', b"z" * 200, b"w" * 20000])
def test_encode_publish_section_3_3(mqtt_impl, kw, payload):
    expected = gen_publish("devices/m/commands", payload=payload, mid=kw.get("packet_id", 0),
                           **{k: v for k, v in kw.items() if k != "packet_id"})
    assert mqtt_impl.encode_publish("devices/m/commands", payload, **kw) == expected
    # and back through the decoder
    assert decode(mqtt_impl, CONNECT + expected)[1:] == [
        Publish("devices/m/commands", payload, kw.get("qos", 0), kw.get("packet_id", 0), kw.get("retain", False),
                kw.get("dup", False))]


def test_encode_publish_takes_any_contiguous_bytes_like_payload(mqtt_impl):
    for payload in (bytearray(b"abc"), memoryview(b"xabcx")[1:4]):
        assert mqtt_impl.encode_publish("t", payload) == gen_publish("t", payload=b"abc")


@pytest.mark.parametrize("call", [
    pytest.param(lambda m: m.encode_puback(0), id="puback 0"),
    pytest.param(lambda m: m.encode_puback(65536), id="puback 65536"),
    pytest.param(lambda m: m.encode_pubrec(-1), id="pubrec -1"),
    pytest.param(lambda m: m.encode_pubrel(2 ** 70), id="pubrel huge"),
    pytest.param(lambda m: m.encode_unsuback(0), id="unsuback 0"),
    pytest.param(lambda m: m.encode_acks(4, [1, 0]), id="acks with 0"),
    pytest.param(lambda m: m.encode_acks(4, [1, 2 ** 64]), id="acks with a huge id"),
    pytest.param(lambda m: m.encode_acks(3, [1]), id="acks of PUBLISH"),
    pytest.param(lambda m: m.encode_acks(8, [1]), id="acks of SUBSCRIBE"),
    pytest.param(lambda m: m.encode_suback(1, []), id="suback without codes"),
    pytest.param(lambda m: m.encode_suback(1, [3]), id="suback code 3"),
    pytest.param(lambda m: m.encode_suback(1, [0x81]), id="suback code 0x81"),
    pytest.param(lambda m: m.encode_suback(0, [0]), id="suback packet id 0"),
    pytest.param(lambda m: m.encode_connack(False, 6), id="connack reserved code"),
    pytest.param(lambda m: m.encode_connack(False, -1), id="connack -1"),
    pytest.param(lambda m: m.encode_connack(True, 2), id="connack session present on a refusal"),
    pytest.param(lambda m: m.encode_publish("a/+", b""), id="publish wildcard"),
    pytest.param(lambda m: m.encode_publish("a/#", b""), id="publish wildcard #"),
    pytest.param(lambda m: m.encode_publish("", b""), id="publish empty topic"),
    pytest.param(lambda m: m.encode_publish("a\x00", b""), id="publish U+0000"),
    pytest.param(lambda m: m.encode_publish("a\ud800", b""), id="publish surrogate"),
    pytest.param(lambda m: m.encode_publish("t" * 65536, b""), id="publish topic too long"),
    pytest.param(lambda m: m.encode_publish("t", b"", 3, 1), id="publish QoS 3"),
    pytest.param(lambda m: m.encode_publish("t", b"", -1), id="publish QoS -1"),
    pytest.param(lambda m: m.encode_publish("t", b"", 1, 0), id="publish QoS 1 packet id 0"),
    pytest.param(lambda m: m.encode_publish("t", b"", 2, 65536), id="publish QoS 2 packet id 65536"),
    pytest.param(lambda m: m.encode_publish("t", b"", 0, 5), id="publish QoS 0 with packet id"),
    pytest.param(lambda m: m.encode_publish("t", b"", 0, dup=True), id="publish QoS 0 with DUP"),
    pytest.param(lambda m: m.encode_publish("t", memoryview(b"abcd")[::2]), id="publish strided payload"),
])
def test_encoders_refuse_misuse_with_value_error(mqtt_impl, call):
    with pytest.raises(ValueError):
        call(mqtt_impl)


@pytest.mark.parametrize("call", [
    pytest.param(lambda m: m.encode_publish(b"t", b""), id="bytes topic"),
    pytest.param(lambda m: m.encode_publish("t", 5), id="int payload"),
    pytest.param(lambda m: m.encode_puback(1.0), id="float packet id"),
    pytest.param(lambda m: m.encode_acks(4, [1.0]), id="float packet id in acks"),
    pytest.param(lambda m: m.MQTTCodec().feed("text"), id="feed str"),
    pytest.param(lambda m: m.MQTTCodec().feed(5), id="feed int"),
])
def test_wrong_types_are_type_errors(mqtt_impl, call):
    with pytest.raises(TypeError):
        call(mqtt_impl)


def test_public_names(mqtt_impl):
    for name in ("MQTTCodec", "encode_connack", "encode_puback", "encode_pubrec", "encode_pubrel", "encode_pubcomp",
                 "encode_acks", "encode_suback", "encode_unsuback", "encode_pingresp", "encode_publish"):
        assert callable(getattr(mqtt_impl, name))
    codec = mqtt_impl.MQTTCodec()
    for prop in ("connected", "protocol_level", "buffered", "max_packet_bytes"):
        with pytest.raises(AttributeError):
            setattr(codec, prop, 1)
