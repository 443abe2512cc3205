# MQTT 3.1.1 server-side codec, compiled: the twin of gridgate/protocols/mqtt/codec_py.py.
#
# gridgate/protocols/mqtt/codec_py.py is the reference. Its module docstring is the contract
# both implementations keep: the error reasons, their precedence, and the
# zero-copy rules of Publish.payload. The two must return equal events and
# raise equal MQTTProtocolErrors on every input, however it is split into
# reads (tests/protocols/mqtt/test_mqtt_codec.py, tests/protocols/mqtt/test_mqtt_hypothesis.py).
#
# Why compiled: every byte a device sends goes through feed(). Here one call
# walks all complete packets of a 64 KiB read over a const unsigned char*,
# with typed locals and no per-byte Python objects. It builds only the event
# objects: for a PUBLISH, the Struct, the topic str (cached while the topic
# repeats) and a memoryview slice of the read.
#
# This file is included into src/_fastparse.pyx with _fastparse_payload.pxi
# as one compilation unit, so every module-level private name starts with
# _mq_.

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE, PyByteArray_Resize,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_Check
from cpython.memoryview cimport PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy
from cpython.long cimport PyLong_FromLongLong
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

import time as _mq_time

# Plain Python imports, bound once as module globals: both implementations
# raise the same exception class and build the same event classes.
from gridgate.errors import MQTTProtocolError as _mq_Error
from gridgate.ingest.records import Rejection as _mq_Rejection
from gridgate.protocols.mqtt.events import (
    Connect as _mq_Connect, Disconnect as _mq_Disconnect, PingReq as _mq_PingReq, PubAck as _mq_PubAck,
    PubComp as _mq_PubComp, Publish as _mq_Publish, PubRec as _mq_PubRec, PubRel as _mq_PubRel,
    Subscribe as _mq_Subscribe, Unsubscribe as _mq_Unsubscribe, Will as _mq_Will,
)

# Largest remaining length (section 2.2.3) and so the largest packet.
cdef Py_ssize_t _mq_MAX_REMAINING_LENGTH = 268435455
cdef Py_ssize_t _mq_MAX_PACKET = 268435455 + 5

# Required fixed-header flags per packet type (table 2.2.2); -1: PUBLISH
# (DUP/QoS/RETAIN) or not a client-to-server type.
cdef int[16] _mq_REQUIRED_FLAGS
_mq_REQUIRED_FLAGS[:] = [-1, 0, -1, -1, 0, 0, 2, 0, 2, -1, 2, -1, 0, -1, 0, -1]


# -- the first byte of a packet ---------------------------------------------------

cdef object _mq_first_byte_error(unsigned char first, bint connected):
    """The MQTTProtocolError for a packet starting with `first`, or None (as codec_py._first_byte_error)."""
    cdef int ptype = first >> 4
    cdef int flags = first & 0x0F
    cdef int qos
    if not connected:
        if ptype != 1:
            return _mq_Error("expected_connect", f"first packet has type {ptype}, not CONNECT (MQTT-3.1.0-1)")
        if flags:
            return _mq_Error("bad_flags", f"CONNECT with flags {flags:#06b} (MQTT-2.2.2-2)")
        return None
    if ptype == 0 or ptype == 15:
        return _mq_Error("malformed", f"reserved packet type {ptype} (section 2.2.1)")
    if ptype == 1:
        return _mq_Error("duplicate_connect", "a second CONNECT on one connection (MQTT-3.1.0-2)")
    if ptype == 2 or ptype == 9 or ptype == 11 or ptype == 13:
        return _mq_Error("unexpected_packet", f"packet type {ptype} is sent by servers only")
    if ptype == 3:
        qos = (flags >> 1) & 3
        if qos == 3:
            return _mq_Error("malformed", "PUBLISH with QoS 3 (MQTT-3.3.1-4)")
        if (flags & 0b1000) and qos == 0:
            return _mq_Error("bad_flags", "DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2)")
        return None
    if flags != _mq_REQUIRED_FLAGS[ptype]:
        return _mq_Error("bad_flags", f"packet type {ptype} with flags {flags:#06b} (MQTT-2.2.2-2)")
    return None


# The first-byte state machine as two tables, [connected][first byte]: 1 if
# the byte starts a violation. Filled once at import from the function above,
# which builds the error itself on the (slow) error path.
cdef unsigned char[2][256] _mq_FIRST_BAD


cdef void _mq_init_first_byte_table():
    cdef int connected, b
    for connected in range(2):
        for b in range(256):
            _mq_FIRST_BAD[connected][b] = _mq_first_byte_error(<unsigned char>b, connected) is not None


_mq_init_first_byte_table()


