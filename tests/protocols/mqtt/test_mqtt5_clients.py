"""MQTT 5 as devices speak it: a real ``gridgate serve`` process driven by
paho-mqtt with ``protocol=MQTTv5`` and by ``mosquitto_pub -V mqttv5``.

What a device learns from its PUBACK (the reason code and Reason String in
paho's ``on_publish``), and what lands in the spool and the dead-letter
store, read back with ``gridgate spool export``.
"""
from __future__ import annotations

import json
import subprocess
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from binaries import require
from gatewayproc import GatewayProcess, spool_export

TIMEOUT = 20


@pytest.fixture
def gateway(tmp_path):
    gw = GatewayProcess(tmp_path / "data")
    yield gw
    gw.kill()


class Device:
    """A paho MQTT 5 client that remembers each PUBACK's reason code and Reason String by mid."""

    def __init__(self, addr: tuple[str, int], client_id: str, connect_properties: Properties | None = None,
                 websocket: bool = False) -> None:
        self.acks: dict[int, tuple[int, str | None]] = {}
        self.acked = threading.Condition()
        self.connack: list[int] = []
        self.connected = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                                  transport="websockets" if websocket else "tcp")
        if websocket:
            self.client.ws_set_options(path="/mqtt")
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.connect(*addr, keepalive=30, properties=connect_properties)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack.append(reason_code.value)
        self.connack_properties = properties
        self.connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        text = getattr(properties, "ReasonString", None) if properties is not None else None
        with self.acked:
            self.acks[mid] = (reason_code.value, text)
            self.acked.notify_all()

    def publish(self, topic: str, payload: bytes | str, properties: Properties | None = None) -> tuple[int, str | None]:
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.acks, TIMEOUT), "no PUBACK"
            return self.acks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_paho_v5_learns_from_the_puback_what_became_of_each_reading(gateway):
    device = Device(gateway.mqtt, "meter-1")
    try:
        assert device.connack == [0]
        assert device.connack_properties.ReceiveMaximum == 1024
        assert device.connack_properties.TopicAliasMaximum == 16
        assert device.connack_properties.RetainAvailable == 0
        assert device.publish("telemetry", json.dumps({"temperature": 21.5})) == (0x00, None)
        assert device.publish("telemetry", json.dumps({"temperature": 500})) == (0x99, "out_of_range: temperature")
        assert device.publish("devices/meter-2/telemetry", b"{}") == (0x90, "bad_topic: topic")
        batch = json.dumps([{"battery_mv": 3700}, {"battery_mv": -1}])
        assert device.publish("telemetry", batch) == (0x00, "1 of 2 items rejected, first out_of_range: battery_mv")
    finally:
        device.close()
    assert gateway.stop() == 0, gateway.log()
    records = spool_export(gateway.data_dir)
    assert sorted(json.dumps(r["fields"], sort_keys=True) for r in records) == [
        '{"battery_mv": 3700}', '{"temperature_mc": 21500}']
    rejected = spool_export(gateway.data_dir, rejected=True)
    assert sorted((r["reason"], r["field"]) for r in rejected) == [
        ("bad_topic", "topic"), ("out_of_range", "battery_mv"), ("out_of_range", "temperature")]


def test_paho_v5_over_websocket_gets_the_same_answers(gateway):
    device = Device(gateway.ws, "meter-ws", websocket=True)
    try:
        assert device.connack == [0]
        assert device.connack_properties.ReceiveMaximum == 1024
        assert device.publish("telemetry", json.dumps({"temperature": 21.5})) == (0x00, None)
        assert device.publish("telemetry", json.dumps({"temperature": 500})) == (0x99, "out_of_range: temperature")
    finally:
        device.close()
    assert gateway.stop() == 0, gateway.log()
    assert [(r["protocol"], r["fields"]) for r in spool_export(gateway.data_dir)] == [
        ("mqtt-ws", {"temperature_mc": 21500})]
    assert [r["reason"] for r in spool_export(gateway.data_dir, rejected=True)] == ["out_of_range"]


def test_paho_v5_topic_alias_and_content_type(gateway):
    device = Device(gateway.mqtt, "meter-2")
    try:
        alias = Properties(PacketTypes.PUBLISH)
        alias.TopicAlias = 1
        assert device.publish("devices/meter-2/telemetry", b'{"battery_mv": 1}', alias) == (0, None)
        assert device.publish("", b'{"battery_mv": 2}', alias) == (0, None)       # the alias alone names the topic
        msgpack = Properties(PacketTypes.PUBLISH)
        msgpack.ContentType = "application/msgpack"
        assert device.publish("telemetry", b"\x81\xaabattery_mv\x03", msgpack) == (0, None)
        json_type = Properties(PacketTypes.PUBLISH)
        json_type.ContentType = "application/json"
        code, text = device.publish("telemetry", b"\x81\xaabattery_mv\x03", json_type)
        assert (code, text) == (0x99, "malformed: payload is not valid JSON")
    finally:
        device.close()
    assert gateway.stop() == 0, gateway.log()
    assert sorted(r["fields"]["battery_mv"] for r in spool_export(gateway.data_dir)) == [1, 2, 3]


def test_paho_v5_without_problem_information_gets_codes_alone(gateway):
    connect = Properties(PacketTypes.CONNECT)
    connect.RequestProblemInformation = 0
    device = Device(gateway.mqtt, "meter-3", connect)
    try:
        assert device.publish("telemetry", json.dumps({"temperature": 500})) == (0x99, None)
    finally:
        device.close()


def test_mosquitto_pub_v5_reading_is_stored_and_a_bad_one_is_told(gateway):
    mosquitto_pub = require("mosquitto_pub")
    host, port = gateway.mqtt

    def pub(message: str) -> subprocess.CompletedProcess:
        return subprocess.run([mosquitto_pub, "-h", host, "-p", str(port), "-V", "mqttv5", "-q", "1", "-d",
                               "-i", "meter-4", "-t", "telemetry", "-m", message],
                              capture_output=True, text=True, timeout=60)

    ok = pub('{"temperature": 20}')
    assert ok.returncode == 0, ok.stderr
    assert "received PUBACK (Mid: 1, RC:0)" in ok.stdout
    bad = pub('{"temperature": 500}')
    # mosquitto_pub reports the failed delivery with the reason code's text
    assert "received PUBACK (Mid: 1, RC:153)" in bad.stdout, bad.stdout + bad.stderr
    assert gateway.stop() == 0, gateway.log()
    assert [r["fields"] for r in spool_export(gateway.data_dir)] == [{"temperature_mc": 20000}]
    assert [r["reason"] for r in spool_export(gateway.data_dir, rejected=True)] == ["out_of_range"]
