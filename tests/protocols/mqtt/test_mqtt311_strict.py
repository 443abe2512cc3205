"""MQTT 3.1/3.1.1 strictness beyond the MUSTs, codec level, on both twins
(fixture ``mqtt_impl``).

Section 1.5.3 of MQTT 3.1.1 lets a receiver close the connection on control
characters (U+0001..U+001F, U+007F..U+009F) and non-characters (U+FDD0..U+FDEF,
U+nFFFE, U+nFFFF) in a UTF-8 string; gridgate always does (reason
``bad_char``), in every string of every packet. MQTT 3.1 client ids longer
than 23 bytes get CONNACK 0x02. Streams are built with tests/mqtt_frames.py,
and each is fed whole and one byte at a time.
"""
from __future__ import annotations

import pytest

from gridgate.errors import MQTTProtocolError
from gridgate.protocols.mqtt.events import Connect, Publish, Subscribe, Unsubscribe, Will
from mqtt_frames import gen_connect, gen_publish, gen_subscribe, gen_unsubscribe

CONNECT = gen_connect("meter-1")

# Each forbidden range by its bounds and a few inside, in every UTF-8 length.
FORBIDDEN = [0x01, 0x09, 0x0A, 0x0D, 0x1B, 0x1F, 0x7F, 0x80, 0x85, 0x9F, 0xFDD0, 0xFDE7, 0xFDEF, 0xFFFE, 0xFFFF,
             0x1FFFE, 0x1FFFF, 0x2FFFF, 0xEFFFE, 0x10FFFE, 0x10FFFF]
# Their neighbours, which are fine.
ALLOWED = [0x20, 0x7E, 0xA0, 0xFDCF, 0xFDF0, 0xFEFF, 0xFFFD, 0x10000, 0x1FFFD, 0x20000, 0x10FFFD]

WHERE = ["client id", "will topic", "user name", "publish topic", "subscribe filter", "unsubscribe filter"]


def stream_with(where: str, text: str) -> bytes:
    """A stream whose only questionable string is `text`, placed `where`."""
    if where == "client id":
        return gen_connect(text)
    if where == "will topic":
        return gen_connect("c", will_topic=text, will_payload=b"w")
    if where == "user name":
        return gen_connect("c", username=text)
    if where == "publish topic":
        return CONNECT + gen_publish(text, payload=b"{}")
    if where == "subscribe filter":
        return CONNECT + gen_subscribe(1, [(text, 0)])
    return CONNECT + gen_unsubscribe(1, [text])


def events_of(impl, data: bytes) -> list:
    whole = impl.MQTTCodec().feed(data)
    codec, bytewise = impl.MQTTCodec(), []
    for i in range(len(data)):
        bytewise.extend(codec.feed(data[i:i + 1]))
    assert bytewise == whole
    return whole


def error_of(impl, data: bytes) -> MQTTProtocolError:
    errors = []
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))]):
        codec = impl.MQTTCodec()
        with pytest.raises(MQTTProtocolError) as info:
            for chunk in chunks:
                codec.feed(chunk)
        errors.append(info.value)
    assert errors[0] == errors[1]
    assert errors[0].detail == errors[1].detail
    return errors[0]


# -- control characters and non-characters (section 1.5.3, MAY close taken as MUST) ---------------------


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("cp", FORBIDDEN, ids=lambda cp: f"U+{cp:04X}")
def test_control_characters_and_non_characters_close_the_connection_in_every_string(mqtt_impl, where, cp):
    for text in (chr(cp), f"a{chr(cp)}", f"{chr(cp)}b", f"a\u00e9{chr(cp)}/b"):
        e = error_of(mqtt_impl, stream_with(where, text))
        assert (e.reason, e.return_code) == ("bad_char", None)
        assert e.detail == (f"string contains U+{cp:04X}, a control character or non-character "
                            "(section 1.5.3, refused as a MUST)")


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("cp", ALLOWED, ids=lambda cp: f"U+{cp:04X}")
def test_the_neighbours_of_the_refused_ranges_are_accepted(mqtt_impl, where, cp):
    text = f"a{chr(cp)}b"
    events = events_of(mqtt_impl, stream_with(where, text))
    expected = {
        "client id": Connect("MQTT", 4, True, 0, text, None, None, None),
        "will topic": Connect("MQTT", 4, True, 0, "c", Will(text, b"w", 0, False), None, None),
        "user name": Connect("MQTT", 4, True, 0, "c", None, text, None),
        "publish topic": Publish(text, b"{}", 0, 0, False, False),
        "subscribe filter": Subscribe(1, [(text, 0)]),
        "unsubscribe filter": Unsubscribe(1, [text]),
    }[where]
    assert events[-1] == expected


def test_the_first_refused_code_point_is_named(mqtt_impl):
    e = error_of(mqtt_impl, stream_with("publish topic", "ok/\u0085/\x01"))
    assert "U+0085" in e.detail


