# Payload validator: the compiled twin of gridgate/ingest/validator_py.py (the
# reference; docs/payload.md is the contract). Both must give identical
# records and rejections on every input.
#
# Why compiled: every reading of every protocol is judged here. msgspec
# decodes (in C) into dicts, and the walk over the reading's keys, the type
# and range checks and the unit conversion run as C over typed locals instead
# of interpreter steps.

from libc.math cimport floor, isfinite
from cpython.dict cimport PyDict_GetItemWithError, PyDict_Next, PyDict_SetDefault
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject

import math as _pl_math

import msgspec as _pl_msgspec

from gridgate.ingest.records import Record as _pl_Record, Rejection as _pl_Rejection

# bound once: a module global's attribute looked up per payload is a
# measurable share of a small reading's validation
cdef object _pl_json_decode = _pl_msgspec.json.Decoder().decode
cdef object _pl_json_raw_list_decode = _pl_msgspec.json.Decoder(list[_pl_msgspec.Raw]).decode
cdef object _pl_msgpack_decode = _pl_msgspec.msgpack.Decoder().decode
cdef object _pl_msgpack_raw_list_decode = _pl_msgspec.msgpack.Decoder(list[_pl_msgspec.Raw]).decode

cdef Py_ssize_t _pl_NAME_CACHE = 4096        # field names remembered as valid
# What a key of a reading is (Validator.key_info), so that each key costs one
# dict lookup where it cost up to four (reserved? reserved? valid? rule?).
# Anything else found there is the key's _pl_Rule.
cdef object _pl_KEY_TEMPERATURE = object()  # converted to temperature_mc
cdef object _pl_KEY_PLAIN = object()        # a valid name without a rule
# keys of a reading whose key_info the first pass keeps for the second
cdef enum:
    _PL_KEYS_KEPT = 16


# the last validate_into _pl_bound_validator looked at, and its answer:
# the sessions pass the one bound method Services made, read after read
cdef object _pl_bound_seen = None
cdef Validator _pl_bound_owner = None


cdef Validator _pl_bound_validator(object validate_into):
    """The compiled Validator whose own validate_into this is, else None.

    The MQTT sessions' per-PUBLISH loops (take_publishes, take_publishes5)
    are given the bound method; with it they call Validator._validate
    straight from C, without a Python call's argument packing per reading.
    Anything else (the pure-Python twin, a wrapper) is called as given.
    Looked up once per bound method, not per read: a read of the fleet
    shape carries one PUBLISH, which the lookup would cost more than it saves."""
    global _pl_bound_seen, _pl_bound_owner
    if validate_into is _pl_bound_seen:
        return _pl_bound_owner
    owner = getattr(validate_into, "__self__", None)
    found = None
    if type(owner) is Validator and validate_into == (<Validator>owner).validate_into:
        found = owner
    _pl_bound_seen = validate_into
    _pl_bound_owner = found
    return found


cdef inline Py_ssize_t _pl_validate_into(Validator validator, object validate_into, object payload, str fmt,
                                         str protocol, object device_id, object received_ns, list records,
                                         list rejections) except -1:
    """validate_into(...)'s count, by the C call when ``validator`` is its owner."""
    cdef Py_ssize_t before
    if validator is None:
        return validate_into(payload, fmt, protocol, device_id, received_ns, records, rejections)
    before = len(records) + len(rejections)
    validator._validate(payload, fmt, protocol, device_id, received_ns, records, rejections)
    return len(records) + len(rejections) - before


cdef class _pl_Reserved:
    """key_info's value for a reserved key (not a metric at the top level):
    its bit in _pl_Scan.present, so absent keys cost no lookup."""
    cdef int bit

    def __cinit__(self, int bit):
        self.bit = bit


cdef enum:
    _PL_HAS_DEVICE_ID = 1
    _PL_HAS_TIMESTAMP_MS = 2
    _PL_HAS_TIMESTAMP_NS = 4
    _PL_HAS_TEMPERATURE_UNIT = 8
    _PL_HAS_LOCATION = 16
    _PL_HAS_TAGS = 32
    _PL_HAS_METRICS = 64

