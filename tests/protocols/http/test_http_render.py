"""fast.render_response: the cache of whole keep-alive responses gives the
same bytes as rendering them part by part, and stays bounded whatever
bodies a client provokes."""
from __future__ import annotations

from gridgate.protocols.http import fast


def test_a_cached_response_is_the_rendered_one_and_repeats_identically(monkeypatch):
    monkeypatch.setattr(fast, "_WHOLE", {})       # this test's own, not what other tests left
    body = b'{"accepted":1,"rejected":0,"errors":[]}'
    first = fast.render_response((202, body, b"application/json", []), False)
    assert first == (b"HTTP/1.1 202 Accepted\r\nserver: gridgate\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
    assert fast.render_response((202, bytes(body), b"application/json", []), False) is first


def test_closing_and_extra_header_responses_are_not_taken_from_the_cache(monkeypatch):
    monkeypatch.setattr(fast, "_WHOLE", {})
    body = b'{"error":"overloaded","detail":""}'
    keep = fast.render_response((503, body, b"application/json", []), False)
    closing = fast.render_response((503, body, b"application/json", []), True)
    assert closing == keep.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
    extra = fast.render_response((503, body, b"application/json", [(b"retry-after", b"1")]), False)
    assert b"\r\nretry-after: 1\r\n\r\n" in extra


def test_the_cache_stays_bounded_and_long_bodies_are_rendered_each_time(monkeypatch):
    monkeypatch.setattr(fast, "_WHOLE", {})
    for i in range(fast._WHOLE_MAX * 2):
        body = b'{"accepted":%d,"rejected":0,"errors":[]}' % (10_000 + i)
        data = fast.render_response((202, body, b"application/json", []), False)
        assert data.endswith(b"content-length: %d\r\n\r\n%s" % (len(body), body))
    assert len(fast._WHOLE) == fast._WHOLE_MAX
    long_body = b"x" * (fast._WHOLE_BODY_MAX + 1)
    data = fast.render_response((200, long_body, b"text/plain", []), False)
    assert data.endswith(b"\r\n\r\n" + long_body)
    assert all(key[2] != long_body for key in fast._WHOLE)
