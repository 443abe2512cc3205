"""The HTTP/1.1 request parsers, sans-IO: the fast engine's parser (compiled
and its pure-Python twin) and the std engine's reader (h11 plus the raw-head
refusals). Examples with exact outcomes, then hypothesis on arbitrary and
mutated bytes: all three accept the same requests (method, target, version,
headers, body) or all refuse, and a refusal comes at the same byte in all three when they are fed
one byte at a time (the first byte that cannot be part of a valid head or
chunked body).

HYPOTHESIS_MAX_EXAMPLES raises the example count for a longer run.
"""
from __future__ import annotations

import os
import sys

import h11
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gridgate import _fastparse
from gridgate.errors import HTTPParseError
from gridgate.protocols.http import parser_py as _http_py
from gridgate.protocols.http.std import StdRequestReader
from inprocess import split

SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "400")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
MAX_HEAD = 256
MAX_BODY = 64
FAST_IMPLS = {"py": _http_py, "c": _fastparse}


@pytest.fixture(params=list(FAST_IMPLS), ids=[f"{k}-http" for k in FAST_IMPLS])
def http_impl(request):
    return FAST_IMPLS[request.param]


def framed(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers with Transfer-Encoding as one ``chunked`` field at the end: h11
    hands the std engine one field, lower-cased, where the fast parser keeps
    the fields as sent (``chunked,`` or two fields are one valid list)."""
    te = [(n, v) for n, v in headers if n == b"transfer-encoding"]
    return [(n, v) for n, v in headers if n != b"transfer-encoding"] + [(b"transfer-encoding", b"chunked")] * bool(te)


def run_fast(impl, chunks: list[bytes], max_head: int = MAX_HEAD, max_body: int = MAX_BODY):
    """(requests, end) with end "clean", "closed", "incomplete" or (status, error)."""
    parser = impl.HTTPRequestParser(max_head, max_body)
    requests = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            while (state := parser.next()) == impl.REQUEST:
                requests.append((parser.method, parser.target, parser.http_version, framed(parser.headers),
                                 bytes(parser.body)))
                if not parser.keep_alive:
                    return requests, "closed"
    except HTTPParseError as exc:
        return requests, (exc.status, exc.error)
    return requests, "clean" if state == impl.NEED_DATA and parser.buffered == 0 else "incomplete"


def run_std(data: bytes | list[bytes], max_head: int = MAX_HEAD, max_body: int = MAX_BODY):
    """Like run_fast, for the std engine's reader: ``data`` whole, or its pieces in turn."""
    chunks = [data] if isinstance(data, bytes) else data
    reader = StdRequestReader(max_head, max_body)
    requests = []
    current = None
    body = bytearray()
    try:
        for chunk in chunks:
            if chunk:            # h11 takes b"" as the end of the stream
                reader.receive_data(chunk)
            while (event := reader.next_event()) is not h11.NEED_DATA:
                if type(event) is h11.Request:
                    current = (event.method.decode(), event.target.decode(), event.http_version.decode(),
                               framed(list(event.headers)))
                    body = bytearray()
                elif type(event) is h11.Data:
                    body += event.data
                elif type(event) is h11.EndOfMessage:
                    requests.append((*current, bytes(body)))
                    reader.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
                    reader.send(h11.EndOfMessage())
                    if reader.conn.our_state is h11.MUST_CLOSE:
                        return requests, "closed"
                    reader.start_next_cycle()
                else:
                    raise AssertionError(f"unexpected event {event!r}")
    except HTTPParseError as exc:
        return requests, (exc.status, exc.error)
    return requests, "incomplete" if reader.raw_buffered else "clean"


def refused_at(impl, data: bytes, max_head: int = MAX_HEAD, max_body: int = MAX_BODY):
    """Fed one byte at a time: (index of the byte refused, status, error, in a
    head), or None. ``impl`` is a fast parser module, or None for the std reader."""
    parser = impl.HTTPRequestParser(max_head, max_body) if impl else StdRequestReader(max_head, max_body)
    for i in range(len(data)):
        try:
            if impl:
                parser.feed(data[i:i + 1])
                while parser.next() == impl.REQUEST:
                    if not parser.keep_alive:
                        return None
            else:
                parser.receive_data(data[i:i + 1])
                while (event := parser.next_event()) is not h11.NEED_DATA:
                    if type(event) is h11.EndOfMessage:
                        parser.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
                        parser.send(h11.EndOfMessage())
                        if parser.conn.our_state is h11.MUST_CLOSE:
                            return None
                        parser.start_next_cycle()
        except HTTPParseError as exc:
            return i, exc.status, exc.error, not parser.head_done
    return None


def agree(data: bytes, cuts: list[int] = ()) -> tuple:
    """Every parser, whole, cut and byte by byte, gives the same outcome; returns it."""
    std = run_std(data)
    py = run_fast(_http_py, [data])
    c = run_fast(_fastparse, [data])
    assert py == c
    at = refused_at(_http_py, data)
    assert refused_at(_fastparse, data) == at
    std_at = refused_at(None, data)
    assert std_at == at                      # refused at the same byte, with the same answer
    if cuts:
        chunks = split(data, list(cuts))
        assert run_fast(_http_py, chunks) == run_fast(_fastparse, chunks) == py
        assert run_std(chunks) == std
    # std and fast accept the same requests; both refuse (the status may
    # differ: h11 waits for a body the fast parser already judged too large)
    assert std[0] == py[0]
    assert (std[1] in ("clean", "closed")) == (py[1] in ("clean", "closed")), (std, py)
    if std[1] in ("clean", "closed"):
        assert std[1] == py[1]
    return py


POST = b"POST /v1/telemetry HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"


def post(body: bytes, extra: bytes = b"") -> bytes:
    return POST + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


# -- examples -------------------------------------------------------------------------


def test_pipelined_requests_in_one_read_are_zero_copy_views(http_impl):
    """The fast engine alone: its parser hands out views of the receive
    buffer (h11, under the std engine, hands out bytes)."""
    data = post(b'{"a":1}') + post(b"[]")
    parser = http_impl.HTTPRequestParser()
    parser.feed(data)
    assert parser.next() == http_impl.REQUEST
    assert isinstance(parser.body, memoryview) and parser.body.obj is data
    assert (parser.method, parser.target, bytes(parser.body)) == ("POST", "/v1/telemetry", b'{"a":1}')
    assert (parser.content_type, parser.content_length, parser.keep_alive) == ("application/json", 7, True)
    assert parser.next() == http_impl.REQUEST and bytes(parser.body) == b"[]"
    assert parser.next() == http_impl.NEED_DATA and parser.buffered == 0


def test_an_idle_parser_keeps_no_read(http_impl):
    """Once every request of a read is taken, the parser lets the read go:
    an idle keep-alive connection holds no buffer (issue 24, RSS per
    connection). A read that ends mid-request is kept, and the request is
    whole once the rest arrives."""
    data = post(b'{"a":1}') + post(b"[]")
    parser = http_impl.HTTPRequestParser()
    parser.feed(data)
    held = sys.getrefcount(data)
    assert parser.next() == http_impl.REQUEST and parser.next() == http_impl.REQUEST
    assert parser.next() == http_impl.NEED_DATA and parser.buffered == 0
    assert sys.getrefcount(data) < held
    whole = post(b'{"b":2}')
    parser.feed(whole[:30])
    assert parser.next() == http_impl.NEED_DATA and parser.buffered == 30
    parser.feed(whole[30:])
    assert parser.next() == http_impl.REQUEST and bytes(parser.body) == b'{"b":2}'
    assert parser.next() == http_impl.NEED_DATA and parser.buffered == 0


def test_a_request_split_byte_by_byte(http_impl):
    data = post(b'{"device_id":"m"}', b"Content-Encoding: gzip\r\nExpect: 100-continue\r\n")
    parser = http_impl.HTTPRequestParser()
    states = []
    for i in range(len(data)):
        parser.feed(data[i:i + 1])
        states.append(parser.next())
    assert states[-1] == http_impl.REQUEST and set(states[:-1]) == {http_impl.NEED_DATA, http_impl.HEAD}
    assert parser.expect_continue and parser.content_encoding == "gzip"
    assert bytes(parser.body) == b'{"device_id":"m"}'
    # the std engine's reader, fed the same bytes one at a time, reads the same request
    (request,), end = run_std([data[i:i + 1] for i in range(len(data))])
    assert (request[4], end) == (b'{"device_id":"m"}', "clean")
    assert (b"content-encoding", b"gzip") in request[3] and (b"expect", b"100-continue") in request[3]


def test_chunked_body_is_decoded(http_impl):
    data = (POST + b"Transfer-Encoding: Chunked\r\n\r\n4;name=v\r\n[1,2\r\n2 ; q = \"a\\\"b\"\r\n,3\r\n1\r\n]\r\n"
            b"0\r\n\r\n")
    assert agree(data) == ([("POST", "/v1/telemetry", "1.1", [(b"host", b"gw"),
                                                               (b"content-type", b"application/json"),
                                                               (b"transfer-encoding", b"chunked")],
                             b"[1,2,3]")], "clean")
    parser = http_impl.HTTPRequestParser()
    parser.feed(data)
    assert parser.next() == http_impl.REQUEST and parser.chunked and parser.has_length


def test_http10_and_connection_close_end_the_connection(http_impl):
    for data in (b"GET /healthz HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\nGARBAGE"):
        requests, end = agree(data)
        assert len(requests) == 1 and end == "closed"


def test_post_without_length_has_an_empty_body(http_impl):
    parser = http_impl.HTTPRequestParser()
    parser.feed(POST + b"\r\n")
    assert parser.next() == http_impl.REQUEST
    assert (parser.has_length, bytes(parser.body)) == (False, b"")
    # the std engine's reader too (both answer it 411: test_http.py)
    assert run_std(POST + b"\r\n") == ([("POST", "/v1/telemetry", "1.1", [(b"host", b"gw"),
                                                                       (b"content-type", b"application/json")],
                                          b"")], "clean")


@pytest.mark.parametrize("data, status, error", [
    (post(b"{}", b"Content-Length: 2\r\n"), 400, "bad_request"),                 # identical duplicate
    (POST + b"Content-Length: 2, 2\r\n\r\n{}", 400, "bad_request"),               # comma list
    (POST + b"Content-Length: +2\r\n\r\n{}", 400, "bad_request"),
    (POST + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    (POST + b"Transfer-Encoding: gzip\r\n\r\n", 400, "bad_request"),              # chunked not last
    (POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501, "not_implemented"),
    (POST + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", 501, "not_implemented"),
    (POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "bad_request"),
    (POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400, "bad_request"),
    (POST + b"Transfer-Encoding: chunked;x=1\r\n\r\n", 400, "bad_request"),
    (POST + b"Transfer-Encoding: \r\n\r\n", 400, "bad_request"),
    (b"\r\n" * 5 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),   # one empty line too many
    (POST + b"X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n", 400, "bad_request"),  # obs-fold
    (POST + b"X-Bad : a\r\n\r\n", 400, "bad_request"),                           # space before colon
    (POST + b"X-Ctl: a\x01b\r\n\r\n", 400, "bad_request"),
    (b"POST /v1/telemetry HTTP/1.1\nHost: x\r\n\r\n", 400, "bad_request"),       # bare LF
    (b"POST /v1/telemetry HTTP/2.0\r\nHost: x\r\n\r\n", 505, "version_not_supported"),
    (b"POST /v1/telemetry\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),                              # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    (POST + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n", 400, "bad_request"),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n", 400, "bad_request"),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n X-Trailer: 1\r\n\r\n", 400, "bad_request"),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: " + b"a" * MAX_HEAD + b"\r\n\r\n",
     431, "header_too_large"),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 21 + b"1\r\n", 400, "bad_request"),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n41\r\n", 413, "too_large"),
    (POST + b"Content-Length: 65\r\n\r\n", 413, "too_large"),
    (POST + b"X-Long: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431, "header_too_large"),
    (POST + b"X-Long: " + b"a" * MAX_HEAD, 431, "header_too_large"),             # never finished
])
def test_refusals(http_impl, data, status, error):
    requests, end = run_fast(http_impl, [data])
    assert (requests, end) == ([], (status, error))
    assert run_std(data)[0] == []
    assert run_std(data)[1] not in ("clean", "closed")


def test_refusals_match_std_where_it_knows_the_status():
    for data, status in [(post(b"{}", b"Content-Length: 2\r\n"), 400),
                         (POST + b"X-Folded: a\r\n b\r\n\r\n", 400),
                         (POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
                         (POST + b"Transfer-Encoding: gzip\r\n\r\n", 400),
                         (b"POST / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
                         (POST + b"Content-Length: 65\r\n\r\n", 413),
                         (POST + b"X-Long: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431)]:
        assert run_std(data)[1][0] == status == run_fast(_fastparse, [data])[1][0]


# Heads that are already invalid at their last byte, and not one byte earlier.
EARLY = [
    (b"\n", 400),                                                           # bare LF
    (b"\r\n" * 5, 400),                                                     # too many empty lines
    (b"\r\nG\x00", 400),
    (b"GET  ", 400),                                                         # empty target
    (b"GET / h", 400),
    (b"GET / HTTP/1.x", 400),
    (b"GET / HTTP/1.1 ", 400),
    (b"GET / HTTP/1.1\n", 400),
    (b"GET / HTTP/1.1\rX", 400),
    (b"GET / HTTP/2", 505),
    (b"GET / HTTP/1.2", 505),
    (b"GET / HTTP/0", 505),
    (b"GET / HTTP/1.1\r\n ", 400),                                           # whitespace before the first field
    (b"GET / HTTP/1.1\r\nHost: x\r\n\t", 400),                               # obs-fold
    (b"GET / HTTP/1.1\r\nX ", 400),
    (b"GET / HTTP/1.1\r\n:", 400),
    (b"GET / HTTP/1.1\r\nX-A: a\x01", 400),
    (b"GET / HTTP/1.1\r\nX-A: a\x7f", 400),
    (b"GET / HTTP/1.1\r\nHost: x\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\r", 400),
    # a framing field is judged as far as it has arrived: at its name, then
    # its value byte by byte (the rest of the line need not come)
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost:", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: x\r\nauthorization:", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length:", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1,", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1 2", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 0x", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: \r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 0000000000000000000000" + b"%d" % (MAX_BODY + 1), 413),
    (b"POST / HTTP/1.1\r\nContent-Length: " + b"%d" % (MAX_BODY + 1), 413),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length:", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding:", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, g", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked,,\t, c", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gz i", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip;", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: c", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding:", 400),
]


@pytest.mark.parametrize("data, status", EARLY, ids=[repr(d)[2:40] for d, _ in EARLY])
def test_a_bad_head_is_refused_at_its_first_bad_byte(data, status):
    """Each parser, fed one byte at a time: nothing before the last byte is
    refused, the last one is, with the same status in all three."""
    error = "bad_request" if status == 400 else {413: "too_large", 505: "version_not_supported"}[status]
    for impl in (_http_py, _fastparse, None):
        assert refused_at(impl, data) == (len(data) - 1, status, error, True)
    before = "incomplete" if len(data) > 1 else "clean"
    assert run_fast(_http_py, [data[:-1]]) == run_fast(_fastparse, [data[:-1]]) == ([], before)
    assert run_std(data[:-1]) == ([], before)


@pytest.mark.parametrize("method", [b"PUT", b"HEAD", b"get", b"M!#$%&'*+-.^_`|~9"])
def test_any_token_is_a_method(method):
    """RFC 9110 9.1: the API answers 405 or 501 to methods it does not serve."""
    requests, end = agree(method + b" /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert end == "clean" and requests[0][0] == method.decode()


@pytest.mark.parametrize("empties", [1, 2, 4])
def test_empty_lines_before_a_request_line_are_ignored(empties):
    """RFC 9112 2.2, e.g. the CRLF old clients send after a POST body."""
    data = post(b"{}") + b"\r\n" * empties + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    requests, end = agree(data, [len(post(b"{}")) + 1])
    assert end == "clean" and [r[:2] for r in requests] == [("POST", "/v1/telemetry"), ("GET", "/healthz")]


@pytest.mark.parametrize("te", [b"chunked,", b", chunked", b"CHUNKED", b"chunked\r\nTransfer-Encoding: "])
def test_a_transfer_encoding_list_with_empty_elements_is_chunked(te):
    """RFC 9110 5.6.1: empty list elements are ignored, a list may span fields."""
    data = POST + b"Transfer-Encoding: " + te + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    requests, end = agree(data)
    assert end == "clean" and requests[0][4] == b"{}"


CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
GOOD_CHUNKS = [
    b"2\r\n{}\r\n0\r\n\r\n",
    b"002\r\n{}\r\n000\r\n\r\n",                            # leading zeros; 000 ends the body
    b"2;a\r\n{}\r\n0;b=c\r\n\r\n",
    b"2 ;a = b ;c\r\n{}\r\n0\r\n\r\n",                        # BWS around ; and = (RFC 9112 7.1.1)
    b'2;a="q \\" ;\t\xe4"\r\n{}\r\n0\r\n\r\n',                 # quoted-string with quoted-pairs
    b"2\r\n{}\r\n0\r\nX-Trailer: 1\r\nX-Other:\r\n\r\n",         # trailers: parsed and ignored
]
BAD_CHUNKS = [
    b"2 \r\n{}\r\n0\r\n\r\n",                                # whitespace with no extension
    b" 2\r\n{}\r\n0\r\n\r\n",
    b"0x2\r\n{}\r\n0\r\n\r\n",
    b"2;\r\n{}\r\n0\r\n\r\n",                                 # extension without a name
    b"2;a=\r\n{}\r\n0\r\n\r\n",
    b"2;a b\r\n{}\r\n0\r\n\r\n",
    b"2;a=\"b\r\n{}\r\n0\r\n\r\n",                             # unterminated quoted-string
    b"2;a=b\"c\"\r\n{}\r\n0\r\n\r\n",
    b"2;a\rb\r\n{}\r\n0\r\n\r\n",                              # bare CR in an extension
    b"2\n{}\r\n0\r\n\r\n",                                     # bare LF after a size
    b"2\r\n{}\n0\r\n\r\n",
    b"2\r\n{}\r\n0\n\r\n",
    b"2\r\n{}\r\n0\r\n\n",                                     # bare LF ending the body
    b"2\r\n{}\r\n0\r\nX: y\n\r\n",
    b"2\r\n{}\r\n0\r\n X: y\r\n\r\n",                          # obs-fold in the trailers
    b"2\r\n{}\r\n0\r\nX y\r\n\r\n",
]


@pytest.mark.parametrize("chunks", GOOD_CHUNKS)
def test_chunk_grammar_accepted(chunks):
    requests, end = agree(CHUNKED + chunks + post(b"[]"), [len(CHUNKED) + 3])
    assert end == "clean" and [r[4] for r in requests] == [b"{}", b"[]"]


@pytest.mark.parametrize("chunks", BAD_CHUNKS)
def test_chunk_grammar_refused(chunks):
    data = CHUNKED + chunks + post(b"[]")
    assert agree(data, [len(CHUNKED) + 3]) == ([], (400, "bad_request"))
    assert run_std(data) == ([], (400, "bad_request"))
    # refused at the bad byte, before the body could end
    assert refused_at(_http_py, data) == refused_at(_fastparse, data)
    assert refused_at(_http_py, data)[0] < len(CHUNKED) + len(chunks)


def test_slow_sender_costs_linear_time(http_impl):
    """The fast engine alone: its parser appends to one buffer, never rebuilds
    it (h11, under the std engine, keeps its own buffer)."""
    # a 64 KiB body one byte per read: the buffer is appended to, never rebuilt
    body = b"x" * 65536
    parser = http_impl.HTTPRequestParser(16384, 1 << 20)
    parser.feed(POST + b"Content-Length: 65536\r\n\r\n")
    assert parser.next() == http_impl.HEAD
    for i in range(len(body)):
        parser.feed(body[i:i + 1])
    assert parser.next() == http_impl.REQUEST and bytes(parser.body) == body


# -- properties -------------------------------------------------------------------------

def mostly(good: list[bytes], bad: list[bytes], weight: int = 6):
    """Valid pieces most of the time, so generated requests reach every path."""
    return st.sampled_from(good * weight + bad)


TOKENS = mostly([b"POST", b"GET"], [b"PUT", b"get", b"P\x00ST", b"", b"GE T", b"M!#$"])
TARGETS = mostly([b"/v1/telemetry", b"/"], [b"*", b"/a?b=c", b"/\x7f", b"/\xff", b"", b"/a b"])
VERSIONS = mostly([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1", b"http/1.1", b"HTTP/1.1 ",
                                  b"HTTP/1.x", b"HTTP/11.1"], 10)
LEADING = mostly([b""], [b"\r\n", b"\r\n\r\n", b"\r\n" * 4, b"\r\n" * 5, b"\n", b"\r"], 20)
HEADER_NAMES = mostly([b"Content-Type", b"X-A", b"Connection", b"Expect"],
                      [b"Host", b"Content-Length", b"Transfer-Encoding", b"host", b"X A", b"", b"X-\xff",
                       b"Authorization", b"content-length"], 12)
HEADER_VALUES = mostly([b"x", b"a\tb", b"keep-alive", b"100-continue"],
                       [b"0", b"2", b"2, 2", b" 2 ", b"chunked", b"Chunked", b"gzip", b"close", b"", b"a\x01",
                        b"\xe4", b"a\rb", b"65", b"99999999999999999999999", b"chunked, gzip", b"gzip, chunked",
                        b"chunked,", b", chunked", b"chunked;q=1", b"a\x7f", b"1 2", b"0x", b"-1", b"+1",
                        b"000000000000000000000000000002", b"gz ip", b"chunked,,\t,", b"\tchunked\t"], 12)
SEPARATORS = mostly([b": ", b":"], [b" :", b":\t", b"::"], 8)
EOLS = mostly([b"\r\n"], [b"\n", b"\r", b"\r\n "], 30)


@st.composite
def chunked_bodies(draw):
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=20))
        n = len(data)
        size = draw(mostly([b"%x" % n], [b"%X" % n, b"%x;e=1" % n, b"%x " % n, b"0%x" % n, b"z", b"%x\n" % n,
                                         b"%x ; e = v" % n, b'%x;e="q\\"d"' % n, b"%x;e=" % n, b"%x;" % n,
                                         b'%x;e="' % n, b"%x;e\rf" % n], 3))
        out += size + draw(EOLS) + data + draw(mostly([b"\r\n"], [b"", b"\n", b"XX"], 10))
    return out + draw(mostly([b"0\r\n\r\n"], [b"0\r\n\n", b"0\r\nX: y\r\n\r\n", b"0;z\r\n\r\n", b"0\r\n",
                                               b"000\r\n\r\n", b"0\r\n X: y\r\n\r\n", b"0\r\nX: y\n\r\n",
                                               b"0\r\nX y\r\n\r\n", b"0\r\nA: 1\r\nB: 2\r\n\r\n"]))


@st.composite
def requests(draw):
    head = draw(LEADING) + draw(TOKENS) + b" " + draw(TARGETS) + b" " + draw(VERSIONS) + draw(EOLS)
    headers = draw(st.lists(st.tuples(HEADER_NAMES, SEPARATORS, HEADER_VALUES), max_size=4))
    if draw(st.integers(0, 9)):
        headers.insert(draw(st.integers(0, len(headers))), (b"Host", b": ", b"gw"))
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "both"]))
    body = b""
    if framing in ("length", "both"):
        body = draw(st.binary(max_size=MAX_BODY + 4))
        headers.append((b"Content-Length", b": ", b"%d" % len(body)))
    if framing in ("chunked", "both"):
        body = draw(chunked_bodies())
        headers.append((b"Transfer-Encoding", b": ", b"chunked"))
    headers = draw(st.permutations(headers))
    for name, sep, value in headers:
        head += name + sep + value + draw(EOLS)
    return head + b"\r\n" + body


