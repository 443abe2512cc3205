"""Bad input, QoS 2 duplicates and crashes against a real ``gridgate serve``."""
from __future__ import annotations

import json
import signal
import threading

import paho.mqtt.client as paho
import pytest

from gatewayproc import GatewayProcess, spool_export, spool_stats
from mqtt_frames import (
    gen_connack, gen_connect, gen_disconnect, gen_publish, gen_puback, gen_pubcomp, gen_pubrec, gen_pubrel,
    gen_subscribe, gen_suback,
)
from rawclient import RawClient


@pytest.fixture
def gateway(tmp_path):
    gw = GatewayProcess(tmp_path / "data")
    yield gw
    gw.kill()


class SteadyPublisher(threading.Thread):
    """A well-behaved paho client publishing QoS 1 while others misbehave."""

    def __init__(self, addr, client_id: str) -> None:
        super().__init__(daemon=True)
        self.addr, self.client_id = addr, client_id
        self.stop_flag = threading.Event()
        self.acked = 0
        self.errors: list[str] = []
        self._progress = threading.Condition()

    def wait_acked(self, n: int, timeout: float = 30) -> bool:
        with self._progress:
            return self._progress.wait_for(lambda: self.acked >= n or bool(self.errors), timeout)

    def run(self) -> None:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        client.connect(*self.addr, keepalive=30)
        client.loop_start()
        n = 0
        while not self.stop_flag.is_set() and n < 5000:
            info = client.publish("telemetry", json.dumps({"humidity": n % 100}), qos=1)
            info.wait_for_publish(timeout=10)
            if not info.is_published():
                self.errors.append(f"publish {n} not acknowledged")
                break
            n += 1
            with self._progress:
                self.acked = n
                self._progress.notify_all()
        client.disconnect()
        client.loop_stop()


BAD_STREAMS = {
    "garbage": b"\xde\xad\xbe\xef" * 16,
    "10MB remaining length": gen_connect("meter-big") + b"\x30" + bytes([0x80, 0x80, 0x80, 0x05]),
    "publish before connect": gen_publish("telemetry", qos=0, payload=b"{}"),
    "second connect": gen_connect("meter-bad") + gen_connect("meter-bad"),
    "wildcard topic": gen_connect("meter-bad2") + gen_publish("devices/+/telemetry", qos=0, payload=b"{}"),
}


def test_misbehaving_clients_are_closed_and_others_are_unaffected(gateway):
    steady = SteadyPublisher(gateway.mqtt, "meter-steady")
    steady.start()
    assert steady.wait_acked(20)
    for name, data in BAD_STREAMS.items():
        bad = RawClient(gateway.mqtt)
        bad.send(data)
        assert bad.closed_by_server(), name
        bad.close()
        # the well-behaved client keeps being acknowledged after each one
        assert steady.wait_acked(steady.acked + 20), name
    steady.stop_flag.set()
    steady.join(30)
    assert steady.errors == []
    assert gateway.alive()
    assert gateway.stop() == 0
    assert spool_stats(gateway.data_dir)["records"] == steady.acked


def test_connections_over_max_connections_are_refused_with_connack_3(tmp_path):
    from gatewayproc import gridgate_env
    gw = GatewayProcess(tmp_path / "data", env=gridgate_env(GRIDGATE_CONNECTIONS_MAX_CONNECTIONS="3"))
    try:
        held = [RawClient(gw.mqtt) for _ in range(3)]
        for i, c in enumerate(held):
            assert c.connect(f"meter-{i}") == gen_connack(0)
        extra = RawClient(gw.mqtt)
        assert extra.recv_exactly(4) == gen_connack(3)
        assert extra.closed_by_server()
        # a slot frees once the server has closed one (it unregisters first)
        held[0].send(gen_disconnect())
        assert held[0].closed_by_server()
        again = RawClient(gw.mqtt, timeout=10)
        assert again.connect("meter-9") == gen_connack(0)
    finally:
        gw.kill()


def test_unsupported_protocol_level_gets_connack_1(gateway):
    c = RawClient(gateway.mqtt)
    assert c.connect("meter-5", proto_ver=5) == gen_connack(1)
    assert c.closed_by_server()


def test_invalid_client_id_gets_connack_2(gateway):
    c = RawClient(gateway.mqtt)
    assert c.connect("bad id with spaces") == gen_connack(2)
    assert c.closed_by_server()


def test_mqtt_31_clients_are_accepted(gateway):
    c = RawClient(gateway.mqtt)
    assert c.connect("old-meter", proto_name=b"MQIsdp", proto_ver=3) == gen_connack(0)
    c.send(gen_publish("telemetry", qos=1, mid=1, payload=b'{"battery_mv": 3600}'))
    assert c.recv_exactly(4) == gen_puback(1)


def test_subscribe_only_to_own_command_topic(gateway):
    c = RawClient(gateway.mqtt)
    assert c.connect("meter-6") == gen_connack(0)
    c.send(gen_subscribe(3, [("devices/meter-6/commands", 2), ("devices/other/commands", 1), ("#", 0)]))
    assert c.recv_exactly(7) == gen_suback(3, [1, 0x80, 0x80])


def test_qos2_duplicates_are_stored_once(gateway):
    c = RawClient(gateway.mqtt)
    assert c.connect("meter-7") == gen_connack(0)
    publish = gen_publish("telemetry", qos=2, mid=42, payload=b'{"temperature": 21.5}')
    c.send(publish)
    assert c.recv_exactly(4) == gen_pubrec(42)
    # redelivered (DUP) before PUBREL: acknowledged again, not stored again
    c.send(gen_publish("telemetry", qos=2, mid=42, dup=True, payload=b'{"temperature": 21.5}'))
    assert c.recv_exactly(4) == gen_pubrec(42)
    c.send(gen_pubrel(42))
    assert c.recv_exactly(4) == gen_pubcomp(42)
    # after release the id may be reused for a new reading
    c.send(publish)
    assert c.recv_exactly(4) == gen_pubrec(42)
    c.send(gen_pubrel(42) + gen_disconnect())
    assert c.recv_exactly(4) == gen_pubcomp(42)
    assert gateway.stop() == 0
    temps = [r["fields"]["temperature_mc"] for r in spool_export(gateway.data_dir)]
    assert temps == [21500, 21500]


def test_every_acknowledged_reading_survives_sigkill(tmp_path):
    data_dir = tmp_path / "data"
    gw = GatewayProcess(data_dir)
    c = RawClient(gw.mqtt)
    assert c.connect("meter-8") == gen_connack(0)
    acked: list[int] = []
    window = 20
    seq = 0
    # a windowed QoS 1 stream; the gateway is killed while it flows
    try:
        for _ in range(50):
            for _ in range(window):
                seq += 1
                c.send(gen_publish("telemetry", qos=1, mid=seq, payload=json.dumps({"seq": seq}).encode()))
            for _ in range(window):
                ack = c.recv_exactly(4)
                acked.append(int.from_bytes(ack[2:], "big"))
            if len(acked) >= 400:
                gw.proc.send_signal(signal.SIGKILL)
    except (EOFError, ConnectionResetError, BrokenPipeError):
        pass
    gw.kill()
    assert len(acked) >= 400
    restarted = GatewayProcess(data_dir)
    assert restarted.stop() == 0
    stored = {int(r["fields"]["seq"]) for r in spool_export(data_dir)}
    assert set(acked) <= stored
