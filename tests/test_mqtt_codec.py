"""The MQTT 3.1.1 server codec, run against both implementations.

Expected bytes come from the specification's examples (section cited) and
from tests/mqtt_frames.py (built with struct, independently of the codec).
"""
from __future__ import annotations

import random

import pytest

from gridgate.errors import MQTTProtocolError
from gridgate.mqtt_events import (
    PUBACK, PUBCOMP, PUBREC, PUBREL, Connect, Disconnect, PingReq, PubAck, PubComp, Publish, PubRec, PubRel,
    Subscribe, Unsubscribe, Will,
)
from mqtt_frames import (
    gen_connack, gen_connect, gen_disconnect, gen_pingreq, gen_pingresp, gen_puback, gen_pubcomp, gen_publish,
    gen_pubrec, gen_pubrel, gen_suback, gen_subscribe, gen_unsuback, gen_unsubscribe, pack_remaining_length,
)

CONNECT = gen_connect("meter-1", keepalive=60)
CONNECT_EVENT = Connect("MQTT", 4, True, 60, "meter-1", None, None, None)


def feed_whole(codec, data: bytes) -> list:
    return codec.feed(data)


def feed_bytewise(codec, data: bytes) -> list:
    events = []
    for i in range(len(data)):
        events.extend(codec.feed(data[i:i + 1]))
    return events


def feed_random(codec, data: bytes, seed: int = 7) -> list:
    rng = random.Random(seed)
    events, i = [], 0
    while i < len(data):
        n = rng.randint(1, 17)
        events.extend(codec.feed(data[i:i + n]))
        i += n
    return events


FEEDERS = [feed_whole, feed_bytewise, feed_random]


def decode(impl, data: bytes, feeder=feed_whole) -> list:
    return feeder(impl.MQTTCodec(), data)


def error_of(impl, data: bytes, feeder=feed_whole, **kw) -> MQTTProtocolError:
    codec = impl.MQTTCodec(**kw)
    with pytest.raises(MQTTProtocolError) as info:
        feeder(codec, data)
    return info.value


# -- section 2.2.3: remaining length -------------------------------------------

