"""Payload validator, pure-Python reference implementation (DESIGN section 3).

JSON is decoded with the standard library (``json.loads``, as the std HTTP
pipeline does), made exactly as strict as msgspec, which the compiled twin in
src/_fastparse_payload.pxi uses: UTF-8 only, no NaN/Infinity literals, no
numbers that overflow a double, no lone surrogate escapes. MessagePack is
decoded with msgspec in both (the standard library has no MessagePack).
docs/payload.md is the contract; both implementations must give identical
results on every input (tests/ingest/test_payload_hypothesis.py).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import msgspec

from gridgate.ingest.records import DEVICE_ID_RE, Record, Rejection
from gridgate.ingest.rules import PayloadRules

__all__ = ["Validator", "RESERVED_KEYS", "MAX_DEPTH"]

RESERVED_KEYS = frozenset(("device_id", "timestamp_ms", "timestamp_ns", "temperature_unit", "location", "tags",
                           "metrics"))
INT64_MIN = -(2 ** 63)
INT64_MAX = 2 ** 63 - 1
# Deepest nesting accepted. msgspec's own limit is far deeper than any
# reading needs; both implementations cut at this one so they agree.
MAX_DEPTH = 64

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
_TAG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# an escape of either half (high D800-DBFF or low DC00-DFFF): decoded strings are only
# searched when the text has one
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_WS = " \t\n\r"

_FORMAT_NAMES = {"json": "JSON", "msgpack": "MessagePack"}
_msgpack_any = msgspec.msgpack.Decoder()
_msgpack_raw_list = msgspec.msgpack.Decoder(list[msgspec.Raw])


class _Malformed(Exception):
    pass


class _Reject(Exception):
    def __init__(self, reason: str, field: object, detail: str) -> None:
        # a str or None, whatever the payload's key was: a msgpack map's key may
        # be a number (a float one made the dead letter's row unwritable and
        # held the whole pipeline), and a field is text in every answer and row
        self.reason, self.detail = reason, detail
        self.field: str | None = field if field is None or type(field) is str else str(field)


def _no_constants(name: str) -> Any:
    raise _Malformed(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Malformed("number out of range")
    return value


_json = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constants)


def _check_depth_and_surrogates(obj: Any, depth: int, check_strings: bool) -> None:
    """Containers nested deeper than MAX_DEPTH (the outermost is depth 1) are malformed."""
    if depth > MAX_DEPTH and (type(obj) is dict or type(obj) is list):
        raise _Malformed("nested too deeply")
    if type(obj) is dict:
        for k, v in obj.items():
            if check_strings and _has_surrogate(k):
                raise _Malformed("lone surrogate")
            _check_depth_and_surrogates(v, depth + 1, check_strings)
    elif type(obj) is list:
        for v in obj:
            _check_depth_and_surrogates(v, depth + 1, check_strings)
    elif check_strings and type(obj) is str and _has_surrogate(obj):
        raise _Malformed("lone surrogate")


def _has_surrogate(s: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in s)


def _decode_json_text(text: str) -> Any:
    try:
        obj = _json.decode(text)
    except (ValueError, RecursionError) as exc:
        raise _Malformed(str(exc)) from None
    _check_depth_and_surrogates(obj, 1, _SURROGATE_ESCAPE.search(text) is not None)
    return obj


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _decode_json(payload: bytes) -> tuple[Any, list[bytes] | None]:
    """Decode a JSON document. For a top-level array also return each item's
    original bytes."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("not UTF-8") from None
    obj = _decode_json_text(text)
    if type(obj) is not list:
        return obj, None
    raws: list[bytes] = []
    i = _skip_ws(text, 0) + 1  # past '['
    i = _skip_ws(text, i)
    if text[i] == "]":
        return obj, raws
    while True:
        _, end = _json.raw_decode(text, i)
        raws.append(text[i:end].encode("utf-8"))
        i = _skip_ws(text, end)
        if text[i] == "]":
            return obj, raws
        i = _skip_ws(text, i + 1)  # past ','


