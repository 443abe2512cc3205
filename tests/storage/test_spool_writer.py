"""The spool's two batch writers: the compiled one (its own OS thread, no GIL)
and Python's sqlite3 on a worker thread. Both must store the same rows, count
the same, roll a failed batch back whole, and refuse writes at max_bytes."""
from __future__ import annotations

import _sqlite3
import os
import select
import sqlite3

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings, strategies as st

from gridgate import _fastparse  # the compiled variant: fail loudly if it is not built
from gridgate.ingest.records import Record, Rejection
from gridgate.sinks.base import SinkFullError
from gridgate.storage.spool import Spool, SpoolSink, record_rows, rejection_rows

WRITERS = ["compiled", "thread"]


def record(i: int, device_id: str | None = None) -> Record:
    return Record(device_id=device_id or f"meter-{i % 7}", ts_ns=1_700_000_000_000_000_000 + i, received_ns=i,
                  protocol="mqtt", fields={"temperature_mc": i, "ratio": i / 3}, tags={"site": f"s{i % 3}", "ü": "ß"})


def rejection(i: int) -> tuple[str, int, Rejection]:
    if i % 2:
        return "http", 10 + i, Rejection(reason="out_of_range", field="temperature", index=i, device_id="meter-1",
                                         raw=b"\x00{\xff}", detail=f"#{i} ✓")
    return "mqtt", 10 + i, Rejection(reason="malformed", raw=b"", detail=f"#{i}")   # NULL field, idx, device_id


async def open_sink(path, writer: str, **kw) -> SpoolSink:
    sink = await SpoolSink.open(path, native=writer == "compiled", **kw)
    assert (sink.writer_description == "spool writer: compiled, own thread") == (writer == "compiled")
    return sink


def contents(path) -> tuple[list, list, dict]:
    spool = Spool(path, readonly=True)
    try:
        stats = spool.stats()
        del stats["bytes"]
        return list(spool.iter_records()), list(spool.iter_rejections()), stats
    finally:
        spool.close()


def refuse_device_boom(path) -> None:
    """A spool whose records table refuses device 'boom': a failing batch on demand."""
    setup = Spool(path)
    setup.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON records WHEN NEW.device_id = 'boom' "
                     "BEGIN SELECT RAISE(ABORT, 'boom refused'); END")
    setup.close()


async def test_both_writers_store_the_same_rows(tmp_path):
    # 300 records and 70 rejections: the compiled writer's many-row INSERTs, then its one-row tail
    batches = [([record(i) for i in range(n)], [rejection(i) for i in range(n % 5)]) for n in (1, 7, 300, 0)]
    batches[-1] = ([], [rejection(1)])
    batches.append(([record(i) for i in range(400, 465)], [rejection(i) for i in range(70)]))
    edge = Record(device_id="x" * 128, ts_ns=2 ** 63 - 1, received_ns=-(2 ** 63), protocol="ws", fields={},
                  tags={})

    for writer in WRITERS:
        sink = await open_sink(tmp_path / writer, writer)
        for records, dead in batches:
            await sink.write_batch(records, dead)
        await sink.write_batch([edge], [])
        await sink.write_batch([record(1000), record(1001)], [rejection(3)], pending=True)
        await sink.write_batch([record(i) for i in range(2000, 2040)], [], pending=True)
        await sink.aclose()
    compiled, thread = contents(tmp_path / "compiled"), contents(tmp_path / "thread")
    assert compiled == thread
    records, rejections, stats = compiled
    assert stats == {"records": 309 + 65, "rejected": 1 + 2 + 0 + 1 + 70 + 1, "pending": 2 + 40}
    assert records[-1]["ts_ns"] == 2 ** 63 - 1 and records[-1]["received_ns"] == -(2 ** 63)
    assert records[0]["tags"] == {"site": "s0", "ü": "ß"}
    assert rejections[0] == {"received_ns": 10, "protocol": "mqtt", "reason": "malformed", "field": None,
                             "index": None, "device_id": None, "detail": "#0", "raw": ""}


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_failing_batch_is_rolled_back_whole_and_the_next_one_is_written(tmp_path, writer):
    refuse_device_boom(tmp_path)
    sink = await open_sink(tmp_path, writer)
    await sink.write_batch([record(0)], [])
    with pytest.raises(sqlite3.IntegrityError, match="boom refused"):     # what Python's sqlite3 raises
        await sink.write_batch([record(1), record(2), record(3, "boom"), record(4)], [rejection(1)])
    # refused inside one of the compiled writer's many-row INSERTs
    with pytest.raises(sqlite3.IntegrityError, match="boom refused"):
        await sink.write_batch([record(i, "boom" if i == 140 else None) for i in range(100, 200)],
                               [rejection(i) for i in range(40)])
    await sink.write_batch([record(5)], [rejection(2)])
    await sink.aclose()
    records, rejections, stats = contents(tmp_path)
    assert [r["received_ns"] for r in records] == [0, 5]
    assert [r["detail"] for r in rejections] == ["#2"]
    assert stats == {"records": 2, "rejected": 1, "pending": 0}


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_full_spool_refuses_writes(tmp_path, writer):
    sink = await open_sink(tmp_path, writer, max_bytes=256 * 1024)
    assert sink.accepting_writes()
    await sink.write_batch([record(i) for i in range(3000)], [], pending=True)      # ~ 600 KB
    assert not sink.accepting_writes()
    with pytest.raises(SinkFullError, match="is full"):
        await sink.write_batch([record(1)], [rejection(1)])
    assert not sink.accepting_writes()
    await sink.aclose()
    assert contents(tmp_path)[2] == {"records": 0, "rejected": 0, "pending": 3000}


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_writer_task_cancelled_mid_write_still_finishes_the_batch(tmp_path, writer):
    sink = await open_sink(tmp_path, writer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.write_batch, [record(i) for i in range(5000)], [])
        await trio.testing.wait_all_tasks_blocked()     # handed over, waiting for the writer
        nursery.cancel_scope.cancel()
    await sink.write_batch([record(5000)], [])
    await sink.aclose()
    assert [r["received_ns"] for r in contents(tmp_path)[0]] == list(range(5001))


