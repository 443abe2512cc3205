"""take_publishes5: the MQTT 5.0 session's step over a run of plain readings
(no properties, not retained, QoS 0/1, the device's telemetry topic):
validation, receive times, 0x00 PUBACKs and their spans, Receive Maximum,
the stop after a QoS 1 publish with rejections and before any other event;
compiled and pure-Python, on examples and, with hypothesis, on generated
event lists where both must agree."""
from __future__ import annotations

import itertools
import os

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gridgate import _fastparse
from gridgate.ingest import validator_py as _payload_py
from gridgate.ingest.rules import PayloadRules
from gridgate.protocols.mqtt import codec5_py as _mqtt5_py
from gridgate.protocols.mqtt.events import PingReq
from gridgate.protocols.mqtt.events5 import Publish5, PubRel5
from gridgate.protocols.mqtt.v5 import NO_PROPERTIES, Properties
from inprocess import Clock

TOPIC = "devices/m1/telemetry"
READING = b'{"temperature": 21.5, "location": "sh/fa"}'
BATCH = b'[{"x": 1}, {"x": 2}, {"x": "bad"}]'
ALL_BAD = b'[{"x": "bad"}]'


def pub(payload=READING, qos=1, pid=1, topic=TOPIC, retain=False, props=NO_PROPERTIES):
    return Publish5(topic, payload, qos, pid, retain, False, props)


def run(impl, events, start=0, next_ns=0, clock=None, max_qos1=100, with_spans=True, validator_impl=_payload_py):
    validate_into = validator_impl.Validator(PayloadRules()).validate_into
    records, rejections, acks = [], [], bytearray()
    spans = [] if with_spans else None
    result = impl.take_publishes5(events, start, TOPIC, validate_into, "mqtt5", "m1", next_ns, clock or Clock(),
                                  max_qos1, records, rejections, acks, spans)
    return result, records, rejections, acks, spans


@pytest.fixture(params=[_mqtt5_py, _fastparse], ids=["py-mqtt5", "c-mqtt5"])
def impl(request):
    return request.param


def test_a_run_of_plain_readings_is_acked_and_stops_at_the_first_other_event(impl):
    events = [pub(memoryview(b"xx" + READING)[2:], 1, 7), pub(READING, 0, 0, topic="telemetry"),
              PingReq(), pub(READING, 1, 0x1234)]
    (stop, next_ns, first, rejected), records, rejections, acks, spans = run(impl, events, clock=Clock(5_000))
    assert (stop, first, rejected) == (2, 5_000, None)
    assert [r.ts_ns for r in records] == [5_000, 5_002] and next_ns == 5_004
    assert records[0].fields == {"temperature_mc": 21500} and records[0].tags == {"region": "sh", "site": "fa"}
    assert rejections == [] and acks == b"\x40\x02\x00\x07" and spans == [(0, 1, 7, 0, 1)]
    (stop, _, first, _), *_ = run(impl, events, start=2)
    assert (stop, first) == (2, 0)                      # nothing taken: not a publish
    (stop, _, _, _), _, _, acks, _ = run(impl, events, start=3)
    assert stop == 4 and acks == b"\x40\x02\x12\x34"
    # the same bytes as the 5.0 encoder's 0x00 PUBACK without properties
    assert acks == _mqtt5_py.encode_puback(0x1234, 0, None, None)


@pytest.mark.parametrize("other", [
    pub(props=Properties(payload_format_indicator=1)),
    pub(props=Properties()),                            # equal to NO_PROPERTIES, not it: not plain
    pub(retain=True), pub(qos=2), pub(topic="devices/m2/telemetry"), PubRel5(1),
], ids=["properties", "equal-properties", "retain", "qos2", "other-topic", "pubrel"])
def test_anything_not_plain_stops_the_run_before_it(impl, other):
    (stop, _, _, rejected), records, _, acks, _ = run(impl, [pub(pid=1), other, pub(pid=2)])
    assert (stop, rejected, len(records), len(acks)) == (1, None, 1, 4)


def test_receive_times_follow_the_clock_and_next_ns(impl):
    events = [pub(b'[{"x": 1}, {"x": 2}]', 0, 0), pub(b'{"x": 3}', 0, 0)]
    (_, next_ns, first, _), records, *_ = run(impl, events, next_ns=10_000, clock=Clock(9_000, 1))
    assert first == 10_000 and [r.ts_ns for r in records] == [10_000, 10_001, 10_003] and next_ns == 10_005


def test_a_qos1_publish_with_rejections_ends_the_run_unacked(impl):
    events = [pub(READING, 1, 1), pub(BATCH, 1, 2), pub(READING, 1, 3)]
    (stop, _, _, rejected), records, rejections, acks, spans = run(impl, events)
    assert stop == 2 and rejected == (2, 1, 0)          # its packet id, records and rejections before it
    assert len(records) == 3 and [r.index for r in rejections] == [2]
    assert acks == b"\x40\x02\x00\x01" and spans == [(0, 1, 1, 0, 1)]
    (stop, _, _, rejected), records, _, acks, _ = run(impl, [pub(ALL_BAD, 1, 9)])
    assert (stop, rejected, records, acks) == (1, (9, 0, 0), [], b"")


