"""take_publishes: an MQTT session's step over the PUBLISHes of one read
(validation, receive times, bad topics, QoS 1 and 2 ids, QoS 2 redelivery),
compiled and pure-Python, on examples and, with hypothesis, on generated
event lists where both must agree."""
from __future__ import annotations

import itertools
import os
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gridgate import _fastparse
from gridgate.ingest import validator_py as _payload_py
from gridgate.ingest.records import Rejection
from gridgate.ingest.rules import PayloadRules
from gridgate.protocols.mqtt import codec_py as _mqtt_py
from gridgate.protocols.mqtt.events import PingReq, Publish, PubRel
from inprocess import Clock

TOPIC = "devices/m1/telemetry"
READING = b'{"temperature": 21.5, "location": "sh/fa"}'
BATCH = b'[{"x": 1}, {"x": 2}, {"x": "bad"}]'


def run(impl, events, start=0, next_ns=0, clock=None, qos2=None, validator_impl=_payload_py):
    validate_into = validator_impl.Validator(PayloadRules()).validate_into
    records, rejections, pubacks, pubrecs = [], [], [], []
    result = impl.take_publishes(events, start, TOPIC, validate_into, "mqtt", "m1", next_ns, clock or Clock(),
                                 qos2, records, rejections, pubacks, pubrecs)
    return result, records, rejections, pubacks, pubrecs


@pytest.fixture(params=[_mqtt_py, _fastparse], ids=["py-mqtt", "c-mqtt"])
def impl(request):
    return request.param


def test_a_run_of_publishes_stops_at_the_first_other_event(impl):
    events = [Publish(TOPIC, memoryview(b"xx" + READING)[2:], 1, 7, False, False),
              Publish("telemetry", READING, 0, 0, False, False),
              PingReq(), Publish(TOPIC, READING, 1, 8, False, False)]
    (stop, next_ns, first), records, rejections, pubacks, pubrecs = run(impl, events, clock=Clock(5_000))
    assert (stop, first) == (2, 5_000)
    # each publish's readings are later than the last one's: 5000, then 5002
    assert [r.ts_ns for r in records] == [5_000, 5_002] and next_ns == 5_004
    assert records[0].fields == {"temperature_mc": 21500} and records[0].tags == {"region": "sh", "site": "fa"}
    assert (rejections, pubacks, pubrecs) == ([], [7], [])
    (stop, _, first), *_ = run(impl, events, start=2)
    assert (stop, first) == (2, 0)                  # nothing taken: not a publish
    (stop, _, _), *_ = run(impl, events, start=3)
    assert stop == 4


def test_receive_times_follow_the_clock_and_next_ns(impl):
    events = [Publish(TOPIC, BATCH, 1, i, False, False) for i in (1, 2)]
    (_, next_ns, first), records, rejections, *_ = run(impl, events, next_ns=10_000, clock=Clock(9_000, 1))
    # the clock is behind next_ns: next_ns wins; a batch's items are +1 ns apart
    assert first == 10_000 and [r.ts_ns for r in records] == [10_000, 10_001, 10_004, 10_005]
    assert next_ns == 10_008 and [r.index for r in rejections] == [2, 2]
    (_, next_ns, first), records, *_ = run(impl, events[:1], next_ns=10, clock=Clock(9_000))
    assert first == 9_000 and next_ns == 9_004


def test_other_topics_are_rejected_and_still_acknowledged(impl):
    events = [Publish("devices/m2/telemetry", b"\x81\xa1x\x01", 1, 3, False, False)]
    (stop, next_ns, first), records, rejections, pubacks, _ = run(impl, events, next_ns=50, clock=Clock(40))
    assert (stop, next_ns, first, records, pubacks) == (1, 50, 50, [], [3])
    assert rejections == [Rejection(reason="bad_topic", field="topic", index=None, device_id="m1",
                                    raw=b"\x81\xa1x\x01",
                                    detail="topic 'devices/m2/telemetry' is not 'telemetry' or "
                                           "'devices/m1/telemetry'")]


