"""``gridgate serve --sink influxdb|nats`` end to end, with the real servers
started here (influxd, nats-server -js) and MQTT QoS 1 publishers: every
acknowledged reading ends in the sink exactly once, through sink outages
(SIGKILL + restart), a SIGKILLed gateway with pending records, and a
three-node JetStream cluster losing a node."""
from __future__ import annotations

import json
import shutil
import threading
import urllib.request

import pytest
import trio

from gatewayproc import GatewayProcess, gridgate_env, spool_stats
from mqtt_frames import gen_connect, gen_publish

needs_influxd = pytest.mark.skipif(shutil.which("influxd") is None, reason="influxd is not installed (Debian influxdb)")
needs_nats = pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")
TS0 = 1_764_000_000_000          # ms; explicit device timestamps, as meters send them


async def publish(host: str, port: int, device: str, count: int, *, window: int = 50, start: int = 0,
                  pause_every: int = 0, pause_s: float = 0.0) -> int:
    """Publish ``count`` QoS 1 readings as ``device``; returns how many were PUBACKed."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(gen_connect(device, keepalive=60))
        buf = b""
        while len(buf) < 4:
            buf += await stream.receive_some(4 - len(buf))
        assert buf == b"\x20\x02\x00\x00", buf
        acked = 0
        sent = 0
        buf = b""
        while acked < count:
            burst = []
            while sent < count and sent - acked < window:
                i = start + sent
                body = json.dumps({"temperature": 20 + i % 10, "location": "sh/fa", "timestamp_ms": TS0 + i})
                burst.append(gen_publish("telemetry", qos=1, mid=i % 65535 + 1, payload=body.encode()))
                sent += 1
                if pause_every and sent % pause_every == 0:
                    break
            if burst:
                await stream.send_all(b"".join(burst))
            data = await stream.receive_some(65536)
            assert data, "gateway closed the connection"
            buf += data
            n = len(buf) // 4
            acked += n
            buf = buf[n * 4:]
            if pause_every and sent % pause_every == 0 and sent < count:
                await trio.sleep(pause_s)
        await stream.send_all(b"\xe0\x00")
    return acked


def publish_all(gw: GatewayProcess, devices: int, per_device: int, **kw) -> int:
    async def main():
        total = 0

        async def one(i):
            nonlocal total
            n = await publish(*gw.mqtt, f"meter-{i:03d}", per_device, **kw)
            total += n

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(devices):
                    nursery.start_soon(one, i)
        return total
    return trio.run(main)


class PacedPublisher:
    """``publish_all`` on a thread, 100 readings per device then 50 ms, so
    that a server the test kills goes down mid-stream."""

    def __init__(self, gw: GatewayProcess, devices: int, per_device: int, start: int = 0) -> None:
        self.acked: int | None = None

        def run() -> None:
            self.acked = publish_all(gw, devices, per_device, start=start, window=20, pause_every=100, pause_s=0.05)

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def join(self) -> int | None:
        """How many readings were PUBACKed (None if the publisher failed)."""
        self._thread.join(timeout=120)
        assert not self._thread.is_alive()
        return self.acked


def readyz(gw: GatewayProcess) -> dict:
    try:
        with urllib.request.urlopen(f"http://{gw.http[0]}:{gw.http[1]}/readyz", timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


def poll(predicate, timeout: float, what: str):
    """Until ``predicate()`` is truthy: a bounded poll of real servers' state."""
    tick = threading.Event()
    for _ in range(int(timeout / 0.05)):
        value = predicate()
        if value:
            return value
        tick.wait(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def wait_drained(gw: GatewayProcess, timeout: float = 60) -> dict:
    """Until nothing is pending and the breaker is closed."""
    def drained():
        status = readyz(gw)["sink"]
        return status if status["pending"] == 0 and status["breaker"] == "closed" else None
    return poll(drained, timeout, "draining the pending records")


# -- InfluxDB ----------------------------------------------------------------------------


@pytest.fixture
def influx(tmp_path):
    from influxproc import InfluxProcess
    proc = InfluxProcess(tmp_path / "influx")
    proc.start()
    yield proc
    proc.stop()


def influx_gateway(tmp_path, influx, **env) -> GatewayProcess:
    settings = {"GRIDGATE_INFLUXDB_URL": influx.url, "GRIDGATE_SINK_OPEN_S": "0.5",
                "GRIDGATE_SINK_WRITE_TIMEOUT_S": "2", **env}
    return GatewayProcess(tmp_path / "data", "--sink", "influxdb", env=gridgate_env(**settings))


def influx_count(influx) -> int:
    try:
        rows = influx.rows("SELECT count(temperature_mc) FROM telemetry", db="telemetry")
    except RuntimeError as exc:
        if "database not found" in str(exc):       # gridgate has not written yet
            return 0
        raise
    return rows[0]["count"] if rows else 0


@needs_influxd
def test_10000_readings_land_in_influxdb_exactly_once(tmp_path, influx):
    gw = influx_gateway(tmp_path, influx)
    try:
        acked = publish_all(gw, 10, 1000)
        assert acked == 10_000
        assert wait_drained(gw)["kind"] == "influxdb"
    finally:
        assert gw.stop() == 0
    assert influx_count(influx) == 10_000
    (row,) = influx.rows("SELECT * FROM telemetry WHERE device_id = 'meter-003' LIMIT 1", db="telemetry")
    assert row["temperature_mc"] == 20000 and row["region"] == "sh" and row["site"] == "fa"
    assert row["time"] == TS0 * 1_000_000
    stats = spool_stats(gw.data_dir)
    assert (stats["records"], stats["pending"]) == (0, 0)      # the spool kept nothing but was ready to


@needs_influxd
def test_influxdb_outage_loses_nothing_and_duplicates_nothing(tmp_path, influx):
    gw = influx_gateway(tmp_path, influx)
    try:
        publisher = PacedPublisher(gw, 4, 1500)
        # let some land, then take the sink away while publishing goes on
        poll(lambda: influx_count(influx) > 500, 30, "readings reaching InfluxDB")
        influx.kill()
        poll(lambda: readyz(gw)["sink"]["pending"] > 0, 30, "readings going pending")
        influx.restart()
        acked = publisher.join()
        wait_drained(gw)
    finally:
        assert gw.stop() == 0
    assert acked == 6000
    assert influx_count(influx) == 6000                # every acknowledged reading, once


@needs_influxd
def test_gateway_killed_with_pending_records_replays_them_after_restart(tmp_path, influx):
    influx.kill()                                       # the sink is down from the start
    gw = influx_gateway(tmp_path, influx)
    try:
        assert publish_all(gw, 2, 500) == 1000          # acknowledged from the spool's pending table
        assert readyz(gw)["sink"]["pending"] == 1000
    finally:
        gw.kill()                                       # SIGKILL with everything pending
    assert spool_stats(gw.data_dir)["pending"] == 1000
    influx.restart()
    gw2 = influx_gateway(tmp_path, influx)
    try:
        wait_drained(gw2)
    finally:
        assert gw2.stop() == 0
    assert influx_count(influx) == 1000
    assert spool_stats(gw.data_dir)["pending"] == 0


# -- NATS JetStream ----------------------------------------------------------------------


def stream_count(urls: list[str], stream: str = "TELEMETRY") -> int:
    import asyncio

    import nats
    import nats.js.errors

    async def go():
        nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=3, reconnect_time_wait=0.2)
        try:
            info = await nc.jetstream(timeout=5).stream_info(stream)
            return info.state.messages
        except nats.js.errors.NotFoundError:          # gridgate has not created it yet
            return 0
        finally:
            await nc.close()
    return asyncio.run(go())


