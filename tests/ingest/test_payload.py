"""The payload validator (DESIGN section 3), run against both implementations;
and, end to end through an embedded gateway, the reason codes that only an
MQTT session or a sink produces (too_large, bad_topic, sink_refused), read
back as an operator reads them: ``gridgate spool export --rejected``."""
from __future__ import annotations

import base64
import json
import time

import msgspec
import pytest
import trio

from gatewayproc import spool_export, spool_stats
from gridgate.config import AuthConfig, PayloadConfig
from gridgate.ingest.records import REASONS, Record, Rejection
from gridgate.ingest.rules import FieldRule, PayloadRules
from inprocess import MemorySink, connect_memory, read_exactly
from mqtt_frames import gen_puback, gen_publish

NOW = 1_732_406_400_000_000_000          # received_ns used throughout
SAMPLE = {"device_id": "meter-0001", "timestamp_ms": 1732406400123, "temperature": 23.5,
          "temperature_unit": "C", "battery_mv": 3700, "location": "shanghai/factory-a",
          "tags": {"vendor": "huawei"}}


@pytest.fixture
def v(payload_impl):
    return payload_impl.Validator(PayloadRules())


def judge(v, obj, device_id=None, fmt="json", protocol="http"):
    raw = json.dumps(obj).encode() if fmt == "json" else msgspec.msgpack.encode(obj)
    return v.validate(raw, fmt, protocol, device_id, NOW)


def one_rejection(v, obj, device_id=None) -> Rejection:
    records, rejections = judge(v, obj, device_id)
    assert records == []
    (rej,) = rejections
    return rej


def test_the_design_sample_reading(v):
    records, rejections = judge(v, SAMPLE)
    assert rejections == []
    assert records == [Record(
        device_id="meter-0001", ts_ns=1732406400123_000_000, received_ns=NOW, protocol="http",
        fields={"temperature_mc": 23500, "battery_mv": 3700},
        tags={"region": "shanghai", "site": "factory-a", "vendor": "huawei"})]
    assert type(records[0].fields["battery_mv"]) is int


def test_same_reading_as_msgpack_gives_the_same_record(v):
    assert judge(v, SAMPLE, fmt="msgpack") == judge(v, SAMPLE)


@pytest.mark.parametrize("reading, mc", [
    ({"temperature": 77, "temperature_unit": "F"}, 25000),
    ({"temperature": 298.15, "temperature_unit": "K"}, 25000),
    ({"temperature": 21.5}, 21500),
    ({"temperature": -40}, -40000),
    ({"temperature": 125}, 125000),
    ({"temperature": 0.0005}, 1),            # half away from zero
    ({"temperature": -0.0005}, -1),
    ({"temperature": 23.4567}, 23457),
    ({"temperature": -40, "temperature_unit": "F"}, -40000),
    ({"temperature": 257, "temperature_unit": "F"}, 125000),
])
def test_temperature_units_become_integer_milli_celsius(v, reading, mc):
    (record,), _ = judge(v, reading, device_id="m")
    assert record.fields == {"temperature_mc": mc}
    assert type(record.fields["temperature_mc"]) is int


@pytest.mark.parametrize("temperature", [-40.001, 125.001, 1000])
def test_temperature_outside_range_is_rejected(v, temperature):
    rej = one_rejection(v, {"temperature": temperature}, "m")
    assert rej == Rejection(reason="out_of_range", field="temperature", index=0, device_id="m",
                            raw=json.dumps({"temperature": temperature}).encode(),
                            detail="temperature outside the allowed range")


def test_metrics_object_and_float_storage(v):
    (record,), _ = judge(v, {"device_id": "inv-1", "metrics": {"voltage": 230, "battery_mv": 3600.0},
                             "humidity": 40})
    assert record.fields == {"humidity": 40.0, "voltage": 230.0, "battery_mv": 3600}
    assert type(record.fields["voltage"]) is float and type(record.fields["battery_mv"]) is int


