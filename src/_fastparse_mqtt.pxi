# MQTT 3.1.1 server codec: the compiled twin of gridgate/_mqtt_py.py, which is
# the reference (its docstring lists the error reasons). Both must return
# equal events and raise equal MQTTProtocolErrors on every input.
#
# Why compiled: every byte a device sends passes through feed(); walking the
# fixed header varint and the length-prefixed fields over a C pointer, and
# building only the event objects, is what makes one read of 64 KiB with
# hundreds of PUBLISH packets cost one call instead of thousands of
# interpreter steps.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcpy

from gridgate.errors import MQTTProtocolError as _mq_Error
from gridgate.mqtt_events import (
    Connect as _mq_Connect, Disconnect as _mq_Disconnect, PingReq as _mq_PingReq, PubAck as _mq_PubAck,
    PubComp as _mq_PubComp, Publish as _mq_Publish, PubRec as _mq_PubRec, PubRel as _mq_PubRel,
    Subscribe as _mq_Subscribe, Unsubscribe as _mq_Unsubscribe, Will as _mq_Will,
)

# Required fixed-header flags per packet type (table 2.2.2); -1 = PUBLISH.
cdef int[16] _mq_FLAGS
_mq_FLAGS[:] = [0, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0]


cdef object _mq_err(str reason, str detail="", object return_code=None):
    return _mq_Error(reason, detail, return_code)


cdef str _mq_string(const unsigned char* p, Py_ssize_t n):
    """Decode an MQTT UTF-8 string (MQTT-1.5.3-1/2) or raise bad_utf8."""
    cdef str text
    try:
        text = PyUnicode_DecodeUTF8(<const char*>p, n, "strict")
    except UnicodeDecodeError:
        raise _mq_err("bad_utf8", "string is not well-formed UTF-8") from None
    if n and memchr(p, 0, n) != NULL:
        raise _mq_err("bad_utf8", "string contains U+0000")
    return text


cdef int _mq_check_topic_name(const unsigned char* p, Py_ssize_t n, str topic) except -1:
    if n == 0:
        raise _mq_err("bad_topic", "empty topic name")
    if memchr(p, ord("+"), n) != NULL or memchr(p, ord("#"), n) != NULL:
        raise _mq_err("bad_topic", f"wildcard in topic name {topic!r}")
    return 0


cdef int _mq_check_topic_filter(const unsigned char* p, Py_ssize_t n, str topic) except -1:
    # Section 4.7.1 on bytes: '/', '+' and '#' are ASCII and never occur
    # inside a multi-byte UTF-8 sequence, so this equals the str version.
    cdef Py_ssize_t i = 0, start = 0
    cdef unsigned char c
    if n == 0:
        raise _mq_err("bad_topic_filter", "empty topic filter")
    while i <= n:
        if i == n or p[i] == ord("/"):
            # level is p[start:i]
            for j in range(start, i):
                c = p[j]
                if c == ord("#"):
                    if i - start != 1 or i != n:
                        raise _mq_err("bad_topic_filter", f"'#' must be a whole last level in {topic!r}")
                elif c == ord("+"):
                    if i - start != 1:
                        raise _mq_err("bad_topic_filter", f"'+' must be a whole level in {topic!r}")
            start = i + 1
        i += 1
    return 0


