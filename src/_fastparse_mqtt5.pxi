# MQTT 5.0 server-side codec, compiled: the twin of gridgate/protocols/mqtt/codec5_py.py.
#
# codec5_py (with v5: the property table, MQTT5Error) is the reference and its
# module docstring is the contract both keep: the same events, and the same
# MQTT5Error (reason_code, return_code, so the same reason) at the same byte
# however the stream is split into reads, and the same bytes or the same
# ValueError/TypeError from the encoders
# (tests/protocols/mqtt/test_codec5.py runs its suite on both,
# tests/protocols/mqtt/test_codec5_differential.py crosses them).
#
# Events: the compiled codec builds the twin's own classes (events5 and
# v5.Properties, msgspec Structs). Compiled look-alikes would compare equal
# only with extra __eq__ code on both sides, and the session would have to
# type-switch on two sets of classes. Building them is a cost both twins
# share (a Properties of 7 fields took 0.36-0.86 us in a timeit loop on the
# 2-core VM, loaded); the compiled side builds each with one vectorcall
# (_m5_build_properties) and still decodes a PUBLISH with 8 properties
# 13-20x faster than the twin (bench.micro, README).
#
# What is written by hand in C, and why: a device's PUBLISH with properties
# and its acks are decoded on every reading, so the walk over a read, the
# Variable Byte Integers, the property block (identifier table look-ups,
# duplicate bits, range checks on C integers), the UTF-8 checks of section
# 1.5.4 (a byte scan, strings built only once valid) and the ack encoders
# (PUBACK/PUBREC with or without a Reason String: the session sends one per
# reading) run over a const unsigned char* with C locals. The rest (CONNECT,
# SUBSCRIBE, AUTH, the encoders of rare packets and of arbitrary
# properties) follows the twin line by line in Cython's Python-level code:
# identical behaviour matters there, speed does not.
#
# Included into src/_fastparse.pyx with the other parts as one compilation
# unit: every module-level name here starts with _m5_, mqtt5_ or MQTT5 (the
# 3.1.1 codec owns MQTTCodec, encode_* and _mq_*).

from cpython.bytearray cimport (
    PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE, PyByteArray_Resize,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_CheckExact
from cpython.memoryview cimport PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from cpython.number cimport PyNumber_Index
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)

from gridgate.protocols.mqtt import v5 as _m5_v5
from gridgate.protocols.mqtt.events import PingReq as _m5_PingReq
from gridgate.protocols.mqtt.events5 import (
    Auth as _m5_Auth, Connect5 as _m5_Connect5, Disconnect5 as _m5_Disconnect5, PubAck5 as _m5_PubAck5,
    PubComp5 as _m5_PubComp5, Publish5 as _m5_Publish5, PubRec5 as _m5_PubRec5, PubRel5 as _m5_PubRel5,
    Subscribe5 as _m5_Subscribe5, Subscription as _m5_Subscription, Unsubscribe5 as _m5_Unsubscribe5,
    Will5 as _m5_Will5,
)
from gridgate.protocols.mqtt.v5 import MQTT5Error as _m5_Error, Properties as _m5_Properties

# Packet types (section 2.1.2) and v5's Will Properties pseudo type, reason
# codes, and v5's data types (section 1.5), as C constants.
cdef enum:
    _M5_CONNECT = 1
    _M5_CONNACK = 2
    _M5_PUBLISH = 3
    _M5_PUBACK = 4
    _M5_PUBREC = 5
    _M5_PUBREL = 6
    _M5_PUBCOMP = 7
    _M5_SUBSCRIBE = 8
    _M5_SUBACK = 9
    _M5_UNSUBSCRIBE = 10
    _M5_UNSUBACK = 11
    _M5_PINGREQ = 12
    _M5_DISCONNECT = 14
    _M5_AUTH = 15
    _M5_WILL = 16
    _M5_MALFORMED = 0x81
    _M5_PROTOCOL_ERROR = 0x82
    _M5_UNSPECIFIED = 0x80
    _M5_UNSUPPORTED_VERSION = 0x84
    _M5_TOO_LARGE = 0x95
    _M5_TOPIC_ALIAS_INVALID = 0x94
    _M5_BYTE = 0
    _M5_TWO_BYTE = 1
    _M5_FOUR_BYTE = 2
    _M5_VBI = 3
    _M5_UTF8 = 4
    _M5_BINARY = 5
    _M5_UTF8_PAIR = 6

cdef Py_ssize_t _m5_MAX_VBI = 268435455
MQTT5_MAX_PACKET_BYTES = 268435455 + 5

# -- tables, filled once at import from v5's (so the twins cannot drift apart) -------------

# Property identifier (all < 128, so one VBI byte) -> data type (-1: unknown),
# bit mask of the packet types (and WILL) allowing it, and of those where it may repeat.
cdef int[128] _m5_PROP_TYPE
cdef unsigned int[128] _m5_PROP_PACKETS
cdef unsigned int[128] _m5_PROP_REPEAT
# The identifiers in the table's order (the encoder's walk).
cdef int[64] _m5_SPEC_IDENT
cdef Py_ssize_t _m5_NSPECS = 0
# Reason codes each packet type may carry: [packet type][code].
cdef unsigned char[16][256] _m5_CODE_OK
# The first-byte state machine, [connected][first byte]: 1 if it starts a violation.
cdef unsigned char[2][256] _m5_FIRST_BAD

_m5_PROP_ATTR = [None] * 128      # identifier -> the Properties field (interned str)
_m5_PROP_NAME = [None] * 128      # identifier -> the spec's name, for error details
_m5_PACKET_NAMES = _m5_v5.PACKET_NAMES
_m5_NO_PROPERTIES = _m5_v5.NO_PROPERTIES
_m5_ZERO_ONE = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_m5_REQUIRED_FLAGS = {1: 0, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 10: 2, 12: 0, 14: 0, 15: 0}
_m5_SERVER_ONLY = frozenset({2, 9, 11, 13})


cdef object _m5_first_byte_error(unsigned char first, bint connected):
    """(reason code, detail) for a packet starting with `first`, or None (as codec5_py._first_byte_error)."""
    cdef int ptype = first >> 4
    cdef int flags = first & 0x0F
    cdef int qos
    if not connected:
        if ptype != _M5_CONNECT:
            return _M5_PROTOCOL_ERROR, f"first packet has type {ptype}, not CONNECT (MQTT-3.1.0-1)"
        if flags:
            return _M5_MALFORMED, f"CONNECT with flags {flags:#06b} (section 2.1.3)"
        return None
    if ptype == 0:
        return _M5_MALFORMED, "reserved packet type 0 (section 2.1.2)"
    if ptype == _M5_CONNECT:
        return _M5_PROTOCOL_ERROR, "a second CONNECT on one connection (MQTT-3.1.0-2)"
    if ptype in _m5_SERVER_ONLY:
        return _M5_PROTOCOL_ERROR, f"packet type {ptype} is sent by servers only"
    if ptype == _M5_PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            return _M5_MALFORMED, "PUBLISH with QoS 3 (MQTT-3.3.1-4)"
        if flags & 0b1000 and qos == 0:
            return _M5_MALFORMED, "DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2)"
        return None
    if flags != _m5_REQUIRED_FLAGS[ptype]:
        return _M5_MALFORMED, f"packet type {ptype} with flags {flags:#06b} (section 2.1.3)"
    return None


cdef void _m5_init_tables():
    global _m5_NSPECS
    cdef int i, b, c
    for i in range(128):
        _m5_PROP_TYPE[i] = -1
        _m5_PROP_PACKETS[i] = 0
        _m5_PROP_REPEAT[i] = 0
    for spec in _m5_v5.PROPERTIES:
        i = spec.identifier
        _m5_PROP_TYPE[i] = spec.type
        _m5_PROP_PACKETS[i] = sum(1 << t for t in spec.packets)
        _m5_PROP_REPEAT[i] = sum(1 << t for t in spec.repeat_in)
        _m5_PROP_ATTR[i] = spec.attr
        _m5_PROP_NAME[i] = spec.name
        _m5_SPEC_IDENT[_m5_NSPECS] = i
        _m5_NSPECS += 1
    for i in range(16):
        for c in range(256):
            _m5_CODE_OK[i][c] = 0
    for i, codes in _m5_v5.REASON_CODES_BY_PACKET.items():
        for c in codes:
            _m5_CODE_OK[i][c] = 1
    for i in range(2):
        for b in range(256):
            _m5_FIRST_BAD[i][b] = _m5_first_byte_error(<unsigned char>b, i) is not None


_m5_init_tables()


# -- fields ------------------------------------------------------------------------------------


