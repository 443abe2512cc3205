"""The server's WebSocket frame decoder and encoders, with wsproto (the
library trio-websocket and the ``websockets``-free tests build on) as the
reference: every input is fed whole and one byte at a time, and hypothesis
checks the decoder and wsproto agree on generated frame streams and on
arbitrary bytes. Every test runs with the compiled unmasking and with its
pure-Python twin (``unmask_impl``)."""
from __future__ import annotations

import os
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import FrameDecoder as WsprotoFrameDecoder

from gridgate import _fastparse
from gridgate.protocols import wsmask_py
from gridgate.protocols.websocket import frames
from gridgate.protocols.websocket.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameDecoder,
    WebSocketError,
    encode_close,
    encode_frame,
)

BIG = 1 << 24


@pytest.fixture(autouse=True, params=[_fastparse, wsmask_py], ids=["c", "py"])
def unmask_impl(request, monkeypatch):
    """The decoder's unmasking, compiled and the twin (frames picks one at import)."""
    monkeypatch.setattr(frames, "_unmask", request.param.ws_unmask)
    return request.param


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None, rsv: int = 0,
                 masked: bool = True, length_bytes: int | None = None) -> bytes:
    """A client frame built by hand (so broken ones can be built too)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    size = length_bytes if length_bytes is not None else (0 if n <= 125 else 2 if n <= 0xFFFF else 8)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if masked else 0
    if size == 0:
        head += bytes([bit | n])
    elif size == 2:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def decode(data: bytes, max_bytes: int = BIG, byte_at_a_time: bool = False) -> tuple[list, int | None]:
    """(events, error code or None)."""
    dec = FrameDecoder(max_bytes)
    events: list = []
    try:
        if byte_at_a_time:
            for i in range(len(data)):
                events += dec.feed(data[i:i + 1])
        else:
            events += dec.feed(data)
    except WebSocketError as exc:
        return events + exc.events, exc.code
    return events, None


@pytest.fixture(params=[False, True], ids=["whole", "byte-at-a-time"])
def one_byte(request) -> bool:
    return request.param


def test_messages_and_control_frames_in_one_read(one_byte):
    data = (client_frame(OP_TEXT, b'{"seq": 1}') + client_frame(OP_BINARY, b"\x81\xa1a\x01")
            + client_frame(OP_PING, b"hi") + client_frame(OP_TEXT, "h\u00e9".encode(), fin=False)
            + client_frame(OP_PONG, b"") + client_frame(0, "llo \u2603".encode())
            + client_frame(OP_BINARY, bytes(70000)) + client_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye"))
    events, error = decode(data + client_frame(OP_TEXT, b"after close"), byte_at_a_time=one_byte)
    assert error is None
    assert events == [(OP_TEXT, b'{"seq": 1}'), (OP_BINARY, b"\x81\xa1a\x01"), (OP_PING, b"hi"), (OP_PONG, b""),
                      (OP_TEXT, "h\u00e9llo \u2603".encode()), (OP_BINARY, bytes(70000)),
                      (OP_CLOSE, b"\x03\xe8bye")]


def test_close_code_and_reason():
    dec = FrameDecoder(BIG)
    assert dec.feed(client_frame(OP_CLOSE, (4001).to_bytes(2, "big") + "d\u00e9j\u00e0".encode())) == [
        (OP_CLOSE, b"\x0f\xa1" + "d\u00e9j\u00e0".encode())]
    assert (dec.close_code, dec.close_reason, dec.closed) == (4001, "d\u00e9j\u00e0", True)
    empty = FrameDecoder(BIG)
    empty.feed(client_frame(OP_CLOSE, b""))
    assert empty.close_code == 1005


@pytest.mark.parametrize("data, code", [
    (client_frame(OP_TEXT, b"x", masked=False), 1002),
    (client_frame(3, b"x"), 1002),                                       # reserved opcode
    (client_frame(OP_TEXT, b"x", rsv=4), 1002),                          # RSV1: no extension agreed
    (client_frame(OP_PING, b"x", fin=False), 1002),
    (client_frame(OP_PING, b"x" * 126), 1002),
    (client_frame(0, b"x"), 1002),                                       # continuation of nothing
    (client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"), 1002),
    (client_frame(OP_TEXT, b"x" * 10, length_bytes=2), 1002),            # length not minimally encoded
    (client_frame(OP_TEXT, b"x" * 200, length_bytes=8), 1002),
    (client_frame(OP_TEXT, b"\xff"), 1007),
    (client_frame(OP_TEXT, b"\xe2\x98", fin=False) + client_frame(0, b"\xff"), 1007),
    (client_frame(OP_CLOSE, b"\x03"), 1002),
    (client_frame(OP_CLOSE, (1006).to_bytes(2, "big")), 1002),           # a local-only code
    (client_frame(OP_CLOSE, (2000).to_bytes(2, "big")), 1002),           # reserved, undefined
    (client_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff"), 1007),
    (client_frame(OP_BINARY, bytes(5000)), 1009),
    (client_frame(OP_BINARY, bytes(3000), fin=False) + client_frame(0, bytes(3000)), 1009),
], ids=["unmasked", "bad-opcode", "rsv1", "fragmented-ping", "long-ping", "lone-continuation", "interleaved",
        "long-2-byte-length", "long-8-byte-length", "bad-utf8", "bad-utf8-fragment", "close-1-byte",
        "close-local-code", "close-reserved-code", "close-bad-reason", "too-big", "too-big-fragmented"])
def test_broken_frames_raise_their_close_code(data, code, one_byte):
    assert decode(data, max_bytes=4096, byte_at_a_time=one_byte)[1] == code


def test_too_big_is_refused_from_the_header_alone():
    # 8-byte length of 2**40: refused before a byte of payload arrives
    dec = FrameDecoder(4096)
    with pytest.raises(WebSocketError) as info:
        dec.feed(b"\x82\xff" + (1 << 40).to_bytes(8, "big"))
    assert info.value.code == 1009 and dec.closed and dec.buffered == 0


def test_a_big_frame_over_many_reads_is_held_once():
    payload = os.urandom(300_000)
    frame = client_frame(OP_BINARY, payload)
    dec = FrameDecoder(BIG)
    events = []
    for i in range(0, len(frame), 1000):
        events += dec.feed(frame[i:i + 1000])
        assert dec.buffered <= len(frame)
    assert events == [(OP_BINARY, payload)] and dec.buffered == 0


def test_empty_fragments_hold_nothing():
    # an attacker's endless empty continuations must not grow what the decoder holds
    dec = FrameDecoder(4096)
    dec.feed(client_frame(OP_BINARY, b"ab", fin=False))
    empties = client_frame(0, b"", fin=False) * 1000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            assert dec.feed(empties) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert dec.buffered == 2 and held < 16384       # 20,000 list slots alone would be 160 KB
    assert dec.feed(client_frame(0, b"c")) == [(OP_BINARY, b"abc")] and dec.buffered == 0


@pytest.mark.parametrize("size", [1, 3, 4, 5, 125, 126, 2047, 2048, 2049, 2050, 65535, 65536, 100_003])
def test_unmasking_on_both_sides_of_the_small_payload_path(size):
    # the twin unmasks payloads up to 2048 bytes as one integer XOR, longer ones through XOR tables; the
    # compiled one 8 bytes at a time, then the last 0-7 bytes one by one
    payload = os.urandom(size)
    assert FrameDecoder(BIG).feed(client_frame(OP_BINARY, payload)) == [(OP_BINARY, payload)]


def test_encoders_are_read_back_by_wsproto():
    reader = WsprotoFrameDecoder(client=True)
    payloads = [b"", b"x" * 125, b"y" * 126, b"z" * 65535, b"w" * 65536]
    reader.receive_bytes(b"".join(encode_frame(OP_BINARY, p) for p in payloads)
                         + encode_frame(OP_TEXT, "\u2603".encode()) + encode_close(1008, "\u00e9" * 100))
    frames = []
    while (frame := reader.process_buffer()) is not None:
        frames.append((frame.opcode, frame.payload, frame.frame_finished, frame.message_finished))
    assert frames[:5] == [(OP_BINARY, p, True, True) for p in payloads]
    assert frames[5] == (OP_TEXT, "\u2603".encode(), True, True)
    close = frames[6][1]
    assert close[:2] == b"\x03\xf0" and len(close) <= 125 and close[2:].decode() == "\u00e9" * 61


# -- agreement with wsproto ----------------------------------------------------------

def wsproto_decode(data: bytes) -> tuple[list, int | None]:
    """wsproto's server side on ``data``: (whole messages and control frames,
    its close code on a protocol error else None)."""
    conn = Connection(ConnectionType.SERVER)
    conn.receive_data(data)
    events: list = []
    parts: list[bytes] = []
    error = None
    for ev in conn.events():
        if isinstance(ev, Message):
            parts.append(ev.data.encode() if isinstance(ev, TextMessage) else bytes(ev.data))
            if ev.message_finished:
                events.append((OP_TEXT if isinstance(ev, TextMessage) else OP_BINARY, b"".join(parts)))
                parts = []
        elif isinstance(ev, Ping):
            events.append((OP_PING, bytes(ev.payload)))
        elif isinstance(ev, Pong):
            events.append((OP_PONG, bytes(ev.payload)))
        elif isinstance(ev, CloseConnection):
            if conn.state.name == "REMOTE_CLOSING":
                events.append((OP_CLOSE, ev.code, ev.reason))
            else:            # wsproto reports a protocol error as a close with its code
                error = ev.code
            break
    return events, error


def ours(data: bytes) -> tuple[list, int | None, bool]:
    """The decoder on ``data``: (events, close code of its error or None,
    whether it holds an unfinished frame)."""
    dec = FrameDecoder(BIG)
    events: list = []
    error = None
    try:
        events = dec.feed(data)
    except WebSocketError as exc:
        events, error = exc.events, exc.code
    out = [(op, dec.close_code, dec.close_reason) if op == OP_CLOSE else (op, p) for op, p in events]
    return out, error, error is None and not dec.closed and dec.buffered > 0


def assert_agree(data: bytes) -> None:
    mine, my_error, my_unfinished = ours(data)
    theirs, their_error = wsproto_decode(data)
    if my_unfinished and their_error is not None:
        # wsproto judges a data frame from the first bytes of its payload
        # (continuation rules, UTF-8); we judge it once it is whole: the same
        # error, a read later
        their_error = None
    assert (mine, my_error) == (theirs, their_error)


frame_st = st.builds(
    client_frame,
    opcode=st.sampled_from([0, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, 3, 0xB]),
    payload=st.one_of(st.binary(max_size=200), st.text(max_size=60).map(str.encode),
                      st.integers(0, 5000).map(lambda c: c.to_bytes(2, "big"))),
    fin=st.booleans(), mask=st.binary(min_size=4, max_size=4), rsv=st.sampled_from([0, 0, 0, 4, 1]),
    masked=st.sampled_from([True, True, True, False]), length_bytes=st.sampled_from([None, None, None, 2, 8]))


@settings(max_examples=400, deadline=None)
@given(st.lists(frame_st, max_size=8), st.binary(max_size=12))
def test_agrees_with_wsproto_on_frame_streams(frames, tail):
    assert_agree(b"".join(frames) + tail)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_agrees_with_wsproto_on_arbitrary_bytes(data):
    assert_agree(data)