def test_timestamps(v):
    (a,), _ = judge(v, {"device_id": "d", "timestamp_ms": 1000, "x": 1})
    (b,), _ = judge(v, {"device_id": "d", "timestamp_ns": 1234, "x": 1})
    (c,), _ = judge(v, {"device_id": "d", "x": 1})
    old = NOW - 86400 * 365 * 10**9
    (d,), _ = judge(v, {"device_id": "d", "timestamp_ns": old, "x": 1})
    edge = NOW + 300 * 10**9
    (e,), _ = judge(v, {"device_id": "d", "timestamp_ns": edge, "x": 1})
    assert [r.ts_ns for r in (a, b, c, d, e)] == [1_000_000_000, 1234, NOW, old, edge]


def _rej(reason, field, detail, raw_obj, device_id=None, index=0):
    return Rejection(reason=reason, field=field, index=index, device_id=device_id,
                     raw=json.dumps(raw_obj).encode(), detail=detail)


REJECTIONS = [
    # (reading, connection device id, reason, field, detail, rejection device id)
    ([1], None, "not_object", None, "reading must be an object", None),
    ({"x": 1}, None, "missing_device_id", "device_id", "device_id is required", None),
    ({"device_id": "bad id", "x": 1}, None, "bad_device_id", "device_id",
     "device_id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}", None),
    ({"device_id": 5, "x": 1}, None, "bad_device_id", "device_id",
     "device_id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}", None),
    ({"device_id": "a" * 129, "x": 1}, None, "bad_device_id", "device_id",
     "device_id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}", None),
    ({"device_id": "other", "x": 1}, "meter-1", "identity_mismatch", "device_id",
     "device_id differs from the connection's device", "meter-1"),
    ({"timestamp_ms": 1.5, "x": 1}, "m", "bad_timestamp", "timestamp_ms", "timestamp_ms must be an integer", "m"),
    ({"timestamp_ms": True, "x": 1}, "m", "bad_timestamp", "timestamp_ms", "timestamp_ms must be an integer", "m"),
    ({"timestamp_ns": -1, "x": 1}, "m", "bad_timestamp", "timestamp_ns", "timestamp_ns is out of range", "m"),
    ({"timestamp_ms": 2**63, "x": 1}, "m", "bad_timestamp", "timestamp_ms", "timestamp_ms is out of range", "m"),
    ({"timestamp_ms": 1, "timestamp_ns": 1, "x": 1}, "m", "bad_timestamp", "timestamp_ms",
     "give timestamp_ms or timestamp_ns, not both", "m"),
    ({"timestamp_ns": NOW + 300 * 10**9 + 1, "x": 1}, "m", "future_timestamp", "timestamp_ns",
     "timestamp_ns is more than 300 s in the future", "m"),
    ({"temperature": 20, "temperature_unit": "X"}, "m", "bad_unit", "temperature_unit",
     "temperature_unit must be C, F or K", "m"),
    ({"temperature_unit": "C", "x": 1}, "m", "bad_unit", "temperature_unit",
     "temperature_unit given without temperature", "m"),
    ({"x": "1"}, "m", "bad_type", "x", "value must be a number", "m"),
    ({"x": True}, "m", "bad_type", "x", "value must be a number", "m"),
    ({"x": None}, "m", "bad_type", "x", "value must be a number", "m"),
    ({"bad name": 1}, "m", "bad_type", "bad name", "invalid field name", "m"),
    ({"metrics": [1]}, "m", "bad_type", "metrics", "metrics must be an object", "m"),
    ({"x": 1, "metrics": {"x": 2}}, "m", "bad_type", "metrics.x", "field given both at top level and in metrics",
     "m"),
    ({"battery_mv": 3700.5}, "m", "bad_type", "battery_mv", "value must be an integer", "m"),
    ({"battery_mv": 70000}, "m", "out_of_range", "battery_mv", "value outside the allowed range", "m"),
    ({"humidity": -0.1}, "m", "out_of_range", "humidity", "value outside the allowed range", "m"),
    ({"x": 2**63}, "m", "out_of_range", "x", "integer outside the 64-bit range", "m"),
    ({"x": 1, "location": "a/b/c/d"}, "m", "bad_tag", "location",
     "location must be 1 to 3 non-empty '/'-separated names", "m"),
    ({"x": 1, "location": "a//c"}, "m", "bad_tag", "location",
     "location must be 1 to 3 non-empty '/'-separated names", "m"),
    ({"x": 1, "location": 7}, "m", "bad_tag", "location",
     "location must be 1 to 3 non-empty '/'-separated names", "m"),
    ({"x": 1, "tags": ["a"]}, "m", "bad_tag", "tags", "tags must be an object of strings", "m"),
    ({"x": 1, "tags": {"9lives": "x"}}, "m", "bad_tag", "tags.9lives", "invalid tag name", "m"),
    ({"x": 1, "tags": {"v": 3}}, "m", "bad_tag", "tags.v",
     "tag value must be a non-empty string without control characters", "m"),
    ({"x": 1, "tags": {"v": "a\nb"}}, "m", "bad_tag", "tags.v",
     "tag value must be a non-empty string without control characters", "m"),
    ({"x": 1, "tags": {"device_id": "m"}}, "m", "bad_tag", "tags.device_id", "device_id is not a tag", "m"),
    ({"x": 1, "location": "sh", "tags": {"region": "bj"}}, "m", "bad_tag", "tags.region",
     "tag conflicts with location", "m"),
    ({"x": 1, "tags": {f"t{i}": "v" for i in range(33)}}, "m", "bad_tag", "tags", "more than max_tags 32 tags",
     "m"),
    ({f"f{i}": 1 for i in range(65)}, "m", "too_many_fields", None, "65 metrics exceed max_fields 64", "m"),
    ({"device_id": "m"}, None, "malformed", None, "no metrics", "m"),
]


