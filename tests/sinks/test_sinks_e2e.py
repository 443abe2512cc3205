"""The external sinks end to end, with the real servers started here (influxd,
nats-server -js) and MQTT QoS 1 devices over TCP: every acknowledged reading
reaches the sink, and what the sink was *sent* is counted, not only what it
stores. Both stores hide a duplicate write (InfluxDB overwrites a point with
the same series and timestamp, JetStream drops a ``Nats-Msg-Id`` it has seen
within its duplicate window), so a count of stored points cannot show
"exactly once":

* InfluxDB: ``gridgate serve --sink influxdb`` (a child process, so it can be
  SIGKILLed) writes through a recording proxy (``influx_recorder``) that
  keeps every ``/write`` body and whether the sink was answered 204.
* NATS: the gateway runs in the test's own Trio run (``gridgate.serve`` with
  ``[sink] kind = "nats"``), so JetStream's own accounting can be read off the
  sink: ``published`` counts the records of successful writes, as JetStream
  acknowledged them, and ``duplicates`` those JetStream acknowledged as
  duplicates of a stored message.

The duplicates the design allows (src/gridgate/sinks/forwarding.py): none
while the sink works; after a failed write the whole batch is kept pending
and replayed, so a record may be sent again after a failure, as the very
same line / msg-id. A record the sink acknowledged is not sent again (the
design's exceptions, not staged here: a gateway crash between a replayed
write and the deletion of its pending rows, and the earlier chunks of an
InfluxDB write over ``max_lines`` whose later chunk failed).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio
from influx_recorder import RecordingInfluxProxy, point_key, sends_by_point
from jetstream_reader import stream_info, stream_messages

import gridgate
from gatewayproc import GatewayProcess, gridgate_env, spool_stats
from gridgate.config import MQTTConfig, NATSConfig, SinkConfig
from gridgate.gateway import Gateway
from gridgate.sinks.forwarding import BreakerState
from gridgate.sinks.nats import msg_id
from influxproc import InfluxProcess
from inprocess import make_config, read_exactly
from mqtt_frames import gen_connack, gen_connect, gen_disconnect, gen_puback, gen_publish
from natsproc import NatsCluster, NatsServer

needs_influxd = pytest.mark.usefixtures("influxd_binary")
needs_nats = pytest.mark.usefixtures("nats_server_binary")
TS0 = 1_764_000_000_000          # ms; explicit device timestamps, as meters send them


# -- MQTT devices ------------------------------------------------------------------------


def reading(i: int) -> bytes:
    """A device's reading number ``i``."""
    return b'{"temperature": %d, "location": "sh/fa", "timestamp_ms": %d}' % (20 + i % 10, TS0 + i)


class Device:
    """One MQTT device over TCP publishing its readings 0, 1, 2, ... at QoS 1."""

    def __init__(self, name: str, stream: trio.SocketStream) -> None:
        self.name = name
        self.stream = stream
        self.sent = 0

    @classmethod
    async def connect(cls, address: tuple[str, int], name: str) -> Device:
        stream = await trio.open_tcp_stream(*address)
        await stream.send_all(gen_connect(name, keepalive=60))
        assert await read_exactly(stream, 4) == gen_connack(0)
        return cls(name, stream)

    async def publish(self, count: int, window: int = 50) -> int:
        """Publish the next ``count`` readings, at most ``window`` unacknowledged;
        return how many PUBACKs came, each for a packet id in flight."""
        end = self.sent + count
        unacked: set[int] = set()
        acked = 0
        buf = b""
        while acked < count:
            burst = []
            while self.sent < end and len(unacked) < window:
                mid = self.sent % 65535 + 1
                burst.append(gen_publish("telemetry", qos=1, mid=mid, payload=reading(self.sent)))
                unacked.add(mid)
                self.sent += 1
            if burst:
                await self.stream.send_all(b"".join(burst))
            data = await self.stream.receive_some(65536)
            assert data != b""                      # the gateway closed the connection
            buf += data
            while len(buf) >= 4:
                mid = int.from_bytes(buf[2:4], "big")
                assert (buf[:4], mid in unacked) == (gen_puback(mid), True)
                unacked.discard(mid)
                acked += 1
                buf = buf[4:]
        return acked


class Fleet:
    """Devices publishing in phases: every device publishes ``counts[k]``
    readings once ``go[k]`` is set (``go[0]`` is); ``done[k]`` is set once
    every device has all of phase ``k`` acknowledged. ``acked`` per device."""

    def __init__(self, address: tuple[str, int], names: list[str], counts: list[int]) -> None:
        self.address = address
        self.names = names
        self.counts = counts
        self.acked = dict.fromkeys(names, 0)
        self.go = [trio.Event() for _ in counts]
        self.done = [trio.Event() for _ in counts]
        self.go[0].set()
        self._left = [len(names)] * len(counts)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for name in self.names:
                nursery.start_soon(self._device, name)

    async def _device(self, name: str) -> None:
        device = await Device.connect(self.address, name)
        try:
            for k, count in enumerate(self.counts):
                await self.go[k].wait()
                self.acked[name] += await device.publish(count)
                self._left[k] -= 1
                if self._left[k] == 0:
                    self.done[k].set()
            await device.stream.send_all(gen_disconnect())
        finally:
            await trio.aclose_forcefully(device.stream)


