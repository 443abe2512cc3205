"""CONNECT flags against the payload fields they announce (MQTT 3.1.1
section 3.1.2.9 - 3.1.3), on both codec twins (fixture ``mqtt_impl``): a
field the flags announce must be there, one they do not announce must not
be. Either way the CONNECT is malformed and the connection closes without a
CONNACK (MQTT-3.1.4-1). Frames are built with tests/mqtt_frames.py."""
from __future__ import annotations

import pytest

from gridgate.errors import MQTTProtocolError
from gridgate.protocols.mqtt.events import Connect, Will
from mqtt_frames import gen_packet, pack_string

CLEAN = 0x02
WILL = 0x04
PASSWORD = 0x40
USER = 0x80


def connect_frame(flags: int, *fields: bytes) -> bytes:
    """CONNECT 3.1.1 with these connect flags and exactly these payload fields after the client id "c"."""
    variable = pack_string(b"MQTT") + bytes((4, flags, 0, 0))
    return gen_packet(0x10, variable + pack_string("c") + b"".join(pack_string(f) for f in fields))


def reason_of(impl, frame: bytes) -> str:
    for chunks in ([frame], [frame[i:i + 1] for i in range(len(frame))]):
        codec = impl.MQTTCodec()
        with pytest.raises(MQTTProtocolError) as info:
            for chunk in chunks:
                codec.feed(chunk)
        assert info.value.return_code is None                   # no CONNACK
    return info.value.reason


@pytest.mark.parametrize("fields", [(), (b"w",)], ids=["neither", "topic only"])
def test_will_flag_needs_the_will_topic_and_message_mqtt_3_1_2_9(mqtt_impl, fields):
    assert reason_of(mqtt_impl, connect_frame(CLEAN | WILL, *fields)) == "malformed"


def test_will_fields_without_the_will_flag_are_malformed_mqtt_3_1_2_11(mqtt_impl):
    assert reason_of(mqtt_impl, connect_frame(CLEAN, b"w", b"m")) == "malformed"


def test_user_name_without_its_flag_is_malformed_mqtt_3_1_2_18(mqtt_impl):
    assert reason_of(mqtt_impl, connect_frame(CLEAN, b"u")) == "malformed"


def test_user_name_flag_needs_the_user_name_mqtt_3_1_2_19(mqtt_impl):
    assert reason_of(mqtt_impl, connect_frame(CLEAN | USER)) == "malformed"


def test_password_without_its_flag_is_malformed_mqtt_3_1_2_20(mqtt_impl):
    assert reason_of(mqtt_impl, connect_frame(CLEAN | USER, b"u", b"p")) == "malformed"


def test_password_flag_needs_the_password_mqtt_3_1_2_21(mqtt_impl):
    assert reason_of(mqtt_impl, connect_frame(CLEAN | USER | PASSWORD, b"u")) == "malformed"


def test_fields_are_read_in_the_order_of_the_spec_mqtt_3_1_3_1(mqtt_impl):
    # client id, Will topic, Will message, user name, password: a client that
    # sends the user name first has it read as the Will topic
    frame = connect_frame(CLEAN | WILL | USER | PASSWORD, b"w", b"m", b"u", b"p")
    assert mqtt_impl.MQTTCodec().feed(frame) == [Connect("MQTT", 4, True, 0, "c", Will("w", b"m", 0, False), "u",
                                                         b"p")]
    swapped = connect_frame(CLEAN | WILL | USER | PASSWORD, b"u", b"w", b"m", b"p")
    assert mqtt_impl.MQTTCodec().feed(swapped) == [Connect("MQTT", 4, True, 0, "c", Will("u", b"w", 0, False),
                                                           "m", b"p")]