def _decode_msgpack(payload: bytes) -> tuple[Any, list[bytes] | None]:
    try:
        obj = _msgpack_any.decode(payload)
    except (ValueError, RecursionError) as exc:  # DecodeError, and UnicodeDecodeError for bad str bytes
        raise _Malformed(str(exc)) from None
    _check_depth_and_surrogates(obj, 1, False)
    if type(obj) is not list:
        return obj, None
    return obj, [bytes(r) for r in _msgpack_raw_list.decode(payload)]


def _tag_value_ok(value: Any, max_len: int) -> bool:
    return type(value) is str and 0 < len(value) <= max_len and not _CONTROL.search(value)


class Validator:
    """Judges payloads against PayloadRules; never raises for bad input."""

    def __init__(self, rules: PayloadRules) -> None:
        self.rules = rules
        self.field_rules = dict(rules.fields)
        self.levels = tuple(rules.location_levels)
        self.skew_ns = rules.max_future_skew_s * 1_000_000_000

    def validate(self, payload: bytes | memoryview, fmt: str, protocol: str, device_id: str | None,
                 received_ns: int) -> tuple[list[Record], list[Rejection]]:
        raw = bytes(payload)
        rules = self.rules
        if len(raw) > rules.max_payload_bytes:
            return [], [Rejection(reason="too_large", device_id=device_id, raw=raw,
                                  detail=f"payload of {len(raw)} bytes exceeds max_payload_bytes "
                                         f"{rules.max_payload_bytes}")]
        if fmt == "ndjson":
            return self._ndjson(raw, protocol, device_id, received_ns)
        try:
            if fmt == "json":
                obj, raws = _decode_json(raw)
            elif fmt == "msgpack":
                obj, raws = _decode_msgpack(raw)
            else:
                raise ValueError(f"unknown payload format {fmt!r}")
        except _Malformed:
            return [], [Rejection(reason="malformed", device_id=device_id, raw=raw,
                                  detail=f"payload is not valid {_FORMAT_NAMES[fmt]}")]
        if raws is None:
            if type(obj) is not dict:
                return [], [Rejection(reason="not_object", device_id=device_id, raw=raw,
                                      detail="payload must be an object or an array of objects")]
            return self._judge_all([obj], [raw], protocol, device_id, received_ns)
        if len(obj) > rules.max_batch_items:
            return [], [Rejection(reason="too_large", device_id=device_id, raw=raw,
                                  detail=f"batch of {len(obj)} readings exceeds max_batch_items "
                                         f"{rules.max_batch_items}")]
        return self._judge_all(obj, raws, protocol, device_id, received_ns)

    def validate_into(self, payload: bytes | memoryview, fmt: str, protocol: str, device_id: str | None,
                      received_ns: int, records: list[Record], rejections: list[Rejection]) -> int:
        """As validate, appending to the caller's lists; returns how many
        records and rejections it appended."""
        new_records, new_rejections = self.validate(payload, fmt, protocol, device_id, received_ns)
        records.extend(new_records)
        rejections.extend(new_rejections)
        return len(new_records) + len(new_rejections)

    def _ndjson(self, raw: bytes, protocol: str, device_id: str | None,
                received_ns: int) -> tuple[list[Record], list[Rejection]]:
        records: list[Record] = []
        rejections: list[Rejection] = []
        index = 0
        for line in raw.split(b"\n"):
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip(b" \t\r"):
                continue
            if index >= self.rules.max_batch_items:
                return [], [Rejection(reason="too_large", device_id=device_id, raw=raw,
                                      detail=f"more than max_batch_items {self.rules.max_batch_items} lines")]
            try:
                obj, _ = _decode_json(line)
            except _Malformed:
                rejections.append(Rejection(reason="malformed", index=index, device_id=device_id, raw=line,
                                            detail="line is not valid JSON"))
            else:
                self._judge_one(obj, line, index, protocol, device_id, received_ns, records, rejections)
            index += 1
        return records, rejections

    def _judge_all(self, items: list[Any], raws: list[bytes], protocol: str, device_id: str | None,
                   received_ns: int) -> tuple[list[Record], list[Rejection]]:
        records: list[Record] = []
        rejections: list[Rejection] = []
        for index, item in enumerate(items):
            self._judge_one(item, raws[index], index, protocol, device_id, received_ns, records, rejections)
        return records, rejections

    def _judge_one(self, item: Any, raw: bytes, index: int, protocol: str, conn_id: str | None,
                   received_ns: int, records: list[Record], rejections: list[Rejection]) -> None:
        device = conn_id
        try:
            if type(item) is not dict:
                raise _Reject("not_object", None, "reading must be an object")
            device = self._device(item, conn_id)
            ts_ns = self._timestamp(item, received_ns, index)
            fields = self._fields(item)
            tags = self._tags(item)
        except _Reject as rej:
            rejections.append(Rejection(reason=rej.reason, field=rej.field, index=index, device_id=device,
                                        raw=raw, detail=rej.detail))
            return
        records.append(Record(device_id=device, ts_ns=ts_ns, received_ns=received_ns, protocol=protocol,
                              fields=fields, tags=tags))

    @staticmethod
    def _device(item: dict[Any, Any], conn_id: str | None) -> str:
        if "device_id" in item:
            value = item["device_id"]
            if type(value) is not str or not DEVICE_ID_RE.match(value):
                raise _Reject("bad_device_id", "device_id", "device_id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
            if conn_id is not None and value != conn_id:
                raise _Reject("identity_mismatch", "device_id", "device_id differs from the connection's device")
            return value
        if conn_id is None:
            raise _Reject("missing_device_id", "device_id", "device_id is required")
        return conn_id

    def _timestamp(self, item: dict[Any, Any], received_ns: int, index: int) -> int:
        has_ms = "timestamp_ms" in item
        has_ns = "timestamp_ns" in item
        if has_ms and has_ns:
            raise _Reject("bad_timestamp", "timestamp_ms", "give timestamp_ms or timestamp_ns, not both")
        if has_ms:
            value, key, scale = item["timestamp_ms"], "timestamp_ms", 1_000_000
        elif has_ns:
            value, key, scale = item["timestamp_ns"], "timestamp_ns", 1
        else:
            # no device time: the receive time, +1 ns per item of a batch, so
            # readings stay distinct points in a time-series sink
            return received_ns + index
        if type(value) is not int:
            raise _Reject("bad_timestamp", key, f"{key} must be an integer")
        if value < 0 or value > INT64_MAX // scale:
            raise _Reject("bad_timestamp", key, f"{key} is out of range")
        ts_ns = value * scale
        if ts_ns > received_ns + self.skew_ns:
            raise _Reject("future_timestamp", key,
                          f"{key} is more than {self.rules.max_future_skew_s} s in the future")
        return ts_ns

    def _fields(self, item: dict[Any, Any]) -> dict[str, int | float]:
        metrics = item.get("metrics")
        if "metrics" in item and type(metrics) is not dict:
            raise _Reject("bad_type", "metrics", "metrics must be an object")
        count = sum(1 for k in item if k not in RESERVED_KEYS) + (len(metrics) if metrics else 0)
        if count > self.rules.max_fields:
            raise _Reject("too_many_fields", None,
                          f"{count} metrics exceed max_fields {self.rules.max_fields}")
        fields: dict[str, int | float] = {}
        seen_temperature = False
        top_names = set()
        for key, value in item.items():
            if key in RESERVED_KEYS:
                continue
            top_names.add(key)
            seen_temperature |= self._metric(key, value, key, item, fields)
        if metrics:
            for key, value in metrics.items():
                label = f"metrics.{key}"
                if key in top_names:
                    raise _Reject("bad_type", label, "field given both at top level and in metrics")
                seen_temperature |= self._metric(key, value, label, item, fields)
        if "temperature_unit" in item and not seen_temperature:
            raise _Reject("bad_unit", "temperature_unit", "temperature_unit given without temperature")
        if not fields:
            raise _Reject("malformed", None, "no metrics")
        return fields

    def _metric(self, name: Any, value: Any, label: str, item: dict[Any, Any], fields: dict[str, int | float]) -> bool:
        """Normalize one metric into ``fields``; True if it was the temperature."""
        if type(name) is not str or not _FIELD_NAME.match(name):
            raise _Reject("bad_type", label, "invalid field name")
        vtype = type(value)
        if vtype is int:
            if value < INT64_MIN or value > INT64_MAX:
                raise _Reject("out_of_range", label, "integer outside the 64-bit range")
        elif vtype is float:
            if not math.isfinite(value):
                raise _Reject("bad_type", label, "value must be a finite number")
        else:
            raise _Reject("bad_type", label, "value must be a number")
        rule = self.field_rules.get(name)
        if name == "temperature":
            unit = item.get("temperature_unit", "C")
            t = float(value)
            if unit == "C":
                c = t
            elif unit == "F":
                c = (t - 32.0) * 5.0 / 9.0
            elif unit == "K":
                c = t - 273.15
            else:
                raise _Reject("bad_unit", "temperature_unit", "temperature_unit must be C, F or K")
            if rule is not None and ((rule.min is not None and c < rule.min)
                                     or (rule.max is not None and c > rule.max)):
                raise _Reject("out_of_range", label, "temperature outside the allowed range")
            x = c * 1000.0
            mc = math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)
            self._put(fields, "temperature_mc", int(mc), label)
            return True
        if rule is not None:
            if rule.integer:
                if vtype is float:
                    if not value.is_integer():
                        raise _Reject("bad_type", label, "value must be an integer")
                    value = int(value)
            else:
                value = float(value)
            if (rule.min is not None and value < rule.min) or (rule.max is not None and value > rule.max):
                raise _Reject("out_of_range", label, "value outside the allowed range")
        else:
            value = float(value)
        self._put(fields, name, value, label)
        return False

    @staticmethod
    def _put(fields: dict[str, int | float], name: str, value: int | float, label: str) -> None:
        if name in fields:
            raise _Reject("bad_type", label, "field given twice")
        fields[name] = value

    def _tags(self, item: dict[Any, Any]) -> dict[str, str]:
        rules = self.rules
        tags: dict[str, str] = {}
        if "location" in item:
            location = item["location"]
            parts = location.split("/") if type(location) is str else None
            if (parts is None or len(parts) > len(self.levels)
                    or not all(_tag_value_ok(p, rules.max_tag_value_length) for p in parts)):
                raise _Reject("bad_tag", "location",
                              f"location must be 1 to {len(self.levels)} non-empty '/'-separated names")
            for level, part in zip(self.levels, parts, strict=False):   # parts may name fewer levels
                tags[level] = part
        if "tags" in item:
            given = item["tags"]
            if type(given) is not dict:
                raise _Reject("bad_tag", "tags", "tags must be an object of strings")
            for key, value in given.items():
                label = f"tags.{key}"
                if type(key) is not str or len(key) > rules.max_tag_key_length or not _TAG_KEY.match(key):
                    raise _Reject("bad_tag", label, "invalid tag name")
                if key == "device_id":
                    raise _Reject("bad_tag", label, "device_id is not a tag")
                if not _tag_value_ok(value, rules.max_tag_value_length):
                    raise _Reject("bad_tag", label, "tag value must be a non-empty string without control characters")
                if key in tags and tags[key] != value:
                    raise _Reject("bad_tag", label, "tag conflicts with location")
                tags[key] = value
        if len(tags) > rules.max_tags:
            raise _Reject("bad_tag", "tags", f"more than max_tags {rules.max_tags} tags")
        return tags
