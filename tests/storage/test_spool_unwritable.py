"""A row the spool can never store must not hold the gateway.

Both batch writers fail a whole batch on one such row, and the pipeline
retries a failed write until it succeeds; before gridgate.storage.unwritable,
one bad row (a validator's float key, 537d087) meant no device was acked again.
"""
from __future__ import annotations

import _sqlite3
import base64
import select
import sqlite3

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from gridgate import _fastparse
from gridgate.ingest.pipeline import WorkItem
from gridgate.ingest.records import Record, Rejection
from gridgate.sinks.base import SinkFullError
from gridgate.storage.spool import Spool, SpoolSink, rejection_rows
from gridgate.storage.unwritable import mend, record_fault, rejection_fault
from inprocess import make_config, serving

WRITERS = ["compiled", "thread"]


class Text(str):
    """A str subclass: the compiled writer binds exact types only."""


def record(i: int, **changes) -> Record:
    values = dict(device_id=f"meter-{i}", ts_ns=1_700_000_000_000_000_000 + i, received_ns=i, protocol="mqtt",
                  fields={"temperature_mc": i}, tags={})
    values.update(changes)
    return Record(**values)


def letter(**changes) -> tuple[str, int, Rejection]:
    values = dict(reason="out_of_range", field="temperature", index=0, device_id="meter-1", raw=b"{}", detail="x")
    protocol = changes.pop("protocol", "http")
    received_ns = changes.pop("received_ns", 7)
    values.update(changes)
    return protocol, received_ns, Rejection(**values)


async def open_sink(path, writer: str) -> SpoolSink:
    return await SpoolSink.open(path, native=writer == "compiled")


def contents(path) -> tuple[list, list]:
    spool = Spool(path, readonly=True)
    try:
        return list(spool.iter_records()), list(spool.iter_rejections())
    finally:
        spool.close()


@pytest.mark.parametrize(("bad", "fault"), [
    (dict(fields={"a": object()}), "fields: "),
    (dict(ts_ns=2 ** 63), "ts_ns: an integer beyond 64 bits"),
    (dict(received_ns=0.5), "received_ns: a float"),
    (dict(device_id=None), "device_id: NULL in a NOT NULL column"),
    (dict(device_id=True), "device_id: a bool"),
    (dict(protocol=Text("mqtt")), "protocol: a Text"),
    (dict(tracestate="a\ud800"), "tracestate: text that is not valid UTF-8"),
])
def test_record_fault_names_the_column_and_why(bad, fault):
    assert record_fault(record(1)) is None
    assert record_fault(record(1, **bad)).startswith(fault)


@pytest.mark.parametrize(("bad", "fault"), [
    (dict(field=1.5), "field: a float"),
    (dict(field=float("nan")), "field: a float"),
    (dict(reason=None), "reason: NULL in a NOT NULL column"),
    (dict(index=-2 ** 63 - 1), "index: an integer beyond 64 bits"),
    (dict(detail="\udcff"), "detail: text that is not valid UTF-8"),
    (dict(raw=object()), "raw: a object, not bytes"),
    (dict(raw=2_558_741_755), "raw: a int, not bytes"),     # bytes() of it: 2.5 GB of zeros
    (dict(raw="text"), "raw: a str, not bytes"),
    (dict(received_ns=None), "received_ns: NULL in a NOT NULL column"),
])
def test_rejection_fault_names_the_column_and_why(bad, fault):
    assert rejection_fault(*letter()) is None
    assert rejection_fault(*letter(**bad)).startswith(fault)


def test_a_dead_letter_is_made_storable_without_turning_an_int_into_zero_bytes():
    mended = mend([], [letter(raw=2_558_741_755, detail="d" * (2 << 20))])
    (_, _, made), = mended.dead
    assert made.raw == b"2558741755"
    assert made.detail.startswith("d" * 1000) and len(made.detail) < (1 << 20) + 200
    assert made.detail.endswith("[stored with its values made text: raw: a int, not bytes; detail cut to its "
                                "first 1048576 characters]")
    assert rejection_fault("http", 7, made) is None


