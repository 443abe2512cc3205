"""The ws devices' usual path on the mux (loadgen.ws_device: a window of
frames made by one bytes format of its seqs, a read of in-order acks built
the same way and compared whole, latencies into the mux's ``LatencyTally``):
every acked reading counted once and its latency in the histogram, however
the acks arrive (whole, split across reads, several windows in one read,
behind a ping, doubled, out of order, with a rejection), against a real TCP
WebSocket server in this process; and windows whose seqs cross powers of
ten or outgrow the cached formats, read by the gateway's frame decoder."""
from __future__ import annotations

import json
from functools import partial

import pytest
import trio
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, Request
from wsproto.handshake import H11Handshake

from gridgate.protocols.websocket.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameDecoder, encode_frame
from loadgen.device import DeviceOptions
from loadgen.runner import RunPlan, SelfCheck, run_share
from loadgen.stats import Stats
from loadgen.ws_device import _MAX_FORMATS_N, WsDevice


def _ack(seq: int, batch: int, rejected: int = 0) -> bytes:
    errors = b"[]" if not rejected else b'[{"index":0,"field":"temperature"}]'
    return encode_frame(OP_TEXT, b'{"ack":%d,"accepted":%d,"rejected":%d,"errors":%s}'
                        % (seq, batch - rejected, rejected, errors))


async def _ws_acker(stream: trio.SocketStream, log: dict[str, int], batch: int) -> None:
    """Accept the upgrade, then answer the envelopes of each read in one of
    seven ways, in turn: their acks in one write; split in two writes at an
    odd byte; held back and sent with the next read's (several windows in one
    read; alone after 5 ms if no read comes); behind a ping; each doubled; in
    reverse order; the first one rejecting one reading."""
    hs = H11Handshake(ConnectionType.SERVER)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(65536)
    end = head.index(b"\r\n\r\n") + 4
    hs.receive_data(head[:end])
    assert any(isinstance(e, Request) for e in hs.events())
    await stream.send_all(hs.send(AcceptConnection()))
    decoder = FrameDecoder(1 << 20)
    pending = head[end:]
    held = b""
    n = 0
    while True:
        data = pending
        pending = b""
        if not data and held:
            # held acks go with the next read's, or alone if the device waits for them
            with trio.move_on_after(0.005) as wait:
                data = await stream.receive_some(65536)
            if wait.cancelled_caught:
                await stream.send_all(held)
                held = b""
                continue
        elif not data:
            data = await stream.receive_some(65536)
        if not data:
            return
        seqs = []
        for opcode, payload in decoder.feed(data):
            if opcode == OP_TEXT:
                seqs.append(json.loads(payload)["seq"])
            elif opcode == OP_CLOSE:
                log["closes"] += 1
                await stream.send_all(held)
                return
        if not seqs:
            continue
        log["envelopes"] += len(seqs)
        way = n % 7
        n += 1
        acks = b"".join(_ack(s, batch) for s in seqs)
        if way == 0:
            await stream.send_all(held + acks)
        elif way == 1:
            await stream.send_all(held + acks[:37])
            await trio.sleep(0.002)
            await stream.send_all(acks[37:])
        elif way == 2:
            held += acks            # sent with the next read's acks
            continue
        elif way == 3:
            await stream.send_all(held + encode_frame(OP_PING, b"p") + acks)
        elif way == 4:
            await stream.send_all(held + b"".join(_ack(s, batch) * 2 for s in seqs))
        elif way == 5:
            await stream.send_all(held + b"".join(_ack(s, batch) for s in reversed(seqs)))
        else:
            log["rejected"] += 1
            await stream.send_all(held + _ack(seqs[0], batch, rejected=1) + acks[len(_ack(seqs[0], batch)):])
        held = b""


