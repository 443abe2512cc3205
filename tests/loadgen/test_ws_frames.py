"""The ws load generator's own WebSocket client: its frames as the gateway's
decoder reads them (each masked with its own random key), its parser of the
gateway's frames, its reading of acks, and its handshake (wsproto's) against
servers on in-memory streams."""
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
from loadgen.ws_device import KEYS, MaskKeys, WsDevice, _acks_pattern, client_frame, parse_frames


def frame_keys(data: bytes) -> list[bytes]:
    """The masking keys of the client frames in ``data`` (all with a 7- or 16-bit length)."""
    keys, pos = [], 0
    while pos < len(data):
        n, head = data[pos + 1] & 0x7F, 2
        assert data[pos + 1] & 0x80, "a client frame must be masked"
        if n == 126:
            n, head = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
        keys.append(data[pos + head:pos + head + 4])
        pos += head + 4 + n
    return keys


def test_client_frames_are_read_by_the_gateway_decoder():
    dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", batch=2), Stats(), None)
    sizes = [1, 9, 10, 99, 100, 99_999, 100_000]
    dev.next_seq = 1
    data = b""
    for seq in sizes:        # seq numbers of every width: the text frame's length changes with them
        dev.next_seq = seq
        data += dev._frames([0.0])
    data += dev._frames([0.0] * 25)           # a window of frames masked together (seqs 100,001 to 100,025)
    data += client_frame(OP_BINARY, bytes(70_000)) + client_frame(OP_PING, b"p")
    events = FrameDecoder(1 << 20).feed(data)
    texts = [p for op, p in events if op == OP_TEXT]
    assert [int(t.split(b'"seq":')[1].split(b",")[0]) for t in texts] == sizes + list(range(100_001, 100_026))
    assert len({t.split(b",", 1)[1] for t in texts}) == 1         # the readings arrive intact, the same in each
    assert events[-2:] == [(OP_BINARY, bytes(70_000)), (OP_PING, b"p")]
    msgpack_dev = WsDevice(1, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", payload="msgpack"), Stats(), None)
    [(op, payload)] = FrameDecoder(1 << 20).feed(msgpack_dev._frames([0.0]))
    assert op == OP_BINARY and payload.startswith(b"\x82\xa3seq\xce\x00\x00\x00\x01")
    window = msgpack_dev._frames([0.0] * 3)
    assert [p[:10] for _, p in FrameDecoder(1 << 20).feed(window)] == [
        b"\x82\xa3seq\xce\x00\x00\x00" + bytes([seq]) for seq in (2, 3, 4)]


def test_every_frame_has_its_own_random_key():
    dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws"), Stats(), None)
    keys = frame_keys(dev._frames([0.0] * 300) + client_frame(OP_PING, b"") + client_frame(OP_CLOSE, b"\x03\xe8"))
    assert len(keys) == 302
    # 302 draws of 32 random bits: a repeat (or an all-zero key) is a ~1e-5 chance, not a flaky test's
    assert len(set(keys)) == 302 and bytes(4) not in keys
    # the payload on the wire is masked: the envelope's text is not in it
    assert b"readings" not in dev._frames([0.0])


def test_mask_keys_come_in_bulk_and_are_never_handed_out_twice(monkeypatch):
    # A counting urandom makes every 4-byte word it ever gives unique, so a
    # repeat among the keys taken is a pool position handed out twice (with
    # the real urandom, 6,025 random keys repeat one by chance about 0.4% of runs).
    counter = iter(range(1 << 32))
    draws = []

    def counting_urandom(n: int) -> bytes:
        assert n % 4 == 0
        draws.append(n // 4)
        return b"".join(next(counter).to_bytes(4, "big") for _ in range(n // 4))

    monkeypatch.setattr("loadgen.ws_device.os.urandom", counting_urandom)
    keys = MaskKeys()
    drawn = [keys.take(n) for n in (1, 1000, 23, 5000, 1)]
    assert [len(k) for k in drawn] == [4, 4000, 92, 20000, 4]
    words = [k[i:i + 4] for k in drawn for i in range(0, len(k), 4)]
    assert len(set(words)) == len(words)
    assert len(draws) < len(words) / 100          # in bulk: one urandom call per many keys
    monkeypatch.undo()
    assert KEYS.take(2) != KEYS.take(2)           # the real source: equal with chance 2**-64


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
        await server.aclose()

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
    assert await handshake_against(ok + b"Sec-WebSocket-Accept: bogus\r\n\r\n") == (
        "WebSocket handshake failed: Bad accept token")
    assert "Upgrade: websocket" in await handshake_against(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ACCEPT\r\n\r\n")
    refused = await handshake_against(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
    assert refused == "WebSocket handshake refused: HTTP 401"
    assert "closed before the answer" in await handshake_against(b"HTTP/1.1 101 Switching")


async def test_a_read_of_acks_is_taken_whole_and_anything_else_frame_by_frame():
    dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", batch=3), Stats(), None)
    dev._frames([1.0] * 12)                      # seqs 1..12 in flight
    acks = b"".join(encode_frame(OP_TEXT, b'{"ack":%d,"accepted":3,"rejected":0,"errors":[]}' % seq)
                    for seq in range(1, 11))
    pattern = _acks_pattern(3)
    seqs = pattern.findall(acks)
    assert [int(s) for s in seqs] == list(range(1, 11))
    dev._acked([int(s) for s in seqs], 3, 1.0)
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


def ack(seq: int, accepted: int = 3, rejected: int = 0) -> bytes:
    errors = b"[]" if not rejected else b'[{"index":0,"field":"temperature"}]'
    return encode_frame(OP_TEXT, b'{"ack":%d,"accepted":%d,"rejected":%d,"errors":%s}' % (seq, accepted, rejected,
                                                                                          errors))


def test_reads_of_acks_are_counted_exactly_however_they_come():
    """A read of in-order acks is compared whole against the digits sent; every
    other shape (split frames, a rejection, a command, an ack of nothing in
    flight, acks out of order, seqs across a power of ten) must give the
    same counts as acks taken one by one."""
    def device(first_seq: int) -> WsDevice:
        dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", batch=3), Stats(), None)
        dev.next_seq = first_seq
        dev._frames([1.0] * 10)
        return dev

    whole = b"".join(ack(seq) for seq in range(95, 105))      # 2- and 3-digit seqs in one read
    cases = {
        "one read": [whole],
        "split": [whole[:58], whole[58:301], whole[301:]],
        "byte by byte": [whole[i:i + 1] for i in range(len(whole))],
        "out of order": [ack(96) + ack(95), b"".join(ack(seq) for seq in range(97, 105))],
        "twice and unknown": [whole, ack(100) + ack(7)],
    }
    for name, reads in cases.items():
        dev = device(95)
        answers = b"".join(dev.take_read(data, 2.0) for data in reads)
        assert (dev.stats.acked, dev.stats.errors, dev.inflight, answers) == (30, 0, {}, b""), name
        assert dev.stats.histogram.get_total_count() == 30, name
    # the usual read (in-order acks of one seq width) is taken without the per-frame parse
    dev = device(1)

    def no_parse(buf: bytes) -> list[bytes]:
        raise AssertionError("parsed")

    dev._acks = no_parse
    dev.take_read(b"".join(ack(seq) for seq in range(1, 10)), 2.0)
    assert (dev.stats.acked, list(dev.inflight)) == (27, [10])
    # a rejection and a command among the acks: counted, and the command answered
    dev = device(1)
    mixed = (b"".join(ack(seq) for seq in range(1, 5)) + ack(5, accepted=2, rejected=1)
             + encode_frame(OP_TEXT, b'{"command":{"id":"c-1","type":"x"}}') + b"".join(ack(s) for s in range(6, 11)))
    answers = dev.take_read(mixed, 2.0)
    assert (dev.stats.acked, dev.stats.rejected, dev.stats.commands, dev.inflight) == (29, 1, 1, {})
    [(op, payload)] = FrameDecoder(1 << 20).feed(answers)
    assert (op, payload) == (OP_TEXT, b'{"command_ack":"c-1"}')
    # a close frame ends the connection
    dev = device(1)
    try:
        dev.take_read(ack(1) + encode_frame(OP_CLOSE, b"\x03\xe8bye"), 2.0)
    except ConnectionError as exc:
        assert "1000 bye" in str(exc)
    else:
        raise AssertionError("a close frame must end the connection")
    assert dev.stats.acked == 3