@pytest.mark.parametrize("reading, conn, reason, field, detail, dev", REJECTIONS,
                         ids=[f"{r[2]}-{i}" for i, r in enumerate(REJECTIONS)])
def test_each_reason_code(v, reading, conn, reason, field, detail, dev):
    if isinstance(reading, list):  # a non-object inside a batch
        records, rejections = v.validate(json.dumps(reading).encode(), "json", "http", conn, NOW)
        assert records == [] and rejections == [_rej(reason, field, detail, reading[0], dev)]
        return
    assert one_rejection(v, reading, conn) == _rej(reason, field, detail, reading, dev)


def test_non_finite_numbers_from_msgpack_are_rejected(v):
    for value in (float("nan"), float("inf"), float("-inf")):
        raw = msgspec.msgpack.encode({"x": value})
        assert v.validate(raw, "msgpack", "mqtt", "m", NOW) == ([], [Rejection(
            reason="bad_type", field="x", index=0, device_id="m", raw=raw, detail="value must be a finite number")])


@pytest.mark.parametrize("key, field", [(1.5, "1.5"), (float("nan"), "nan"), (7, "7"), (b"x", "b'x'"),
                                        (True, "True"), (None, None)])
def test_a_msgpack_key_that_is_not_a_string_is_named_by_a_string(v, key, field):
    """A msgpack map's key may be a number, bytes, a bool or nil: its rejection's
    field is text, or none for nil (a float one was a float field, which the spool
    could not write as a dead letter, and the pipeline retried that batch for ever)."""
    raw = msgspec.msgpack.encode({key: 1, "temperature": 20.0})
    [rejection] = v.validate(raw, "msgpack", "mqtt", "m", NOW)[1]
    assert (rejection.reason, rejection.field, rejection.detail) == ("bad_type", field, "invalid field name")
    # inside metrics, as before: the name is part of the label
    raw = msgspec.msgpack.encode({"metrics": {key: 1}})
    [rejection] = v.validate(raw, "msgpack", "mqtt", "m", NOW)[1]
    assert rejection.field == f"metrics.{key}"