def test_the_rules_name_the_spools_columns_and_its_not_null_ones():
    """unwritable cannot import the spool (the spool imports it): its copies of
    the column order and of which columns are NOT NULL must match the schema."""
    from gridgate.storage import spool, unwritable
    assert unwritable._RECORD_COLUMNS == spool._ROW_COLUMNS
    assert unwritable._REJECTION_COLUMNS == tuple("index" if c == "idx" else c for c in spool._REJECTION_COLUMNS)
    conn = sqlite3.connect(":memory:")
    conn.executescript(spool._SCHEMA)
    for table, columns, nullable in (("records", spool._ROW_COLUMNS, unwritable._RECORD_NULLABLE),
                                     ("pending", spool._ROW_COLUMNS, unwritable._RECORD_NULLABLE),
                                     ("rejections", spool._REJECTION_COLUMNS, unwritable._REJECTION_NULLABLE)):
        notnull = {name: bool(nn) for _, name, _, nn, *_ in conn.execute(f"PRAGMA table_info({table})")}
        assert tuple(not notnull[c] for c in columns) == nullable, table
    conn.close()


def test_a_batch_of_storable_rows_is_not_mended():
    assert mend([record(1), record(2)], [letter(raw=bytearray(b"ok"))]) is None


@pytest.mark.parametrize("writer", WRITERS)
async def test_unstorable_rows_are_mended_and_the_rest_of_the_batch_is_written(tmp_path, writer):
    sink = await open_sink(tmp_path, writer)
    refused: list[str] = []
    sink.on_refused = refused.append
    commits: list[int] = []
    records = [record(0), record(1, fields={"a": object()}), record(2), record(3, ts_ns=2 ** 63)]
    dead = [letter(field=1.5, detail="over \udcff"), letter(reason="malformed", field=None, index=None, raw=b"\xff")]
    await sink.write_batch(records, dead, on_commit=lambda: commits.append(1))
    assert commits == [1]
    assert refused == ["mqtt", "mqtt"]
    # the next batch is written as any other
    await sink.write_batch([record(4)], [])
    await sink.aclose()
    stored, rejections = contents(tmp_path)
    assert [r["device_id"] for r in stored] == ["meter-0", "meter-2", "meter-4"]
    by_reason = {}
    for r in rejections:
        by_reason.setdefault(r["reason"], []).append(r)
    refusals = by_reason["sink_refused"]
    assert [r["device_id"] for r in refusals] == ["meter-1", "meter-3"]
    assert all(r["protocol"] == "mqtt" for r in refusals)
    assert "the spool cannot store this reading: fields: " in refusals[0]["detail"]
    assert "ts_ns: an integer beyond 64 bits" in refusals[1]["detail"]
    assert b"9223372036854775808" in base64.b64decode(refusals[1]["raw"])   # what could be told of it is kept
    (made_text,) = by_reason["out_of_range"]
    assert made_text["field"] == "1.5"
    assert made_text["detail"].startswith("over \\udcff [stored with its values made text: field: a float")
    (kept,) = by_reason["malformed"]                          # a storable dead letter is kept as it was
    assert (kept["field"], base64.b64decode(kept["raw"]), kept["detail"]) == (None, b"\xff", "x")


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_failure_that_is_not_the_rows_is_raised_for_the_caller_to_retry(tmp_path, writer):
    setup = Spool(tmp_path)
    setup.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON records WHEN NEW.device_id = 'boom' "
                     "BEGIN SELECT RAISE(ABORT, 'boom refused'); END")
    setup.close()
    sink = await open_sink(tmp_path, writer)
    with pytest.raises(Exception, match="boom refused"):
        await sink.write_batch([record(0), record(1, device_id="boom")], [])
    await sink.aclose()
    assert contents(tmp_path) == ([], [])


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_full_spool_is_not_mended_around(tmp_path, writer):
    sink = await SpoolSink.open(tmp_path, max_bytes=1, native=writer == "compiled")
    with pytest.raises(SinkFullError):
        await sink.write_batch([record(0), record(1, fields={"a": object()})], [])
    await sink.aclose()