@pytest.mark.parametrize(("inflight", "batch"), [(1, 1), (10, 1), (7, 3)])
async def test_every_ws_ack_is_counted_once_however_it_arrives(inflight, batch):
    log = {"envelopes": 0, "closes": 0, "rejected": 0}
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, partial(_ws_acker, log=log, batch=batch), 0,
                                                 host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        stats, check = Stats(), SelfCheck()
        opts = DeviceOptions(host="127.0.0.1", port=port, protocol="ws", inflight=inflight, batch=batch,
                             drain_timeout=5)
        await run_share(RunPlan(device=opts, first=0, count=10, duration=1.5), stats, check)
        with trio.fail_after(5):
            while log["closes"] < 10:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert (stats.reconnects, stats.connects) == (0, 10)
    assert log["envelopes"] > 10 * 20
    # every envelope the server read was sent once and acked once, the
    # rejected readings apart: the doubled acks, the pings and the order count for nothing
    assert stats.sent == log["envelopes"] * batch
    assert stats.errors == stats.rejected == log["rejected"] > 0
    assert stats.acked == stats.sent - stats.rejected
    assert stats.histogram.get_total_count() == stats.acked
    assert stats.histogram.get_value_at_percentile(50) >= 1


@pytest.mark.parametrize("first", [1, 5, 95, 999_990, 10 ** 9 - 3])
@pytest.mark.parametrize("window", [1, 10, _MAX_FORMATS_N + 6])
def test_windows_across_powers_of_ten_and_beyond_the_cached_formats(first, window):
    """Windows (their seqs' digits formatted in one go) read back by the
    gateway's decoder as the envelopes of the seqs sent, in order; and the
    in-order acks of them taken whole, counted exactly."""
    dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", batch=2, inflight=window), Stats(), None)
    dev.next_seq = first
    data = b"".join(dev._frames([1.0] * window) for _ in range(3))
    texts = [p for op, p in FrameDecoder(1 << 20).feed(data) if op == OP_TEXT]
    assert [json.loads(t)["seq"] for t in texts] == list(range(first, first + 3 * window))
    assert len({t.split(b",", 1)[1] for t in texts}) == 1

    def no_parse(buf: bytes) -> list[bytes]:
        raise AssertionError("parsed")

    taken, findall = 0, dev._acks
    for cut in (window, 2 * window, 3 * window):
        part = b"".join(_ack(s, 2) for s in range(first + taken, first + cut))
        taken = cut
        if len({len(b"%d" % s) for s in range(first + cut - window, first + cut)}) == 1:
            dev._acks = no_parse    # one seq width: the read compared whole, not parsed
        else:
            dev._acks = findall     # across a power of ten: the regular expression or the parser
        assert dev.take_read(part, 2.0) == b""
    assert not dev.inflight
    assert dev.stats.acked == dev.stats.histogram.get_total_count() == 3 * window * 2


def test_a_read_that_is_almost_the_acks_owed_is_parsed():
    """The whole-read comparison is exact: a read of the right length whose
    seqs, accepted count or frame head differ is taken by the parser."""
    for bad in (b'{"ack":2,"accepted":3,"rejected":0,"errors":[]}',     # not the oldest in flight
                b'{"ack":1,"accepted":2,"rejected":1,"errors":[]}'):     # same length, a rejection
        dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", batch=3), Stats(), None)
        dev._frames([1.0] * 3)
        read = encode_frame(OP_TEXT, bad) + _ack(3, 3)
        assert dev.take_read(read, 2.0) == b""
        assert dev.stats.acked == (6 if bad.startswith(b'{"ack":2') else 5)
        assert dev.stats.histogram.get_total_count() == dev.stats.acked
    dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws", batch=3), Stats(), None)
    dev._frames([1.0])
    # a pong of the ack's length, then the ack: counted once, the pong noted
    assert dev.take_read(encode_frame(OP_PONG, b"x" * 48) + _ack(1, 3), 2.0) == b""
    assert dev.stats.acked == 3 and not dev.inflight


def test_a_percent_sign_in_the_envelope_is_sent_as_it_is():
    """The window's format escapes the envelope's bytes: a ``%`` in them
    (a reading's text, a length byte) reaches the wire unchanged."""
    dev = WsDevice(0, DeviceOptions(host="127.0.0.1", port=1, protocol="ws"), Stats(), None)
    dev.tail = b',"note":"100%d %s %%"' + dev.tail
    texts = [p for op, p in FrameDecoder(1 << 20).feed(dev._frames([1.0] * 5)) if op == OP_TEXT]
    assert [json.loads(t)["seq"] for t in texts] == [1, 2, 3, 4, 5]
    assert {json.loads(t)["note"] for t in texts} == {"100%d %s %%"}
