"""MQTT 5 as devices speak it: a real ``gridgate serve`` process driven by
paho-mqtt with ``protocol=MQTTv5`` and by ``mosquitto_pub -V mqttv5``.

What a device learns from its PUBACK (the reason code and Reason String in
paho's ``on_publish``), and what lands in the spool and the dead-letter
store, read back with ``gridgate spool export``.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import threading
import time

import nats
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from binaries import require
from gatewayproc import GatewayProcess, gridgate_env, spool_export
from natsproc import NatsServer

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


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MOSQUITTO_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def send_traced(addr: tuple[str, int]) -> None:
    """One reading from paho (traceparent and tracestate) and one from mosquitto_pub (traceparent), both MQTT 5."""
    mosquitto_pub = require("mosquitto_pub")
    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = [("traceparent", TRACEPARENT), ("tracestate", "congo=t61rcWkgMzE")]
    device = Device(addr, "meter-5")
    try:
        assert device.publish("telemetry", b'{"n": 1}', properties) == (0, None)
    finally:
        device.close()
    host, port = addr
    out = subprocess.run([mosquitto_pub, "-h", host, "-p", str(port), "-V", "mqttv5", "-q", "1", "-i", "meter-6",
                          "-t", "telemetry", "-m", '{"n": 2}', "-D", "publish", "user-property", "traceparent",
                          MOSQUITTO_TRACEPARENT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_traceparent_user_property_is_on_the_spooled_record(gateway):
    send_traced(gateway.mqtt)
    assert gateway.stop() == 0, gateway.log()
    rows = sorted(spool_export(gateway.data_dir), key=lambda r: r["fields"]["n"])
    assert [(r["device_id"], r.get("traceparent"), r.get("tracestate")) for r in rows] == [
        ("meter-5", TRACEPARENT, "congo=t61rcWkgMzE"), ("meter-6", MOSQUITTO_TRACEPARENT, None)]


async def stream_headers(url: str, stream: str = "TELEMETRY") -> list[dict[str, str]]:
    """The headers of every message of the stream, as a consumer reads them (nats-py, its own connection)."""
    nc = await nats.connect(servers=[url], connect_timeout=2, max_reconnect_attempts=2)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(stream)
        return [dict((await js.get_msg(stream, seq)).headers or {})
                for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    finally:
        await nc.close()


def test_traceparent_user_property_is_on_the_jetstream_message_headers(tmp_path, nats_server_binary):
    with NatsServer(tmp_path / "nats").start() as nats_server:
        gw = GatewayProcess(tmp_path / "data", "--sink", "nats",
                            env=gridgate_env(GRIDGATE_NATS_SERVERS=nats_server.url))
        try:
            send_traced(gw.mqtt)           # each PUBACK came once JetStream had stored the reading
        finally:
            assert gw.stop() == 0, gw.log()
        headers = asyncio.run(stream_headers(nats_server.url))
    traced = sorted((h.get("traceparent"), h.get("tracestate")) for h in headers)
    assert traced == sorted([(TRACEPARENT, "congo=t61rcWkgMzE"), (MOSQUITTO_TRACEPARENT, None)])


def post_command(gateway, device_id: str) -> dict:
    """POST a REBOOT to ``device_id``, again while it is not yet known (404), bounded: 200 x 50 ms."""
    status, body = 404, b""
    for _ in range(200):
        conn = http.client.HTTPConnection(*gateway.http, timeout=10)
        conn.request("POST", f"/v1/devices/{device_id}/commands", json.dumps({"type": "REBOOT", "payload": {"n": 1}}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        status, body = response.status, response.read()
        conn.close()
        if status != 404:
            break
        time.sleep(0.05)
    assert status == 202, body
    return json.loads(body)


def test_mosquitto_sub_v5_receives_a_posted_command_with_its_message_expiry_and_response_topic(gateway):
    mosquitto_sub, mosquitto_pub = require("mosquitto_sub"), require("mosquitto_pub")
    host, port = gateway.mqtt
    # -F: Message Expiry Interval, Response Topic, Correlation Data, payload; -C 1: exit after one message;
    # -c -x 60: a session the answer below comes back to (another connection of the same device)
    sub = subprocess.Popen([mosquitto_sub, "-h", host, "-p", str(port), "-V", "mqttv5", "-q", "1", "-i", "meter-7",
                            "-c", "-x", "60", "-t", "devices/meter-7/commands", "-C", "1", "-W", str(TIMEOUT),
                            "-F", "%E %R %D %p"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the device is subscribed once the gateway knows it (commands wait for the SUBACK in any case)
        command_id = post_command(gateway, "meter-7")["command_id"]
        out, err = sub.communicate(timeout=TIMEOUT + 10)
    finally:
        sub.kill()
    expiry, response_topic, correlation, payload = out.strip().split(" ", 3)
    assert expiry == "60"                       # [downlink] command_ttl_s
    assert (response_topic, correlation) == ("devices/meter-7/commands/ack", command_id)
    command = json.loads(payload)
    assert (command["id"], command["type"], command["payload"]) == (command_id, "REBOOT", {"n": 1})
    # the device answers on the Response Topic, echoing the Correlation Data: PUBACK 0x00 (exit 0), not a
    # reading; a forged id: PUBACK 0x80, which mosquitto_pub reports
    answer = [mosquitto_pub, "-h", host, "-p", str(port), "-V", "mqttv5", "-q", "1", "-i", "meter-7",
              "-c", "-x", "60", "-t", response_topic, "-m", "done", "-D", "publish", "correlation-data"]
    out = subprocess.run([*answer, command_id], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    out = subprocess.run([*answer, "forged"], capture_output=True, text=True, timeout=60)
    assert "Unspecified error" in out.stderr, out
    assert gateway.metric('gridgate_command_acks_refused_total{protocol="mqtt"}') == 1
    assert gateway.metric('gridgate_readings_rejected_total{protocol="mqtt",reason="bad_topic"}') == 0
    assert gateway.stop() == 0, gateway.log()
    assert spool_export(gateway.data_dir) == spool_export(gateway.data_dir, rejected=True) == []


def test_paho_v5_answers_a_command_on_its_response_topic(gateway):
    device = Device(gateway.mqtt, "meter-8")
    got: list[paho.MQTTMessage] = []
    arrived = threading.Event()

    def on_message(client, userdata, message) -> None:
        got.append(message)
        arrived.set()

    device.client.on_message = on_message
    try:
        device.client.subscribe("devices/meter-8/commands", qos=1)
        command_id = post_command(gateway, "meter-8")["command_id"]
        assert arrived.wait(TIMEOUT), "no command"
        props = got[0].properties
        assert (props.ResponseTopic, props.CorrelationData, props.MessageExpiryInterval) == (
            "devices/meter-8/commands/ack", command_id.encode(), 60)
        answer = Properties(PacketTypes.PUBLISH)
        answer.CorrelationData = props.CorrelationData
        assert device.publish(props.ResponseTopic, b"", answer) == (0x00, None)
        forged = Properties(PacketTypes.PUBLISH)
        forged.CorrelationData = b"0" * 32
        assert device.publish(props.ResponseTopic, b"", forged) == (0x80, "unknown_command: " + "0" * 32)
        # the bare command id as payload, no Correlation Data: answered already, so refused
        assert device.publish(props.ResponseTopic, command_id) == (0x80, f"unknown_command: {command_id}")
    finally:
        device.close()
    assert gateway.metric('gridgate_commands_acknowledged_total{protocol="mqtt"}') == 1
    assert gateway.metric('gridgate_command_acks_refused_total{protocol="mqtt"}') == 2