# -- every batch mend returns is one both writers store ---------------------------------

_junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True), st.text(max_size=6), st.binary(max_size=6),
    st.builds(Text, st.text(max_size=3)), st.just("\ud800"), st.just(bytearray(b"ba")), st.just(object()),
)


def _maybe(ok):
    return st.one_of(ok, _junk)


_records = st.builds(
    Record, device_id=_maybe(st.text(max_size=5)), ts_ns=_maybe(st.integers(0, 2 ** 62)),
    received_ns=_maybe(st.integers(0, 2 ** 62)), protocol=_maybe(st.sampled_from(["mqtt", "http"])),
    fields=st.one_of(st.dictionaries(st.text(max_size=3), st.integers(-5, 5), max_size=2),
                     st.dictionaries(st.text(max_size=3), _junk, max_size=2)),
    tags=st.one_of(st.just({}), st.dictionaries(st.text(max_size=3), _junk, max_size=2)),
    traceparent=_maybe(st.none()), tracestate=_maybe(st.none()))
_letters = st.tuples(
    _maybe(st.just("http")), _maybe(st.integers(0, 2 ** 62)),
    st.builds(Rejection, reason=_maybe(st.just("malformed")), field=_maybe(st.none()), index=_maybe(st.none()),
              device_id=_maybe(st.none()), raw=_maybe(st.binary(max_size=4)), detail=_maybe(st.just(""))))


def _write_compiled(spool: Spool, records: list, dead: list) -> None:
    writer = _fastparse.SpoolWriter(_sqlite3.__file__, str(spool.path), spool.writer_statements())
    try:
        writer.start_records(records, rejection_rows(dead))
        select.select([writer.fileno()], [], [], 10)
        writer.finish()
    finally:
        writer.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_records, max_size=4), dead=st.lists(_letters, max_size=3))
def test_whatever_the_rows_hold_mend_leaves_a_batch_both_writers_store(tmp_path_factory, records, dead):
    mended = mend(records, dead)
    if mended is not None:
        records, dead = mended.records, mended.dead
    for write in (_write_compiled, lambda spool, r, d: spool.write_batch(r, d)):
        path = tmp_path_factory.mktemp("spool")
        spool = Spool(path)
        try:
            write(spool, records, dead)
            stats = spool.stats()
            assert (stats["records"], stats["rejected"]) == (len(records), len(dead))
        finally:
            spool.close()


async def test_a_gateway_keeps_acking_after_a_reading_the_spool_cannot_store(tmp_path):
    """As the gateway runs it: an item with an unstorable record (a validator bug) is
    acked as a dead letter and counted, and the pipeline goes on."""
    config = make_config(tmp_path)
    async with serving(config) as (gateway, _):
        acked: list[str] = []
        both = trio.Event()

        def ack(name: str):
            def on_durable() -> None:
                acked.append(name)
                if len(acked) == 2:
                    both.set()
            return on_durable

        bad = record(1, fields={1.5: object()})
        await gateway.pipeline.submit(WorkItem([record(0), bad], [], "mqtt", 1, ack("first")))
        await gateway.pipeline.submit(WorkItem([record(2)], [], "http", 2, ack("second")))
        with trio.fail_after(10):
            await both.wait()
        assert acked == ["first", "second"]
        sample = gateway.metrics.registry.get_sample_value
        assert sample("gridgate_readings_rejected_total", {"protocol": "mqtt", "reason": "sink_refused"}) == 1
    stored, rejections = contents(tmp_path / "data")
    assert [r["device_id"] for r in stored] == ["meter-0", "meter-2"]
    assert [(r["reason"], r["device_id"]) for r in rejections] == [("sink_refused", "meter-1")]