cdef dict _pl_RESERVED_BITS = {"device_id": _PL_HAS_DEVICE_ID, "timestamp_ms": _PL_HAS_TIMESTAMP_MS,
                               "timestamp_ns": _PL_HAS_TIMESTAMP_NS, "temperature_unit": _PL_HAS_TEMPERATURE_UNIT,
                               "location": _PL_HAS_LOCATION, "tags": _PL_HAS_TAGS, "metrics": _PL_HAS_METRICS}


cdef struct _pl_Scan:
    # One look at every key of a reading, before any check: which reserved
    # keys are there, how many metrics, and (for up to _PL_KEYS_KEPT keys)
    # each key's key_info, borrowed: key_info's values live as long as the
    # Validator and the reading's keys as long as the reading.
    int present
    Py_ssize_t count
    bint kept
    PyObject* infos[_PL_KEYS_KEPT]
cdef int _pl_MAX_DEPTH = 64
cdef Py_ssize_t _pl_LOCATION_CACHE = 1024     # distinct locations remembered; then forgotten all at once
# the tags of every reading without location or tags (shared: Record.tags is read-only)
cdef dict _pl_NO_TAGS = {}
cdef dict _pl_FORMAT_NAMES = {"json": "JSON", "msgpack": "MessagePack"}


class _pl_Malformed(Exception):
    pass


class _pl_Reject(Exception):
    def __init__(self, reason, field, detail):
        self.reason = reason
        # a str or None, whatever the payload's key was: a msgpack map's key may
        # be a number (a float one made the dead letter's row unwritable and
        # held the whole pipeline), and a field is text in every answer and row
        self.field = field if field is None or type(field) is str else str(field)
        self.detail = detail


# Character classes by hand instead of re: a regex call costs more than the
# whole check for these short ASCII names.
cdef inline bint _pl_alnum(Py_UCS4 c):
    return (c >= 48 and c <= 57) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122)


cdef bint _pl_device_id_ok(str s):
    # [A-Za-z0-9][A-Za-z0-9._:-]{0,127}
    cdef Py_ssize_t n = len(s), i
    cdef Py_UCS4 c
    if n == 0 or n > 128 or not _pl_alnum(s[0]):
        return False
    for i in range(1, n):
        c = s[i]
        if not (_pl_alnum(c) or c == 46 or c == 95 or c == 58 or c == 45):
            return False
    return True


cdef bint _pl_name_ok(str s, Py_ssize_t max_len):
    # [A-Za-z_][A-Za-z0-9_.-]{0,max_len-1}  (max_len < 0: unlimited)
    cdef Py_ssize_t n = len(s), i
    cdef Py_UCS4 c
    if n == 0 or (max_len >= 0 and n > max_len):
        return False
    c = s[0]
    if not ((c >= 65 and c <= 90) or (c >= 97 and c <= 122) or c == 95):
        return False
    for i in range(1, n):
        c = s[i]
        if not (_pl_alnum(c) or c == 95 or c == 46 or c == 45):
            return False
    return True


cdef bint _pl_tag_value_ok(object value, Py_ssize_t max_len):
    cdef Py_ssize_t n, i
    cdef Py_UCS4 c
    if type(value) is not str:
        return False
    n = len(<str>value)
    if n == 0 or n > max_len:
        return False
    for i in range(n):
        c = (<str>value)[i]
        if c < 0x20 or c == 0x7f:
            return False
    return True


cdef int _pl_check_depth(object obj, int depth) except -1:
    cdef object v
    cdef Py_ssize_t pos = 0
    cdef PyObject *key
    cdef PyObject *value
    if depth > _pl_MAX_DEPTH:
        raise _pl_Malformed("nested too deeply")
    if type(obj) is dict:
        # PyDict_Next, not a for loop: Cython's dict iteration re-checks the
        # dict's size and kind per item, a measurable share of a small
        # reading's judging; the dicts here are not changed while walked
        while PyDict_Next(obj, &pos, &key, &value):
            if type(<object>value) is dict or type(<object>value) is list:
                _pl_check_depth(<object>value, depth + 1)
    elif type(obj) is list:
        for v in <list>obj:
            if type(v) is dict or type(v) is list:
                _pl_check_depth(v, depth + 1)
    return 0


