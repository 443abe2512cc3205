"""The spool: SQLite in WAL mode, the default sink and the dead-letter store.

Durable means committed here: with ``synchronous=NORMAL`` a commit survives
the gateway being killed; ``fsync = true`` (``synchronous=FULL``) extends that
to power loss. One transaction per batch holds both its records and its
rejections, and a counters row kept in the same transaction makes
``stats()`` O(1) however large the tables grow.

Schema version 1 (``PRAGMA user_version``). Store-and-forward to external
sinks will add a pending state per batch in a later version.
"""
from __future__ import annotations

import base64
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio

from gridgate.records import Record, Rejection
from gridgate.sinks.base import SinkFullError

__all__ = ["Spool", "SpoolSink", "SPOOL_FILE"]

SPOOL_FILE = "spool.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    ts_ns INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    fields TEXT NOT NULL,
    tags TEXT NOT NULL
);
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
"""

_encode = msgspec.json.Encoder().encode
_decode_fields = msgspec.json.Decoder(dict[str, int | float]).decode
_decode_tags = msgspec.json.Decoder(dict[str, str]).decode


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
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(f"{self.path}: spool schema version {version} is newer than this gridgate "
                                   f"understands ({SCHEMA_VERSION})")
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- writing --------------------------------------------------------------

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    def full(self) -> bool:
        return self.max_bytes > 0 and self.size_bytes() >= self.max_bytes

    def write_batch(self, records: Sequence[Record], dead: Sequence[tuple[str, int, Rejection]]) -> None:
        """Commit records and dead letters ((protocol, received_ns, rejection)) in one transaction.

        Raises:
            SinkFullError: the spool is at ``max_bytes``; nothing was written.
        """
        if not records and not dead:
            return
        if self.full():
            raise SinkFullError(f"spool {self.path} is full ({self.size_bytes()} >= max_bytes {self.max_bytes})")
        db = self.db
        db.execute("BEGIN")
        try:
            if records:
                db.executemany(
                    "INSERT INTO records (device_id, ts_ns, received_ns, protocol, fields, tags) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(r.device_id, r.ts_ns, r.received_ns, r.protocol, _encode(r.fields), _encode(r.tags))
                     for r in records])
            if dead:
                db.executemany(
                    "INSERT INTO rejections (received_ns, protocol, reason, field, idx, device_id, detail, raw) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(received_ns, protocol, r.reason, r.field, r.index, r.device_id, r.detail, bytes(r.raw))
                     for protocol, received_ns, r in dead])
            db.execute("UPDATE counters SET records = records + ?, rejected = rejected + ? WHERE id = 1",
                       (len(records), len(dead)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- reading ----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        row = self.db.execute("SELECT records, rejected FROM counters WHERE id = 1").fetchone()
        records, rejected = row if row else (0, 0)
        return {"records": records, "rejected": rejected, "bytes": self.size_bytes()}

    def iter_records(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT device_id, ts_ns, received_ns, protocol, fields, tags FROM records ORDER BY id LIMIT ?",
            (-1 if limit is None else limit,))
        for device_id, ts_ns, received_ns, protocol, fields, tags in cur:
            yield {"device_id": device_id, "ts_ns": ts_ns, "received_ns": received_ns, "protocol": protocol,
                   "fields": _decode_fields(fields), "tags": _decode_tags(tags)}

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


class SpoolSink:
    """The spool for Trio: every SQLite call runs on one worker thread at a
    time (a CapacityLimiter of 1), so the event loop never blocks on disk."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._limiter = trio.CapacityLimiter(1)
        self._full = False

    @classmethod
    async def open(cls, data_dir: str | os.PathLike[str], *, fsync: bool = False, max_bytes: int = 0) -> "SpoolSink":
        spool = await trio.to_thread.run_sync(lambda: Spool(data_dir, fsync=fsync, max_bytes=max_bytes))
        return cls(spool)

    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def write(self, batch: Sequence[Record]) -> None:
        await self.write_batch(batch, ())

    async def write_batch(self, records: Sequence[Record], dead: Sequence[tuple[str, int, Rejection]]) -> None:
        try:
            await self._run(self.spool.write_batch, records, dead)
        except SinkFullError:
            self._full = True
            raise
        self._full = False

    def accepting_writes(self) -> bool:
        """False after a refused write or while the spool is at max_bytes (for /readyz)."""
        return not self._full and not self.spool.full()

    async def stats(self) -> dict[str, int]:
        return await self._run(self.spool.stats)

    async def aclose(self) -> None:
        await self._run(self.spool.close)