def readings_of(names: list[str], count: int) -> set[tuple[str, int]]:
    """(device id, device time in ns) of the first ``count`` readings of each device."""
    return {(name, (TS0 + i) * 1_000_000) for name in names for i in range(count)}


async def publish_all(address: tuple[str, int], names: list[str], count: int) -> dict[str, int]:
    fleet = Fleet(address, names, [count])
    with trio.fail_after(120):                   # a hang guard; a reading takes well under a millisecond
        await fleet.run()
    return fleet.acked


# -- InfluxDB: gridgate serve --sink influxdb, through the recording proxy ------------------


@pytest.fixture
def influx(tmp_path):
    proc = InfluxProcess(tmp_path / "influx")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def proxy(influx, nursery) -> RecordingInfluxProxy:
    return await nursery.start(RecordingInfluxProxy(influx.url).run)


@asynccontextmanager
async def influx_gateway(data_dir, proxy: RecordingInfluxProxy) -> AsyncIterator[GatewayProcess]:
    """``gridgate serve --sink influxdb`` writing through ``proxy``; SIGKILLed
    on the way out if the test did not stop it (a failed assertion)."""
    env = gridgate_env(GRIDGATE_INFLUXDB_URL=proxy.url, GRIDGATE_SINK_OPEN_S="0.5")
    # started on a thread: it waits for the listening line while this Trio
    # run keeps serving the proxy (the gateway creates its database through it)
    gw = await trio.to_thread.run_sync(partial(GatewayProcess, data_dir, "--sink", "influxdb", env=env))
    try:
        yield gw
    finally:
        gw.kill()


async def readyz(gw: GatewayProcess) -> dict:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        return (await client.get(f"http://{gw.http[0]}:{gw.http[1]}/readyz")).json()   # 200 or 503: JSON


async def wait_drained(gw: GatewayProcess, timeout: float = 60) -> dict:
    """Until nothing is pending and the breaker is closed: a bounded poll of /readyz."""
    with trio.fail_after(timeout):
        for _ in range(int(timeout / 0.05)):
            status = (await readyz(gw))["sink"]
            if status["pending"] == 0 and status["breaker"] == "closed":
                return status
            await trio.sleep(0.05)
    raise AssertionError(f"still pending after {timeout}s: {status}")


def influx_count(influx: InfluxProcess) -> int:
    rows = influx.rows("SELECT count(temperature_mc) FROM telemetry", db="telemetry")
    return rows[0]["count"] if rows else 0


def expected_lines(names: list[str], count: int) -> dict[tuple[bytes, int], bytes]:
    """The first ``count`` readings of each device as lines, built here (not by the encoder)."""
    lines = {}
    for name in names:
        for i in range(count):
            line = b"telemetry,device_id=%s,region=sh,site=fa temperature_mc=%di %d" % (
                name.encode(), (20 + i % 10) * 1000, (TS0 + i) * 1_000_000)
            lines[point_key(line)] = line
    return lines


def check_sends(proxy: RecordingInfluxProxy, expected: dict[tuple[bytes, int], bytes]) -> set[tuple[bytes, int]]:
    """What the sink sent is what the design allows; returns the points sent more than once.

    Each expected point, and nothing else, was sent; its last send was
    answered 204 and is the only one that was; every earlier send of it
    failed (the sink was not answered 204) and carried the very same line.
    So a point is never sent again once acknowledged, and is re-sent only
    after a failure. (Exact for batches of at most ``[influxdb] max_lines``
    records, one request per write, as here: 1000 <= 5000.)
    """
    assert [w.index for w in proxy.writes if not w.done] == []          # nothing in flight
    sends = sends_by_point(proxy.writes)
    assert sorted(sends.keys() - expected.keys())[:5] == []             # nothing foreign was sent
    assert sorted(expected.keys() - sends.keys())[:5] == []             # nothing acknowledged is missing
    wrong = []
    for key, history in sends.items():
        *earlier, (last, line) = history
        if not last.ok or line != expected[key] or any(w.ok or sent != line for w, sent in earlier):
            wrong.append((key, [(w.index, w.answered, sent) for w, sent in history]))
    assert wrong[:5] == []
    return {key for key, history in sends.items() if len(history) > 1}