@pytest.mark.parametrize("writer", WRITERS)
async def test_on_commit_runs_once_when_the_batch_is_durable_and_never_for_a_failed_one(tmp_path, writer):
    refuse_device_boom(tmp_path)
    seen: list[int] = []

    def on_commit() -> None:
        seen.append(len(contents(tmp_path)[0]))     # what another reader of the file sees by then

    sink = await open_sink(tmp_path, writer)
    await sink.write_batch([record(i) for i in range(50)], [], on_commit=on_commit)
    assert seen == [50]
    with pytest.raises(sqlite3.IntegrityError, match="boom refused"):
        await sink.write_batch([record(1, "boom")], [], on_commit=on_commit)
    assert seen == [50]
    await sink.write_batch([], [], on_commit=on_commit)        # nothing to write: durable at once
    assert seen == [50, 50]
    await sink.aclose()


class HeldWriteLock:
    """Another connection's write transaction: the writer thread waits on it
    (busy_timeout), so the test decides when the batch can commit."""

    def __init__(self, path) -> None:
        spool = Spool(path)
        spool.close()
        self.db = sqlite3.connect(spool.path, isolation_level=None)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("COMMIT")
        self.db.close()


def _wait_for_writer_thread(sink: SpoolSink) -> None:
    # block the loop (the writing task stays parked) until the thread is done
    while not sink._writer.ready:
        select.select([sink._writer.fileno()], [], [], 10)


async def test_poll_acks_a_compiled_write_before_the_writing_task_runs_again(tmp_path):
    events: list[str] = []

    async def write(records, on_commit) -> None:
        await sink.write_batch(records, [], on_commit=on_commit)
        events.append("returned")

    sink = await open_sink(tmp_path, "compiled")
    sink.poll()                                     # nothing in flight: nothing happens
    lock = HeldWriteLock(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, [record(i) for i in range(300)], lambda: events.append("committed"))
        await trio.testing.wait_all_tasks_blocked()     # handed over; the thread waits for the lock
        sink.poll()
        assert events == []
        lock.release()
        _wait_for_writer_thread(sink)
        sink.poll()                                 # as a session does between its reads
        assert events == ["committed"]
        sink.poll()
        assert events == ["committed"]
    assert events == ["committed", "returned"]
    # the next writes find the writer's signal pipe in order
    for n in range(3):
        await sink.write_batch([record(300 + n)], [], on_commit=lambda: events.append("again"))
    assert events[2:] == ["again"] * 3
    await sink.aclose()
    assert [r["received_ns"] for r in contents(tmp_path)[0]] == list(range(303))


