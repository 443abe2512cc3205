"""Property tests of the MQTT codec (the yarl pattern: the compiled module and
its pure-Python twin crossed on generated input).

1. Arbitrary bytes, with and without a valid CONNECT in front, and mutated
   valid streams, fed in arbitrary chunkings: only MQTTProtocolError
   escapes, both implementations give the same events or the same error,
   and each gives the same result however the stream is chunked.
2. Round trips: valid packets built with tests/mqtt_frames.py (and PUBLISH
   with encode_publish) decode back to the fields they were built from,
   and partial input never raises.
3. encode_acks equals the concatenation of the single encoders.

HYPOTHESIS_MAX_EXAMPLES raises the example count for a longer run.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings, strategies as st

from gridgate import _fastparse
from gridgate.errors import MQTTProtocolError
from gridgate.protocols.mqtt import codec_py as _mqtt_py
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
from inprocess import split
from mqtt_frames import (
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
    gen_suback,
    gen_subscribe,
    gen_unsubscribe,
)

SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "400")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
IMPLS = (_mqtt_py, _fastparse)
CONNECT = gen_connect("meter-1")
CONNECT_EVENT = Connect("MQTT", 4, True, 0, "meter-1", None, None, None)


def run(impl, chunks: list[bytes], max_packet_bytes: int = 4096):
    """(events, None) or (events of the chunks before the error, (reason, return code)).

    Any exception other than MQTTProtocolError fails the test by escaping.
    """
    codec = impl.MQTTCodec(max_packet_bytes=max_packet_bytes)
    events: list = []
    try:
        for chunk in chunks:
            events.extend(codec.feed(chunk))
    except MQTTProtocolError as exc:
        assert exc.reason in _mqtt_py.MQTT_ERROR_REASONS
        assert exc.return_code in (None, 1, 2)
        return events, (exc.reason, exc.return_code)
    return events, None


def check_same_everywhere(stream: bytes, cuts: list[int], max_packet_bytes: int = 4096):
    """Both implementations agree, chunked or whole; returns the whole-stream result."""
    chunks = split(stream, cuts)
    whole = run(_mqtt_py, [stream], max_packet_bytes)
    assert run(_fastparse, [stream], max_packet_bytes) == whole
    chunked = run(_mqtt_py, chunks, max_packet_bytes)
    assert run(_fastparse, chunks, max_packet_bytes) == chunked
    # chunking changes nothing but how many events came before an error
    assert chunked[1] == whole[1]
    if whole[1] is None:
        assert chunked[0] == whole[0]
    else:
        assert whole[0] == []  # one feed: the error takes its events with it
        assert chunked[0] == whole_events_before_error(stream, max_packet_bytes)[:len(chunked[0])]
    return whole


def whole_events_before_error(stream: bytes, max_packet_bytes: int) -> list:
    """The events a byte-at-a-time feed returns before the error."""
    return run(_mqtt_py, [stream[i:i + 1] for i in range(len(stream))], max_packet_bytes)[0]


cuts_strategy = st.lists(st.integers(min_value=0), max_size=8)


def _refused(ch: str) -> bool:
    """A control character or non-character (bad_char; U+0000 is bad_utf8)."""
    cp = ord(ch)
    return 0 < cp < 0x20 or 0x7F <= cp <= 0x9F or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE


# -- 1. arbitrary and mutated input ---------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=600), st.booleans(), cuts_strategy)
def test_arbitrary_bytes_same_result_in_both(data, with_connect, cuts):
    check_same_everywhere((CONNECT + data) if with_connect else data, cuts)


# Packets that are valid alone, or nearly (packet id 0, QoS 3, odd filters):
# a stream of these, with a few bytes overwritten, reaches deep into every
# decoder instead of failing on the first byte.
# with control characters and non-characters, refused (bad_char), and their
# accepted neighbours
level = st.text(alphabet=st.sampled_from("ab/+#\u00e9\x00\x01\x1f\x7f\u0085\u00a0\ufdd0\ufdf0\ufffe\uffff"
                                         "\U0001fffe\U0010fffd"), max_size=6)
packets = st.one_of(
    st.builds(lambda t, p, q, m, r, d: gen_publish(t, qos=q, mid=m if q else 0, payload=p, retain=r, dup=d and q > 0),
              level, st.binary(max_size=40), st.integers(0, 2), st.integers(0, 3), st.booleans(), st.booleans()),
    st.builds(lambda f, m: gen_subscribe(m, f), st.lists(st.tuples(level, st.integers(0, 3)), max_size=3),
              st.integers(0, 3)),
    st.builds(lambda f, m: gen_unsubscribe(m, f), st.lists(level, max_size=3), st.integers(0, 3)),
    st.builds(lambda t, m: gen_packet(t, m.to_bytes(2, "big")), st.sampled_from([0x40, 0x50, 0x62, 0x70]),
              st.integers(0, 2)),
    st.sampled_from([gen_pingreq(), gen_disconnect(), gen_connack(0), gen_suback(1, [0]), b"\xf0\x00"]),
    st.builds(lambda c, k, w, u, p: gen_connect(c, keepalive=k, will_topic=w, username=u, password=p),
              st.text(max_size=4), st.integers(0, 65535), st.none() | level, st.none() | st.text(max_size=3),
              st.none() | st.binary(max_size=3)),
    st.builds(lambda c: gen_connect(c, proto_name=b"MQIsdp", proto_ver=3), st.text(min_size=20, max_size=26)),
)


@SETTINGS
@given(st.lists(packets, max_size=8), st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=3),
       cuts_strategy, st.sampled_from([64, 4096]))
def test_mutated_valid_streams_same_result_in_both(frames, flips, cuts, max_packet_bytes):
    stream = bytearray(CONNECT + b"".join(frames))
    for pos, value in flips:
        stream[pos % len(stream)] = value
    check_same_everywhere(bytes(stream), cuts, max_packet_bytes)


@SETTINGS
@given(st.sampled_from([gen_connect("c"), gen_connect("", clean_session=False), gen_connect("c", will_topic="w"),
                        gen_connect("old", proto_name=b"MQIsdp", proto_ver=3), gen_connect("c", username="u",
                                                                                           password=b"p")]),
       st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=3), cuts_strategy)
def test_mutated_connects_same_result_in_both(frame, flips, cuts):
    stream = bytearray(frame)
    for pos, value in flips:
        stream[pos % len(stream)] = value
    check_same_everywhere(bytes(stream), cuts)


@SETTINGS
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12), st.booleans(), cuts_strategy)
def test_a_string_is_refused_exactly_when_it_holds_u0000_a_control_character_or_a_non_character(text, as_id, cuts):
    frame = gen_connect(text) if as_id else gen_connect("c", username=text)
    whole = check_same_everywhere(frame, cuts)
    # the oracle: section 1.5.3 read independently of the codec
    if "\x00" in text:
        assert whole[1] == ("bad_utf8", None)
    elif any(_refused(ch) for ch in text):
        assert whole[1] == ("bad_char", None)
    else:
        assert whole == ([Connect("MQTT", 4, True, 0, text if as_id else "c", None, None if as_id else text, None)],
                         None)


# -- 2. round trips ------------------------------------------------------------------------------------

name_char = st.characters(blacklist_characters="+#/\x00", blacklist_categories=("Cs",)).filter(
    lambda c: not _refused(c))
topic_names = st.lists(st.text(alphabet=name_char, max_size=8), min_size=1, max_size=4).map("/".join).filter(bool)
filter_level = st.one_of(st.text(alphabet=name_char, max_size=6), st.just("+"))
topic_filters = st.builds(lambda levels, hash_: "/".join(levels + (["#"] if hash_ else [])),
                          st.lists(filter_level, min_size=1, max_size=4), st.booleans()).filter(bool)
packet_ids = st.integers(1, 65535)
client_ids = st.text(alphabet=name_char, max_size=23)


@st.composite
def publishes(draw):
    topic = draw(topic_names)
    qos = draw(st.integers(0, 2))
    pid = draw(packet_ids) if qos else 0
    dup = draw(st.booleans()) and qos > 0
    payload = draw(st.binary(max_size=300))
    retain = draw(st.booleans())
    return gen_publish(topic, qos=qos, mid=pid, payload=payload, retain=retain, dup=dup), Publish(
        topic, payload, qos, pid, retain, dup)


@st.composite
def client_packets(draw):
    """(frame, event) of any valid client-to-server packet after CONNECT."""
    kind = draw(st.sampled_from(["publish", "ack", "subscribe", "unsubscribe", "ping"]))
    if kind == "publish":
        return draw(publishes())
    if kind == "ack":
        gen, event = draw(st.sampled_from([(gen_puback, PubAck), (gen_pubrec, PubRec), (gen_pubrel, PubRel),
                                           (gen_pubcomp, PubComp)]))
        pid = draw(packet_ids)
        return gen(pid), event(pid)
    if kind == "subscribe":
        pid = draw(packet_ids)
        topics = draw(st.lists(st.tuples(topic_filters, st.integers(0, 2)), min_size=1, max_size=5))
        return gen_subscribe(pid, topics), Subscribe(pid, topics)
    if kind == "unsubscribe":
        pid = draw(packet_ids)
        topics = draw(st.lists(topic_filters, min_size=1, max_size=5))
        return gen_unsubscribe(pid, topics), Unsubscribe(pid, topics)
    return gen_pingreq(), PingReq()


@st.composite
def connects(draw):
    level = draw(st.sampled_from([(b"MQTT", 4, "MQTT"), (b"MQIsdp", 3, "MQIsdp")]))
    clean = draw(st.booleans())
    # an MQTT 3.1 client id is at most 23 bytes
    client_id = draw(client_ids.filter(lambda c: (c or clean) and (level[1] == 4 or len(c.encode()) <= 23)))
    keepalive = draw(st.integers(0, 65535))
    will = draw(st.none() | st.builds(Will, topic_names, st.binary(max_size=20), st.integers(0, 2), st.booleans()))
    username = draw(st.none() | st.text(alphabet=name_char, max_size=10))
    password = draw(st.none() | st.binary(max_size=10)) if username is not None else None
    frame = gen_connect(client_id, keepalive=keepalive, clean_session=clean, proto_name=level[0],
                        proto_ver=level[1], will_topic=None if will is None else will.topic,
                        will_payload=b"" if will is None else will.payload, will_qos=0 if will is None else will.qos,
                        will_retain=False if will is None else will.retain, username=username, password=password)
    return frame, Connect(level[2], level[1], clean, keepalive, client_id, will, username, password)


@SETTINGS
@given(connects(), st.lists(client_packets(), max_size=10), st.booleans(), cuts_strategy)
def test_valid_streams_decode_to_their_fields_however_split(connect, packets_, disconnect, cuts):
    frames = [connect[0]] + [f for f, _ in packets_] + ([gen_disconnect()] if disconnect else [])
    expected = [connect[1]] + [e for _, e in packets_] + ([Disconnect()] if disconnect else [])
    stream = b"".join(frames)
    ends = []
    for f in frames:
        ends.append((ends[-1] if ends else 0) + len(f))
    for impl in IMPLS:
        # whole
        codec = impl.MQTTCodec(max_packet_bytes=1 << 20)
        assert codec.feed(stream) == expected
        assert (codec.connected, codec.protocol_level, codec.buffered) == (True, connect[1].protocol_level, 0)
        # chunked: after each read, exactly the packets complete so far, the rest held
        codec = impl.MQTTCodec(max_packet_bytes=1 << 20)
        got, fed = [], 0
        for chunk in split(stream, cuts):
            got.extend(codec.feed(chunk))  # partial input never raises
            fed += len(chunk)
            complete = sum(1 for e in ends if e <= fed)
            assert got == expected[:complete]
            assert codec.buffered == fed - (ends[complete - 1] if complete else 0)
        assert got == expected


@SETTINGS
@given(publishes())
def test_publish_encoder_and_decoder_agree_with_the_frame_builder(publish):
    frame, event = publish
    for impl in IMPLS:
        assert impl.encode_publish(event.topic, bytes(event.payload), event.qos, event.packet_id, event.retain,
                                   event.dup) == frame
        codec = impl.MQTTCodec()
        assert codec.feed(CONNECT + frame) == [CONNECT_EVENT, event]


@SETTINGS
@given(packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=200))
def test_encode_suback_matches_the_frame_builder(pid, codes):
    for impl in IMPLS:
        assert impl.encode_suback(pid, codes) == gen_suback(pid, codes)


# -- 3. encode_acks -----------------------------------------------------------------------------------------


@SETTINGS
@given(st.sampled_from([PUBACK, PUBREC, PUBREL, PUBCOMP]), st.lists(packet_ids, max_size=300))
def test_encode_acks_is_the_concatenation_of_single_acks(ptype, ids):
    single = {PUBACK: "encode_puback", PUBREC: "encode_pubrec", PUBREL: "encode_pubrel", PUBCOMP: "encode_pubcomp"}
    gen = {PUBACK: gen_puback, PUBREC: gen_pubrec, PUBREL: gen_pubrel, PUBCOMP: gen_pubcomp}[ptype]
    expected = b"".join(gen(i) for i in ids)
    for impl in IMPLS:
        one = getattr(impl, single[ptype])
        assert impl.encode_acks(ptype, ids) == b"".join(one(i) for i in ids) == expected
