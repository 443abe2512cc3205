"""The two MQTT 5.0 codecs crossed (the yarl pattern): the compiled one
(gridgate._fastparse, served by gridgate.protocols.mqtt.codec5) against its
pure-Python twin (codec5_py), on generated input.

1. Arbitrary bytes, with and without a CONNECT in front, split at arbitrary
   points: after every read both give the same events and state, or the same
   MQTT5Error (reason code, CONNACK code, reason) at the same read.
2. Generated valid 5.0 streams (CONNECT with any properties and a Will, then
   PUBLISH with any PUBLISH properties and topic aliases, the four acks,
   SUBSCRIBE, UNSUBSCRIBE, PINGREQ, AUTH, DISCONNECT): both decode them to
   exactly the packets they were built from (a round trip for every client
   packet), split anywhere; with a few bytes overwritten they still agree.
3. Every encoder, on arguments valid or not (properties holding any values,
   wrong types included): the same bytes, or the same exception class; and
   what the compiled encoders build, both codecs decode back to its fields.

The user-facing suite (test_codec5.py) runs every example on both twins too;
this file is where they are compared with each other. HYPOTHESIS_MAX_EXAMPLES
raises the example count (``make test-asan`` runs this file under the sanitizers).
"""
from __future__ import annotations

import os
import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gridgate import _fastparse, hotpath
from gridgate.protocols.mqtt import codec5_py, v5
from gridgate.protocols.mqtt.codec5 import codec5, compiled_codec5
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
from inprocess import split
from mqtt_frames import pack_remaining_length, pack_string

SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
C = compiled_codec5(_fastparse)
PY = codec5_py
ENCODERS = ("connack", "publish", "puback", "pubrec", "pubrel", "pubcomp", "suback", "unsuback", "pingresp",
            "disconnect", "auth")


def test_codec5_serves_the_compiled_codec_when_the_extension_is_loaded() -> None:
    assert hotpath.fastparse is _fastparse      # tests run on a build: GRIDGATE_PURE_PYTHON is not set
    assert codec5.MQTT5Codec is _fastparse.MQTT5Codec
    assert codec5.MAX_PACKET_BYTES == PY.MAX_PACKET_BYTES
    for name in ENCODERS:
        assert getattr(codec5, f"encode_{name}") is getattr(_fastparse, f"mqtt5_encode_{name}")
    # the twin's whole public API, under the twin's names
    assert set(PY.__all__) <= set(vars(codec5))


def test_constructor_arguments_refused_alike() -> None:
    for kw in ({"max_packet_bytes": 1}, {"max_packet_bytes": PY.MAX_PACKET_BYTES + 1}, {"topic_alias_maximum": -1},
               {"topic_alias_maximum": 65536}, {"max_packet_bytes": 2.0}):
        errors = []
        for impl in (PY, C):
            with pytest.raises((ValueError, TypeError)) as info:
                impl.MQTT5Codec(**kw)
            errors.append(type(info.value))
        assert errors[0] is errors[1], kw


# -- running a stream -------------------------------------------------------------------------------------


def run(impl, reads: list[bytes], max_packet_bytes: int = 4096, alias_max: int = 4) -> list[object]:
    """What the codec did, read by read: the events and state after each, then the error if any.

    Anything but MQTT5Error escapes and fails the test.
    """
    codec = impl.MQTT5Codec(max_packet_bytes=max_packet_bytes, topic_alias_maximum=alias_max)
    trace: list[object] = []
    try:
        for chunk in reads:
            events = codec.feed(chunk)
            trace.append((events, codec.connected, codec.buffered))
    except MQTT5Error as exc:
        assert exc.reason_code in v5.REASON_CODE_NAMES
        assert exc.return_code in (None, exc.reason_code, 0x80)
        trace.append(("error", exc.reason_code, exc.return_code, exc.reason))
        with pytest.raises(MQTT5Error) as again:     # dead: the same error on every later feed
            codec.feed(b"\xc0\x00")
        assert again.value == exc
    return trace


