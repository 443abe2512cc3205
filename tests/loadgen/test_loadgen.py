"""gridgate-loadgen: schedule and latency accounting, exact histogram merge,
argument errors, and runs against gridgate (MQTT, HTTP, WebSocket) and mosquitto."""
from __future__ import annotations

import json
import random
import resource
import shutil
import socket
import subprocess
import sys

import pytest
import trio

from gatewayproc import GatewayProcess, gridgate_env, spool_stats
from loadgen.limits import check_capacity, parse_ip_range
from loadgen.mqtt_device import DeviceOptions
from loadgen.runner import RunPlan, SelfCheck, run_share
from loadgen.schedule import Schedule, intended_time
from loadgen.stats import Stats, new_histogram

LOADGEN = [sys.executable, "-m", "loadgen.cli"]


def test_open_loop_schedule_is_fixed_in_advance():
    s = Schedule(start=100.0, rate_per_device=4.0, offset=0.1)
    assert [s.advance() for _ in range(4)] == [100.1, 100.35, 100.6, 100.85]
    assert intended_time(0.0, 10.0, 25) == 2.5


def test_histogram_merge_across_processes_is_exact():
    rng = random.Random(5)
    samples = [[rng.randint(1, 5_000_000) for _ in range(5000)] for _ in range(3)]
    parts = []
    for chunk in samples:
        st = Stats(sent=len(chunk), acked=len(chunk))
        for v in chunk:
            st.record_latency_us(v)
        parts.append(Stats.from_wire(st.to_wire()))   # as a worker ships it
    merged = Stats()
    for p in parts:
        merged.merge(p)
    whole = new_histogram()
    for v in (v for chunk in samples for v in chunk):
        whole.record_value(v)
    assert merged.acked == 15000
    assert merged.histogram.get_total_count() == whole.get_total_count()
    for pct in (50, 90, 99, 99.9, 100):
        assert merged.histogram.get_value_at_percentile(pct) == whole.get_value_at_percentile(pct)


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "0 is not a positive integer"),
    (["--target", "nohost"], "'nohost' is not HOST:PORT"),
    (["--duration", "-1"], "-1 is not a number >= 0"),
    (["--qos", "2"], "invalid choice: 2"),
    (["--rate", "x"], "'x' is not a number"),
    (["--devices", "many"], "'many' is not an integer"),
    (["--procs", "20"], "--procs 20 is more than --devices 10"),
    (["--source-ips", "10.0.0.1-10.0.0.5"], "only loopback addresses (127.0.0.0/8) are allowed"),
    (["--source-ips", "127.0.0.9-127.0.0.2"], "the range ends before it starts"),
])
def test_argument_errors_are_clear(args, message):
    out = run_with_bad_args("mqtt", args)
    assert out.returncode == 2
    assert message in out.stderr