def test_msgpack_is_told_from_json_by_the_first_byte(impl):
    events = [Publish(TOPIC, msgspec.msgpack.encode({"x": 1}), 0, 0, False, False),
              Publish(TOPIC, b"", 0, 0, False, False),
              Publish(TOPIC, b" {\"x\": 2}", 0, 0, False, False),
              Publish(TOPIC, bytearray(b'{"x": 3}'), 0, 0, False, False)]
    _, records, rejections, *_ = run(impl, events)
    assert [r.fields for r in records] == [{"x": 1.0}, {"x": 2.0}, {"x": 3.0}]
    assert [r.reason for r in rejections] == ["malformed"]      # empty: judged as JSON


def test_qos2_needs_the_callers_set_and_stores_a_redelivery_once(impl):
    events = [Publish(TOPIC, READING, 1, 1, False, False), Publish(TOPIC, READING, 2, 9, False, False),
              Publish(TOPIC, READING, 2, 9, False, False), Publish(TOPIC, READING, 2, 10, False, False), PubRel(9)]
    (stop, *_), records, *_ = run(impl, events, qos2=None)
    assert stop == 1 and len(records) == 1          # stopped at the QoS 2 publish: no set yet
    unreleased: set[int] = {10}                     # 10: held from an earlier read
    (stop, _, _), records, _, pubacks, pubrecs = run(impl, events, qos2=unreleased)
    assert stop == 4 and pubacks == [1] and pubrecs == [9, 9, 10] and unreleased == {9, 10}
    assert len(records) == 2                        # 1, and 9 once


PUBLISHES = st.builds(
    Publish,
    st.sampled_from([TOPIC, "telemetry", "devices/x/telemetry", ""]),
    st.one_of(st.sampled_from([READING, BATCH, b"", b"{", b"\x81\xa1x\x01", b"[1, {\"y\": 2}]"]),
              st.binary(max_size=40)).map(lambda b: memoryview(b"..." + b)[3:]),
    st.integers(0, 2), st.integers(1, 5), st.booleans(), st.booleans())
EVENTS = st.lists(st.one_of(PUBLISHES, PUBLISHES, st.just(PingReq())), max_size=12)


@settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(EVENTS, st.integers(0, 3), st.integers(0, 2_000), st.integers(0, 3), st.booleans(),
       st.sets(st.integers(1, 5), max_size=3))
def test_both_implementations_agree(events, start, next_ns, step, with_set, held):
    out = []
    for impl, validator_impl in itertools.product((_mqtt_py, _fastparse), (_payload_py, _fastparse)):
        qos2 = set(held) if with_set else None
        result = run(impl, events, start, next_ns, Clock(1_000, step), qos2, validator_impl)
        out.append((result, qos2))
    assert all(o == out[0] for o in out[1:])


def test_the_wall_clock_read_in_c_gives_increasing_receive_times_within_the_call(impl):
    """time.time_ns, which the sessions pass, the compiled loop reads itself:
    still the wall clock, and still one ns apart at least per reading."""
    events = [Publish(TOPIC, READING, 0, 0, False, False) for _ in range(50)]
    before = time.time_ns()
    (stop, next_ns, first), records, *_ = run(impl, events, clock=time.time_ns, validator_impl=_fastparse)
    after = time.time_ns()
    stamps = [r.received_ns for r in records]
    assert stop == 50 and len(stamps) == 50 and stamps[0] == first
    assert before <= first and stamps[-1] < next_ns <= after + 50
    assert all(a < b for a, b in itertools.pairwise(stamps))


@pytest.mark.parametrize("validator_impl", [_payload_py, _fastparse], ids=["py-validator", "c-validator"])
def test_a_validate_into_that_is_not_the_validators_own_is_called_as_given(impl, validator_impl):
    """The compiled loop calls a compiled Validator's _validate directly only
    for its own bound validate_into; a wrapper (say, one that counts) is called."""
    validator = validator_impl.Validator(PayloadRules())
    calls = []

    def counting(*args):
        calls.append(args[1])
        return validator.validate_into(*args)

    events = [Publish(TOPIC, READING, 0, 0, False, False), Publish(TOPIC, b"\x81\xa1x\x01", 0, 0, False, False)]
    own = validator.validate_into
    # the compiled loop remembers the last validate_into it looked at: switching back and forth
    for validate_into, counted in ((own, []), (counting, ["json", "msgpack"]), (own, ["json", "msgpack"])):
        records, rejections = [], []
        impl.take_publishes(events, 0, TOPIC, validate_into, "mqtt", "m1", 0, Clock(), None, records, rejections,
                            [], [])
        assert calls == counted and len(records) == 2 and not rejections