cdef class _pl_Rule:
    """A FieldRule unpacked into C fields, built once per Validator."""
    cdef bint integer, has_min, has_max
    cdef double min, max
    cdef object min_obj, max_obj

    def __init__(self, rule):
        self.integer = rule.integer
        self.has_min = rule.min is not None
        self.has_max = rule.max is not None
        self.min_obj = rule.min
        self.max_obj = rule.max
        self.min = rule.min if self.has_min else 0.0
        self.max = rule.max if self.has_max else 0.0

    cdef bint outside(self, object value):
        # Doubles when the comparison is exact in double precision, else
        # Python's exact int/float comparison (what the twin does).
        cdef double d
        cdef long long v
        cdef int overflow = 0
        if type(value) is float:
            d = value
        else:
            # an int: exact in a double up to 2**53 (two object comparisons
            # with constants cost more than this conversion)
            v = PyLong_AsLongLongAndOverflow(value, &overflow)
            if overflow or v < -9007199254740992 or v > 9007199254740992:
                return (self.has_min and value < self.min_obj) or (self.has_max and value > self.max_obj)
            d = <double>v
        return (self.has_min and d < self.min) or (self.has_max and d > self.max)


cdef bint _pl_starts_array(object payload) except -1:
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef Py_ssize_t i
    cdef bint found = False
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char *>view.buf
        for i in range(view.len):
            if p[i] == 32 or p[i] == 9 or p[i] == 10 or p[i] == 13:
                continue
            found = p[i] == 91  # '['
            break
    finally:
        PyBuffer_Release(&view)
    return found


cdef inline bytes _pl_bytes(object raw):
    return <bytes>raw if type(raw) is bytes else bytes(raw)