SPEC_REMAINING_LENGTH = [  # MQTT 3.1.1 section 2.2.3, Table 2.4
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"), (16384, b"\x80\x80\x01"),
    (2097151, b"\xff\xff\x7f"), (2097152, b"\x80\x80\x80\x01"), (268435455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize("value, encoded", SPEC_REMAINING_LENGTH)
def test_remaining_length_table_of_section_2_2_3(mqtt_impl, value, encoded):
    assert pack_remaining_length(value) == encoded
    if value <= 16384:
        # a PUBLISH whose remaining length is exactly `value` decodes
        topic_len = 2 + 1
        if value >= topic_len:
            payload = b"x" * (value - topic_len)
            frame = b"\x30" + encoded + b"\x00\x01t" + payload
            (ev,) = decode(mqtt_impl, CONNECT + frame)[1:]
            assert ev.payload == payload
    else:
        # larger ones are announced by the header and refused for size alone
        err = error_of(mqtt_impl, CONNECT + b"\x30" + encoded)
        assert (err.reason, err.return_code) == ("too_large", None)


def test_remaining_length_of_five_bytes_is_malformed(mqtt_impl):
    err = error_of(mqtt_impl, CONNECT + b"\x30\xff\xff\xff\xff\x01", max_packet_bytes=1 << 30)
    assert err == MQTTProtocolError("malformed")


def test_ten_megabyte_remaining_length_is_refused_on_the_fixed_header(mqtt_impl):
    codec = mqtt_impl.MQTTCodec(max_packet_bytes=1_048_576)
    assert codec.feed(CONNECT) == [CONNECT_EVENT]
    with pytest.raises(MQTTProtocolError) as info:
        codec.feed(b"\x30" + pack_remaining_length(10 * 1024 * 1024))  # no body sent at all
    assert info.value == MQTTProtocolError("too_large")
    # the codec is dead afterwards
    with pytest.raises(MQTTProtocolError) as again:
        codec.feed(gen_pingreq())
    assert again.value == MQTTProtocolError("too_large")


# -- section 1.5.3: UTF-8 --------------------------------------------------------

def test_utf8_example_of_section_1_5_3(mqtt_impl):
    # "A" followed by U+2A6D4 is encoded 0x00 0x05 0x41 0xF0 0xAA 0x9B 0x94
    encoded_topic = b"\x00\x05\x41\xf0\xaa\x9b\x94"
    frame = b"\x30" + pack_remaining_length(len(encoded_topic) + 2) + encoded_topic + b"{}"
    (ev,) = decode(mqtt_impl, CONNECT + frame)[1:]
    assert ev.topic == "A\U0002a6d4"


@pytest.mark.parametrize("raw", [b"\xff", b"a\x00b", b"\xed\xa0\x80", b"\xc0\x80"])
def test_ill_formed_utf8_is_bad_utf8(mqtt_impl, raw):
    frame = b"\x30" + pack_remaining_length(len(raw) + 2) + len(raw).to_bytes(2, "big") + raw
    assert error_of(mqtt_impl, CONNECT + frame) == MQTTProtocolError("bad_utf8")


# -- section 3.1: CONNECT ----------------------------------------------------------

def test_connect_variable_header_example_of_section_3_1_2_10(mqtt_impl):
    # Figure 3.6: protocol name "MQTT", level 4, flags 0xCE (user, password,
    # will QoS 1, will flag, clean session), keepalive 10.
    variable = b"\x00\x04MQTT\x04\xce\x00\x0a"
    payload = b"\x00\x02id" + b"\x00\x01w" + b"\x00\x02wp" + b"\x00\x01u" + b"\x00\x02pw"
    frame = b"\x10" + pack_remaining_length(len(variable) + len(payload)) + variable + payload
    assert decode(mqtt_impl, frame) == [
        Connect("MQTT", 4, True, 10, "id", Will("w", b"wp", 1, False), "u", b"pw")]
    assert frame == gen_connect("id", keepalive=10, will_topic="w", will_payload=b"wp", will_qos=1,
                                username="u", password=b"pw")


def test_mqtt_3_1_connect_is_accepted(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    assert codec.feed(gen_connect("old", proto_name=b"MQIsdp", proto_ver=3)) == [
        Connect("MQIsdp", 3, True, 0, "old", None, None, None)]
    assert codec.connected and codec.protocol_level == 3


@pytest.mark.parametrize("name, level", [(b"MQTT", 3), (b"MQTT", 5), (b"MQIsdp", 4), (b"HTTP", 4), (b"", 4)])
def test_unsupported_protocol_gets_return_code_1(mqtt_impl, name, level):
    err = error_of(mqtt_impl, gen_connect("x", proto_name=name, proto_ver=level))
    assert err == MQTTProtocolError("unsupported_protocol", return_code=1)


@pytest.mark.parametrize("flags, reason", [
    (0x03, "malformed"),      # reserved bit 0 set (MQTT-3.1.2-3)
    (0x0A, "malformed"),      # will QoS without will flag (MQTT-3.1.2-13)
    (0x22, "malformed"),      # will retain without will flag (MQTT-3.1.2-15)
    (0x1E, "malformed"),      # will QoS 3 (MQTT-3.1.2-14)
    (0x42, "malformed"),      # password without username (MQTT-3.1.2-22)
])
def test_connect_flag_violations(mqtt_impl, flags, reason):
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x00" + b"\x00\x01c" + b"\x00\x01w\x00\x00"
    frame = b"\x10" + pack_remaining_length(len(body)) + body
    assert error_of(mqtt_impl, frame) == MQTTProtocolError(reason)


def test_empty_client_id_without_clean_session_gets_return_code_2(mqtt_impl):
    # MQTT-3.1.3-8
    err = error_of(mqtt_impl, gen_connect("", clean_session=False))
    assert err == MQTTProtocolError("identifier_rejected", return_code=2)


def test_will_topic_with_wildcard_is_bad_topic(mqtt_impl):
    assert error_of(mqtt_impl, gen_connect("c", will_topic="a/#")) == MQTTProtocolError("bad_topic")


def test_connect_with_trailing_bytes_is_malformed(mqtt_impl):
    frame = gen_connect("c")
    frame = frame[:1] + bytes([frame[1] + 1]) + frame[2:] + b"!"
    assert error_of(mqtt_impl, frame) == MQTTProtocolError("malformed")


def test_first_packet_must_be_connect(mqtt_impl):
    # MQTT-3.1.0-1
    err = error_of(mqtt_impl, gen_publish("telemetry", payload=b"{}"))
    assert err == MQTTProtocolError("expected_connect")


def test_second_connect_is_a_violation(mqtt_impl):
    # MQTT-3.1.0-2
    assert error_of(mqtt_impl, CONNECT + CONNECT) == MQTTProtocolError("duplicate_connect")


# -- section 3.3: PUBLISH --------------------------------------------------------

def test_publish_variable_header_example_of_section_3_3_2_3(mqtt_impl):
    # topic "a/b", packet identifier 10: 0x00 0x03 'a' '/' 'b' 0x00 0x0A
    variable = b"\x00\x03a/b\x00\x0a"
    frame = b"\x32" + pack_remaining_length(len(variable) + 2) + variable + b"{}"
    assert frame == gen_publish("a/b", qos=1, mid=10, payload=b"{}")
    (ev,) = decode(mqtt_impl, CONNECT + frame)[1:]
    assert ev == Publish("a/b", b"{}", 1, 10, False, False)


@pytest.mark.parametrize("qos, retain, dup", [(0, False, False), (1, True, False), (2, False, True), (1, True, True)])
def test_publish_flags_decode(mqtt_impl, qos, retain, dup):
    mid = 0 if qos == 0 else 77
    frame = gen_publish("telemetry", qos=qos, mid=mid, retain=retain, dup=dup, payload=b'{"x":1}')
    (ev,) = decode(mqtt_impl, CONNECT + frame)[1:]
    assert ev == Publish("telemetry", b'{"x":1}', qos, mid, retain, dup)


def test_publish_payload_is_a_zero_copy_view(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    codec.feed(CONNECT)
    data = gen_publish("t", qos=0, payload=b"abc")
    (ev,) = codec.feed(data)
    assert isinstance(ev.payload, memoryview) and ev.payload.readonly
    assert ev.payload.obj is data
    assert bytes(ev.payload) == b"abc"


def test_empty_payload_is_allowed(mqtt_impl):
    (ev,) = decode(mqtt_impl, CONNECT + gen_publish("t", qos=0))[1:]
    assert ev.payload == b""


@pytest.mark.parametrize("frame, reason", [
    (b"\x36\x05\x00\x01t\x00\x01", "malformed"),                                   # QoS 3 (MQTT-3.3.1-4)
    (b"\x38\x03\x00\x01t", "bad_flags"),                                            # DUP on QoS 0 (MQTT-3.3.1-2)
    (gen_publish("a/+/c", payload=b"{}"), "bad_topic"),                              # MQTT-3.3.2-2
    (gen_publish("a/#", payload=b"{}"), "bad_topic"),
    (gen_publish("", payload=b"{}"), "bad_topic"),                                   # MQTT-4.7.3-1
    (gen_publish("t", qos=1, mid=0, payload=b"{}"), "bad_packet_id"),                # MQTT-2.3.1-1
    (b"\x32\x04\x00\x05ab", "malformed"),                                            # topic overruns
    (b"\x32\x03\x00\x01t", "malformed"),                                             # no room for packet id
])
def test_publish_violations(mqtt_impl, frame, reason):
    assert error_of(mqtt_impl, CONNECT + frame) == MQTTProtocolError(reason)


# -- acknowledgements, ping, disconnect ----------------------------------------------

@pytest.mark.parametrize("frame, event", [
    (gen_puback(1), PubAck(1)), (gen_pubrec(65535), PubRec(65535)), (gen_pubrel(9), PubRel(9)),
    (gen_pubcomp(300), PubComp(300)), (gen_pingreq(), PingReq()), (gen_disconnect(), Disconnect()),
])
def test_small_packets_decode(mqtt_impl, frame, event):
    assert decode(mqtt_impl, CONNECT + frame) == [CONNECT_EVENT, event]


@pytest.mark.parametrize("frame, reason", [
    (b"\x40\x03\x00\x01\x00", "malformed"),      # PUBACK remaining length 3
    (b"\x40\x02\x00\x00", "bad_packet_id"),
    (b"\x60\x02\x00\x01", "bad_flags"),          # PUBREL needs flags 0b0010 (MQTT-2.2.2-1)
    (b"\x41\x02\x00\x01", "bad_flags"),
    (b"\xc0\x01\x00", "malformed"),              # PINGREQ with a body
    (b"\xe0\x01\x00", "malformed"),
    (b"\x00\x00", "malformed"),                  # reserved type 0
    (b"\xf0\x00", "malformed"),                  # reserved type 15
    (gen_connack(0), "unexpected_packet"),
    (gen_suback(1, [0]), "unexpected_packet"),
    (gen_unsuback(1), "unexpected_packet"),
    (gen_pingresp(), "unexpected_packet"),
])
def test_small_packet_violations(mqtt_impl, frame, reason):
    assert error_of(mqtt_impl, CONNECT + frame) == MQTTProtocolError(reason)


def test_bytes_after_disconnect_are_a_violation(mqtt_impl):
    err = error_of(mqtt_impl, CONNECT + gen_disconnect() + gen_pingreq())
    assert err == MQTTProtocolError("data_after_disconnect")


# -- section 3.8 / 3.10: SUBSCRIBE, UNSUBSCRIBE ------------------------------------------

def test_subscribe_payload_example_of_section_3_8_3(mqtt_impl):
    # "a/b" QoS 1, "c/d" QoS 2 -> 0x00 0x03 'a' '/' 'b' 0x01 0x00 0x03 'c' '/' 'd' 0x02
    payload = b"\x00\x03a/b\x01\x00\x03c/d\x02"
    frame = b"\x82" + pack_remaining_length(2 + len(payload)) + b"\x00\x0a" + payload
    assert frame == gen_subscribe(10, [("a/b", 1), ("c/d", 2)])
    assert decode(mqtt_impl, CONNECT + frame)[1:] == [Subscribe(10, [("a/b", 1), ("c/d", 2)])]


def test_unsubscribe_payload_example_of_section_3_10_3(mqtt_impl):
    payload = b"\x00\x03a/b\x00\x03c/d"
    frame = b"\xa2" + pack_remaining_length(2 + len(payload)) + b"\x00\x0b" + payload
    assert frame == gen_unsubscribe(11, ["a/b", "c/d"])
    assert decode(mqtt_impl, CONNECT + frame)[1:] == [Unsubscribe(11, ["a/b", "c/d"])]


@pytest.mark.parametrize("topic", ["#", "+", "a/+/b", "a/#", "+/+", "/", "sport/tennis/#", "+/tennis/#"])
def test_valid_topic_filters(mqtt_impl, topic):
    assert decode(mqtt_impl, CONNECT + gen_subscribe(1, [(topic, 0)]))[1:] == [Subscribe(1, [(topic, 0)])]


@pytest.mark.parametrize("frame, reason", [
    (gen_subscribe(1, [("a#", 0)]), "bad_topic_filter"),
    (gen_subscribe(1, [("a/#/b", 0)]), "bad_topic_filter"),
    (gen_subscribe(1, [("a+", 0)]), "bad_topic_filter"),
    (gen_subscribe(1, [("", 0)]), "bad_topic_filter"),
    (gen_subscribe(1, [("a", 3)]), "malformed"),          # MQTT-3-8.3-4
    (gen_subscribe(1, [("a", 0x81)]), "malformed"),
    (gen_subscribe(0, [("a", 0)]), "bad_packet_id"),
    (b"\x82\x02\x00\x01", "malformed"),                   # no filter (MQTT-3.8.3-3)
    (b"\x80\x06\x00\x01\x00\x01a\x00", "bad_flags"),      # SUBSCRIBE flags must be 0b0010
    (b"\x82\x05\x00\x01\x00\x01a", "malformed"),          # missing QoS byte
    (b"\xa2\x02\x00\x01", "malformed"),                   # UNSUBSCRIBE without filter (MQTT-3.10.3-2)
    (gen_unsubscribe(1, ["a/#/b"]), "bad_topic_filter"),
])
def test_subscribe_violations(mqtt_impl, frame, reason):
    assert error_of(mqtt_impl, CONNECT + frame) == MQTTProtocolError(reason)


# -- split and merged reads ----------------------------------------------------------------

STREAM = (CONNECT + gen_publish("telemetry", qos=1, mid=1, payload=b'{"temperature": 21}')
          + gen_publish("devices/meter-1/telemetry", qos=2, mid=2, payload=b"\x81\xa1x\x01")
          + gen_pubrel(2) + gen_subscribe(3, [("devices/meter-1/commands", 1)]) + gen_pingreq()
          + gen_puback(4) + gen_unsubscribe(5, ["devices/meter-1/commands"])
          + gen_publish("telemetry", qos=0, payload=b"x" * 300) + gen_disconnect())
STREAM_EVENTS = [
    CONNECT_EVENT,
    Publish("telemetry", b'{"temperature": 21}', 1, 1, False, False),
    Publish("devices/meter-1/telemetry", b"\x81\xa1x\x01", 2, 2, False, False),
    PubRel(2), Subscribe(3, [("devices/meter-1/commands", 1)]), PingReq(), PubAck(4),
    Unsubscribe(5, ["devices/meter-1/commands"]), Publish("telemetry", b"x" * 300, 0, 0, False, False),
    Disconnect(),
]


@pytest.mark.parametrize("feeder", FEEDERS)
def test_every_packet_type_in_one_stream_however_it_is_split(mqtt_impl, feeder):
    codec = mqtt_impl.MQTTCodec()
    assert feeder(codec, STREAM) == STREAM_EVENTS
    assert codec.buffered == 0


def test_partial_packet_waits_for_more(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    frame = gen_publish("telemetry", qos=1, mid=8, payload=b"{}")
    assert codec.feed(CONNECT + frame[:5]) == [CONNECT_EVENT]
    assert codec.buffered == 5
    assert codec.feed(frame[5:]) == [Publish("telemetry", b"{}", 1, 8, False, False)]
    assert codec.buffered == 0


@pytest.mark.parametrize("feeder", FEEDERS)
def test_errors_are_the_same_however_the_stream_is_split(mqtt_impl, feeder):
    bad = CONNECT + gen_pingreq() + gen_publish("a/+", payload=b"{}")
    codec = mqtt_impl.MQTTCodec()
    with pytest.raises(MQTTProtocolError) as info:
        feeder(codec, bad)
    assert info.value == MQTTProtocolError("bad_topic")


def test_bytearray_input_is_copied(mqtt_impl):
    codec = mqtt_impl.MQTTCodec()
    codec.feed(CONNECT)
    data = bytearray(gen_publish("t", payload=b"abc"))
    (ev,) = codec.feed(data)
    data[-3:] = b"zzz"
    assert ev.payload == b"abc"


# -- encoders --------------------------------------------------------------------------

def test_encoders_match_independent_frames(mqtt_impl):
    m = mqtt_impl
    assert m.encode_connack(False, 0) == gen_connack(0)
    assert m.encode_connack(True, 0) == gen_connack(0, session_present=True)
    assert m.encode_connack(False, 5) == gen_connack(5)
    assert m.encode_puback(1) == gen_puback(1)
    assert m.encode_pubrec(258) == gen_pubrec(258)
    assert m.encode_pubrel(65535) == gen_pubrel(65535)
    assert m.encode_pubcomp(7) == gen_pubcomp(7)
    assert m.encode_unsuback(9) == gen_unsuback(9)
    assert m.encode_pingresp() == gen_pingresp()
    # section 3.9.3 SUBACK payload example: 0x00, 0x01, 0x02, 0x80
    assert m.encode_suback(10, [0, 1, 2, 0x80]) == b"\x90\x06\x00\x0a\x00\x01\x02\x80"
    assert m.encode_publish("devices/m/commands", b'{"type":"REBOOT"}', 1, 5) == gen_publish(
        "devices/m/commands", qos=1, mid=5, payload=b'{"type":"REBOOT"}')
    assert m.encode_publish("t", b"", 0, retain=True) == gen_publish("t", retain=True)
    assert m.encode_publish("t", b"y" * 200, 2, 3, dup=True) == gen_publish("t", qos=2, mid=3, dup=True,
                                                                             payload=b"y" * 200)


@pytest.mark.parametrize("ptype, gen", [(PUBACK, gen_puback), (PUBREC, gen_pubrec), (PUBREL, gen_pubrel),
                                        (PUBCOMP, gen_pubcomp)])
def test_encode_acks_puts_many_acks_in_one_buffer(mqtt_impl, ptype, gen):
    ids = [1, 2, 255, 256, 65535]
    assert mqtt_impl.encode_acks(ptype, ids) == b"".join(gen(i) for i in ids)
    assert mqtt_impl.encode_acks(ptype, []) == b""


@pytest.mark.parametrize("call", [
    lambda m: m.encode_puback(0), lambda m: m.encode_puback(65536), lambda m: m.encode_acks(4, [1, 0]),
    lambda m: m.encode_acks(3, [1]), lambda m: m.encode_publish("a/+", b""), lambda m: m.encode_publish("", b""),
    lambda m: m.encode_publish("t", b"", 3), lambda m: m.encode_publish("t", b"", 1, 0),
    lambda m: m.encode_publish("t", b"", 0, 5), lambda m: m.encode_suback(1, [3]),
    lambda m: m.encode_connack(False, 256),
])
def test_encoders_refuse_misuse(mqtt_impl, call):
    with pytest.raises(ValueError):
        call(mqtt_impl)