def agree(stream: bytes, cuts: list[int], **kw) -> list[object]:
    """Both codecs agree read by read, whole, split at ``cuts`` and one byte a read; returns the split trace."""
    traces = []
    for reads in ([stream], split(stream, cuts), [stream[i:i + 1] for i in range(len(stream))]):
        twin = run(PY, reads, **kw)
        assert run(C, reads, **kw) == twin
        traces.append(twin)
    # the same outcome however the stream is split
    outcomes = [t[-1] if t and t[-1][0] == "error" else None for t in traces]
    assert outcomes[0] == outcomes[1] == outcomes[2]
    return traces[1]


def events_of(trace: list[object]) -> list[object]:
    return [e for step in trace if step[0] != "error" for e in step[0]]


cuts_strategy = st.lists(st.integers(min_value=0), max_size=8)

# -- builders (bytes by hand, as test_codec5.py: independent of both codecs) --------------------------------


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + pack_remaining_length(len(body)) + body


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


CONNECT = packet(0x10, pack_string(b"MQTT") + b"\x05\x02\x00\x3c" + b"\x05\x11" + struct.pack("!I", 60)
                 + pack_string("meter-1"))
AUTH_CONNECT = packet(0x10, pack_string(b"MQTT") + b"\x05\x02\x00\x3c"
                      + v5.encode_properties(Properties(authentication_method="SCRAM"), v5.CONNECT)
                      + pack_string("meter-1"))

# -- 1. arbitrary bytes -------------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([b"", CONNECT, AUTH_CONNECT]), cuts_strategy,
       st.sampled_from([(64, 0), (4096, 4), (1 << 20, 65535)]))
def test_arbitrary_bytes_same_result_in_both(data: bytes, head: bytes, cuts: list[int],
                                             limits: tuple[int, int]) -> None:
    agree(head + data, cuts, max_packet_bytes=limits[0], alias_max=limits[1])


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from([b"", CONNECT]), cuts_strategy)
def test_mutable_buffers_same_result_in_both(data: bytes, head: bytes, cuts: list[int]) -> None:
    """bytearray and memoryview reads: copied before decoding, so later changes to them change no event."""
    stream = head + data
    results = []
    for impl in (PY, C):
        reads = [bytearray(r) for r in split(stream, cuts)]
        trace = run(impl, [memoryview(r) if i % 2 else r for i, r in enumerate(reads)])
        for r in reads:
            r[:] = b"\xff" * len(r)
        results.append(trace)
    assert results[0] == results[1] == run(PY, split(stream, cuts))


# -- 2. generated valid 5.0 streams --------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"),
               max_size=10).filter(lambda s: not v5._FORBIDDEN.search(s))
topic = text.filter(v5.valid_topic_name)


@st.composite
def properties(draw: st.DrawFn, ptype: int) -> Properties:
    """Valid properties for ``ptype`` as a client sends them: any subset of those allowed."""
    values: dict[int, st.SearchStrategy] = {
        v5.BYTE: st.sampled_from([0, 1]), v5.TWO_BYTE: st.integers(1, 65535), v5.FOUR_BYTE: st.integers(1, 2**32 - 1),
        v5.VBI: st.integers(1, v5.MAX_VBI), v5.UTF8: text, v5.BINARY: st.binary(max_size=8),
        v5.UTF8_PAIR: st.tuples(text, text)}
    chosen: dict[str, object] = {}
    for spec in v5.PROPERTIES:
        if ptype not in spec.packets or spec.attr in ("topic_alias", "subscription_identifiers") \
                or not draw(st.booleans()):
            continue
        if spec.attr == "user_properties":
            chosen[spec.attr] = tuple(draw(st.lists(values[spec.type], min_size=1, max_size=3)))
        else:
            chosen[spec.attr] = draw(topic if spec.identifier == 0x08 else values[spec.type])
    if ptype == v5.CONNECT and "authentication_data" in chosen and "authentication_method" not in chosen:
        del chosen["authentication_data"]           # 3.1.2.11.10: Data needs a Method
    return Properties(**chosen)


