"""The MQTT 5.0 session on the gateway's ready loop (gridgate.connections.
ready_loop), as the 3.1.1 one (test_mqtt_ready_loop.py): a connected
plain-socket session's reads are served inline by the loop, and what is
5.0's own goes back to the session's task only when it has to wait or
close: Receive Maximum's DISCONNECT 0x93, a quota's 0x97 (no wait) or
pause, a full queue whose item carries QoS 1 acks counted against Receive
Maximum, a takeover's 0x8E and a graceful stop's 0x8B while parked, and
the 0x83 of a reading the external sink refuses.

Real socket pairs into an embedded gateway; frames built independently of
the codec (tests/mqtt5_frames.py); every wait is bounded by fail_after and
waits for the event it needs.
"""
from __future__ import annotations

import pytest
import trio
import trio.testing

from gridgate.config import InfluxDBConfig, LimitsConfig, MQTTConfig, PipelineConfig, SinkConfig
from gridgate.connections import ready_loop
from gridgate.protocols.mqtt.session5 import MQTT5Connection
from inprocess import GatedSink, MemorySink, make_config, read_packet, serving, wait_closed
from mqtt5_frames import (
    REASON_STRING,
    connect5,
    disconnect5,
    pingreq5,
    pingresp5,
    prop_str,
    props,
    puback5,
    publish5,
)

pytestmark = pytest.mark.skipif(not ready_loop.AVAILABLE, reason="needs trio's epoll IO manager")


def reason(text: str) -> bytes:
    return props(prop_str(REASON_STRING, text))


async def connect(gateway, nursery, client_id: str) -> trio.SocketStream:
    a, b = trio.socket.socketpair()
    client, server = trio.SocketStream(a), trio.SocketStream(b)
    nursery.start_soon(gateway.handle_mqtt, server)
    await client.send_all(connect5(client_id))
    connack = await read_packet(client)
    assert connack[0] == 0x20 and connack[3] == 0x00           # accepted
    return client


def publish(n: int, qos: int = 1) -> bytes:
    return publish5("telemetry", b'{"n": %d}' % n, qos=qos, mid=n if qos else 0)


def parked(gateway) -> dict[str, MQTT5Connection]:
    """The connections parked in the loop, by client id."""
    conns = [park.conn for park in gateway.services.ready_loop._parked.values()]
    assert all(type(c) is MQTT5Connection for c in conns)
    return {c.client_id: c for c in conns}


def stored(sink: MemorySink) -> list[tuple[str, int]]:
    return sorted((r.device_id, r.fields["n"]) for b in sink.batches for r in b)


async def test_many_v5_devices_are_served_by_the_loop_alone(tmp_path):
    sink = MemorySink()
    async with serving(make_config(tmp_path), sink) as (gateway, nursery):
        loop = gateway.services.ready_loop
        devices = [f"meter-{i}" for i in range(30)]
        clients = [await connect(gateway, nursery, d) for d in devices]
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(parked(gateway)) == sorted(devices)           # every connection parked in the loop
        for n in range(1, 4):
            for c in clients:
                await c.send_all(publish(n))
            for c in clients:
                assert await read_packet(c) == puback5(n)
        await clients[0].send_all(pingreq5())
        assert await read_packet(clients[0]) == pingresp5()
        # the readings (and the ping) never woke a session's task
        assert loop.handed_back == 0 and loop.served >= 91
        for task in nursery.child_tasks:
            coro = task.coro
            while hasattr(coro, "cr_await"):
                coro = coro.cr_await
            assert type(coro) is ready_loop._Park
        assert all(c.inflight == 0 and c.pending == 0 for c in parked(gateway).values())
        # the client's DISCONNECT, read by the loop, closes its own connection only
        await clients[0].send_all(disconnect5())
        await wait_closed(clients[0])
        for c in clients[1:]:
            await c.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 0 and loop.handed_back == 30
    assert stored(sink) == sorted((d, n) for d in devices for n in (1, 2, 3))