@pytest.mark.parametrize("raw", [b"NaN", b'{"x": NaN}', b'{"x": Infinity}', b'{"x": 1e400}', b"{", b"",
                                 b'"\\ud800"', b"\xef\xbb\xbf{}", b'{"x": 1}x', b"\xff"])
def test_undecodable_json_is_malformed(v, raw):
    assert v.validate(raw, "json", "http", None, NOW) == ([], [Rejection(
        reason="malformed", raw=raw, detail="payload is not valid JSON")])


def test_undecodable_msgpack_is_malformed(v):
    raw = b"\xc1"
    assert v.validate(raw, "msgpack", "mqtt", "m", NOW) == ([], [Rejection(
        reason="malformed", device_id="m", raw=raw, detail="payload is not valid MessagePack")])


def test_top_level_scalar_is_not_object(v):
    assert v.validate(b' "hi" ', "json", "http", None, NOW) == ([], [Rejection(
        reason="not_object", raw=b' "hi" ', detail="payload must be an object or an array of objects")])


def test_too_deep_nesting_is_malformed(v):
    raw = b'{"x": 1, "tags": ' + b"[" * 70 + b"]" * 70 + b"}"
    (rej,) = v.validate(raw, "json", "http", "m", NOW)[1]
    assert rej.reason == "malformed"


def test_batch_judges_each_item_alone_with_its_own_raw_bytes(v):
    raw = b'[{"humidity": 5}, 3 , {"temperature": 900},{"battery_mv": 1}]'
    records, rejections = v.validate(raw, "json", "http", "m", NOW)
    assert [r.fields for r in records] == [{"humidity": 5.0}, {"battery_mv": 1}]
    assert rejections == [
        Rejection(reason="not_object", index=1, device_id="m", raw=b"3", detail="reading must be an object"),
        Rejection(reason="out_of_range", field="temperature", index=2, device_id="m",
                  raw=b'{"temperature": 900}', detail="temperature outside the allowed range"),
    ]


def test_msgpack_batch_raw_bytes_are_the_items(v):
    items = [{"x": 1}, {"x": "no"}]
    raw = msgspec.msgpack.encode(items)
    records, rejections = v.validate(raw, "msgpack", "mqtt", "m", NOW)
    assert len(records) == 1
    assert rejections[0].raw == msgspec.msgpack.encode(items[1]) and rejections[0].index == 1


def test_ndjson_lines(v):
    raw = b'{"device_id":"a","x":1}\r\n\n  \nnot json\n{"x":2}\n[1]\n'
    records, rejections = v.validate(raw, "ndjson", "http", None, NOW)
    assert [r.device_id for r in records] == ["a"]
    assert [(r.index, r.reason, r.raw) for r in rejections] == [
        (1, "malformed", b"not json"), (2, "missing_device_id", b'{"x":2}'), (3, "not_object", b"[1]")]


def test_empty_batch_is_nothing(v):
    assert v.validate(b" [ ] ", "json", "http", None, NOW) == ([], [])


def test_payload_and_batch_limits(payload_impl):
    v = payload_impl.Validator(PayloadRules(max_payload_bytes=100, max_batch_items=2))
    big = b'{"x": 1, "pad": "' + b"p" * 100 + b'"}'
    assert v.validate(big, "json", "http", "m", NOW)[1] == [Rejection(
        reason="too_large", device_id="m", raw=big,
        detail=f"payload of {len(big)} bytes exceeds max_payload_bytes 100")]
    batch = b'[{"x":1},{"x":2},{"x":3}]'
    assert v.validate(batch, "json", "http", "m", NOW)[1] == [Rejection(
        reason="too_large", device_id="m", raw=batch, detail="batch of 3 readings exceeds max_batch_items 2")]


