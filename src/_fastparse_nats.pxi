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


# The JetStream sink's one-reading messages, compiled: for each record, its
# msg-id (BLAKE2b-96 of the deterministic MessagePack of device id, ts_ns,
# fields and tags, by the sink's own encoder and hash object), its body, and
# the parts of its first-publish frame. Twin: gridgate/sinks/nats_frames_py.py
# (build_frames: the reference; both must give the same parts for every
# record). The encoders, the hash and the subject's render are the sink's own
# callables, called from here; what is compiled is everything between them:
# the attribute reads, the id's hex and decimal digits, the header block and
# the frame's lengths, written once into the bytes they end up in, where the
# interpreter's loop took about 0.7 us of the 2.5 per record (formatting with
# bytes %, hexlify, tuple and attribute traffic).

from cpython.bytes cimport PyBytes_FromStringAndSize as _nf_bytes_new
from cpython.long cimport PyLong_AsLongLongAndOverflow as _nf_as_ll
from libc.string cimport memcpy as _nf_memcpy

cdef const char* _NF_HEX = b"0123456789abcdef"
cdef const char* _NF_HDR = b"NATS/1.0\r\nNats-Msg-Id: "
cdef Py_ssize_t _NF_HDR_LEN = 23


cdef inline Py_ssize_t _nf_decimal(char* out, long long v) noexcept nogil:
    """``v`` in decimal (a '-' first when negative) into ``out`` (room for 20); its length."""
    cdef char tmp[24]
    cdef Py_ssize_t n = 0, k = 0
    cdef unsigned long long u
    if v < 0:
        out[0] = c'-'
        k = 1
        u = <unsigned long long>(-(v + 1)) + 1
    else:
        u = <unsigned long long>v
    while True:
        tmp[n] = <char>(c'0' + u % 10)
        n += 1
        u //= 10
        if u == 0:
            break
    while n:
        n -= 1
        out[k] = tmp[n]
        k += 1
    return k


def nats_build_frames(records, Py_ssize_t start, Py_ssize_t stop, render, dict head_of, bytes prefix, bytes tail,
                      id_encode, encode, blake, token, list sizes, list heads, list tails):
    """Build the one-reading messages ``records[start:stop]``; the index of the first not built.

    For each: ``sizes`` gets its size (header block and body), ``heads`` its
    frame head ``HPUB <subject> <prefix>`` (from ``head_of``, by subject,
    added there when new) and ``tails`` the rest of the frame after the slot:
    `` <header length> <size>\\r\\nNATS/1.0\\r\\nNats-Msg-Id: <id><tail><body>\\r\\n``.
    The id is ``<token(device_id)>:<ts_ns>:<hex of the digest>``, the digest
    that of ``blake()`` updated with ``id_encode((device_id, ts_ns, fields,
    tags))``; the body is ``encode(record)``. A record with a trace context
    (its headers are built by the caller) or a ts_ns outside int64 stops the
    build there, and its index is returned; ``stop`` when all were built.
    """
    cdef Py_ssize_t i, idl, hlen, size, total, k, n_ts, n_h, n_s, j
    cdef long long ts_v
    cdef int overflow = 0
    cdef char ts_dec[24]
    cdef char hlen_dec[24]
    cdef char size_dec[24]
    cdef bytes tok, digest, payload, out, head
    cdef char* w
    cdef const unsigned char* d
    cdef Py_ssize_t ltail = len(tail)
    if start < 0 or stop < start or stop > len(records):
        raise ValueError(f"records[{start}:{stop}] is not a range of the {len(records)} records")
    for i in range(start, stop):
        r = records[i]
        if r.traceparent is not None:
            return i
        ts = r.ts_ns
        if type(ts) is not int:
            return i
        ts_v = _nf_as_ll(ts, &overflow)
        if overflow:
            return i
        device_id = r.device_id
        h = blake()
        h.update(id_encode((device_id, ts, r.fields, r.tags)))
        digest = h.digest()
        tok = token(device_id)
        payload = encode(r)
        n_ts = _nf_decimal(ts_dec, ts_v)
        # the id: token ':' ts ':' hex digest
        idl = len(tok) + 1 + n_ts + 1 + 2 * len(digest)
        hlen = _NF_HDR_LEN + idl + ltail
        size = hlen + len(payload)
        n_h = _nf_decimal(hlen_dec, hlen)
        n_s = _nf_decimal(size_dec, size)
        total = 1 + n_h + 1 + n_s + 2 + size + 2
        out = _nf_bytes_new(NULL, total)
        w = <char*>out
        k = 0
        w[k] = c' '
        k += 1
        _nf_memcpy(w + k, hlen_dec, n_h)
        k += n_h
        w[k] = c' '
        k += 1
        _nf_memcpy(w + k, size_dec, n_s)
        k += n_s
        w[k] = c'\r'
        w[k + 1] = c'\n'
        k += 2
        _nf_memcpy(w + k, _NF_HDR, _NF_HDR_LEN)
        k += _NF_HDR_LEN
        _nf_memcpy(w + k, <const char*>tok, len(tok))
        k += len(tok)
        w[k] = c':'
        k += 1
        _nf_memcpy(w + k, ts_dec, n_ts)
        k += n_ts
        w[k] = c':'
        k += 1
        d = <const unsigned char*><const char*>digest
        for j in range(len(digest)):
            w[k] = _NF_HEX[d[j] >> 4]
            w[k + 1] = _NF_HEX[d[j] & 15]
            k += 2
        _nf_memcpy(w + k, <const char*>tail, ltail)
        k += ltail
        _nf_memcpy(w + k, <const char*>payload, len(payload))
        k += len(payload)
        w[k] = c'\r'
        w[k + 1] = c'\n'
        subject = render(r)
        head = head_of.get(subject)
        if head is None:
            head = b"HPUB " + (<str?>subject).encode() + b" " + prefix
            head_of[subject] = head
        sizes.append(size)
        heads.append(head)
        tails.append(out)
    return stop
