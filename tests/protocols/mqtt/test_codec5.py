"""The MQTT 5.0 codec, one suite run against both twins (fixture ``impl``:
``py-mqtt5`` = gridgate.protocols.mqtt.codec5_py with v5's property block
codec, ``c-mqtt5`` = gridgate._fastparse's MQTT5Codec and mqtt5_* functions
under the twin's names, as gridgate.protocols.mqtt.codec5 serves them).

Expected bytes are built here with ``struct`` from the specification's
figures (MQTT Version 5.0, sections cited), independently of the code under
test; the property table and every property's encoding are also checked
against paho-mqtt's own implementation (paho.mqtt.properties), and a real
paho client speaking MQTTv5 over a socket is decoded. Every decode runs
whole, byte by byte and in random chunks, and must give the same events (or
the same error: reason code and CONNACK code) every way.
"""
from __future__ import annotations

import os
import random
import socket
import struct
import threading
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gridgate import _fastparse
from gridgate.errors import MQTTProtocolError
from gridgate.protocols.mqtt import codec5_py, v5
from gridgate.protocols.mqtt.codec5 import compiled_codec5
from gridgate.protocols.mqtt.events import PingReq
from gridgate.protocols.mqtt.events5 import (
    Auth,
    Connect5,
    Disconnect5,
    PubAck5,
    PubComp5,
    Publish5,
    PubRec5,
    PubRel5,
    Subscribe5,
    Subscription,
    Unsubscribe5,
    Will5,
)
from gridgate.protocols.mqtt.v5 import MQTT5Error, Properties
from mqtt_frames import pack_remaining_length, pack_string

# The ``impl`` fixture hands hypothesis tests a module-like namespace with no
# state, so sharing it between examples is safe.
SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# The two twins, each as the codec5 API plus its property block codec (which
# the tests check rule by rule): the pure-Python reference, then the compiled
# one, imported directly so that a failed build fails here.
Twin = Any
PY_TWIN = SimpleNamespace(**{name: getattr(codec5_py, name) for name in codec5_py.__all__},
                          decode_properties=v5.decode_properties, encode_properties=v5.encode_properties)
C_TWIN = SimpleNamespace(**vars(compiled_codec5(_fastparse)), decode_properties=_fastparse.mqtt5_decode_properties,
                         encode_properties=_fastparse.mqtt5_encode_properties)


@pytest.fixture(params=[PY_TWIN, C_TWIN], ids=["py-mqtt5", "c-mqtt5"])
def impl(request: pytest.FixtureRequest) -> Twin:
    """The MQTT 5.0 codec under test: the pure-Python twin, then the compiled one."""
    return request.param


# -- builders (independent of the codec) ----------------------------------------------------


def u8(n: int) -> bytes:
    return struct.pack("!B", n)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def block(*props: bytes) -> bytes:
    """A property block: Property Length (a VBI, same encoding as the remaining length) and the properties."""
    body = b"".join(props)
    return pack_remaining_length(len(body)) + body


def packet(first: int, body: bytes) -> bytes:
    return u8(first) + pack_remaining_length(len(body)) + body


def connect5(client_id: str = "meter-1", keepalive: int = 60, flags: int = 0x02, props: bytes = b"\x00",
             payload: bytes = b"", name: bytes = b"MQTT", level: int = 5) -> bytes:
    """CONNECT (3.1): variable header then client id, then ``payload`` (Will, user name, password) as given."""
    body = pack_string(name) + u8(level) + u8(flags) + u16(keepalive) + props + pack_string(client_id) + payload
    return packet(0x10, body)


def publish5(topic: str | bytes, payload: bytes = b"{}", qos: int = 0, pid: int = 0, props: bytes = b"\x00",
             flags: int | None = None) -> bytes:
    first = 0x30 | (qos << 1) if flags is None else 0x30 | flags
    return packet(first, pack_string(topic) + (u16(pid) if qos else b"") + props + payload)


CONNECT = connect5()
CONNECT_EVENT = Connect5(True, 60, "meter-1", None, None, None)
NONE = Properties()


# -- feeding --------------------------------------------------------------------------------------


def feed_whole(codec: codec5_py.MQTT5Codec, data: bytes) -> list:
    return codec.feed(data)


def feed_bytewise(codec: codec5_py.MQTT5Codec, data: bytes) -> list:
    events: list = []
    for i in range(len(data)):
        events.extend(codec.feed(data[i:i + 1]))
    return events


def _random_feeder(seed: int):
    def feed_random(codec: codec5_py.MQTT5Codec, data: bytes) -> list:
        rng = random.Random(seed)
        events: list = []
        i = 0
        while i < len(data):
            n = rng.choice((0, 1, 2, 3, 5, 8, 13, 64))
            events.extend(codec.feed(bytearray(data[i:i + n])))   # a mutable buffer now and then
            i += n
        return events
    return feed_random


FEEDERS = [feed_whole, feed_bytewise, _random_feeder(1), _random_feeder(2)]


def decode(impl: Twin, data: bytes, **kw) -> list:
    results = []
    for feeder in FEEDERS:
        codec = impl.MQTT5Codec(**kw)
        results.append(feeder(codec, data))
        assert codec.buffered == 0
    for events in results[1:]:
        assert events == results[0]
    return results[0]


def error_of(impl: Twin, data: bytes, **kw) -> MQTT5Error:
    errors = []
    for feeder in FEEDERS:
        codec = impl.MQTT5Codec(**kw)
        with pytest.raises(MQTT5Error) as info:
            feeder(codec, data)
        errors.append(info.value)
        # dead afterwards: the same error again
        with pytest.raises(MQTT5Error) as again:
            codec.feed(b"\xc0\x00")
        assert again.value == info.value
    for e in errors[1:]:
        assert (e.reason_code, e.return_code) == (errors[0].reason_code, errors[0].return_code)
    return errors[0]


def after_connect(impl: Twin, code: int, data: bytes, **kw) -> None:
    """``data`` after a good CONNECT raises ``code`` for a DISCONNECT (no CONNACK code)."""
    e = error_of(impl, CONNECT + data, **kw)
    assert (e.reason_code, e.return_code) == (code, None), e
    assert e.reason == v5.reason_name(code)


def in_connect(impl: Twin, code: int, data: bytes) -> None:
    """A bad CONNECT raises ``code`` to answer with CONNACK (MQTT-3.14.0-1)."""
    e = error_of(impl, data)
    assert (e.reason_code, e.return_code) == (code, code), e


# -- variable byte integers (section 1.5.5, table 1-1) -----------------------------------------------