def run_with_bad_args(subcommand: str, args: list[str]) -> subprocess.CompletedProcess:
    """The loadgen with valid defaults, ``args`` (flag, value pairs) overriding them."""
    base = {"--target": "127.0.0.1:1", "--devices": "10", "--duration": "1"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = [x for kv in base.items() for x in kv]
    return subprocess.run(LOADGEN + [subcommand, *argv], capture_output=True, text=True, timeout=30)


def test_capacity_is_checked_before_connecting():
    assert check_capacity(15000, 2, 20000, 19) == []
    (fds,) = check_capacity(30000, 1, 20000, 2)
    assert fds == ("30000 devices over 1 process(es) is 30000 sockets per process, but one process may open "
                   "20000 files (19936 after a reserve of 64): use --procs 2 or more")
    (ports,) = check_capacity(30000, 2, 20000, 1)
    assert ports.startswith("30000 connections to one target need more than 28000 source ports")
    assert parse_ip_range("127.0.0.2-127.0.0.4") == ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def test_too_many_devices_for_one_process_is_refused_with_advice():
    out = subprocess.run(LOADGEN + ["mqtt", "--target", "127.0.0.1:1", "--devices", "50000", "--duration", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "use --procs" in out.stderr and "--source-ips" in out.stderr


async def stalling_broker(task_status=trio.TASK_STATUS_IGNORED, *, stall_after: float, stall_for: float):
    """A minimal MQTT acker that stops reading for ``stall_for`` seconds once."""
    start = trio.current_time()
    stalled = False

    async def handle(stream):
        nonlocal stalled
        buf = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            if not stalled and trio.current_time() - start >= stall_after:
                stalled = True
                await trio.sleep(stall_for)
            buf += data
            acks = []
            while len(buf) >= 2:
                length, mult, i = 0, 1, 1
                while True:
                    byte = buf[i]
                    length += (byte & 0x7F) * mult
                    i += 1
                    if not byte & 0x80:
                        break
                    mult *= 128
                if len(buf) < i + length:
                    break
                first = buf[0]
                if first == 0x10:
                    acks.append(b"\x20\x02\x00\x00")
                elif first & 0xF0 == 0x30 and first & 0x06:
                    topic_len = (buf[i] << 8) | buf[i + 1]
                    pid = buf[i + 2 + topic_len:i + 4 + topic_len]
                    acks.append(b"\x40\x02" + pid)
                buf = buf[i + length:]
            if acks:
                await stream.send_all(b"".join(acks))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def test_a_stalled_server_shows_in_the_open_loop_percentiles():
    stats, check = Stats(), SelfCheck()

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(lambda task_status: stalling_broker(task_status, stall_after=1.0,
                                                                           stall_for=1.0))
            opts = DeviceOptions(host="127.0.0.1", port=port, qos=1, inflight=1000, rate_per_device=50.0)
            await run_share(RunPlan(device=opts, first=0, count=4, duration=3.0), stats, check)
            nursery.cancel_scope.cancel()

    trio.run(main)
    lat = stats.latency_ms()
    assert stats.acked == stats.sent > 0
    # readings scheduled during the 1 s stall waited for it: latency is measured
    # from their intended send time, so the stall cannot hide
    assert lat["max"] >= 900
    assert lat["p99"] >= 800
    assert lat["p50"] < lat["p99"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_loadgen(port: int, tmp_path, name: str, *extra: str) -> dict:
    out_json = tmp_path / f"{name}.json"
    out = subprocess.run(LOADGEN + ["mqtt", "--target", f"127.0.0.1:{port}", "--devices", "1000", "--qos", "1",
                                    "--duration", "10", "--json", str(out_json), *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "readings/s" in out.stdout and "p99.9=" in out.stdout
    return json.loads(out_json.read_text())


def test_1000_devices_against_gridgate_acked_equals_spool(tmp_path):
    gw = GatewayProcess(tmp_path / "data")
    try:
        result = run_loadgen(gw.mqtt[1], tmp_path, "gridgate")
    finally:
        assert gw.stop() == 0
    assert result["peak_connected"] == 1000 and result["errors"] == 0
    assert result["acked"] == result["sent"] > 0
    assert result["latency_ms"]["p99"] is not None
    assert spool_stats(tmp_path / "data")["records"] == result["acked"]


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed (.ci/run installs it)")
def test_1000_devices_against_mosquitto(tmp_path):
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    log = open(tmp_path / "mosquitto.log", "wb")  # a pipe nobody reads would fill and block the broker
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
    try:
        for _ in range(100):   # wait until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if broker.poll() is not None:
                    pytest.fail((tmp_path / "mosquitto.log").read_text())
                trio.run(trio.sleep, 0.05)
        result = run_loadgen(port, tmp_path, "mosquitto")
    finally:
        broker.terminate()
        broker.wait(10)
        log.close()
    assert result["peak_connected"] == 1000 and result["errors"] == 0
    assert result["acked"] == result["sent"] > 0
    assert result["readings_per_s"] > 0 and result["latency_ms"]["p50"] is not None


def test_devices_reconnect_and_replay_after_the_server_restarts(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    stats, check = Stats(), SelfCheck()
    servers = [GatewayProcess(data, "--mqtt", f"127.0.0.1:{port}")]

    async def outage():
        await trio.sleep(1.5)
        servers[0].kill()                       # SIGKILL mid-stream
        await trio.sleep(1.0)                   # devices see the drop and back off
        servers.append(await trio.to_thread.run_sync(
            lambda: GatewayProcess(data, "--mqtt", f"127.0.0.1:{port}")))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage)
            opts = DeviceOptions(host="127.0.0.1", port=port, qos=1, inflight=50, rate_per_device=20.0,
                                 backoff_base=0.05, backoff_max=0.5)
            await run_share(RunPlan(device=opts, first=0, count=10, duration=5.0), stats, check)

    try:
        trio.run(main)
    finally:
        assert servers[-1].stop() == 0
    assert stats.reconnects == 10               # every device came back
    assert stats.replayed > 0 and stats.dropped == 0
    # every send was acknowledged except those in flight at the kill, which were resent
    assert stats.acked == stats.sent - stats.unacked_at_drop
    # acknowledged readings are durable (resent ones may be stored twice, never lost)
    assert spool_stats(data)["records"] >= stats.acked


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 16_000,
                    reason="needs a hard open-file limit of at least 16,000 (these machines have 20,000)")
def test_15000_idle_connections_over_two_processes(tmp_path):
    gw = GatewayProcess(tmp_path / "data")
    out_json = tmp_path / "idle.json"
    try:
        out = subprocess.run(LOADGEN + ["mqtt", "--target", f"127.0.0.1:{gw.mqtt[1]}", "--idle", "--devices", "15000",
                                        "--procs", "2", "--source-ips", "127.0.0.2-127.0.0.20", "--duration", "20",
                                        # a fleet ramps up: 15,000 SYNs at once overflow any accept queue
                                        "--connect-rate", "2000",
                                        "--json", str(out_json)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert gw.alive()
    finally:
        assert gw.stop() == 0
    result = json.loads(out_json.read_text())
    # every device connected once and none was dropped for the whole run
    assert (result["peak_connected"], result["connects"], result["reconnects"], result["errors"]) == (15000, 15000, 0, 0)


def test_http_devices_against_gridgate_acked_equals_spool(tmp_path):
    gw = GatewayProcess(tmp_path / "data")
    out_json = tmp_path / "http.json"
    try:
        out = subprocess.run(LOADGEN + ["http", "--target", f"127.0.0.1:{gw.http[1]}", "--devices", "50",
                                        "--inflight", "4", "--batch", "3", "--payload", "msgpack", "--duration", "3",
                                        "--json", str(out_json)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
    finally:
        assert gw.stop() == 0
    result = json.loads(out_json.read_text())
    assert result["errors"] == 0 and result["acked"] == result["sent"] > 0
    assert result["acked"] % 3 == 0
    assert spool_stats(tmp_path / "data")["records"] == result["acked"]


def test_http_non_2xx_answers_are_errors(tmp_path):
    # every request is over the gateway's body limit: 413, never an ack
    gw = GatewayProcess(tmp_path / "data", env=gridgate_env(GRIDGATE_HTTP_MAX_BODY_BYTES="10"))
    stats, check = Stats(), SelfCheck()
    opts = DeviceOptions(host="127.0.0.1", port=gw.http[1], protocol="http", inflight=1, rate_per_device=10.0,
                         backoff_base=0.05, backoff_max=0.2)
    try:
        trio.run(run_share, RunPlan(device=opts, first=0, count=2, duration=1.0), stats, check)
    finally:
        gw.stop()
    assert stats.sent > 0 and stats.acked == 0 and stats.errors > 0


@pytest.mark.parametrize("payload", ["json", "msgpack"])
def test_ws_devices_against_gridgate_acked_equals_spool(tmp_path, payload):
    # two of the devices have a config: the gateway pushes it as an UPDATE_CONFIG
    # command on connect, and the loadgen must answer each with a command_ack
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({"loadgen-000000": {"report_interval_s": 5}, "loadgen-000049": {"x": 1}}))
    gw = GatewayProcess(tmp_path / "data", env=gridgate_env(GRIDGATE_DOWNLINK_DEVICES_FILE=str(devices)))
    out_json = tmp_path / "ws.json"
    try:
        out = subprocess.run(LOADGEN + ["ws", "--target", f"127.0.0.1:{gw.ws[1]}", "--devices", "50", "--inflight", "4",
                                        "--batch", "3", "--payload", payload, "--duration", "3",
                                        "--json", str(out_json)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "readings/s" in out.stdout and "p99.9=" in out.stdout
        assert gw.metric('gridgate_commands_acknowledged_total{protocol="ws"}') == 2
    finally:
        assert gw.stop() == 0
    result = json.loads(out_json.read_text())
    assert result["protocol"] == "ws" and result["peak_connected"] == 50
    assert result["errors"] == 0 and result["rejected"] == 0
    assert result["acked"] == result["sent"] > 0 and result["acked"] % 3 == 0
    assert result["latency_samples"] == result["acked"] and result["latency_ms"]["p99"] is not None
    assert result["commands"] == 2
    # after a clean end (loadgen drained, gateway stopped gracefully) every acked reading is stored, once
    assert spool_stats(tmp_path / "data")["records"] == result["acked"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "argument --batch: 0 is not a positive integer"),
    (["--inflight", "0"], "argument --inflight: 0 is not a positive integer"),
    (["--payload", "cbor"], "argument --payload: invalid choice: 'cbor'"),
    (["--keepalive", "0"], "argument --keepalive: 0 is not a positive integer"),
    (["--qos", "1"], "unrecognized arguments: --qos 1"),
    (["--target", "127.0.0.1"], "'127.0.0.1' is not HOST:PORT"),
])
def test_ws_argument_errors_are_clear(args, message):
    out = run_with_bad_args("ws", args)
    assert out.returncode == 2
    assert message in out.stderr and "usage: gridgate-loadgen" in out.stderr


def test_ws_devices_reconnect_and_replay_after_the_server_restarts(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    stats, check = Stats(), SelfCheck()
    servers = [GatewayProcess(data, "--ws", f"127.0.0.1:{port}")]

    async def outage():
        await trio.sleep(1.5)
        servers[0].kill()                       # SIGKILL mid-stream
        await trio.sleep(1.0)
        servers.append(await trio.to_thread.run_sync(
            lambda: GatewayProcess(data, "--ws", f"127.0.0.1:{port}")))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage)
            opts = DeviceOptions(host="127.0.0.1", port=port, protocol="ws", inflight=50, rate_per_device=20.0,
                                 backoff_base=0.05, backoff_max=0.5)
            await run_share(RunPlan(device=opts, first=0, count=10, duration=5.0), stats, check)

    try:
        trio.run(main)
    finally:
        assert servers[-1].stop() == 0
    assert stats.reconnects == 10
    assert stats.replayed > 0 and stats.dropped == 0
    assert stats.acked == stats.sent - stats.unacked_at_drop
    assert spool_stats(data)["records"] >= stats.acked