@st.composite
def mutated(draw, base):
    data = bytearray(draw(base))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["delete", "insert", "replace"]))
        byte = draw(st.sampled_from([0x0D, 0x0A, 0x20, 0x09, 0x3A, 0x2C, 0x00, 0x30, 0x61, 0xFF]))
        if op == "delete":
            del data[i]
        elif op == "insert":
            data.insert(i, byte)
        else:
            data[i] = byte
    return bytes(data)


@pytest.mark.parametrize("cut", range(20, 40))
def test_an_unsupported_version_then_a_bad_byte_in_one_read_is_505_in_all_three(cut):
    """Found by the generated-requests property: the std engine judged a read
    holding the version and a bare LF after it as malformed (400) before
    looking at the version, which the fast parsers had refused (505) at its digit."""
    data = b"POST /v1/telemetry HTTP/2.0\nContent-Length: 0\r\n\r\n"
    assert agree(data, [cut])[1] == (505, "version_not_supported")


@SETTINGS
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_arbitrary_bytes_agree(data, cuts):
    agree(data, cuts)


@SETTINGS
@given(st.lists(mutated(requests()), min_size=1, max_size=3), st.lists(st.integers(0, 600), max_size=6))
def test_generated_requests_agree(reqs, cuts):
    agree(b"".join(reqs), cuts)


@SETTINGS
@given(st.lists(st.binary(max_size=MAX_BODY), min_size=1, max_size=4), st.lists(st.integers(0, 600), max_size=6))
def test_valid_pipelines_are_accepted_by_all(bodies, cuts):
    data = b"".join(post(b) for b in bodies)
    requests, end = agree(data, cuts)
    assert end == "clean" and [r[4] for r in requests] == bodies
