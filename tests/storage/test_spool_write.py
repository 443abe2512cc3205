"""Spool batch writes: many rows per INSERT statement (MultiRowInsert), and
every row stored once, in order, whatever the batch size."""
from __future__ import annotations

import sqlite3

import pytest

from gridgate.ingest.records import Record, Rejection
from gridgate.storage.spool import MultiRowInsert, Spool


def record(i: int) -> Record:
    return Record(device_id=f"meter-{i % 7}", ts_ns=1_700_000_000_000_000_000 + i, received_ns=i, protocol="mqtt",
                  fields={"temperature_mc": i, "humidity": i / 2}, tags={"site": f"s{i % 3}"})


@pytest.mark.parametrize("n", [1, 2, 3, 255, 256, 257, 1000, 1023])
def test_a_batch_of_any_size_is_stored_once_in_order(tmp_path, n):
    spool = Spool(tmp_path)
    dead = [("http", 5, Rejection(reason="out_of_range", field="temperature", index=i, device_id="meter-1",
                                  raw=b"{}", detail=f"#{i}")) for i in range(n % 300)]
    spool.write_batch([record(i) for i in range(n)], dead)
    stored = list(spool.iter_records())
    assert [r["received_ns"] for r in stored] == list(range(n))
    assert stored[-1]["fields"] == {"temperature_mc": n - 1, "humidity": (n - 1) / 2}
    assert [r["detail"] for r in spool.iter_rejections()] == [f"#{i}" for i in range(n % 300)]
    assert spool.stats()["records"] == n and spool.stats()["rejected"] == n % 300
    spool.close()


def test_statements_use_power_of_two_row_counts_under_the_variable_limit():
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("CREATE TABLE t (a, b, c)")
    insert = MultiRowInsert("t", ("a", "b", "c"), max_variables=100)   # 33 rows fit: 32 per statement
    assert insert.max_rows == 32
    seen: list[str] = []
    db.set_trace_callback(seen.append)
    insert.run(db, [(i, i, i) for i in range(45)])                     # 32 + 8 + 4 + 1
    inserts = [sql for sql in seen if sql.startswith("INSERT")]     # traced with the values filled in
    assert [sql.count("), (") + 1 for sql in inserts] == [32, 8, 4, 1]
    assert [row[0] for row in db.execute("SELECT a FROM t ORDER BY rowid")] == list(range(45))
