"""Property tests: the compiled codec and its pure-Python twin agree on
arbitrary input, and only MQTTProtocolError ever escapes."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridgate import _fastparse, _mqtt_py
from gridgate.errors import MQTTProtocolError
from gridgate.mqtt_events import PUBACK, PUBCOMP, PUBREC, PUBREL, Publish, Subscribe
from mqtt_frames import gen_connect, gen_publish, gen_subscribe

# HYPOTHESIS_MAX_EXAMPLES=5000 for a longer differential run
SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "400")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
CONNECT = gen_connect("meter-1")


def run(impl, chunks: list[bytes]):
    """Events so far and the error (or None), fed chunk by chunk."""
    codec = impl.MQTTCodec(max_packet_bytes=4096)
    events = []
    try:
        for chunk in chunks:
            events.extend(codec.feed(chunk))
    except MQTTProtocolError as exc:
        return events, (exc.reason, exc.return_code)
    return events, None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@SETTINGS
@given(st.binary(max_size=600), st.booleans(), st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_same_result_in_both(data, with_connect, cuts):
    stream = (CONNECT + data) if with_connect else data
    chunks = split(stream, cuts)
    assert run(_fastparse, chunks) == run(_mqtt_py, chunks)


topic_level = st.text(alphabet=st.characters(blacklist_characters="+#/\x00", blacklist_categories=("Cs",)),
                      min_size=1, max_size=8)
topics = st.lists(topic_level, min_size=1, max_size=4).map("/".join)


@SETTINGS
@given(topics, st.binary(max_size=300), st.integers(0, 2), st.integers(1, 65535), st.booleans(), st.booleans())
def test_publish_round_trip(topic, payload, qos, mid, retain, dup):
    dup = dup and qos > 0
    pid = mid if qos else 0
    frame = gen_publish(topic, qos=qos, mid=pid, payload=payload, retain=retain, dup=dup)
    expected = Publish(topic, payload, qos, pid, retain, dup)
    for impl in (_fastparse, _mqtt_py):
        assert impl.encode_publish(topic, payload, qos, pid, retain, dup) == frame
        codec = impl.MQTTCodec(max_packet_bytes=1 << 20)
        assert codec.feed(CONNECT + frame)[1:] == [expected]


@SETTINGS
@given(st.lists(st.tuples(topics, st.integers(0, 2)), min_size=1, max_size=5), st.integers(1, 65535))
def test_subscribe_round_trip(filters, mid):
    frame = gen_subscribe(mid, filters)
    for impl in (_fastparse, _mqtt_py):
        assert impl.MQTTCodec().feed(CONNECT + frame)[1:] == [Subscribe(mid, filters)]


@SETTINGS
@given(st.sampled_from([PUBACK, PUBREC, PUBREL, PUBCOMP]), st.lists(st.integers(1, 65535), max_size=50))
def test_encode_acks_is_the_concatenation_of_single_acks(ptype, ids):
    single = {PUBACK: "encode_puback", PUBREC: "encode_pubrec", PUBREL: "encode_pubrel", PUBCOMP: "encode_pubcomp"}
    for impl in (_fastparse, _mqtt_py):
        one = getattr(impl, single[ptype])
        assert impl.encode_acks(ptype, ids) == b"".join(one(i) for i in ids)


frames = st.one_of(
    st.builds(lambda t, p, q, m: gen_publish(t, qos=q, mid=m if q else 0, payload=p),
              topics, st.binary(max_size=40), st.integers(0, 2), st.integers(0, 3)),
    st.builds(lambda f, m: gen_subscribe(m, f), st.lists(st.tuples(topics, st.integers(0, 3)), max_size=3),
              st.integers(0, 3)),
    st.sampled_from([b"\xc0\x00", b"\xe0\x00", b"\x40\x02\x00\x01", b"\x62\x02\x00\x05", b"\x20\x02\x00\x00"]),
    st.builds(lambda c, k: gen_connect(c, keepalive=k), st.text(max_size=5), st.integers(0, 65535)),
)


@SETTINGS
@given(st.lists(frames, max_size=8), st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=3),
       st.lists(st.integers(min_value=0), max_size=6))
def test_mutated_valid_streams_same_result_in_both(packets, flips, cuts):
    stream = bytearray(CONNECT + b"".join(packets))
    for pos, value in flips:
        stream[pos % len(stream)] = value
    chunks = split(bytes(stream), cuts)
    assert run(_fastparse, chunks) == run(_mqtt_py, chunks)
