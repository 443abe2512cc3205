# JetStream's plain PubAcks, compiled: the scan at the head of a read of the
# NATS sink's ack subscription. Twin: gridgate/sinks/nats_acks_py.py
# (scan_plain_acks, a regex: the reference; both must give the same slots and
# the same end position for every input).
#
# Why compiled: a read of a window's acks is hundreds of
#     MSG <inbox>.<slot> <sid>  <size>\r\n{"stream":"<stream>", "seq":<n>}\r\n
# and the regex loop took about 0.8 us of the sink's loop thread per ack
# (match, size check, group, append), as much as a tenth of a reading's whole
# cost there. Here each is checked byte by byte in one pass and only its slot
# digits become an object.
#
# Every length is checked here by hand (the release build has Cython's bounds
# checks off). The buffer is only read, and nothing here can call back into
# Python between taking its pointer and the last read of it.

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcmp

# a size on the line past this is no ack's (its body would not fit a buffer);
# the digits are still read, and the size then never equals a body's length
cdef long long _NA_SIZE_CAP = 1000000000000


cdef inline bint _na_digit(char c) noexcept nogil:
    return c'0' <= c <= c'9'


def nats_scan_plain_acks(buf, Py_ssize_t pos, bytes prefix, bytes sid, bytes head, list out):
    """Scan the plain acks at ``buf[pos:]``; append each one's slot digits to ``out``.

    A plain ack is ``MSG <prefix><digits> <sid> +<size>\\r\\n<head><digits>}\\r\\n``
    whose ``size`` is the length of its body (``<head><digits>}``). The scan
    stops at the first message that is not one (or is cut by the end of
    ``buf``) and returns where it stopped: the end of the last plain ack
    taken, ``pos`` if none.
    """
    if type(buf) is not bytearray:
        raise TypeError(f"buf must be a bytearray, not {type(buf).__name__}")
    cdef Py_ssize_t n = PyByteArray_GET_SIZE(buf)
    if pos < 0 or pos > n:
        raise ValueError(f"pos {pos} is outside the buffer (0..{n})")
    cdef const char* b = PyByteArray_AS_STRING(buf)
    cdef const char* pp = PyBytes_AS_STRING(prefix)
    cdef Py_ssize_t lp = PyBytes_GET_SIZE(prefix)
    cdef const char* ps = PyBytes_AS_STRING(sid)
    cdef Py_ssize_t ls = PyBytes_GET_SIZE(sid)
    cdef const char* ph = PyBytes_AS_STRING(head)
    cdef Py_ssize_t lh = PyBytes_GET_SIZE(head)
    cdef Py_ssize_t p, s0, s1, z0, body0
    cdef long long size
    cdef list found = []
    while True:
        p = pos
        if n - p < 4 or memcmp(b + p, b"MSG ", 4) != 0:
            break
        p += 4
        if n - p < lp or memcmp(b + p, pp, lp) != 0:
            break
        p += lp
        s0 = p
        while p < n and _na_digit(b[p]):
            p += 1
        if p == s0:
            break
        s1 = p
        if p >= n or b[p] != c' ':
            break
        p += 1
        if n - p < ls or memcmp(b + p, ps, ls) != 0:
            break
        p += ls
        if p >= n or b[p] != c' ':
            break
        while p < n and b[p] == c' ':
            p += 1
        z0 = p
        size = 0
        while p < n and _na_digit(b[p]):
            if size <= _NA_SIZE_CAP:
                size = size * 10 + (b[p] - c'0')
            p += 1
        if p == z0:
            break
        if n - p < 2 or b[p] != c'\r' or b[p + 1] != c'\n':
            break
        p += 2
        body0 = p
        if n - p < lh or memcmp(b + p, ph, lh) != 0:
            break
        p += lh
        z0 = p
        while p < n and _na_digit(b[p]):
            p += 1
        if p == z0 or p >= n or b[p] != c'}':
            break
        p += 1
        if n - p < 2 or b[p] != c'\r' or b[p + 1] != c'\n':
            break
        if size != p - body0:
            break
        found.append(PyBytes_FromStringAndSize(b + s0, s1 - s0))
        pos = p + 2
    out.extend(found)
    return pos