async def test_receive_maximum_exceeded_read_by_the_loop_is_disconnect_0x93(tmp_path):
    sink = GatedSink()           # nothing becomes durable: every PUBACK stays owed
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="", receive_maximum=2),
                         sink=SinkConfig(write_timeout_s=86400))
    async with serving(config, sink) as (gateway, nursery):
        loop = gateway.services.ready_loop
        over = await connect(gateway, nursery, "meter-over")
        ok = await connect(gateway, nursery, "meter-ok")
        for n in (1, 2):
            await over.send_all(publish(n))
            await trio.testing.wait_all_tasks_blocked()
        assert parked(gateway)["meter-over"].inflight == 2 and loop.handed_back == 0
        await over.send_all(publish(3))
        assert await read_packet(over) == disconnect5(0x93, reason(
            "more than Receive Maximum 2 publishes unacknowledged"))
        await wait_closed(over)
        assert loop.handed_back == 1
        assert gateway.metrics.registry.get_sample_value(
            "gridgate_protocol_errors_total", {"protocol": "mqtt", "reason": "receive_maximum_exceeded"}) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert list(parked(gateway)) == ["meter-ok"]             # the other one is still served by the loop
        await ok.send_all(publish(1))
        sink.gate.set()
        assert await read_packet(ok) == puback5(1)
        await ok.aclose()


async def test_a_full_queue_hands_back_the_read_and_receive_maximum_counts_its_acks_once(tmp_path):
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="", receive_maximum=1),
                         pipeline=PipelineConfig(queue_max_items=1), sink=SinkConfig(write_timeout_s=86400))
    sink = GatedSink()
    async with serving(config, sink) as (gateway, nursery):
        loop = gateway.services.ready_loop
        devices = ["meter-a", "meter-b", "meter-c"]
        clients = [await connect(gateway, nursery, d) for d in devices]
        for c in clients:
            await c.send_all(publish(1))
            await trio.testing.wait_all_tasks_blocked()
        # a: in the gated write; b: the queue's one item; c: no room, its task waits
        assert sink.waiting == 1 and gateway.pipeline.queued() == 1
        assert [s.device_id for s in gateway.conns if s.paused] == ["meter-c"]
        assert loop.handed_back == 1 and sorted(parked(gateway)) == ["meter-a", "meter-b"]
        sink.gate.set()
        for c in clients:
            assert await read_packet(c) == puback5(1)
        await trio.testing.wait_all_tasks_blocked()
        conns = parked(gateway)
        assert sorted(conns) == devices and not any(s.paused for s in gateway.conns)   # parked again
        # with Receive Maximum 1, a second reading is allowed only if the first was counted once
        assert [conns[d].inflight for d in devices] == [0, 0, 0]
        for c in clients:
            await c.send_all(publish(2))
            assert await read_packet(c) == puback5(2)
        for c in clients:
            await c.aclose()
    assert stored(sink) == sorted((d, n) for d in devices for n in (1, 2))


@pytest.mark.parametrize("where", ["try_submit", "submit"])
async def test_an_item_never_queued_owes_nothing_against_receive_maximum(tmp_path, caplog, where):
    # try_submit raising: undone in the loop's fast path; submit raising: in the task's _finish
    async with serving(make_config(tmp_path), MemorySink()) as (gateway, nursery):
        bad = await connect(gateway, nursery, "meter-bad")
        ok = await connect(gateway, nursery, "meter-ok")
        await trio.testing.wait_all_tasks_blocked()
        conn = parked(gateway)["meter-bad"]
        pipeline = gateway.pipeline
        try_submit, submit = pipeline.try_submit, pipeline.submit

        def bad_item(item) -> bool:
            return bool(item.records) and item.records[0].device_id == "meter-bad"

        def broken_try_submit(item):
            if bad_item(item):
                if where == "try_submit":
                    raise RuntimeError("a bug on meter-bad's path")
                return False            # no room: the task submits with backpressure
            return try_submit(item)

        async def broken_submit(item, session):
            if bad_item(item):
                raise RuntimeError("a bug on meter-bad's path")
            return await submit(item, session)

        pipeline.try_submit = broken_try_submit
        pipeline.submit = broken_submit
        await bad.send_all(publish5("telemetry", b'{"n": 1}', qos=1, mid=1) +
                           publish5("telemetry", b'{"n": 2}', qos=1, mid=2))
        await wait_closed(bad)
        assert conn.inflight == 0 and conn.pending == 0
        await ok.send_all(publish(1))
        assert await read_packet(ok) == puback5(1)
        assert not gateway.services.ready_loop.closed
        await ok.aclose()
    assert "a bug on meter-bad's path" in caplog.text