async def test_poll_leaves_a_failed_compiled_write_to_the_writing_task(tmp_path):
    refuse_device_boom(tmp_path)
    committed: list[bool] = []
    sink = await open_sink(tmp_path, "compiled")

    async def write() -> None:
        with pytest.raises(sqlite3.IntegrityError, match="boom refused"):
            await sink.write_batch([record(0), record(1, "boom")], [], on_commit=lambda: committed.append(True))

    lock = HeldWriteLock(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()
        lock.release()
        _wait_for_writer_thread(sink)
        sink.poll()
        assert committed == []
    assert committed == []
    await sink.write_batch([record(2)], [])
    await sink.aclose()
    assert [r["received_ns"] for r in contents(tmp_path)[0]] == [2]


# -- the compiled writer's own contract ------------------------------------------------


def wait_done(writer) -> None:
    while not writer.ready:
        select.select([writer.fileno()], [], [], 10)
        writer.clear_signal()


def test_compiled_writer_refuses_misuse_without_handing_anything_over(tmp_path):
    spool = Spool(tmp_path)
    writer = _fastparse.SpoolWriter(_sqlite3.__file__, str(spool.path), spool.writer_statements())
    with pytest.raises(RuntimeError, match="no batch"):
        writer.finish()
    with pytest.raises(ValueError, match="row 1 has 5 values, not 8"):
        writer.start(record_rows([record(0)]) + [("a", 1, 2, "mqtt", b"{}")], [])
    with pytest.raises(TypeError, match="float is not str, bytes, int or None"):
        writer.start([("a", 1.5, 2, "mqtt", b"{}", b"{}", None, None)], [])
    with pytest.raises(OverflowError, match="int too big to convert"):
        writer.start([("a", 2 ** 64, 2, "mqtt", b"{}", b"{}", None, None)], [])
    assert not writer.busy
    writer.start(record_rows([record(0)]), rejection_rows([rejection(1)]))
    assert writer.busy
    with pytest.raises(RuntimeError, match="still writing"):
        writer.start(record_rows([record(1)]), [])
    wait_done(writer)
    assert writer.finish() == -1                     # not measured
    writer.start(record_rows([record(2)]), [], False, True)
    wait_done(writer)
    assert writer.finish() == spool.used_bytes()
    writer.close()
    writer.close()                                   # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        writer.start([], [])
    assert spool.stats()["records"] == 2
    spool.close()


def test_compiled_writer_closes_after_the_batch_in_hand(tmp_path):
    spool = Spool(tmp_path)
    writer = _fastparse.SpoolWriter(_sqlite3.__file__, str(spool.path), spool.writer_statements())
    writer.start(record_rows([record(i) for i in range(2000)]), [])
    writer.close()                                   # joins the thread: the batch is committed first
    assert spool.stats()["records"] == 2000
    spool.close()


def test_compiled_writer_needs_a_wal_spool_and_a_loaded_sqlite(tmp_path):
    plain = tmp_path / "plain.sqlite3"
    sqlite3.connect(plain).execute("CREATE TABLE t (a)").connection.close()
    spool = Spool(tmp_path / "spool")
    statements = spool.writer_statements()
    with pytest.raises(OSError, match="not in WAL mode"):
        _fastparse.SpoolWriter(_sqlite3.__file__, str(plain), statements)
    with pytest.raises(OSError, match="cannot open"):
        _fastparse.SpoolWriter(_sqlite3.__file__, str(tmp_path / "missing" / "spool.sqlite3"), statements)
    with pytest.raises(RuntimeError, match="already bound"):
        _fastparse.SpoolWriter("/nonexistent/libsqlite3.so", str(plain), statements)
    with pytest.raises(ValueError, match="'insert_rejections' must be SQL with 8 parameters"):
        _fastparse.SpoolWriter(_sqlite3.__file__, str(spool.path),
                               {**statements, "insert_rejections": statements["count_records"]})
    spool.close()


# -- start_records: the rows record_rows makes, built in C ---------------------------------

_INT64 = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)
# keys and values the JSON splitter must not be fooled by: quotes, backslashes, commas, brackets
_TEXT = st.text(alphabet=st.sampled_from('ab,"\\{}[]:ü✓ \u2028'), max_size=6)
_FIELDS = st.dictionaries(_TEXT, st.one_of(_INT64, st.floats(allow_nan=False, allow_infinity=False)), max_size=4)
_TAGS = st.dictionaries(_TEXT, _TEXT, max_size=3)