def test_configured_field_rules_and_levels(payload_impl):
    rules = PayloadRules(fields={"temperature": FieldRule(min=0, max=50), "voltage": FieldRule(min=0, max=480)},
                         location_levels=("country", "city"))
    v = payload_impl.Validator(rules)
    (rec,), _ = v.validate(b'{"voltage": 230, "location": "cn/sh", "temperature": 10}', "json", "mqtt", "m", NOW)
    assert rec.fields == {"voltage": 230.0, "temperature_mc": 10000}
    assert rec.tags == {"country": "cn", "city": "sh"}
    assert v.validate(b'{"voltage": 500}', "json", "mqtt", "m", NOW)[1][0].reason == "out_of_range"
    assert v.validate(b'{"temperature": -5}', "json", "mqtt", "m", NOW)[1][0].reason == "out_of_range"


def test_memoryview_input(v):
    data = b'xx{"x": 1}'
    (rec,), _ = v.validate(memoryview(data)[2:], "json", "mqtt", "m", NOW)
    assert rec.fields == {"x": 1.0}


def test_msgpack_string_that_is_not_utf8_is_malformed(v):
    # found by hypothesis: msgspec raises UnicodeDecodeError, not DecodeError, here
    raw = b"\xa4\x00\x00\x00\x80"
    assert v.validate(raw, "msgpack", "mqtt", None, NOW) == ([], [Rejection(
        reason="malformed", raw=raw, detail="payload is not valid MessagePack")])


def test_rejections_of_a_memoryview_keep_bytes(v):
    data = b'xx{"x": "hot"}yy'
    _, (rej,) = v.validate(memoryview(data)[2:-2], "json", "mqtt", "m", NOW)
    assert type(rej.raw) is bytes and rej.raw == b'{"x": "hot"}'
    _, (whole,) = v.validate(memoryview(b'xx{"x": ')[2:], "json", "mqtt", "m", NOW)
    assert whole.reason == "malformed" and type(whole.raw) is bytes and whole.raw == b'{"x": '


def test_validate_into_appends_and_counts(v):
    records, rejections = ["earlier"], []
    n = v.validate_into(b'[{"x": 1}, {"x": "bad"}, {"y": 2}]', "json", "mqtt", "m", NOW, records, rejections)
    assert n == 3
    assert records[0] == "earlier" and [r.fields for r in records[1:]] == [{"x": 1.0}, {"y": 2.0}]
    assert [r.index for r in rejections] == [1]


def test_validate_into_an_ndjson_over_the_batch_limit_appends_only_its_refusal(payload_impl):
    v = payload_impl.Validator(PayloadRules(max_batch_items=2))
    records, rejections = ["earlier"], ["earlier"]
    raw = b'{"x": 1}\n{"x": 2}\n{"x": 3}\n'
    assert v.validate_into(raw, "ndjson", "http", "m", NOW, records, rejections) == 1
    assert records == ["earlier"]
    assert rejections[0] == "earlier" and rejections[1].reason == "too_large" and len(rejections) == 2


def test_a_location_seen_before_gives_equal_tags_in_a_dict_of_its_own(v):
    raw = b'{"x": 1, "location": "sh/fa", "tags": {"vendor": "acme"}}'
    (first,), _ = v.validate(raw, "json", "mqtt", "m", NOW)
    first.tags["site"] = "changed by a consumer"
    (second,), _ = v.validate(raw, "json", "mqtt", "m", NOW)
    assert second.tags == {"region": "sh", "site": "fa", "vendor": "acme"}
    (plain,), _ = v.validate(b'{"x": 1, "location": "sh/fa"}', "json", "mqtt", "m", NOW)
    assert plain.tags == {"region": "sh", "site": "fa"}
    # the tags of one reading never leak into the next one from that place
    _, (conflict,) = v.validate(b'{"x": 1, "location": "sh/fa", "tags": {"region": "bj"}}', "json", "mqtt", "m", NOW)
    assert conflict.reason == "bad_tag" and conflict.field == "tags.region"


