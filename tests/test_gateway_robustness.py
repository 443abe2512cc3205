"""Bad input, refusals, QoS 2 duplicates and crashes.

In process (pytest-trio): each misbehaving client is closed with its reason,
logged and counted in ``gridgate_protocol_errors``, while a well-behaved one
keeps being acknowledged. Over in-memory streams under the autojump clock,
and over loopback TCP (the gateway's own accept and socket read path) in
real time. Only the crash test runs a real ``gridgate serve``: SIGKILL is
the point there.
"""
from __future__ import annotations

import json
import logging
import signal

import pytest
import trio
import trio.testing

import gridgate
from gatewayproc import GatewayProcess, spool_export
from gridgate.config import ConnectionsConfig, MQTTConfig
from inprocess import MemorySink, connect_memory, make_config, read_exactly, wait_closed
from mqtt_frames import (
    gen_connack,
    gen_connect,
    gen_disconnect,
    gen_puback,
    gen_pubcomp,
    gen_publish,
    gen_pubrec,
    gen_pubrel,
    gen_suback,
    gen_subscribe,
)
from rawclient import RawClient

# name: (bytes sent, reason, what the log says of it)
BAD_STREAMS = {
    "garbage": (b"\xde\xad\xbe\xef" * 16, "expected_connect",
                "first packet has type 13, not CONNECT (MQTT-3.1.0-1)"),
    "10MB remaining length": (gen_connect("meter-big") + b"\x30" + bytes([0x80, 0x80, 0x80, 0x05]), "too_large",
                              "packet of 10485765 bytes exceeds max_packet_bytes 1048576"),
    "publish before connect": (gen_publish("telemetry", qos=0, payload=b"{}"), "expected_connect",
                               "first packet has type 3, not CONNECT (MQTT-3.1.0-1)"),
    # the whole read is refused, the valid CONNECT before the fault with it: no CONNACK
    "second connect": (gen_connect("meter-bad") + gen_connect("meter-bad"), "duplicate_connect",
                       "a second CONNECT on one connection (MQTT-3.1.0-2)"),
    "wildcard topic": (gen_connect("meter-bad2") + gen_publish("devices/+/telemetry", qos=0, payload=b"{}"),
                       "bad_topic", "wildcard in topic name 'devices/+/telemetry' (MQTT-3.3.2-2)"),
}


def protocol_errors(gateway) -> dict[tuple[str, str], float]:
    """gridgate_protocol_errors_total as /metrics shows it: {(protocol, reason): count}."""
    return {(s.labels["protocol"], s.labels["reason"]): s.value
            for family in gateway.metrics.registry.collect()
            for s in family.samples if s.name == "gridgate_protocol_errors_total"}


class SteadyPublisher:
    """A well-behaved device publishing QoS 1, one reading in flight, while others misbehave."""

    def __init__(self, stream: trio.abc.Stream, limit: int = 5000) -> None:
        self.stream = stream
        self.limit = limit
        self.acked = 0
        self.stopping = False
        self._progress = trio.Event()

    async def run(self) -> None:
        while not self.stopping and self.acked < self.limit:
            mid = self.acked % 65535 + 1
            await self.stream.send_all(gen_publish("telemetry", qos=1, mid=mid,
                                                   payload=json.dumps({"humidity": self.acked % 100}).encode()))
            assert await read_exactly(self.stream, 4) == gen_puback(mid)
            self.acked += 1
            self._progress.set()
            self._progress = trio.Event()
        await self.stream.send_all(gen_disconnect())

    async def wait_acked(self, n: int) -> None:
        while self.acked < n:
            await self._progress.wait()


async def misbehave_beside_a_steady_device(gateway, open_stream, remote_of, caplog, name: str) -> int:
    """Send one bad stream while a steady device publishes; check the close,
    its reason in the log and the counter, and that the device goes on.
    Returns how many of the device's readings were acknowledged."""
    data, reason, detail = BAD_STREAMS[name]
    errors_before = protocol_errors(gateway)
    async with trio.open_nursery() as nursery:
        steady = SteadyPublisher(await open_stream("meter-steady"))
        nursery.start_soon(steady.run)
        await steady.wait_acked(20)
        bad = await open_stream(None)
        with caplog.at_level(logging.WARNING, logger="gridgate.mqtt"):
            await bad.send_all(data)
            received = bytearray()
            while chunk := await bad.receive_some(65536):      # until the gateway closes it
                received += chunk
        assert received == b""
        assert [r.getMessage() for r in caplog.records if r.name == "gridgate.mqtt"] == [
            f"closing MQTT connection from {remote_of(bad)} (before CONNECT): {reason}: {detail}"]
        assert protocol_errors(gateway) == {**errors_before, ("mqtt", reason): 1.0}
        assert [s.device_id for s in gateway.conns] == ["meter-steady"]     # unregistered before the close
        # the well-behaved device keeps being acknowledged
        await steady.wait_acked(steady.acked + 20)
        steady.stopping = True
    return steady.acked


@pytest.mark.parametrize("name", BAD_STREAMS)
async def test_misbehaving_client_is_closed_counted_with_its_reason_and_others_are_unaffected_in_memory(
        name, autojump_clock, tmp_path, caplog):
    sink = MemorySink()
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(gridgate.serve, make_config(tmp_path), sink)

        async def open_stream(client_id: str | None) -> trio.abc.Stream:
            if client_id is not None:
                return await connect_memory(gateway, nursery, client_id)
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(gateway.handle_mqtt, server)
            return client

        acked = await misbehave_beside_a_steady_device(gateway, open_stream, lambda stream: "StapledStream",
                                                       caplog, name)
        gateway.stop()
    # every acknowledged reading was written, nothing else
    assert sum(len(b) for b in sink.batches) == gateway.pipeline.accepted == acked
    assert protocol_errors(gateway) == {("mqtt", BAD_STREAMS[name][1]): 1.0}


