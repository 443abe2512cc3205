# HTTP/1.1 request parser, compiled: the twin of gridgate/protocols/http/parser_py.py.
#
# gridgate/protocols/http/parser_py.py is the reference; its module docstring is the
# contract (grammar, refusals and their order, zero-copy rules). Both must
# give the same requests and raise equal HTTPParseErrors on every input,
# however it is split into reads (tests/protocols/http/test_http_parser.py, which also
# holds both to the std engine's h11 reader).
#
# Why compiled: the fast engine's whole point is that a request head costs
# a few hundred nanoseconds, not the tens of microseconds of h11's regexes,
# event objects and state machine. Here a head is walked once over a const
# unsigned char* with 256-entry class tables; the only objects built are the
# strings the API hands out and a memoryview slice for the body.
#
# Included into src/_fastparse.pyx; private module-level names start _ht_.

from cpython.unicode cimport PyUnicode_DecodeLatin1

from gridgate.errors import HTTPParseError as _ht_Error

NEED_DATA = 0
HEAD = 1
REQUEST = 2

cdef enum:
    _HT_S_HEAD = 0
    _HT_S_LENGTH = 1
    _HT_S_CHUNK_LINE = 2
    _HT_S_CHUNK_DATA = 3
    _HT_S_CHUNK_CRLF = 4
    _HT_S_TRAILERS = 5
    _HT_MAX_CHUNK_DIGITS = 20    # the twin's MAX_CHUNK_DIGITS
    _HT_MAX_EMPTY_LINES = 4      # empty lines ignored before a request line (the twin's MAX_EMPTY_LINES)

cdef unsigned char[256] _ht_TCHAR
cdef unsigned char[256] _ht_VCHAR
cdef unsigned char[256] _ht_VALUE
cdef unsigned char[256] _ht_HEX
cdef unsigned char[256] _ht_QDTEXT
cdef unsigned char[256] _ht_QPAIR


cdef void _ht_init_tables():
    cdef int i
    for i in range(256):
        _ht_TCHAR[i] = 0
        _ht_VCHAR[i] = 0x21 <= i <= 0x7E
        _ht_VALUE[i] = i == 0x09 or 0x20 <= i <= 0x7E or i >= 0x80
        _ht_HEX[i] = 0
        _ht_QDTEXT[i] = i == 0x09 or i == 0x20 or i == 0x21 or 0x23 <= i <= 0x5B or 0x5D <= i <= 0x7E or i >= 0x80
        _ht_QPAIR[i] = i == 0x09 or 0x20 <= i <= 0x7E or i >= 0x80
    for i in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        _ht_TCHAR[i] = 1
    for i in b"0123456789abcdefABCDEF":
        _ht_HEX[i] = 1


_ht_init_tables()


cdef inline object _ht_bad(str detail):
    return _ht_Error(400, "bad_request", detail)


cdef inline bint _ht_is_ows(unsigned char c):
    return c == 0x20 or c == 0x09


