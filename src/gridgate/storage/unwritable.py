"""Rows the spool can never store, told apart from a spool that cannot write now.

A batch's write fails whole, and the pipeline retries a failed write until it
succeeds: right for an outage (a full disk, a locked file), but one row the
spool can never take - a value of a type no column binds, a NULL where the
schema says NOT NULL, text that is not UTF-8 - would fail every retry and hold
every reader of the gateway for ever. After a write fails, :func:`mend` looks
for such rows, in pure Python and only then (the hot path pays nothing), by
the rules both batch writers bind by (the compiled ``_sw_set``: str, bytes,
int in 64 bits or None; SQLite's length limit; and the schema's NOT NULL
columns). A record found so becomes a ``sink_refused`` dead letter carrying
what could be told of it; a dead letter found so is kept with its values made
storable (text for what is not). When it finds nothing, the failure was not
the rows' and the caller retries as before.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from gridgate.ingest.records import Record, Rejection

__all__ = ["Mended", "mend", "record_fault", "rejection_fault"]

# SQLite's default SQLITE_MAX_LENGTH: a longer value is refused ("string or blob
# too big") before the compiled writer's own 2**31 - 1 would be reached
_MAX_CELL_BYTES = 1_000_000_000
# what a dead letter made storable keeps of a raw value or detail over that
_KEPT_BYTES = 1 << 20
_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1
# Per column of a row, in spool._ROW_COLUMNS / _REJECTION_COLUMNS order: may it be NULL?
_RECORD_NULLABLE = (False, False, False, False, False, False, True, True)
_REJECTION_NULLABLE = (False, False, False, True, True, True, False, False)
_RECORD_COLUMNS = ("device_id", "ts_ns", "received_ns", "protocol", "fields", "tags", "traceparent", "tracestate")
_REJECTION_COLUMNS = ("received_ns", "protocol", "reason", "field", "index", "device_id", "detail", "raw")

_encode = msgspec.json.Encoder().encode


def _cell_fault(value: object, nullable: bool) -> str | None:
    """Why a value cannot be one cell, or None if it can."""
    if value is None:
        return None if nullable else "NULL in a NOT NULL column"
    kind = type(value)
    if kind is int:
        return None if _INT64_MIN <= value <= _INT64_MAX else "an integer beyond 64 bits"  # type: ignore[operator]
    if kind is bytes:
        return None if len(value) <= _MAX_CELL_BYTES else "more than SQLite's 10**9 bytes"  # type: ignore[arg-type]
    if kind is str:
        try:
            size = len(value.encode())  # type: ignore[attr-defined]
        except UnicodeEncodeError:
            return "text that is not valid UTF-8 (a lone surrogate)"
        return None if size <= _MAX_CELL_BYTES else "more than SQLite's 10**9 bytes"
    # exact types only, as the compiled writer binds: a bool or a str subclass is refused there
    return f"a {kind.__name__}"


def record_fault(record: Record) -> str | None:
    """Why the spool cannot store this record, or None if it can."""
    values = (record.device_id, record.ts_ns, record.received_ns, record.protocol, None, None,
              record.traceparent, record.tracestate)
    for column, (value, nullable) in enumerate(zip(values, _RECORD_NULLABLE, strict=True)):
        if column in (4, 5):
            continue
        fault = _cell_fault(value, nullable)
        if fault is not None:
            return f"{_RECORD_COLUMNS[column]}: {fault}"
    for column, mapping in ((4, record.fields), (5, record.tags)):
        try:
            _encode(mapping)
        except Exception as exc:     # what msgspec cannot encode, the spool cannot store
            return f"{_RECORD_COLUMNS[column]}: {exc}"
    return None


def _raw_bytes(raw: object) -> bytes | None:
    """A dead letter's raw value as the spool stores it, or None if it is not
    bytes or a buffer of them. Never bytes() of anything else: bytes(n) of an
    int n is n zero bytes (spool.rejection_rows would allocate them)."""
    if type(raw) is bytes:
        return raw
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    return None


def rejection_fault(protocol: object, received_ns: object, rejection: Rejection) -> str | None:
    """Why the spool cannot store this dead letter, or None if it can."""
    raw = _raw_bytes(rejection.raw)
    if raw is None:
        return f"raw: a {type(rejection.raw).__name__}, not bytes"
    values = (received_ns, protocol, rejection.reason, rejection.field, rejection.index, rejection.device_id,
              rejection.detail, raw)
    for column, (value, nullable) in enumerate(zip(values, _REJECTION_NULLABLE, strict=True)):
        fault = _cell_fault(value, nullable)
        if fault is not None:
            return f"{_REJECTION_COLUMNS[column]}: {fault}"
    return None


def _text(value: object) -> str:
    """Storable text for any value: what it says (its first _KEPT_BYTES
    characters), any lone surrogate escaped."""
    try:
        text = value if type(value) is str else str(value)
    except Exception:
        text = f"<a {type(value).__name__} that cannot be shown>"
    return text[:_KEPT_BYTES].encode("utf-8", "backslashreplace").decode()


def _int64(value: object) -> int | None:
    return value if type(value) is int and _INT64_MIN <= value <= _INT64_MAX else None


def _storable(protocol: object, received_ns: object, r: Rejection, fault: str) -> tuple[str, int, Rejection]:
    """The dead letter with every value made one the spool stores."""
    raw = _raw_bytes(r.raw)
    if raw is None:
        raw = _text(r.raw).encode()
    note = f"stored with its values made text: {fault}"
    if len(raw) > _MAX_CELL_BYTES:
        raw = raw[:_KEPT_BYTES]
        note += f"; raw cut to its first {_KEPT_BYTES} bytes"
    detail = _text(r.detail)
    if type(r.detail) is str and len(r.detail) > _KEPT_BYTES:
        note += f"; detail cut to its first {_KEPT_BYTES} characters"
    when = _int64(received_ns)
    return (_text(protocol), time.time_ns() if when is None else when,
            Rejection(reason=_text(r.reason), field=None if r.field is None else _text(r.field),
                      index=_int64(r.index), device_id=None if r.device_id is None else _text(r.device_id),
                      raw=raw, detail=f"{detail} [{note}]"))


def _refused(record: Record, fault: str) -> tuple[str, int, Rejection]:
    """A record the spool cannot store, as the dead letter that keeps what can be told of it."""
    try:
        raw = _encode(record)
    except Exception:                   # the very values that make it unstorable may not encode
        raw = _text(repr(record)).encode()
    letter = Rejection(reason="sink_refused", device_id=record.device_id, raw=raw,
                       detail=f"the spool cannot store this reading: {fault}")
    protocol, received_ns = record.protocol, record.received_ns
    if rejection_fault(protocol, received_ns, letter) is None:
        return protocol, received_ns, letter
    return _storable(protocol, received_ns, letter, fault)


class Mended(NamedTuple):
    """A batch without the rows the spool cannot store."""

    records: list[Record]
    dead: list[tuple[str, int, Rejection]]
    refused: list[Record]                    # records now dead letters (sink_refused)
    made_storable: int                       # dead letters whose values were made text
    faults: list[str]                        # why, one per row mended (for the log)


def mend(records: Sequence[Record], dead: Sequence[tuple[str, int, Rejection]]) -> Mended | None:
    """The batch with every row the spool cannot store mended, or None if
    every row can be stored (the failure was not the rows')."""
    kept: list[Record] = []
    refused: list[Record] = []
    letters: list[tuple[str, int, Rejection]] = []
    faults: list[str] = []
    for record in records:
        fault = record_fault(record)
        if fault is None:
            kept.append(record)
        else:
            refused.append(record)
            faults.append(fault)
            letters.append(_refused(record, fault))
    made_storable = 0
    for protocol, received_ns, rejection in dead:
        fault = rejection_fault(protocol, received_ns, rejection)
        if fault is None:
            letters.append((protocol, received_ns, rejection))
        else:
            made_storable += 1
            faults.append(fault)
            letters.append(_storable(protocol, received_ns, rejection, fault))
    if not faults:
        return None
    return Mended(kept, letters, refused, made_storable, faults)