@pytest.mark.parametrize("name", BAD_STREAMS)
async def test_misbehaving_client_is_closed_counted_with_its_reason_and_others_are_unaffected_over_tcp(
        name, tmp_path, caplog):
    # real sockets, real time: no sleeps, only waits for what the gateway sends
    sink = MemorySink()
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="127.0.0.1:0"))
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(gridgate.serve, config, sink)

        async def open_stream(client_id: str | None) -> trio.abc.Stream:
            stream = await trio.open_tcp_stream(*gateway.addresses["mqtt"])
            if client_id is not None:
                await stream.send_all(gen_connect(client_id))
                assert await read_exactly(stream, 4) == gen_connack(0)
            return stream

        def remote_of(stream: trio.SocketStream) -> str:
            host, port = stream.socket.getsockname()
            return f"{host}:{port}"

        with trio.fail_after(30):
            acked = await misbehave_beside_a_steady_device(gateway, open_stream, remote_of, caplog, name)
        gateway.stop()
    assert sum(len(b) for b in sink.batches) == gateway.pipeline.accepted == acked
    assert protocol_errors(gateway) == {("mqtt", BAD_STREAMS[name][1]): 1.0}


async def test_connections_over_max_connections_are_refused_with_connack_3(autojump_clock, start_gateway,
                                                                           nursery):
    gateway = await start_gateway(MemorySink(), connections=ConnectionsConfig(max_connections=3))
    held = [await connect_memory(gateway, nursery, f"meter-{i}") for i in range(3)]
    extra, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    assert await read_exactly(extra, 4) == gen_connack(3)
    await wait_closed(extra)
    assert gateway.metrics.registry.get_sample_value("gridgate_connections_refused_total", {"protocol": "mqtt"}) == 1
    # a slot frees once the server has closed one (it unregisters first)
    await held[0].send_all(gen_disconnect())
    await wait_closed(held[0])
    await connect_memory(gateway, nursery, "meter-9")
    assert len(gateway.conns) == 3


async def test_unsupported_protocol_level_gets_connack_1(autojump_clock, start_gateway, nursery):
    gateway = await start_gateway(MemorySink())
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    # level 5 is served by the MQTT 5 session (tests/protocols/mqtt/test_mqtt5_session.py)
    await client.send_all(gen_connect("meter-6", proto_ver=6))
    assert await read_exactly(client, 4) == gen_connack(1)
    await wait_closed(client)
    assert protocol_errors(gateway) == {("mqtt", "unsupported_protocol"): 1.0}


async def test_invalid_client_id_gets_connack_2(autojump_clock, start_gateway, nursery):
    gateway = await start_gateway(MemorySink())
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    await client.send_all(gen_connect("bad id with spaces"))
    assert await read_exactly(client, 4) == gen_connack(2)
    await wait_closed(client)
    assert protocol_errors(gateway) == {("mqtt", "identifier_rejected"): 1.0}


async def test_mqtt_31_clients_are_accepted(autojump_clock, start_gateway, nursery):
    sink = MemorySink()
    gateway = await start_gateway(sink)
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    await client.send_all(gen_connect("old-meter", proto_name=b"MQIsdp", proto_ver=3))
    assert await read_exactly(client, 4) == gen_connack(0)
    await client.send_all(gen_publish("telemetry", qos=1, mid=1, payload=b'{"battery_mv": 3600}'))
    assert await read_exactly(client, 4) == gen_puback(1)
    assert [[(r.device_id, r.fields) for r in b] for b in sink.batches] == [[("old-meter", {"battery_mv": 3600})]]


async def test_subscribe_only_to_own_command_topic(autojump_clock, start_gateway, nursery):
    gateway = await start_gateway(MemorySink())
    client = await connect_memory(gateway, nursery, "meter-6")
    await client.send_all(gen_subscribe(3, [("devices/meter-6/commands", 2), ("devices/other/commands", 1),
                                            ("#", 0)]))
    assert await read_exactly(client, 7) == gen_suback(3, [1, 0x80, 0x80])


async def test_qos2_duplicates_are_stored_once(autojump_clock, tmp_path, nursery):
    sink = MemorySink()
    async with trio.open_nursery() as gateway_nursery:
        gateway = await gateway_nursery.start(gridgate.serve, make_config(tmp_path), sink)
        c = await connect_memory(gateway, nursery, "meter-7")
        publish = gen_publish("telemetry", qos=2, mid=42, payload=b'{"temperature": 21.5}')
        await c.send_all(publish)
        assert await read_exactly(c, 4) == gen_pubrec(42)
        # redelivered (DUP) before PUBREL: acknowledged again, not stored again
        await c.send_all(gen_publish("telemetry", qos=2, mid=42, dup=True, payload=b'{"temperature": 21.5}'))
        assert await read_exactly(c, 4) == gen_pubrec(42)
        await c.send_all(gen_pubrel(42))
        assert await read_exactly(c, 4) == gen_pubcomp(42)
        # after release the id may be reused for a new reading
        await c.send_all(publish)
        assert await read_exactly(c, 4) == gen_pubrec(42)
        await c.send_all(gen_pubrel(42) + gen_disconnect())
        assert await read_exactly(c, 4) == gen_pubcomp(42)
        gateway.stop()
    temps = [r.fields["temperature_mc"] for b in sink.batches for r in b]
    assert temps == [21500, 21500]


def test_every_acknowledged_reading_survives_sigkill(tmp_path):
    # A real process, killed: no in-process stand-in kills a gateway without
    # running its finally blocks. Blocking client, so a plain (sync) test.
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