@st.composite
def _records(draw) -> list[Record]:
    """Records whose tags are often a copy of the previous one's (as the
    validator's per-location tags are) or the very same dict."""
    records: list[Record] = []
    for _ in range(draw(st.integers(min_value=1, max_value=40))):
        how = draw(st.sampled_from(["new", "copy", "same"])) if records else "new"
        tags = draw(_TAGS) if how == "new" else (records[-1].tags.copy() if how == "copy" else records[-1].tags)
        records.append(Record(device_id=draw(_TEXT), ts_ns=draw(_INT64), received_ns=draw(_INT64),
                              protocol=draw(st.sampled_from(["mqtt", "http"])), fields=draw(_FIELDS), tags=tags,
                              traceparent=draw(st.none() | _TEXT), tracestate=draw(st.none() | _TEXT)))
    return records


def _raw_rows(path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT device_id, typeof(device_id), ts_ns, received_ns, protocol, fields, typeof(fields), "
                          "tags, typeof(tags), traceparent, tracestate FROM records ORDER BY id").fetchall()
    finally:
        db.close()


@settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(_records(), min_size=1, max_size=3))
def test_start_records_stores_what_record_rows_makes_byte_for_byte(tmp_path_factory, batches):
    stored = []
    for how in ("rows", "records"):
        spool = Spool(tmp_path_factory.mktemp(how))
        writer = _fastparse.SpoolWriter(_sqlite3.__file__, str(spool.path), spool.writer_statements())
        try:
            for records in batches:
                if how == "rows":
                    writer.start(record_rows(records), [])
                else:
                    writer.start_records(records, [])
                wait_done(writer)
                writer.finish()
        finally:
            writer.close()
        stored.append(_raw_rows(spool.path))
        spool.close()
    assert stored[0] == stored[1]
    assert len(stored[1]) == sum(map(len, batches))


class _OtherRecord(Record):
    """Not a Record itself: read by getattr, not from the slots."""


def test_start_records_takes_rejection_rows_and_any_record_subclass(tmp_path):
    spool = Spool(tmp_path)
    writer = _fastparse.SpoolWriter(_sqlite3.__file__, str(spool.path), spool.writer_statements())
    plain = [record(0), record(1)]
    other = _OtherRecord(device_id="sub", ts_ns=1, received_ns=2, protocol="ws", fields={"a": 1.5}, tags={})
    writer.start_records([*plain, other], rejection_rows([rejection(0), rejection(1)]))
    wait_done(writer)
    writer.finish()
    writer.close()
    stats = spool.stats()
    assert (stats["records"], stats["rejected"]) == (3, 2)
    assert [r["device_id"] for r in spool.iter_records()] == ["meter-0", "meter-1", "sub"]
    assert [r["tags"] for r in spool.iter_records()] == [plain[0].tags, plain[1].tags, {}]
    spool.close()


def test_start_records_refuses_bad_values_without_handing_anything_over(tmp_path):
    spool = Spool(tmp_path)
    writer = _fastparse.SpoolWriter(_sqlite3.__file__, str(spool.path), spool.writer_statements())
    good = record(0)
    with pytest.raises(OverflowError, match="int too big to convert"):
        writer.start_records([good, Record(device_id="a", ts_ns=2 ** 63, received_ns=0, protocol="mqtt", fields={},
                                           tags={})], [])
    with pytest.raises(TypeError, match="row 1 column 2: float is not str, bytes, int or None"):
        writer.start_records([good, Record(device_id="a", ts_ns=1, received_ns=0.5, protocol="mqtt",  # type: ignore[arg-type]
                                           fields={}, tags={})], [])
    with pytest.raises(TypeError):      # a field value msgspec cannot encode
        writer.start_records([Record(device_id="a", ts_ns=1, received_ns=0, protocol="mqtt",
                                     fields={"a": object()}, tags={})], [])  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="row 0 has 2 values, not 8"):
        writer.start_records([good], [("a", 1)])
    assert not writer.busy
    writer.start_records([], [])                      # an empty batch is still a transaction
    wait_done(writer)
    writer.finish()
    writer.close()
    assert spool.stats()["records"] == 0
    spool.close()