def test_u0000_is_bad_utf8_even_after_a_control_character(mqtt_impl):
    # MQTT-1.5.3-2 is a MUST of its own: its reason wins wherever U+0000 sits
    assert error_of(mqtt_impl, stream_with("client id", "a\x01b\x00")).reason == "bad_utf8"
    assert error_of(mqtt_impl, stream_with("user name", "\x7f\x00")).reason == "bad_utf8"


def test_ill_formed_utf8_is_bad_utf8_even_beside_a_control_character(mqtt_impl):
    frame = gen_publish(b"a\x01\xff", payload=b"{}")
    assert error_of(mqtt_impl, CONNECT + frame).reason == "bad_utf8"


def test_a_refused_topic_after_an_accepted_one_of_the_same_length_is_refused(mqtt_impl):
    # the compiled codec keeps the last topic to skip its checks: only bytes equal to it may skip
    good = gen_publish("abc", payload=b"1")
    assert error_of(mqtt_impl, CONNECT + good + gen_publish("ab\x1f", payload=b"1")).reason == "bad_char"
    assert error_of(mqtt_impl, CONNECT + good + good + gen_publish("\ufffe", payload=b"1")).reason == "bad_char"


def test_password_and_will_message_are_binary_and_may_hold_any_byte(mqtt_impl):
    anything = bytes(range(256))
    frame = gen_connect("c", will_topic="w", will_payload=anything, username="u", password=anything)
    assert events_of(mqtt_impl, frame) == [
        Connect("MQTT", 4, True, 0, "c", Will("w", anything, 0, False), "u", anything)]


def test_payloads_are_not_strings(mqtt_impl):
    payload = "\x01\x7f\ufffe".encode() + b"\x00\xff"
    assert events_of(mqtt_impl, CONNECT + gen_publish("t", payload=payload))[1] == Publish(
        "t", payload, 0, 0, False, False)


@pytest.mark.parametrize("topic", ["a\x00", "a\x01", "\x85", "\ufdd0", "\U0010ffff"])
def test_encode_publish_refuses_what_the_decoder_refuses(mqtt_impl, topic):
    with pytest.raises(ValueError):
        mqtt_impl.encode_publish(topic, b"{}")


# -- MQTT 3.1 client id length ------------------------------------------------------------------------------


def mqtt31_connect(client_id: str, **kw) -> bytes:
    return gen_connect(client_id, proto_name=b"MQIsdp", proto_ver=3, **kw)


def test_mqtt_3_1_client_id_of_23_bytes_is_accepted(mqtt_impl):
    assert events_of(mqtt_impl, mqtt31_connect("m" * 23)) == [Connect("MQIsdp", 3, True, 0, "m" * 23, None, None,
                                                                      None)]


@pytest.mark.parametrize("client_id", ["m" * 24, "m" * 200, "\u00e9" * 12, "meter-" + "\u20ac" * 6])
def test_mqtt_3_1_client_id_over_23_bytes_gets_return_code_2(mqtt_impl, client_id):
    assert len(client_id.encode()) > 23
    e = error_of(mqtt_impl, mqtt31_connect(client_id))
    assert (e.reason, e.return_code) == ("identifier_rejected", 2)
    assert e.detail == f"MQTT 3.1 client id of {len(client_id.encode())} bytes, more than 23"


def test_mqtt_3_1_1_client_id_may_be_longer_than_23_bytes(mqtt_impl):
    # MQTT-3.1.3-5 is a lower bound for 3.1.1 servers, not a limit
    assert events_of(mqtt_impl, gen_connect("m" * 100))[0].client_id == "m" * 100


def test_mqtt_3_1_client_id_length_is_judged_after_the_rest_of_the_connect(mqtt_impl):
    # like MQTT-3.1.3-8: a malformed CONNECT is closed without a CONNACK
    assert error_of(mqtt_impl, mqtt31_connect("m" * 24, will_topic="a/#", will_payload=b"")).reason == "bad_topic"
    assert error_of(mqtt_impl, mqtt31_connect("m" * 24, username="\x07")).reason == "bad_char"


def test_every_ascii_byte_at_every_position_of_short_and_long_topics(mqtt_impl):
    # the compiled codec checks eight bytes at a time with a byte loop under 8
    # and an overlapping last word: every length up to 3 words, every position
    for n in range(1, 25):
        for at in range(n):
            for byte in range(0x80):
                raw = bytearray(b"a" * n)
                raw[at] = byte
                codec = mqtt_impl.MQTTCodec()
                try:
                    codec.feed(CONNECT + gen_publish(bytes(raw), payload=b"1"))
                    reason = None
                except MQTTProtocolError as exc:
                    reason = exc.reason
                expected = ("bad_utf8" if byte == 0 else "bad_char" if byte < 0x20 or byte == 0x7F
                            else "bad_topic" if byte in b"+#" else None)
                assert reason == expected, (n, at, byte)
