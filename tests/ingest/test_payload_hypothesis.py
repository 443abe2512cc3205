"""Property tests: the compiled validator and its pure-Python twin agree
exactly on arbitrary input, in every format, and never raise."""
from __future__ import annotations

import json
import os

import msgspec
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from gridgate import _fastparse
from gridgate.ingest import validator_py as _payload_py
from gridgate.ingest.rules import PayloadRules

# HYPOTHESIS_MAX_EXAMPLES=5000 for a longer differential run
SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "400")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
NOW = 1_732_406_400_000_000_000
RULES = PayloadRules(max_fields=6, max_tags=4)
C = _fastparse.Validator(RULES)
PY = _payload_py.Validator(RULES)


def both(raw: bytes, fmt: str, device_id: str | None):
    a = C.validate(raw, fmt, "mqtt", device_id, NOW)
    b = PY.validate(raw, fmt, "mqtt", device_id, NOW)
    assert a == b
    # as MQTT hands it over: a slice of the read, not bytes
    view = memoryview(b"\0" + raw + b"\0")[1:-1]
    for impl in (C, PY):
        from_view = impl.validate(view, fmt, "mqtt", device_id, NOW)
        assert from_view == a
        # == holds for a memoryview too: the stored raw must be a bytes copy
        assert all(type(r.raw) is bytes for r in from_view[1])
        records, rejections = ["earlier"], ["earlier"]
        n = impl.validate_into(view, fmt, "mqtt", device_id, NOW, records, rejections)
        assert (records, rejections) == (["earlier"] + a[0], ["earlier"] + a[1])
        assert n == len(a[0]) + len(a[1])
    return a


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from(["json", "msgpack", "ndjson"]),
       st.sampled_from([None, "meter-1"]))
def test_arbitrary_bytes_agree(raw, fmt, device_id):
    both(raw, fmt, device_id)


numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([-40, 125, -40.0001, 125.0001, 0.0005, -0.0005, 2**63, -(2**63) - 1, 3700.0]))
scalars = st.one_of(numbers, st.booleans(), st.none(), st.text(max_size=6))
names = st.one_of(st.sampled_from(["temperature", "battery_mv", "humidity", "voltage", "bad name", "x.y", "_z",
                                   "9a", "temperature_mc"]), st.text(max_size=5))
tag_values = st.one_of(st.text(max_size=5), st.integers(0, 3), st.sampled_from(["a\x01", "sh", ""]))
readings = st.fixed_dictionaries({}, optional={
    "device_id": st.one_of(st.sampled_from(["meter-1", "meter-2", "bad id", "", "a" * 129]), st.integers(0, 2)),
    "timestamp_ms": st.one_of(st.integers(-5, 2**63), st.floats(), st.just(1732406400123)),
    "timestamp_ns": st.one_of(st.integers(-5, 2**64), st.just(NOW + 301 * 10**9)),
    "temperature": numbers,
    "temperature_unit": st.one_of(st.sampled_from(["C", "F", "K", "c", "X"]), st.integers(0, 1)),
    "location": st.one_of(st.sampled_from(["sh", "sh/fa", "sh/fa/z1", "a/b/c/d", "a//b", ""]), st.integers()),
    "tags": st.one_of(st.dictionaries(st.sampled_from(["vendor", "region", "device_id", "9x", "k"]), tag_values,
                                      max_size=5), st.lists(st.integers(), max_size=1)),
    "metrics": st.one_of(st.dictionaries(names, scalars, max_size=4), st.integers()),
}).flatmap(lambda d: st.dictionaries(names, scalars, max_size=4).map(lambda extra: {**extra, **d}))
payloads = st.one_of(readings, st.lists(st.one_of(readings, scalars), max_size=4), scalars)


@SETTINGS
@given(payloads, st.sampled_from([None, "meter-1"]))
def test_structured_readings_agree_as_msgpack(obj, device_id):
    try:
        raw = msgspec.msgpack.encode(obj)
    except OverflowError:  # MessagePack has no integers beyond 64 bits
        assume(False)
    both(raw, "msgpack", device_id)


@SETTINGS
@given(payloads, st.sampled_from([None, "meter-1"]), st.sampled_from([None, 1]))
def test_structured_readings_agree_as_json(obj, device_id, indent):
    # allow_nan=True writes NaN/Infinity literals, which both must call malformed
    raw = json.dumps(obj, indent=indent, allow_nan=True).encode()
    both(raw, "json", device_id)


@SETTINGS
@given(st.lists(readings, max_size=4), st.sampled_from([None, "meter-1"]))
def test_structured_readings_agree_as_ndjson(objs, device_id):
    raw = b"\n".join(json.dumps(o).encode() for o in objs)
    both(raw, "ndjson", device_id)
