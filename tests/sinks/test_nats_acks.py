"""The NATS sink's scan of plain JetStream acks: the compiled
``_fastparse.nats_scan_plain_acks`` and its twin ``nats_acks_py.scan_plain_acks``
give the same slots and end position, on examples and on arbitrary input."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

import gridgate.sinks.nats as nats_sink
from gridgate import _fastparse
from gridgate.sinks.nats_acks_py import scan_plain_acks as scan_py

SCANS = {"compiled": _fastparse.nats_scan_plain_acks, "python": scan_py}
PREFIX, SID, HEAD = b"_INBOX.abc.", b"7", b'{"stream":"TELEMETRY", "seq":'


@pytest.fixture(params=sorted(SCANS))
def scan(request):
    return SCANS[request.param]


def ack(slot: bytes | int, seq: int = 41, *, prefix: bytes = PREFIX, sid: bytes = SID, head: bytes = HEAD,
        body: bytes | None = None, size: bytes | None = None, spaces: int = 2) -> bytes:
    if isinstance(slot, int):
        slot = b"%d" % slot
    if body is None:
        body = head + b"%d}" % seq
    if size is None:
        size = b"%d" % len(body)
    return b"MSG " + prefix + slot + b" " + sid + b" " * spaces + size + b"\r\n" + body + b"\r\n"


def run(scan, wire: bytes, pos: int = 0) -> tuple[int, list[bytes]]:
    out: list[bytes] = []
    end = scan(bytearray(wire), pos, PREFIX, SID, HEAD, out)
    return end, out


def test_a_run_of_plain_acks_is_taken_whole(scan):
    wire = ack(0) + ack(511, 10**12) + ack(b"00042") + ack(7, 0, spaces=1)
    assert run(scan, wire) == (len(wire), [b"0", b"511", b"00042", b"7"])


@pytest.mark.parametrize("other", [
    ack(1, body=b'{"stream":"TELEMETRY", "seq":3, "duplicate": true}'),   # a duplicate
    ack(1, head=b'{"stream":"OTHER", "seq":'),                            # another stream
    ack(1, prefix=b"_INBOX.abd."),                                       # another prefix
    ack(1, sid=b"77"),                                                    # another subscription
    ack(1, size=b"99"), ack(1, size=b"0"), ack(1, size=b"9" * 40),        # a size not the body's
    ack(b""), ack(b"1.2"), ack(b"x"),                                     # no slot, two tokens, not digits
    ack(1, spaces=0), ack(1, size=b""),
    ack(1, body=HEAD + b"}"), ack(1, body=HEAD + b"12"), ack(1, body=HEAD + b"12}x"),
    b"HMSG _INBOX.abc.1 7  16 16\r\nNATS/1.0 503\r\n\r\n\r\n", b"PING\r\n", b"MSG other 7  2\r\nhi\r\n",
    ack(1)[:-1] + b"x",                                                   # no CRLF after the body
])
def test_the_scan_stops_at_the_first_message_that_is_not_a_plain_ack(scan, other):
    wire = ack(3) + other + ack(4)
    assert run(scan, wire) == (len(ack(3)), [b"3"])
    assert run(scan, other + ack(4)) == (0, [])


def test_an_ack_cut_by_the_end_of_the_buffer_is_left_whole(scan):
    whole = ack(5) + ack(6)
    for cut in range(len(ack(5)), len(whole)):
        assert run(scan, whole[:cut]) == (len(ack(5)), [b"5"]), cut
    assert run(scan, b"") == (0, [])


def test_the_scan_starts_at_pos_and_appends_to_out(scan):
    wire = b"junk" + ack(8) + ack(9)
    out = [b"before"]
    assert scan(bytearray(wire), 4, PREFIX, SID, HEAD, out) == len(wire)
    assert out == [b"before", b"8", b"9"]
    assert run(scan, wire, len(wire)) == (len(wire), [])


def test_bad_arguments_are_refused_alike(scan):
    with pytest.raises(TypeError):
        scan(ack(1), 0, PREFIX, SID, HEAD, [])                 # bytes, not a bytearray
    for pos in (-1, len(ack(1)) + 1):
        with pytest.raises(ValueError):
            scan(bytearray(ack(1)), pos, PREFIX, SID, HEAD, [])


# arbitrary wires made of plain acks, near misses and noise, cut anywhere
_piece = st.one_of(
    st.builds(ack, st.one_of(st.integers(0, 10**6), st.binary(max_size=4)), st.integers(0, 10**15),
              spaces=st.integers(0, 3)),
    st.builds(ack, st.integers(0, 600), size=st.binary(max_size=4)),
    st.builds(ack, st.integers(0, 600), body=st.binary(max_size=40)),
    st.builds(ack, st.integers(0, 600), prefix=st.sampled_from([PREFIX, b"_INBOX.ab.", b""]),
              sid=st.sampled_from([SID, b"77", b""]), head=st.sampled_from([HEAD, b'{"stream":"T", "seq":'])),
    st.binary(max_size=30), st.sampled_from([b"MSG ", b"\r\n", b" ", b"}", b"PING\r\n"]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_piece, max_size=8), st.data())
def test_compiled_and_python_agree_on_arbitrary_wires(pieces, data):
    wire = b"".join(pieces)
    wire = wire[:data.draw(st.integers(0, len(wire)), label="cut")]
    pos = data.draw(st.integers(0, len(wire)), label="pos")
    results = {name: run(scan, wire, pos) for name, scan in SCANS.items()}
    assert results["compiled"] == results["python"]


def test_the_sink_uses_the_compiled_scan_when_the_extension_is_loaded():
    assert nats_sink._scan_plain_acks is _fastparse.nats_scan_plain_acks


def test_the_sinks_parser_reads_plain_acks_with_either_scan(scan, monkeypatch):
    """The parser with each scan: plain acks to on_plain, the rest to on_acks, in order."""
    monkeypatch.setattr(nats_sink, "_scan_plain_acks", scan)
    plain: list[list[bytes]] = []
    other: list[list[tuple[bytes, bytes, bytes | None]]] = []

    async def feed(chunks):
        nc = nats_sink._Client()
        nc.take_acks(7, other.append, plain=(PREFIX, "TELEMETRY", plain.append))
        for chunk in chunks:
            await nc._ps.parse(chunk)
        return nc
    dup = ack(2, body=b'{"stream":"TELEMETRY", "seq":3, "duplicate": true}')
    wire = ack(0) + ack(1) + dup + ack(3) + ack(4)
    cut = len(wire) - 5
    nc = asyncio.run(feed([wire[:cut], wire[cut:]]))
    assert plain == [[b"0", b"1", b"3"], [b"4"]]
    assert [[s for s, _, _ in batch] for batch in other] == [[PREFIX + b"2"]]
    assert not nc._ps.buf
