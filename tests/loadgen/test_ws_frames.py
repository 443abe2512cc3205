"""The ws load generator's own WebSocket client: its frames as the gateway's
decoder reads them, its parser of the gateway's frames, and its handshake
check against servers on in-memory streams."""
from __future__ import annotations

import trio
import trio.testing

from gridgate.protocols.websocket.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameDecoder,
    encode_frame,
)
from loadgen.device import DeviceOptions
from loadgen.stats import Stats
from loadgen.ws_device import WsDevice, _acks_pattern, client_frame, parse_frames


def test_client_frames_are_read_by_the_gateway_decoder():
    dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", batch=2), Stats(), None)
    sizes = [1, 9, 10, 99, 100, 99_999, 100_000]
    dev.next_seq = 1
    data = b""
    for seq in sizes:        # seq numbers of every width: the text frame's length changes with them
        dev.next_seq = seq
        data += dev._frames([0.0])
    data += client_frame(OP_BINARY, bytes(70_000)) + client_frame(OP_PING, b"p")
    events = FrameDecoder(1 << 20).feed(data)
    texts = [p for op, p in events if op == OP_TEXT]
    assert [int(t.split(b'"seq":')[1].split(b",")[0]) for t in texts] == sizes
    assert events[-2:] == [(OP_BINARY, bytes(70_000)), (OP_PING, b"p")]
    msgpack_dev = WsDevice(1, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", payload="msgpack"), Stats(), None)
    [(op, payload)] = FrameDecoder(1 << 20).feed(msgpack_dev._frames([0.0]))
    assert op == OP_BINARY and payload.startswith(b"\x82\xa3seq\xce\x00\x00\x00\x01")


def test_parse_frames_takes_whole_frames_and_keeps_the_rest():
    stream = encode_frame(OP_TEXT, b"a" * 5) + encode_frame(OP_BINARY, b"b" * 300) + encode_frame(OP_CLOSE, b"\x03\xe8")
    for cut in range(len(stream) + 1):
        first, rest = parse_frames(stream[:cut])
        second, left = parse_frames(rest + stream[cut:])
        assert first + second == [(OP_TEXT, b"a" * 5), (OP_BINARY, b"b" * 300), (OP_CLOSE, b"\x03\xe8")]
        assert left == b""


async def handshake_against(answer: bytes) -> str | None:
    """Run the device's handshake against a server that reads the request
    and writes ``answer`` (with the right accept token if it holds ACCEPT)."""
    import base64
    import hashlib

    client, server = trio.testing.memory_stream_pair()
    dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws"), Stats(), None)

    async def serve() -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await server.receive_some(4096)
        key = [line.split(b": ")[1] for line in request.split(b"\r\n") if line.startswith(b"Sec-WebSocket-Key")][0]
        token = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        await server.send_all(answer.replace(b"ACCEPT", token))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            rest = await dev._handshake(client)
        except ConnectionError as exc:
            return str(exc)
    return f"ok {rest!r}"


async def test_the_handshake_checks_the_status_and_the_accept_token():
    ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    assert await handshake_against(ok + b"Sec-WebSocket-Accept: ACCEPT\r\n\r\n\x81\x01x") == "ok b'\\x81\\x01x'"
    assert "wrong Sec-WebSocket-Accept" in await handshake_against(ok + b"Sec-WebSocket-Accept: bogus\r\n\r\n")
    refused = await handshake_against(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
    assert refused == "WebSocket handshake failed: 'HTTP/1.1 401 Unauthorized'"


async def test_a_read_of_acks_is_taken_whole_and_anything_else_frame_by_frame():
    dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", batch=3), Stats(), None)
    dev._frames([1.0] * 12)                      # seqs 1..12 in flight
    acks = b"".join(encode_frame(OP_TEXT, b'{"ack":%d,"accepted":3,"rejected":0,"errors":[]}' % seq)
                    for seq in range(1, 11))
    pattern = _acks_pattern(3)
    seqs = pattern.findall(acks)
    assert [int(s) for s in seqs] == list(range(1, 11))
    dev._acked([int(s) for s in seqs], 3)
    assert dev.stats.acked == 30 and sorted(dev.inflight) == [11, 12]
    # an ack of fewer readings, with errors, a command or other spacing: not matched, so the
    # matches no longer add up to the read and it goes to the frame parser
    for other in (b'{"ack":11,"accepted":2,"rejected":1,"errors":[{"index":0}]}', b'{"command":{"id":"c"}}',
                  b'{"ack":11, "accepted":3,"rejected":0,"errors":[]}'):
        assert pattern.findall(acks + encode_frame(OP_TEXT, other)) == seqs


async def test_the_reader_counts_a_read_of_acks_and_a_mixed_read_alike():
    for mixed in (False, True):
        dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", batch=3), Stats(), None)
        dev._frames([1.0] * 4)
        reads = b"".join(encode_frame(OP_TEXT, b'{"ack":%d,"accepted":3,"rejected":0,"errors":[]}' % seq)
                         for seq in range(1, 5))
        if mixed:
            reads += encode_frame(OP_PONG, b"")
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dev.reader, client)
            await server.send_all(reads)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert dev.stats.acked == 12 and not dev.inflight and dev.stats.errors == 0
