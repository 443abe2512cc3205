"""HTTP/1.1 request parser for the fast engine, pure Python: the twin and
reference of the compiled parser in src/_fastparse_http.pxi.

Sans-IO: bytes go in with ``feed()``, ``next()`` says what is ready. One
parser lives per connection and is reused for every request on it (the
fasthttp ``RequestCtx`` idea): after ``next()`` returns ``REQUEST`` the
attributes describe the current request until the next ``feed()``/``next()``.

The contract both implementations keep (tests/protocols/http/test_http_parser.py checks
them against each other and against the std engine's h11 reader on
arbitrary bytes):

* The head is everything up to the first CRLF CRLF. Longer than
  ``max_header_bytes`` (complete or not) -> 431 ``header_too_large``.
* Lines end with CRLF; a bare CR or LF in the head -> 400.
* Request line: ``token SP 1*VCHAR SP HTTP/1.0|HTTP/1.1``; another
  ``HTTP/d.d`` -> 505 ``version_not_supported``; anything else -> 400.
* Header line: ``token ":" OWS value OWS``; value bytes are HTAB, SP,
  VCHAR or obs-text (no other control byte). A line starting with SP or HTAB
  (obs-fold) -> 400: folding is a request-smuggling vector (RFC 9112 5.2).
* Framing (RFC 9112 6): a second Content-Length, even an identical one,
  -> 400; Content-Length must be 1*DIGIT; Transfer-Encoding other than
  ``chunked``, or twice -> 501; both Transfer-Encoding and Content-Length,
  or Transfer-Encoding in HTTP/1.0 -> 400; Content-Length above
  ``max_body_bytes`` -> 413. No length at all: an empty body
  (``has_length`` is false so the API can answer 411).
* Host: exactly one in HTTP/1.1, at most one in HTTP/1.0, else 400.
* Chunked bodies: a chunk line is 1-20 hex digits, then either a chunk
  extension (``;`` and anything but LF, ignored) or optional SP/HTAB, then
  CRLF; chunk data is followed by CRLF. The decoded size is held to
  ``max_body_bytes`` (413). Trailer fields are refused (400): after the last
  chunk comes CRLF (a bare LF is tolerated there, as h11 does).
* ``keep_alive``: HTTP/1.1 without a ``close`` token in Connection.
  ``expect_continue``: HTTP/1.1 with ``Expect: 100-continue``.

Zero-copy: when a whole request sits in the bytes object handed to
``feed()``, ``body`` is a memoryview slice of it; only a request split over
several reads is copied (into one linear buffer, so a slow sender costs
linear, not quadratic, time).
"""
from __future__ import annotations

from gridgate.errors import HTTPParseError

__all__ = ["HTTPRequestParser", "NEED_DATA", "HEAD", "REQUEST"]