def test_many_distinct_locations_and_a_bad_one_seen_twice(v):
    for i in range(2500):               # past the compiled validator's memory of locations
        (rec,), _ = v.validate(b'{"x": 1, "location": "r%d/s"}' % i, "json", "mqtt", "m", NOW)
        assert rec.tags == {"region": f"r{i}", "site": "s"}
    for _ in range(2):
        _, (rej,) = v.validate(b'{"x": 1, "location": "a//b"}', "json", "mqtt", "m", NOW)
        assert rej.reason == "bad_tag"


def test_a_field_given_twice_is_refused_even_when_both_values_are_one_object(v):
    # 100 is a cached small int: the compiled check may not compare values
    _, (rej,) = v.validate(b'{"temperature_mc": 100, "temperature": 0.1}', "json", "mqtt", "m", NOW)
    assert (rej.reason, rej.field, rej.detail) == ("bad_type", "temperature", "field given twice")


def test_field_names_are_checked_every_time_past_those_remembered(v):
    for i in range(5000):               # past the compiled validator's memory of valid names
        (rec,), _ = v.validate(b'{"m%d": 1}' % i, "json", "mqtt", "m", NOW)
        assert rec.fields == {f"m{i}": 1.0}
    for name in (b"m1", b"9bad", b"m4999", b"bad name"):
        records, rejections = v.validate(b'{"%s": 1}' % name, "json", "mqtt", "m", NOW)
        assert bool(records) == (name in (b"m1", b"m4999"))
        assert [r.detail for r in rejections] == ([] if records else ["invalid field name"])


def test_rules_for_unusual_names(payload_impl):
    # The compiled validator looks each key up once in a table built from the
    # rules: a rule must not make a bad name good, and a reserved name is a
    # plain metric (with its rule) inside "metrics".
    rules = PayloadRules(fields={"bad name": FieldRule(max=1), "location": FieldRule(max=10),
                                 "temperature": FieldRule(min=0, max=50)})
    v = payload_impl.Validator(rules)
    for _ in range(2):                   # a second time: from what the first one left behind
        _, (rej,) = v.validate(b'{"bad name": 0}', "json", "mqtt", "m", NOW)
        assert (rej.reason, rej.field, rej.detail) == ("bad_type", "bad name", "invalid field name")
        _, (rej,) = v.validate(b'{"x": 1, "metrics": {"location": 50}}', "json", "mqtt", "m", NOW)
        assert (rej.reason, rej.field) == ("out_of_range", "metrics.location")
        (rec,), _ = v.validate(b'{"location": "a", "metrics": {"location": 5, "device_id": 2, "temperature": 68},'
                               b' "temperature_unit": "F"}', "json", "mqtt", "m", NOW)
        assert rec.fields == {"location": 5.0, "device_id": 2.0, "temperature_mc": 20000}
        assert rec.tags == {"region": "a"}


def test_a_reading_with_many_keys_is_judged_whole(v):
    # past the number of keys whose lookups the compiled first pass keeps
    obj = {f"m{i}": i for i in range(30)} | {"location": "sh", "device_id": "m"}
    (rec,), _ = judge(v, obj)
    assert rec.fields == {f"m{i}": float(i) for i in range(30)} and rec.tags == {"region": "sh"}
    obj["m25"] = "high"
    assert one_rejection(v, obj).field == "m25"
    obj["m25"] = 1
    obj["temperature_unit"] = "F"
    assert one_rejection(v, obj).reason == "bad_unit"


# -- end to end: the reasons a session or a sink produces, as dead letters in the spool --

async def dead_letters(tmp_path) -> list[dict]:
    """``gridgate spool export --rejected`` on the embedded gateway's spool (it
    reads committed rows; a PUBACK means the batch with its dead letters is)."""
    return await trio.to_thread.run_sync(spool_export, tmp_path / "data", True)


def without_received_ns(row: dict, before_ns: int) -> dict:
    """The dead letter minus its receive time, once that is checked to be this test's."""
    received_ns = row.pop("received_ns")
    assert before_ns <= received_ns <= time.time_ns()
    return row


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


