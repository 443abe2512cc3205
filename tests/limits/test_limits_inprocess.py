"""Flow control in an embedded gateway under the autojump clock (in-memory
streams and a custom sink: no real I/O, so every time is exact)."""
from __future__ import annotations

import json

import trio
import trio.testing

from gridgate.config import HTTPConfig, LimitRule, LimitsConfig, MQTTConfig
from inprocess import MemorySink, connect_memory, post, read_exactly, read_response
from mqtt_frames import gen_connack, gen_connect, gen_puback, gen_publish


def reading(device: str, n: int, location: str = "shanghai/plant-1") -> bytes:
    return json.dumps({"device_id": device, "timestamp_ms": 1_700_000_000_000 + n, "temperature": 20.0,
                       "location": location}).encode()


async def send_one_at_a_time(client, device: str, count: int, location: str = "shanghai/plant-1") -> list[float]:
    """QoS 1, each publish after the previous one's PUBACK: the ack times."""
    times = []
    for n in range(1, count + 1):
        await client.send_all(gen_publish(f"devices/{device}/telemetry", qos=1, payload=reading(device, n, location),
                                          mid=n))
        assert await read_exactly(client, 4) == gen_puback(n)
        times.append(trio.current_time())
    return times


def stored(sink: MemorySink) -> int:
    return sum(len(b) for b in sink.batches)


async def test_an_mqtt_device_over_its_quota_is_held_to_it_and_loses_nothing(autojump_clock, start_gateway,
                                                                              nursery):
    sink = MemorySink()
    gateway = await start_gateway(sink, limits=LimitsConfig(device_readings_per_s=10, device_readings_burst=10))
    client = await connect_memory(gateway, nursery, "meter-1")
    start = trio.current_time()
    times = await send_one_at_a_time(client, "meter-1", 60)
    # the burst at once, then the quota: 50 more readings at 10/s
    assert times[9] == start
    assert times[-1] - start == 4.9        # the 60th is acked, then its own pause begins
    assert stored(sink) == 60
    metrics = gateway.metrics.registry
    assert metrics.get_sample_value("gridgate_readings_limited_total", {"limit": "_device", "protocol": "mqtt"}) == 50
    assert len(gateway.conns) == 1 and gateway.conns.reaped == 0


async def test_a_paused_device_is_not_reaped_as_silent(autojump_clock, start_gateway, nursery):
    sink = MemorySink()
    from gridgate.config import ConnectionsConfig
    gateway = await start_gateway(sink, limits=LimitsConfig(device_readings_per_s=0.01, device_readings_burst=1),
                                  connections=ConnectionsConfig(idle_timeout_s=60, reap_interval_s=10))
    client = await connect_memory(gateway, nursery, "meter-1")
    await client.send_all(b"".join(gen_publish("devices/meter-1/telemetry", qos=1, payload=reading("meter-1", n),
                                               mid=n) for n in (1, 2, 3)))
    assert await read_exactly(client, 12) == gen_puback(1) + gen_puback(2) + gen_puback(3)
    await trio.sleep(150)                  # the reader waits 200 s for its quota: paused, not silent
    assert len(gateway.conns) == 1 and gateway.conns.reaped == 0
    assert stored(sink) == 3


async def test_a_rule_for_one_region_slows_only_that_region(autojump_clock, start_gateway, nursery):
    sink = MemorySink()
    rule = LimitRule(name="shanghai-mqtt", protocol="mqtt", region="shanghai", readings_per_s=5, burst=5)
    gateway = await start_gateway(sink, limits=LimitsConfig(rule=[rule]))
    shanghai = [await connect_memory(gateway, nursery, f"sh-{i}") for i in range(2)]
    beijing = await connect_memory(gateway, nursery, "bj-1")
    start = trio.current_time()
    done: dict[str, float] = {}

    async def device(client, name, location):
        times = await send_one_at_a_time(client, name, 10, location)
        done[name] = times[-1] - start

    async with trio.open_nursery() as inner:
        for i, client in enumerate(shanghai):
            inner.start_soon(device, client, f"sh-{i}", "shanghai/plant-1")
        inner.start_soon(device, beijing, "bj-1", "beijing/plant-9")
    assert done["bj-1"] == 0.0                           # not the rule's business
    # 20 shanghai readings share one bucket of 5/s with a burst of 5: beyond
    # the burst they come at the rate, less at most one reading per device
    # taken while the other waited out the debt: (20 - 5 - 2) / 5 s at least
    assert (20 - 5 - 2) / 5 <= max(done["sh-0"], done["sh-1"]) <= (20 - 5) / 5
    assert stored(sink) == 30