VBI_TABLE = [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"), (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize(("value", "raw"), VBI_TABLE)
def test_vbi_table_1_1(value: int, raw: bytes) -> None:
    assert v5.encode_vbi(value) == raw
    assert v5.decode_vbi(raw + b"tail", 0, len(raw) + 4) == (value, len(raw))
    assert v5.decode_vbi(raw[:-1], 0, len(raw) - 1) == (-1, 0)   # cut off: not an error yet


@pytest.mark.parametrize("raw", [b"\x80\x00", b"\xff\x80\x00", b"\x80\x80\x80\x00", b"\x81\x00"])
def test_vbi_longer_than_needed_is_malformed(raw: bytes) -> None:
    with pytest.raises(MQTT5Error) as info:
        v5.decode_vbi(raw, 0, len(raw))
    assert info.value.reason_code == 0x81


def test_vbi_of_five_bytes_is_malformed() -> None:
    with pytest.raises(MQTT5Error) as info:
        v5.decode_vbi(b"\xff\xff\xff\xff\x01", 0, 5)
    assert info.value.reason_code == 0x81


@pytest.mark.parametrize("bad", [-1, 268_435_456])
def test_vbi_encode_range(bad: int) -> None:
    with pytest.raises(ValueError):
        v5.encode_vbi(bad)


@given(st.integers(0, v5.MAX_VBI))
def test_vbi_round_trip(n: int) -> None:
    raw = v5.encode_vbi(n)
    assert raw == pack_remaining_length(n)
    assert v5.decode_vbi(raw, 0, len(raw)) == (n, len(raw))


# -- the property table against paho's --------------------------------------------------------------


def test_property_table_matches_paho() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties

    paho = PahoProperties(PacketTypes.PUBLISH)
    paho_types = {"Byte": v5.BYTE, "Two Byte Integer": v5.TWO_BYTE, "Four Byte Integer": v5.FOUR_BYTE,
                  "Variable Byte Integer": v5.VBI, "UTF-8 Encoded String": v5.UTF8, "Binary Data": v5.BINARY,
                  "UTF-8 String Pair": v5.UTF8_PAIR}
    paho_packets = {getattr(PacketTypes, n): t for n, t in [
        ("CONNECT", 1), ("CONNACK", 2), ("PUBLISH", 3), ("PUBACK", 4), ("PUBREC", 5), ("PUBREL", 6),
        ("PUBCOMP", 7), ("SUBSCRIBE", 8), ("SUBACK", 9), ("UNSUBSCRIBE", 10), ("UNSUBACK", 11),
        ("DISCONNECT", 14), ("AUTH", 15), ("WILLMESSAGE", v5.WILL)]}
    ours = {p.identifier: (p.type, p.packets) for p in v5.PROPERTIES}
    theirs = {i: (paho_types[paho.types[t]], frozenset(paho_packets[p] for p in packets))
              for i, (t, packets) in paho.properties.items()}
    assert ours == theirs
    assert len(v5.PROPERTIES) == 27
    # the names are the spec's, as paho spells them too
    assert {p.name: p.identifier for p in v5.PROPERTIES} == paho.names


def test_only_user_property_and_subscription_identifier_repeat() -> None:
    repeatable = {p.identifier: p.repeat_in for p in v5.PROPERTIES if p.repeat_in}
    assert repeatable == {0x26: v5.PROPERTIES_BY_NAME["user_properties"].packets, 0x0B: frozenset({v5.PUBLISH})}


def test_reason_code_names() -> None:
    assert len(v5.REASON_CODE_NAMES) == 43
    assert v5.reason_name(0x81) == "malformed_packet"
    assert v5.reason_name(0x82) == "protocol_error"
    assert v5.reason_name(0x9C) == "use_another_server"
    assert v5.reason_name(0x03) == "reason_0x03"
    for codes in v5.REASON_CODES_BY_PACKET.values():
        assert codes <= v5.REASON_CODE_NAMES.keys()


def test_error_is_a_protocol_error_and_pickles() -> None:
    import pickle
    e = MQTT5Error(0x95, "too big", None)
    assert isinstance(e, MQTTProtocolError)
    back = pickle.loads(pickle.dumps(e))
    assert (back.reason_code, back.reason, back.detail, back.return_code) == (0x95, "packet_too_large",
                                                                                  "too big", None)


# -- every property: bytes by hand, both codecs -------------------------------------------------------

# (attr, a packet allowing it, its value, the bytes of the property by hand)
EVERY_PROPERTY = [
    ("payload_format_indicator", v5.PUBLISH, 1, b"\x01" + u8(1)),
    ("message_expiry_interval", v5.PUBLISH, 3600, b"\x02" + u32(3600)),
    ("content_type", v5.PUBLISH, "application/json", b"\x03" + pack_string("application/json")),
    ("response_topic", v5.PUBLISH, "devices/m1/replies", b"\x08" + pack_string("devices/m1/replies")),
    ("correlation_data", v5.PUBLISH, b"\x00\xffid", b"\x09" + pack_string(b"\x00\xffid")),
    ("subscription_identifiers", v5.SUBSCRIBE, (268_435_455,), b"\x0b\xff\xff\xff\x7f"),
    ("session_expiry_interval", v5.CONNECT, 0xFFFFFFFF, b"\x11" + u32(0xFFFFFFFF)),
    ("assigned_client_identifier", v5.CONNACK, "auto-1", b"\x12" + pack_string("auto-1")),
    ("server_keep_alive", v5.CONNACK, 30, b"\x13" + u16(30)),
    ("authentication_method", v5.AUTH, "SCRAM-SHA-1", b"\x15" + pack_string("SCRAM-SHA-1")),
    ("authentication_data", v5.AUTH, b"\x01\x02", b"\x16" + pack_string(b"\x01\x02")),
    ("request_problem_information", v5.CONNECT, 0, b"\x17" + u8(0)),
    ("will_delay_interval", v5.WILL, 5, b"\x18" + u32(5)),
    ("request_response_information", v5.CONNECT, 1, b"\x19" + u8(1)),
    ("response_information", v5.CONNACK, "resp/", b"\x1a" + pack_string("resp/")),
    ("server_reference", v5.DISCONNECT, "other:1883", b"\x1c" + pack_string("other:1883")),
    ("reason_string", v5.PUBACK, "out_of_range: temperature", b"\x1f" + pack_string("out_of_range: temperature")),
    ("receive_maximum", v5.CONNACK, 1024, b"\x21" + u16(1024)),
    ("topic_alias_maximum", v5.CONNACK, 16, b"\x22" + u16(16)),
    ("topic_alias", v5.PUBLISH, 65535, b"\x23" + u16(65535)),
    ("maximum_qos", v5.CONNACK, 1, b"\x24" + u8(1)),
    ("retain_available", v5.CONNACK, 0, b"\x25" + u8(0)),
    ("user_properties", v5.PUBLISH, (("traceparent", "00-0af7-b7ad-01"), ("k", "")),
     b"\x26" + pack_string("traceparent") + pack_string("00-0af7-b7ad-01") + b"\x26" + pack_string("k")
     + pack_string("")),
    ("maximum_packet_size", v5.CONNECT, 268_435_455, b"\x27" + u32(268_435_455)),
    ("wildcard_subscription_available", v5.CONNACK, 0, b"\x28" + u8(0)),
    ("subscription_identifier_available", v5.CONNACK, 0, b"\x29" + u8(0)),
    ("shared_subscription_available", v5.CONNACK, 0, b"\x2a" + u8(0)),
]


def test_every_property_is_listed() -> None:
    assert sorted(a for a, *_ in EVERY_PROPERTY) == sorted(v5.PROPERTIES_BY_NAME)


@pytest.mark.parametrize(("attr", "ptype", "value", "raw"), EVERY_PROPERTY, ids=[a for a, *_ in EVERY_PROPERTY])
def test_every_property_round_trip(impl: Twin, attr: str, ptype: int, value: object, raw: bytes) -> None:
    props = Properties(**{attr: value})
    encoded = impl.encode_properties(props, ptype)
    assert encoded == block(raw)
    framed = encoded + b"rest"
    assert impl.decode_properties(framed, 0, len(framed), ptype) == (props, len(encoded))


def _paho_packet_type(ptype: int) -> int:
    from paho.mqtt.packettypes import PacketTypes
    return PacketTypes.WILLMESSAGE if ptype == v5.WILL else ptype


@pytest.mark.parametrize(("attr", "ptype", "value", "raw"), EVERY_PROPERTY, ids=[a for a, *_ in EVERY_PROPERTY])
def test_every_property_agrees_with_paho(impl: Twin, attr: str, ptype: int, value: object, raw: bytes) -> None:
    """paho decodes what we encode, and we decode what paho encodes."""
    from paho.mqtt.properties import Properties as PahoProperties

    spec = v5.PROPERTIES_BY_NAME[attr]
    paho_name = spec.name.replace(" ", "")
    theirs = PahoProperties(_paho_packet_type(ptype))
    paho_value: object = value
    if attr == "user_properties":
        paho_value = list(value)  # type: ignore[arg-type]
    elif attr == "subscription_identifiers":
        paho_value = value[0]  # type: ignore[index]
    setattr(theirs, paho_name, paho_value)
    packed = theirs.pack()
    assert impl.decode_properties(packed, 0, len(packed), ptype)[0] == Properties(**{attr: value})
    back = PahoProperties(_paho_packet_type(ptype))
    back.unpack(impl.encode_properties(Properties(**{attr: value}), ptype))
    got = getattr(back, paho_name)
    if attr == "subscription_identifiers":
        got = tuple(got)
    elif attr == "user_properties":
        got = tuple(tuple(p) for p in got)
    elif spec.type == v5.BINARY:
        got = bytes(got)
    assert got == value


# -- property block rejections -------------------------------------------------------------------------

ALL_PLACES = [v5.CONNECT, v5.CONNACK, v5.PUBLISH, v5.PUBACK, v5.PUBREC, v5.PUBREL, v5.PUBCOMP, v5.SUBSCRIBE,
              v5.SUBACK, v5.UNSUBSCRIBE, v5.UNSUBACK, v5.DISCONNECT, v5.AUTH, v5.WILL]
_RAW = {attr: raw for attr, _, _, raw in EVERY_PROPERTY}


def block_error(impl: Twin, raw_block: bytes, ptype: int) -> MQTT5Error:
    with pytest.raises(MQTT5Error) as info:
        impl.decode_properties(raw_block, 0, len(raw_block), ptype)
    return info.value


@pytest.mark.parametrize(("attr", "ptype"), [(p.attr, t) for p in v5.PROPERTIES for t in ALL_PLACES
                                             if t not in p.packets])
def test_property_not_allowed_in_packet_is_malformed(impl: Twin, attr: str, ptype: int) -> None:
    # 2.2.2.2: "an Identifier which is not valid for its packet type ... is a Malformed Packet"
    assert block_error(impl, block(_RAW[attr]), ptype).reason_code == 0x81
    with pytest.raises(ValueError):
        impl.encode_properties(Properties(**{a: v for a, _, v, _ in EVERY_PROPERTY if a == attr}), ptype)


@pytest.mark.parametrize(("attr", "ptype"), [(p.attr, t) for p in v5.PROPERTIES for t in sorted(p.packets)
                                             if t not in p.repeat_in])
def test_property_twice_is_protocol_error(impl: Twin, attr: str, ptype: int) -> None:
    raw = _RAW[attr]
    assert block_error(impl, block(raw, raw), ptype).reason_code == 0x82


def test_user_property_repeats_everywhere_and_keeps_order(impl: Twin) -> None:
    pairs = (("b", "1"), ("a", "2"), ("b", "3"))
    raw = block(*(b"\x26" + pack_string(k) + pack_string(v) for k, v in pairs))
    for ptype in v5.PROPERTIES_BY_NAME["user_properties"].packets:
        assert impl.decode_properties(raw, 0, len(raw), ptype)[0].user_properties == pairs


def test_subscription_identifier_repeats_in_publish_only(impl: Twin) -> None:
    raw = block(b"\x0b\x01", b"\x0b\x80\x01")
    assert impl.decode_properties(raw, 0, len(raw), v5.PUBLISH)[0].subscription_identifiers == (1, 128)
    assert block_error(impl, raw, v5.SUBSCRIBE).reason_code == 0x82
    assert impl.encode_properties(Properties(subscription_identifiers=(1, 128)), v5.PUBLISH) == raw
    with pytest.raises(ValueError):
        impl.encode_properties(Properties(subscription_identifiers=(1, 128)), v5.SUBSCRIBE)


@pytest.mark.parametrize("ident", [0x00, 0x04, 0x0A, 0x10, 0x14, 0x1B, 0x20, 0x2B, 0x7F])
def test_unknown_property_identifier_is_malformed(impl: Twin, ident: int) -> None:
    assert block_error(impl, block(u8(ident) + b"\x00"), v5.PUBLISH).reason_code == 0x81


def test_identifier_in_a_long_form_is_malformed(impl: Twin) -> None:
    # 0x80 0x00 would be identifier 0 in two bytes: the VBI rule (MQTT-1.5.5-1) catches it first
    assert block_error(impl, block(b"\x81\x00\x00"), v5.PUBLISH).reason_code == 0x81


# (attr, packet, the bad property, reason code)
BAD_VALUES = [
    ("payload_format_indicator", v5.PUBLISH, b"\x01\x02", 0x82),
    ("request_problem_information", v5.CONNECT, b"\x17\x02", 0x82),
    ("request_response_information", v5.CONNECT, b"\x19\xff", 0x82),
    ("maximum_qos", v5.CONNACK, b"\x24\x02", 0x82),
    ("retain_available", v5.CONNACK, b"\x25\x02", 0x82),
    ("wildcard_subscription_available", v5.CONNACK, b"\x28\x02", 0x82),
    ("subscription_identifier_available", v5.CONNACK, b"\x29\x02", 0x82),
    ("shared_subscription_available", v5.CONNACK, b"\x2a\x02", 0x82),
    ("receive_maximum", v5.CONNECT, b"\x21\x00\x00", 0x82),
    ("maximum_packet_size", v5.CONNECT, b"\x27\x00\x00\x00\x00", 0x82),
    ("subscription_identifiers", v5.SUBSCRIBE, b"\x0b\x00", 0x82),
    ("topic_alias", v5.PUBLISH, b"\x23\x00\x00", 0x94),
    ("response_topic", v5.PUBLISH, b"\x08" + pack_string("replies/#"), 0x82),
    ("response_topic", v5.WILL, b"\x08" + pack_string("+/r"), 0x82),
    ("response_topic", v5.PUBLISH, b"\x08" + pack_string(""), 0x82),
]


@pytest.mark.parametrize(("attr", "ptype", "raw", "code"), BAD_VALUES, ids=[f"{a}-{r.hex()}" for a, _, r, _ in
                                                                           BAD_VALUES])
def test_value_out_of_range(impl: Twin, attr: str, ptype: int, raw: bytes, code: int) -> None:
    assert block_error(impl, block(raw), ptype).reason_code == code


@pytest.mark.parametrize(("attr", "value"), [
    ("receive_maximum", 0), ("maximum_packet_size", 0), ("payload_format_indicator", 2), ("topic_alias", 0),
    ("server_keep_alive", 65536), ("message_expiry_interval", 1 << 32), ("response_topic", "a/+"),
    ("content_type", "a\x00b"), ("reason_string", "tab\there"), ("user_properties", (("k", "\ufffe"),)),
])
def test_encoder_refuses_what_the_decoder_would(impl: Twin, attr: str, value: object) -> None:
    ptype = next(t for a, t, _, _ in EVERY_PROPERTY if a == attr)
    if attr in ("receive_maximum", "maximum_packet_size"):
        ptype = v5.CONNACK
    with pytest.raises(ValueError):
        impl.encode_properties(Properties(**{attr: value}), ptype)


@pytest.mark.parametrize(("raw", "what"), [
    (b"\x05\x02\x00\x00\x0e", "length past the end"),            # Property Length 5, 4 bytes follow
    (b"\x02\x23\x00", "two-byte integer cut off"),
    (b"\x03\x02\x00\x00", "four-byte integer cut off"),
    (b"\x01\x01", "byte cut off"),
    (b"\x02\x0b\x80", "VBI cut off"),
    (b"\x04\x03\x00\x05a", "string past its property block"),
    (b"\x02\x03\x00", "string length cut off"),
    (b"\x06\x26\x00\x01k\x00\x05", "user property value past the block"),
    (b"\x80", "Property Length cut off"),
    (b"\x80\x00", "Property Length in a long form"),
])
def test_malformed_lengths(impl: Twin, raw: bytes, what: str) -> None:
    assert block_error(impl, raw, v5.PUBLISH).reason_code == 0x81, what


BAD_UTF8 = [
    b"\xc3\x28",              # ill-formed
    b"\xed\xa0\x80",          # UTF-16 surrogate U+D800
    b"\xc0\xaf",              # overlong '/'
    b"a\x00b",                # U+0000 (MQTT-1.5.4-2)
    b"\x01", b"\x1f", b"\t", b"\x7f",        # C0 controls and DEL
    "\u0085".encode(), "\u009f".encode(),      # C1 controls
    "\ufdd0".encode(), "\ufdef".encode(), "\ufffe".encode(), "\uffff".encode(),  # non-characters
    "\U0001fffe".encode(), "\U0010ffff".encode(),
]


@pytest.mark.parametrize("raw", BAD_UTF8, ids=[r.hex() for r in BAD_UTF8])
def test_bad_utf8_in_any_string_is_malformed(impl: Twin, raw: bytes) -> None:
    for prop in (b"\x03" + pack_string(raw), b"\x26" + pack_string(raw) + pack_string("v"),
                 b"\x26" + pack_string("k") + pack_string(raw)):
        assert block_error(impl, block(prop), v5.PUBLISH).reason_code == 0x81
    after_connect(impl, 0x81, publish5(raw))                            # topic name
    in_connect(impl, 0x81, connect5(flags=0x82, payload=pack_string(raw)))   # user name


def test_good_utf8_is_kept(impl: Twin) -> None:
    text = "zähler/€/𝄞/\ufdcf/\ufdf0/\ufffd"   # just outside the refused ranges
    raw = block(b"\x03" + pack_string(text))
    assert impl.decode_properties(raw, 0, len(raw), v5.PUBLISH)[0].content_type == text


# -- CONNECT (3.1) -------------------------------------------------------------------------------------


def test_connect_variable_header_example(impl: Twin) -> None:
    """The Variable Header example of 3.1.2.12 (name, version 5, flags 0xCE, keepalive 10, Session Expiry 10)
    with a Will carrying every Will property."""
    will = block(b"\x18" + u32(5), b"\x01\x01", b"\x02" + u32(60), b"\x03" + pack_string("text/plain"),
                 b"\x08" + pack_string("r/t"), b"\x09" + pack_string(b"c"),
                 b"\x26" + pack_string("a") + pack_string("b"))
    body = (b"\x00\x04MQTT\x05\xce\x00\x0a\x05\x11\x00\x00\x00\x0a" + pack_string("m1") + will
            + pack_string("devices/m1/status") + pack_string(b"gone") + pack_string("user") + pack_string(b"pw"))
    [event] = decode(impl, packet(0x10, body))
    assert event == Connect5(
        True, 10, "m1",
        Will5("devices/m1/status", b"gone", 1, False, Properties(
            will_delay_interval=5, payload_format_indicator=1, message_expiry_interval=60,
            content_type="text/plain", response_topic="r/t", correlation_data=b"c", user_properties=(("a", "b"),))),
        "user", b"pw", Properties(session_expiry_interval=10))


def test_connect_every_property(impl: Twin) -> None:
    props = block(b"\x11" + u32(300), b"\x21" + u16(20), b"\x27" + u32(4096), b"\x22" + u16(8), b"\x19\x01",
                  b"\x17\x00", b"\x26" + pack_string("k") + pack_string("v"), b"\x15" + pack_string("M"),
                  b"\x16" + pack_string(b"d"))
    [event] = decode(impl, connect5(props=props, flags=0x00, keepalive=0))
    assert event == Connect5(False, 0, "meter-1", None, None, None, Properties(
        session_expiry_interval=300, receive_maximum=20, maximum_packet_size=4096, topic_alias_maximum=8,
        request_response_information=1, request_problem_information=0, user_properties=(("k", "v"),),
        authentication_method="M", authentication_data=b"d"))


def test_connect_password_without_user_name_is_allowed_in_5(impl: Twin) -> None:
    # 3.1.2.9 (5.0) dropped 3.1.1's MQTT-3.1.2-22
    [event] = decode(impl, connect5(flags=0x42, payload=pack_string(b"secret")))
    assert event.password == b"secret" and event.username is None


def test_connect_empty_client_id_is_left_to_the_session(impl: Twin) -> None:
    [event] = decode(impl, connect5(client_id="", flags=0x00))
    assert event.client_id == ""


@pytest.mark.parametrize(("data", "code"), [
    (connect5(level=4), 0x84),
    (connect5(level=3, name=b"MQIsdp"), 0x84),
    (connect5(name=b"MQTX"), 0x84),
    (connect5(flags=0x03), 0x81),                    # reserved flag (MQTT-3.1.2-3)
    (connect5(flags=0x1e, payload=block() + pack_string("t") + pack_string(b"")), 0x81),   # Will QoS 3
    (connect5(flags=0x0a), 0x81),                    # Will QoS without Will flag (MQTT-3.1.2-11/13)
    (connect5(flags=0x22), 0x81),                    # Will Retain without Will flag (MQTT-3.1.2-15)
    (connect5(flags=0x06, payload=block() + pack_string("a/#") + pack_string(b"")), 0x82),   # Will topic
    (connect5(flags=0x06, payload=block() + pack_string("") + pack_string(b"")), 0x82),
    (connect5(flags=0x06, payload=block(b"\x23\x00\x01") + pack_string("t") + pack_string(b"")), 0x81),
    (connect5(props=block(b"\x16" + pack_string(b"d"))), 0x82),   # Authentication Data without Method
    (connect5(props=block(b"\x23\x00\x01")), 0x81),  # Topic Alias not allowed in CONNECT
    (connect5(props=block(b"\x21\x00\x00")), 0x82),  # Receive Maximum 0
    (connect5(payload=b"x"), 0x81),                  # a byte after the payload
    (connect5(flags=0x82), 0x81),                    # user name flag, no user name
    (packet(0x10, b"\x00\x04MQTT"), 0x81),           # ends before the version
    (packet(0x10, b"\x00\x04MQTT\x05"), 0x81),       # ends before the flags
    (packet(0x12, b""), 0x81),                       # CONNECT with flags (2.1.3)
    (b"\x10\x80\x00", 0x81),                         # remaining length in a long form
    (b"\x10\xff\xff\xff\xff\x01", 0x81),             # remaining length of 5 bytes
])
def test_connect_errors_answer_with_connack(impl: Twin, data: bytes, code: int) -> None:
    in_connect(impl, code, data)


def test_connect_too_large_is_0x95_in_connack(impl: Twin) -> None:
    e = error_of(impl, connect5(client_id="x" * 100), max_packet_bytes=50)
    assert (e.reason_code, e.return_code) == (0x95, 0x95)


@pytest.mark.parametrize("data", [b"\x30\x00", b"\xc0\x00", b"\xf0\x00", b"\x20\x02\x00\x00"])
def test_first_packet_not_connect_closes_without_connack(impl: Twin, data: bytes) -> None:
    e = error_of(impl, data)
    assert (e.reason_code, e.return_code) == (0x82, None)    # MQTT-3.1.0-1: just close


def test_second_connect_is_protocol_error(impl: Twin) -> None:
    after_connect(impl, 0x82, CONNECT)


# -- PUBLISH (3.3) ----------------------------------------------------------------------------------


def test_publish_with_every_publish_property(impl: Twin) -> None:
    props = block(b"\x01\x01", b"\x02" + u32(60), b"\x03" + pack_string("application/json"),
                  b"\x08" + pack_string("devices/m1/r"), b"\x09" + pack_string(b"\x01\x02"), b"\x23" + u16(3),
                  b"\x26" + pack_string("traceparent") + pack_string("00-ab-cd-01"),
                  b"\x26" + pack_string("tracestate") + pack_string("k=v"))
    data = CONNECT + publish5("devices/m1/telemetry", b'{"t":1}', qos=1, pid=9, props=props)
    _, event = decode(impl, data, topic_alias_maximum=16)
    assert event == Publish5("devices/m1/telemetry", b'{"t":1}', 1, 9, False, False, Properties(
        payload_format_indicator=1, message_expiry_interval=60, content_type="application/json",
        response_topic="devices/m1/r", correlation_data=b"\x01\x02", topic_alias=3,
        user_properties=(("traceparent", "00-ab-cd-01"), ("tracestate", "k=v"))))


def test_publish_flags_and_empty_payload(impl: Twin) -> None:
    _, a, b = decode(impl, CONNECT + publish5("t", b"", qos=2, pid=1, flags=0b1101) + publish5("t", b"x", flags=0b0001))
    assert (a.qos, a.dup, a.retain, bytes(a.payload)) == (2, True, True, b"")
    assert (b.qos, b.dup, b.retain, b.packet_id) == (0, False, True, 0)


def test_topic_alias_sets_then_resolves(impl: Twin) -> None:
    alias = block(b"\x23" + u16(2))
    data = (CONNECT + publish5("devices/m1/telemetry", b"1", props=alias) + publish5("", b"2", props=alias)
            + publish5("telemetry", b"3", props=alias) + publish5("", b"4", props=alias))
    events = decode(impl, data, topic_alias_maximum=2)
    assert [(e.topic, bytes(e.payload)) for e in events[1:]] == [
        ("devices/m1/telemetry", b"1"), ("devices/m1/telemetry", b"2"), ("telemetry", b"3"), ("telemetry", b"4")]


@pytest.mark.parametrize(("data", "code", "alias_max"), [
    (publish5("t", props=block(b"\x23" + u16(3))), 0x94, 2),       # above the maximum (MQTT-3.3.2-9)
    (publish5("t", props=block(b"\x23" + u16(1))), 0x94, 0),       # no aliases granted
    (publish5("t", props=block(b"\x23" + u16(0))), 0x94, 2),       # alias 0 (MQTT-3.3.2-8)
    (publish5("", props=block(b"\x23" + u16(1))), 0x82, 2),        # alias without a mapping
    (publish5(""), 0x82, 2),                                        # empty topic, no alias (3.3.2.1)
    (publish5("a/+"), 0x82, 0),                                     # wildcard (MQTT-3.3.2-2)
    (publish5("a/#"), 0x82, 0),
    (publish5("t", qos=1, pid=0), 0x82, 0),                         # packet id 0 (MQTT-2.2.1-3)
    (publish5("t", props=block(b"\x0b\x01")), 0x82, 0),             # Subscription Identifier (MQTT-3.3.4-6)
    (publish5("t", props=block(b"\x11" + u32(1))), 0x81, 0),        # Session Expiry not allowed in PUBLISH
    (publish5("t", props=block(b"\x01\x01", b"\x01\x01")), 0x82, 0),  # twice
    (packet(0x36, pack_string("t") + u16(1) + b"\x00"), 0x81, 0),   # QoS 3 (MQTT-3.3.1-4)
    (packet(0x38, pack_string("t") + b"\x00"), 0x81, 0),            # DUP on QoS 0 (MQTT-3.3.1-2)
    (packet(0x30, b"\x00"), 0x81, 0),                               # ends inside the topic length
    (packet(0x30, pack_string("t")), 0x81, 0),                      # no Property Length
    (packet(0x32, pack_string("t") + b"\x00"), 0x81, 0),            # ends inside the packet id
])
def test_publish_errors(impl: Twin, data: bytes, code: int, alias_max: int) -> None:
    after_connect(impl, code, data, topic_alias_maximum=alias_max)


def test_publish_too_large_before_the_body_arrives(impl: Twin) -> None:
    codec = impl.MQTT5Codec(max_packet_bytes=100)
    codec.feed(CONNECT)
    with pytest.raises(MQTT5Error) as info:
        codec.feed(b"\x30\xff\x7f")        # announces 16,383 bytes: refused from the header alone
    assert (info.value.reason_code, info.value.return_code) == (0x95, None)


def test_payload_is_a_slice_of_the_read(impl: Twin) -> None:
    data = CONNECT + publish5("t", b"payload")
    codec = impl.MQTT5Codec()
    _, event = codec.feed(data)
    assert isinstance(event.payload, memoryview) and event.payload.obj is data


# -- acks (3.4 - 3.7) ---------------------------------------------------------------------------------

ACKS = [(0x40, PubAck5), (0x50, PubRec5), (0x62, PubRel5), (0x70, PubComp5)]


@pytest.mark.parametrize(("first", "cls"), ACKS)
def test_ack_omission_forms(impl: Twin, first: int, cls: type) -> None:
    code = 0x10 if first < 0x60 else 0x92
    reason = block(b"\x1f" + pack_string("why"), b"\x26" + pack_string("k") + pack_string("v"))
    data = CONNECT + (packet(first, u16(7)) + packet(first, u16(8) + u8(code))
                      + packet(first, u16(9) + u8(code) + b"\x00") + packet(first, u16(10) + b"\x00" + reason))
    assert decode(impl, data)[1:] == [
        cls(7, 0, NONE), cls(8, code, NONE), cls(9, code, NONE),
        cls(10, 0, Properties(reason_string="why", user_properties=(("k", "v"),)))]


@pytest.mark.parametrize(("first", "cls"), ACKS)
def test_ack_errors(impl: Twin, first: int, cls: type) -> None:
    after_connect(impl, 0x81, packet(first, u16(1)[:1]))                      # remaining length 1
    after_connect(impl, 0x82, packet(first, u16(0)))                          # packet id 0
    after_connect(impl, 0x82, packet(first, u16(1) + b"\x05"))                # no such reason code
    bad_for_this = 0x92 if first < 0x60 else 0x99
    after_connect(impl, 0x82, packet(first, u16(1) + u8(bad_for_this)))
    after_connect(impl, 0x81, packet(first, u16(1) + b"\x00\x00\x00"))        # a byte after the properties
    after_connect(impl, 0x81, packet(first, u16(1) + b"\x00" + block(b"\x23\x00\x01")))   # Topic Alias in an ack
    after_connect(impl, 0x81, packet(first ^ 0x02, u16(1)))                   # wrong fixed-header flags


# -- SUBSCRIBE / UNSUBSCRIBE (3.8, 3.10) ---------------------------------------------------------------


def test_subscribe_options_and_properties(impl: Twin) -> None:
    body = (u16(5) + block(b"\x0b\x2a", b"\x26" + pack_string("k") + pack_string("v"))
            + pack_string("devices/m1/commands") + u8(0b00101101)    # RH 2, RAP 1, NL 1, QoS 1
            + pack_string("a/+/#") + u8(0b00010010)                 # RH 1, QoS 2
            + pack_string("$share/g/x") + u8(0x00)
            + pack_string("bad/#/filter") + u8(0x00))               # syntax left to SUBACK 0x8F
    _, event = decode(impl, CONNECT + packet(0x82, body))
    assert event == Subscribe5(5, (
        Subscription("devices/m1/commands", 1, True, True, 2), Subscription("a/+/#", 2, False, False, 1),
        Subscription("$share/g/x", 0), Subscription("bad/#/filter", 0)),
        Properties(subscription_identifiers=(42,), user_properties=(("k", "v"),)))


@pytest.mark.parametrize(("body", "code"), [
    (u16(1) + b"\x00", 0x82),                                   # no filter (MQTT-3.8.3-2)
    (u16(0) + b"\x00" + pack_string("t") + b"\x00", 0x82),      # packet id 0
    (u16(1) + b"\x00" + pack_string("t") + b"\x40", 0x81),      # reserved option bits (MQTT-3.8.3-5)
    (u16(1) + b"\x00" + pack_string("t") + b"\x80", 0x81),
    (u16(1) + b"\x00" + pack_string("t") + b"\x03", 0x82),      # QoS 3
    (u16(1) + b"\x00" + pack_string("t") + b"\x30", 0x82),      # Retain Handling 3
    (u16(1) + b"\x00" + pack_string("$share/g/t") + b"\x04", 0x82),   # No Local on shared (MQTT-3.8.3-4)
    (u16(1) + b"\x00" + pack_string("t"), 0x81),                # no options byte
    (u16(1) + block(b"\x0b\x01", b"\x0b\x02") + pack_string("t") + b"\x00", 0x82),  # two Subscription Ids
    (u16(1) + block(b"\x0b\x00") + pack_string("t") + b"\x00", 0x82),               # Subscription Id 0
    (u16(1) + block(b"\x1f" + pack_string("r")) + pack_string("t") + b"\x00", 0x81),  # Reason String
    (u16(1) + b"\x00" + pack_string(b"\xff") + b"\x00", 0x81),  # bad UTF-8 filter
])
def test_subscribe_errors(impl: Twin, body: bytes, code: int) -> None:
    after_connect(impl, code, packet(0x82, body))


def test_subscribe_flags(impl: Twin) -> None:
    after_connect(impl, 0x81, packet(0x80, u16(1) + b"\x00" + pack_string("t") + b"\x00"))


def test_unsubscribe(impl: Twin) -> None:
    body = u16(3) + block(b"\x26" + pack_string("k") + pack_string("v")) + pack_string("a/b") + pack_string("#")
    _, event = decode(impl, CONNECT + packet(0xA2, body))
    assert event == Unsubscribe5(3, ("a/b", "#"), Properties(user_properties=(("k", "v"),)))


@pytest.mark.parametrize(("body", "code"), [
    (u16(1) + b"\x00", 0x82),                                   # no filter (MQTT-3.10.3-2)
    (u16(0) + b"\x00" + pack_string("t"), 0x82),
    (u16(1) + block(b"\x0b\x01") + pack_string("t"), 0x81),     # Subscription Identifier not allowed
    (u16(1) + b"\x00" + pack_string("t") + b"\x00", 0x81),      # a stray byte: a cut-off length
])
def test_unsubscribe_errors(impl: Twin, body: bytes, code: int) -> None:
    after_connect(impl, code, packet(0xA2, body))


# -- PINGREQ, DISCONNECT, AUTH (3.12, 3.14, 3.15) ----------------------------------------------------------


def test_pingreq(impl: Twin) -> None:
    assert decode(impl, CONNECT + b"\xc0\x00\xc0\x00")[1:] == [PingReq(), PingReq()]
    after_connect(impl, 0x81, b"\xc0\x01\x00")
    after_connect(impl, 0x81, b"\xc1\x00")


@pytest.mark.parametrize(("body", "event"), [
    (b"", Disconnect5(0, NONE)),
    (b"\x04", Disconnect5(4, NONE)),
    (b"\x00\x00", Disconnect5(0, NONE)),
    (b"\x81" + block(b"\x1f" + pack_string("oops"), b"\x26" + pack_string("a") + pack_string("b")),
     Disconnect5(0x81, Properties(reason_string="oops", user_properties=(("a", "b"),)))),
    (b"\x00" + block(b"\x11" + u32(0)), Disconnect5(0, Properties(session_expiry_interval=0))),
])
def test_disconnect(impl: Twin, body: bytes, event: Disconnect5) -> None:
    assert decode(impl, CONNECT + packet(0xE0, body))[1:] == [event]


def test_disconnect_session_expiry_rule(impl: Twin) -> None:
    # 3.14.2.2.2: non-zero in DISCONNECT after 0 (or absent) in CONNECT
    after_connect(impl, 0x82, packet(0xE0, b"\x00" + block(b"\x11" + u32(10))))
    with_expiry = connect5(props=block(b"\x11" + u32(60)))
    [_, event] = decode(impl, with_expiry + packet(0xE0, b"\x00" + block(b"\x11" + u32(10))))
    assert event == Disconnect5(0, Properties(session_expiry_interval=10))


def test_disconnect_errors(impl: Twin) -> None:
    after_connect(impl, 0x82, packet(0xE0, b"\x00\x00") + b"\xc0\x00")   # a byte after DISCONNECT (MQTT-3.14.4-1)
    after_connect(impl, 0x82, packet(0xE0, b"\x05"))             # no such DISCONNECT code
    after_connect(impl, 0x81, packet(0xE0, b"\x00\x00\x00"))     # a byte after the properties
    after_connect(impl, 0x81, packet(0xE0, b"\x00" + block(b"\x23\x00\x01")))
    after_connect(impl, 0x81, packet(0xE1, b""))


AUTH_CONNECT = connect5(props=block(b"\x15" + pack_string("SCRAM-SHA-256"), b"\x16" + pack_string(b"n,,")))


def test_auth(impl: Twin) -> None:
    props = block(b"\x15" + pack_string("SCRAM-SHA-256"), b"\x16" + pack_string(b"c=biws"),
                  b"\x1f" + pack_string("r"), b"\x26" + pack_string("k") + pack_string("v"))
    _, a, b = decode(impl, AUTH_CONNECT + packet(0xF0, b"\x18" + props) + packet(0xF0, b"\x19" + props))
    expected = Properties(authentication_method="SCRAM-SHA-256", authentication_data=b"c=biws",
                          reason_string="r", user_properties=(("k", "v"),))
    assert (a, b) == (Auth(0x18, expected), Auth(0x19, expected))


@pytest.mark.parametrize(("connect", "body", "code"), [
    (CONNECT, b"\x18" + block(b"\x15" + pack_string("SCRAM-SHA-256")), 0x82),   # CONNECT had no method
    (AUTH_CONNECT, b"\x18" + block(b"\x15" + pack_string("PLAIN")), 0x82),      # another method
    (AUTH_CONNECT, b"\x18\x00", 0x82),                                          # no method
    (AUTH_CONNECT, b"\x18", 0x82),
    (AUTH_CONNECT, b"", 0x82),                                                  # Success from a client
    (AUTH_CONNECT, b"\x00" + block(b"\x15" + pack_string("SCRAM-SHA-256")), 0x82),
    (AUTH_CONNECT, b"\x87" + block(b"\x15" + pack_string("SCRAM-SHA-256")), 0x82),   # not an AUTH code
    (AUTH_CONNECT, b"\x18" + block(b"\x15" + pack_string("SCRAM-SHA-256"), b"\x15" + pack_string("x")), 0x82),
    (AUTH_CONNECT, b"\x18" + block(b"\x11" + u32(1)), 0x81),                    # Session Expiry in AUTH
])
def test_auth_errors(impl: Twin, connect: bytes, body: bytes, code: int) -> None:
    e = error_of(impl, connect + packet(0xF0, body))
    assert (e.reason_code, e.return_code) == (code, None)


@pytest.mark.parametrize("first", [0x00, 0x20, 0x90, 0xB0, 0xD0])
def test_reserved_and_server_only_types(impl: Twin, first: int) -> None:
    after_connect(impl, 0x81 if first == 0 else 0x82, packet(first, b""))


# -- encoders (server to client), bytes by hand -------------------------------------------------------


def test_connack(impl: Twin) -> None:
    assert impl.encode_connack(False) == b"\x20\x03\x00\x00\x00"   # Property Length always there
    assert impl.encode_connack(True, 0) == b"\x20\x03\x01\x00\x00"
    props = Properties(receive_maximum=1024, maximum_packet_size=1_048_576, topic_alias_maximum=16,
                       retain_available=0, wildcard_subscription_available=0, shared_subscription_available=0,
                       server_keep_alive=120)
    raw = block(b"\x13" + u16(120), b"\x21" + u16(1024), b"\x22" + u16(16), b"\x25\x00",
                b"\x27" + u32(1_048_576), b"\x28\x00", b"\x2a\x00")
    assert impl.encode_connack(False, 0, props) == packet(0x20, b"\x00\x00" + raw)
    assert impl.encode_connack(False, 0x85, Properties(reason_string="bad id")) == packet(
        0x20, b"\x00\x85" + block(b"\x1f" + pack_string("bad id")))
    for bad in ((True, 0x85), (False, 0x10), (False, 0x8E)):
        with pytest.raises(ValueError):
            impl.encode_connack(*bad)
    with pytest.raises(ValueError):
        impl.encode_connack(False, 0, Properties(topic_alias=1))


@pytest.mark.parametrize(("name", "first", "codes"), [
    ("puback", 0x40, (0x10, 0x99, 0x90, 0x87, 0x97, 0x83)),
    ("pubrec", 0x50, (0x10, 0x99)),
    ("pubrel", 0x62, (0x92,)),
    ("pubcomp", 0x70, (0x92,)),
])
def test_acks(impl: Twin, name: str, first: int, codes: tuple[int, ...]) -> None:
    encode = getattr(impl, f"encode_{name}")
    assert encode(7) == bytes((first, 2, 0, 7))                           # Success, no properties: omitted
    for code in codes:
        assert encode(7, code) == bytes((first, 3, 0, 7, code))           # no properties: no Property Length
    why = Properties(reason_string="out_of_range: temperature")
    assert encode(300, codes[0], why) == packet(first, u16(300) + u8(codes[0]) + block(
        b"\x1f" + pack_string("out_of_range: temperature")))
    assert encode(1, 0, why) == packet(first, u16(1) + b"\x00" + block(b"\x1f" + pack_string(
        "out_of_range: temperature")))
    for bad in ((0,), (65536,), (1, 0x8E), (1, 0, Properties(content_type="x"))):
        with pytest.raises(ValueError):
            encode(*bad)


def test_suback_unsuback(impl: Twin) -> None:
    assert impl.encode_suback(5, [0, 1, 0x87, 0x8F]) == b"\x90\x07\x00\x05\x00\x00\x01\x87\x8f"
    assert impl.encode_suback(5, [0x87], Properties(reason_string="no")) == packet(
        0x90, u16(5) + block(b"\x1f" + pack_string("no")) + b"\x87")
    assert impl.encode_unsuback(6, [0, 0x11]) == b"\xb0\x05\x00\x06\x00\x00\x11"
    for bad in ((5, []), (5, [0x04]), (0, [0])):
        with pytest.raises(ValueError):
            impl.encode_suback(*bad)
    with pytest.raises(ValueError):
        impl.encode_unsuback(6, [0x01])      # Granted QoS is SUBACK's, not UNSUBACK's


def test_pingresp_disconnect_auth(impl: Twin) -> None:
    assert impl.encode_pingresp() == b"\xd0\x00"
    assert impl.encode_disconnect() == b"\xe0\x00"
    assert impl.encode_disconnect(0x8B) == b"\xe0\x01\x8b"
    assert impl.encode_disconnect(0x9C, Properties(server_reference="gw2:1883", reason_string="drain")) == \
        packet(0xE0, b"\x9c" + block(b"\x1c" + pack_string("gw2:1883"), b"\x1f" + pack_string("drain")))
    assert impl.encode_disconnect(0, Properties(reason_string="bye")) == packet(
        0xE0, b"\x00" + block(b"\x1f" + pack_string("bye")))
    for bad in (0x04, 0x10, 0x84):
        with pytest.raises(ValueError):
            impl.encode_disconnect(bad)
    with pytest.raises(ValueError):      # MQTT-3.14.2-2: not from the server
        impl.encode_disconnect(0x8B, Properties(session_expiry_interval=0))
    assert impl.encode_auth() == b"\xf0\x00"
    assert impl.encode_auth(0x18, Properties(authentication_method="M", authentication_data=b"s")) == \
        packet(0xF0, b"\x18" + block(b"\x15" + pack_string("M"), b"\x16" + pack_string(b"s")))
    with pytest.raises(ValueError):
        impl.encode_auth(0x19)


def test_publish_encoder(impl: Twin) -> None:
    props = Properties(message_expiry_interval=30, response_topic="devices/m1/acks", correlation_data=b"cmd-1",
                       subscription_identifiers=(1, 2))
    assert impl.encode_publish("devices/m1/commands", b"{}", 1, 4, properties=props) == packet(
        0x32, pack_string("devices/m1/commands") + u16(4) + block(
            b"\x02" + u32(30), b"\x08" + pack_string("devices/m1/acks"), b"\x09" + pack_string(b"cmd-1"),
            b"\x0b\x01", b"\x0b\x02") + b"{}")
    assert impl.encode_publish("t", b"x") == b"\x30\x05\x00\x01t\x00x"
    assert impl.encode_publish("", b"x", properties=Properties(topic_alias=1)) == \
        b"\x30\x07\x00\x00\x03\x23\x00\x01x"
    for kw in ({"topic": ""}, {"topic": "a/#"}, {"qos": 3}, {"qos": 1}, {"packet_id": 1}, {"dup": True},
               {"properties": Properties(reason_string="x")}, {"topic": "a\x00"}):
        args = {"topic": "t", "payload": b"", **kw}
        with pytest.raises(ValueError):
            impl.encode_publish(**args)


def test_publish_encoder_round_trip_through_decoder(impl: Twin) -> None:
    props = Properties(payload_format_indicator=1, content_type="application/msgpack", topic_alias=1,
                       user_properties=(("traceparent", "x"),))
    raw = impl.encode_publish("devices/m1/telemetry", b"\x81\xa1t\x01", 2, 9, True, True, props)
    _, event = decode(impl, CONNECT + raw, topic_alias_maximum=1)
    assert event == Publish5("devices/m1/telemetry", b"\x81\xa1t\x01", 2, 9, True, True, props)


def test_server_packets_decoded_by_paho(impl: Twin) -> None:
    """paho's own property and reason code decoders read our acks and CONNACK."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties
    from paho.mqtt.reasoncodes import ReasonCode

    raw = impl.encode_puback(7, 0x99, Properties(reason_string="out_of_range: temperature"))
    assert raw[4] == 0x99 and ReasonCode(PacketTypes.PUBACK, identifier=raw[4]).getName() == \
        "Payload format invalid"
    paho = PahoProperties(PacketTypes.PUBACK)
    paho.unpack(raw[5:])
    assert paho.ReasonString == "out_of_range: temperature"


# -- hypothesis -------------------------------------------------------------------------------------------


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


def _run(impl: Twin, data: bytes, cuts: list[int]) -> tuple[list, MQTT5Error | None]:
    codec = impl.MQTT5Codec(max_packet_bytes=4096, topic_alias_maximum=4)
    events: list = []
    try:
        for chunk in _chunks(data, cuts):
            events.extend(codec.feed(chunk))
    except MQTT5Error as e:
        return events, e
    return events, None


@SETTINGS
@given(st.binary(max_size=300), st.booleans(), st.lists(st.integers(0, 400), max_size=6))
def test_arbitrary_bytes_raise_only_the_codec_error(impl: Twin, data: bytes, connected: bool, cuts: list[int]) -> None:
    if connected:
        data = CONNECT + data
    whole_events, whole_error = _run(impl, data, [])
    events, error = _run(impl, data, cuts)
    # the same outcome however the stream is split (events before an error are dropped within one feed)
    assert (error is None) == (whole_error is None)
    if error is not None:
        assert error == whole_error
        assert v5.REASON_CODE_NAMES.get(error.reason_code)
    else:
        assert events == whole_events


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    base = CONNECT + publish5("devices/m1/telemetry", b"{}", 1, 1, block(
        b"\x23" + u16(1), b"\x26" + pack_string("traceparent") + pack_string("x"))) + packet(
        0x82, u16(2) + block(b"\x0b\x01") + pack_string("c") + b"\x01") + packet(0x40, u16(3) + b"\x10\x00")
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data)


@SETTINGS
@given(mutated_stream(), st.lists(st.integers(0, 400), max_size=6))
def test_mutated_streams(impl: Twin, data: bytes, cuts: list[int]) -> None:
    whole = _run(impl, data, [])
    split = _run(impl, data, cuts)
    assert (split[1] is None) == (whole[1] is None)
    if whole[1] is None:
        assert split[0] == whole[0]
    else:
        assert split[1] == whole[1]


text = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"),
               max_size=12).filter(lambda s: not v5._FORBIDDEN.search(s))
topic = text.filter(v5.valid_topic_name)
u16s = st.integers(0, 65535)
u32s = st.integers(0, 0xFFFFFFFF)


@st.composite
def publish_properties(draw: st.DrawFn) -> Properties:
    fields = {
        "payload_format_indicator": st.sampled_from([0, 1]), "message_expiry_interval": u32s,
        "content_type": text, "response_topic": topic, "correlation_data": st.binary(max_size=8),
        "topic_alias": st.integers(1, 4),    # _run grants 4
    }
    chosen = {k: draw(s) for k, s in fields.items() if draw(st.booleans())}
    chosen["user_properties"] = tuple(draw(st.lists(st.tuples(text, text), max_size=3)))
    return Properties(**chosen)


@SETTINGS
@given(topic, st.binary(max_size=64), st.sampled_from([0, 1, 2]), st.integers(1, 65535), st.booleans(),
       publish_properties(), st.lists(st.integers(0, 400), max_size=4))
def test_publish_round_trip(impl: Twin, topic_: str, payload: bytes, qos: int, pid: int, retain: bool,
                            props: Properties, cuts: list[int]) -> None:
    raw = impl.encode_publish(topic_, payload, qos, pid if qos else 0, retain, bool(qos) and retain, props)
    events, error = _run(impl, CONNECT + raw, cuts)
    assert error is None
    assert events[1] == Publish5(topic_, payload, qos, pid if qos else 0, retain, bool(qos) and retain, props)


@st.composite
def any_properties(draw: st.DrawFn, ptype: int, four_byte_max: int = 2**32 - 1) -> Properties:
    """Valid properties for ``ptype``: any subset of the table's allowed ones."""
    values: dict[int, st.SearchStrategy] = {
        v5.BYTE: st.sampled_from([0, 1]), v5.TWO_BYTE: st.integers(1, 65535),
        v5.FOUR_BYTE: st.integers(1, four_byte_max),
        v5.VBI: st.integers(1, v5.MAX_VBI), v5.UTF8: text, v5.BINARY: st.binary(max_size=8),
        v5.UTF8_PAIR: st.tuples(text, text)}
    chosen: dict[str, object] = {}
    for spec in v5.PROPERTIES:
        if ptype not in spec.packets or not draw(st.booleans()):
            continue
        strategy = topic if spec.identifier == 0x08 else values[spec.type]
        if spec.attr == "user_properties":
            chosen[spec.attr] = tuple(draw(st.lists(strategy, min_size=1, max_size=3)))
        elif spec.attr == "subscription_identifiers":
            chosen[spec.attr] = (draw(strategy),)
        else:
            chosen[spec.attr] = draw(strategy)
    return Properties(**chosen)


@SETTINGS
@given(st.data())
def test_property_blocks_round_trip_in_every_packet(impl: Twin, data: st.DataObject) -> None:
    ptype = data.draw(st.sampled_from(ALL_PLACES))
    props = data.draw(any_properties(ptype))
    raw = impl.encode_properties(props, ptype)
    assert impl.decode_properties(raw, 0, len(raw), ptype) == (props, len(raw))


@SETTINGS
@given(st.data())
def test_client_packets_round_trip(impl: Twin, data: st.DataObject) -> None:
    """Generated client-to-server packets built here decode to what they were built from."""
    pid = data.draw(st.integers(1, 65535))
    kind = data.draw(st.sampled_from(["ack", "subscribe", "unsubscribe", "disconnect"]))
    if kind == "ack":
        first, cls = data.draw(st.sampled_from(ACKS))
        ptype = first >> 4
        code = data.draw(st.sampled_from(sorted(v5.REASON_CODES_BY_PACKET[ptype])))
        props = data.draw(any_properties(ptype))
        raw = packet(first, u16(pid) + u8(code) + v5.encode_properties(props, ptype))
        expected: object = cls(pid, code, props)
    elif kind == "subscribe":
        subs = data.draw(st.lists(st.builds(Subscription, text.filter(lambda s: not s.startswith("$share/")),
                                            st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2)),
                                  min_size=1, max_size=3))
        props = data.draw(any_properties(v5.SUBSCRIBE))
        body = b"".join(pack_string(s.topic_filter) + u8(s.qos | s.no_local << 2 | s.retain_as_published << 3
                                                         | s.retain_handling << 4) for s in subs)
        raw = packet(0x82, u16(pid) + v5.encode_properties(props, v5.SUBSCRIBE) + body)
        expected = Subscribe5(pid, tuple(subs), props)
    elif kind == "unsubscribe":
        filters = tuple(data.draw(st.lists(text, min_size=1, max_size=3)))
        props = data.draw(any_properties(v5.UNSUBSCRIBE))
        raw = packet(0xA2, u16(pid) + v5.encode_properties(props, v5.UNSUBSCRIBE)
                     + b"".join(pack_string(f) for f in filters))
        expected = Unsubscribe5(pid, filters, props)
    else:
        code = data.draw(st.sampled_from(sorted(v5.REASON_CODES_BY_PACKET[v5.DISCONNECT])))
        props = data.draw(any_properties(v5.DISCONNECT))
        raw = packet(0xE0, u8(code) + v5.encode_properties(props, v5.DISCONNECT))
        expected = Disconnect5(code, props)
    connect = connect5(props=block(b"\x11" + u32(1)))   # so a DISCONNECT may carry a Session Expiry
    events, error = _run(impl, connect + raw, data.draw(st.lists(st.integers(0, 400), max_size=4)))
    assert error is None, error
    assert events[1] == expected


