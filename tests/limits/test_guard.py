"""FlowGuard under the autojump clock: a paused reader sleeps exactly the
wait its buckets ask for, marked paused; refusals and bans are counted."""
from __future__ import annotations

import trio

from gridgate.config import LimitRule, LimitsConfig
from gridgate.ingest.records import Record
from gridgate.limits.guard import FlowGuard
from gridgate.observability.metrics import Metrics


class FakeSession:
    """Only the attribute the reaper reads (connections.manager.Session.paused)."""
    paused = False


def reading(device="m-1", region="shanghai", vendor=None):
    tags = {"region": region} | ({"vendor": vendor} if vendor else {})
    return Record(device_id=device, ts_ns=1, received_ns=1, protocol="mqtt", fields={"t": 1}, tags=tags)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_reader_over_its_quota_is_held_to_the_rate(autojump_clock):
    metrics = Metrics()
    guard = FlowGuard(LimitsConfig(device_readings_per_s=10, device_readings_burst=10), metrics)
    session = FakeSession()
    start = trio.current_time()
    for _ in range(60):                               # 60 reads of 1 reading, as fast as allowed
        await guard.pause(session, [reading()], "mqtt", "m-1", 100)
    # 10 from the burst, then 50 at 10/s
    assert trio.current_time() - start == 5.0
    assert session.paused is False
    assert value(metrics, "gridgate_readings_limited_total", limit="_device", protocol="mqtt") == 50
    assert value(metrics, "gridgate_limit_paused_seconds_total", limit="_device") == 5.0


async def test_the_session_is_paused_while_it_waits(autojump_clock):
    guard = FlowGuard(LimitsConfig(device_readings_per_s=1, device_readings_burst=1), Metrics())
    session = FakeSession()
    seen = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guard.pause, session, [reading()] * 4, "mqtt", "m-1", 0)   # 3 in debt: 3 s
        await trio.sleep(1)
        seen.append(session.paused)
    assert seen == [True] and session.paused is False and trio.current_time() == 3.0


async def test_vendor_comes_from_device_configs_before_the_tag(autojump_clock):
    rule = LimitRule(name="huawei", vendor="huawei", readings_per_s=1, burst=1)
    metrics = Metrics()
    guard = FlowGuard(LimitsConfig(rule=[rule]), metrics, device_configs={"m-1": {"vendor": "huawei"}})
    assert guard.admit([reading("m-1", vendor="abb")], "http", None, 0).wait == 0.0
    refused = guard.admit([reading("m-1", vendor="abb")], "http", None, 0)
    assert refused.name == "huawei" and refused.wait == 1.0
    assert guard.admit([reading("m-2", vendor="abb")] * 5, "http", None, 0).wait == 0.0
    assert value(metrics, "gridgate_http_429_total", limit="huawei") == 1


async def test_flapping_client_id_is_banned_and_counted(autojump_clock):
    metrics = Metrics()
    guard = FlowGuard(LimitsConfig(flapping_max_connects=15), metrics)
    results = []
    for _ in range(17):
        results.append(guard.on_connect("m-1", "mqtt"))
        await trio.sleep(1)
    assert results[:15] == [None] * 15 and results[15] is not None and results[16] == results[15]
    assert value(metrics, "gridgate_bans_total", reason="flapping") == 1
    assert value(metrics, "gridgate_banned_connects_total", protocol="mqtt", reason="flapping") == 2
    assert guard.bans.lift("client_id", "m-1")
    assert guard.on_connect("m-1", "mqtt") is None


async def test_connections_per_address(autojump_clock):
    metrics = Metrics()
    guard = FlowGuard(LimitsConfig(max_connections_per_ip=20), metrics)
    assert all(guard.acquire_address("10.0.0.1", "mqtt") for _ in range(20))
    assert not guard.acquire_address("10.0.0.1", "mqtt")          # the 21st
    assert guard.acquire_address("10.0.0.2", "mqtt")              # another address connects
    guard.release_address("10.0.0.1")
    assert guard.acquire_address("10.0.0.1", "http")
    assert value(metrics, "gridgate_connections_over_ip_limit_total", protocol="mqtt") == 1
    for _ in range(30):
        guard.release_address("10.0.0.1")
    assert guard._per_address == {"10.0.0.2": 1}


async def test_shedding_while_the_commit_p99_is_high_then_recovering(autojump_clock):
    metrics = Metrics()
    guard = FlowGuard(LimitsConfig(shed_commit_latency_ms=800), metrics)
    for _ in range(100):
        guard.record_commit(0.01)
    assert not guard.shedding("mqtt")
    for _ in range(5):
        guard.record_commit(2.0)
    assert guard.shedding("mqtt")
    await trio.sleep(12)
    guard.record_commit(0.01)
    assert not guard.shedding("mqtt")
    assert value(metrics, "gridgate_connections_shed_total", protocol="mqtt") == 1


async def test_reload_applies_new_limits(autojump_clock):
    guard = FlowGuard(LimitsConfig(), Metrics())
    assert not guard.readings_limited
    guard.reload(LimitsConfig(device_readings_per_s=5, shed_commit_latency_ms=100, flapping_max_connects=2))
    assert guard.readings_limited and guard.latency.enabled and guard.flaps.max_connects == 2