async def test_a_publish_over_max_payload_bytes_is_dead_lettered_as_too_large(start_gateway, nursery, tmp_path):
    gateway = await start_gateway(payload=PayloadConfig(max_payload_bytes=64))
    client = await connect_memory(gateway, nursery, "meter-7")
    # a valid reading: only its size is wrong
    payload = b'{"temperature": 21.5, "battery_mv": 3700, "humidity": 40, "location": "shanghai/factory-a"}'
    assert len(payload) == 91
    before = time.time_ns()
    await client.send_all(gen_publish("telemetry", qos=1, mid=4, payload=payload))
    assert await read_exactly(client, 4) == gen_puback(4)      # answered once the dead letter is durable
    (row,) = await dead_letters(tmp_path)
    assert without_received_ns(row, before) == {
        "protocol": "mqtt", "reason": "too_large", "field": None, "index": None, "device_id": "meter-7",
        "detail": "payload of 91 bytes exceeds max_payload_bytes 64", "raw": b64(payload)}
    # the same reading within the limit is stored: the connection stays up and judges each publish alone
    await client.send_all(gen_publish("telemetry", qos=1, mid=5, payload=b'{"humidity": 40}'))
    assert await read_exactly(client, 4) == gen_puback(5)
    stats = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert (stats["records"], stats["rejected"]) == (1, 1)


async def test_a_publish_to_another_topic_is_dead_lettered_as_bad_topic(start_gateway, nursery, tmp_path):
    gateway = await start_gateway()
    client = await connect_memory(gateway, nursery, "meter-7")
    before = time.time_ns()
    # another device's topic: its readings are not this connection's to give
    await client.send_all(gen_publish("devices/meter-8/telemetry", qos=1, mid=3, payload=b'{"humidity": 40}'))
    assert await read_exactly(client, 4) == gen_puback(3)
    (row,) = await dead_letters(tmp_path)
    assert without_received_ns(row, before) == {
        "protocol": "mqtt", "reason": "bad_topic", "field": "topic", "index": None, "device_id": "meter-7",
        "detail": "topic 'devices/meter-8/telemetry' is not 'telemetry' or 'devices/meter-7/telemetry'",
        "raw": b64(b'{"humidity": 40}')}
    # its own topic, long and short, on the same connection: stored, not dead-lettered
    await client.send_all(gen_publish("devices/meter-7/telemetry", qos=1, mid=4, payload=b'{"humidity": 41}')
                          + gen_publish("telemetry", qos=1, mid=5, payload=b'{"humidity": 42}'))
    assert await read_exactly(client, 8) == gen_puback(4) + gen_puback(5)
    stats = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert (stats["records"], stats["rejected"]) == (2, 1)


async def test_a_publish_the_acl_refuses_is_dead_lettered_as_not_authorized(start_gateway, nursery, tmp_path):
    # an ACL and no credential store: anonymous clients, held to what the file grants them
    (tmp_path / "acl").write_text("pattern write devices/%c/telemetry\n")
    gateway = await start_gateway(auth=AuthConfig(acl_file=str(tmp_path / "acl")))
    client = await connect_memory(gateway, nursery, "meter-7")
    before = time.time_ns()
    await client.send_all(gen_publish("telemetry", qos=1, mid=3, payload=b'{"humidity": 40}')
                          + gen_publish("devices/meter-7/telemetry", qos=1, mid=4, payload=b'{"humidity": 41}'))
    assert await read_exactly(client, 8) == gen_puback(3) + gen_puback(4)
    (row,) = await dead_letters(tmp_path)
    assert without_received_ns(row, before) == {
        "protocol": "mqtt", "reason": "not_authorized", "field": "topic", "index": None, "device_id": "meter-7",
        "detail": "topic 'telemetry' is not writable by this client", "raw": b64(b'{"humidity": 40}')}
    stats = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert (stats["records"], stats["rejected"]) == (1, 1)


