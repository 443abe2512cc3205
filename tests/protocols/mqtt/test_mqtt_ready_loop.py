"""The MQTT 3.1.1 session on the gateway's ready loop (gridgate.connections.
ready_loop): a connected plain-socket session's reads are served inline by
the loop, and everything that has to wait goes back to the session's own
task: a full pipeline queue (backpressure), a quota's pause, an EOF in the
middle of a packet, a protocol error, a bug in the fast path (closes only
that connection), a close or a takeover while parked.

Real socket pairs into an embedded gateway (custom sinks, no spool threads
in the quota test, so the autojump clock is exact there); every wait is
bounded by fail_after and waits for the event it needs.
"""
from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from gridgate.config import LimitsConfig, PipelineConfig, SinkConfig
from gridgate.connections import ready_loop
from inprocess import GatedSink, MemorySink, make_config, read_exactly, serving, wait_closed
from mqtt_frames import gen_connack, gen_connect, gen_packet, gen_puback, gen_publish

pytestmark = pytest.mark.skipif(not ready_loop.AVAILABLE, reason="needs trio's epoll IO manager")


async def connect(gateway, nursery, client_id: str) -> trio.SocketStream:
    a, b = trio.socket.socketpair()
    client, server = trio.SocketStream(a), trio.SocketStream(b)
    nursery.start_soon(gateway.handle_mqtt, server)
    await client.send_all(gen_connect(client_id))
    assert await read_exactly(client, 4) == gen_connack(0)
    return client


def reading(device: str, n: int) -> bytes:
    return json.dumps({"device_id": device, "timestamp_ms": 1_700_000_000_000 + n, "temperature": 20.0,
                       "location": "shanghai/plant-1"}).encode()


def publish(device: str, n: int) -> bytes:
    return gen_publish(f"devices/{device}/telemetry", qos=1, mid=n, payload=reading(device, n))