async def test_http_over_quota_gets_429_with_retry_after_and_nothing_is_stored(autojump_clock, start_gateway):
    sink = MemorySink()
    gateway = await start_gateway(sink, http=HTTPConfig(listen=""),
                                  limits=LimitsConfig(device_readings_per_s=1, device_readings_burst=2))
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_http, server)
        buf = bytearray()
        answers = []
        for n in range(3):
            await client.send_all(post(reading("meter-1", n)))
            answers.append(await read_response(client, buf))
        assert [a[0] for a in answers] == [202, 202, 429]
        status, headers, body = answers[2]
        assert headers["retry-after"] == "1"
        assert json.loads(body) == {"error": "rate_limited", "detail": "over the limit '_device'; retry later"}
        await trio.sleep(1)
        await client.send_all(post(reading("meter-1", 9)))
        assert (await read_response(client, buf))[0] == 202
        nursery.cancel_scope.cancel()
    assert stored(sink) == 3
    assert gateway.metrics.registry.get_sample_value("gridgate_http_429_total", {"limit": "_device"}) == 1


async def test_a_client_id_reconnecting_16_times_in_a_minute_is_banned_until_lifted(autojump_clock, start_gateway,
                                                                                     nursery):
    gateway = await start_gateway(MemorySink(), limits=LimitsConfig(flapping_max_connects=15))
    for _ in range(15):
        client = await connect_memory(gateway, nursery, "meter-1")
        await client.aclose()
        await trio.sleep(2)
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    await client.send_all(gen_connect("meter-1"))
    assert await read_exactly(client, 4) == gen_connack(5)         # not authorized: banned
    assert await client.receive_some(10) == b""
    await connect_memory(gateway, nursery, "meter-2")                # others still connect
    # an operator lifts it (no credential store, loopback: the admin API is open)
    http, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_http, server)
    buf = bytearray()
    await http.send_all(b"GET /v1/bans HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, _, body = await read_response(http, buf)
    assert status == 200
    assert json.loads(body) == {"bans": [{"kind": "client_id", "key": "meter-1", "reason": "flapping",
                                          "expires_in_s": 300.0}]}
    await http.send_all(b"DELETE /v1/bans/client_id/meter-1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (await read_response(http, buf))[0] == 200
    await http.send_all(b"DELETE /v1/bans/client_id/meter-1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (await read_response(http, buf))[0] == 404
    await connect_memory(gateway, nursery, "meter-1")


class SlowSink(MemorySink):
    """A sink whose writes take ``delay`` seconds (of the mock clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.delay = 2.0

    async def write(self, batch):
        await trio.sleep(self.delay)
        await super().write(batch)


async def test_a_slow_sink_past_the_threshold_sheds_new_connections_until_it_recovers(autojump_clock,
                                                                                       start_gateway, nursery):
    sink = SlowSink()
    gateway = await start_gateway(sink, limits=LimitsConfig(shed_commit_latency_ms=800),
                                  mqtt=MQTTConfig(listen=""))
    client = await connect_memory(gateway, nursery, "meter-1")
    await send_one_at_a_time(client, "meter-1", 2)                  # two commits of 2 s: p99 2.5 s bucket
    refused, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    assert await read_exactly(refused, 4) == gen_connack(3)         # server unavailable
    sink.delay = 0.01
    await send_one_at_a_time(client, "meter-1", 3)                  # connected devices go on
    await trio.sleep(12)                                           # the slow commits leave the window
    await send_one_at_a_time(client, "meter-1", 1)
    await connect_memory(gateway, nursery, "meter-2")
    assert gateway.metrics.registry.get_sample_value("gridgate_connections_shed_total", {"protocol": "mqtt"}) == 1
    assert stored(sink) == 6