def nats_gateway(tmp_path, urls: list[str], **env) -> GatewayProcess:
    settings = {"GRIDGATE_NATS_SERVERS": ",".join(urls), "GRIDGATE_SINK_OPEN_S": "0.5",
                "GRIDGATE_SINK_WRITE_TIMEOUT_S": "5", **env}
    return GatewayProcess(tmp_path / "data", "--sink", "nats", env=gridgate_env(**settings))


@needs_nats
def test_10000_readings_then_an_outage_land_in_jetstream_exactly_once(tmp_path):
    from natsproc import NatsServer
    server = NatsServer(tmp_path / "nats").start()
    gw = None
    try:
        gw = nats_gateway(tmp_path, [server.url])
        assert publish_all(gw, 10, 1000) == 10_000      # all up: straight into the stream
        wait_drained(gw)
        assert stream_count([server.url]) == 10_000

        publisher = PacedPublisher(gw, 4, 500, start=10_000)
        server.kill()
        poll(lambda: readyz(gw)["sink"]["pending"] > 0, 30, "readings going pending")
        server.restart()
        assert publisher.join() == 2000
        wait_drained(gw)
        assert stream_count([server.url]) == 12_000     # Nats-Msg-Id dropped any replayed duplicate
    finally:
        try:
            assert gw is None or gw.stop() == 0
        finally:
            server.stop()


@needs_nats
def test_three_node_jetstream_cluster_survives_a_node_kill(tmp_path):
    from natsproc import NatsCluster
    cluster = NatsCluster(tmp_path / "cluster").start()
    gw = None
    try:
        gw = nats_gateway(tmp_path, cluster.urls, GRIDGATE_NATS_REPLICAS="3", GRIDGATE_SINK_WRITE_TIMEOUT_S="15")
        publisher = PacedPublisher(gw, 4, 750)
        poll(lambda: stream_count(cluster.urls) > 500, 60, "readings reaching the stream")   # mid-stream
        cluster.kill("n1")
        assert publisher.join() == 3000
        wait_drained(gw, timeout=90)
        live = [n.url for n in cluster.nodes if n.running()]
        assert stream_count(live) == 3000               # no acknowledged reading missing, none twice
    finally:
        try:
            assert gw is None or gw.stop() == 0
        finally:
            cluster.stop()