cdef class Validator:
    """Judges payloads against PayloadRules; never raises for bad input."""

    cdef readonly object rules
    cdef dict field_rules          # name -> _pl_Rule
    cdef dict location_tags        # location string seen -> the tags it makes
    cdef dict key_info             # key -> _pl_KEY_* or its _pl_Rule (see above)
    cdef Py_ssize_t names_learned  # plain names added to key_info, at most _pl_NAME_CACHE
    cdef tuple levels
    cdef long long skew_ns
    cdef long long max_payload_bytes
    cdef Py_ssize_t max_batch_items, max_fields, max_tags, max_tag_key_length, max_tag_value_length
    cdef object temp_rule
    cdef double temp_min, temp_max
    cdef bint temp_has_min, temp_has_max

    def __init__(self, rules):
        self.rules = rules
        self.field_rules = {name: _pl_Rule(rule) for name, rule in rules.fields.items()}
        self.location_tags = {}
        self.key_info = {name: _pl_Reserved(bit) for name, bit in _pl_RESERVED_BITS.items()}
        self.key_info["temperature"] = _pl_KEY_TEMPERATURE      # its rule is applied in Celsius, after conversion
        for name, rule in self.field_rules.items():
            # a rule for a name no reading may use still leaves that name refused
            if name not in self.key_info and type(name) is str and _pl_name_ok(<str>name, 64):
                self.key_info[name] = rule
        self.names_learned = 0
        self.levels = tuple(rules.location_levels)
        self.skew_ns = rules.max_future_skew_s * 1_000_000_000
        self.max_payload_bytes = rules.max_payload_bytes
        self.max_batch_items = rules.max_batch_items
        self.max_fields = rules.max_fields
        self.max_tags = rules.max_tags
        self.max_tag_key_length = rules.max_tag_key_length
        self.max_tag_value_length = rules.max_tag_value_length
        self.temp_rule = rules.fields.get("temperature")
        self.temp_has_min = self.temp_rule is not None and self.temp_rule.min is not None
        self.temp_has_max = self.temp_rule is not None and self.temp_rule.max is not None
        self.temp_min = self.temp_rule.min if self.temp_has_min else 0.0
        self.temp_max = self.temp_rule.max if self.temp_has_max else 0.0

    def validate(self, payload, str fmt, str protocol, device_id, received_ns):
        """(records, rejections) of one payload (bytes or a memoryview of bytes)."""
        cdef list records = [], rejections = []
        self._validate(payload, fmt, protocol, device_id, received_ns, records, rejections)
        return records, rejections

    def validate_into(self, payload, str fmt, str protocol, device_id, received_ns, list records,
                      list rejections):
        """As validate, appending to the caller's lists (a session gathering
        a whole read's readings skips two lists and a tuple per payload);
        returns how many records and rejections it appended."""
        cdef Py_ssize_t before = len(records) + len(rejections)
        self._validate(payload, fmt, protocol, device_id, received_ns, records, rejections)
        return len(records) + len(rejections) - before

    cdef int _validate(self, object payload, str fmt, str protocol, object device_id, object received_ns,
                       list records, list rejections) except -1:
        # The payload is decoded where it lies (msgspec reads any buffer): the
        # bytes copy kept in a Rejection is made only for a rejection.
        cdef list raws = None
        cdef object obj
        cdef Py_ssize_t size = len(payload)
        if size > self.max_payload_bytes:
            rejections.append(_pl_Rejection(reason="too_large", device_id=device_id, raw=_pl_bytes(payload),
                                            detail=f"payload of {size} bytes exceeds max_payload_bytes "
                                                   f"{self.max_payload_bytes}"))
            return 0
        if fmt == "ndjson":
            return self._ndjson(_pl_bytes(payload), protocol, device_id, received_ns, records, rejections)
        if fmt != "json" and fmt != "msgpack":
            raise ValueError(f"unknown payload format {fmt!r}")
        try:
            if fmt == "json":
                if _pl_starts_array(payload):
                    raws = _pl_json_raw_list_decode(payload)
                    obj = [_pl_json_decode(r) for r in raws]
                else:
                    obj = _pl_json_decode(payload)
            else:
                obj = _pl_msgpack_decode(payload)
                if type(obj) is list:
                    raws = _pl_msgpack_raw_list_decode(payload)
            if type(obj) is dict or type(obj) is list:
                _pl_check_depth(obj, 1)
        except (ValueError, _pl_Malformed, RecursionError):  # DecodeError is a ValueError; so is UnicodeDecodeError
            rejections.append(_pl_Rejection(reason="malformed", device_id=device_id, raw=_pl_bytes(payload),
                                            detail=f"payload is not valid {_pl_FORMAT_NAMES[fmt]}"))
            return 0
        if raws is None:
            if type(obj) is not dict:
                rejections.append(_pl_Rejection(reason="not_object", device_id=device_id, raw=_pl_bytes(payload),
                                                detail="payload must be an object or an array of objects"))
                return 0
            self._judge_one(obj, payload, 0, protocol, device_id, received_ns, records, rejections)
            return 0
        if len(obj) > self.max_batch_items:
            rejections.append(_pl_Rejection(reason="too_large", device_id=device_id, raw=_pl_bytes(payload),
                                            detail=f"batch of {len(obj)} readings exceeds max_batch_items "
                                                   f"{self.max_batch_items}"))
            return 0
        for index in range(len(<list>obj)):
            self._judge_one((<list>obj)[index], raws[index], index, protocol, device_id, received_ns,
                            records, rejections)
        return 0

    cdef int _ndjson(self, bytes raw, str protocol, device_id, received_ns, list records,
                     list rejections) except -1:
        cdef Py_ssize_t first_record = len(records), first_rejection = len(rejections)
        cdef Py_ssize_t index = 0
        cdef bytes line
        for line in raw.split(b"\n"):
            if line.endswith(b"\r"):
                line = line[:len(line) - 1]
            if not line.strip(b" \t\r"):
                continue
            if index >= self.max_batch_items:
                # the whole payload is refused: none of its lines count
                del records[first_record:]
                del rejections[first_rejection:]
                rejections.append(_pl_Rejection(reason="too_large", device_id=device_id, raw=raw,
                                                detail=f"more than max_batch_items {self.max_batch_items} lines"))
                return 0
            try:
                obj = _pl_json_decode(line)
                if type(obj) is dict or type(obj) is list:
                    _pl_check_depth(obj, 1)
            except (ValueError, _pl_Malformed, RecursionError):  # DecodeError is a ValueError; so is UnicodeDecodeError
                rejections.append(_pl_Rejection(reason="malformed", index=index, device_id=device_id, raw=line,
                                                detail="line is not valid JSON"))
            else:
                self._judge_one(obj, line, index, protocol, device_id, received_ns, records, rejections)
            index += 1
        return 0

    cdef _judge_one(self, object item, object raw, Py_ssize_t index, str protocol, object conn_id,
                    object received_ns, list records, list rejections):
        # raw: the reading's bytes, or a buffer (memoryview, msgspec.Raw) of them
        cdef object device = conn_id
        cdef _pl_Scan scan
        try:
            if type(item) is not dict:
                raise _pl_Reject("not_object", None, "reading must be an object")
            self._scan(<dict>item, &scan)
            device = self._device(<dict>item, conn_id, scan.present)
            ts_ns = self._timestamp(<dict>item, received_ns, index, scan.present)
            fields = self._fields(<dict>item, &scan)
            tags = self._tags(<dict>item, scan.present)
        except _pl_Reject as rej:
            rejections.append(_pl_Rejection(reason=rej.reason, field=rej.field, index=index, device_id=device,
                                            raw=_pl_bytes(raw), detail=rej.detail))
            return
        records.append(_pl_Record(device_id=device, ts_ns=ts_ns, received_ns=received_ns, protocol=protocol,
                                  fields=fields, tags=tags))

    cdef int _scan(self, dict item, _pl_Scan *scan) except -1:
        cdef PyObject* info
        cdef Py_ssize_t i = 0, pos = 0
        cdef PyObject *key
        cdef PyObject *value
        scan.present = 0
        scan.count = 0
        scan.kept = len(item) <= _PL_KEYS_KEPT
        while PyDict_Next(item, &pos, &key, &value):      # see _pl_check_depth
            info = PyDict_GetItemWithError(self.key_info, <object>key)
            if scan.kept:
                scan.infos[i] = info
                i += 1
            if info != NULL and type(<object>info) is _pl_Reserved:
                scan.present |= (<_pl_Reserved>info).bit
            else:
                scan.count += 1
        return 0

    cdef object _device(self, dict item, object conn_id, int present):
        cdef PyObject* found = NULL
        if present & _PL_HAS_DEVICE_ID:
            found = PyDict_GetItemWithError(item, "device_id")
        cdef object value
        if found != NULL:
            value = <object>found
            if type(value) is not str or not _pl_device_id_ok(<str>value):
                raise _pl_Reject("bad_device_id", "device_id",
                                 "device_id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
            if conn_id is not None and value != conn_id:
                raise _pl_Reject("identity_mismatch", "device_id", "device_id differs from the connection's device")
            return value
        if conn_id is None:
            raise _pl_Reject("missing_device_id", "device_id", "device_id is required")
        return conn_id

    cdef object _timestamp(self, dict item, object received_ns, Py_ssize_t index, int present):
        cdef PyObject* ms = NULL
        cdef PyObject* ns = NULL
        if present & _PL_HAS_TIMESTAMP_MS:
            ms = PyDict_GetItemWithError(item, "timestamp_ms")
        if present & _PL_HAS_TIMESTAMP_NS:
            ns = PyDict_GetItemWithError(item, "timestamp_ns")
        cdef object value
        cdef long long v, scale, limit, ts_ns, received
        cdef str key
        if ms != NULL and ns != NULL:
            raise _pl_Reject("bad_timestamp", "timestamp_ms", "give timestamp_ms or timestamp_ns, not both")
        if ms != NULL:
            value, key, scale = <object>ms, "timestamp_ms", 1000000
        elif ns != NULL:
            value, key, scale = <object>ns, "timestamp_ns", 1
        else:
            # as the twin: +1 ns per batch item keeps readings distinct points
            # (the first item shares received_ns's int: one allocation less)
            return received_ns if index == 0 else received_ns + index
        if type(value) is not int:
            raise _pl_Reject("bad_timestamp", key, f"{key} must be an integer")
        limit = 9223372036854775807 // scale
        if value < 0 or value > limit:
            raise _pl_Reject("bad_timestamp", key, f"{key} is out of range")
        v = value
        ts_ns = v * scale
        received = received_ns
        if received <= 9223372036854775807 - self.skew_ns and ts_ns > received + self.skew_ns:
            raise _pl_Reject("future_timestamp", key,
                             f"{key} is more than {self.rules.max_future_skew_s} s in the future")
        return ts_ns

    cdef dict _fields(self, dict item, _pl_Scan *scan):
        cdef PyObject* found = NULL
        cdef object metrics = None
        cdef Py_ssize_t count = scan.count, i = 0
        cdef bint seen_temperature = False
        cdef PyObject* info
        cdef dict fields = {}
        cdef set top_names = None
        cdef Py_ssize_t pos = 0
        cdef PyObject *k
        cdef PyObject *v
        if scan.present & _PL_HAS_METRICS:
            found = PyDict_GetItemWithError(item, "metrics")
        if found != NULL:
            metrics = <object>found
            if type(metrics) is not dict:
                raise _pl_Reject("bad_type", "metrics", "metrics must be an object")
        # Every field is counted (by _scan) before any is judged, as in the
        # twin: too_many_fields wins over a bad field.
        if metrics is not None:
            count += len(<dict>metrics)
        if count > self.max_fields:
            raise _pl_Reject("too_many_fields", None, f"{count} metrics exceed max_fields {self.max_fields}")
        if metrics:
            top_names = set()
        i = 0
        while PyDict_Next(item, &pos, &k, &v):            # see _pl_check_depth
            key = <object>k
            value = <object>v
            if scan.kept:
                info = scan.infos[i]
                i += 1
            else:
                info = PyDict_GetItemWithError(self.key_info, key)
            if info != NULL and type(<object>info) is _pl_Reserved:
                continue
            if top_names is not None:
                top_names.add(key)
            if self._metric(key, value, key, item, fields, info, scan.present):
                seen_temperature = True
        if metrics:
            for key, value in (<dict>metrics).items():
                label = f"metrics.{key}"
                if key in top_names:
                    raise _pl_Reject("bad_type", label, "field given both at top level and in metrics")
                info = PyDict_GetItemWithError(self.key_info, key)
                if self._metric(key, value, label, item, fields, info, scan.present):
                    seen_temperature = True
        if not seen_temperature and scan.present & _PL_HAS_TEMPERATURE_UNIT:
            raise _pl_Reject("bad_unit", "temperature_unit", "temperature_unit given without temperature")
        if not fields:
            raise _pl_Reject("malformed", None, "no metrics")
        return fields

    cdef bint _metric(self, object name, object value, object label, dict item, dict fields,
                      PyObject* info, int present) except -1:
        # info: what key_info holds for name (NULL: nothing yet). A reserved
        # name is a metric inside "metrics": judged as any name seen first.
        cdef object vtype = type(value)
        cdef double t, c, x, mc
        cdef object unit
        cdef _pl_Rule rule = None
        cdef PyObject* found
        cdef int overflow = 0
        if info == NULL or type(<object>info) is _pl_Reserved:
            if type(name) is not str or not _pl_name_ok(<str>name, 64):
                raise _pl_Reject("bad_type", label, "invalid field name")
            if info == NULL:
                # a device sends the same few names every time: each is checked once
                if self.names_learned < _pl_NAME_CACHE:
                    self.key_info[name] = _pl_KEY_PLAIN
                    self.names_learned += 1
            else:
                found = PyDict_GetItemWithError(self.field_rules, name)
                if found != NULL:
                    rule = <_pl_Rule>found
        elif info != <PyObject*>_pl_KEY_PLAIN and info != <PyObject*>_pl_KEY_TEMPERATURE:
            rule = <_pl_Rule>info
        if vtype is int:
            PyLong_AsLongLongAndOverflow(value, &overflow)      # not two object comparisons
            if overflow:
                raise _pl_Reject("out_of_range", label, "integer outside the 64-bit range")
        elif vtype is float:
            if not isfinite(<double>value):
                raise _pl_Reject("bad_type", label, "value must be a finite number")
        else:
            raise _pl_Reject("bad_type", label, "value must be a number")
        if info == <PyObject*>_pl_KEY_TEMPERATURE:
            found = NULL
            if present & _PL_HAS_TEMPERATURE_UNIT:
                found = PyDict_GetItemWithError(item, "temperature_unit")
            unit = "C" if found == NULL else <object>found
            t = <double>value
            if unit == "C":
                c = t
            elif unit == "F":
                c = (t - 32.0) * 5.0 / 9.0
            elif unit == "K":
                c = t - 273.15
            else:
                raise _pl_Reject("bad_unit", "temperature_unit", "temperature_unit must be C, F or K")
            if (self.temp_has_min and c < self.temp_min) or (self.temp_has_max and c > self.temp_max):
                raise _pl_Reject("out_of_range", label, "temperature outside the allowed range")
            x = c * 1000.0
            mc = floor(x + 0.5) if x >= 0 else -floor(-x + 0.5)
            self._put(fields, "temperature_mc", int(mc), label)
            return True
        if rule is not None:
            if rule.integer:
                if vtype is float:
                    if not (<double>value == floor(<double>value)):
                        raise _pl_Reject("bad_type", label, "value must be an integer")
                    value = int(value)
            else:
                value = float(value)
            if rule.outside(value):
                raise _pl_Reject("out_of_range", label, "value outside the allowed range")
        else:
            value = float(value)
        self._put(fields, name, value, label)
        return False

    cdef int _put(self, dict fields, str name, object value, object label) except -1:
        # one lookup: setdefault adds the name unless it is there already
        # (the size tells which; the value may be the very same object)
        cdef Py_ssize_t before = len(fields)
        PyDict_SetDefault(fields, name, value)
        if len(fields) == before:
            raise _pl_Reject("bad_type", label, "field given twice")
        return 0

    cdef dict _tags(self, dict item, int present):
        cdef dict tags
        cdef PyObject* found = NULL
        cdef PyObject* known = NULL
        cdef object location, given
        cdef list parts
        cdef Py_ssize_t i
        cdef bint shared = False
        if present & _PL_HAS_LOCATION:
            found = PyDict_GetItemWithError(item, "location")
        if found != NULL and type(<object>found) is str:
            known = PyDict_GetItemWithError(self.location_tags, <object>found)
        if known != NULL:
            # a device reports from the same place every time: its location
            # is split and checked once (the twin does it each time), and its
            # readings share the one dict (Record.tags is read-only: see
            # Record), copied only to add the reading's own tags
            tags = <dict>known
            shared = True
        elif found != NULL:
            tags = {}
            location = <object>found
            parts = (<str>location).split("/") if type(location) is str else None
            ok = parts is not None and len(parts) <= len(self.levels)
            if ok:
                for part in parts:
                    if not _pl_tag_value_ok(part, self.max_tag_value_length):
                        ok = False
                        break
            if not ok:
                raise _pl_Reject("bad_tag", "location",
                                 f"location must be 1 to {len(self.levels)} non-empty '/'-separated names")
            for i in range(len(parts)):
                tags[self.levels[i]] = parts[i]
            if len(self.location_tags) >= _pl_LOCATION_CACHE:
                self.location_tags.clear()
            self.location_tags[location] = tags
            shared = True
        else:
            tags = _pl_NO_TAGS
            shared = True
        found = NULL
        if present & _PL_HAS_TAGS:
            found = PyDict_GetItemWithError(item, "tags")
        if found != NULL:
            given = <object>found
            if type(given) is not dict:
                raise _pl_Reject("bad_tag", "tags", "tags must be an object of strings")
            if shared and given:
                tags = tags.copy()
            for key, value in (<dict>given).items():
                label = f"tags.{key}"
                if type(key) is not str or not _pl_name_ok(<str>key, self.max_tag_key_length):
                    raise _pl_Reject("bad_tag", label, "invalid tag name")
                if key == "device_id":
                    raise _pl_Reject("bad_tag", label, "device_id is not a tag")
                if not _pl_tag_value_ok(value, self.max_tag_value_length):
                    raise _pl_Reject("bad_tag", label,
                                     "tag value must be a non-empty string without control characters")
                if key in tags and tags[key] != value:
                    raise _pl_Reject("bad_tag", label, "tag conflicts with location")
                tags[key] = value
        if len(tags) > self.max_tags:
            raise _pl_Reject("bad_tag", "tags", f"more than max_tags {self.max_tags} tags")
        return tags
