"""The spool: SQLite in WAL mode, the default sink and the dead-letter store.

Durable means committed here: with ``synchronous=NORMAL`` a commit survives
the gateway being killed; ``fsync = true`` (``synchronous=FULL``) extends that
to power loss. One transaction per batch holds both its records and its
rejections, and a counters row kept in the same transaction makes
``stats()`` O(1) however large the tables grow.

Store-and-forward (schema version 2): with an external sink (InfluxDB,
NATS, a custom one), a batch the sink cannot take now is written to the
``pending`` table instead - durably, so it is acknowledged - and the
replayer (gridgate.sinks.forwarding) sends it on later, oldest first, deleting
what the sink confirmed. The counters row counts pending rows too.
Version 1 and 2 files are upgraded in place (3 added the trace context
columns of records and pending).
"""
from __future__ import annotations

import base64
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

import msgspec
import trio

from gridgate.ingest.records import Record, Rejection
from gridgate.sinks.base import SinkFullError
from gridgate.storage.unwritable import Mended, mend

if TYPE_CHECKING:
    from gridgate._fastparse import SpoolWriter

__all__ = ["Spool", "SpoolSink", "SPOOL_FILE"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# One row as both writers bind it (sqlite3 here, the compiled SpoolWriter):
# TEXT, BLOB, INTEGER or NULL cells.
Row = tuple[str | bytes | int | None, ...]

SPOOL_FILE = "spool.sqlite3"
SCHEMA_VERSION = 3

# records (the spool sink's own) and pending (bound for an external sink)
# hold the same rows.
_RECORD_COLUMNS = """
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    ts_ns INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    fields TEXT NOT NULL,
    tags TEXT NOT NULL,
    traceparent TEXT,
    tracestate TEXT
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records ({_RECORD_COLUMNS});
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY,
    received_ns INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    reason TEXT NOT NULL,
    field TEXT,
    idx INTEGER,
    device_id TEXT,
    detail TEXT NOT NULL,
    raw BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    records INTEGER NOT NULL,
    rejected INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (id, records, rejected) VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS pending ({_RECORD_COLUMNS});
"""

_ROW_COLUMNS = ("device_id", "ts_ns", "received_ns", "protocol", "fields", "tags", "traceparent", "tracestate")
# Added to records and pending by schema version 3.
_TRACE_COLUMNS = ("traceparent", "tracestate")
# {counter}: records (the spool sink's own) or pending (bound for an external sink)
_COUNT_SQL = "UPDATE counters SET {counter} = {counter} + ?, rejected = rejected + ? WHERE id = 1"
_REJECTION_COLUMNS = ("received_ns", "protocol", "reason", "field", "idx", "device_id", "detail", "raw")


# Rows per many-row INSERT of the compiled writer: a statement per row costs
# a cursor open and a VDBE program run each; 32 rows per statement took
# about a third off SQLite's CPU per row here, and batches under load are a
# few hundred rows, so more would leave most of a batch to the one-row tail.
WRITER_MANY_ROWS = 32


class MultiRowInsert:
    """INSERT of many rows in a few statements of many VALUES rows each.

    Why not ``executemany``: CPython's sqlite3 releases the GIL around every
    row's ``sqlite3_step``, and this runs on a worker thread while the event
    loop thread holds the GIL. Each row then waits for the loop to let go (up
    to the 5 ms switch interval): measured here, 190k rows/s alone fell to
    1k rows/s beside a busy thread, against 16-25k for statements of 200
    rows. Row counts are split into powers of two so that only a handful of
    distinct statements exist, all kept in the connection's statement cache.
    """

    MAX_ROWS = 256

    def __init__(self, table: str, columns: tuple[str, ...], max_variables: int) -> None:
        self._prefix = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
        self._row = "(" + ", ".join("?" * len(columns)) + ")"
        rows = 1
        while rows * 2 <= min(self.MAX_ROWS, max_variables // len(columns)):
            rows *= 2
        self.max_rows = rows
        self._sql: dict[int, str] = {}

    def sql(self, rows: int) -> str:
        sql = self._sql.get(rows)
        if sql is None:
            sql = self._sql[rows] = self._prefix + ", ".join([self._row] * rows)
        return sql

    def run(self, db: sqlite3.Connection, rows: list[Row]) -> None:
        done, n = 0, len(rows)
        while done < n:
            k = self.max_rows
            while k > n - done:
                k //= 2
            db.execute(self.sql(k), list(chain.from_iterable(rows[done:done + k])))
            done += k


_encode = msgspec.json.Encoder().encode
_decode_fields = msgspec.json.Decoder(dict[str, int | float]).decode
_decode_tags = msgspec.json.Decoder(dict[str, str]).decode
_NO_TAGS = _encode({})


def record_rows(records: Sequence[Record]) -> list[Row]:
    """The rows of the records (and pending) table, in _ROW_COLUMNS order."""
    # most readings carry no tags: their "{}" is a constant, not an encode per row
    return [(r.device_id, r.ts_ns, r.received_ns, r.protocol, _encode(r.fields),
             _encode(r.tags) if r.tags else _NO_TAGS, r.traceparent, r.tracestate) for r in records]


def rejection_rows(dead: Sequence[tuple[str, int, Rejection]]) -> list[Row]:
    """The rows of the rejections table, in _REJECTION_COLUMNS order."""
    return [(received_ns, protocol, r.reason, r.field, r.index, r.device_id, r.detail, bytes(r.raw))
            for protocol, received_ns, r in dead]


class Spool:
    """Synchronous access to one spool file; use from one thread at a time."""

    def __init__(self, data_dir: str | os.PathLike[str], *, fsync: bool = False, max_bytes: int = 0,
                 readonly: bool = False) -> None:
        self.dir = Path(data_dir)
        self.path = self.dir / SPOOL_FILE
        self.max_bytes = max_bytes
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no spool in {self.dir}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: spool schema version {version} is newer than this gridgate "
                                   f"understands ({SCHEMA_VERSION})")
            self.db.executescript(_SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(counters)")}
            if "pending" not in columns:            # version 1 -> 2
                self.db.execute("ALTER TABLE counters ADD COLUMN pending INTEGER NOT NULL DEFAULT 0")
            for table in ("records", "pending"):    # version 2 -> 3: NULL in the rows already there
                have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                for column in _TRACE_COLUMNS:
                    if column not in have:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # a read-only open of an older file has no trace columns: read NULLs
        have = {row[1] for row in self.db.execute("PRAGMA table_info(records)")}
        self._trace_select = ", ".join(c if c in have else "NULL" for c in _TRACE_COLUMNS)
        variables = self.db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._insert_records = MultiRowInsert("records", _ROW_COLUMNS, variables)
        self._insert_pending = MultiRowInsert("pending", _ROW_COLUMNS, variables)
        self._insert_rejections = MultiRowInsert("rejections", _REJECTION_COLUMNS, variables)

    # -- writing --------------------------------------------------------------

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    def used_bytes(self) -> int:
        """Bytes in use: pages holding data. Replayed pending rows free
        theirs, which SQLite reuses though the file does not shrink.

        Not the WAL file: in WAL mode ``page_count`` already includes the
        pages written to the WAL and not yet checkpointed, and the WAL file
        itself never shrinks after a checkpoint (SQLite rewrites it from the
        start), so counting its size kept a spool that had been full "full"
        after every pending row was replayed. On disk the WAL adds at most
        about its auto-checkpoint size (1,000 pages) to ``max_bytes``.
        """
        db = self.db
        page_size: int = db.execute("PRAGMA page_size").fetchone()[0]
        pages: int = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * page_size

    def full(self) -> bool:
        return self.max_bytes > 0 and self.used_bytes() >= self.max_bytes

    def check_room(self) -> None:
        """Raises SinkFullError when the spool is at ``max_bytes``."""
        if self.full():
            raise SinkFullError(f"spool {self.path} is full ({self.used_bytes()} bytes in use >= max_bytes "
                                f"{self.max_bytes})")

    def write_batch(self, records: Sequence[Record], dead: Sequence[tuple[str, int, Rejection]],
                    pending: bool = False) -> None:
        """Commit records and dead letters ((protocol, received_ns, rejection)) in one transaction.

        ``pending``: the records are bound for an external sink that cannot
        take them now; they go to the pending table for the replayer.

        Raises:
            SinkFullError: the spool is at ``max_bytes``; nothing was written.
        """
        if not records and not dead:
            return
        self.check_room()
        db = self.db
        db.execute("BEGIN")
        try:
            if records:
                (self._insert_pending if pending else self._insert_records).run(db, record_rows(records))
            if dead:
                self._insert_rejections.run(db, rejection_rows(dead))
            db.execute(_COUNT_SQL.format(counter="pending" if pending else "records"), (len(records), len(dead)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def writer_statements(self) -> dict[str, str]:
        """The SQL of a batch write for the compiled writer: each INSERT of
        one row, and of WRITER_MANY_ROWS rows (fewer if the SQLite build
        allows fewer parameters), which it uses while enough rows remain."""
        many_records = min(WRITER_MANY_ROWS, self._insert_records.max_rows)
        many_rejections = min(WRITER_MANY_ROWS, self._insert_rejections.max_rows)
        return {"insert_records": self._insert_records.sql(1), "insert_pending": self._insert_pending.sql(1),
                "insert_rejections": self._insert_rejections.sql(1),
                "insert_records_many": self._insert_records.sql(many_records),
                "insert_pending_many": self._insert_pending.sql(many_records),
                "insert_rejections_many": self._insert_rejections.sql(many_rejections),
                "count_records": _COUNT_SQL.format(counter="records"),
                "count_pending": _COUNT_SQL.format(counter="pending")}

    def read_pending(self, limit: int) -> tuple[int, list[Record]]:
        """The oldest pending records (at most ``limit``) and the id of the last one (0: none)."""
        rows = self.db.execute(
            "SELECT id, device_id, ts_ns, received_ns, protocol, fields, tags, traceparent, tracestate FROM pending "
            "ORDER BY id LIMIT ?", (limit,)).fetchall()
        records = [Record(device_id=d, ts_ns=ts, received_ns=rx, protocol=p, fields=_decode_fields(f),
                          tags=_decode_tags(t), traceparent=tp, tracestate=ts_)
                   for _, d, ts, rx, p, f, t, tp, ts_ in rows]
        return (rows[-1][0] if rows else 0), records

    def delete_pending(self, upto_id: int, count: int) -> None:
        """Forget pending rows up to ``upto_id`` (the sink has them)."""
        db = self.db
        db.execute("BEGIN")
        try:
            db.execute("DELETE FROM pending WHERE id <= ?", (upto_id,))
            db.execute("UPDATE counters SET pending = pending - ? WHERE id = 1", (count,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def pending_count(self) -> int:
        pending: int = self.db.execute("SELECT pending FROM counters WHERE id = 1").fetchone()[0]
        return pending

    # -- reading ----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(counters)")}
        if "pending" in columns:
            row = self.db.execute("SELECT records, rejected, pending FROM counters WHERE id = 1").fetchone()
        else:                                       # a version 1 file opened read-only
            row = self.db.execute("SELECT records, rejected, 0 FROM counters WHERE id = 1").fetchone()
        records, rejected, pending = row if row else (0, 0, 0)
        return {"records": records, "rejected": rejected, "pending": pending, "bytes": self.size_bytes()}

    def iter_records(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Each record as a dict (the keys of Record; the trace context only where the device sent one)."""
        cur = self.db.execute(
            f"SELECT device_id, ts_ns, received_ns, protocol, fields, tags, {self._trace_select} FROM records "
            "ORDER BY id LIMIT ?", (-1 if limit is None else limit,))
        for device_id, ts_ns, received_ns, protocol, fields, tags, traceparent, tracestate in cur:
            row = {"device_id": device_id, "ts_ns": ts_ns, "received_ns": received_ns, "protocol": protocol,
                   "fields": _decode_fields(fields), "tags": _decode_tags(tags)}
            if traceparent is not None:
                row["traceparent"] = traceparent
            if tracestate is not None:
                row["tracestate"] = tracestate
            yield row

    def iter_rejections(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT received_ns, protocol, reason, field, idx, device_id, detail, raw FROM rejections "
            "ORDER BY id LIMIT ?", (-1 if limit is None else limit,))
        for received_ns, protocol, reason, field, idx, device_id, detail, raw in cur:
            yield {"received_ns": received_ns, "protocol": protocol, "reason": reason, "field": field,
                   "index": idx, "device_id": device_id, "detail": detail,
                   "raw": base64.b64encode(raw).decode("ascii")}

    def close(self) -> None:
        self.db.close()


def open_native_writer(spool: Spool, fsync: bool) -> tuple[SpoolWriter | None, str]:
    """The compiled batch writer for this spool file, or None, and a line saying which writer is used.

    Needs the compiled hot path (gridgate.hotpath) and a Python whose sqlite3
    module exposes its SQLite to dlsym; otherwise batches are committed by
    Spool.write_batch on a worker thread, as correct and slower under load.
    """
    from gridgate import hotpath

    if not hotpath.COMPILED:
        return None, "spool writer: worker thread (compiled hot path not loaded)"
    import _sqlite3

    assert hotpath.spool is not None        # set with COMPILED
    try:
        writer: SpoolWriter = hotpath.spool.SpoolWriter(_sqlite3.__file__, str(spool.path),
                                                        spool.writer_statements(), fsync)
    except OSError as exc:
        return None, f"spool writer: worker thread (compiled writer unavailable: {exc})"
    return writer, "spool writer: compiled, own thread"


class SpoolSink:
    """The spool for Trio, off the event loop thread.

    Batches of records and dead letters go to the compiled writer
    (``open_native_writer``), which commits on its own OS thread without the
    GIL while the loop waits on its pipe. Everything else, and every write
    when that writer is unavailable, runs on a worker thread. A
    CapacityLimiter of 1 keeps it all one operation at a time.
    """

    def __init__(self, spool: Spool, writer: SpoolWriter | None = None, writer_description: str = "") -> None:
        self.spool = spool
        self._writer = writer
        self.writer_description = writer_description or "spool writer: worker thread"
        self._limiter = trio.CapacityLimiter(1)
        self._full = False
        # The compiled write in flight: whoever sees it done first (the
        # writing task, or a session calling poll() between its reads)
        # finishes it and runs its on_commit.
        self._in_flight = False
        self._on_commit: Callable[[], None] | None = None
        self._outcome: BaseException | None = None
        # Called with a record's protocol for each record the spool could
        # never store and kept as a sink_refused dead letter (the gateway
        # counts them as rejected).
        self.on_refused: Callable[[str], None] | None = None

    @classmethod
    async def open(cls, data_dir: str | os.PathLike[str], *, fsync: bool = False, max_bytes: int = 0,
                   native: bool = True) -> SpoolSink:
        """``native=False``: always write on a worker thread."""
        spool = await trio.to_thread.run_sync(lambda: Spool(data_dir, fsync=fsync, max_bytes=max_bytes))
        writer, description = None, "spool writer: worker thread (asked for)"
        if native:
            writer, description = await trio.to_thread.run_sync(open_native_writer, spool, fsync)
        sink = cls(spool, writer, description)
        sink._full = await trio.to_thread.run_sync(spool.full)
        return sink

    async def _run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def write(self, batch: Sequence[Record]) -> None:
        await self.write_batch(batch, ())

    async def write_batch(self, records: Sequence[Record], dead: Sequence[tuple[str, int, Rejection]],
                          pending: bool = False, on_commit: Callable[[], None] | None = None) -> None:
        """Commit the batch; return once it is durable.

        ``on_commit``: called once the batch is committed, possibly before this
        returns: by ``poll()`` in whichever task sees the commit first. Not
        called when the write fails.

        A failed write whose batch holds rows the spool can never store
        (gridgate.storage.unwritable) is written once more with them mended:
        such records as ``sink_refused`` dead letters, such dead letters with
        their values made text. Any other failure is raised, for the caller to retry.
        """
        if not records and not dead:
            if on_commit is not None:
                on_commit()
            return
        try:
            await self._write_batch(records, dead, pending, on_commit)
        except SinkFullError:
            raise
        except Exception as exc:       # Cancelled is not an Exception: it passes
            mended = mend(records, dead)
            if mended is None:
                raise                  # not the rows': an outage, retried by the caller
            self._report_mended(mended, exc)
            await self._write_batch(mended.records, mended.dead, pending, on_commit)

    async def _write_batch(self, records: Sequence[Record], dead: Sequence[tuple[str, int, Rejection]],
                           pending: bool, on_commit: Callable[[], None] | None) -> None:
        try:
            if self._writer is None:
                self._full = await self._run(self._write_then_check, records, dead, pending)
                if on_commit is not None:
                    on_commit()
            else:
                await self._write_native(self._writer, records, dead, pending, on_commit)
        except SinkFullError:
            self._full = True
            raise

    def _report_mended(self, mended: Mended, exc: Exception) -> None:
        """Log (and count, through ``on_refused``) the rows a failed write was mended of."""
        log.error("spool write failed (%s: %s) on %d rows it can never store, written again with them mended: "
                  "%d records kept as sink_refused dead letters, %d dead letters stored with their values made "
                  "text; first: %s", type(exc).__name__, exc, len(mended.faults), len(mended.refused),
                  mended.made_storable, mended.faults[0])
        if self.on_refused is not None:
            for record in mended.refused:
                self.on_refused(record.protocol if type(record.protocol) is str else "unknown")

    def poll(self) -> None:
        """Finish the compiled write in flight if its thread is done with it.

        For tasks that run between the loop's I/O polls (sessions, after
        each read): the writer's pipe is only seen at the next poll, after
        every task that is runnable now has had its turn - milliseconds
        under load, during which durable readings would wait for their acks.
        """
        # only _write_native sets _in_flight, and only with a writer (mypy cannot know)
        if self._in_flight and self._writer.ready:  # type: ignore[union-attr]
            self._complete()

    def _complete(self) -> None:
        self._in_flight = False
        on_commit, self._on_commit = self._on_commit, None
        try:
            used = self._writer.finish()  # type: ignore[union-attr]  # in flight: there is a writer
        except BaseException as exc:        # the SQLite error: raised by the writing task
            self._outcome = exc
            return
        max_bytes = self.spool.max_bytes
        self._full = max_bytes > 0 and used >= max_bytes
        if on_commit is not None:
            on_commit()

    async def _write_native(self, writer: SpoolWriter, records: Sequence[Record],
                            dead: Sequence[tuple[str, int, Rejection]], pending: bool,
                            on_commit: Callable[[], None] | None) -> None:
        # Taking the limiter without a checkpoint when it is free (it nearly
        # always is: the batcher is its main user) spares the batch a whole
        # scheduler pass; the wait for the writer is the one yield it needs.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._limiter.acquire()
        try:
            if self._full:
                # full as of the last write or delete: look again before refusing
                await trio.to_thread.run_sync(self.spool.check_room)
            # The records go over as they are: the compiled writer makes their
            # rows (record_rows' very bytes) in C, with one JSON encoder call
            # per batch instead of two and a tuple per reading.
            batch = records if type(records) is list else list(records)
            dead_rows = rejection_rows(dead)
            # Not cancellable, like a worker-thread write: the batch is either
            # committed or failed before anyone acts on it.
            with trio.CancelScope(shield=True):
                writer.start_records(batch, dead_rows, pending, self.spool.max_bytes > 0)   # measure: only with a bound
                self._on_commit = on_commit
                self._outcome = None
                self._in_flight = True
                while self._in_flight:
                    if writer.ready:
                        self._complete()
                    else:
                        await trio.lowlevel.wait_readable(writer.fileno())
                        # One byte per batch; a batch finished by poll() leaves
                        # its byte for here or, at worst, one spurious wake-up
                        # of the next write.
                        writer.clear_signal()
            failure, self._outcome = self._outcome, None
            if failure is not None:
                raise failure
        finally:
            self._limiter.release()

    def _write_then_check(self, records: Sequence[Record], dead: Sequence[tuple[str, int, Rejection]],
                          pending: bool) -> bool:
        # on the worker thread: the loop thread never touches the connection
        self.spool.write_batch(records, dead, pending)
        return self.spool.full()

    def accepting_writes(self) -> bool:
        """False while the spool is at max_bytes, as of the last write (for /readyz)."""
        return not self._full

    async def stats(self) -> dict[str, int]:
        return await self._run(self.spool.stats)

    async def read_pending(self, limit: int) -> tuple[int, list[Record]]:
        return await self._run(self.spool.read_pending, limit)

    async def delete_pending(self, upto_id: int, count: int) -> None:
        self._full = await self._run(self._delete_then_check, upto_id, count)

    def _delete_then_check(self, upto_id: int, count: int) -> bool:
        self.spool.delete_pending(upto_id, count)
        return self.spool.full()

    async def pending_count(self) -> int:
        return await self._run(self.spool.pending_count)

    async def aclose(self) -> None:
        if self._writer is not None:
            await self._run(self._writer.close)
        await self._run(self.spool.close)