@needs_influxd
async def test_10000_readings_are_each_sent_to_influxdb_once(tmp_path, influx, proxy):
    names = [f"meter-{i:03d}" for i in range(10)]
    async with influx_gateway(tmp_path / "data", proxy) as gw:
        acked = await publish_all(gw.mqtt, names, 1000)
        assert acked == dict.fromkeys(names, 1000)
        assert (await wait_drained(gw))["kind"] == "influxdb"
        assert await trio.to_thread.run_sync(gw.stop) == 0
    assert proxy.failed_writes() == []
    assert check_sends(proxy, expected_lines(names, 1000)) == set()   # none sent twice
    assert await trio.to_thread.run_sync(influx_count, influx) == 10_000
    (row,) = await trio.to_thread.run_sync(
        influx.rows, "SELECT * FROM telemetry WHERE device_id = 'meter-003' LIMIT 1", "telemetry")
    assert (row["temperature_mc"], row["region"], row["site"], row["time"]) == (20000, "sh", "fa", TS0 * 1_000_000)
    stats = await trio.to_thread.run_sync(spool_stats, gw.data_dir)
    assert (stats["records"], stats["pending"]) == (0, 0)      # the spool kept nothing but was ready to


@needs_influxd
async def test_influxdb_outage_and_a_lost_answer_lose_nothing_and_resend_only_after_failures(tmp_path, influx, proxy):
    names = [f"meter-{i:03d}" for i in range(4)]
    async with influx_gateway(tmp_path / "data", proxy) as gw:
        fleet = Fleet(gw.mqtt, names, [500, 500, 500])
        with trio.fail_after(120):                # a hang guard over the whole exchange
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fleet.run)
                await fleet.done[0].wait()
                # the sink up: each acknowledged reading was sent once, answered 204
                assert proxy.failed_writes() == []
                assert sum(len(w.lines) for w in proxy.writes) == 2000

                await trio.to_thread.run_sync(influx.kill)          # SIGKILL
                fleet.go[1].set()
                await fleet.done[1].wait()                          # acknowledged from the spool
                assert proxy.failed_writes() != []                  # the sink was tried, and failed
                assert (await readyz(gw))["sink"]["pending"] == 2000     # all of the outage's readings

                # influxd back; the first write it stores loses its answer on the
                # way back, so the sink must count as failed a write that landed
                proxy.drop_answers(1)
                await trio.to_thread.run_sync(influx.restart)
                fleet.go[2].set()
        assert fleet.acked == dict.fromkeys(names, 1500)
        await wait_drained(gw)
        replayed = await trio.to_thread.run_sync(gw.metric, 'gridgate_replayed_records_total{sink="influxdb"}')
        assert await trio.to_thread.run_sync(gw.stop) == 0
    resent = check_sends(proxy, expected_lines(names, 1500))
    (lost,) = [w for w in proxy.writes if w.landed and not w.ok]     # the injected failure
    assert {point_key(line) for line in lost.lines} <= resent          # re-sent, after it
    assert replayed >= 2000                    # every reading of the outage went pending
    assert await trio.to_thread.run_sync(influx_count, influx) == 6000


@needs_influxd
async def test_gateway_killed_with_pending_records_replays_them_after_restart(tmp_path, influx, proxy):
    await trio.to_thread.run_sync(influx.kill)            # the sink is down from the start
    names = ["meter-000", "meter-001"]
    async with influx_gateway(tmp_path / "data", proxy) as gw:
        # acknowledged from the spool's pending table
        assert await publish_all(gw.mqtt, names, 500) == dict.fromkeys(names, 500)
        assert (await readyz(gw))["sink"]["pending"] == 1000
        await trio.to_thread.run_sync(gw.kill)            # SIGKILL with everything pending
    assert (await trio.to_thread.run_sync(spool_stats, gw.data_dir))["pending"] == 1000
    assert [w.index for w in proxy.writes if w.ok] == []  # nothing reached InfluxDB before the crash
    await trio.to_thread.run_sync(influx.restart)
    async with influx_gateway(tmp_path / "data", proxy) as gw2:
        await wait_drained(gw2)
        assert await trio.to_thread.run_sync(gw2.stop) == 0
    # no write had failed before (the sink never opened): each point sent once
    assert check_sends(proxy, expected_lines(names, 500)) == set()
    assert await trio.to_thread.run_sync(influx_count, influx) == 1000
    assert (await trio.to_thread.run_sync(spool_stats, gw.data_dir))["pending"] == 0


# -- NATS JetStream: gridgate.serve in process, JetStream's acknowledgements counted --------


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def nats_cluster(tmp_path):
    cluster = NatsCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