NEED_DATA = 0    # nothing complete yet: read more
HEAD = 1         # the head is parsed, the body is still arriving
REQUEST = 2      # a whole request is ready in the parser's attributes

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VCHAR = frozenset(range(0x21, 0x7F))
_VALUE = frozenset([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")
_OWS = b" \t"

# states of the body reader
_S_HEAD, _S_LENGTH, _S_CHUNK_LINE, _S_CHUNK_DATA, _S_CHUNK_CRLF, _S_LAST_CRLF = range(6)


def _bad(detail: str) -> HTTPParseError:
    return HTTPParseError(400, "bad_request", detail)


class HTTPRequestParser:
    def __init__(self, max_header_bytes: int = 16384, max_body_bytes: int = 1048576) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._scan = 0                   # where the CRLF CRLF search resumes
        self._state = _S_HEAD
        self._remaining = 0              # body bytes (or chunk bytes) still expected
        self._chunks = bytearray()
        self._reset_request()

    def _reset_request(self) -> None:
        self.method = ""
        self.target = ""
        self.http_version = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: bytes | memoryview = b""
        self.keep_alive = True
        self.expect_continue = False
        self.content_type = ""
        self.content_encoding = ""
        self.content_length = -1
        self.chunked = False
        self.has_length = False

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def head_done(self) -> bool:
        return self._state != _S_HEAD

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._pos >= len(self._buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            self._scan = 0
            return
        if type(self._buf) is bytes:     # a request spans reads: go linear
            self._buf = bytearray(memoryview(self._buf)[self._pos:])
            self._scan -= self._pos
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > len(self._buf):
            # a bytearray here (bytes took the branch above): mypy does not
            # narrow what is left after a `type(x) is bytes` test
            del self._buf[:self._pos]  # type: ignore[union-attr]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def next(self) -> int:
        """Advance: NEED_DATA, HEAD (body pending) or REQUEST (all ready)."""
        if self._state == _S_HEAD:
            self._reset_request()
            if not self._parse_head():
                return NEED_DATA
        if self._state == _S_LENGTH:
            end = self._pos + self._remaining
            if len(self._buf) < end:
                return HEAD
            self.body = self._slice(self._pos, end)
            self._pos = end
        else:
            if not self._read_chunks():
                return HEAD
            self.body = bytes(self._chunks)
            self._chunks = bytearray()
        self._state = _S_HEAD
        self._scan = self._pos
        return REQUEST

    def _slice(self, start: int, end: int) -> bytes | memoryview:
        if type(self._buf) is bytes:
            return memoryview(self._buf)[start:end]
        return bytes(self._buf[start:end])

    # -- head ------------------------------------------------------------------

    def _parse_head(self) -> bool:
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n\r\n", max(self._scan, pos))
        if end < 0:
            if len(buf) - pos > self.max_header_bytes:
                raise HTTPParseError(431, "header_too_large", "request head exceeds max_header_bytes")
            self._scan = max(pos, len(buf) - 3)
            return False
        head_end = end + 4
        if head_end - pos > self.max_header_bytes:
            raise HTTPParseError(431, "header_too_large", "request head exceeds max_header_bytes")
        lines = bytes(buf[pos:end]).split(b"\r\n")
        self._request_line(lines[0])
        self._header_lines(lines[1:])
        self._pos = head_end
        return True

    def _request_line(self, line: bytes) -> None:
        if b"\r" in line or b"\n" in line:
            raise _bad("bare CR or LF in the request line")
        parts = line.split(b" ")
        if len(parts) != 3:
            raise _bad("request line is not METHOD SP TARGET SP VERSION")
        method, target, version = parts
        if not method or not _TCHAR.issuperset(method):
            raise _bad("method is not a token")
        if not target or not _VCHAR.issuperset(target):
            raise _bad("request target is empty or has bytes outside VCHAR")
        if version == b"HTTP/1.1":
            self.http_version = "1.1"
        elif version == b"HTTP/1.0":
            self.http_version = "1.0"
        elif (len(version) == 8 and version[:5] == b"HTTP/" and version[5] in _DIGITS and version[6] == 0x2E
              and version[7] in _DIGITS):
            raise HTTPParseError(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
        else:
            raise _bad("malformed HTTP version")
        self.method = method.decode("ascii")
        self.target = target.decode("ascii")

    def _header_lines(self, lines: list[bytes]) -> None:
        http11 = self.http_version == "1.1"
        hosts = 0
        te = False
        headers = self.headers
        for line in lines:
            if not line:
                raise _bad("empty header line")
            if line[0] in (0x20, 0x09):
                raise _bad("obs-fold (a header line starting with whitespace) is refused")
            colon = line.find(b":")
            if colon <= 0:
                raise _bad("header line without a field name and colon")
            name = line[:colon]
            if not _TCHAR.issuperset(name):
                raise _bad("header field name is not a token")
            value = line[colon + 1:].strip(_OWS)
            if not _VALUE.issuperset(value):
                raise _bad("control byte in a header value")
            name = name.lower()
            headers.append((name, value))
            if name == b"content-length":
                if self.content_length >= 0:
                    raise _bad("more than one Content-Length")
                if not value or not _DIGITS.issuperset(value):
                    raise _bad("Content-Length is not a decimal number")
                if len(value) > 18 or int(value) > self.max_body_bytes:
                    raise HTTPParseError(413, "too_large", "request body exceeds max_body_bytes")
                self.content_length = int(value)
            elif name == b"transfer-encoding":
                if te:
                    raise HTTPParseError(501, "not_implemented", "more than one Transfer-Encoding")
                if value.lower() != b"chunked":
                    raise HTTPParseError(501, "not_implemented", "only Transfer-Encoding: chunked is supported")
                te = True
            elif name == b"host":
                hosts += 1
            elif name == b"connection":
                for token in value.split(b","):
                    if token.strip(_OWS).lower() == b"close":
                        self.keep_alive = False
            elif name == b"expect":
                self.expect_continue = value.lower() == b"100-continue"
            elif name == b"content-type":
                self.content_type = value.decode("latin-1")
            elif name == b"content-encoding":
                self.content_encoding = value.decode("latin-1")
        if hosts > 1 or (http11 and hosts == 0):
            raise _bad("HTTP/1.1 needs exactly one Host header")
        if te and self.content_length >= 0:
            raise _bad("both Transfer-Encoding and Content-Length")
        if te and not http11:
            raise _bad("Transfer-Encoding in an HTTP/1.0 request")
        if not http11:
            self.keep_alive = False
            self.expect_continue = False
        self.chunked = te
        self.has_length = te or self.content_length >= 0
        if te:
            self._state = _S_CHUNK_LINE
        else:
            self._state = _S_LENGTH
            self._remaining = max(self.content_length, 0)

    # -- chunked body ------------------------------------------------------------

    def _read_chunks(self) -> bool:
        """Decode what has arrived; True once the last chunk and CRLF are in."""
        buf = self._buf
        while True:
            state = self._state
            if state == _S_CHUNK_LINE:
                eol = buf.find(b"\r\n", self._pos)
                if eol < 0:
                    if len(buf) - self._pos > self.max_header_bytes:
                        raise _bad("chunk size line too long")
                    return False
                self._chunk_line(bytes(buf[self._pos:eol]))
                self._pos = eol + 2
            elif state == _S_CHUNK_DATA:
                take = min(self._remaining, len(buf) - self._pos)
                if take == 0:
                    return False
                self._chunks += buf[self._pos:self._pos + take]
                self._pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _S_CHUNK_CRLF
                    self._remaining = 2
            elif state == _S_CHUNK_CRLF:
                while self._remaining and self._pos < len(buf):
                    if buf[self._pos] != b"\r\n"[2 - self._remaining]:
                        raise _bad("chunk data not followed by CRLF")
                    self._pos += 1
                    self._remaining -= 1
                if self._remaining:
                    return False
                self._state = _S_CHUNK_LINE
            else:  # _S_LAST_CRLF
                if self._pos >= len(buf):
                    return False
                first = buf[self._pos]
                if first == 0x0A:
                    self._pos += 1
                    return True
                if first != 0x0D:
                    raise _bad("trailer fields are not supported")
                if self._pos + 1 >= len(buf):
                    return False
                if buf[self._pos + 1] != 0x0A:
                    raise _bad("trailer fields are not supported")
                self._pos += 2
                return True

    def _chunk_line(self, line: bytes) -> None:
        n = 0
        while n < len(line) and line[n] in _HEX:
            n += 1
        if n == 0 or n > 20:
            raise _bad("bad chunk size")
        rest = line[n:]
        if rest[:1] == b";":
            if b"\n" in rest:
                raise _bad("bad chunk extension")
        elif rest.strip(_OWS):
            raise _bad("bad chunk size")
        size = int(line[:n], 16)
        if size > self.max_body_bytes - len(self._chunks):
            raise HTTPParseError(413, "too_large", "request body exceeds max_body_bytes")
        if size == 0:
            self._state = _S_LAST_CRLF
        else:
            self._state = _S_CHUNK_DATA
            self._remaining = size