@st.composite
def connect(draw: st.DrawFn) -> tuple[bytes, Connect5]:
    props = draw(properties(v5.CONNECT))
    will = None
    if draw(st.booleans()):
        will = Will5(draw(topic), draw(st.binary(max_size=12)), draw(st.integers(0, 2)), draw(st.booleans()),
                     draw(properties(v5.WILL)))
    username = draw(st.none() | text)
    password = draw(st.none() | st.binary(max_size=8))
    event = Connect5(draw(st.booleans()), draw(st.integers(0, 65535)), draw(text), will, username, password, props)
    flags = (event.clean_start << 1 | (will is not None) << 2 | (will.qos if will else 0) << 3
             | bool(will and will.retain) << 5 | (password is not None) << 6 | (username is not None) << 7)
    body = pack_string(b"MQTT") + bytes((5, flags)) + u16(event.keepalive) + v5.encode_properties(props, v5.CONNECT)
    body += pack_string(event.client_id)
    if will is not None:
        body += v5.encode_properties(will.properties, v5.WILL) + pack_string(will.topic) + pack_string(will.payload)
    if username is not None:
        body += pack_string(username)
    if password is not None:
        body += pack_string(password)
    return packet(0x10, body), event


ACKS = {v5.PUBACK: ("puback", PubAck5), v5.PUBREC: ("pubrec", PubRec5), v5.PUBREL: ("pubrel", PubRel5),
        v5.PUBCOMP: ("pubcomp", PubComp5)}


@st.composite
def client_packet(draw: st.DrawFn, aliases: dict[int, str], auth_method: str | None) -> tuple[bytes, object]:
    """One client-to-server packet after CONNECT and the event it decodes to.
    PUBLISH and the acks are built with the twin's encoders (the wire form is
    the same both ways), the rest by hand."""
    kind = draw(st.sampled_from(["publish", "publish", "ack", "subscribe", "unsubscribe", "ping", "auth"]))
    pid = draw(st.integers(1, 65535))
    if kind == "publish":
        props = draw(properties(v5.PUBLISH))
        name = draw(topic)
        qos = draw(st.integers(0, 2))
        retain, dup = draw(st.booleans()), draw(st.booleans()) and qos > 0
        wire_topic = name
        alias = draw(st.none() | st.integers(1, 4))
        if alias is not None:
            if alias in aliases and draw(st.booleans()):
                wire_topic, name = "", aliases[alias]      # the alias alone stands for the topic
            else:
                aliases[alias] = name
            props = msgspec.structs.replace(props, topic_alias=alias)
        payload = draw(st.binary(max_size=32))
        raw = PY.encode_publish(wire_topic, payload, qos, pid if qos else 0, retain, dup, props)
        return raw, Publish5(name, payload, qos, pid if qos else 0, retain, dup, props)
    if kind == "ack":
        ptype = draw(st.sampled_from(sorted(ACKS)))
        encoder, cls = ACKS[ptype]
        code = draw(st.sampled_from(sorted(v5.REASON_CODES_BY_PACKET[ptype])))
        props = draw(properties(ptype))
        return getattr(PY, f"encode_{encoder}")(pid, code, props), cls(pid, code, props)
    if kind == "subscribe":
        subs = draw(st.lists(st.builds(Subscription, text.filter(lambda s: not s.startswith("$share/")),
                                       st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2)),
                             min_size=1, max_size=3))
        props = draw(properties(v5.SUBSCRIBE))
        if draw(st.booleans()):
            props = msgspec.structs.replace(props, subscription_identifiers=(draw(st.integers(1, v5.MAX_VBI)),))
        body = b"".join(pack_string(s.topic_filter) + bytes((s.qos | s.no_local << 2 | s.retain_as_published << 3
                                                             | s.retain_handling << 4,)) for s in subs)
        return (packet(0x82, u16(pid) + v5.encode_properties(props, v5.SUBSCRIBE) + body),
                Subscribe5(pid, tuple(subs), props))
    if kind == "unsubscribe":
        filters = tuple(draw(st.lists(text, min_size=1, max_size=3)))
        props = draw(properties(v5.UNSUBSCRIBE))
        return (packet(0xA2, u16(pid) + v5.encode_properties(props, v5.UNSUBSCRIBE)
                       + b"".join(pack_string(f) for f in filters)), Unsubscribe5(pid, filters, props))
    if kind == "auth" and auth_method is not None:
        props = msgspec.structs.replace(draw(properties(v5.AUTH)), authentication_method=auth_method)
        code = draw(st.sampled_from([0x18, 0x19]))
        return packet(0xF0, bytes((code,)) + v5.encode_properties(props, v5.AUTH)), Auth(code, props)
    return b"\xc0\x00", PingReq()


