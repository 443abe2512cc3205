"""The gateway as a user runs it: a real ``gridgate serve`` process, driven by
real MQTT clients (the Debian mosquitto-clients and paho-mqtt).

Only the tests that run mosquitto_pub ask for it (``binaries.require``): they
skip where it is missing and fail in CI; the paho test always runs."""
from __future__ import annotations

import json
import subprocess
import threading

import paho.mqtt.client as paho
import pytest

from binaries import require
from gatewayproc import GatewayProcess, gridgate_env, spool_export, spool_stats


@pytest.fixture
def mosquitto_pub() -> str:
    """The mosquitto_pub binary: skipped where it is missing, failed in CI
    (binaries.require). Requested before ``gateway``, so a skip starts no gateway."""
    return require("mosquitto_pub")


@pytest.fixture
def gateway(tmp_path):
    gw = GatewayProcess(tmp_path / "data")
    yield gw
    code = gw.stop()
    assert code == 0, gw.log()


def publish(binary: str, addr, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    host, port = addr
    return subprocess.run([binary, "-h", host, "-p", str(port), *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_mosquitto_pub_fahrenheit_reading_is_normalized(mosquitto_pub, gateway):
    out = publish(mosquitto_pub, gateway.mqtt, "-q", "1", "-t", "telemetry", "-i", "meter-1",
                        "-m", '{"temperature": 77, "temperature_unit": "F"}')
    assert out.returncode == 0, out.stderr
    assert gateway.stop() == 0
    records = spool_export(gateway.data_dir)
    assert len(records) == 1
    rec = records[0]
    assert rec["device_id"] == "meter-1"
    assert rec["protocol"] == "mqtt"
    assert rec["fields"] == {"temperature_mc": 25000}


@pytest.mark.parametrize("pure, writer", [(False, "spool writer: compiled, own thread"),
                                          (True, "spool writer: worker thread (compiled hot path not loaded)")])
def test_each_spool_writer_stores_what_it_acknowledged(mosquitto_pub, tmp_path, pure, writer):
    env = gridgate_env(**({"GRIDGATE_PURE_PYTHON": "1"} if pure else {}))
    if not pure:
        env.pop("GRIDGATE_PURE_PYTHON", None)
    gw = GatewayProcess(tmp_path / "data", env=env)
    try:
        lines = "".join(f'{{"battery_mv": {3000 + i}}}\n' for i in range(200))
        out = publish(mosquitto_pub, gw.mqtt, "-q", "1", "-t", "telemetry", "-i", "meter-3", "-l", stdin=lines)
        assert out.returncode == 0, out.stderr
    finally:
        assert gw.stop() == 0, gw.log()
    assert any(writer in line for line in gw.lines), gw.log()         # the start-up line says which
    assert spool_stats(gw.data_dir)["records"] == 200
    assert sorted(r["fields"]["battery_mv"] for r in spool_export(gw.data_dir)) == list(range(3000, 3200))


def test_device_topic_and_bad_topic_are_both_acknowledged(mosquitto_pub, gateway):
    ok = publish(mosquitto_pub, gateway.mqtt, "-q", "1", "-t", "devices/meter-2/telemetry", "-i", "meter-2",
                       "-m", '{"battery_mv": 3700}')
    other = publish(mosquitto_pub, gateway.mqtt, "-q", "1", "-t", "devices/meter-9/telemetry", "-i", "meter-2",
                          "-m", '{"battery_mv": 3700}')
    assert ok.returncode == 0 and other.returncode == 0, (ok.stderr, other.stderr)
    assert gateway.stop() == 0, gateway.log()
    assert spool_stats(gateway.data_dir)["records"] == 1
    (rej,) = spool_export(gateway.data_dir, rejected=True)
    assert rej["reason"] == "bad_topic"
    assert rej["device_id"] == "meter-2"


def test_qos1_from_100_paho_clients_stores_exactly_10000(gateway):
    host, port = gateway.mqtt
    clients, failures = 100, []
    per_client = 100

    def run(i: int) -> None:
        cid = f"meter-{i:04d}"
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid)
        try:
            client.connect(host, port, keepalive=30)
            client.loop_start()
            infos = []
            for n in range(per_client):
                body = json.dumps({"temperature": 20 + n % 10, "battery_mv": 3000 + n, "seq": n})
                infos.append(client.publish(f"devices/{cid}/telemetry", body, qos=1))
            for info in infos:
                info.wait_for_publish(timeout=60)
                if not info.is_published():
                    failures.append((cid, info.mid))
            client.disconnect()
            client.loop_stop()
        except Exception as exc:  # collected and asserted below
            failures.append((cid, repr(exc)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    assert gateway.stop() == 0
    stats = spool_stats(gateway.data_dir)
    assert stats["records"] == clients * per_client
    assert stats["rejected"] == 0


def test_invalid_payloads_are_dead_lettered_with_their_reason(mosquitto_pub, gateway):
    cases = {
        "not json at all": "malformed",
        '{"temperature": 500}': "out_of_range",
        '{"temperature": 20, "temperature_unit": "X"}': "bad_unit",
        '{"device_id": "meter-other", "temperature": 20}': "identity_mismatch",
        '"just a string"': "not_object",
    }
    for payload in cases:
        out = publish(mosquitto_pub, gateway.mqtt, "-q", "1", "-t", "telemetry", "-i", "meter-3", "-m", payload)
        assert out.returncode == 0, out.stderr
    assert gateway.stop() == 0, gateway.log()
    rejected = spool_export(gateway.data_dir, rejected=True)
    assert sorted(r["reason"] for r in rejected) == sorted(cases.values())
    assert spool_stats(gateway.data_dir)["records"] == 0
