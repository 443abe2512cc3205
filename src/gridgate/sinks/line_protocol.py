"""Records -> InfluxDB 1.x line protocol (the ``/write`` body).

One record is one line::

    <measurement>,device_id=<id>[,<tag>=<value>...] <field>=<value>[,...] <ts_ns>

- Tags: ``device_id`` plus the record's tags, sorted by key (what InfluxDB
  sorts to anyway, so the server has nothing to reorder). Tags with an empty
  value are left out: InfluxDB rejects empty tag values.
- Fields: ``int`` -> ``123i`` (int64 range), ``float`` -> ``repr`` (the
  shortest string that round-trips; ``1e+16`` and ``5e-324`` parse), ``bool``
  -> ``true``/``false``, ``str`` -> ``"..."`` with ``"`` and ``\\`` escaped.
  NaN and infinities have no line-protocol form and are refused.
- Timestamp: ``ts_ns`` as is (the sink writes with ``precision=ns``).

Escaping (InfluxDB 1.x): the measurement escapes comma and space; tag keys,
tag values and field keys escape comma, equals sign and space, each with a
backslash. InfluxDB 1.x has no escape for the backslash itself in these
places, and its parser tells an escaped delimiter by the byte before it, so a
name or tag value in which a backslash stands last, or right before a comma,
equals sign or space, cannot be written so that it reads back unchanged (a
trailing backslash even swallows the delimiter after it); such a record is
refused. Other backslashes pass through literally.

Newlines: line protocol has no escape for a newline in a measurement, a tag
or a field key, so one there is refused (so is a carriage return). Inside a
quoted string field value a newline is legal and InfluxDB 1.x keeps it, so it
is written as is there.

"Refused" means :class:`LineProtocolError` (a ``ValueError``) naming the
record's position; nothing is encoded. gridgate's validator (DESIGN section
3) keeps such input out upstream as ``bad_tag``/``bad_type``; this module
does not silently drop or alter data.

The encoder is a pure function of its input. It is on the write path, so it
builds each line from a few joins and escapes a string only when a quick
check says it needs it; names (tag and field keys) repeat across records and
their escaped forms are cached.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

from gridgate.ingest.records import Record, trace_id

__all__ = [
    "DEFAULT_MEASUREMENT", "LineProtocolError", "encode", "encode_lines",
    "escape_measurement", "escape_key", "escape_tag_value", "format_field_value",
    "MIN_TIMESTAMP_NS", "MAX_TIMESTAMP_NS", "TRACE_TAG",
]

DEFAULT_MEASUREMENT = "telemetry"   # DESIGN section 2: [influxdb] measurement = "telemetry"

# What InfluxDB 1.x accepts as a timestamp (it answers "time outside range"
# beyond these) and as an integer field value.
MIN_TIMESTAMP_NS = -9223372036854775806
MAX_TIMESTAMP_NS = 9223372036854775806
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

# Names InfluxDB 1.x drops ("invalid tag key"/"invalid field name", a partial
# write) and the tag the encoder sets itself.
_RESERVED_KEY = "time"
_DEVICE_TAG = "device_id"
# With trace_tag: the trace id of the record's traceparent ([influxdb] trace_tag).
TRACE_TAG = "trace_id"

# Anything in a key or tag value that needs a second look: the characters to
# escape, a backslash (see the module docstring) and line breaks.
_KEY_SLOW = re.compile(r"[,= \\\n\r]")
_key_slow = _KEY_SLOW.search
# A backslash last or before a character the parser would take as escaped.
_BAD_BACKSLASH = re.compile(r"\\(?:[,= ]|\Z)")
_STR_SLOW = re.compile(r'["\\]')


class LineProtocolError(ValueError):
    """A record that line protocol cannot carry unchanged.

    Attributes:
        index: the record's position in the sequence given to :func:`encode`
            (None when raised by a single-value helper).
        reason: what is wrong, for logs and the dead-letter detail.
    """

    def __init__(self, reason: str, index: int | None = None) -> None:
        self.reason = reason
        self.index = index
        super().__init__(reason if index is None else f"record {index}: {reason}")


def _escape_key_or_value(s: str, what: str) -> str:
    """Escape a tag key, tag value or field key (comma, equals sign, space)."""
    if _KEY_SLOW.search(s) is None:
        return s
    if "\n" in s or "\r" in s:
        raise LineProtocolError(f"{what} {s!r} contains a line break")
    if "\\" in s and _BAD_BACKSLASH.search(s):
        raise LineProtocolError(
            f"{what} {s!r} has a backslash at its end or before a comma, equals sign or space; "
            f"InfluxDB 1.x line protocol cannot carry that")
    if "," in s:
        s = s.replace(",", "\\,")
    if "=" in s:
        s = s.replace("=", "\\=")
    if " " in s:
        s = s.replace(" ", "\\ ")
    return s


def escape_key(key: str, what: str = "key") -> str:
    """Escape a tag key or field key; refuse what line protocol cannot carry."""
    if not key:
        raise LineProtocolError(f"empty {what}")
    if key == _RESERVED_KEY:
        raise LineProtocolError(f'{what} "time" is reserved by InfluxDB')
    return _escape_key_or_value(key, what)


def escape_tag_value(value: str) -> str:
    """Escape a (non-empty) tag value; refuse what line protocol cannot carry."""
    return _escape_key_or_value(value, "tag value")


def escape_measurement(name: str) -> str:
    """Escape a measurement name (comma and space).

    Stricter than the protocol: the measurement comes from the config, so
    backslashes are refused outright, as are names starting with ``#`` (a
    comment line to InfluxDB) and line breaks.
    """
    if not isinstance(name, str) or not name:
        raise LineProtocolError("the measurement name must be a non-empty string")
    if name.startswith("#"):
        raise LineProtocolError(f"measurement {name!r} starts with '#', which makes the line a comment")
    if "\\" in name or "\n" in name or "\r" in name:
        raise LineProtocolError(f"measurement {name!r} contains a backslash or a line break")
    return name.replace(",", "\\,").replace(" ", "\\ ")


def format_field_value(value: object) -> str:
    """One field value in line-protocol form (see the module docstring)."""
    # mypy does not narrow ``value`` through ``t``: the ignores below are for that
    t = type(value)
    if t is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise LineProtocolError(f"non-finite float {value!r}")
        return repr(value)
    if t is int:
        if not _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
            raise LineProtocolError(f"integer {value} is outside int64")
        return f"{value}i"
    if t is bool:
        return "true" if value else "false"
    if t is str:
        if _STR_SLOW.search(value) is not None:  # type: ignore[call-overload]
            value = value.replace("\\", "\\\\").replace('"', '\\"')  # type: ignore[attr-defined]
        return f'"{value}"'
    # Subclasses (IntEnum, numpy scalars that subclass float, ...): bool first,
    # since bool is an int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return format_field_value(int(value))
    if isinstance(value, float):
        return format_field_value(float(value))
    if isinstance(value, str):
        return format_field_value(str(value))
    raise LineProtocolError(f"unsupported field value type {t.__name__}")


# Escaped names, by name. Keys repeat across every record of a fleet, so this
# stays small; it is cleared if odd input ever makes it large.
_KEY_CACHE: dict[str, str] = {}
_KEY_CACHE_MAX = 4096


def _key(name: str, what: str) -> str:
    try:
        return _KEY_CACHE[name]
    except KeyError:
        pass
    if type(name) is not str:
        raise LineProtocolError(f"{what} must be a string, not {type(name).__name__}")
    escaped = escape_key(name, what)
    if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
        _KEY_CACHE.clear()
    _KEY_CACHE[name] = escaped
    return escaped


def _tag_set(device_id: object, tags: Mapping[str, str]) -> str:
    """``device_id=...[,k=v...]``, sorted by key, empty values left out."""
    if type(device_id) is not str or not device_id:
        raise LineProtocolError("device_id must be a non-empty string")
    if _key_slow(device_id) is not None:
        device_id = escape_tag_value(device_id)
    if not tags:
        return "device_id=" + device_id
    if _DEVICE_TAG in tags:
        raise LineProtocolError('tag "device_id" is set from the record\'s device_id; it may not be a tag too')
    parts: list[str] = []
    append = parts.append
    placed = False
    cache = _KEY_CACHE
    for k in sorted(tags):
        v = tags[k]
        if type(v) is not str:
            raise LineProtocolError(f"tag {k!r} has a {type(v).__name__} value, not a string")
        if not v:
            continue                        # InfluxDB rejects empty tag values
        if not placed and k > _DEVICE_TAG:
            append("device_id=" + device_id)
            placed = True
        if _key_slow(v) is not None:
            v = escape_tag_value(v)
        append(f"{cache.get(k) or _key(k, 'tag key')}={v}")
    if not placed:
        append("device_id=" + device_id)
    return ",".join(parts)


def _field_set(fields: Mapping[str, object]) -> str:
    if not fields:
        raise LineProtocolError("a record needs at least one field")
    parts: list[str] = []
    append = parts.append
    cache = _KEY_CACHE
    for k, v in fields.items():
        t = type(v)
        if t is int and _INT64_MIN <= v <= _INT64_MAX:      # type: ignore[operator]
            s = f"{v}i"
        elif t is float and v - v == 0.0:                    # type: ignore[operator]  # finite
            s = repr(v)
        else:
            s = format_field_value(v)
        append(f"{cache.get(k) or _key(k, 'field key')}={s}")
    return ",".join(parts)


def encode_lines(records: Iterable[Record], measurement: str = DEFAULT_MEASUREMENT,
                 trace_tag: bool = False) -> list[str]:
    """The line of each record, in order (no trailing newlines).

    ``trace_tag``: a record with a ``traceparent`` also gets the tag
    ``trace_id`` (its 32 hex digits; it replaces a reading's own tag of that
    name). Off by default: one series per trace is a cardinality an operator
    must choose.

    Raises:
        LineProtocolError: a record cannot be carried unchanged; ``index``
            says which. No partial result is returned.
    """
    prefix = escape_measurement(measurement) + ","
    lines: list[str] = []
    append = lines.append
    tag_set = _tag_set
    field_set = _field_set
    lo, hi = MIN_TIMESTAMP_NS, MAX_TIMESTAMP_NS
    i = 0
    try:
        for i, record in enumerate(records):  # noqa: B007 - i is read by the except clause below
            ts = record.ts_ns
            if type(ts) is not int or not lo <= ts <= hi:
                raise LineProtocolError(f"timestamp {ts!r} is not an integer within InfluxDB's range")
            tags = record.tags
            if trace_tag and record.traceparent is not None:
                tags = {**tags, TRACE_TAG: trace_id(record.traceparent)}
            append(f"{prefix}{tag_set(record.device_id, tags)} {field_set(record.fields)} {ts}")
    except LineProtocolError as exc:
        raise LineProtocolError(exc.reason, i) from None
    return lines


def encode(records: Sequence[Record], measurement: str = DEFAULT_MEASUREMENT, trace_tag: bool = False) -> bytes:
    """The UTF-8 line-protocol body for ``records``, one line each, each
    ending in ``\\n``; ``b""`` for no records.

    Raises:
        LineProtocolError: as :func:`encode_lines`, or a string that is not
            valid Unicode (a lone surrogate) and cannot be UTF-8 encoded.
    """
    lines = encode_lines(records, measurement, trace_tag)
    if not lines:
        return b""
    lines.append("")
    try:
        return "\n".join(lines).encode("utf-8")
    except UnicodeEncodeError:
        for i, line in enumerate(lines):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise LineProtocolError(f"not encodable as UTF-8: {exc.reason}", i) from None
        raise