async def test_over_quota_with_reject_answers_0x97_from_the_loop_and_pauses_only_for_qos_0(
        autojump_clock, start_gateway, nursery):
    # one reading of burst, then one per 10 s
    sink = MemorySink()
    gateway = await start_gateway(sink, limits=LimitsConfig(device_readings_per_s=0.1, device_readings_burst=1,
                                                            mqtt5_on_limit="reject"))
    loop = gateway.services.ready_loop
    client = await connect(gateway, nursery, "meter-1")
    start = trio.current_time()
    await client.send_all(publish(1))
    assert await read_packet(client) == puback5(1)
    await client.send_all(publish(2))
    assert await read_packet(client) == puback5(2, 0x97, reason("quota_exceeded: device"))
    # refused without a pause: nothing went back to the task, no time passed
    assert loop.handed_back == 0 and trio.current_time() == start
    # a QoS 0 reading has no answer to carry a refusal: kept, and its task pauses
    # (the PINGREQ of the same read is answered first, the next one after the pause)
    await client.send_all(publish(3, qos=0) + pingreq5())
    assert await read_packet(client) == pingresp5()
    assert trio.current_time() == start
    await client.send_all(pingreq5())
    assert await read_packet(client) == pingresp5()
    assert loop.handed_back == 1
    assert trio.current_time() - start == pytest.approx(10, abs=0.5)
    await trio.testing.wait_all_tasks_blocked()
    assert list(parked(gateway)) == ["meter-1"]                  # parked again
    assert [r.fields["n"] for b in sink.batches for r in b] == [1, 3]


async def test_over_quota_with_pause_waits_in_its_own_task_as_3_1_1_does(autojump_clock, start_gateway, nursery):
    # the figures of the 3.1.1 test (test_mqtt_ready_loop.py): 10 of burst, then 10/s
    sink = MemorySink()
    gateway = await start_gateway(sink, limits=LimitsConfig(device_readings_per_s=10, device_readings_burst=10))
    client = await connect(gateway, nursery, "meter-1")
    other = await connect(gateway, nursery, "meter-2")
    start = trio.current_time()
    times = []
    for n in range(1, 31):
        await client.send_all(publish(n))
        assert await read_packet(client) == puback5(n)
        times.append(trio.current_time())
    assert times[9] == start
    assert times[-1] - start == pytest.approx(1.9)
    await other.send_all(publish(1))
    assert await read_packet(other) == puback5(1)
    assert gateway.services.ready_loop.handed_back >= 30
    assert len(stored(sink)) == 31


async def test_takeover_and_graceful_stop_of_parked_v5_connections_send_their_disconnect(tmp_path):
    async with serving(make_config(tmp_path), MemorySink()) as (gateway, nursery):
        loop = gateway.services.ready_loop
        first = await connect(gateway, nursery, "meter-1")
        other = await connect(gateway, nursery, "meter-2")
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 2
        second = await connect(gateway, nursery, "meter-1")
        assert await read_packet(first) == disconnect5(0x8E)         # session taken over
        await wait_closed(first)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(parked(gateway)) == ["meter-1", "meter-2"]
        gateway.stop()
        for c in (second, other):
            assert await read_packet(c) == disconnect5(0x8B)         # server shutting down
            await wait_closed(c)


async def test_a_reading_the_sink_refuses_gets_0x83_on_the_loop(tmp_path, influx):
    refused = ('sink_refused: influxdb: record 0 of the batch cannot be written to InfluxDB: '
               'field key "time" is reserved by InfluxDB')
    config = make_config(tmp_path, sink=SinkConfig(kind="influxdb"), influxdb=InfluxDBConfig(url=influx.url))
    async with serving(config, timeout=60) as (gateway, nursery):
        loop = gateway.services.ready_loop
        client = await connect(gateway, nursery, "meter-1")
        await client.send_all(publish5("telemetry", b'{"time": 5, "n": 1}', qos=1, mid=1))
        assert await read_packet(client) == puback5(1, 0x83, reason(refused))
        await client.send_all(publish5("telemetry", b'{"n": 2}', qos=1, mid=2))
        assert await read_packet(client) == puback5(2)
        assert loop.handed_back == 0 and list(parked(gateway)) == ["meter-1"]
        assert parked(gateway)["meter-1"].inflight == 0
        await client.aclose()
    assert sorted(r["n"] for r in influx.rows("SELECT n FROM telemetry", db="telemetry")) == [2]
