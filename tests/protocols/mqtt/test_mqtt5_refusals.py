"""Connections the listener refuses before serving them (max_connections,
max_connections_per_ip, shedding): a v5 client gets a v5 CONNACK with the
reason code and a Reason String, a 3.1/3.1.1 client 3.1.1's 0x03, read from
at most 12 bytes of its CONNECT within half a second. Raw bytes in-process
under the autojump clock (frames built independently of the codec), and
paho-mqtt v5 against a ``gridgate serve`` process."""
from __future__ import annotations

import threading

import paho.mqtt.client as paho
import trio
import trio.testing

from gatewayproc import GatewayProcess, gridgate_env
from gridgate.config import ConnectionsConfig, LimitsConfig
from inprocess import MemorySink, connect_memory, read_exactly, wait_closed
from mqtt5_frames import REASON_STRING, connack5, connect5, prop_str, props
from mqtt_frames import gen_connack, gen_connect

BUSY = connack5(0x89, props(prop_str(REASON_STRING, "server busy: max_connections reached")))


async def refused(gateway, nursery, hello: bytes, *, chunk: int = 0) -> bytes:
    """What a refused connection that sends ``hello`` (in ``chunk``-byte pieces, 0: at once) reads back
    before the server closes it."""
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    pieces = [hello[i:i + chunk] for i in range(0, len(hello), chunk)] if chunk else [hello]
    for piece in pieces:
        try:
            await client.send_all(piece)
        except trio.BrokenResourceError:
            break                                # answered and closed before the rest
        await trio.sleep(0.01)
    answer = b""
    while data := await client.receive_some(1024):
        answer += data
    return answer


async def test_over_max_connections_a_v5_client_gets_0x89_and_a_311_client_0x03(autojump_clock, start_gateway,
                                                                                nursery):
    gateway = await start_gateway(MemorySink(), connections=ConnectionsConfig(max_connections=1))
    await connect_memory(gateway, nursery, "meter-0")
    assert await refused(gateway, nursery, connect5("meter-1")) == BUSY
    assert await refused(gateway, nursery, connect5("meter-1"), chunk=1) == BUSY     # a byte at a time
    assert await refused(gateway, nursery, gen_connect("meter-1")) == gen_connack(3)
    # silence, garbage and 3.1's MQIsdp: 0x03 (the half second is the autojump clock's)
    start = trio.current_time()
    assert await refused(gateway, nursery, b"") == gen_connack(3)
    assert trio.current_time() - start < 1.0
    assert await refused(gateway, nursery, b"GET / HTTP/1.1\r\n\r\n") == gen_connack(3)
    assert await refused(gateway, nursery, b"\x10\x10\x00\x06MQIsdp\x03\x02\x00\x00\x00\x02m1") == gen_connack(3)
    assert gateway.metrics.registry.get_sample_value("gridgate_connections_refused_total", {"protocol": "mqtt"}) == 6


async def test_a_refused_client_that_keeps_sending_costs_at_most_12_bytes(autojump_clock, start_gateway, nursery):
    gateway = await start_gateway(MemorySink(), connections=ConnectionsConfig(max_connections=1))
    await connect_memory(gateway, nursery, "meter-0")
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    hello = connect5("meter-1")
    assert len(hello) > 12
    await client.send_all(hello[:12])        # the refusal needs no more: the rest is never read
    assert await read_exactly(client, len(BUSY)) == BUSY
    await wait_closed(client)


async def test_over_max_connections_per_ip_a_v5_client_gets_0x97(autojump_clock, start_gateway, nursery):
    gateway = await start_gateway(MemorySink(), limits=LimitsConfig(max_connections_per_ip=1))
    await connect_memory(gateway, nursery, "meter-0")
    assert await refused(gateway, nursery, connect5("meter-1")) == connack5(
        0x97, props(prop_str(REASON_STRING, "quota exceeded: max_connections_per_ip reached")))


def test_paho_v5_learns_server_busy_from_its_connack(tmp_path):
    gw = GatewayProcess(tmp_path / "data", env=gridgate_env(GRIDGATE_CONNECTIONS_MAX_CONNECTIONS="1"))
    try:
        first = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="meter-1", protocol=paho.MQTTv5)
        assert first.connect(*gw.mqtt) == 0
        first.loop_start()
        got: list[tuple[int, str | None]] = []
        done = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties) -> None:
            got.append((reason_code.value, getattr(properties, "ReasonString", None)))
            done.set()

        second = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="meter-2", protocol=paho.MQTTv5)
        second.on_connect = on_connect
        for _ in range(100):                        # bounded: until the first holds the one slot
            if gw.metric('gridgate_connections{protocol="mqtt"}') == 1:
                break
            threading.Event().wait(0.05)
        second.connect(*gw.mqtt)
        second.loop_start()
        assert done.wait(20), "no CONNACK"
        second.loop_stop()
        first.disconnect()
        first.loop_stop()
        assert got == [(0x89, "server busy: max_connections reached")]
    finally:
        assert gw.stop() == 0, gw.log()