# -- fields ---------------------------------------------------------------------------

cdef inline bint _mq_forbidden(unsigned int c):
    """A control character or non-character (codec_py._FORBIDDEN; U+0000 is checked before)."""
    return c < 0x20 or 0x7F <= c <= 0x9F or 0xFDD0 <= c <= 0xFDEF or (c & 0xFFFE) == 0xFFFE


cdef inline uint64_t _mq_not_printable(uint64_t w):
    """Bit 7 of a byte set where some byte of w is outside 0x20..0x7E (never
    where none is): the high bit itself, below 0x20 (w - 0x20 borrows into
    bit 7 of a byte whose own bit 7 is clear), or 0x7F (0x7F + 1 = 0x80).
    Borrows and carries only cross bytes after an offending byte."""
    return (((w - 0x2020202020202020ULL) & ~w) | (w + 0x0101010101010101ULL) | w) & 0x8080808080808080ULL


cdef inline bint _mq_printable_ascii(const unsigned char* p, Py_ssize_t n):
    """All n bytes in 0x20..0x7E, eight at a time: topics are tens of bytes,
    and a byte loop cost a new topic about 30 ns (bench/micro_mqtt.py)."""
    cdef uint64_t w, bad = 0
    cdef Py_ssize_t i = 0
    if n < 8:
        for i in range(n):
            if p[i] < 0x20 or p[i] > 0x7E:
                return False
        return True
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        bad |= _mq_not_printable(w)
        i += 8
    if i < n:
        memcpy(&w, p + n - 8, 8)  # the last 8 bytes, overlapping what was checked
        bad |= _mq_not_printable(w)
    return bad == 0


cdef str _mq_utf8(const unsigned char* p, Py_ssize_t n):
    """An MQTT UTF-8 string (section 1.5.3), strictly: bad_utf8 (MQTT-1.5.3-1/2),
    then bad_char (control characters and non-characters), as codec_py._utf8."""
    cdef str text
    cdef Py_UCS4 c
    # Printable ASCII (nearly every topic and id) needs no further check.
    cdef bint printable = _mq_printable_ascii(p, n)
    try:
        # strict: refuses surrogates and overlong forms (MQTT-1.5.3-1)
        text = PyUnicode_DecodeUTF8(<char*>p, n, "strict")
    except UnicodeDecodeError:
        raise _mq_Error("bad_utf8", "string is not well-formed UTF-8 (MQTT-1.5.3-1)") from None
    if printable:
        return text
    # In well-formed UTF-8 a zero byte is U+0000 and nothing else.
    if memchr(p, 0, n) != NULL:
        raise _mq_Error("bad_utf8", "string contains U+0000 (MQTT-1.5.3-2)")
    for c in text:
        if _mq_forbidden(<unsigned int>c):
            raise _mq_Error("bad_char", f"string contains U+{<unsigned long>c:04X}, a control character or "
                                        "non-character (section 1.5.3, refused as a MUST)")
    return text