def test_a_qos0_publish_with_rejections_does_not_stop_the_run(impl):
    events = [pub(ALL_BAD, 0, 0), pub(b"\x81\xa1x\x01", 1, 4)]    # the second is MessagePack
    (stop, _, _, rejected), records, rejections, acks, spans = run(impl, events)
    assert (stop, rejected, len(rejections), acks) == (2, None, 1, b"\x40\x02\x00\x04")
    assert records[0].fields == {"x": 1.0} and spans == [(0, 1, 4, 0, 1)]


def test_max_qos1_stops_before_the_publish_over_it(impl):
    events = [pub(pid=1), pub(qos=0, pid=0), pub(pid=2), pub(qos=0, pid=0)]
    (stop, _, _, _), records, _, acks, _ = run(impl, events, max_qos1=1)
    assert stop == 2 and len(records) == 2 and acks == b"\x40\x02\x00\x01"
    (stop, _, first, _), records, _, acks, _ = run(impl, events, max_qos1=0)
    assert (stop, first, records, acks) == (0, 0, [], b"")
    (stop, *_), records, *_ = run(impl, events[1:], max_qos1=0)
    assert stop == 1 and len(records) == 1              # QoS 0 is not counted


def test_without_spans_nothing_is_recorded_for_them(impl):
    (stop, *_), _, _, acks, spans = run(impl, [pub(pid=1), pub(pid=2)], with_spans=False)
    assert (stop, acks, spans) == (2, b"\x40\x02\x00\x01\x40\x02\x00\x02", None)


def test_a_negative_start_is_refused(impl):
    with pytest.raises(IndexError):
        run(impl, [pub()], start=-1)


PROPS = st.sampled_from([NO_PROPERTIES, NO_PROPERTIES, NO_PROPERTIES, Properties(),
                         Properties(content_type="application/json")])
PUBLISHES = st.builds(
    Publish5,
    st.sampled_from([TOPIC, TOPIC, "telemetry", "devices/x/telemetry"]),
    st.one_of(st.sampled_from([READING, BATCH, ALL_BAD, b"", b"{", b"\x81\xa1x\x01", b"[1, {\"y\": 2}]",
                               msgspec.msgpack.encode([{"x": 1}, {"x": "no"}])]),
              st.binary(max_size=40)).map(lambda b: memoryview(b"..." + b)[3:]),
    st.integers(0, 2), st.integers(1, 65535), st.sampled_from([False, False, False, True]),
    st.booleans(), PROPS)
EVENTS = st.lists(st.one_of(PUBLISHES, PUBLISHES, PUBLISHES, st.just(PingReq())), max_size=12)


@settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(EVENTS, st.integers(0, 3), st.integers(0, 2_000), st.integers(0, 3), st.integers(-1, 6), st.booleans())
def test_both_implementations_agree(events, start, next_ns, step, max_qos1, with_spans):
    out = []
    for impl, validator_impl in itertools.product((_mqtt5_py, _fastparse), (_payload_py, _fastparse)):
        out.append(run(impl, events, start, next_ns, Clock(1_000, step), max_qos1, with_spans, validator_impl))
    assert all(o == out[0] for o in out[1:])
    (stop, _, _, rejected), records, rejections, acks, spans = out[0]
    # what the contract says, whichever implementation: acks only for clean QoS 1 readings (4-byte PUBACKs
    # 0x00), each span inside records and pointing at its own PUBACK
    assert len(acks) % 4 == 0 and len(acks) // 4 <= max(max_qos1, 0) and acks[::4] == b"\x40" * (len(acks) // 4)
    assert rejected is None or rejections
    if spans is not None:
        assert all(0 <= s < e <= len(records) for _, _, _, s, e in spans)
        assert all(offset % 4 == 0 and acks[offset + 2:offset + 4] == pid.to_bytes(2, "big")
                   for offset, _, pid, _, _ in spans)


def test_acks_go_after_what_the_read_already_owes(impl):
    """The session appends to one buffer per read: the run's PUBACKs and their span offsets follow
    the acks already in it (say a PUBREC 0x00 the session encoded)."""
    validate_into = _payload_py.Validator(PayloadRules()).validate_into
    records, rejections, spans = [], [], []
    acks = bytearray(b"\x50\x02\x00\x09")
    impl.take_publishes5([pub(pid=1), pub(qos=0, pid=0), pub(pid=2)], 0, TOPIC, validate_into, "mqtt5", "m1", 0,
                         Clock(), 100, records, rejections, acks, spans)
    assert acks == b"\x50\x02\x00\x09" + b"\x40\x02\x00\x01" + b"\x40\x02\x00\x02"
    assert spans == [(4, 1, 1, 0, 1), (8, 1, 2, 2, 3)]


@pytest.mark.parametrize("acks", [[], b"", None], ids=["list", "bytes", "none"])
def test_acks_must_be_a_bytearray(impl, acks):
    with pytest.raises(TypeError):
        impl.take_publishes5([pub()], 0, TOPIC, _payload_py.Validator(PayloadRules()).validate_into, "mqtt5", "m1",
                             0, Clock(), 100, [], [], acks, None)