async def nats_gateway(nursery, tmp_path, urls: list[str], *, replicas: int = 1,
                       write_timeout_s: float = 5.0) -> Gateway:
    """A gateway with the NATS sink in the test's nursery; the breaker opens
    at the first failed write. (The ``start_gateway`` fixture cannot take a
    ``[sink]`` section: its ``sink`` argument is the custom sink.)"""
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="127.0.0.1:0"),
                         sink=SinkConfig(kind="nats", open_s=0.5, write_timeout_s=write_timeout_s,
                                         failure_threshold=1),
                         nats=NATSConfig(servers=urls, replicas=replicas))
    return await nursery.start(gridgate.serve, config)


async def wait_gateway_drained(gateway: Gateway, timeout: float = 60) -> None:
    """Until nothing is pending and the breaker is closed: a bounded poll."""
    forwarder = gateway.forwarder
    with trio.fail_after(timeout):
        for _ in range(int(timeout / 0.05)):
            if forwarder.pending == 0 and forwarder.breaker.state == BreakerState.CLOSED:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"{forwarder.pending} records still pending after {timeout}s")


async def check_stream(urls: list[str], expected: set[tuple[str, int]]) -> None:
    """The stream holds each expected reading once, under its own msg-id, and nothing else."""
    messages = await trio.to_thread.run_sync(stream_messages, urls)
    ids = [mid for _, mid, _ in messages]
    assert len(ids) == len(set(ids))                                   # no msg-id stored twice
    assert {(r.device_id, r.ts_ns) for _, _, r in messages} == expected
    assert len(messages) == len(expected)
    assert [mid for _, mid, r in messages if mid != msg_id(r)] == []


@needs_nats
async def test_jetstream_acknowledges_each_reading_once_through_an_outage(nats_server, nursery, tmp_path):
    gateway = await nats_gateway(nursery, tmp_path, [nats_server.url])
    first = [f"meter-{i:03d}" for i in range(10)]
    assert await publish_all(gateway.addresses["mqtt"], first, 1000) == dict.fromkeys(first, 1000)
    await wait_gateway_drained(gateway)
    sink = gateway.forwarder.sink
    # all up: JetStream acknowledged each reading once, none as a duplicate
    assert (sink.published, sink.duplicates) == (10_000, 0)
    await check_stream([nats_server.url], readings_of(first, 1000))

    fleet = Fleet(gateway.addresses["mqtt"], [f"late-{i}" for i in range(4)], [250, 250])
    with trio.fail_after(120):                    # a hang guard over the whole exchange
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet.run)
            await fleet.done[0].wait()
            assert (sink.published, sink.duplicates) == (11_000, 0)    # still none sent twice
            await trio.to_thread.run_sync(nats_server.kill)            # SIGKILL
            fleet.go[1].set()
            await fleet.done[1].wait()
            # acknowledged from the spool: the whole outage's readings, pending
            assert gateway.forwarder.pending == 1000
            await trio.to_thread.run_sync(nats_server.restart)
        await wait_gateway_drained(gateway)
    assert fleet.acked == dict.fromkeys(fleet.names, 500)
    assert gateway.forwarder.replayed == 1000
    # Every reading is in exactly one acknowledged write: one more would show
    # here though JetStream would drop it from the stream. JetStream called
    # duplicates only replayed records (what the failed writes had stored).
    assert sink.published == 12_000
    assert sink.duplicates <= gateway.forwarder.replayed
    await check_stream([nats_server.url], readings_of(first, 1000) | readings_of(fleet.names, 500))


@needs_nats
async def test_three_node_jetstream_cluster_survives_a_node_kill(nats_cluster, nursery, tmp_path):
    gateway = await nats_gateway(nursery, tmp_path, nats_cluster.urls, replicas=3, write_timeout_s=15)
    fleet = Fleet(gateway.addresses["mqtt"], [f"meter-{i:03d}" for i in range(4)], [375, 375])
    with trio.fail_after(120):                    # a hang guard over the whole exchange
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet.run)
            await fleet.done[0].wait()
            sink = gateway.forwarder.sink
            assert (sink.published, sink.duplicates) == (1500, 0)
            # the worst node to lose: the stream's leader, through which its writes go
            info = await trio.to_thread.run_sync(stream_info, nats_cluster.urls)
            await trio.to_thread.run_sync(nats_cluster.kill, info.cluster.leader)
            fleet.go[1].set()                     # the devices go on while the stream elects a leader
            await fleet.done[1].wait()
        await wait_gateway_drained(gateway, timeout=90)
    assert fleet.acked == dict.fromkeys(fleet.names, 750)
    # Each reading in exactly one acknowledged write. Duplicates are allowed
    # after the kill (a publish retried after an ack timeout, or replayed).
    assert sink.published == 3000
    live = [n.url for n in nats_cluster.nodes if n.running()]
    await check_stream(live, readings_of(fleet.names, 750))          # no acknowledged reading missing, none twice