cdef class MQTTCodec:
    """Server side of one MQTT 3.1.1 / 3.1 connection (sans-IO)."""

    cdef Py_ssize_t _max
    cdef bytes _buf
    cdef bint _connected
    cdef bint _disconnected
    cdef int _level
    cdef object _error

    def __init__(self, Py_ssize_t max_packet_bytes=1048576):
        self._max = max_packet_bytes
        self._buf = b""
        self._connected = False
        self._disconnected = False
        self._level = 0
        self._error = None

    @property
    def max_packet_bytes(self):
        return self._max

    @property
    def connected(self):
        return self._connected

    @property
    def protocol_level(self):
        return self._level

    @property
    def buffered(self):
        return len(self._buf)

    def feed(self, data):
        """Decode every complete packet now buffered; keep the rest."""
        cdef bytes buf
        cdef const unsigned char* p
        cdef Py_ssize_t pos = 0, end, i, length, mult, nlen
        cdef unsigned char first, byte
        cdef list events = []
        cdef object view = None
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)
        if PyBytes_GET_SIZE(self._buf):
            buf = self._buf + data
        else:
            buf = data
        p = <const unsigned char*>PyBytes_AS_STRING(buf)
        end = PyBytes_GET_SIZE(buf)
        try:
            while pos < end:
                if self._disconnected:
                    raise _mq_err("data_after_disconnect", "bytes after DISCONNECT")
                first = p[pos]
                length = 0
                mult = 1
                i = pos + 1
                while True:
                    if i >= end:
                        self._buf = buf[pos:]
                        return events
                    byte = p[i]
                    length += (byte & 0x7F) * mult
                    i += 1
                    if not (byte & 0x80):
                        break
                    if i - pos - 1 >= 4:
                        raise _mq_err("malformed", "remaining length longer than 4 bytes")
                    mult *= 128
                if (i - pos) + length > self._max:
                    raise _mq_err("too_large", f"packet of {(i - pos) + length} bytes exceeds "
                                               f"max_packet_bytes {self._max}")
                if i + length > end:
                    self._buf = buf[pos:]
                    return events
                if (first >> 4) == 3 and self._connected:
                    if view is None:
                        view = memoryview(buf)
                    events.append(self._publish(first & 0x0F, p, i, i + length, view))
                else:
                    events.append(self._decode(first, p, i, i + length, buf))
                pos = i + length
            self._buf = b""
            return events
        except _mq_Error as exc:
            self._error = exc
            self._buf = b""
            raise

    cdef object _publish(self, int flags, const unsigned char* p, Py_ssize_t start, Py_ssize_t end, object view):
        cdef int qos = (flags >> 1) & 3
        cdef bint dup = (flags & 8) != 0
        cdef Py_ssize_t pos = start, n
        cdef int pid = 0
        cdef str topic
        if qos == 3:
            raise _mq_err("malformed", "PUBLISH with QoS 3")
        if dup and qos == 0:
            raise _mq_err("bad_flags", "DUP set on a QoS 0 PUBLISH")
        if pos + 2 > end:
            raise _mq_err("malformed", "packet ends inside a field")
        n = (p[pos] << 8) | p[pos + 1]
        pos += 2
        if pos + n > end:
            raise _mq_err("malformed", "length prefix runs past the packet")
        topic = _mq_string(p + pos, n)
        _mq_check_topic_name(p + pos, n, topic)
        pos += n
        if qos:
            if pos + 2 > end:
                raise _mq_err("malformed", "packet ends inside a field")
            pid = (p[pos] << 8) | p[pos + 1]
            pos += 2
            if pid == 0:
                raise _mq_err("bad_packet_id", "packet identifier 0")
        return _mq_Publish(topic, view[pos:end], qos, pid, (flags & 1) != 0, dup)

    cdef object _decode(self, unsigned char first, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                        bytes buf):
        cdef int ptype = first >> 4
        cdef int flags = first & 0x0F
        cdef int pid, required
        cdef Py_ssize_t pos = start, n
        cdef list topics
        cdef str topic
        cdef int qos
        if ptype == 0 or ptype == 15:
            raise _mq_err("malformed", f"reserved packet type {ptype}")
        required = _mq_FLAGS[ptype]
        if required >= 0 and flags != required:
            raise _mq_err("bad_flags", f"packet type {ptype} with flags {flags:#x}")
        if ptype == 2 or ptype == 9 or ptype == 11 or ptype == 13:
            raise _mq_err("unexpected_packet", f"packet type {ptype} is sent by servers only")
        if not self._connected:
            if ptype != 1:
                raise _mq_err("expected_connect", "the first packet must be CONNECT")
            return self._connect(p, start, end)
        if ptype == 3:  # only reached through feed() before CONNECT is impossible; kept for safety
            return self._publish(flags, p, start, end, memoryview(buf))
        if ptype == 1:
            raise _mq_err("duplicate_connect", "a second CONNECT on one connection")
        if 4 <= ptype <= 7:
            if end - start != 2:
                raise _mq_err("malformed", "acknowledgement with remaining length other than 2")
            pid = (p[start] << 8) | p[start + 1]
            if pid == 0:
                raise _mq_err("bad_packet_id", "packet identifier 0")
            if ptype == 4:
                return _mq_PubAck(pid)
            if ptype == 5:
                return _mq_PubRec(pid)
            if ptype == 6:
                return _mq_PubRel(pid)
            return _mq_PubComp(pid)
        if ptype == 8 or ptype == 10:
            if pos + 2 > end:
                raise _mq_err("malformed", "packet ends inside a field")
            pid = (p[pos] << 8) | p[pos + 1]
            pos += 2
            if pid == 0:
                raise _mq_err("bad_packet_id", "packet identifier 0")
            if pos >= end:
                raise _mq_err("malformed", "SUBSCRIBE/UNSUBSCRIBE without a topic filter")
            topics = []
            while pos < end:
                if pos + 2 > end:
                    raise _mq_err("malformed", "packet ends inside a field")
                n = (p[pos] << 8) | p[pos + 1]
                pos += 2
                if pos + n > end:
                    raise _mq_err("malformed", "length prefix runs past the packet")
                topic = _mq_string(p + pos, n)
                if ptype == 8:
                    if pos + n + 1 > end:
                        raise _mq_err("malformed", "packet ends inside a field")
                    qos = p[pos + n]
                    if qos > 2:
                        raise _mq_err("malformed", f"requested QoS byte {qos:#x}")
                    _mq_check_topic_filter(p + pos, n, topic)
                    topics.append((topic, qos))
                    pos += n + 1
                else:
                    _mq_check_topic_filter(p + pos, n, topic)
                    topics.append(topic)
                    pos += n
            if ptype == 8:
                return _mq_Subscribe(pid, topics)
            return _mq_Unsubscribe(pid, topics)
        if end != start:
            raise _mq_err("malformed", f"packet type {ptype} must have no body")
        if ptype == 12:
            return _mq_PingReq()
        self._disconnected = True
        return _mq_Disconnect()

    cdef object _connect(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        cdef Py_ssize_t pos = start
        cdef bytes name_raw
        cdef int level, cflags, keepalive, will_qos
        cdef bint clean, will_flag, will_retain, has_password, has_username
        cdef str client_id, will_topic, username = None
        cdef object will = None, password = None
        cdef bytes will_payload
        name_raw = _mq_binary(p, &pos, end)
        level = _mq_u8(p, &pos, end)
        if not ((name_raw == b"MQTT" and level == 4) or (name_raw == b"MQIsdp" and level == 3)):
            raise _mq_err("unsupported_protocol", f"protocol {name_raw[:16]!r} level {level}", 1)
        cflags = _mq_u8(p, &pos, end)
        keepalive = _mq_u16(p, &pos, end)
        if cflags & 0x01:
            raise _mq_err("malformed", "reserved CONNECT flag set")
        clean = (cflags & 0x02) != 0
        will_flag = (cflags & 0x04) != 0
        will_qos = (cflags >> 3) & 3
        will_retain = (cflags & 0x20) != 0
        has_password = (cflags & 0x40) != 0
        has_username = (cflags & 0x80) != 0
        if not will_flag and (will_qos or will_retain):
            raise _mq_err("malformed", "Will QoS/retain set without the Will flag")
        if will_qos == 3:
            raise _mq_err("malformed", "Will QoS 3")
        if has_password and not has_username:
            raise _mq_err("malformed", "password flag without username flag")
        client_id = _mq_str_field(p, &pos, end)
        if will_flag:
            will_topic = _mq_str_field(p, &pos, end)
            will_raw = will_topic.encode("utf-8")
            _mq_check_topic_name(<const unsigned char*>PyBytes_AS_STRING(will_raw), len(will_raw), will_topic)
            will_payload = _mq_binary(p, &pos, end)
            will = _mq_Will(will_topic, will_payload, will_qos, will_retain)
        if has_username:
            username = _mq_str_field(p, &pos, end)
        if has_password:
            password = _mq_binary(p, &pos, end)
        if pos < end:
            raise _mq_err("malformed", "bytes after the CONNECT payload")
        if not client_id and not clean:
            raise _mq_err("identifier_rejected", "empty client id requires clean session", 2)
        self._connected = True
        self._level = level
        return _mq_Connect(name_raw.decode("ascii"), level, clean, keepalive, client_id, will, username,
                           password)


cdef int _mq_u8(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
    if pos[0] + 1 > end:
        raise _mq_err("malformed", "packet ends inside a field")
    pos[0] += 1
    return p[pos[0] - 1]


cdef int _mq_u16(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
    if pos[0] + 2 > end:
        raise _mq_err("malformed", "packet ends inside a field")
    pos[0] += 2
    return (p[pos[0] - 2] << 8) | p[pos[0] - 1]


cdef bytes _mq_binary(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end):
    cdef Py_ssize_t n = _mq_u16(p, pos, end)
    if pos[0] + n > end:
        raise _mq_err("malformed", "length prefix runs past the packet")
    pos[0] += n
    return PyBytes_FromStringAndSize(<const char*>(p + pos[0] - n), n)


cdef str _mq_str_field(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end):
    cdef Py_ssize_t n = _mq_u16(p, pos, end)
    if pos[0] + n > end:
        raise _mq_err("malformed", "length prefix runs past the packet")
    pos[0] += n
    return _mq_string(p + pos[0] - n, n)


# -- encoders ---------------------------------------------------------------

cdef int _mq_check_pid(long packet_id) except -1:
    if packet_id < 1 or packet_id > 65535:
        raise ValueError(f"packet id {packet_id} outside 1..65535")
    return 0


cdef bytes _mq_ack(unsigned char first, long packet_id):
    cdef char[4] out
    _mq_check_pid(packet_id)
    out[0] = <char>first
    out[1] = 2
    out[2] = <char>((packet_id >> 8) & 0xFF)
    out[3] = <char>(packet_id & 0xFF)
    return PyBytes_FromStringAndSize(out, 4)


def encode_connack(bint session_present, long return_code):
    if return_code < 0 or return_code > 255:
        raise ValueError(f"return code {return_code} outside 0..255")
    return bytes((0x20, 2, 1 if session_present else 0, return_code))


def encode_puback(long packet_id):
    return _mq_ack(0x40, packet_id)


def encode_pubrec(long packet_id):
    return _mq_ack(0x50, packet_id)


def encode_pubrel(long packet_id):
    return _mq_ack(0x62, packet_id)


def encode_pubcomp(long packet_id):
    return _mq_ack(0x70, packet_id)


def encode_unsuback(long packet_id):
    return _mq_ack(0xB0, packet_id)


def encode_pingresp():
    return b"\xd0\x00"


def encode_acks(int packet_type, packet_ids):
    """Several PUBACK/PUBREC/PUBREL/PUBCOMP packets in one buffer."""
    cdef unsigned char first
    cdef list ids = list(packet_ids)
    cdef Py_ssize_t n = len(ids), k
    cdef long pid
    cdef bytes out
    cdef unsigned char* q
    if packet_type == 4:
        first = 0x40
    elif packet_type == 5:
        first = 0x50
    elif packet_type == 6:
        first = 0x62
    elif packet_type == 7:
        first = 0x70
    else:
        raise ValueError(f"packet type {packet_type} is not an acknowledgement")
    out = PyBytes_FromStringAndSize(NULL, 4 * n)
    q = <unsigned char*>PyBytes_AS_STRING(out)
    for k in range(n):
        pid = ids[k]
        _mq_check_pid(pid)
        q[4 * k] = first
        q[4 * k + 1] = 2
        q[4 * k + 2] = (pid >> 8) & 0xFF
        q[4 * k + 3] = pid & 0xFF
    return out


cdef bytes _mq_remaining_length(Py_ssize_t n):
    cdef char[4] out
    cdef int k = 0
    cdef int byte
    while True:
        byte = n % 128
        n //= 128
        if n:
            out[k] = <char>(byte | 0x80)
        else:
            out[k] = <char>byte
            return PyBytes_FromStringAndSize(out, k + 1)
        k += 1


def encode_suback(long packet_id, return_codes):
    _mq_check_pid(packet_id)
    codes = bytes(return_codes)
    if not codes or any(c not in (0, 1, 2, 0x80) for c in codes):
        raise ValueError(f"invalid SUBACK return codes {list(codes)}")
    return b"\x90" + _mq_remaining_length(2 + len(codes)) + packet_id.to_bytes(2, "big") + codes


def encode_publish(str topic, payload, int qos=0, long packet_id=0, bint retain=False, bint dup=False):
    cdef bytes raw_topic
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    try:
        raw_topic = topic.encode("utf-8")
        _mq_string(<const unsigned char*>PyBytes_AS_STRING(raw_topic), len(raw_topic))
        _mq_check_topic_name(<const unsigned char*>PyBytes_AS_STRING(raw_topic), len(raw_topic), topic)
    except (_mq_Error, UnicodeEncodeError) as exc:
        raise ValueError(f"invalid topic {topic!r}: {exc}") from None
    if len(raw_topic) > 65535:
        raise ValueError("topic longer than 65535 bytes")
    if qos:
        _mq_check_pid(packet_id)
    elif packet_id or dup:
        raise ValueError("QoS 0 PUBLISH takes no packet id and no DUP")
    payload = bytes(payload)
    body_len = 2 + len(raw_topic) + (2 if qos else 0) + len(payload)
    if body_len > 268435455:
        raise ValueError("PUBLISH larger than MQTT allows")
    first = 0x30 | (8 if dup else 0) | (qos << 1) | (1 if retain else 0)
    parts = [bytes((first,)), _mq_remaining_length(body_len), len(raw_topic).to_bytes(2, "big"), raw_topic]
    if qos:
        parts.append(packet_id.to_bytes(2, "big"))
    parts.append(payload)
    return b"".join(parts)
