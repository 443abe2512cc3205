"""MQTT 5 downlink commands under the autojump MockClock: what is left of a
command's TTL as the Message Expiry of each (re)delivery, an expired command
never sent, a resumed session's in-flight command redelivered with DUP=1 and
its original packet id, and the outbox's answers (the Response Topic's
command_ack) sans-IO. Frames built independently of the codec
(tests/mqtt5_frames.py); the gateway starts with the clock still
(``autojump.start_still``), so every time is exact."""
from __future__ import annotations

import math

import trio
import trio.testing

from autojump import start_still
from gridgate.config import DownlinkConfig
from gridgate.downlink.commands import CommandOutbox, new_command
from gridgate.downlink.wire import Command
from gridgate.observability.metrics import Metrics
from inprocess import MemorySink, make_config, read_packet
from mqtt5_frames import (
    CORRELATION_DATA,
    MESSAGE_EXPIRY,
    RESPONSE_TOPIC,
    SESSION_EXPIRY,
    connect5,
    prop_bin,
    prop_str,
    prop_u32,
    props,
    publish5,
    suback5,
    subscribe5,
)

DOWNLINK = DownlinkConfig(command_retry_s=5, command_max_attempts=5, command_ttl_s=12)
PING = b'{"id":"c-1","type":"PING","payload":null}'


def command_props(expiry: int, command_id: str = "c-1") -> bytes:
    return props(prop_u32(MESSAGE_EXPIRY, expiry), prop_str(RESPONSE_TOPIC, "devices/meter-1/commands/ack"),
                 prop_bin(CORRELATION_DATA, command_id.encode()))




async def connect(gateway, nursery, clean_start: bool = True, session_expiry: int = 0) -> trio.abc.Stream:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_mqtt, server)
    properties = props(prop_u32(SESSION_EXPIRY, session_expiry)) if session_expiry else b"\x00"
    await client.send_all(connect5("meter-1", clean_start=clean_start, properties=properties))
    connack = await read_packet(client)
    assert connack[0] == 0x20 and connack[3] == 0x00, connack             # accepted
    return client


def counter(gateway, name: str, **labels: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_each_redelivery_carries_what_is_left_of_the_ttl_and_an_expired_command_is_not_sent(
        tmp_path, autojump_clock, nursery):
    gateway = await start_still(nursery, make_config(tmp_path, downlink=DOWNLINK), MemorySink())
    start = trio.current_time()
    client = await connect(gateway, nursery)
    await client.send_all(subscribe5(1, [("devices/meter-1/commands", 1)]))
    assert await read_packet(client) == suback5(1, [0x01])
    assert gateway.conns.get_device("meter-1").send_command(Command(id="c-1", type="PING", payload=None))
    # sent at 0, resent every 5 s: 12, 7, then 2 seconds left of the TTL
    for expiry, dup in ((12, False), (7, True), (2, True)):
        assert await read_packet(client) == publish5("devices/meter-1/commands", PING, qos=1, mid=1, dup=dup,
                                                     properties=command_props(expiry))
    # the next retry (15 s) is past the TTL (12 s): expired at 12, never sent again
    with trio.move_on_at(start + 60):
        await read_packet(client)
        raise AssertionError("a command past its TTL was sent")
    assert counter(gateway, "gridgate_commands_expired_total", protocol="mqtt", reason="ttl") == 1
    assert counter(gateway, "gridgate_commands_redelivered_total", protocol="mqtt") == 2


async def test_a_resumed_session_redelivers_with_dup_its_packet_id_and_what_is_left_of_the_ttl(
        tmp_path, autojump_clock, nursery):
    gateway = await start_still(nursery, make_config(tmp_path, downlink=DownlinkConfig(
        command_retry_s=30, command_max_attempts=3, command_ttl_s=60)), MemorySink())
    start = trio.current_time()
    client = await connect(gateway, nursery, session_expiry=600)
    await client.send_all(subscribe5(1, [("devices/meter-1/commands", 1)]))
    assert await read_packet(client) == suback5(1, [0x01])
    session = gateway.conns.get_device("meter-1")
    assert session.send_command(Command(id="c-0", type="PING", payload=None))
    assert (await read_packet(client))[0] == 0x32                       # mid 1, never acknowledged either
    assert session.send_command(Command(id="c-1", type="PING", payload=None))
    assert await read_packet(client) == publish5("devices/meter-1/commands", PING, qos=1, mid=2,
                                                 properties=command_props(60))
    await client.aclose()
    await trio.sleep_until(start + 20)
    client = await connect(gateway, nursery, clean_start=False, session_expiry=600)
    # both again at once (DUP=1, their own packet ids), 40 s left of each TTL
    frames = {await read_packet(client), await read_packet(client)}
    assert frames == {
        publish5("devices/meter-1/commands", PING.replace(b"c-1", b"c-0"), qos=1, mid=1, dup=True,
                 properties=command_props(40, "c-0")),
        publish5("devices/meter-1/commands", PING, qos=1, mid=2, dup=True, properties=command_props(40))}
    await client.aclose()
    # back after both TTLs ran out: Session Present, but no command is sent
    await trio.sleep_until(start + 61)
    client = await connect(gateway, nursery, clean_start=False, session_expiry=600)
    with trio.move_on_at(start + 200):
        await read_packet(client)
        raise AssertionError("an expired command was sent")
    assert counter(gateway, "gridgate_commands_sent_total", protocol="mqtt") == 2


class _Settings:
    command_ttl_s = 10.0
    command_retry_s = 5.0
    command_max_attempts = 1
    max_queued = 2


def test_outbox_answers_count_each_command_once_and_are_bounded():
    metrics = Metrics()
    outbox = CommandOutbox("mqtt", _Settings(), metrics, redeliver=True, packet_ids=True, responses=True)
    outbox.set_ready(True)
    commands = [new_command("PING", None) for _ in range(3)]
    for c in commands[:2]:
        assert outbox.offer(c, 0.0)
    sends, _ = outbox.poll(0.0)
    assert [s.expires for s in sends] == [10.0, 10.0]

    def acknowledged() -> float:
        return metrics.registry.get_sample_value("gridgate_commands_acknowledged_total", {"protocol": "mqtt"}) or 0

    assert outbox.answer(commands[0].id, 1.0) and acknowledged() == 1        # before its PUBACK
    assert not outbox.ack(sends[0].key)                                     # its PUBACK after: nothing in flight
    assert outbox.ack(sends[1].key) and acknowledged() == 2
    assert outbox.answer(commands[1].id, 2.0) and acknowledged() == 2       # after its PUBACK: counted once
    assert not outbox.answer(commands[1].id, 2.0)                           # answered already
    assert not outbox.answer("forged", 2.0)
    # answerable until the TTL only, and at most max_queued of them
    assert outbox.offer(commands[2], 3.0)
    (send,), _ = outbox.poll(3.0)
    assert outbox.ack(send.key)
    assert not outbox.answer(commands[2].id, 13.0)
    for i in range(3):
        outbox._answerable(f"x{i}", math.inf, True)
    assert list(outbox.answerable) == ["x1", "x2"]
