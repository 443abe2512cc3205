"""gridgate-loadgen's one-task-per-process MQTT driver (loadgen.mqtt_mux),
over loopback against real gridgate and mosquitto processes: the fleet shape
(1,000 devices x 1 in flight), the open-loop schedule, QoS 0, MQTT 5,
keepalive pings, refused CONNACKs. Counts must be exact (every sent reading
acked, every acked one in gridgate's spool); no timing is asserted."""
from __future__ import annotations

import subprocess
import sys

import pytest
import trio
from test_loadgen import assert_latency_accounted, drain, free_port, gridgate_process, run_loadgen, wait_for_line

from binaries import require
from gatewayproc import spool_stats
from loadgen.device import DeviceOptions
from loadgen.runner import uses_mux
from loadgen.stats import Stats

LOADGEN = [sys.executable, "-m", "loadgen.cli"]


@pytest.fixture
async def mosquitto_factory(tmp_path, nursery):
    """``await start(extra_conf)``: a mosquitto on a free port, stopped at the end; returns the port."""
    brokers = []

    async def start(extra: str = "allow_anonymous true\n") -> int:
        exe = require("mosquitto")
        port = free_port()
        conf = tmp_path / f"mosquitto-{port}.conf"
        conf.write_text(f"listener {port} 127.0.0.1\npersistence false\n{extra}")
        broker = await trio.lowlevel.open_process([exe, "-c", str(conf)], stderr=subprocess.PIPE)
        brokers.append(broker)
        log = bytearray()
        with trio.fail_after(30):
            await wait_for_line(broker.stderr, b" running", log)
        nursery.start_soon(drain, broker.stderr)
        return port

    yield start
    for broker in brokers:
        broker.terminate()
        with trio.fail_after(10):
            await broker.wait()


def test_the_mux_serves_plain_tcp_mqtt_and_ws():
    base = DeviceOptions(host="127.0.0.1", port=1)
    assert uses_mux(base)
    assert not uses_mux(DeviceOptions(host="127.0.0.1", port=1, tls=True))
    assert not uses_mux(DeviceOptions(host="127.0.0.1", port=1, mux=False))
    assert uses_mux(DeviceOptions(host="127.0.0.1", port=1, protocol="ws"))
    assert not uses_mux(DeviceOptions(host="127.0.0.1", port=1, protocol="ws", mux=False))
    assert not uses_mux(DeviceOptions(host="127.0.0.1", port=1, protocol="http"))


async def test_fleet_shape_against_gridgate_every_acked_reading_is_stored(tmp_path):
    async with gridgate_process(tmp_path / "data") as gw:
        result = await run_loadgen(tmp_path, "fleet", "mqtt", "--target", f"127.0.0.1:{gw.mqtt[1]}",
                                   "--devices", "1000", "--inflight", "1", "--procs", "2", "--qos", "1",
                                   "--duration", "4")
    assert (result["peak_connected"], result["connects"], result["errors"], result["reconnects"]) == (
        1000, 1000, 0, 0)
    assert result["acked"] == result["sent"] > 1000
    assert result["options"]["mux"] is True
    # its CPU is also given over the part of the run after every device had connected
    assert result["loadgen_cpu_us_per_reading_steady"] > 0
    assert_latency_accounted(result, 4)
    stored = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert stored["records"] == result["acked"]


async def test_open_loop_through_the_mux_keeps_the_schedule(tmp_path):
    """200 devices at 1,000 readings/s for 3 s: the schedule, not the acks,
    sets how many are sent (each device's due times are fixed in advance),
    all of them acked and stored."""
    async with gridgate_process(tmp_path / "data") as gw:
        result = await run_loadgen(tmp_path, "open", "mqtt", "--target", f"127.0.0.1:{gw.mqtt[1]}",
                                   "--devices", "200", "--rate", "1000", "--inflight", "50", "--duration", "3")
    # 5 readings/s per device from a random offset in its first period: 15 each, give or take the last
    assert 200 * 14 <= result["sent"] <= 200 * 15
    assert result["acked"] == result["sent"] and result["errors"] == 0
    assert_latency_accounted(result, 3)
    stored = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert stored["records"] == result["acked"]