@st.composite
def valid_stream(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    raw, event = draw(connect())
    frames, events = [raw], [event]
    aliases: dict[int, str] = {}
    for _ in range(draw(st.integers(0, 6))):
        raw, event = draw(client_packet(aliases, event_auth_method(events[0])))
        frames.append(raw)
        events.append(event)
    if draw(st.booleans()):
        code = draw(st.sampled_from(sorted(v5.REASON_CODES_BY_PACKET[v5.DISCONNECT])))
        props = draw(properties(v5.DISCONNECT))
        if not events[0].properties.session_expiry_interval:       # 3.14.2.2.2
            props = msgspec.structs.replace(props, session_expiry_interval=None)
        frames.append(packet(0xE0, bytes((code,)) + v5.encode_properties(props, v5.DISCONNECT)))
        events.append(Disconnect5(code, props))
    return b"".join(frames), events


def event_auth_method(connect_event: object) -> str | None:
    return connect_event.properties.authentication_method  # type: ignore[attr-defined]


@SETTINGS
@given(valid_stream(), cuts_strategy)
def test_valid_streams_round_trip_in_both(stream: tuple[bytes, list[object]], cuts: list[int]) -> None:
    raw, expected = stream
    trace = agree(raw, cuts, max_packet_bytes=PY.MAX_PACKET_BYTES)
    assert trace[-1][0] != "error", trace[-1]
    assert events_of(trace) == expected


@SETTINGS
@given(valid_stream(), st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
       cuts_strategy, st.sampled_from([64, 4096]))
def test_mutated_valid_streams_same_result_in_both(stream: tuple[bytes, list[object]],
                                                   flips: list[tuple[int, int]], cuts: list[int],
                                                   max_packet_bytes: int) -> None:
    data = bytearray(stream[0])
    for pos, value in flips:
        data[pos % len(data)] = value
    agree(bytes(data), cuts, max_packet_bytes=max_packet_bytes)


# -- 3. the encoders ---------------------------------------------------------------------------------------

# Any value in any property: valid ones, out of range ones, wrong types.
anything = st.one_of(
    st.none(), st.integers(-2, 3), st.integers(0, 2**33), st.booleans(), text, st.text(max_size=4),
    st.binary(max_size=6), st.just(()), st.tuples(text, text), st.lists(st.tuples(text, text), max_size=2).map(tuple),
    st.lists(st.integers(0, v5.MAX_VBI + 1), max_size=2).map(tuple), st.just("a/+"), st.just(1.5),
)


@st.composite
def any_properties(draw: st.DrawFn) -> Properties | None:
    if draw(st.integers(0, 4)) == 0:
        return None
    chosen = {spec.attr: draw(anything) for spec in v5.PROPERTIES if draw(st.integers(0, 5)) == 0}
    return Properties(**chosen)


def outcome(call) -> object:
    try:
        return call()
    except (ValueError, TypeError) as exc:
        return type(exc)


def encode_all(impl, topic_: str, payload: bytes, qos: object, pid: object, code: object, codes: list[object],
               props: Properties | None, max_size: int | None, flag: bool) -> list[object]:
    return [
        outcome(lambda: impl.encode_connack(flag, code, props, max_size)),
        outcome(lambda: impl.encode_publish(topic_, payload, qos, pid, flag, flag, props)),
        outcome(lambda: impl.encode_puback(pid, code, props, max_size)),
        outcome(lambda: impl.encode_pubrec(pid, code, props, max_size)),
        outcome(lambda: impl.encode_pubrel(pid, code, props, max_size)),
        outcome(lambda: impl.encode_pubcomp(pid, code, props, max_size)),
        outcome(lambda: impl.encode_suback(pid, codes, props, max_size)),
        outcome(lambda: impl.encode_unsuback(pid, codes, props, max_size)),
        outcome(lambda: impl.encode_disconnect(code, props, max_size)),
        outcome(lambda: impl.encode_auth(code, props, max_size)),
        outcome(impl.encode_pingresp),
    ]


codes_strategy = st.one_of(st.sampled_from(sorted(v5.REASON_CODE_NAMES)), st.integers(-1, 256))


@SETTINGS
@given(st.one_of(topic, st.text(max_size=6), st.just("")), st.binary(max_size=16),
       st.one_of(st.integers(0, 3), st.just(-1)), st.one_of(st.integers(0, 65536), st.just(True), st.just("1")),
       codes_strategy, st.lists(codes_strategy, max_size=3), any_properties(), st.none() | st.integers(0, 80),
       st.booleans())
def test_encoders_agree_on_any_arguments(topic_: str, payload: bytes, qos: int, pid: object, code: int,
                                         codes: list[object], props: Properties | None, max_size: int | None,
                                         flag: bool) -> None:
    compiled = encode_all(C, topic_, payload, qos, pid, code, codes, props, max_size, flag)
    assert compiled == encode_all(PY, topic_, payload, qos, pid, code, codes, props, max_size, flag)


@SETTINGS
@given(st.sampled_from(sorted(ACKS)), st.integers(1, 65535), st.data(), st.none() | st.integers(4, 200))
def test_acks_round_trip(ptype: int, pid: int, data: st.DataObject, max_size: int | None) -> None:
    """The compiled ack encoders, each code with any properties, decoded back by both codecs."""
    encoder, cls = ACKS[ptype]
    code = data.draw(st.sampled_from(sorted(v5.REASON_CODES_BY_PACKET[ptype])))
    props = data.draw(properties(ptype))
    raw = getattr(C, f"encode_{encoder}")(pid, code, props, max_size)
    assert raw == getattr(PY, f"encode_{encoder}")(pid, code, props, max_size)
    if max_size is not None and len(raw) < len(getattr(PY, f"encode_{encoder}")(pid, code, props)):
        props = msgspec.structs.replace(props, reason_string=None, user_properties=())   # dropped to fit
    for impl in (PY, C):
        assert events_of(run(impl, [CONNECT + raw]))[1:] == [cls(pid, code, props)]


@SETTINGS
@given(topic, st.binary(max_size=64), st.integers(0, 2), st.integers(1, 65535), st.booleans(), st.booleans(),
       properties(v5.PUBLISH), st.none() | st.integers(1, 4))
def test_publish_round_trip(topic_: str, payload: bytes, qos: int, pid: int, retain: bool, dup: bool,
                            props: Properties, alias: int | None) -> None:
    """A PUBLISH the compiled encoder builds (the wire form of a client's), decoded by both codecs."""
    if alias is not None:
        props = msgspec.structs.replace(props, topic_alias=alias)
    args = (topic_, payload, qos, pid if qos else 0, retain, dup and qos > 0, props)
    raw = C.encode_publish(*args)
    assert raw == PY.encode_publish(*args)
    for impl in (PY, C):
        assert events_of(run(impl, [CONNECT + raw]))[1:] == [Publish5(*args)]


@SETTINGS
@given(st.sampled_from([v5.CONNACK, v5.SUBACK, v5.UNSUBACK, v5.DISCONNECT, v5.AUTH]), st.data())
def test_server_packets_same_bytes(ptype: int, data: st.DataObject) -> None:
    """The server-only packets (a server codec cannot decode them back; test_codec5.py
    has paho read them): the compiled encoders give the twin's bytes for any valid properties."""
    props = data.draw(properties(ptype))
    codes = sorted(v5.REASON_CODES_BY_PACKET[ptype])
    code = data.draw(st.sampled_from(codes))
    if ptype == v5.CONNACK:
        calls = [lambda impl: impl.encode_connack(False, code, props), lambda impl: impl.encode_connack(True, 0)]
    elif ptype in (v5.SUBACK, v5.UNSUBACK):
        chosen = data.draw(st.lists(st.sampled_from(codes), min_size=1, max_size=4))
        name = "suback" if ptype == v5.SUBACK else "unsuback"
        calls = [lambda impl: getattr(impl, f"encode_{name}")(9, chosen, props)]
    elif ptype == v5.DISCONNECT:
        props = msgspec.structs.replace(props, session_expiry_interval=None)
        code = code if code != 0x04 else 0
        calls = [lambda impl: impl.encode_disconnect(code, props), lambda impl: impl.encode_disconnect()]
    else:
        code = code if code != 0x19 else 0x18
        calls = [lambda impl: impl.encode_auth(code, props), lambda impl: impl.encode_auth()]
    for call in calls:
        assert call(C) == call(PY)


def test_pure_python_forced_serves_the_twin() -> None:
    """GRIDGATE_PURE_PYTHON=1 (gridgate.hotpath): codec5 is codec5_py itself."""
    import subprocess
    import sys

    code = ("from gridgate.protocols.mqtt import codec5_py; from gridgate.protocols.mqtt.codec5 import codec5; "
            "print(codec5 is codec5_py)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GRIDGATE_PURE_PYTHON": "1"},
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("reads", [1, 2], ids=["one read", "straddling two reads"])
def test_payload_views_alike(reads: int) -> None:
    """The compiled codec's payload is a memoryview built without a slice object
    (_m5_slice): it must behave as the twin's real slice in every way a reader sees."""
    raw = CONNECT + PY.encode_publish("devices/m1/telemetry", b'{"temperature": 21.5}', 1, 3)
    cut = len(raw) - 5 if reads == 2 else len(raw)
    views = []
    for impl in (PY, C):
        codec = impl.MQTT5Codec()
        data = (raw[:cut], raw[cut:]) if reads == 2 else (raw,)
        events = [e for chunk in data for e in codec.feed(chunk)]
        views.append((events[1].payload, data[-1]))
    (py_view, py_data), (c_view, c_data) = views
    for view, data in views:
        assert type(view) is memoryview
        if reads == 1:
            assert view.obj is data          # zero-copy: a view of the read itself
    for attr in ("readonly", "nbytes", "shape", "strides", "format", "itemsize", "ndim", "c_contiguous",
                 "contiguous", "suboffsets"):
        assert getattr(c_view, attr) == getattr(py_view, attr), attr
    assert c_view == py_view and hash(c_view) == hash(py_view) and c_view.tobytes() == py_view.tobytes()
    assert bytes(c_view[2:8]) == bytes(py_view[2:8]) == b"temper"
    assert bytes(c_view[-6:]) == bytes(py_view[-6:])


# -- every valid packet cut short (tests/test_hotpath_truncations.py's method, for 5.0) ------------------------
# The compiled codec reads through raw pointers with Cython's bounds checks
# off, so the reads most likely to run past a buffer are those at its very end.
# Each cut is a bytes object of its own, exactly its size: under make test-asan
# (PYTHONMALLOC=malloc) a read past it leaves the allocation and is reported.

_EVERY_PUBLISH = Properties(payload_format_indicator=1, message_expiry_interval=60, content_type="application/json",
                            response_topic="devices/m1/r", correlation_data=b"\x01\x02", topic_alias=2,
                            user_properties=(("traceparent", "00-ab-01"), ("k", "\u00e9")))
_WHY = Properties(reason_string="out_of_range: temperature", user_properties=(("k", "v"),))
PACKETS5 = {
    "connect": packet(0x10, pack_string(b"MQTT") + b"\x05\xce\x00\x0a" + v5.encode_properties(Properties(
        session_expiry_interval=10, receive_maximum=20, maximum_packet_size=4096, topic_alias_maximum=8,
        request_problem_information=1, user_properties=(("a", "b"),), authentication_method="M",
        authentication_data=b"d"), v5.CONNECT) + pack_string("m1") + v5.encode_properties(Properties(
            will_delay_interval=5, content_type="text/plain", user_properties=(("w", "x"),)), v5.WILL)
        + pack_string("devices/m1/status") + pack_string(b"gone") + pack_string("user") + pack_string(b"pw")),
    "publish": PY.encode_publish("devices/m1/telemetry", b'{"t": 1}', 1, 513, properties=_EVERY_PUBLISH),
    "publish-alias": PY.encode_publish("", b"{}", 0, properties=Properties(topic_alias=2)),
    "puback": PY.encode_puback(7, 0x10, _WHY),
    "pubrec": PY.encode_pubrec(8, 0x99, _WHY),
    "pubrel": PY.encode_pubrel(9, 0x92),
    "pubcomp": PY.encode_pubcomp(10),
    "subscribe": packet(0x82, u16(5) + v5.encode_properties(Properties(
        subscription_identifiers=(300,), user_properties=(("k", "v"),)), v5.SUBSCRIBE)
        + pack_string("a/+/#") + b"\x2d" + pack_string("$share/g/t") + b"\x01"),
    "unsubscribe": packet(0xA2, u16(6) + v5.encode_properties(Properties(user_properties=(("k", "v"),)),
                                                               v5.UNSUBSCRIBE) + pack_string("a/b") + pack_string("#")),
    "disconnect": packet(0xE0, b"\x04" + v5.encode_properties(Properties(
        session_expiry_interval=5, reason_string="bye", user_properties=(("k", "v"),)), v5.DISCONNECT)),
    "auth": packet(0xF0, b"\x18" + v5.encode_properties(Properties(
        authentication_method="SCRAM", authentication_data=b"c=biws", reason_string="r"), v5.AUTH)),
    "pingreq": b"\xc0\x00",
}


def own(data: bytes) -> bytes:
    """A bytes object of its own, exactly len(data) long (not a cached or shared one)."""
    return bytes(bytearray(data))


def cuts5(name: str) -> list[bytes]:
    """The packet's body cut at every length with its remaining length saying so (the
    packet ends where the bytes end), after a CONNECT unless it is one; then the whole
    packet cut at every byte (the rest never comes)."""
    frame = PACKETS5[name]
    i = 1
    while frame[i] & 0x80:
        i += 1
    body = frame[i + 1:]
    before = {"connect": b"", "auth": AUTH_CONNECT}.get(name, CONNECT)
    if name == "publish-alias":      # the alias must be mapped first
        before += PY.encode_publish("devices/m1/telemetry", b"", 0, properties=Properties(topic_alias=2))
    short = [before + frame[:1] + pack_remaining_length(k) + body[:k] for k in range(len(body) + 1)]
    return short + [before + frame[:k] for k in range(len(frame) + 1)]


@pytest.mark.parametrize("name", PACKETS5)
def test_packets_cut_short_agree(name: str) -> None:
    whole = run(PY, [cuts5(name)[-1]])
    assert whole[-1][0] != "error", whole[-1]     # uncut, the packet and what precedes it decode
    for stream in cuts5(name):
        assert run(C, [own(stream)], alias_max=4) == run(PY, [own(stream)], alias_max=4), stream
        # held back and completed from the next read: copied into a bytes object of exactly its size
        for at in (len(stream) - 1, len(stream) - 2):
            if at > 0:
                reads = [own(stream[:at]), own(stream[at:])]
                assert run(C, reads) == run(PY, reads), (stream, at)