def stored(sink: MemorySink) -> list[tuple[str, int]]:
    return sorted((r.device_id, r.ts_ns // 1_000_000) for b in sink.batches for r in b)


async def test_many_devices_one_reading_at_a_time_are_served_by_the_loop_alone(tmp_path):
    sink = MemorySink()
    async with serving(make_config(tmp_path), sink) as (gateway, nursery):
        loop = gateway.services.ready_loop
        devices = [f"meter-{i}" for i in range(40)]
        clients = [await connect(gateway, nursery, d) for d in devices]
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 40                   # every connection parked in the loop
        for n in range(1, 4):
            for d, c in zip(devices, clients, strict=True):
                await c.send_all(publish(d, n))
            for c in clients:
                assert await read_exactly(c, 4) == gen_puback(n)
        # the readings never woke a session's task
        assert loop.handed_back == 0 and loop.served >= 120
        for task in nursery.child_tasks:
            coro = task.coro
            while hasattr(coro, "cr_await"):
                coro = coro.cr_await
            assert type(coro) is ready_loop._Park
        for c in clients:
            await c.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 0 and loop.handed_back == 40       # each EOF closed its own connection
    assert stored(sink) == sorted((d, 1_700_000_000_000 + n) for d in devices for n in (1, 2, 3))


async def test_a_full_queue_hands_the_read_to_its_task_which_waits_paused_and_loses_nothing(tmp_path):
    config = make_config(tmp_path, pipeline=PipelineConfig(queue_max_items=1),
                         sink=SinkConfig(write_timeout_s=86400))       # the gated write must not time out
    sink = GatedSink()
    async with serving(config, sink) as (gateway, nursery):
        loop = gateway.services.ready_loop
        devices = ["meter-a", "meter-b", "meter-c"]
        clients = [await connect(gateway, nursery, d) for d in devices]
        for d, c in zip(devices, clients, strict=True):
            await c.send_all(publish(d, 1))
            await trio.testing.wait_all_tasks_blocked()
        # a: in the gated write; b: the queue's one item; c: no room, its task waits
        assert sink.waiting == 1 and gateway.pipeline.queued() == 1
        paused = [s for s in gateway.conns if s.paused]
        assert [s.device_id for s in paused] == ["meter-c"]
        assert loop.handed_back == 1 and len(loop) == 2
        sink.gate.set()
        for c in clients:
            assert await read_exactly(c, 4) == gen_puback(1)
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 3 and not any(s.paused for s in gateway.conns)   # parked again
        for c in clients:
            await c.aclose()
    assert stored(sink) == [(d, 1_700_000_000_001) for d in devices]


async def test_a_device_over_its_quota_waits_in_its_own_task_as_before(autojump_clock, start_gateway, nursery):
    # the same figures as tests/limits' in-memory test: the loop changes no timing
    sink = MemorySink()
    gateway = await start_gateway(sink, limits=LimitsConfig(device_readings_per_s=10, device_readings_burst=10))
    client = await connect(gateway, nursery, "meter-1")
    other = await connect(gateway, nursery, "meter-2")
    start = trio.current_time()
    times = []
    for n in range(1, 31):
        await client.send_all(publish("meter-1", n))
        assert await read_exactly(client, 4) == gen_puback(n)
        times.append(trio.current_time())
    assert times[9] == start
    assert times[-1] - start == pytest.approx(1.9)
    # meanwhile another device is not held back by this one's pause
    await other.send_all(publish("meter-2", 1))
    assert await read_exactly(other, 4) == gen_puback(1)
    assert gateway.services.ready_loop.handed_back >= 30
    assert len(stored(sink)) == 31


async def test_an_eof_in_the_middle_of_a_packet_closes_only_that_connection(tmp_path):
    sink = MemorySink()
    async with serving(make_config(tmp_path), sink) as (gateway, nursery):
        cut = await connect(gateway, nursery, "meter-cut")
        ok = await connect(gateway, nursery, "meter-ok")
        frame = publish("meter-cut", 1)
        await cut.send_all(frame[:len(frame) // 2])
        await trio.testing.wait_all_tasks_blocked()
        await cut.send_eof()
        await wait_closed(cut)
        await ok.send_all(publish("meter-ok", 1))
        assert await read_exactly(ok, 4) == gen_puback(1)
        assert [s.device_id for s in gateway.conns] == ["meter-ok"]
        await ok.aclose()
    assert stored(sink) == [("meter-ok", 1_700_000_000_001)]


async def test_a_protocol_error_read_by_the_loop_closes_and_counts_only_that_connection(tmp_path):
    async with serving(make_config(tmp_path), MemorySink()) as (gateway, nursery):
        bad = await connect(gateway, nursery, "meter-bad")
        ok = await connect(gateway, nursery, "meter-ok")
        await bad.send_all(gen_packet(0x00))          # packet type 0 is reserved
        await wait_closed(bad)
        assert gateway.metrics.registry.get_sample_value(
            "gridgate_protocol_errors_total", {"protocol": "mqtt", "reason": "malformed"}) == 1
        await ok.send_all(publish("meter-ok", 1))
        assert await read_exactly(ok, 4) == gen_puback(1)
        assert not gateway.services.ready_loop.closed
        await ok.aclose()


async def test_a_bug_in_one_fast_path_closes_only_its_connection(tmp_path, caplog):
    async with serving(make_config(tmp_path), MemorySink()) as (gateway, nursery):
        bad = await connect(gateway, nursery, "meter-bad")
        ok = await connect(gateway, nursery, "meter-ok")
        pipeline = gateway.pipeline
        try_submit = pipeline.try_submit

        def broken(item):
            if item.records and item.records[0].device_id == "meter-bad":
                raise RuntimeError("a bug on meter-bad's path")
            return try_submit(item)

        pipeline.try_submit = broken
        await bad.send_all(publish("meter-bad", 1))
        await wait_closed(bad)
        await ok.send_all(publish("meter-ok", 1))
        assert await read_exactly(ok, 4) == gen_puback(1)
        assert not gateway.services.ready_loop.closed
        assert [s.device_id for s in gateway.conns] == ["meter-ok"]
        await ok.aclose()
    assert "a bug on meter-bad's path" in caplog.text


async def test_a_parked_connection_closed_by_the_gateway_or_taken_over_leaves_the_loop(tmp_path):
    async with serving(make_config(tmp_path), MemorySink()) as (gateway, nursery):
        loop = gateway.services.ready_loop
        first = await connect(gateway, nursery, "meter-1")
        other = await connect(gateway, nursery, "meter-2")
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 2
        # the same client id again: the parked first connection is closed
        second = await connect(gateway, nursery, "meter-1")
        await wait_closed(first)
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 2
        [session] = [s for s in gateway.conns if s.device_id == "meter-2"]
        session.close("closed by a test")
        await wait_closed(other)
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 1
        # the fds freed above are reused by new connections, served as usual
        third = await connect(gateway, nursery, "meter-3")
        await third.send_all(publish("meter-3", 1))
        assert await read_exactly(third, 4) == gen_puback(1)
        await second.send_all(publish("meter-1", 1))
        assert await read_exactly(second, 4) == gen_puback(1)
        for c in (second, third):
            await c.aclose()


async def test_a_connect_over_several_reads_is_finished_by_the_task_before_the_loop_reads(tmp_path):
    async with serving(make_config(tmp_path), MemorySink()) as (gateway, nursery):
        loop = gateway.services.ready_loop
        a, b = trio.socket.socketpair()
        client = trio.SocketStream(a)
        nursery.start_soon(gateway.handle_mqtt, trio.SocketStream(b))
        frame = gen_connect("meter-slow", username="meter-slow", password=b"p" * 3000)
        for start, end in ((0, 12), (12, 1000), (1000, 2000)):      # the protocol level is known after 12 bytes
            await client.send_all(frame[start:end])
            await trio.testing.wait_all_tasks_blocked()
            assert len(loop) == 0                    # not parked in the loop before CONNECT is done
        await client.send_all(frame[2000:])
        assert await read_exactly(client, 4) == gen_connack(0)
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 1
        await client.send_all(publish("meter-slow", 1))
        assert await read_exactly(client, 4) == gen_puback(1)
        await client.aclose()