@pytest.mark.parametrize("version", ["4", "5"], ids=["mqtt311", "mqtt5"])
async def test_fleet_shape_against_mosquitto(tmp_path, mosquitto_factory, version):
    port = await mosquitto_factory()
    result = await run_loadgen(tmp_path, "mosq", "mqtt", "--target", f"127.0.0.1:{port}", "--devices", "1000",
                               "--inflight", "1", "--procs", "2", "--duration", "3", "--mqtt-version", version)
    assert (result["peak_connected"], result["errors"], result["reconnects"]) == (1000, 0, 0)
    assert result["acked"] == result["sent"] > 1000
    assert_latency_accounted(result, 3)


async def test_qos0_through_the_mux_sends_without_acks(tmp_path, mosquitto_factory):
    port = await mosquitto_factory()
    result = await run_loadgen(tmp_path, "qos0", "mqtt", "--target", f"127.0.0.1:{port}", "--devices", "20",
                               "--qos", "0", "--duration", "2")
    assert result["sent"] > 1000 and result["acked"] == 0
    assert (result["errors"], result["reconnects"], result["latency_samples"]) == (0, 0, 0)
    assert result["loadgen_cpu_per"] == "sent"


async def test_idle_devices_keep_their_connections_with_pings(tmp_path, mosquitto_factory):
    """mosquitto drops a client silent for 1.5 keepalives (2.0.11 notices
    within about 5 s at a keepalive of 1 s): over 8 s of idling, only the
    mux's PINGREQs keep the 50 devices on."""
    port = await mosquitto_factory()
    result = await run_loadgen(tmp_path, "idle", "mqtt", "--target", f"127.0.0.1:{port}", "--devices", "50",
                               "--idle", "--keepalive", "1", "--duration", "8")
    assert (result["connects"], result["errors"], result["reconnects"], result["sent"]) == (50, 0, 0, 0)
    assert result["loadgen_cpu_us_per_reading_steady"] is None        # no readings, no steady window


async def test_refused_connacks_are_errors_and_the_fleet_backs_off(tmp_path, mosquitto_factory):
    port = await mosquitto_factory("allow_anonymous false\n")
    result = await run_loadgen(tmp_path, "refused", "mqtt", "--target", f"127.0.0.1:{port}", "--devices", "10",
                               "--duration", "2", "--no-reconnect")
    assert (result["connects"], result["errors"], result["sent"]) == (0, 10, 0)
    retried = await run_loadgen(tmp_path, "retried", "mqtt", "--target", f"127.0.0.1:{port}", "--devices", "10",
                                "--duration", "2", "--backoff-min", "0.05", "--backoff-max", "0.2")
    # each device tries again and again, backing off, until the end: never connected
    assert retried["connects"] == 0 and retried["errors"] > 10 and retried["sent"] == 0


async def test_mux_and_per_device_tasks_account_alike(tmp_path):
    """The same fleet with and without --mux: exact counts either way."""
    async with gridgate_process(tmp_path / "data") as gw:
        results = {}
        for flag in ("--mux", "--no-mux"):
            results[flag] = await run_loadgen(tmp_path, flag.strip("-"), "mqtt", "--target",
                                              f"127.0.0.1:{gw.mqtt[1]}", "--devices", "50", "--inflight", "2",
                                              "--duration", "2", flag)
    for flag, result in results.items():
        assert result["options"]["mux"] is (flag == "--mux")
        assert result["acked"] == result["sent"] > 0 and result["errors"] == 0
        assert_latency_accounted(result, 2)
    stored = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert stored["records"] == sum(r["acked"] for r in results.values())


def test_mux_flag_is_documented():
    out = subprocess.run(LOADGEN + ["mqtt", "--help"], capture_output=True, text=True, timeout=30)
    assert "--no-mux" in out.stdout


def test_the_steady_cpu_window_merges_across_processes_and_over_the_wire():
    a, b = Stats(), Stats()
    a.steady_cpu_s, a.steady_readings = 0.25, 10_000
    b.steady_cpu_s, b.steady_readings = 0.15, 6_000
    merged = Stats()
    for worker in (a, b):
        merged.merge(Stats.from_wire(worker.to_wire()))
    assert merged.steady_readings == 16_000
    assert merged.steady_cpu_us_per_reading() == pytest.approx(0.4e6 / 16_000)
    assert merged.summary()["loadgen_cpu_us_per_reading_steady"] == 25.0
    assert Stats().summary()["loadgen_cpu_us_per_reading_steady"] is None