# -- a real client: paho-mqtt with protocol=MQTTv5 -------------------------------------------------------------


class _Server(threading.Thread):
    """One connection on a loopback socket, decoded by MQTT5Codec; answers CONNACK and PUBACKs."""

    def __init__(self, impl: Twin, puback_code: int) -> None:
        super().__init__(daemon=True)
        self.impl = impl
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)   # a client that never comes ends the thread, not the run
        self.port = self.listener.getsockname()[1]
        self.puback_code = puback_code
        self.events: list = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(10)
            impl = self.impl
            codec = impl.MQTT5Codec(topic_alias_maximum=10)
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    for ev in codec.feed(data):
                        self.events.append(ev)
                        if isinstance(ev, Connect5):
                            conn.sendall(impl.encode_connack(False, 0, Properties(
                                topic_alias_maximum=10, receive_maximum=10)))
                        elif isinstance(ev, Publish5) and ev.qos == 1:
                            conn.sendall(impl.encode_puback(ev.packet_id, self.puback_code, Properties(
                                reason_string="out_of_range: temperature") if self.puback_code else None))
                        elif isinstance(ev, Disconnect5):
                            return
        except BaseException as exc:   # reported to the test thread
            self.error = exc
        finally:
            self.listener.close()


@pytest.mark.parametrize("puback_code", [0x00, 0x99])
def test_paho_mqttv5_client(impl: Twin, puback_code: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties

    server = _Server(impl, puback_code)
    server.start()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="meter-7", protocol=mqtt.MQTTv5)
    acked: dict[int, object] = {}
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.on_publish = lambda c, u, mid, rc, p: acked.__setitem__(mid, (rc.value, p))
    client.username_pw_set("meter-7", "pw")
    client.will_set("devices/meter-7/status", b"offline", qos=1, properties=_will_props())
    conn_props = PahoProperties(PacketTypes.CONNECT)
    conn_props.SessionExpiryInterval = 3600
    conn_props.ReceiveMaximum = 16
    conn_props.TopicAliasMaximum = 4
    client.connect("127.0.0.1", server.port, keepalive=30, clean_start=True, properties=conn_props)
    client.loop_start()
    try:
        assert connected.wait(10)
        props = PahoProperties(PacketTypes.PUBLISH)
        props.TopicAlias = 1
        props.UserProperty = [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                              ("tracestate", "rojo=00f067aa0ba902b7")]
        props.ContentType = "application/json"
        props.PayloadFormatIndicator = 1
        props.MessageExpiryInterval = 120
        props.ResponseTopic = "devices/meter-7/replies"
        props.CorrelationData = b"\x01\x02\x03"
        first = client.publish("devices/meter-7/telemetry", b'{"temperature": 500}', qos=1, properties=props)
        alias_only = PahoProperties(PacketTypes.PUBLISH)
        alias_only.TopicAlias = 1
        second = client.publish("", b'{"temperature": 21}', qos=1, properties=alias_only)
        first.wait_for_publish(10)
        second.wait_for_publish(10)
        client.disconnect()
    finally:
        client.loop_stop()
    server.join(10)
    assert server.error is None, server.error
    connect, pub1, pub2, disconnect = server.events
    assert isinstance(connect, Connect5)
    assert (connect.client_id, connect.keepalive, connect.clean_start, connect.username, connect.password) == (
        "meter-7", 30, True, "meter-7", b"pw")
    assert connect.properties == Properties(session_expiry_interval=3600, receive_maximum=16, topic_alias_maximum=4)
    assert connect.will == Will5("devices/meter-7/status", b"offline", 1, False, Properties(
        will_delay_interval=10, content_type="text/plain", user_properties=(("why", "gone"),)))
    assert pub1 == Publish5("devices/meter-7/telemetry", b'{"temperature": 500}', 1, pub1.packet_id, False, False,
                            Properties(
        payload_format_indicator=1, message_expiry_interval=120, content_type="application/json",
        response_topic="devices/meter-7/replies", correlation_data=b"\x01\x02\x03", topic_alias=1,
        user_properties=(("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                         ("tracestate", "rojo=00f067aa0ba902b7"))))
    # the alias-only PUBLISH resolves to the first one's topic
    assert (pub2.topic, bytes(pub2.payload), pub2.properties) == (
        "devices/meter-7/telemetry", b'{"temperature": 21}', Properties(topic_alias=1))
    assert disconnect == Disconnect5(0, NONE)
    # paho read our PUBACKs: its reason code, and the Reason String with it
    code, ack_props = acked[first.mid]  # type: ignore[misc]
    assert code == puback_code
    if puback_code:
        assert ack_props.ReasonString == "out_of_range: temperature"


def _will_props():
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties
    p = PahoProperties(PacketTypes.WILLMESSAGE)
    p.WillDelayInterval = 10
    p.ContentType = "text/plain"
    p.UserProperty = ("why", "gone")
    return p


# -- hypothesis: CONNECT round trips, and the server's encoders read back by paho -----------------------------


@SETTINGS
@given(st.data())
def test_connect_round_trip(impl: Twin, data: st.DataObject) -> None:
    props = data.draw(any_properties(v5.CONNECT))
    if props.authentication_method is None and props.authentication_data is not None:
        props = msgspec.structs.replace(props, authentication_data=None)   # 3.1.2.11.10: Data needs a Method
    will = None
    if data.draw(st.booleans()):
        will = Will5(data.draw(topic), data.draw(st.binary(max_size=16)), data.draw(st.integers(0, 2)),
                     data.draw(st.booleans()), data.draw(any_properties(v5.WILL)))
    username = data.draw(st.none() | text)
    password = data.draw(st.none() | st.binary(max_size=8))
    expected = Connect5(data.draw(st.booleans()), data.draw(u16s), data.draw(text), will, username, password,
                        props)
    flags = (expected.clean_start << 1 | (will is not None) << 2 | (will.qos if will else 0) << 3
             | (bool(will and will.retain)) << 5 | (password is not None) << 6 | (username is not None) << 7)
    payload = b""
    if will is not None:
        payload += v5.encode_properties(will.properties, v5.WILL) + pack_string(will.topic) + pack_string(will.payload)
    if username is not None:
        payload += pack_string(username)
    if password is not None:
        payload += pack_string(password)
    raw = connect5(expected.client_id, expected.keepalive, flags, v5.encode_properties(props, v5.CONNECT), payload)
    events, error = _run(impl, raw, data.draw(st.lists(st.integers(0, 400), max_size=4)))
    assert error is None, error
    assert events == [expected]


def _paho_view(raw_block: bytes, ptype: int) -> dict[str, object]:
    """A property block as paho-mqtt's unpacker reads it: {attr: value} in our types."""
    from paho.mqtt.properties import Properties as PahoProperties

    theirs = PahoProperties(_paho_packet_type(ptype))
    theirs.unpack(raw_block)
    out: dict[str, object] = {}
    for spec in v5.PROPERTIES:
        name = spec.name.replace(" ", "")
        if not hasattr(theirs, name):
            continue
        value = getattr(theirs, name)
        if spec.attr == "user_properties":
            value = tuple(tuple(p) for p in value)
        elif spec.attr == "subscription_identifiers":
            value = tuple(value)
        elif spec.type == v5.BINARY:
            value = bytes(value)
        out[spec.attr] = value
    return out


def _encode_server_packet(impl: Twin, ptype: int, props: Properties) -> bytes:
    """The packet's encoder with ``props``; returns its property block, cut out by hand (sections 3.2 - 3.15)."""
    if ptype == v5.CONNACK:
        raw, skip = impl.encode_connack(False, 0x80, props), 2           # flags, reason code
    elif ptype == v5.PUBLISH:
        raw, skip = impl.encode_publish("t", b"", 1, 1, properties=props), 5   # topic "t", packet id
    elif ptype in (v5.PUBACK, v5.PUBREC, v5.PUBREL, v5.PUBCOMP):
        encode = {v5.PUBACK: impl.encode_puback, v5.PUBREC: impl.encode_pubrec,
                  v5.PUBREL: impl.encode_pubrel, v5.PUBCOMP: impl.encode_pubcomp}[ptype]
        raw, skip = encode(1, 0x92 if ptype in (v5.PUBREL, v5.PUBCOMP) else 0x10, props), 3
    elif ptype == v5.SUBACK:
        raw, skip = impl.encode_suback(1, [0x8F], props), 2
    elif ptype == v5.UNSUBACK:
        raw, skip = impl.encode_unsuback(1, [0x8F], props), 2
    elif ptype == v5.DISCONNECT:
        raw, skip = impl.encode_disconnect(0x8B, props), 1
    else:
        raw, skip = impl.encode_auth(0x18, props), 1
    # the fixed header: the type byte and a remaining length of 1 to 4 bytes
    i = 1
    while raw[i] & 0x80:
        i += 1
    body = raw[i + 1:]
    if len(body) == skip:       # an ack without properties: no Property Length at all (3.4.2.2.1)
        return b"\x00"
    return body[skip:]


SERVER_PACKETS = [v5.CONNACK, v5.PUBLISH, v5.PUBACK, v5.PUBREC, v5.PUBREL, v5.PUBCOMP, v5.SUBACK, v5.UNSUBACK,
                  v5.DISCONNECT, v5.AUTH]


@SETTINGS
@given(st.data())
def test_server_encoders_read_back_by_paho(impl: Twin, data: st.DataObject) -> None:
    """Every server packet with any properties it may carry, its property block read by paho-mqtt's decoder."""
    ptype = data.draw(st.sampled_from(SERVER_PACKETS))
    props = data.draw(any_properties(ptype, four_byte_max=v5.MAX_VBI))   # paho range-checks Maximum Packet Size
    if ptype == v5.DISCONNECT:
        props = msgspec.structs.replace(props, session_expiry_interval=None)   # MQTT-3.14.2-2
    present = {k: v for k, v in msgspec.structs.asdict(props).items() if v is not None and v != ()}
    assert _paho_view(_encode_server_packet(impl, ptype, props), ptype) == present


def test_mosquitto_pub_mqttv5(impl: Twin) -> None:
    """mosquitto_pub -V mqttv5 with CONNECT and PUBLISH properties (-D), decoded by the codec."""
    import subprocess

    from binaries import require

    server = _Server(impl, 0x00)
    server.start()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    subprocess.run([
        require("mosquitto_pub"), "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(server.port), "-i", "meter-9",
        "-q", "1", "-t", "devices/meter-9/telemetry", "-m", '{"temperature": 21}',
        "-D", "connect", "session-expiry-interval", "30", "-D", "connect", "receive-maximum", "5",
        "-D", "publish", "user-property", "traceparent", traceparent,
        "-D", "publish", "user-property", "tracestate", "rojo=1",
        "-D", "publish", "content-type", "application/json", "-D", "publish", "payload-format-indicator", "1",
        "-D", "publish", "message-expiry-interval", "60", "-D", "publish", "response-topic", "devices/meter-9/r",
        "-D", "publish", "correlation-data", "c-1", "-D", "publish", "topic-alias", "1",
    ], check=True, timeout=20, capture_output=True)
    server.join(10)
    assert server.error is None, server.error
    connect, publish, disconnect = server.events
    assert (connect.client_id, connect.properties.session_expiry_interval, connect.properties.receive_maximum) == (
        "meter-9", 30, 5)
    assert publish == Publish5("devices/meter-9/telemetry", b'{"temperature": 21}', 1, publish.packet_id, False,
                               False, Properties(
        payload_format_indicator=1, message_expiry_interval=60, content_type="application/json",
        response_topic="devices/meter-9/r", correlation_data=b"c-1", topic_alias=1,
        user_properties=(("traceparent", traceparent), ("tracestate", "rojo=1"))))
    assert isinstance(disconnect, Disconnect5) and disconnect.reason_code == 0


@pytest.mark.parametrize("encode", [
    lambda impl, p, m: impl.encode_connack(False, 0x87, p, max_packet_size=m),
    lambda impl, p, m: impl.encode_puback(1, 0x99, p, max_packet_size=m),
    lambda impl, p, m: impl.encode_pubrec(1, 0x99, p, max_packet_size=m),
    lambda impl, p, m: impl.encode_pubrel(1, 0x92, p, max_packet_size=m),
    lambda impl, p, m: impl.encode_pubcomp(1, 0x92, p, max_packet_size=m),
    lambda impl, p, m: impl.encode_suback(1, [0x8F], p, max_packet_size=m),
    lambda impl, p, m: impl.encode_unsuback(1, [0x8F], p, max_packet_size=m),
    lambda impl, p, m: impl.encode_disconnect(0x99, p, max_packet_size=m),
    lambda impl, p, m: impl.encode_auth(0x18, p, max_packet_size=m),
], ids=["connack", "puback", "pubrec", "pubrel", "pubcomp", "suback", "unsuback", "disconnect", "auth"])
def test_reason_string_and_user_properties_dropped_to_fit(impl: Twin, encode) -> None:
    """MQTT-3.4.2-2/3 and siblings: over the client's Maximum Packet Size, the
    Reason String and User Properties go, and only they."""
    keep = Properties(authentication_method="M") if encode(impl, None, None)[0] >> 4 == v5.AUTH else NONE
    full = msgspec.structs.replace(keep, reason_string="out_of_range: temperature",
                                   user_properties=(("k", "v" * 40),))
    whole = encode(impl, full, None)
    assert encode(impl, full, len(whole)) == whole                  # fits exactly: kept
    assert encode(impl, full, 10_000) == whole
    assert encode(impl, full, len(whole) - 1) == encode(impl, keep, None)  # one byte short: both dropped