class PickySink(MemorySink):
    """A custom sink that can never take a record with a field named ``time``
    (as InfluxDB reserves it): it says so the way gridgate.sinks.forwarding
    asks, an error with ``retryable = False`` and the record's ``index``."""

    async def write(self, batch):
        for i, r in enumerate(batch):
            if "time" in r.fields:
                err = ValueError('field "time" is reserved')
                err.index, err.retryable = i, False
                raise err
        await super().write(batch)


async def test_a_record_a_custom_sink_refuses_for_good_is_dead_lettered_as_sink_refused(start_gateway, nursery,
                                                                                         tmp_path):
    sink = PickySink()
    gateway = await start_gateway(sink)
    client = await connect_memory(gateway, nursery, "meter-7")
    before = time.time_ns()
    payload = b'[{"humidity": 40}, {"time": 5}, {"humidity": 41}]'
    await client.send_all(gen_publish("telemetry", qos=1, mid=6, payload=payload))
    assert await read_exactly(client, 4) == gen_puback(6)
    # the sink took the rest of the batch, once; nothing waits to be retried
    assert [r.fields for b in sink.batches for r in b] == [{"humidity": 40.0}, {"humidity": 41.0}]
    assert gateway.forwarder.pending == 0
    (row,) = await dead_letters(tmp_path)
    raw = json.loads(base64.b64decode(row.pop("raw")))
    assert without_received_ns(row, before) == {
        "protocol": "mqtt", "reason": "sink_refused", "field": None, "index": None, "device_id": "meter-7",
        "detail": 'custom: field "time" is reserved'}
    # the raw bytes are the normalized record, as the sink was offered it; without a
    # timestamp of its own, reading 1 of the batch is stamped 1 ns after the receive time
    received_ns = raw.pop("received_ns")
    assert before <= received_ns and raw.pop("ts_ns") == received_ns + 1
    assert raw == {"device_id": "meter-7", "protocol": "mqtt", "fields": {"time": 5.0}, "tags": {}}


# The end-to-end tests above, by the reason each produces.
END_TO_END = {
    "too_large": test_a_publish_over_max_payload_bytes_is_dead_lettered_as_too_large,
    "bad_topic": test_a_publish_to_another_topic_is_dead_lettered_as_bad_topic,
    "not_authorized": test_a_publish_the_acl_refuses_is_dead_lettered_as_not_authorized,
    "sink_refused": test_a_record_a_custom_sink_refuses_for_good_is_dead_lettered_as_sink_refused,
}


def test_every_reason_code_is_produced_by_a_test():
    # the validator's codes by test_each_reason_code (too_large also by
    # test_payload_and_batch_limits), the session's and the sink's by END_TO_END
    assert {r[2] for r in REJECTIONS} | END_TO_END.keys() == set(REASONS)


@pytest.mark.parametrize("value, kept", [
    (2**63 - 1, True), (2**63, False), (-(2**63), True), (-(2**63) - 1, False)])
def test_an_integer_is_kept_exactly_up_to_the_64_bit_range(payload_impl, value, kept):
    v = payload_impl.Validator(PayloadRules(fields={"x": FieldRule(integer=True)}))
    records, rejections = judge(v, {"x": value}, "m")
    if kept:
        assert records[0].fields == {"x": value} and type(records[0].fields["x"]) is int
    else:
        assert rejections[0].reason == "out_of_range" and rejections[0].detail == "integer outside the 64-bit range"


@pytest.mark.parametrize("value, inside", [
    (2**60, True), (2**60 + 1, False), (2**53 + 1, True), (-10, True), (-11, False), (2**64, False)])
def test_an_integer_rule_compares_exactly_past_what_a_double_holds(payload_impl, value, inside):
    # 2**60 + 1 is 2**60 as a double: the bound must be judged on the int itself
    v = payload_impl.Validator(PayloadRules(fields={"x": FieldRule(integer=True, min=-10, max=2**60)}))
    records, rejections = judge(v, {"x": value}, "m")
    assert (records[0].fields["x"] == value) if inside else (rejections[0].reason == "out_of_range")