cdef inline int _mq_u8(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
    if pos[0] >= end:
        raise _mq_Error("malformed", "packet ends inside a one-byte field")
    pos[0] += 1
    return p[pos[0] - 1]


cdef inline long _mq_u16(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
    if pos[0] + 2 > end:
        raise _mq_Error("malformed", "packet ends inside a two-byte integer")
    pos[0] += 2
    return (p[pos[0] - 2] << 8) | p[pos[0] - 1]


cdef inline Py_ssize_t _mq_field(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
    """A length-prefixed field: returns its offset, its length is pos[0] - offset afterwards."""
    cdef Py_ssize_t n = _mq_u16(p, pos, end)
    if pos[0] + n > end:
        raise _mq_Error("malformed", "length prefix runs past the end of the packet")
    pos[0] += n
    return pos[0] - n


cdef bytes _mq_binary(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end):
    cdef Py_ssize_t at = _mq_field(p, pos, end)
    return PyBytes_FromStringAndSize(<char*>(p + at), pos[0] - at)


cdef str _mq_string(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end):
    cdef Py_ssize_t at = _mq_field(p, pos, end)
    return _mq_utf8(p + at, pos[0] - at)


cdef int _mq_check_topic_name(const unsigned char* p, Py_ssize_t n, str topic) except -1:
    """A topic name: at least one character, no wildcards (MQTT-4.7.3-1, MQTT-3.3.2-2)."""
    if n == 0:
        raise _mq_Error("bad_topic", "empty topic name (MQTT-4.7.3-1)")
    if memchr(p, c'+', n) != NULL or memchr(p, c'#', n) != NULL:
        raise _mq_Error("bad_topic", f"wildcard in topic name {topic[:64]!r} (MQTT-3.3.2-2)")
    return 0


cdef int _mq_check_topic_filter(const unsigned char* p, Py_ssize_t n, str topic) except -1:
    """A topic filter (section 4.7.1), on the UTF-8 bytes: '/', '+' and '#'
    are ASCII and never part of a multi-byte sequence."""
    cdef Py_ssize_t i, level_start = 0
    cdef unsigned char c
    if n == 0:
        raise _mq_Error("bad_topic_filter", "empty topic filter (MQTT-4.7.3-1)")
    for i in range(n):
        c = p[i]
        if c == c'/':
            level_start = i + 1
        elif c == c'#':
            if i != level_start or i != n - 1:
                raise _mq_Error("bad_topic_filter", f"'#' is not the whole last level of {topic[:64]!r} "
                                                    "(MQTT-4.7.1-2)")
        elif c == c'+':
            if i != level_start or (i + 1 < n and p[i + 1] != c'/'):
                raise _mq_Error("bad_topic_filter", f"'+' is not a whole level of {topic[:64]!r} (MQTT-4.7.1-3)")
    return 0


cdef inline object _mq_slice(object view, Py_ssize_t start, Py_ssize_t stop):
    """view[start:stop], for `view` a whole memoryview of a bytes object (1-D, format "B", stride 1).

    The same steps as CPython's memory_subscript for a slice, without the
    PyLong and slice objects (that saves about 35 ns a packet, 40 % of the
    PUBLISH decode): PyMemoryView_FromObject of a memoryview registers a new
    view on the same managed buffer (mbuf_add_view: the new view's obj is
    the bytes, it holds a reference, it has its own copy of the Py_buffer
    with shape/strides), then init_slice/init_len move buf and set len and
    shape[0]. The contiguity flags need no update: with stride == itemsize a
    1-D view is C- and F-contiguous at any length. tests/protocols/mqtt/test_mqtt_codec.py
    (TestZeroCopyPayload) checks the result against the Python twin's real
    slices: obj, readonly, len, nbytes, shape, strides, hash, re-slicing.
    """
    cdef object part = PyMemoryView_FromObject(view)
    cdef Py_buffer* b = PyMemoryView_GET_BUFFER(part)
    b.buf = <char*>b.buf + start
    b.len = stop - start
    b.shape[0] = stop - start
    return part


cdef int _mq_append(bytearray buf, const unsigned char* src, Py_ssize_t n) except -1:
    """Append n bytes to a bytearray (amortised: CPython over-allocates on growth)."""
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(buf)
    if n:
        PyByteArray_Resize(buf, old + n)
        memcpy(PyByteArray_AS_STRING(buf) + old, src, n)
    return 0


# -- the codec ----------------------------------------------------------------------------

cdef class MQTTCodec:
    """Server side of one MQTT 3.1.1 / 3.1 connection (sans-IO).

    The compiled twin of gridgate.protocols.mqtt.codec_py.MQTTCodec; see that module for
    the contract (errors, their precedence, zero-copy payloads).
    """

    cdef Py_ssize_t _max
    # A packet begun in an earlier read: its bytes so far (None: nothing
    # held back), the length of its fixed header (0 while the header itself
    # is incomplete) and its total size once known.
    cdef bytearray _partial
    cdef Py_ssize_t _header_len
    cdef Py_ssize_t _need
    cdef bint _connected
    cdef bint _disconnected
    cdef int _level
    cdef object _error
    # The last PUBLISH topic name, raw and decoded: a device publishes to one
    # or two topics, so most packets skip the UTF-8 decode and the checks.
    cdef bytes _topic_raw
    cdef str _topic

    def __init__(self, max_packet_bytes=1048576):
        max_packet_bytes = PyNumber_Index(max_packet_bytes)
        if not 2 <= max_packet_bytes <= _mq_MAX_PACKET:
            raise ValueError(f"max_packet_bytes {max_packet_bytes} outside 2..{_mq_MAX_PACKET}")
        self._max = max_packet_bytes
        self._partial = None
        self._header_len = 0
        self._need = 0
        self._connected = False
        self._disconnected = False
        self._level = 0
        self._error = None
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
    def protocol_level(self):
        """0 before CONNECT, then 4 (MQTT 3.1.1) or 3 (MQTT 3.1)."""
        return self._level

    @property
    def buffered(self):
        """Bytes held back waiting for the rest of a packet."""
        return 0 if self._partial is None else PyByteArray_GET_SIZE(self._partial)

    def feed(self, data):
        """Append `data` and return every complete packet now buffered, in order.

        Raises MQTTProtocolError on the first violation; the codec is dead
        afterwards and raises an equal error on every later call.
        """
        cdef list events = []
        cdef Py_ssize_t pos = 0
        cdef bytes buf
        if self._error is not None:
            raise _mq_Error(self._error.reason, self._error.detail, self._error.return_code)
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
        except _mq_Error as exc:
            self._error = exc
            self._partial = None
            self._header_len = 0
            self._need = 0
            raise
        return events

    # -- framing -----------------------------------------------------------

    cdef Py_ssize_t _header(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                            Py_ssize_t* size) except -1:
        """Fixed header at pos (section 2.2): its length, and the packet size in size[0]; 0 if incomplete."""
        cdef unsigned char first = p[pos], byte
        cdef Py_ssize_t i = pos + 1, length = 0
        cdef int shift = 0
        if self._disconnected:
            raise _mq_Error("data_after_disconnect", "bytes after DISCONNECT (MQTT-3.14.4-1)")
        if _mq_FIRST_BAD[self._connected][first]:
            raise _mq_first_byte_error(first, self._connected)
        # Remaining length: 7 bits a byte, least significant first, at most
        # 4 bytes (section 2.2.3).
        while True:
            if i >= end:
                return 0
            byte = p[i]
            i += 1
            length |= (<Py_ssize_t>(byte & 0x7F)) << shift
            if byte < 0x80:
                break
            if i - pos == 5:
                raise _mq_Error("malformed", "remaining length longer than 4 bytes (section 2.2.3)")
            shift += 7
        size[0] = i - pos + length
        if size[0] > self._max:
            raise _mq_Error("too_large", f"packet of {size[0]} bytes exceeds max_packet_bytes {self._max}")
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
            # The header is still incomplete, so partial holds at most 4
            # bytes (type byte + 3 length bytes); 5 more always settle it.
            if have > 4:
                raise AssertionError("incomplete MQTT fixed header longer than 4 bytes")
            k = n if n < 5 else 5
            memcpy(head, PyByteArray_AS_STRING(partial), have)
            memcpy(head + have, d, k)
            header_len = self._header(head, 0, have + k, &size)
            if header_len == 0:
                _mq_append(partial, d, n)
                return -1
            self._header_len = header_len
            self._need = size
        missing = self._need - have
        if missing > n:
            _mq_append(partial, d, n)
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

    # -- packets -----------------------------------------------------------

    cdef object _decode(self, unsigned char first, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                        object view):
        """One packet whose first byte passed _mq_FIRST_BAD; its body is p[start:end]."""
        cdef int ptype = first >> 4
        cdef Py_ssize_t pos = start
        cdef long pid
        if ptype == 3:
            return self._publish(first, p, start, end, view)
        if 4 <= ptype <= 7:  # PUBACK, PUBREC, PUBREL, PUBCOMP (sections 3.4-3.7)
            if end - start != 2:
                raise _mq_Error("malformed", f"packet type {ptype} with remaining length {end - start}, not 2")
            pid = _mq_u16(p, &pos, end)
            if pid == 0:
                raise _mq_Error("bad_packet_id", "packet identifier 0 (MQTT-2.3.1-1)")
            if ptype == 4:
                return _mq_PubAck(pid)
            if ptype == 5:
                return _mq_PubRec(pid)
            if ptype == 6:
                return _mq_PubRel(pid)
            return _mq_PubComp(pid)
        if ptype == 8 or ptype == 10:
            return self._subscribe(ptype, p, start, end)
        if ptype == 1:
            return self._connect(p, start, end)
        # PINGREQ (3.12), DISCONNECT (3.14)
        if end != start:
            raise _mq_Error("malformed", f"packet type {ptype} with remaining length {end - start}, not 0")
        if ptype == 12:
            return _mq_PingReq()
        self._disconnected = True
        return _mq_Disconnect()

    cdef object _publish(self, unsigned char first, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                         object view):
        """PUBLISH (section 3.3); the flags were checked on the first byte."""
        cdef int qos = (first >> 1) & 3
        cdef Py_ssize_t pos = start, at, n
        cdef long pid = 0
        cdef str topic
        at = _mq_field(p, &pos, end)
        n = pos - at
        if (n != 0 and self._topic_raw is not None and n == PyBytes_GET_SIZE(self._topic_raw)
                and memcmp(p + at, PyBytes_AS_STRING(self._topic_raw), n) == 0):
            topic = self._topic
        else:
            topic = _mq_utf8(p + at, n)
            _mq_check_topic_name(p + at, n, topic)
            self._topic_raw = PyBytes_FromStringAndSize(<char*>(p + at), n)
            self._topic = topic
        if qos:
            pid = _mq_u16(p, &pos, end)
            if pid == 0:
                raise _mq_Error("bad_packet_id", "packet identifier 0 (MQTT-2.3.1-1)")
        # The payload is the rest of the packet and may be empty (3.3.3).
        return _mq_Publish(topic, _mq_slice(view, pos, end), qos, pid, (first & 0b0001) != 0, (first & 0b1000) != 0)

    cdef object _subscribe(self, int ptype, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        """SUBSCRIBE (section 3.8) or UNSUBSCRIBE (section 3.10)."""
        cdef Py_ssize_t pos = start, at
        cdef long pid = _mq_u16(p, &pos, end)
        cdef list topics = []
        cdef str topic
        cdef int options
        if pid == 0:
            raise _mq_Error("bad_packet_id", "packet identifier 0 (MQTT-2.3.1-1)")
        if pos == end:
            raise _mq_Error("malformed", "SUBSCRIBE/UNSUBSCRIBE without a topic filter (MQTT-3.8.3-3, MQTT-3.10.3-2)")
        while pos < end:
            at = _mq_field(p, &pos, end)
            topic = _mq_utf8(p + at, pos - at)
            _mq_check_topic_filter(p + at, pos - at, topic)
            if ptype == 8:
                options = _mq_u8(p, &pos, end)
                if options > 2:  # reserved bits set, or QoS 3
                    raise _mq_Error("malformed", f"requested QoS byte {options:#04x} (MQTT-3-8.3-4)")
                topics.append((topic, options))
            else:
                topics.append(topic)
        if ptype == 8:
            return _mq_Subscribe(pid, topics)
        return _mq_Unsubscribe(pid, topics)

    cdef object _connect(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        """CONNECT (section 3.1)."""
        cdef Py_ssize_t pos = start, at, client_id_bytes
        cdef bytes name
        cdef int level, flags, will_qos
        cdef long keepalive
        cdef bint clean, will_flag, will_retain, has_password, has_username
        cdef str client_id, will_topic, username = None
        cdef object will = None, password = None
        # Protocol name and level before anything else (MQTT-3.1.2-1/2).
        name = _mq_binary(p, &pos, end)
        level = _mq_u8(p, &pos, end)
        if not ((name == b"MQTT" and level == 4) or (name == b"MQIsdp" and level == 3)):
            raise _mq_Error("unsupported_protocol", f"protocol {name[:16]!r} level {level}", 1)
        flags = _mq_u8(p, &pos, end)
        keepalive = _mq_u16(p, &pos, end)
        # Connect flags (3.1.2.3 - 3.1.2.9)
        if flags & 0x01:
            raise _mq_Error("malformed", "reserved CONNECT flag set (MQTT-3.1.2-3)")
        clean = (flags & 0x02) != 0
        will_flag = (flags & 0x04) != 0
        will_qos = (flags >> 3) & 3
        will_retain = (flags & 0x20) != 0
        has_password = (flags & 0x40) != 0
        has_username = (flags & 0x80) != 0
        if not will_flag and (will_qos or will_retain):
            raise _mq_Error("malformed", "Will QoS/Retain set without the Will flag (MQTT-3.1.2-11/13/15)")
        if will_qos == 3:
            raise _mq_Error("malformed", "Will QoS 3 (MQTT-3.1.2-14)")
        if has_password and not has_username:
            raise _mq_Error("malformed", "password flag without user name flag (MQTT-3.1.2-22)")
        # Payload, in this order (3.1.3): client id, Will topic and message,
        # user name, password.
        at = _mq_field(p, &pos, end)
        client_id_bytes = pos - at
        client_id = _mq_utf8(p + at, client_id_bytes)
        if will_flag:
            at = _mq_field(p, &pos, end)
            will_topic = _mq_utf8(p + at, pos - at)
            _mq_check_topic_name(p + at, pos - at, will_topic)
            will = _mq_Will(will_topic, _mq_binary(p, &pos, end), will_qos, will_retain)
        if has_username:
            username = _mq_string(p, &pos, end)
        if has_password:
            password = _mq_binary(p, &pos, end)
        if pos != end:
            raise _mq_Error("malformed", f"{end - pos} bytes after the CONNECT payload")
        if not client_id and not clean:
            raise _mq_Error("identifier_rejected", "zero-byte client id needs CleanSession 1 (MQTT-3.1.3-8)", 2)
        if level == 3 and client_id_bytes > 23:
            # MQTT 3.1 allows 1 to 23 characters (codec_py.MQTT31_MAX_CLIENT_ID_BYTES)
            raise _mq_Error("identifier_rejected", f"MQTT 3.1 client id of {client_id_bytes} bytes, more than 23", 2)
        self._connected = True
        self._level = level
        return _mq_Connect(name.decode("ascii"), level, clean, keepalive, client_id, will, username, password)


# -- encoders (server to client) --------------------------------------------------------------

cdef long _mq_pid(object packet_id) except -1:
    """A packet identifier 1..65535 (MQTT-2.3.1-1) or ValueError."""
    cdef int overflow = 0
    cdef long value
    if not PyLong_Check(packet_id):
        packet_id = PyNumber_Index(packet_id)
    value = PyLong_AsLongAndOverflow(packet_id, &overflow)
    if overflow or value < 1 or value > 65535:
        raise ValueError(f"packet id {packet_id} outside 1..65535")
    return value


cdef Py_ssize_t _mq_put_remaining_length(unsigned char* q, Py_ssize_t n):
    """Write the section 2.2.3 encoding of n at q; returns its length."""
    cdef Py_ssize_t k = 0
    while True:
        if n > 0x7F:
            q[k] = (n & 0x7F) | 0x80
            n >>= 7
            k += 1
        else:
            q[k] = <unsigned char>n
            return k + 1


cdef Py_ssize_t _mq_remaining_length_size(Py_ssize_t n):
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


cdef bytes _mq_ack(unsigned char first, object packet_id):
    cdef long pid = _mq_pid(packet_id)
    cdef unsigned char[4] out
    out[0] = first
    out[1] = 2
    out[2] = <unsigned char>(pid >> 8)
    out[3] = <unsigned char>(pid & 0xFF)
    return PyBytes_FromStringAndSize(<char*>out, 4)


def encode_connack(session_present, return_code):
    """CONNACK (section 3.2)."""
    return_code = PyNumber_Index(return_code)
    if not 0 <= return_code <= 5:  # 3.2.2.3: 6-255 are reserved
        raise ValueError(f"CONNACK return code {return_code} outside 0..5")
    if session_present and return_code:
        raise ValueError("session present with a non-zero return code (MQTT-3.2.2-4)")
    return bytes((0x20, 2, 1 if session_present else 0, return_code))


def encode_puback(packet_id):
    """PUBACK (section 3.4)."""
    return _mq_ack(0x40, packet_id)


def encode_pubrec(packet_id):
    """PUBREC (section 3.5)."""
    return _mq_ack(0x50, packet_id)


def encode_pubrel(packet_id):
    """PUBREL (section 3.6), flags 0b0010."""
    return _mq_ack(0x62, packet_id)


def encode_pubcomp(packet_id):
    """PUBCOMP (section 3.7)."""
    return _mq_ack(0x70, packet_id)


def encode_unsuback(packet_id):
    """UNSUBACK (section 3.11)."""
    return _mq_ack(0xB0, packet_id)


def encode_pingresp():
    """PINGRESP (section 3.13)."""
    return b"\xd0\x00"


def encode_acks(packet_type, packet_ids):
    """Many PUBACK/PUBREC/PUBREL/PUBCOMP packets (packet_type 4..7) in one buffer."""
    cdef unsigned char first
    cdef list ids
    cdef Py_ssize_t n, k
    cdef long pid
    cdef bytes out
    cdef unsigned char* q
    if type(packet_type) is not int or not 4 <= packet_type <= 7:
        raise ValueError(f"packet type {packet_type!r} is not PUBACK, PUBREC, PUBREL or PUBCOMP")
    first = (0x40, 0x50, 0x62, 0x70)[packet_type - 4]
    # A private copy: nothing (not even an __index__) can resize it under the loop.
    ids = list(packet_ids)
    n = len(ids)
    out = PyBytes_FromStringAndSize(NULL, 4 * n)
    q = <unsigned char*>PyBytes_AS_STRING(out)
    for k in range(n):
        pid = _mq_pid(ids[k])
        q[0] = first
        q[1] = 2
        q[2] = <unsigned char>(pid >> 8)
        q[3] = <unsigned char>(pid & 0xFF)
        q += 4
    return out


def encode_suback(packet_id, return_codes):
    """SUBACK (section 3.9): one return code per filter, each 0, 1, 2 or 0x80 (MQTT-3.9.3-2)."""
    cdef long pid = _mq_pid(packet_id)
    cdef bytes codes = bytes(return_codes)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(codes), k, h
    cdef const unsigned char* c = <const unsigned char*>PyBytes_AS_STRING(codes)
    cdef bytes out
    cdef unsigned char* q
    if n == 0:
        raise ValueError("SUBACK needs one return code per topic filter, and there is at least one")
    for k in range(n):
        if c[k] > 2 and c[k] != 0x80:
            raise ValueError(f"SUBACK return code {c[k]:#04x} is reserved (MQTT-3.9.3-2)")
    h = 1 + _mq_remaining_length_size(2 + n)
    out = PyBytes_FromStringAndSize(NULL, h + 2 + n)
    q = <unsigned char*>PyBytes_AS_STRING(out)
    q[0] = 0x90
    _mq_put_remaining_length(q + 1, 2 + n)
    q[h] = <unsigned char>(pid >> 8)
    q[h + 1] = <unsigned char>(pid & 0xFF)
    memcpy(q + h + 2, c, n)
    return out


def encode_publish(topic, payload, qos=0, packet_id=0, retain=False, dup=False):
    """PUBLISH (section 3.3) from the server (downlink commands).

    packet_id must be 1..65535 for QoS 1 and 2, and 0 for QoS 0 (which also
    takes no DUP, MQTT-3.3.1-2). payload is any C-contiguous bytes-like object.
    """
    cdef bytes raw_topic, out
    cdef long pid = 0
    cdef int q_level
    cdef Py_ssize_t tlen, size, h
    cdef unsigned char* q
    cdef Py_buffer body
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, not {type(topic).__name__}")
    qos = PyNumber_Index(qos)
    if qos != 0 and qos != 1 and qos != 2:
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    q_level = qos
    try:
        raw_topic = (<str>topic).encode("utf-8")  # refuses lone surrogates
        tlen = PyBytes_GET_SIZE(raw_topic)
        _mq_utf8(<const unsigned char*>PyBytes_AS_STRING(raw_topic), tlen)
        _mq_check_topic_name(<const unsigned char*>PyBytes_AS_STRING(raw_topic), tlen, topic)
    except (UnicodeEncodeError, _mq_Error) as exc:
        raise ValueError(f"invalid topic name {topic[:64]!r}: {exc}") from None
    if tlen > 65535:
        raise ValueError(f"topic name of {tlen} bytes, more than 65535")
    if q_level:
        pid = _mq_pid(packet_id)
    elif PyNumber_Index(packet_id) or dup:
        raise ValueError("a QoS 0 PUBLISH takes no packet id and no DUP (MQTT-2.3.1-5, MQTT-3.3.1-2)")
    try:
        PyObject_GetBuffer(payload, &body, PyBUF_SIMPLE)
    except BufferError:
        raise ValueError("payload is not a C-contiguous buffer") from None
    try:
        size = 2 + tlen + (2 if q_level else 0) + body.len
        if size > _mq_MAX_REMAINING_LENGTH:
            raise ValueError(f"PUBLISH of remaining length {size}, more than {_mq_MAX_REMAINING_LENGTH}")
        h = 1 + _mq_remaining_length_size(size)
        out = PyBytes_FromStringAndSize(NULL, h + size)
        q = <unsigned char*>PyBytes_AS_STRING(out)
        q[0] = 0x30 | (0x08 if dup else 0) | (q_level << 1) | (0x01 if retain else 0)
        _mq_put_remaining_length(q + 1, size)
        q += h
        q[0] = <unsigned char>(tlen >> 8)
        q[1] = <unsigned char>(tlen & 0xFF)
        memcpy(q + 2, PyBytes_AS_STRING(raw_topic), tlen)
        q += 2 + tlen
        if q_level:
            q[0] = <unsigned char>(pid >> 8)
            q[1] = <unsigned char>(pid & 0xFF)
            q += 2
        memcpy(q, body.buf, body.len)
    finally:
        PyBuffer_Release(&body)
    return out


# -- a msgspec Struct's fields read by slot ----------------------------------------------
# A field is read where its type's member descriptor says it is (what
# CPython's member_get does), without an attribute look-up by name: the
# per-PUBLISH steps of both MQTT levels read four or more fields of every
# publish, and each look-up was a measurable share of a reading. Used only for
# an object of exactly that type, and only if each field is a plain object
# slot (checked at import); otherwise, and for an empty slot, read by name.
cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    enum:
        T_OBJECT_EX


cdef bint _slot_offsets(object cls, tuple names, Py_ssize_t *out, Py_ssize_t capacity):
    """Each named field's offset in ``cls`` into ``out`` (room for ``capacity``);
    False if one is not a plain object slot, or there are more names than room."""
    cdef Py_ssize_t k
    cdef object descr
    if len(names) > capacity:
        return False
    member = type(type.__dict__["__dictoffset__"])   # the member descriptor type
    for k in range(len(names)):
        descr = cls.__dict__.get(names[k])
        if type(descr) is not member or (<PyMemberDescrObject*>descr).d_member.type != T_OBJECT_EX:
            return False
        out[k] = (<PyMemberDescrObject*>descr).d_member.offset
    return True


cdef inline object _slot_field(object ob, bint by_offset, const Py_ssize_t *offsets, tuple names, int k):
    """Field k of ``ob`` (exactly the type the offsets are of when ``by_offset``)."""
    cdef PyObject* slot
    if by_offset:
        slot = (<PyObject**>((<char*><PyObject*>ob) + offsets[k]))[0]
        if slot != NULL:
            return <object>slot
    return getattr(ob, names[k])


cdef enum:
    _MQ_PUB_TOPIC = 0
    _MQ_PUB_PAYLOAD = 1
    _MQ_PUB_QOS = 2
    _MQ_PUB_PACKET_ID = 3

cdef tuple _mq_PUB_NAMES = ("topic", "payload", "qos", "packet_id")
cdef Py_ssize_t[4] _mq_PUB_OFFSET
cdef bint _mq_PUBLISH_BY_OFFSET = _slot_offsets(_mq_Publish, _mq_PUB_NAMES, _mq_PUB_OFFSET, 4)


cdef inline object _mq_pub_field(object ev, int k):
    """Field k of ``ev``, exactly a Publish."""
    return _slot_field(ev, _mq_PUBLISH_BY_OFFSET, _mq_PUB_OFFSET, _mq_PUB_NAMES, k)


# -- the session's per-PUBLISH step (twin: gridgate.protocols.mqtt.codec_py.take_publishes) ------

# time.time_ns, which the sessions pass as the clock: read in C instead
# (the same clock_gettime(CLOCK_REALTIME)) without a Python call per PUBLISH
cdef object _mq_time_ns = _mq_time.time_ns


cdef inline object _mq_wall_ns():
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return PyLong_FromLongLong(<long long>ts.tv_sec * 1000000000 + ts.tv_nsec)


cdef bint _mq_JSON_FIRST[256]
for _c in range(256):
    _mq_JSON_FIRST[_c] = bytes([_c]) in b'{["-0123456789tfn \t\r\n'


def take_publishes(list events, Py_ssize_t start, str telemetry_topic, object validate_into, str protocol,
                   object client_id, object next_ns, object clock, set qos2_unreleased, list records,
                   list rejections, list pubacks, list pubrecs):
    """See the twin, gridgate.protocols.mqtt.codec_py.take_publishes: compiled because a
    Python loop over each read's publishes was a measurable share of the
    loop's CPU per reading."""
    cdef Py_ssize_t i = start, n = len(events)
    cdef object ev, payload, topic, now, publish_ns, pid, first = 0
    cdef object qos
    cdef Py_ssize_t size
    cdef Py_buffer *view
    cdef unsigned char c
    cdef Validator validator = _pl_bound_validator(validate_into)
    cdef bint wall_clock = clock is _mq_time_ns
    while i < n:
        ev = events[i]
        if type(ev) is not _mq_Publish:
            break
        qos = _mq_pub_field(ev, _MQ_PUB_QOS)
        if qos == 2 and qos2_unreleased is None:
            break
        now = _mq_wall_ns() if wall_clock else clock()
        publish_ns = now if now > next_ns else next_ns
        if first == 0:
            first = publish_ns
        i += 1
        if qos == 2:
            pid = _mq_pub_field(ev, _MQ_PUB_PACKET_ID)
            pubrecs.append(pid)
            if pid in qos2_unreleased:
                continue
            qos2_unreleased.add(pid)
        topic = _mq_pub_field(ev, _MQ_PUB_TOPIC)
        if topic == telemetry_topic or topic == "telemetry":
            payload = _mq_pub_field(ev, _MQ_PUB_PAYLOAD)
            if type(payload) is memoryview:             # what the codec gives: a slice of the read
                view = PyMemoryView_GET_BUFFER(payload)
                size = view.len
                c = (<unsigned char *>view.buf)[0] if size else 0
            else:                                       # bytes (a packet that spanned reads), or any buffer
                size = len(payload)
                c = payload[0] if size else 0
            fmt = "json" if not size or _mq_JSON_FIRST[c] else "msgpack"
            next_ns = publish_ns + _pl_validate_into(validator, validate_into, payload, fmt, protocol, client_id,
                                                     publish_ns, records, rejections) + 1
        else:
            rejections.append(_mq_Rejection(
                reason="bad_topic", field="topic", index=None, device_id=client_id,
                raw=bytes(_mq_pub_field(ev, _MQ_PUB_PAYLOAD)),
                detail=f"topic {topic!r} is not 'telemetry' or {telemetry_topic!r}"))
        if qos == 1:
            pubacks.append(_mq_pub_field(ev, _MQ_PUB_PACKET_ID))
    return i, next_ns, first
