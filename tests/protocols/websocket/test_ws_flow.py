"""/v1/ws flow control and graceful stop, in-process with the trio-websocket
client: a device that does not read its acks stops being read (and is not
reaped for it), and a stopping gateway delivers the acks it owes before it
closes with 1001; pings whose pongs are not read are bounded the same way."""
from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, wrap_client_stream

from autojump import start_still
from gridgate.config import PipelineConfig, SinkConfig, WebSocketConfig
from inprocess import GatedSink, MemorySink, make_config
from loadgen.ws_device import OP_CLOSE, OP_PING, OP_TEXT, client_frame, handshake, parse_frames


def envelope(seq: int) -> str:
    return json.dumps({"seq": seq, "readings": [{"humidity": seq % 100}]})


async def test_a_device_that_does_not_read_its_acks_stops_being_read(autojump_clock, tmp_path, nursery):
    config = make_config(tmp_path, websocket=WebSocketConfig(listen="", ping_interval_s=0, max_pending_acks=3))
    gateway = await start_still(nursery, config, MemorySink())
    # lockstep: a write waits until the peer reads it, as a full socket does
    client, server = trio.testing.lockstep_stream_pair()
    nursery.start_soon(gateway.handle_ws, server)
    # message_queue_size=1: the client library stops reading once one ack waits unread
    ws = await wrap_client_stream(nursery, client, "gw", "/v1/ws?device_id=meter-1", message_queue_size=1)
    (session,) = list(gateway.conns)
    sent = 0

    async def send_all() -> None:
        nonlocal sent
        for seq in range(1, 41):
            await ws.send_message(envelope(seq))
            sent += 1

    nursery.start_soon(send_all)
    await trio.testing.wait_all_tasks_blocked()
    assert session.paused and sent < 40          # the gateway stopped reading: the sender is held
    await trio.sleep(3600)                       # far past idle_timeout_s: held back, not silent
    assert len(gateway.conns) == 1 and gateway.conns.reaped == 0 and session.paused
    acks = [json.loads(await ws.get_message())["ack"] for _ in range(40)]
    assert acks == list(range(1, 41)) and sent == 40
    await trio.testing.wait_all_tasks_blocked()
    assert not session.paused
    await ws.aclose()


async def test_a_stopping_gateway_sends_the_acks_it_owes_then_closes_with_1001(autojump_clock, tmp_path, nursery):
    config = make_config(tmp_path, websocket=WebSocketConfig(listen="", ping_interval_s=0),
                         pipeline=PipelineConfig(batch_max_delay_ms=0), sink=SinkConfig(write_timeout_s=86400))
    sink = GatedSink()
    async with trio.open_nursery() as gateway_nursery:
        gateway = await start_still(gateway_nursery, config, sink)
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(gateway.handle_ws, server)
        ws = await wrap_client_stream(nursery, client, "gw", "/v1/ws?device_id=meter-1")
        await ws.send_message(envelope(1))
        await trio.testing.wait_all_tasks_blocked()
        assert sink.waiting == 1                 # seq 1 is being written, not yet durable
        gateway.stop()
        await trio.testing.wait_all_tasks_blocked()
        sink.gate.set()
        assert json.loads(await ws.get_message()) == {"ack": 1, "accepted": 1, "rejected": 0, "errors": []}
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason.code == 1001 and exc.reason.reason == "gateway shutting down"
        else:
            raise AssertionError("a message after the owed ack")
    assert [r.fields for b in sink.batches for r in b] == [{"humidity": 1}]


async def test_pings_whose_pongs_are_not_read_stop_the_reading_on_mqtt_too(autojump_clock, tmp_path, nursery):
    config = make_config(tmp_path, websocket=WebSocketConfig(listen="", ping_interval_s=0, max_pending_acks=3))
    gateway = await start_still(nursery, config, MemorySink())
    client, server = trio.testing.lockstep_stream_pair()
    nursery.start_soon(gateway.handle_ws, server)
    assert await handshake(client, "gw", "/mqtt", subprotocol="mqtt") == b""
    (session,) = list(gateway.conns)
    sent = 0

    async def ping_flood() -> None:
        nonlocal sent
        for _ in range(50):
            await client.send_all(client_frame(OP_PING, b"x"))
            sent += 1

    nursery.start_soon(ping_flood)
    await trio.testing.wait_all_tasks_blocked()
    assert session.paused and sent <= 5          # a few pongs owed, then the pings wait in the client
    received = b""
    while received.count(b"\x8a\x01x") < 50:     # every pong comes, once the client reads
        received += await client.receive_some(65536)
    assert received == b"\x8a\x01x" * 50 and sent == 50


@pytest.mark.parametrize("bad, code", [(b"\x81\x01x", 1002),                          # not masked
                                       (client_frame(OP_TEXT, b"\xff"), 1007),        # not UTF-8
                                       (client_frame(3, b""), 1002)])                 # reserved opcode
async def test_a_broken_frame_closes_after_the_messages_before_it(autojump_clock, tmp_path, nursery, bad, code):
    config = make_config(tmp_path, websocket=WebSocketConfig(listen="", ping_interval_s=0),
                         pipeline=PipelineConfig(batch_max_delay_ms=0))
    sink = MemorySink()
    gateway = await start_still(nursery, config, sink)
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_ws, server)
    assert await handshake(client, "gw", "/v1/ws?device_id=meter-1") == b""
    await client.send_all(client_frame(OP_TEXT, envelope(1).encode()) + bad)    # one write, one read
    frames: list = []
    buf = b""
    while not frames or frames[-1][0] != OP_CLOSE:
        chunk = await client.receive_some(65536)
        assert chunk, f"closed without a close frame after {frames}"
        got, buf = parse_frames(buf + chunk)
        frames += got
    assert json.loads(frames[0][1])["ack"] == 1
    assert int.from_bytes(frames[-1][1][:2], "big") == code and len(frames) == 2
    assert [r.fields for b in sink.batches for r in b] == [{"humidity": 1}]
    reason = {1002: "bad_frame", 1007: "bad_utf8"}[code]
    assert gateway.metrics.registry.get_sample_value("gridgate_protocol_errors_total",
                                                     {"protocol": "ws", "reason": reason}) == 1
    assert gateway.metrics.registry.get_sample_value("gridgate_ws_closes_total", {"code": str(code)}) == 1