cdef inline bint _ht_lower_eq(const unsigned char* p, Py_ssize_t n, const char* lower_name, Py_ssize_t m):
    """p[:n] equals the lower-case ASCII lower_name[:m], case-insensitively."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if n != m:
        return False
    for i in range(n):
        c = p[i]
        if 0x41 <= c <= 0x5A:
            c += 0x20
        if c != <unsigned char>lower_name[i]:
            return False
    return True


cdef inline Py_ssize_t _ht_find_crlf(const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
    """Index of the first CR LF in p[start:end], or -1."""
    cdef const unsigned char* q
    cdef Py_ssize_t i = start
    while i + 1 < end:
        q = <const unsigned char*>memchr(p + i, 0x0D, end - i - 1)
        if q == NULL:
            return -1
        i = q - p
        if p[i + 1] == 0x0A:
            return i
        i += 1
    return -1


cdef inline Py_ssize_t _ht_field_line(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* colon) except -2:
    """The CR ending the field line at p[i] (its colon in colon[0]), -1 until it is in."""
    cdef Py_ssize_t start = i
    if p[i] == 0x20 or p[i] == 0x09:
        raise _ht_bad("obs-fold (a field line starting with whitespace) is refused")
    while i < n and _ht_TCHAR[p[i]]:
        i += 1
    if i >= n:
        return -1
    if p[i] != 0x3A or i == start:
        raise _ht_bad("field name is not a token followed by a colon")
    colon[0] = i
    i += 1
    while i < n and _ht_VALUE[p[i]]:
        i += 1
    if i >= n:
        return -1
    if p[i] != 0x0D:
        raise _ht_bad("bare LF or a control byte in a field value")
    if i + 1 >= n:
        return -1
    if p[i + 1] != 0x0A:
        raise _ht_bad("bare CR in a field value")
    return i


cdef class HTTPRequestParser:
    """Per-connection parser and request context (see gridgate/protocols/http/parser_py.py)."""

    cdef public Py_ssize_t max_header_bytes
    cdef public Py_ssize_t max_body_bytes
    cdef object _buf                 # bytes (fresh read) or bytearray (a request spans reads)
    cdef bint _is_bytes
    cdef Py_ssize_t _pos
    cdef Py_ssize_t _scan
    cdef Py_ssize_t _remaining
    cdef int _state
    cdef bytearray _chunks
    cdef bint _fresh                 # the next head is a new request's
    cdef int _hstate                 # 0: before the request line, 1: header lines
    cdef int _empties
    cdef int _hosts
    cdef int _authorizations
    cdef bint _te                    # a Transfer-Encoding field was seen
    cdef bint _te_chunked            # ... and its last coding so far is chunked
    cdef bint _te_other              # ... with a coding other than chunked before it
    cdef readonly str method
    cdef readonly str target
    cdef readonly str http_version
    cdef readonly list headers
    cdef readonly object body
    cdef readonly bint keep_alive
    cdef readonly bint expect_continue
    cdef readonly str content_type
    cdef readonly str content_encoding
    cdef readonly str authorization
    cdef readonly long long content_length
    cdef readonly bint chunked
    cdef readonly bint has_length

    def __init__(self, Py_ssize_t max_header_bytes=16384, Py_ssize_t max_body_bytes=1048576):
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._buf = b""
        self._is_bytes = True
        self._pos = 0
        self._scan = 0
        self._state = _HT_S_HEAD
        self._remaining = 0
        self._chunks = bytearray()
        self._fresh = True
        self._reset_request()

    cdef void _reset_request(self):
        self.method = ""
        self.target = ""
        self.http_version = ""
        self.headers = []
        self.body = b""
        self.keep_alive = True
        self.expect_continue = False
        self.content_type = ""
        self.content_encoding = ""
        self.authorization = ""
        self._authorizations = 0
        self.content_length = -1
        self.chunked = False
        self.has_length = False
        self._hstate = 0
        self._empties = 0
        self._hosts = 0
        self._te = False
        self._te_chunked = False
        self._te_other = False

    cdef inline Py_ssize_t _len(self):
        if self._is_bytes:
            return PyBytes_GET_SIZE(self._buf)
        return PyByteArray_GET_SIZE(self._buf)

    cdef inline const unsigned char* _ptr(self):
        if self._is_bytes:
            return <const unsigned char*>PyBytes_AS_STRING(self._buf)
        return <const unsigned char*>PyByteArray_AS_STRING(self._buf)

    @property
    def buffered(self) -> int:
        return self._len() - self._pos

    @property
    def head_done(self) -> bool:
        return self._state != _HT_S_HEAD

    def feed(self, data) -> None:
        cdef Py_ssize_t n = self._len()
        if not len(data):
            return
        if self._pos >= n:
            self._buf = data if PyBytes_CheckExact(data) else bytes(data)
            self._is_bytes = True
            self._pos = 0
            self._scan = 0
            return
        if self._is_bytes:
            self._buf = PyByteArray_FromStringAndSize(<const char*>self._ptr() + self._pos, n - self._pos)
            self._is_bytes = False
            self._scan -= self._pos
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > n:
            del self._buf[:self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def next(self) -> int:
        cdef Py_ssize_t end
        if self._state == _HT_S_HEAD:
            if self._fresh:
                self._reset_request()
                self._fresh = False
                if self._pos and self._pos >= self._len():
                    # all of it taken: an idle connection keeps no read buffer
                    self._buf = b""
                    self._is_bytes = True
                    self._pos = 0
                    self._scan = 0
            if not self._parse_head():
                return NEED_DATA
        if self._state == _HT_S_LENGTH:
            end = self._pos + self._remaining
            if self._len() < end:
                return HEAD
            if self._remaining == 0:
                self.body = b""
            elif self._is_bytes:
                self.body = PyMemoryView_FromObject(self._buf)[self._pos:end]
            else:
                self.body = PyBytes_FromStringAndSize(<const char*>self._ptr() + self._pos, self._remaining)
            self._pos = end
        else:
            if not self._read_chunks():
                return HEAD
            self.body = bytes(self._chunks)
            self._chunks = bytearray()
        self._state = _HT_S_HEAD
        self._scan = self._pos
        self._fresh = True
        return REQUEST

    # -- head ------------------------------------------------------------------

    cdef bint _parse_head(self) except -1:
        # Lines are taken as they arrive and judged byte by byte, so a head is
        # refused at its first bad byte (the twin's docstring has the rules);
        # only the line still arriving is walked again on the next call.
        cdef const unsigned char* p = self._ptr()
        cdef Py_ssize_t total = self._len()
        cdef Py_ssize_t limit = self._pos + self.max_header_bytes
        cdef Py_ssize_t n = total if total < limit else limit
        cdef Py_ssize_t i = self._scan, eol
        while i < n:
            if p[i] == 0x0D:
                if i + 1 >= n:
                    break
                if p[i + 1] != 0x0A:
                    raise _ht_bad("bare CR in the request head")
                if self._hstate == 1:
                    self._end_of_head()
                    self._pos = i + 2
                    return True
                # RFC 9112 2.2: a few empty lines before the request line are ignored
                self._empties += 1
                if self._empties > _HT_MAX_EMPTY_LINES:
                    raise _ht_bad("too many empty lines before the request line")
                i += 2
            elif self._hstate == 0:
                eol = self._request_line(p, i, n)
                if eol < 0:
                    break
                self._hstate = 1
                i = eol + 2
            else:
                eol = self._header_line(p, i, n)
                if eol < 0:
                    break
                i = eol + 2
            self._scan = i
        if total > limit:
            raise _ht_Error(431, "header_too_large", "request head exceeds max_header_bytes")
        return False

    cdef Py_ssize_t _request_line(self, const unsigned char* p, Py_ssize_t i, Py_ssize_t n) except -2:
        """The index of the CR ending the request line at p[i], -1 until it is in."""
        cdef Py_ssize_t start = i, method_end, target, target_end, version, k
        cdef unsigned char c
        cdef const char* shape = b"HTTP/d.d"       # d: a digit
        while i < n and _ht_TCHAR[p[i]]:
            i += 1
        if i >= n:
            return -1
        if p[i] != 0x20 or i == start:
            raise _ht_bad("method is not a token followed by SP")
        method_end = i
        i += 1
        target = i
        while i < n and _ht_VCHAR[p[i]]:
            i += 1
        if i >= n:
            return -1
        if p[i] != 0x20 or i == target:
            raise _ht_bad("request target is empty or has bytes outside VCHAR")
        target_end = i
        i += 1
        version = i
        while i < n and i - version < 8:
            k = i - version
            c = p[i]
            if k == 5 or k == 7:
                if not 0x30 <= c <= 0x39:
                    raise _ht_bad("malformed HTTP version")
                if (k == 5 and c != 0x31) or (k == 7 and c != 0x30 and c != 0x31):
                    # well-formed, and not 1.0 or 1.1 whatever follows
                    raise _ht_Error(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
            elif c != <unsigned char>shape[k]:
                raise _ht_bad("malformed HTTP version")
            i += 1
        if i >= n:
            return -1
        if p[i] != 0x0D:
            raise _ht_bad("malformed HTTP version")
        if i + 1 >= n:
            return -1
        if p[i + 1] != 0x0A:
            raise _ht_bad("bare CR in the request line")
        if p[version + 5] == 0x31 and p[version + 7] == 0x31:
            self.http_version = "1.1"
        elif p[version + 5] == 0x31 and p[version + 7] == 0x30:
            self.http_version = "1.0"
        else:
            raise _ht_Error(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
        if method_end - start == 4 and memcmp(p + start, b"POST", 4) == 0:
            self.method = "POST"
        elif method_end - start == 3 and memcmp(p + start, b"GET", 3) == 0:
            self.method = "GET"
        else:
            self.method = PyUnicode_DecodeLatin1(<const char*>p + start, method_end - start, NULL)
        self.target = PyUnicode_DecodeLatin1(<const char*>p + target, target_end - target, NULL)
        return i

    cdef Py_ssize_t _header_line(self, const unsigned char* p, Py_ssize_t i, Py_ssize_t n) except -2:
        """The index of the CR ending the header line at p[i], -1 until it is in.

        A framing field's value still arriving is judged as far as it has
        come, left to right, and whole at the CRLF (the twin's _header_line).
        """
        cdef Py_ssize_t start = i, colon = -1, v_start, v_end, j, m
        cdef unsigned char c
        cdef bytes name
        cdef char* q
        i = _ht_field_line(p, i, n, &colon)
        if i < 0:
            if colon > start:
                v_start = colon + 1
                v_end = n - 1 if p[n - 1] == 0x0D else n
                while v_start < v_end and _ht_is_ows(p[v_start]):
                    v_start += 1
                self._framing_field(p, start, colon - start, v_start, v_end, False)
            return -1
        v_start = colon + 1
        v_end = i
        while v_start < v_end and _ht_is_ows(p[v_start]):
            v_start += 1
        while v_end > v_start and _ht_is_ows(p[v_end - 1]):
            v_end -= 1
        m = colon - start
        name = PyBytes_FromStringAndSize(NULL, m)
        q = PyBytes_AS_STRING(name)
        for j in range(m):
            c = p[start + j]
            q[j] = c + 0x20 if 0x41 <= c <= 0x5A else c
        self.headers.append((name, PyBytes_FromStringAndSize(<const char*>p + v_start, v_end - v_start)))
        self._field(p, start, m, v_start, v_end)
        return i

    cdef int _field(self, const unsigned char* p, Py_ssize_t name, Py_ssize_t m, Py_ssize_t v_start,
                    Py_ssize_t v_end) except -1:
        """One complete header field."""
        if self._framing_field(p, name, m, v_start, v_end, True):
            return 0
        if _ht_lower_eq(p + name, m, b"connection", 10):
            self._connection_tokens(p, v_start, v_end)
        elif _ht_lower_eq(p + name, m, b"expect", 6):
            self.expect_continue = _ht_lower_eq(p + v_start, v_end - v_start, b"100-continue", 12)
        elif _ht_lower_eq(p + name, m, b"content-type", 12):
            self.content_type = PyUnicode_DecodeLatin1(<const char*>p + v_start, v_end - v_start, NULL)
        elif _ht_lower_eq(p + name, m, b"content-encoding", 16):
            self.content_encoding = PyUnicode_DecodeLatin1(<const char*>p + v_start, v_end - v_start, NULL)
        return 0

    cdef int _framing_field(self, const unsigned char* p, Py_ssize_t name, Py_ssize_t m, Py_ssize_t v_start,
                            Py_ssize_t v_end, bint complete) except -1:
        """The rules of the fields that frame a request (and of Authorization),
        left to right: p[v_start:v_end] is what has arrived of the value; only
        a complete one is recorded. 1 if the field is one of them, else 0."""
        cdef Py_ssize_t i, digits = 0
        cdef long long length = 0
        cdef bint ows = False
        cdef unsigned char c
        if _ht_lower_eq(p + name, m, b"content-length", 14):
            if self.content_length >= 0:
                raise _ht_bad("more than one Content-Length")
            if self._te:
                raise _ht_bad("both Transfer-Encoding and Content-Length")
            for i in range(v_start, v_end):
                c = p[i]
                if c == 0x20 or c == 0x09:
                    ows = True
                    continue
                if ows or not 0x30 <= c <= 0x39:
                    raise _ht_bad("Content-Length is not a decimal number")
                # stops at max_body_bytes, so it cannot overflow
                length = length * 10 + (c - 0x30)
                digits += 1
                if length > self.max_body_bytes:
                    raise _ht_Error(413, "too_large", "request body exceeds max_body_bytes")
            if complete:
                if digits == 0:
                    raise _ht_bad("Content-Length is not a decimal number")
                self.content_length = length
            return 1
        if _ht_lower_eq(p + name, m, b"transfer-encoding", 17):
            if self.http_version == "1.0":
                raise _ht_bad("Transfer-Encoding in an HTTP/1.0 request")
            if self.content_length >= 0:
                raise _ht_bad("both Transfer-Encoding and Content-Length")
            self._codings(p, v_start, v_end, complete)
            return 1
        if _ht_lower_eq(p + name, m, b"host", 4):
            if self._hosts:
                raise _ht_bad("more than one Host header")
            if complete:
                self._hosts = 1
            return 1
        if _ht_lower_eq(p + name, m, b"authorization", 13):
            # Two credentials in one request: which one a proxy checked is a guess.
            if self._authorizations:
                raise _ht_bad("more than one Authorization header")
            if complete:
                self._authorizations = 1
                self.authorization = PyUnicode_DecodeLatin1(<const char*>p + v_start, v_end - v_start, NULL)
            return 1
        return 0

    cdef int _codings(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end, bint complete) except -1:
        """A Transfer-Encoding list: tokens, empty elements ignored (RFC 9110
        5.6.1); the last one may still be arriving unless ``complete``."""
        cdef Py_ssize_t i = start, a, b, j
        cdef bint chunked = self._te_chunked, other = self._te_other
        while i <= end:
            a = i
            while i < end and p[i] != 0x2C:
                i += 1
            b = i
            i += 1
            while a < b and _ht_is_ows(p[a]):
                a += 1
            while b > a and _ht_is_ows(p[b - 1]):
                b -= 1
            if a == b:
                continue
            if chunked:
                # RFC 9112 6.3: chunked must be the final coding, and applied once
                raise _ht_bad("a transfer coding after chunked")
            for j in range(a, b):
                if not _ht_TCHAR[p[j]]:
                    raise _ht_bad("malformed transfer coding")
            if i > end and not complete:
                break                    # a token still arriving
            if _ht_lower_eq(p + a, b - a, b"chunked", 7):
                chunked = True
            else:
                other = True
        if complete:
            self._te = True
            self._te_chunked = chunked
            self._te_other = other
        return 0

    cdef int _end_of_head(self) except -1:
        cdef bint http11 = self.http_version == "1.1"
        if http11 and self._hosts == 0:
            raise _ht_bad("HTTP/1.1 needs exactly one Host header")
        if self._te:
            if not self._te_chunked:
                # RFC 9112 6.3: without chunked last the body has no known end
                raise _ht_bad("the final transfer coding is not chunked")
            if self._te_other:
                raise _ht_Error(501, "not_implemented", "only Transfer-Encoding: chunked is supported")
        if not http11:
            self.keep_alive = False
            self.expect_continue = False
        self.chunked = self._te
        self.has_length = self._te or self.content_length >= 0
        if self._te:
            self._state = _HT_S_CHUNK_LINE
        else:
            self._state = _HT_S_LENGTH
            self._remaining = self.content_length if self.content_length > 0 else 0
        return 0

    cdef void _connection_tokens(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        cdef Py_ssize_t i = start, a, b
        while i <= end:
            a = i
            while i < end and p[i] != 0x2C:
                i += 1
            b = i
            while a < b and _ht_is_ows(p[a]):
                a += 1
            while b > a and _ht_is_ows(p[b - 1]):
                b -= 1
            if _ht_lower_eq(p + a, b - a, b"close", 5):
                self.keep_alive = False
            i += 1

    # -- chunked body ------------------------------------------------------------

    cdef bint _read_chunks(self) except -1:
        # chunk lines and trailer lines are judged byte by byte as they arrive,
        # like head lines (the twin's docstring has the grammar)
        cdef const unsigned char* p = self._ptr()
        cdef Py_ssize_t total = self._len()
        cdef Py_ssize_t eol, take, limit, n, i, mark
        while True:
            if self._state == _HT_S_CHUNK_LINE:
                limit = self._pos + self.max_header_bytes
                eol = self._chunk_line(p, self._pos, total if total < limit else limit)
                if eol < 0:
                    if total > limit:
                        raise _ht_bad("chunk line too long")
                    return False
                self._pos = eol + 2
            elif self._state == _HT_S_CHUNK_DATA:
                take = total - self._pos
                if take > self._remaining:
                    take = self._remaining
                if take == 0:
                    return False
                self._chunks.extend(PyMemoryView_FromObject(self._buf)[self._pos:self._pos + take])
                self._pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _HT_S_CHUNK_CRLF
                    self._remaining = 2
            elif self._state == _HT_S_CHUNK_CRLF:
                while self._remaining and self._pos < total:
                    if p[self._pos] != (0x0D if self._remaining == 2 else 0x0A):
                        raise _ht_bad("chunk data not followed by CRLF")
                    self._pos += 1
                    self._remaining -= 1
                if self._remaining:
                    return False
                self._state = _HT_S_CHUNK_LINE
            else:  # _HT_S_TRAILERS: field lines, parsed and ignored (RFC 9112 7.1.2)
                limit = self._pos + self._remaining
                n = total if total < limit else limit
                i = self._pos
                if i < n and p[i] == 0x0D:
                    if i + 1 < n:
                        if p[i + 1] != 0x0A:
                            raise _ht_bad("bare CR in the trailer section")
                        self._pos = i + 2
                        return True
                    eol = -1
                elif i < n:
                    eol = _ht_field_line(p, i, n, &mark)
                else:
                    eol = -1
                if eol < 0:
                    if total > limit:
                        raise _ht_Error(431, "header_too_large", "trailer section exceeds max_header_bytes")
                    return False
                self._remaining -= eol + 2 - i
                self._pos = eol + 2

    cdef Py_ssize_t _chunk_line(self, const unsigned char* p, Py_ssize_t i, Py_ssize_t n) except -2:
        """The index of the CR ending the chunk line at p[i], -1 until it is in."""
        cdef Py_ssize_t start = i, ws, mark
        cdef unsigned long long size = 0
        cdef bint huge = False
        cdef unsigned char c
        while i < n and _ht_HEX[p[i]]:
            c = p[i]
            if size > (<unsigned long long>1 << 56):
                huge = True
            else:
                size = size * 16 + (c - 0x30 if c <= 0x39 else (c | 0x20) - 0x57)
            i += 1
            if i - start > _HT_MAX_CHUNK_DIGITS:
                raise _ht_bad("chunk size has too many digits")
        if i >= n:
            return -1
        if i == start:
            raise _ht_bad("chunk size is not a hex number")
        while True:
            ws = i
            while i < n and _ht_is_ows(p[i]):
                i += 1
            if i >= n:
                return -1
            c = p[i]
            if c == 0x0D:
                if i > ws:
                    raise _ht_bad("whitespace at the end of a chunk line")
                break
            if c != 0x3B:
                raise _ht_bad("bad chunk size or extension")
            i += 1
            while i < n and _ht_is_ows(p[i]):
                i += 1
            mark = i
            while i < n and _ht_TCHAR[p[i]]:
                i += 1
            if i >= n:
                return -1
            if i == mark:
                raise _ht_bad("chunk extension without a name")
            ws = i
            while i < n and _ht_is_ows(p[i]):
                i += 1
            if i >= n:
                return -1
            if p[i] != 0x3D:
                i = ws                   # the whitespace belongs to what follows
                continue
            i += 1
            while i < n and _ht_is_ows(p[i]):
                i += 1
            if i >= n:
                return -1
            if p[i] == 0x22:
                i += 1
                while True:
                    if i >= n:
                        return -1
                    c = p[i]
                    if c == 0x22:
                        i += 1
                        break
                    if c == 0x5C:
                        i += 1
                        if i >= n:
                            return -1
                        if not _ht_QPAIR[p[i]]:
                            raise _ht_bad("bad quoted-pair in a chunk extension")
                    elif not _ht_QDTEXT[c]:
                        raise _ht_bad("bad byte in a quoted chunk extension")
                    i += 1
            else:
                mark = i
                while i < n and _ht_TCHAR[p[i]]:
                    i += 1
                if i >= n:
                    return -1
                if i == mark:
                    raise _ht_bad("chunk extension without a value after '='")
        if i + 1 >= n:
            return -1
        if p[i + 1] != 0x0A:
            raise _ht_bad("bare CR in a chunk line")
        if huge or size > <unsigned long long>(self.max_body_bytes - len(self._chunks)):
            raise _ht_Error(413, "too_large", "request body exceeds max_body_bytes")
        if size == 0:
            self._state = _HT_S_TRAILERS
            self._remaining = self.max_header_bytes
        else:
            self._state = _HT_S_CHUNK_DATA
            self._remaining = <Py_ssize_t>size
        return i