cdef inline Py_ssize_t _m5_vbi(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -2:
    """The Variable Byte Integer at pos[0] (section 1.5.5), pos[0] moved past it;
    -1 if it is cut off at end (pos[0] unchanged). As v5.decode_vbi."""
    cdef Py_ssize_t i = pos[0], value = 0
    cdef int shift = 0
    cdef unsigned char byte
    while True:
        if i >= end:
            return -1
        byte = p[i]
        i += 1
        value |= (<Py_ssize_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            if byte == 0 and i - pos[0] > 1:
                raise _m5_Error(_M5_MALFORMED, "variable byte integer not in its shortest form (MQTT-1.5.5-1)")
            pos[0] = i
            return value
        if i - pos[0] == 4:
            raise _m5_Error(_M5_MALFORMED, "variable byte integer longer than 4 bytes (section 1.5.5)")
        shift += 7


cdef inline long _m5_u16(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end, str what) except -1:
    if pos[0] + 2 > end:
        raise _m5_Error(_M5_MALFORMED, what)
    pos[0] += 2
    return (p[pos[0] - 2] << 8) | p[pos[0] - 1]


cdef inline Py_ssize_t _m5_field(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
    """A two-byte length and that many bytes (sections 1.5.4, 1.5.6): their offset; the length is pos[0] - offset."""
    cdef Py_ssize_t n = _m5_u16(p, pos, end, "packet ends inside a length prefix")
    if pos[0] + n > end:
        raise _m5_Error(_M5_MALFORMED, "length prefix runs past the end of its field")
    pos[0] += n
    return pos[0] - n


cdef long _m5_forbidden(const unsigned char* p, Py_ssize_t n):
    """The first code point of well-formed UTF-8 p[:n] that section 1.5.4 forbids
    (as v5._FORBIDDEN: U+0000-U+001F, U+007F-U+009F, U+FDD0-U+FDEF, U+xFFFE/U+xFFFF), else -1.
    Works on the bytes: the string is built only once it is known to be valid."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c
    cdef long cp
    while i < n:
        c = p[i]
        if c < 0x80:
            if c < 0x20 or c == 0x7F:
                return c
            i += 1
        elif c < 0xE0:
            cp = ((c & 0x1F) << 6) | (p[i + 1] & 0x3F)
            if cp <= 0x9F:
                return cp
            i += 2
        elif c < 0xF0:
            cp = ((c & 0x0F) << 12) | ((p[i + 1] & 0x3F) << 6) | (p[i + 2] & 0x3F)
            if 0xFDD0 <= cp <= 0xFDEF or cp >= 0xFFFE:
                return cp
            i += 3
        else:
            cp = ((c & 0x07) << 18) | ((p[i + 1] & 0x3F) << 12) | ((p[i + 2] & 0x3F) << 6) | (p[i + 3] & 0x3F)
            if (cp & 0xFFFF) >= 0xFFFE:
                return cp
            i += 4
    return -1


cdef inline uint64_t _m5_not_printable(uint64_t w):
    """Bit 7 of a byte set where some byte of w is outside 0x20..0x7E (never
    where none is): the high bit itself, below 0x20 (w - 0x20 borrows into
    bit 7 of a byte whose own bit 7 is clear), or 0x7F (0x7F + 1 = 0x80).
    Borrows and carries only cross bytes after an offending byte. (The 3.1.1
    codec has its own copy: the two codecs do not reach into each other.)"""
    return (((w - 0x2020202020202020ULL) & ~w) | (w + 0x0101010101010101ULL) | w) & 0x8080808080808080ULL


cdef inline bint _m5_printable_ascii(const unsigned char* p, Py_ssize_t n):
    """All n bytes in 0x20..0x7E, eight at a time: a trace context value is
    55 bytes, and the byte loop was a tenth of a PUBLISH with properties."""
    cdef uint64_t w, bad = 0
    cdef Py_ssize_t i = 0
    if n < 8:
        for i in range(n):
            if p[i] < 0x20 or p[i] > 0x7E:
                return False
        return True
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        bad |= _m5_not_printable(w)
        i += 8
    if i < n:
        memcpy(&w, p + n - 8, 8)  # the last 8 bytes, overlapping what was checked (n >= 8)
        bad |= _m5_not_printable(w)
    return bad == 0


cdef str _m5_utf8(const unsigned char* p, Py_ssize_t n):
    """An MQTT UTF-8 Encoded String, strictly (as v5.check_utf8)."""
    cdef str text
    cdef long bad
    if _m5_printable_ascii(p, n):
        # printable ASCII, the common case: valid as it is, and the str is
        # its bytes (no decoder scan over them again)
        text = PyUnicode_New(n, 127)
        memcpy(PyUnicode_DATA(text), p, n)
        return text
    try:
        # strict: refuses surrogates and overlong forms (MQTT-1.5.4-1)
        text = PyUnicode_DecodeUTF8(<char*>p, n, "strict")
    except UnicodeDecodeError:
        raise _m5_Error(_M5_MALFORMED, "string is not well-formed UTF-8 (MQTT-1.5.4-1)") from None
    bad = _m5_forbidden(p, n)
    if bad >= 0:
        rule = "MQTT-1.5.4-2" if bad == 0 else "section 1.5.4, refused as a MUST"
        raise _m5_Error(_M5_MALFORMED, f"string contains U+{bad:04X} ({rule})")
    return text


# The strings a device repeats in every PUBLISH (its Content Type, the names
# and most values of its User Properties) are decoded once and then found by
# their bytes: a small fixed cache, one slot per role (slot 0 Content Type,
# slot 1 + k the k-th User Property pair, k < 4), each holding the last
# bytes seen there (at most _M5_CACHE_BYTES) and what they gave. A miss
# replaces the slot, so a peer sending new strings every time costs a memcmp
# and a memcpy and grows nothing. Only checked strings get in: the result of
# the checks is a function of the bytes alone, so a hit gives what a decode
# would. Module-wide (not per connection): the decode of the property block
# has no codec (mqtt5_decode_properties), and devices of one fleet send the
# same strings.
cdef enum:
    _M5_CACHE_SLOTS = 5
    _M5_CACHE_PAIRS = 4
    _M5_CACHE_BYTES = 128

cdef Py_ssize_t[_M5_CACHE_SLOTS] _m5_cache_n1     # -1: empty
cdef Py_ssize_t[_M5_CACHE_SLOTS] _m5_cache_n2     # the pair's value length (slots 1..)
cdef unsigned char[_M5_CACHE_SLOTS][_M5_CACHE_BYTES] _m5_cache_raw
cdef list _m5_CACHE_OBJ = [None] * _M5_CACHE_SLOTS   # the str (slot 0) or the (name, value) tuple
for _m5_i in range(_M5_CACHE_SLOTS):
    _m5_cache_n1[_m5_i] = -1
    _m5_cache_n2[_m5_i] = -1


cdef str _m5_cached_utf8(int slot, const unsigned char* p, Py_ssize_t n):
    """_m5_utf8(p, n) through cache slot `slot`."""
    cdef str text
    if n > _M5_CACHE_BYTES:
        return _m5_utf8(p, n)
    if _m5_cache_n1[slot] == n and memcmp(_m5_cache_raw[slot], p, n) == 0:
        return <str><object>PyList_GET_ITEM(_m5_CACHE_OBJ, slot)
    text = _m5_utf8(p, n)
    _m5_cache_n1[slot] = -1     # empty while it changes
    _m5_CACHE_OBJ[slot] = text
    memcpy(_m5_cache_raw[slot], p, n)
    _m5_cache_n1[slot] = n
    return text


cdef tuple _m5_cached_pair(Py_ssize_t k, const unsigned char* p, Py_ssize_t at, Py_ssize_t n,
                           Py_ssize_t at2, Py_ssize_t n2):
    """The k-th User Property (_m5_utf8 of the name, then of the value) through
    its cache slot: the same tuple when both are the last ones seen there, the
    cached name with a newly decoded value when only the name is (a trace id)."""
    cdef int slot = 1 + <int>k
    cdef object name
    cdef tuple pair
    if k >= _M5_CACHE_PAIRS or n + n2 > _M5_CACHE_BYTES:
        return (_m5_utf8(p + at, n), _m5_utf8(p + at2, n2))
    if _m5_cache_n1[slot] == n and memcmp(_m5_cache_raw[slot], p + at, n) == 0:
        if _m5_cache_n2[slot] == n2 and memcmp(_m5_cache_raw[slot] + n, p + at2, n2) == 0:
            return <tuple><object>PyList_GET_ITEM(_m5_CACHE_OBJ, slot)
        name = (<tuple><object>PyList_GET_ITEM(_m5_CACHE_OBJ, slot))[0]
    else:
        name = _m5_utf8(p + at, n)
    pair = (name, _m5_utf8(p + at2, n2))
    _m5_cache_n1[slot] = -1     # empty while it changes
    _m5_CACHE_OBJ[slot] = pair
    memcpy(_m5_cache_raw[slot], p + at, n)
    memcpy(_m5_cache_raw[slot] + n, p + at2, n2)
    _m5_cache_n2[slot] = n2
    _m5_cache_n1[slot] = n
    return pair


cdef inline str _m5_string(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end):
    cdef Py_ssize_t at = _m5_field(p, pos, end)
    return _m5_utf8(p + at, pos[0] - at)


cdef inline bytes _m5_binary(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end):
    cdef Py_ssize_t at = _m5_field(p, pos, end)
    return PyBytes_FromStringAndSize(<char*>(p + at), pos[0] - at)


cdef inline bint _m5_topic_name(const unsigned char* p, Py_ssize_t n):
    """A topic name: at least one character, no wildcard (as v5.valid_topic_name, on
    the UTF-8 bytes: '+' and '#' are ASCII and never inside a multi-byte sequence)."""
    return n > 0 and memchr(p, c'+', n) == NULL and memchr(p, c'#', n) == NULL


cdef inline object _m5_slice(object view, Py_ssize_t start, Py_ssize_t stop):
    """view[start:stop] for `view` a whole memoryview of a bytes object: the same
    steps as _mq_slice of the 3.1.1 codec (see there), kept here so the two
    codecs do not reach into each other's files."""
    cdef object part = PyMemoryView_FromObject(view)
    cdef Py_buffer* b = PyMemoryView_GET_BUFFER(part)
    b.buf = <char*>b.buf + start
    b.len = stop - start
    b.shape[0] = stop - start
    return part


# What a property block holds beyond the Properties object, for the packet
# decoders' own checks without attribute look-ups.
cdef struct _m5_Seen:
    long topic_alias            # -1: absent
    bint subscription_ids
    long long session_expiry    # -1: absent
    bint auth_method
    bint auth_data


cdef object _m5_properties(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end, int packet,
                           _m5_Seen* seen):
    """The property block at pos[0] (section 2.2.2) as v5.decode_properties: the
    Properties, pos[0] moved past it, the checks in the same order."""
    cdef Py_ssize_t q = pos[0], length, stop, at, n, at2, n2, value, npairs = 0
    cdef unsigned long long dup = 0
    cdef int ident, t
    cdef list found
    cdef unsigned char[64] where     # identifier -> its value's index in found, for the bits set in dup
    cdef list pairs = None, sub_ids = None
    cdef object obj
    seen.topic_alias = -1
    seen.subscription_ids = False
    seen.session_expiry = -1
    seen.auth_method = False
    seen.auth_data = False
    length = _m5_vbi(p, &q, end)
    if length < 0:
        raise _m5_Error(_M5_MALFORMED, "packet ends inside the Property Length")
    stop = q + length
    if stop > end:
        raise _m5_Error(_M5_MALFORMED, f"Property Length {length} runs past the end of the packet")
    pos[0] = stop
    if length == 0:
        return _m5_NO_PROPERTIES
    found = []
    while q < stop:
        ident = p[q]
        if ident >= 0x80:
            # A longer identifier: cut off, not in shortest form, or >= 128 and so unknown; v5 says which.
            ident = _m5_vbi(p, &q, stop)
            if ident < 0:
                raise _m5_Error(_M5_MALFORMED, "property block ends inside an identifier")
            raise _m5_Error(_M5_MALFORMED, f"unknown property identifier {ident:#04x} (section 2.2.2.2)")
        q += 1
        t = _m5_PROP_TYPE[ident]
        if t < 0:
            raise _m5_Error(_M5_MALFORMED, f"unknown property identifier {ident:#04x} (section 2.2.2.2)")
        if not (_m5_PROP_PACKETS[ident] >> packet) & 1:
            # 2.2.2.2: "an Identifier which is not valid for its packet type ... is a Malformed Packet"
            raise _m5_Error(_M5_MALFORMED, f"{_m5_PROP_NAME[ident]} is not allowed in {_m5_PACKET_NAMES[packet]} "
                                           "(section 2.2.2.2)")
        value = 0
        obj = None
        if t == _M5_BYTE:
            if q >= stop:
                raise _m5_Error(_M5_MALFORMED, f"{_m5_PROP_NAME[ident]} cut off")
            value = p[q]
            q += 1
        elif t == _M5_TWO_BYTE:
            if q + 2 > stop:
                raise _m5_Error(_M5_MALFORMED, f"{_m5_PROP_NAME[ident]} cut off")
            value = (p[q] << 8) | p[q + 1]
            q += 2
        elif t == _M5_FOUR_BYTE:
            if q + 4 > stop:
                raise _m5_Error(_M5_MALFORMED, f"{_m5_PROP_NAME[ident]} cut off")
            value = ((<Py_ssize_t>p[q] << 24) | (<Py_ssize_t>p[q + 1] << 16) | (<Py_ssize_t>p[q + 2] << 8)
                     | <Py_ssize_t>p[q + 3])
            q += 4
        elif t == _M5_VBI:
            value = _m5_vbi(p, &q, stop)
            if value < 0:
                raise _m5_Error(_M5_MALFORMED, f"{_m5_PROP_NAME[ident]} cut off")
        elif t == _M5_UTF8_PAIR:
            at = _m5_field(p, &q, stop)
            n = q - at
            at2 = _m5_field(p, &q, stop)
            n2 = q - at2
            obj = _m5_cached_pair(npairs, p, at, n, at2, n2)
            npairs += 1
        else:
            at = _m5_field(p, &q, stop)
            n = q - at
            if t == _M5_UTF8:
                obj = _m5_cached_utf8(0, p + at, n) if ident == 0x03 else _m5_utf8(p + at, n)
                # Response Topic is a topic name (MQTT-3.3.2-14), checked on the bytes
                if ident == 0x08 and not _m5_topic_name(p + at, n):
                    raise _m5_Error(_M5_PROTOCOL_ERROR, f"Response Topic {obj!r} is not a topic name (MQTT-3.3.2-14)")
            else:
                obj = PyBytes_FromStringAndSize(<char*>(p + at), n)
        # the value rules of v5._value_error, in its order
        if t <= _M5_VBI:
            if ident in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A):
                if value > 1:
                    raise _m5_Error(_M5_PROTOCOL_ERROR, f"{_m5_PROP_NAME[ident]} {value!r}, not 0 or 1")
            elif value == 0:
                if ident == 0x21 or ident == 0x27 or ident == 0x0B:
                    raise _m5_Error(_M5_PROTOCOL_ERROR, f"{_m5_PROP_NAME[ident]} 0")
                if ident == 0x23:
                    raise _m5_Error(_M5_TOPIC_ALIAS_INVALID, "Topic Alias 0 (MQTT-3.3.2-8)")
        if ident == 0x26:
            if pairs is None:
                pairs = []
            pairs.append(obj)
            continue
        if ident == 0x0B:
            if sub_ids is not None and not (_m5_PROP_REPEAT[ident] >> packet) & 1:
                raise _m5_Error(_M5_PROTOCOL_ERROR, f"{_m5_PROP_NAME[ident]} twice in {_m5_PACKET_NAMES[packet]} "
                                                    "(3.8.2.1.2)")
            if sub_ids is None:
                sub_ids = []
            sub_ids.append(value)
            seen.subscription_ids = True
            continue
        if (dup >> ident) & 1:
            raise _m5_Error(_M5_PROTOCOL_ERROR, f"{_m5_PROP_NAME[ident]} twice in {_m5_PACKET_NAMES[packet]} "
                                                "(section 2.2.2.2)")
        dup |= 1ULL << ident
        if t <= _M5_VBI:
            obj = value
            if ident == 0x23:
                seen.topic_alias = value
            elif ident == 0x11:
                seen.session_expiry = value
        elif ident == 0x15:
            seen.auth_method = True
        elif ident == 0x16:
            seen.auth_data = True
        where[ident] = len(found)
        found.append(obj)
    if pairs is not None:
        where[0x26] = len(found)
        found.append(tuple(pairs))
        dup |= 1ULL << 0x26
    if sub_ids is not None:
        where[0x0B] = len(found)
        found.append(tuple(sub_ids))
        dup |= 1ULL << 0x0B
    return _m5_build_properties(found, where, dup)


# The Properties are built with a vectorcall: values in an array, their field
# names in a tuple. Through a kwargs dict, msgspec's __init__ took about twice
# as long, the largest single cost of a PUBLISH with properties. The names
# tuple of each set of present properties is kept, up to 256 sets: a device
# sends the same few sets again and again, and a peer trying every
# combination must not grow the cache without bound.
cdef extern from "Python.h":
    object PyObject_Vectorcall(object callable, PyObject** args, size_t nargsf, object kwnames)

cdef extern from *:
    int _m5_ctz "__builtin_ctzll"(unsigned long long x)

cdef dict _m5_KWNAMES = {}
# The last set's names without the dict: a device sends one set, and the
# look-up made a Python int of the 43-bit mask for each PUBLISH.
cdef unsigned long long _m5_last_present = 0
cdef object _m5_last_kwnames = None


cdef object _m5_build_properties(list found, unsigned char* where, unsigned long long present):
    cdef PyObject* argv[64]
    cdef Py_ssize_t n = 0
    cdef int ident
    cdef unsigned long long m = present
    cdef object kwnames
    global _m5_last_present, _m5_last_kwnames
    while m:
        ident = _m5_ctz(m)      # the set bits in ascending order, the kwnames' order
        m &= m - 1
        argv[n] = PyList_GET_ITEM(found, where[ident])   # borrowed: found holds them during the call
        n += 1
    if present == _m5_last_present:
        kwnames = _m5_last_kwnames
    else:
        kwnames = _m5_KWNAMES.get(present)
        if kwnames is None:
            kwnames = tuple([_m5_PROP_ATTR[ident] for ident in range(1, 0x2B) if (present >> ident) & 1])
            if len(_m5_KWNAMES) < 256:
                _m5_KWNAMES[present] = kwnames
        _m5_last_present = 0
        _m5_last_kwnames = kwnames
        _m5_last_present = present
    return PyObject_Vectorcall(_m5_Properties, argv, 0, kwnames)


# -- the codec -------------------------------------------------------------------------------------


cdef class MQTT5Codec:
    """Server side of one MQTT 5.0 connection (sans-IO): the compiled twin of
    gridgate.protocols.mqtt.codec5_py.MQTT5Codec, same arguments, events and errors."""

    cdef Py_ssize_t _max
    cdef long _alias_max
    cdef dict _aliases
    # A packet begun in an earlier read: its bytes so far (None: nothing held
    # back), its fixed header's length (0 while incomplete), its size once known.
    cdef bytearray _partial
    cdef Py_ssize_t _header_len
    cdef Py_ssize_t _need
    cdef bint _connected
    cdef bint _in_connect       # the first byte of a CONNECT has arrived
    cdef bint _disconnected
    cdef object _error
    cdef long long _session_expiry
    cdef object _auth_method
    # The last PUBLISH topic name, raw and decoded (UTF-8 checked): a device
    # publishes to one or two topics, so most packets skip the decode.
    cdef bytes _topic_raw
    cdef str _topic

    def __init__(self, max_packet_bytes=1048576, topic_alias_maximum=0):
        max_packet_bytes = PyNumber_Index(max_packet_bytes)
        if not 2 <= max_packet_bytes <= MQTT5_MAX_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes {max_packet_bytes} outside 2..{MQTT5_MAX_PACKET_BYTES}")
        topic_alias_maximum = PyNumber_Index(topic_alias_maximum)
        if not 0 <= topic_alias_maximum <= 65535:
            raise ValueError(f"topic_alias_maximum {topic_alias_maximum} outside 0..65535")
        self._max = max_packet_bytes
        self._alias_max = topic_alias_maximum
        self._aliases = {}
        self._partial = None
        self._header_len = 0
        self._need = 0
        self._connected = False
        self._in_connect = False
        self._disconnected = False
        self._error = None
        self._session_expiry = 0
        self._auth_method = None
        self._topic_raw = None
        self._topic = None

    @property
    def max_packet_bytes(self):
        return self._max

    @property
    def connected(self):
        """A CONNECT has been decoded."""
        return self._connected

    @property
    def buffered(self):
        """Bytes held back waiting for the rest of a packet."""
        return 0 if self._partial is None else PyByteArray_GET_SIZE(self._partial)

    def feed(self, data):
        """Append `data`; return every complete packet now buffered, in order (see codec5_py)."""
        cdef list events = []
        cdef Py_ssize_t pos = 0
        cdef bytes buf
        cdef object e
        if self._error is not None:
            e = self._error
            raise _m5_Error(e.reason_code, e.detail, e.return_code)
        if PyBytes_CheckExact(data):
            buf = <bytes>data
        else:
            buf = bytes(memoryview(data))  # a mutable buffer could change under the payload slices
        try:
            if self._partial is not None:
                pos = self._finish_partial(buf, events)
                if pos < 0:
                    return events
            self._decode_all(buf, pos, events)
        except _m5_Error as exc:
            if self._in_connect and not self._connected and exc.return_code is None:
                # in the CONNECT itself: the answer is a CONNACK (MQTT-3.14.0-1)
                code = exc.reason_code if _m5_CODE_OK[_M5_CONNACK][<unsigned char>exc.reason_code] else _M5_UNSPECIFIED
                exc = _m5_Error(exc.reason_code, exc.detail, code)
            self._error = exc
            self._partial = None
            self._header_len = 0
            self._need = 0
            raise exc from None
        return events

    # -- framing -------------------------------------------------------------------

    cdef Py_ssize_t _header(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                            Py_ssize_t* size) except -1:
        """Fixed header at pos: its length and the packet size in size[0]; 0 if incomplete."""
        cdef unsigned char first = p[pos]
        cdef Py_ssize_t i = pos + 1, length
        if self._disconnected:
            raise _m5_Error(_M5_PROTOCOL_ERROR, "bytes after DISCONNECT (MQTT-3.14.4-1)")
        if not self._connected and first >> 4 == _M5_CONNECT:
            self._in_connect = True
        if _m5_FIRST_BAD[self._connected][first]:
            raise _m5_Error(*_m5_first_byte_error(first, self._connected))
        length = _m5_vbi(p, &i, end)
        if length < 0:
            return 0
        size[0] = i - pos + length
        if size[0] > self._max:
            raise _m5_Error(_M5_TOO_LARGE, f"packet of {size[0]} bytes exceeds max_packet_bytes {self._max}")
        return i - pos

    cdef Py_ssize_t _finish_partial(self, bytes buf, list events) except -2:
        """Complete the held-back packet from the head of buf: bytes taken, or -1 if buf was all used."""
        cdef bytearray partial = self._partial
        cdef const unsigned char* d = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t have = PyByteArray_GET_SIZE(partial)
        cdef Py_ssize_t k, header_len, size = 0, missing
        cdef unsigned char[16] head
        cdef bytes packet
        cdef unsigned char* q
        if self._header_len == 0:
            # The header is still incomplete, so partial holds at most 4 bytes
            # (type byte + 3 length bytes); 5 more always settle it.
            if have > 4:
                raise AssertionError("incomplete MQTT fixed header longer than 4 bytes")
            k = n if n < 5 else 5
            memcpy(head, PyByteArray_AS_STRING(partial), have)
            memcpy(head + have, d, k)
            header_len = self._header(head, 0, have + k, &size)
            if header_len == 0:
                partial.extend(buf)
                return -1
            self._header_len = header_len
            self._need = size
        missing = self._need - have
        if missing > n:
            partial.extend(buf)
            return -1
        # Only this packet is copied: what was held back + its tail from buf.
        packet = PyBytes_FromStringAndSize(NULL, self._need)
        q = <unsigned char*>PyBytes_AS_STRING(packet)
        memcpy(q, PyByteArray_AS_STRING(partial), have)
        memcpy(q + have, d, missing)
        header_len = self._header_len
        self._partial = None
        self._header_len = 0
        self._need = 0
        events.append(self._decode(q[0], q, header_len, PyBytes_GET_SIZE(packet), PyMemoryView_FromObject(packet)))
        return missing

    cdef int _decode_all(self, bytes buf, Py_ssize_t pos, list events) except -1:
        """Decode the complete packets of buf from pos; hold back a trailing fragment."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(buf), header_len, size = 0
        cdef object view = None
        while pos < end:
            header_len = self._header(p, pos, end, &size)
            if header_len == 0 or size > end - pos:
                self._partial = PyByteArray_FromStringAndSize(<char*>(p + pos), end - pos)
                self._header_len = header_len
                self._need = size if header_len else 0
                return 0
            if view is None:
                view = PyMemoryView_FromObject(buf)
            events.append(self._decode(p[pos], p, pos + header_len, pos + size, view))
            pos += size
        return 0

    # -- packets ------------------------------------------------------------------

    cdef object _decode(self, unsigned char first, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                        object view):
        """One packet whose first byte passed _m5_FIRST_BAD; its body is p[start:end]."""
        cdef int ptype = first >> 4
        if ptype == _M5_PUBLISH:
            return self._publish(first, p, start, end, view)
        if _M5_PUBACK <= ptype <= _M5_PUBCOMP:
            return self._ack(ptype, p, start, end)
        if ptype == _M5_SUBSCRIBE:
            return self._subscribe(p, start, end)
        if ptype == _M5_UNSUBSCRIBE:
            return self._unsubscribe(p, start, end)
        if ptype == _M5_CONNECT:
            return self._connect(p, start, end)
        if ptype == _M5_PINGREQ:
            if end != start:
                raise _m5_Error(_M5_MALFORMED, f"PINGREQ with remaining length {end - start}")
            return _m5_PingReq()
        if ptype == _M5_DISCONNECT:
            return self._disconnect(p, start, end)
        return self._auth(p, start, end)

    cdef object _reason_and_properties(self, int ptype, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                                       int* code, _m5_Seen* seen):
        """A reason code (in code[0]) and properties that may be omitted at the end of
        a packet (3.4.2.1 and its siblings, 3.14.2.1, 3.15.2.1), as the twin's."""
        cdef object props
        seen.session_expiry = -1
        seen.auth_method = False
        if pos == end:
            code[0] = 0
            return _m5_Properties()
        code[0] = p[pos]
        if not _m5_CODE_OK[ptype][code[0]]:
            raise _m5_Error(_M5_PROTOCOL_ERROR, f"reason code {code[0]:#04x} is not one of packet type {ptype}")
        if pos + 1 == end:
            return _m5_Properties()
        pos += 1
        props = _m5_properties(p, &pos, end, ptype, seen)
        if pos != end:
            raise _m5_Error(_M5_MALFORMED, f"{end - pos} bytes after the properties of packet type {ptype}")
        return props

    cdef inline long _packet_id(self, const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
        cdef long pid = _m5_u16(p, pos, end, "packet ends inside a two-byte integer")
        if pid == 0:
            # MQTT-2.2.1-3: a non-zero Packet Identifier; it parses, so a Protocol Error (4.13)
            raise _m5_Error(_M5_PROTOCOL_ERROR, "packet identifier 0 (MQTT-2.2.1-3)")
        return pid

    cdef object _ack(self, int ptype, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        """PUBACK, PUBREC, PUBREL, PUBCOMP (sections 3.4-3.7)."""
        cdef Py_ssize_t pos = start
        cdef long pid = self._packet_id(p, &pos, end)
        cdef int code = 0
        cdef _m5_Seen seen
        cdef object props = self._reason_and_properties(ptype, p, pos, end, &code, &seen)
        if ptype == _M5_PUBACK:
            return _m5_PubAck5(pid, code, props)
        if ptype == _M5_PUBREC:
            return _m5_PubRec5(pid, code, props)
        if ptype == _M5_PUBREL:
            return _m5_PubRel5(pid, code, props)
        return _m5_PubComp5(pid, code, props)

    cdef object _publish(self, unsigned char first, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                         object view):
        """PUBLISH (section 3.3); the flags were checked on the first byte."""
        cdef int qos = (first >> 1) & 3
        cdef Py_ssize_t pos = start, at, n
        cdef long pid = 0
        cdef str topic
        cdef object props, known
        cdef _m5_Seen seen
        at = _m5_field(p, &pos, end)
        n = pos - at
        if (n != 0 and self._topic_raw is not None and n == PyBytes_GET_SIZE(self._topic_raw)
                and memcmp(p + at, PyBytes_AS_STRING(self._topic_raw), n) == 0):
            topic = self._topic
        else:
            topic = _m5_utf8(p + at, n)
            if n:
                self._topic_raw = PyBytes_FromStringAndSize(<char*>(p + at), n)
                self._topic = topic
        if qos:
            pid = self._packet_id(p, &pos, end)
        if pos < end and p[pos] == 0:
            # an empty property block, as most devices send: what _m5_properties gives for it, without the call
            pos += 1
            props = _m5_NO_PROPERTIES
            seen.subscription_ids = False
            seen.topic_alias = -1
        else:
            props = _m5_properties(p, &pos, end, _M5_PUBLISH, &seen)
        if seen.subscription_ids:
            raise _m5_Error(_M5_PROTOCOL_ERROR, "Subscription Identifier in a client's PUBLISH (MQTT-3.3.4-6)")
        if n and not _m5_topic_name(p + at, n):
            raise _m5_Error(_M5_PROTOCOL_ERROR, f"wildcard in topic name {topic[:64]!r} (MQTT-3.3.2-2)")
        if seen.topic_alias >= 0:
            if seen.topic_alias > self._alias_max:
                raise _m5_Error(_M5_TOPIC_ALIAS_INVALID, f"Topic Alias {seen.topic_alias} above the maximum "
                                                         f"{self._alias_max} (MQTT-3.3.2-9/12)")
            if n:
                self._aliases[seen.topic_alias] = topic  # 3.3.2.3.4: a name with an alias sets the mapping
            else:
                known = self._aliases.get(seen.topic_alias)
                if known is None:
                    raise _m5_Error(_M5_PROTOCOL_ERROR, f"Topic Alias {seen.topic_alias} has no mapping yet "
                                                        "(3.3.2.3.4)")
                topic = known
        elif not n:
            raise _m5_Error(_M5_PROTOCOL_ERROR, "empty topic name without a Topic Alias (3.3.2.1)")
        return _m5_Publish5(topic, _m5_slice(view, pos, end), qos, pid, (first & 1) != 0, (first & 8) != 0, props)

    cdef object _subscribe(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        """SUBSCRIBE (section 3.8)."""
        cdef Py_ssize_t pos = start
        cdef long pid = self._packet_id(p, &pos, end)
        cdef _m5_Seen seen
        cdef object props = _m5_properties(p, &pos, end, _M5_SUBSCRIBE, &seen)
        cdef list subs = []
        cdef str topic
        cdef int options, qos, retain_handling
        cdef bint no_local
        if pos == end:
            raise _m5_Error(_M5_PROTOCOL_ERROR, "SUBSCRIBE without a topic filter (MQTT-3.8.3-2)")
        while pos < end:
            topic = _m5_string(p, &pos, end)
            if pos >= end:
                raise _m5_Error(_M5_MALFORMED, "SUBSCRIBE ends before the Subscription Options")
            options = p[pos]
            pos += 1
            if options & 0xC0:
                raise _m5_Error(_M5_MALFORMED, f"reserved Subscription Options bits in {options:#04x} "
                                               "(MQTT-3.8.3-5)")
            qos = options & 3
            retain_handling = (options >> 4) & 3
            if qos == 3:
                raise _m5_Error(_M5_PROTOCOL_ERROR, "Maximum QoS 3 in Subscription Options (3.8.3.1)")
            if retain_handling == 3:
                raise _m5_Error(_M5_PROTOCOL_ERROR, "Retain Handling 3 in Subscription Options (3.8.3.1)")
            no_local = (options & 4) != 0
            if no_local and topic.startswith("$share/"):
                raise _m5_Error(_M5_PROTOCOL_ERROR, "No Local on a Shared Subscription (MQTT-3.8.3-4)")
            subs.append(_m5_Subscription(topic, qos, no_local, (options & 8) != 0, retain_handling))
        return _m5_Subscribe5(pid, tuple(subs), props)

    cdef object _unsubscribe(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        """UNSUBSCRIBE (section 3.10)."""
        cdef Py_ssize_t pos = start
        cdef long pid = self._packet_id(p, &pos, end)
        cdef _m5_Seen seen
        cdef object props = _m5_properties(p, &pos, end, _M5_UNSUBSCRIBE, &seen)
        cdef list filters = []
        if pos == end:
            raise _m5_Error(_M5_PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter (MQTT-3.10.3-2)")
        while pos < end:
            filters.append(_m5_string(p, &pos, end))
        return _m5_Unsubscribe5(pid, tuple(filters), props)

    cdef object _disconnect(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        """DISCONNECT from the client (section 3.14)."""
        cdef int code = 0
        cdef _m5_Seen seen
        cdef object props = self._reason_and_properties(_M5_DISCONNECT, p, start, end, &code, &seen)
        if seen.session_expiry > 0 and not self._session_expiry:
            raise _m5_Error(_M5_PROTOCOL_ERROR, "non-zero Session Expiry Interval in DISCONNECT after 0 in CONNECT "
                                                "(3.14.2.2.2)")
        self._disconnected = True
        return _m5_Disconnect5(code, props)

    cdef object _auth(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        """AUTH from the client (section 3.15, section 4.12)."""
        cdef int code = 0
        cdef _m5_Seen seen
        cdef object props = self._reason_and_properties(_M5_AUTH, p, start, end, &code, &seen)
        if code == 0:
            # table 3.15.2.1: Success is sent by the server only; a client continues (0x18) or re-authenticates (0x19)
            raise _m5_Error(_M5_PROTOCOL_ERROR, "AUTH with reason code 0x00 from a client (3.15.2.1)")
        if self._auth_method is None:
            raise _m5_Error(_M5_PROTOCOL_ERROR, "AUTH after a CONNECT without Authentication Method (section 4.12)")
        if props.authentication_method != self._auth_method:
            raise _m5_Error(_M5_PROTOCOL_ERROR, "AUTH without the CONNECT's Authentication Method (3.15.2.2.2, "
                                                "section 4.12)")
        return _m5_Auth(code, props)

    cdef object _connect(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        """CONNECT (section 3.1), checks in the twin's order."""
        cdef Py_ssize_t pos = start, at
        cdef bytes name
        cdef int level, flags, will_qos
        cdef long keepalive
        cdef bint will_flag, will_retain
        cdef _m5_Seen seen, will_seen
        cdef object props, will = None, will_props, username = None, password = None
        cdef str client_id, will_topic
        cdef bytes will_payload
        # Protocol name and version first (3.1.2.1, 3.1.2.2)
        name = _m5_binary(p, &pos, end)
        if pos >= end:
            raise _m5_Error(_M5_MALFORMED, "CONNECT ends before the protocol version")
        level = p[pos]
        pos += 1
        if name != b"MQTT" or level != 5:
            raise _m5_Error(_M5_UNSUPPORTED_VERSION, f"protocol {name[:16]!r} level {level}, not MQTT 5")
        if pos >= end:
            raise _m5_Error(_M5_MALFORMED, "CONNECT ends before the connect flags")
        flags = p[pos]
        pos += 1
        keepalive = _m5_u16(p, &pos, end, "packet ends inside a two-byte integer")
        if flags & 0x01:
            raise _m5_Error(_M5_MALFORMED, "reserved CONNECT flag set (MQTT-3.1.2-3)")
        will_flag = (flags & 0x04) != 0
        will_qos = (flags >> 3) & 3
        will_retain = (flags & 0x20) != 0
        if not will_flag and (will_qos or will_retain):
            raise _m5_Error(_M5_MALFORMED, "Will QoS/Retain without the Will flag (MQTT-3.1.2-11/13/15)")
        if will_qos == 3:
            raise _m5_Error(_M5_MALFORMED, "Will QoS 3 (3.1.2.6)")
        props = _m5_properties(p, &pos, end, _M5_CONNECT, &seen)
        if seen.auth_data and not seen.auth_method:
            raise _m5_Error(_M5_PROTOCOL_ERROR, "Authentication Data without Authentication Method (3.1.2.11.10)")
        # Payload (3.1.3): client id, Will Properties, Will Topic, Will Payload, user name, password
        client_id = _m5_string(p, &pos, end)
        if will_flag:
            will_props = _m5_properties(p, &pos, end, _M5_WILL, &will_seen)
            at = _m5_field(p, &pos, end)
            will_topic = _m5_utf8(p + at, pos - at)
            if not _m5_topic_name(p + at, pos - at):
                raise _m5_Error(_M5_PROTOCOL_ERROR, f"Will Topic {will_topic[:64]!r} is not a topic name (3.1.3.3)")
            will_payload = _m5_binary(p, &pos, end)
            will = _m5_Will5(will_topic, will_payload, will_qos, will_retain, will_props)
        if flags & 0x80:
            username = _m5_string(p, &pos, end)
        if flags & 0x40:
            password = _m5_binary(p, &pos, end)
        if pos != end:
            raise _m5_Error(_M5_MALFORMED, f"{end - pos} bytes after the CONNECT payload")
        self._connected = True
        self._session_expiry = seen.session_expiry if seen.session_expiry > 0 else 0
        self._auth_method = props.authentication_method if seen.auth_method else None
        return _m5_Connect5((flags & 0x02) != 0, keepalive, client_id, will, username, password, props)


# -- encoders (server to client) ---------------------------------------------------------------------
#
# Exported as mqtt5_encode_*: gridgate.protocols.mqtt.codec5 gives them the
# twin's names (encode_*), which the 3.1.1 codec's encoders hold here.


cdef long _m5_pid(object packet_id) except -1:
    """A packet identifier 1..65535 or ValueError (as codec5_py._pid)."""
    cdef int overflow = 0
    cdef long value
    if not PyLong_CheckExact(packet_id):
        packet_id = PyNumber_Index(packet_id)
    value = PyLong_AsLongAndOverflow(packet_id, &overflow)
    if overflow or value < 1 or value > 65535:
        raise ValueError(f"packet id {packet_id} outside 1..65535")
    return value


cdef int _m5_code(int ptype, object reason_code, str what) except -1:
    """A reason code ``ptype`` may carry, or ValueError (as codec5_py._code)."""
    cdef int overflow = 0
    cdef long value
    if not PyLong_CheckExact(reason_code):
        reason_code = PyNumber_Index(reason_code)
    value = PyLong_AsLongAndOverflow(reason_code, &overflow)
    if overflow or value < 0 or value > 255 or not _m5_CODE_OK[ptype][value]:
        raise ValueError(f"reason code {reason_code:#04x} is not one of {what}")
    return value


cdef Py_ssize_t _m5_put_vbi(unsigned char* q, Py_ssize_t n):
    """Write the Variable Byte Integer n at q; returns its length."""
    cdef Py_ssize_t k = 0
    while True:
        if n > 0x7F:
            q[k] = (n & 0x7F) | 0x80
            n >>= 7
            k += 1
        else:
            q[k] = <unsigned char>n
            return k + 1


cdef inline Py_ssize_t _m5_vbi_size(Py_ssize_t n):
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


cdef bytes _m5_packet(unsigned char first, const unsigned char* body, Py_ssize_t n):
    """The fixed header and body (as codec5_py._packet)."""
    cdef bytes out
    cdef unsigned char* q
    cdef Py_ssize_t h
    if n > _m5_MAX_VBI:
        raise ValueError(f"remaining length {n}, more than {_m5_MAX_VBI}")
    h = 1 + _m5_vbi_size(n)
    out = PyBytes_FromStringAndSize(NULL, h + n)
    q = <unsigned char*>PyBytes_AS_STRING(out)
    q[0] = first
    _m5_put_vbi(q + 1, n)
    memcpy(q + h, body, n)
    return out


cdef int _m5_put_binary(bytearray out, object raw, str what) except -1:
    """A two-byte length and ``raw`` (bytes) appended to out, or ValueError over 65535 bytes."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    if n > 65535:
        raise ValueError(f"{what} of {n} bytes, more than 65535")
    out.append((n >> 8) & 0xFF)
    out.append(n & 0xFF)
    out += raw
    return 0


cdef int _m5_put_string(bytearray out, object value, str what) except -1:
    """An MQTT UTF-8 string appended to out (as v5._encode_string): TypeError for a
    non-str, ValueError for a lone surrogate or a character section 1.5.4 forbids."""
    cdef bytes raw
    cdef const unsigned char* p
    cdef Py_ssize_t n, i
    cdef long bad
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    try:
        raw = (<str>value).encode("utf-8")   # refuses lone surrogates
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {value[:64]!r} is not an MQTT UTF-8 string: {exc}") from None
    # What str.encode gives is well-formed UTF-8: only the forbidden characters are left to check.
    p = <const unsigned char*>PyBytes_AS_STRING(raw)
    n = PyBytes_GET_SIZE(raw)
    for i in range(n):
        if p[i] < 0x20 or p[i] >= 0x7F:
            bad = _m5_forbidden(p, n)
            if bad >= 0:
                raise ValueError(f"{what} {value[:64]!r} is not an MQTT UTF-8 string: it contains U+{bad:04X}")
            break
    return _m5_put_binary(out, raw, what)


cdef int _m5_put_bytes(bytearray out, object value, str what) except -1:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    return _m5_put_binary(out, bytes(value), what)


cdef object _m5_value_error(int ident, str name, object value):
    """The detail of v5._value_error for a value the spec forbids, else None (Python
    comparisons, as the twin's: the value may be any object a caller put in a Properties)."""
    if ident in _m5_ZERO_ONE and value not in (0, 1):
        return f"{name} {value!r}, not 0 or 1"
    if value == 0 and (ident == 0x21 or ident == 0x27 or ident == 0x0B):
        return f"{name} 0"
    if ident == 0x23 and value == 0:
        return "Topic Alias 0 (MQTT-3.3.2-8)"
    if ident == 0x08 and not (isinstance(value, str) and value and "+" not in value and "#" not in value):
        return f"Response Topic {value!r} is not a topic name (MQTT-3.3.2-14)"
    return None


cdef int _m5_put_property(bytearray out, int ident, str name, int t, object value) except -1:
    """One property (as v5._encode_one)."""
    cdef Py_ssize_t size, limit, k
    cdef unsigned char[4] vbi
    cdef long long n
    if t == _M5_UTF8_PAIR:
        if not (isinstance(value, tuple) and len(value) == 2):
            raise TypeError(f"a User Property is a (name, value) pair, not {value!r}")
        out.append(ident)
        _m5_put_string(out, value[0], "User Property name")
        _m5_put_string(out, value[1], "User Property value")
        return 0
    if t == _M5_UTF8:
        out.append(ident)
        return _m5_put_string(out, value, name)
    if t == _M5_BINARY:
        out.append(ident)
        return _m5_put_bytes(out, value, name)
    if type(value) is not int:
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if t == _M5_VBI:
        if not 0 <= value <= _m5_MAX_VBI:
            raise ValueError(f"variable byte integer {value} outside 0..{_m5_MAX_VBI}")
        out.append(ident)
        out += PyBytes_FromStringAndSize(<char*>vbi, _m5_put_vbi(vbi, value))
        return 0
    size = 1 if t == _M5_BYTE else 2 if t == _M5_TWO_BYTE else 4
    if not 0 <= value < (<long long>1) << (8 * size):
        raise ValueError(f"{name} {value} does not fit in {size} byte(s)")
    n = value
    out.append(ident)
    for k in range(size - 1, -1, -1):
        out.append((n >> (8 * k)) & 0xFF)
    return 0


# The identifiers whose values v5._value_error checks; for the others (Reason
# String, User Property, ...) the encoder skips the call.
cdef unsigned long long _m5_CHECKED = 0
for _m5_i in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A, 0x21, 0x27, 0x0B, 0x23, 0x08):
    _m5_CHECKED |= 1ULL << _m5_i
# A Properties' fields are read by slot (_slot_offsets in _fastparse_mqtt.pxi):
# every ack the session sends goes through the 27 fields, and 27 getattr()
# calls were most of an ack's cost.
cdef Py_ssize_t[64] _m5_FIELD_OFFSET
cdef bint _m5_FIELDS_BY_OFFSET = _slot_offsets(
    _m5_Properties, tuple([_m5_PROP_ATTR[_m5_SPEC_IDENT[_m5_k]] for _m5_k in range(_m5_NSPECS)]), _m5_FIELD_OFFSET, 64)


cdef bytes _m5_encode_properties(object props, int packet, bint drop):
    """Property Length and the properties (as v5.encode_properties); ``drop``: without
    Reason String and User Properties (codec5_py._fit's second try). The session
    encodes one ack a reading, most with no properties or a Reason String alone,
    so a Properties' fields are read in one astuple() call and only the present
    ones cost more."""
    cdef bytearray out
    cdef int ident
    cdef str name
    cdef object value, bad
    cdef bint by_offset = False
    cdef bytes result
    cdef PyObject* slot
    cdef Py_ssize_t n, k
    cdef unsigned char[4] vbi
    if props is None:
        return b"\x00"
    if type(props) is _m5_Properties and _m5_FIELDS_BY_OFFSET:
        # Equal to NO_PROPERTIES or not, the walk below gives b"\x00" for one
        # whose fields are all None or (): the twin's shortcut is only a shortcut.
        by_offset = True
    elif props == _m5_NO_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for k in range(_m5_NSPECS):
        ident = _m5_SPEC_IDENT[k]
        if drop and (ident == 0x1F or ident == 0x26):
            continue
        if by_offset:
            slot = (<PyObject**>((<char*><PyObject*>props) + _m5_FIELD_OFFSET[k]))[0]
            if slot == <PyObject*>None:
                continue
            value = <object>slot if slot != NULL else getattr(props, _m5_PROP_ATTR[ident])
        else:
            value = getattr(props, _m5_PROP_ATTR[ident])
        # a str, int or bytes is never equal to (): the comparison is only for other types
        if value is None or (type(value) is not str and type(value) is not int and type(value) is not bytes
                             and value == ()):
            continue
        name = _m5_PROP_NAME[ident]
        if not (_m5_PROP_PACKETS[ident] >> packet) & 1:
            raise ValueError(f"{name} is not allowed in {_m5_PACKET_NAMES[packet]}")
        if ident != 0x26 and ident != 0x0B:
            # one value: no (value,) tuple to walk, as there is for the two repeatable properties
            if (_m5_CHECKED >> ident) & 1:
                bad = _m5_value_error(ident, name, value)
                if bad is not None:
                    raise ValueError(bad)
            _m5_put_property(out, ident, name, _m5_PROP_TYPE[ident], value)
            continue
        if len(value) > 1 and not (_m5_PROP_REPEAT[ident] >> packet) & 1:
            raise ValueError(f"{name} more than once in {_m5_PACKET_NAMES[packet]}")
        for v in value:
            if (_m5_CHECKED >> ident) & 1:
                bad = _m5_value_error(ident, name, v)
                if bad is not None:
                    raise ValueError(bad)
            _m5_put_property(out, ident, name, _m5_PROP_TYPE[ident], v)
    n = PyByteArray_GET_SIZE(out)
    if n > _m5_MAX_VBI:
        raise ValueError(f"variable byte integer {n} outside 0..{_m5_MAX_VBI}")
    k = _m5_put_vbi(vbi, n)
    result = PyBytes_FromStringAndSize(NULL, k + n)
    memcpy(PyBytes_AS_STRING(result), vbi, k)
    memcpy(PyBytes_AS_STRING(result) + k, PyByteArray_AS_STRING(out), n)
    return result


cdef inline bint _m5_over(bytes raw, object properties, object max_packet_size) except -1:
    """Whether codec5_py._fit builds again without Reason String and User Properties."""
    return not (max_packet_size is None or PyBytes_GET_SIZE(raw) <= max_packet_size or properties is None)


cdef bytes _m5_ack(int ptype, unsigned char first, long pid, int code, object properties, bint drop):
    """An ack's bytes in the shortest form (3.4.2.1, 3.4.2.2.1): no properties ->
    no Property Length; Success and no properties -> no reason code either.
    The PUBACK/PUBREC of every reading go through here, so the whole packet
    is written into one buffer."""
    cdef bytes props = _m5_encode_properties(properties, ptype, drop)
    cdef Py_ssize_t np = PyBytes_GET_SIZE(props), body, h
    cdef bytes out
    cdef unsigned char* q
    if np == 1:     # b"\x00": no properties
        body = 2 if code == 0 else 3
        np = 0
    else:
        body = 3 + np
    if body > _m5_MAX_VBI:
        raise ValueError(f"remaining length {body}, more than {_m5_MAX_VBI}")
    h = 1 + _m5_vbi_size(body)
    out = PyBytes_FromStringAndSize(NULL, h + body)
    q = <unsigned char*>PyBytes_AS_STRING(out)
    q[0] = first
    _m5_put_vbi(q + 1, body)
    q[h] = <unsigned char>(pid >> 8)
    q[h + 1] = <unsigned char>(pid & 0xFF)
    if body > 2:
        q[h + 2] = <unsigned char>code
    if np:
        memcpy(q + h + 3, PyBytes_AS_STRING(props), np)
    return out


cdef bytes _m5_encode_ack(int ptype, unsigned char first, object packet_id, object reason_code, object properties,
                          str what, object max_packet_size):
    cdef long pid = _m5_pid(packet_id)
    cdef int code = _m5_code(ptype, reason_code, what)
    cdef bytes raw
    raw = _m5_ack(ptype, first, pid, code, properties, False)
    if _m5_over(raw, properties, max_packet_size):
        return _m5_ack(ptype, first, pid, code, properties, True)
    return raw


def mqtt5_encode_puback(packet_id, reason_code=0, properties=None, max_packet_size=None):
    """PUBACK (3.4), shortest form the spec allows (codec5_py.encode_puback)."""
    return _m5_encode_ack(_M5_PUBACK, 0x40, packet_id, reason_code, properties, "PUBACK", max_packet_size)


def mqtt5_encode_pubrec(packet_id, reason_code=0, properties=None, max_packet_size=None):
    """PUBREC (3.5) (codec5_py.encode_pubrec)."""
    return _m5_encode_ack(_M5_PUBREC, 0x50, packet_id, reason_code, properties, "PUBREC", max_packet_size)


def mqtt5_encode_pubrel(packet_id, reason_code=0, properties=None, max_packet_size=None):
    """PUBREL (3.6), flags 0b0010 (codec5_py.encode_pubrel)."""
    return _m5_encode_ack(_M5_PUBREL, 0x62, packet_id, reason_code, properties, "PUBREL", max_packet_size)


def mqtt5_encode_pubcomp(packet_id, reason_code=0, properties=None, max_packet_size=None):
    """PUBCOMP (3.7) (codec5_py.encode_pubcomp)."""
    return _m5_encode_ack(_M5_PUBCOMP, 0x70, packet_id, reason_code, properties, "PUBCOMP", max_packet_size)


cdef bytes _m5_frame(unsigned char first, bytes body):
    return _m5_packet(first, <const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))


def mqtt5_encode_connack(session_present, reason_code=0, properties=None, max_packet_size=None):
    """CONNACK (3.2); the Property Length is always present (3.2.2.3) (codec5_py.encode_connack)."""
    cdef int code = _m5_code(_M5_CONNACK, reason_code, "CONNACK")
    cdef bytes head, raw
    if session_present and code:
        raise ValueError("Session Present with a non-zero reason code (MQTT-3.2.2-6)")
    head = bytes((1 if session_present else 0, code))
    raw = _m5_frame(0x20, head + _m5_encode_properties(properties, _M5_CONNACK, False))
    if _m5_over(raw, properties, max_packet_size):
        raw = _m5_frame(0x20, head + _m5_encode_properties(properties, _M5_CONNACK, True))
    return raw


cdef bytes _m5_encode_sub_ack(int ptype, unsigned char first, object packet_id, object reason_codes,
                              object properties, str what, object max_packet_size):
    cdef long pid = _m5_pid(packet_id)
    cdef bytes codes = bytes([_m5_code(ptype, c, what) for c in reason_codes])
    cdef bytes head, raw
    if not codes:
        raise ValueError(f"{what} needs one reason code per topic filter, and there is at least one")
    head = bytes((pid >> 8, pid & 0xFF))
    raw = _m5_frame(first, head + _m5_encode_properties(properties, ptype, False) + codes)
    if _m5_over(raw, properties, max_packet_size):
        raw = _m5_frame(first, head + _m5_encode_properties(properties, ptype, True) + codes)
    return raw


def mqtt5_encode_suback(packet_id, reason_codes, properties=None, max_packet_size=None):
    """SUBACK (3.9): one reason code per Topic Filter, in order (codec5_py.encode_suback)."""
    return _m5_encode_sub_ack(_M5_SUBACK, 0x90, packet_id, reason_codes, properties, "SUBACK", max_packet_size)


def mqtt5_encode_unsuback(packet_id, reason_codes, properties=None, max_packet_size=None):
    """UNSUBACK (3.11) (codec5_py.encode_unsuback)."""
    return _m5_encode_sub_ack(_M5_UNSUBACK, 0xB0, packet_id, reason_codes, properties, "UNSUBACK",
                              max_packet_size)


def mqtt5_encode_pingresp():
    """PINGRESP (3.13)."""
    return b"\xd0\x00"


cdef bytes _m5_disconnect(int code, object properties, bint drop):
    cdef bytes props = _m5_encode_properties(properties, _M5_DISCONNECT, drop)
    if props == b"\x00":
        return _m5_frame(0xE0, b"" if code == 0 else bytes((code,)))
    return _m5_frame(0xE0, bytes((code,)) + props)


def mqtt5_encode_disconnect(reason_code=0, properties=None, max_packet_size=None):
    """DISCONNECT (3.14) from the server, shortest form (codec5_py.encode_disconnect)."""
    cdef int code = _m5_code(_M5_DISCONNECT, reason_code, "DISCONNECT")
    cdef bytes raw
    if code == 0x04:
        raise ValueError("0x04 Disconnect with Will Message is sent by clients only (3.14.2.1)")
    if properties is not None and properties.session_expiry_interval is not None:
        raise ValueError("a server's DISCONNECT carries no Session Expiry Interval (MQTT-3.14.2-2)")
    raw = _m5_disconnect(code, properties, False)
    if _m5_over(raw, properties, max_packet_size):
        raw = _m5_disconnect(code, properties, True)
    return raw


cdef bytes _m5_auth(int code, object properties, bint drop):
    cdef bytes props = _m5_encode_properties(properties, _M5_AUTH, drop)
    if code == 0 and props == b"\x00":
        return b"\xf0\x00"
    return _m5_frame(0xF0, bytes((code,)) + props)


def mqtt5_encode_auth(reason_code=0, properties=None, max_packet_size=None):
    """AUTH (3.15) from the server: 0x00 Success or 0x18 Continue (codec5_py.encode_auth)."""
    cdef int code = _m5_code(_M5_AUTH, reason_code, "AUTH")
    cdef bytes raw
    if code == 0x19:
        raise ValueError("0x19 Re-authenticate is sent by clients only (3.15.2.1)")
    raw = _m5_auth(code, properties, False)
    if _m5_over(raw, properties, max_packet_size):
        raw = _m5_auth(code, properties, True)
    return raw


def mqtt5_encode_publish(topic, payload, qos=0, packet_id=0, retain=False, dup=False, properties=None):
    """PUBLISH (3.3) from the server (downlink commands) (codec5_py.encode_publish)."""
    cdef bytes raw_topic, pid, head, out
    cdef Py_ssize_t tlen, size, h
    cdef long n
    cdef unsigned char* q
    cdef object body
    cdef Py_buffer* b
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, not {type(topic).__name__}")
    qos = PyNumber_Index(qos)
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    try:
        raw_topic = (<str>topic).encode("utf-8")
        _m5_utf8(<const unsigned char*>PyBytes_AS_STRING(raw_topic), PyBytes_GET_SIZE(raw_topic))
    except (UnicodeEncodeError, _m5_Error) as exc:
        raise ValueError(f"invalid topic name {topic[:64]!r}: {exc}") from None
    tlen = PyBytes_GET_SIZE(raw_topic)
    if tlen and not _m5_topic_name(<const unsigned char*>PyBytes_AS_STRING(raw_topic), tlen):
        raise ValueError(f"wildcard in topic name {topic[:64]!r} (MQTT-3.3.2-2)")
    if not tlen and (properties is None or properties.topic_alias is None):
        raise ValueError("an empty topic name needs a Topic Alias (3.3.2.1)")
    if tlen > 65535:
        raise ValueError(f"topic name of {tlen} bytes, more than 65535")
    if qos:
        n = _m5_pid(packet_id)
        pid = bytes(((n >> 8) & 0xFF, n & 0xFF))
    else:
        if PyNumber_Index(packet_id) or dup:
            raise ValueError("a QoS 0 PUBLISH takes no packet id and no DUP (MQTT-2.2.1-2, MQTT-3.3.1-2)")
        pid = b""
    body = memoryview(payload)
    if not body.c_contiguous:
        raise ValueError("payload is not a C-contiguous buffer")
    head = bytes(((tlen >> 8) & 0xFF, tlen & 0xFF)) + raw_topic + pid + _m5_encode_properties(properties,
                                                                                              _M5_PUBLISH, False)
    b = PyMemoryView_GET_BUFFER(body)
    size = PyBytes_GET_SIZE(head) + b.len
    if size > _m5_MAX_VBI:
        raise ValueError(f"PUBLISH of remaining length {size}, more than {_m5_MAX_VBI}")
    h = 1 + _m5_vbi_size(size)
    out = PyBytes_FromStringAndSize(NULL, h + size)
    q = <unsigned char*>PyBytes_AS_STRING(out)
    q[0] = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    _m5_put_vbi(q + 1, size)
    memcpy(q + h, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
    memcpy(q + h + PyBytes_GET_SIZE(head), b.buf, b.len)
    return out


# -- the property block codec on its own (the twins: v5.decode_properties, v5.encode_properties) ------------
# For the tests and the fuzz target, which check each property rule on both
# twins without framing a packet around it; the codec does not call these.


cdef int _m5_packet_type(object packet) except -1:
    cdef Py_ssize_t t = PyNumber_Index(packet)
    if t not in _m5_PACKET_NAMES:
        raise ValueError(f"packet type {t} is not one of v5.PACKET_NAMES")
    return t


def mqtt5_decode_properties(buf, pos, end, packet):
    """The property block of ``buf`` at ``pos`` for ``packet`` (a packet type or v5.WILL),
    read up to ``end``: (Properties, the position after it), or MQTT5Error."""
    cdef bytes data = buf if PyBytes_CheckExact(buf) else bytes(memoryview(buf))
    cdef Py_ssize_t start = PyNumber_Index(pos), stop = PyNumber_Index(end)
    cdef int ptype = _m5_packet_type(packet)
    cdef _m5_Seen seen
    cdef object props
    if not 0 <= start <= stop <= PyBytes_GET_SIZE(data):
        raise ValueError(f"pos {start} and end {stop} are not within the {PyBytes_GET_SIZE(data)} bytes")
    props = _m5_properties(<const unsigned char*>PyBytes_AS_STRING(data), &start, stop, ptype, &seen)
    return props, start


def mqtt5_encode_properties(props, packet):
    """Property Length and the properties of ``props`` for ``packet``, or ValueError/TypeError."""
    return _m5_encode_properties(props, _m5_packet_type(packet), False)


# -- the 5.0 session's run of plain readings (twin: gridgate.protocols.mqtt.codec5_py.take_publishes5) --

# A Publish5's fields are read where its type's member descriptors say they
# are, as a Properties' are above: take_publishes5 reads six per reading, and
# six getattr() calls (about 130 instructions each under callgrind) were
# what made its step per reading cost more than 3.1.1's take_publishes.
# Used only for an object of exactly that type, only if each field is a
# plain object slot (checked here at import); an empty slot is read by name.
cdef enum:
    _M5_PUB_TOPIC = 0
    _M5_PUB_PAYLOAD = 1
    _M5_PUB_QOS = 2
    _M5_PUB_PACKET_ID = 3
    _M5_PUB_RETAIN = 4
    _M5_PUB_PROPERTIES = 5
    _M5_PUB_NFIELDS = 6

cdef tuple _m5_PUB_NAMES = ("topic", "payload", "qos", "packet_id", "retain", "properties")
cdef Py_ssize_t[6] _m5_PUB_OFFSET


cdef bint _m5_PUBLISH_BY_OFFSET = _slot_offsets(_m5_Publish5, _m5_PUB_NAMES, _m5_PUB_OFFSET, 6)


cdef inline object _m5_pub_field(object ev, int k):
    """Field k of ``ev``, exactly a Publish5."""
    return _slot_field(ev, _m5_PUBLISH_BY_OFFSET, _m5_PUB_OFFSET, _m5_PUB_NAMES, k)


def take_publishes5(list events, Py_ssize_t start, object telemetry_topic, object validate_into, str protocol,
                    object client_id, object next_ns, object clock, Py_ssize_t max_qos1, list records,
                    list rejections, bytearray acks not None, object spans):
    """See the twin, gridgate.protocols.mqtt.codec5_py.take_publishes5:
    compiled as 3.1.1's take_publishes is, because the session's Python loop
    over each read's publishes was a measurable share of the CPU per
    reading. The PUBACKs go straight into ``acks`` (no bytes object per
    reading) and a span is a tuple only when the caller asks for spans."""
    cdef Py_ssize_t i = start, n = len(events), qos1 = 0, n_before, r_before, size, have
    cdef object ev, payload, topic, now, publish_ns, packet_id, first = 0
    cdef long qos, pid
    cdef Py_buffer *view
    cdef unsigned char c
    cdef unsigned char *q
    cdef Validator validator = _pl_bound_validator(validate_into)
    cdef bint wall_clock = clock is _mq_time_ns
    if spans is not None and type(spans) is not list:
        raise TypeError("spans must be a list or None")
    if start < 0:
        raise IndexError("start must not be negative")     # events[i] below is unchecked
    while i < n:
        ev = events[i]
        if type(ev) is not _m5_Publish5:
            break
        if _m5_pub_field(ev, _M5_PUB_PROPERTIES) is not _m5_NO_PROPERTIES:
            break
        if _m5_pub_field(ev, _M5_PUB_RETAIN):
            break
        qos = _m5_pub_field(ev, _M5_PUB_QOS)
        if qos != 0 and qos != 1:
            break
        topic = _m5_pub_field(ev, _M5_PUB_TOPIC)
        if not (topic == telemetry_topic or topic == "telemetry"):
            break
        if qos:
            if qos1 >= max_qos1:
                break
            qos1 += 1
        now = _mq_wall_ns() if wall_clock else clock()
        publish_ns = now if now > next_ns else next_ns
        if first == 0:
            first = publish_ns
        i += 1
        payload = _m5_pub_field(ev, _M5_PUB_PAYLOAD)
        if type(payload) is memoryview:             # what the codec gives: a slice of the read
            view = PyMemoryView_GET_BUFFER(payload)
            size = view.len
            c = (<unsigned char *>view.buf)[0] if size > 0 else 0
        else:                                       # bytes (a packet that spanned reads), or any buffer
            size = len(payload)
            c = payload[0] if size > 0 else 0
        n_before = len(rejections)
        r_before = len(records)
        next_ns = publish_ns + _pl_validate_into(validator, validate_into, payload,
                                                 "json" if size == 0 or _mq_JSON_FIRST[c] else "msgpack",
                                                 protocol, client_id, publish_ns, records, rejections) + 1
        if not qos:
            continue
        packet_id = _m5_pub_field(ev, _M5_PUB_PACKET_ID)
        if len(rejections) != n_before:
            return i, next_ns, first, (packet_id, r_before, n_before)
        pid = packet_id
        if pid < 0 or pid > 0xFFFF:
            raise ValueError(f"packet id {pid} out of range")
        have = PyByteArray_GET_SIZE(acks)
        if spans is not None and len(records) != r_before:
            (<list>spans).append((have, 1, packet_id, r_before, len(records)))
        PyByteArray_Resize(acks, have + 4)
        q = <unsigned char *>PyByteArray_AS_STRING(acks) + have
        q[0] = 0x40
        q[1] = 2
        q[2] = <unsigned char>(pid >> 8)
        q[3] = <unsigned char>(pid & 0xFF)
    return i, next_ns, first, None
