"""HTTP/1.1 request parser for the fast engine, pure Python: the twin and
reference of the compiled parser in src/_fastparse_http.pxi.

Sans-IO: bytes go in with ``feed()``, ``next()`` says what is ready. One
parser lives per connection and is reused for every request on it (the
fasthttp ``RequestCtx`` idea): after ``next()`` returns ``REQUEST`` the
attributes describe the current request until the next ``feed()``/``next()``.

The contract both implementations keep (tests/protocols/http/test_http_parser.py checks
them against each other and against the std engine's h11 reader on
arbitrary bytes):

* Refusal at the first bad byte: the head is judged as it arrives, so a
  head that can no longer be a prefix of a valid one is refused then, not
  when (if ever) its end arrives. Every byte is judged by its class at once;
  a header field's own rules (Content-Length, Transfer-Encoding, Host) when
  its line's CRLF is in; what needs the whole head (a missing Host, the final
  transfer coding) at the empty line that ends it.
* The head is up to and including the first empty line. When it cannot end
  within ``max_header_bytes`` (counted from its first byte, leading empty
  lines included) -> 431 ``header_too_large``; a bad byte inside that window
  is refused (400) first.
* Up to ``MAX_EMPTY_LINES`` empty lines (CRLF) before the request line are
  ignored (RFC 9112 2.2); one more -> 400.
* Lines end with CRLF; a bare CR or LF anywhere in the head -> 400.
* Request line: ``token SP 1*VCHAR SP HTTP/DIGIT.DIGIT CRLF``; a version
  other than 1.0 and 1.1 -> 505 ``version_not_supported`` once the line is
  in; anything else (``http/1.1``, a trailing space...) -> 400.
* Header line: ``token ":" OWS value OWS``; value bytes are HTAB, SP,
  VCHAR or obs-text (no other control byte). A line starting with SP or HTAB
  (obs-fold) -> 400: folding is a request-smuggling vector (RFC 9112 5.2).
* Framing (RFC 9112 6), field by field: a second Content-Length, even an
  identical one, -> 400; Content-Length must be 1*DIGIT; Content-Length
  with Transfer-Encoding, or Transfer-Encoding in HTTP/1.0 -> 400;
  Content-Length above ``max_body_bytes`` -> 413. Transfer-Encoding is a
  list of codings (tokens; empty elements ignored, RFC 9110 5.6.1) over all
  its fields: a coding after ``chunked`` (chunked twice, or not last) -> 400
  when seen; at the end of the head, a last coding other than ``chunked``
  -> 400 (RFC 9112 6.3), another coding before ``chunked`` -> 501. No length
  at all: an empty body (``has_length`` is false so the API can answer 411).
* Host: a second one -> 400 when seen; none in HTTP/1.1 -> 400 at the end
  of the head.
* Chunked bodies (RFC 9112 7.1), judged byte by byte like the head: a chunk
  line is ``1*HEXDIG *( BWS ";" BWS token [ BWS "=" BWS ( token /
  quoted-string ) ] ) CRLF`` (extensions ignored; whitespace only around
  ``;`` and ``=``; at most ``MAX_CHUNK_DIGITS`` digits, leading zeros
  included, so ``000`` ends a body); anything else -> 400, and so does chunk
  data not followed by CRLF. The decoded size is held to ``max_body_bytes``
  (413, at the chunk line that would pass it). After the last chunk, the
  trailer section: field lines by the header grammar, parsed and ignored,
  then CRLF; longer than ``max_header_bytes`` -> 431.
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
_QDTEXT = frozenset([0x09, 0x20, 0x21, *range(0x23, 0x5C), *range(0x5D, 0x7F), *range(0x80, 0x100)])
_QPAIR = frozenset([0x09, 0x20, *range(0x21, 0x7F), *range(0x80, 0x100)])   # what may follow a backslash
_OWS = b" \t"
_FRAMING_NAMES = frozenset((b"content-length", b"transfer-encoding", b"host", b"authorization"))
_VERSION = b"HTTP/d.d"           # d: a digit
MAX_CHUNK_DIGITS = 20           # leading zeros count: a bound, not a size limit
MAX_EMPTY_LINES = 4              # empty lines ignored before a request line (RFC 9112 2.2)

# states of the body reader
_S_HEAD, _S_LENGTH, _S_CHUNK_LINE, _S_CHUNK_DATA, _S_CHUNK_CRLF, _S_TRAILERS = range(6)


def _bad(detail: str) -> HTTPParseError:
    return HTTPParseError(400, "bad_request", detail)


class HTTPRequestParser:
    def __init__(self, max_header_bytes: int = 16384, max_body_bytes: int = 1048576) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._scan = 0                   # the first head line not yet taken
        self._state = _S_HEAD
        self._remaining = 0              # body bytes (or chunk bytes) still expected
        self._chunks = bytearray()
        self._fresh = True               # the next head is a new request's
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
        self.authorization = ""
        self._authorizations = 0
        self.content_length = -1
        self.chunked = False
        self.has_length = False
        self._hstate = 0                 # 0: before the request line, 1: header lines
        self._empties = 0
        self._hosts = 0
        self._te = False                 # a Transfer-Encoding field was seen
        self._te_chunked = False         # ... and its last coding so far is chunked
        self._te_other = False           # ... with a coding other than chunked before it

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
            if self._fresh:
                self._reset_request()
                self._fresh = False
                if self._pos and self._pos >= len(self._buf):
                    # all of it taken: an idle connection keeps no read buffer
                    self._buf = b""
                    self._pos = self._scan = 0
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
        self._fresh = True
        return REQUEST

    def _slice(self, start: int, end: int) -> bytes | memoryview:
        if type(self._buf) is bytes:
            return memoryview(self._buf)[start:end]
        return bytes(self._buf[start:end])

    # -- head ------------------------------------------------------------------

    def _parse_head(self) -> bool:
        """Take every head line that is complete; True once the empty line is in.

        Lines are taken as they arrive and a line's bytes are judged as they
        arrive, so a head is refused at its first bad byte, not at its end;
        the rules of the fields that frame the request (Content-Length,
        Transfer-Encoding, Host) too, as far as a value has arrived. Only the
        line still arriving is looked at again on the next call.
        """
        buf = self._buf
        limit = self._pos + self.max_header_bytes
        n = min(len(buf), limit)
        i = self._scan
        while i < n:
            if buf[i] == 0x0D:
                if i + 1 >= n:
                    break
                if buf[i + 1] != 0x0A:
                    raise _bad("bare CR in the request head")
                if self._hstate == 1:
                    self._end_of_head()
                    self._pos = i + 2
                    return True
                # RFC 9112 2.2: a few empty lines before the request line are
                # ignored (old clients send one after a POST body)
                self._empties += 1
                if self._empties > MAX_EMPTY_LINES:
                    raise _bad("too many empty lines before the request line")
                i += 2
            elif self._hstate == 0:
                eol = self._request_line(buf, i, n)
                if eol < 0:
                    break
                self._hstate = 1
                i = eol + 2
            else:
                eol = self._header_line(buf, i, n)
                if eol < 0:
                    break
                i = eol + 2
            self._scan = i
        if len(buf) > limit:
            raise HTTPParseError(431, "header_too_large", "request head exceeds max_header_bytes")
        return False

    def _request_line(self, buf: bytes | bytearray, i: int, n: int) -> int:
        """The index of the CR ending the request line at buf[i], -1 until it is in."""
        start = i
        while i < n and buf[i] in _TCHAR:
            i += 1
        if i >= n:
            return -1
        if buf[i] != 0x20 or i == start:
            raise _bad("method is not a token followed by SP")
        method_end = i
        i += 1
        target = i
        while i < n and buf[i] in _VCHAR:
            i += 1
        if i >= n:
            return -1
        if buf[i] != 0x20 or i == target:
            raise _bad("request target is empty or has bytes outside VCHAR")
        target_end = i
        i += 1
        version = i
        while i < n and i - version < 8:
            k = i - version
            c = buf[i]
            if not (c in _DIGITS if k == 5 or k == 7 else c == _VERSION[k]):
                raise _bad("malformed HTTP version")
            if (k == 5 and c != 0x31) or (k == 7 and c != 0x30 and c != 0x31):
                # well-formed, and not 1.0 or 1.1 whatever follows
                raise HTTPParseError(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
            i += 1
        if i >= n:
            return -1
        if buf[i] != 0x0D:
            raise _bad("malformed HTTP version")
        if i + 1 >= n:
            return -1
        if buf[i + 1] != 0x0A:
            raise _bad("bare CR in the request line")
        if buf[version + 5] == 0x31 and buf[version + 7] == 0x31:
            self.http_version = "1.1"
        elif buf[version + 5] == 0x31 and buf[version + 7] == 0x30:
            self.http_version = "1.0"
        else:
            raise HTTPParseError(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
        self.method = bytes(buf[start:method_end]).decode("ascii")
        self.target = bytes(buf[target:target_end]).decode("ascii")
        return i

    def _header_line(self, buf: bytes | bytearray, i: int, n: int) -> int:
        """The index of the CR ending the header line at buf[i], -1 until it is in.

        A framing field's value still arriving is judged as far as it has
        come (``Content-Length: 1,`` is refused at the comma), so the rules
        of _framing_field are applied left to right, and whole at the CRLF.
        """
        colon, eol = self._field_line(buf, i, n)
        if eol >= 0:
            self._field(bytes(buf[i:colon]).lower(), bytes(buf[colon + 1:eol]).strip(_OWS))
        elif colon:
            name = bytes(buf[i:colon]).lower()
            if name in _FRAMING_NAMES:
                end = n - 1 if buf[n - 1] == 0x0D else n
                self._framing_field(name, bytes(buf[colon + 1:end]).lstrip(_OWS), False)
        return eol

    def _field_line(self, buf: bytes | bytearray, i: int, n: int) -> tuple[int, int]:
        """(colon, CR ending the line) of the field line at buf[i]; the CR is -1 until it is in."""
        start = i
        if buf[i] == 0x20 or buf[i] == 0x09:
            raise _bad("obs-fold (a field line starting with whitespace) is refused")
        while i < n and buf[i] in _TCHAR:
            i += 1
        if i >= n:
            return 0, -1
        if buf[i] != 0x3A or i == start:
            raise _bad("field name is not a token followed by a colon")
        colon = i
        i += 1
        while i < n and buf[i] in _VALUE:
            i += 1
        if i >= n:
            return colon, -1
        if buf[i] != 0x0D:
            raise _bad("bare LF or a control byte in a field value")
        if i + 1 >= n:
            return colon, -1
        if buf[i + 1] != 0x0A:
            raise _bad("bare CR in a field value")
        return colon, i

    def _field(self, name: bytes, value: bytes) -> None:
        """One complete header field."""
        self.headers.append((name, value))
        if name in _FRAMING_NAMES:
            self._framing_field(name, value, True)
        if name == b"connection":
            for token in value.split(b","):
                if token.strip(_OWS).lower() == b"close":
                    self.keep_alive = False
        elif name == b"expect":
            self.expect_continue = value.lower() == b"100-continue"
        elif name == b"content-type":
            self.content_type = value.decode("latin-1")
        elif name == b"content-encoding":
            self.content_encoding = value.decode("latin-1")

    def _framing_field(self, name: bytes, value: bytes, complete: bool) -> None:
        """The rules of the fields that frame a request (and of Authorization),
        judged left to right so that a value still arriving is refused at its
        first bad byte: ``value`` is what has arrived of it, leading OWS
        stripped; ``complete``: its CRLF is in, and only then is what it says
        recorded."""
        if name == b"content-length":
            if self.content_length >= 0:
                raise _bad("more than one Content-Length")
            if self._te:
                raise _bad("both Transfer-Encoding and Content-Length")
            length = digits = 0
            ows = False
            for c in value:
                if c == 0x20 or c == 0x09:
                    ows = True
                    continue
                if ows or not 0x30 <= c <= 0x39:
                    raise _bad("Content-Length is not a decimal number")
                # leading zeros are digits of a valid length; a value past
                # the limit is refused before the rest of it arrives
                length = length * 10 + c - 0x30
                digits += 1
                if length > self.max_body_bytes:
                    raise HTTPParseError(413, "too_large", "request body exceeds max_body_bytes")
            if complete:
                if not digits:
                    raise _bad("Content-Length is not a decimal number")
                self.content_length = length
        elif name == b"transfer-encoding":
            if self.http_version == "1.0":
                raise _bad("Transfer-Encoding in an HTTP/1.0 request")
            if self.content_length >= 0:
                raise _bad("both Transfer-Encoding and Content-Length")
            chunked, other = self._te_chunked, self._te_other
            codings = value.split(b",")
            last = len(codings) - 1
            for k, coding in enumerate(codings):
                coding = coding.strip(_OWS)
                if not coding:           # RFC 9110 5.6.1: empty list elements are ignored
                    continue
                if chunked:
                    # RFC 9112 6.3: chunked must be the final coding, and applied once
                    raise _bad("a transfer coding after chunked")
                if not _TCHAR.issuperset(coding):
                    raise _bad("malformed transfer coding")
                if k == last and not complete:
                    continue             # a token still arriving
                if coding.lower() == b"chunked":
                    chunked = True
                else:
                    other = True
            if complete:
                self._te, self._te_chunked, self._te_other = True, chunked, other
        elif name == b"host":
            if self._hosts:
                raise _bad("more than one Host header")
            if complete:
                self._hosts = 1
        elif name == b"authorization":
            # Two credentials in one request: which one a proxy checked is a guess.
            if self._authorizations:
                raise _bad("more than one Authorization header")
            if complete:
                self._authorizations = 1
                self.authorization = value.decode("latin-1")

    def _end_of_head(self) -> None:
        http11 = self.http_version == "1.1"
        if http11 and self._hosts == 0:
            raise _bad("HTTP/1.1 needs exactly one Host header")
        if self._te:
            if not self._te_chunked:
                # RFC 9112 6.3: without chunked last the body has no known end
                raise _bad("the final transfer coding is not chunked")
            if self._te_other:
                raise HTTPParseError(501, "not_implemented", "only Transfer-Encoding: chunked is supported")
        if not http11:
            self.keep_alive = False
            self.expect_continue = False
        self.chunked = self._te
        self.has_length = self._te or self.content_length >= 0
        if self._te:
            self._state = _S_CHUNK_LINE
        else:
            self._state = _S_LENGTH
            self._remaining = max(self.content_length, 0)

    # -- chunked body ------------------------------------------------------------

    def _read_chunks(self) -> bool:
        """Decode what has arrived; True once the last chunk and the trailer
        section are in. Chunk lines and trailer lines are judged byte by byte
        as they arrive, like head lines."""
        buf = self._buf
        while True:
            state = self._state
            if state == _S_CHUNK_LINE:
                limit = self._pos + self.max_header_bytes
                eol = self._chunk_line(buf, self._pos, min(len(buf), limit))
                if eol < 0:
                    if len(buf) > limit:
                        raise _bad("chunk line too long")
                    return False
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
            else:  # _S_TRAILERS: field lines, parsed and ignored (RFC 9112 7.1.2)
                limit = self._pos + self._remaining     # the section's allowance left
                n = min(len(buf), limit)
                i = self._pos
                if i < n and buf[i] == 0x0D:
                    if i + 1 < n:
                        if buf[i + 1] != 0x0A:
                            raise _bad("bare CR in the trailer section")
                        self._pos = i + 2
                        return True
                    eol = -1
                elif i < n:
                    eol = self._field_line(buf, i, n)[1]
                else:
                    eol = -1
                if eol < 0:
                    if len(buf) > limit:
                        raise HTTPParseError(431, "header_too_large", "trailer section exceeds max_header_bytes")
                    return False
                self._remaining -= eol + 2 - i
                self._pos = eol + 2

    def _chunk_line(self, buf: bytes | bytearray, i: int, n: int) -> int:
        """The index of the CR ending the chunk line at buf[i], -1 until it is in.

        chunk-size [ chunk-ext ] CRLF (RFC 9112 7.1, 7.1.1): 1*HEXDIG, then
        *( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] ).
        """
        start = i
        while i < n and buf[i] in _HEX:
            i += 1
            if i - start > MAX_CHUNK_DIGITS:
                raise _bad("chunk size has too many digits")
        if i >= n:
            return -1
        if i == start:
            raise _bad("chunk size is not a hex number")
        digits = bytes(buf[start:i])
        while True:
            ws = i
            while i < n and (buf[i] == 0x20 or buf[i] == 0x09):
                i += 1
            if i >= n:
                return -1
            c = buf[i]
            if c == 0x0D:
                if i > ws:
                    raise _bad("whitespace at the end of a chunk line")
                break
            if c != 0x3B:
                raise _bad("bad chunk size or extension")
            i += 1
            while i < n and (buf[i] == 0x20 or buf[i] == 0x09):
                i += 1
            name = i
            while i < n and buf[i] in _TCHAR:
                i += 1
            if i >= n:
                return -1
            if i == name:
                raise _bad("chunk extension without a name")
            ws = i
            while i < n and (buf[i] == 0x20 or buf[i] == 0x09):
                i += 1
            if i >= n:
                return -1
            if buf[i] != 0x3D:
                i = ws                   # the whitespace belongs to what follows
                continue
            i += 1
            while i < n and (buf[i] == 0x20 or buf[i] == 0x09):
                i += 1
            if i >= n:
                return -1
            if buf[i] == 0x22:
                i += 1
                while True:
                    if i >= n:
                        return -1
                    c = buf[i]
                    if c == 0x22:
                        i += 1
                        break
                    if c == 0x5C:
                        i += 1
                        if i >= n:
                            return -1
                        if buf[i] not in _QPAIR:
                            raise _bad("bad quoted-pair in a chunk extension")
                    elif c not in _QDTEXT:
                        raise _bad("bad byte in a quoted chunk extension")
                    i += 1
            else:
                value = i
                while i < n and buf[i] in _TCHAR:
                    i += 1
                if i >= n:
                    return -1
                if i == value:
                    raise _bad("chunk extension without a value after '='")
        if i + 1 >= n:
            return -1
        if buf[i + 1] != 0x0A:
            raise _bad("bare CR in a chunk line")
        size = int(digits, 16)
        if size > self.max_body_bytes - len(self._chunks):
            raise HTTPParseError(413, "too_large", "request body exceeds max_body_bytes")
        if size == 0:
            self._state = _S_TRAILERS
            self._remaining = self.max_header_bytes
        else:
            self._state = _S_CHUNK_DATA
            self._remaining = size
        return i
