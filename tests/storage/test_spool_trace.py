"""The trace context on spooled records (schema version 3): both batch
writers store a record's traceparent and tracestate in the records and
pending tables, a version 2 file is upgraded in place with its rows kept,
and a read-only look at a version 2 file still exports its records."""
from __future__ import annotations

import sqlite3

import pytest

from gridgate import _fastparse  # noqa: F401  # the compiled writer: fail loudly if it is not built
from gridgate.ingest.records import Record
from gridgate.storage.spool import SCHEMA_VERSION, SPOOL_FILE, Spool, SpoolSink

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def record(i: int, traceparent: str | None = None, tracestate: str | None = None) -> Record:
    return Record(device_id="meter-1", ts_ns=1_700_000_000_000_000_000 + i, received_ns=i, protocol="mqtt",
                  fields={"n": i}, tags={}, traceparent=traceparent, tracestate=tracestate)


# The version 2 schema as gridgate wrote it before the trace columns.
_V2_RECORD_COLUMNS = """id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, ts_ns INTEGER NOT NULL,
    received_ns INTEGER NOT NULL, protocol TEXT NOT NULL, fields TEXT NOT NULL, tags TEXT NOT NULL"""
_V2 = f"""
CREATE TABLE records ({_V2_RECORD_COLUMNS});
CREATE TABLE rejections (id INTEGER PRIMARY KEY, received_ns INTEGER NOT NULL, protocol TEXT NOT NULL,
    reason TEXT NOT NULL, field TEXT, idx INTEGER, device_id TEXT, detail TEXT NOT NULL, raw BLOB NOT NULL);
CREATE TABLE counters (id INTEGER PRIMARY KEY CHECK (id = 1), records INTEGER NOT NULL, rejected INTEGER NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0);
INSERT INTO counters (id, records, rejected, pending) VALUES (1, 1, 0, 1);
CREATE TABLE pending ({_V2_RECORD_COLUMNS});
INSERT INTO records (device_id, ts_ns, received_ns, protocol, fields, tags)
    VALUES ('old-1', 5, 6, 'mqtt', '{{"n":1}}', '{{}}');
INSERT INTO pending (device_id, ts_ns, received_ns, protocol, fields, tags)
    VALUES ('old-2', 7, 8, 'http', '{{"n":2}}', '{{"site":"a"}}');
PRAGMA user_version=2;
"""


def make_v2(path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path / SPOOL_FILE)
    db.executescript(_V2)
    db.close()


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "thread"])
async def test_both_writers_keep_the_trace_context(tmp_path, native):
    sink = await SpoolSink.open(tmp_path, native=native)
    assert sink.writer_description.startswith("spool writer: compiled") == native
    await sink.write_batch([record(1, TRACEPARENT, TRACESTATE), record(2), record(3, TRACEPARENT)], [])
    await sink.write_batch([record(4, TRACEPARENT, TRACESTATE)], [], pending=True)
    await sink.aclose()
    spool = Spool(tmp_path)
    try:
        rows = list(spool.iter_records())
        assert [(r.get("traceparent"), r.get("tracestate")) for r in rows] == [
            (TRACEPARENT, TRACESTATE), (None, None), (TRACEPARENT, None)]
        assert "traceparent" not in rows[1] and "tracestate" not in rows[1]     # export as before without one
        _, pending = spool.read_pending(10)
        assert pending == [record(4, TRACEPARENT, TRACESTATE)]
    finally:
        spool.close()


def test_a_version_2_spool_is_upgraded_in_place_with_its_rows(tmp_path):
    make_v2(tmp_path)
    spool = Spool(tmp_path)
    try:
        assert spool.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert list(spool.iter_records()) == [{"device_id": "old-1", "ts_ns": 5, "received_ns": 6, "protocol": "mqtt",
                                               "fields": {"n": 1}, "tags": {}}]
        _, pending = spool.read_pending(10)
        assert pending == [Record(device_id="old-2", ts_ns=7, received_ns=8, protocol="http", fields={"n": 2},
                                  tags={"site": "a"})]
        spool.write_batch([record(9, TRACEPARENT)], [])
        assert [r.get("traceparent") for r in spool.iter_records()] == [None, TRACEPARENT]
        assert spool.stats()["records"] == 2
    finally:
        spool.close()
    Spool(tmp_path).close()              # opening an upgraded file again changes nothing


def test_a_read_only_look_at_a_version_2_spool_exports_its_records(tmp_path):
    make_v2(tmp_path)
    spool = Spool(tmp_path, readonly=True)
    try:
        assert [r["device_id"] for r in spool.iter_records()] == ["old-1"]
    finally:
        spool.close()
    db = sqlite3.connect(tmp_path / SPOOL_FILE)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2          # untouched
    db.close()
