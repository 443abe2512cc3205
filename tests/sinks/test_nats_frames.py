"""The JetStream sink's one-reading messages: the compiled
``_fastparse.nats_build_frames`` and its twin ``nats_frames_py.build_frames``
build the same bytes, and those are the frame the sink's reference helpers
(msg_id, encode_record, the header block) describe."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

import gridgate.sinks.nats as nats_sink
from gridgate import _fastparse
from gridgate.ingest.records import Record
from gridgate.sinks.nats import SubjectTemplate, _header_block, encode_record, msg_id
from gridgate.sinks.nats_frames_py import build_frames as build_py

BUILDS = {"compiled": _fastparse.nats_build_frames, "python": build_py}
TEMPLATE = SubjectTemplate("telemetry.{region}.{device_id}")
PREFIX = b"_INBOX.abc."
TAIL = b"\r\nNats-Expected-Stream: TELEMETRY\r\n\r\n"


def build(fn, records, start=0, stop=None, head_of=None):
    sizes: list[int] = []
    heads: list[bytes] = []
    tails: list[bytes] = []
    head_of = {} if head_of is None else head_of
    end = fn(records, start, len(records) if stop is None else stop, TEMPLATE.render, head_of, PREFIX, TAIL,
             nats_sink._id_encoder.encode, nats_sink._payload_encoder.encode, nats_sink._blake2b_96.copy,
             nats_sink._token_bytes, sizes, heads, tails)
    return end, sizes, heads, tails, head_of


def reference_frame(r: Record, slot: bytes) -> bytes:
    hdr = _header_block(msg_id(r), TAIL, None, r)
    payload = encode_record(r)
    return b"HPUB %b %b%b %d %d\r\n%b%b\r\n" % (TEMPLATE.render(r).encode(), PREFIX, slot, len(hdr),
                                                 len(hdr) + len(payload), hdr, payload)


def rec(device_id="dev-1", ts_ns=1_700_000_000_000_000_000, traceparent=None, **tags) -> Record:
    return Record(device_id=device_id, ts_ns=ts_ns, received_ns=1, protocol="mqtt",
                  fields={"temperature": 21.5, "battery_mv": 3700}, tags={"region": "eu", **tags},
                  traceparent=traceparent)


@pytest.fixture(params=sorted(BUILDS))
def fn(request):
    return BUILDS[request.param]


def test_each_record_gets_its_frame_parts(fn):
    records = [rec(), rec("dev 2/ü", -5), rec("dev-1", 0), rec("x" * 300, 2**63 - 1), rec("y", -2**63)]
    end, sizes, heads, tails, head_of = build(fn, records)
    assert end == len(records)
    for r, size, head, tail in zip(records, sizes, heads, tails, strict=True):
        frame = head + b"17" + tail
        assert frame == reference_frame(r, b"17")
        assert size == len(tail) - len(b"\r\n") - len(tail.split(b"\r\n", 1)[0]) - 2
    assert head_of == {TEMPLATE.render(r): b"HPUB %b %b" % (TEMPLATE.render(r).encode(), PREFIX) for r in records}
    assert heads[0] is heads[2]                  # one head per subject


def test_a_trace_context_or_a_ts_beyond_int64_stops_the_build_there(fn):
    records = [rec(), rec(ts_ns=3), rec(traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"), rec(ts_ns=4),
               rec(ts_ns=2**63), rec(ts_ns=-2**63 - 1)]
    assert build(fn, records)[0] == 2
    assert build(fn, records, 3)[0] == 4
    assert build(fn, records, 5)[0] == 5
    end, sizes, heads, tails, _ = build(fn, records, 0, 1)
    assert end == 1 and len(sizes) == len(heads) == len(tails) == 1


def test_a_range_outside_the_records_is_refused(fn):
    for start, stop in ((-1, 1), (2, 1), (0, 3)):
        with pytest.raises(ValueError):
            build(fn, [rec(), rec()], start, stop)


_records = st.builds(
    Record, device_id=st.text(max_size=40), ts_ns=st.integers(-2**64, 2**64), received_ns=st.integers(0, 2**62),
    protocol=st.sampled_from(["mqtt", "http"]),
    fields=st.dictionaries(st.text(max_size=10), st.one_of(st.integers(-2**63, 2**64 - 1), st.floats()),
                           max_size=4),
    tags=st.dictionaries(st.sampled_from(["region", "site", "zone", "x"]), st.text(max_size=10), max_size=4),
    traceparent=st.one_of(st.none(), st.just("00-" + "a" * 32 + "-" + "b" * 16 + "-01")))


@settings(max_examples=300, deadline=None)
@given(st.lists(_records, max_size=6), st.data())
def test_compiled_and_python_agree_on_arbitrary_records(records, data):
    start = data.draw(st.integers(0, len(records)), label="start")
    stop = data.draw(st.integers(start, len(records)), label="stop")
    shared = {"telemetry._.x": b"HPUB telemetry._.x cached "}
    results = {name: build(fn, records, start, stop, dict(shared)) for name, fn in BUILDS.items()}
    assert results["compiled"] == results["python"]
    end, _, heads, tails, _ = results["python"]
    for r, head, tail in zip(records[start:end], heads, tails, strict=True):
        if head != shared.get(TEMPLATE.render(r)):
            assert head + b"3" + tail == reference_frame(r, b"3")


def test_the_sink_uses_the_compiled_build_when_the_extension_is_loaded():
    assert nats_sink._build_frames is _fastparse.nats_build_frames
