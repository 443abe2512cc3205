"""MQTT 3.1.1 statements about what the server sends its subscribers, for
gridgate's one subscription (a device's command topic): the QoS of a command
is the granted one (MQTT-3.8.4-6), and UNSUBSCRIBE stops new commands while
the one in flight is still delivered (MQTT-3.10.4-1/2/3).

An embedded gateway under the autojump MockClock (started still, see
tests/autojump.py), commands POSTed through its HTTP handler on in-memory
streams, so every time asserted is exact."""
from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from autojump import start_still
from gridgate.config import DownlinkConfig
from inprocess import MemorySink, connect_memory, make_config, read_exactly, read_response, wait_closed
from mqtt_frames import gen_puback, gen_publish, gen_suback, gen_subscribe, gen_unsuback, gen_unsubscribe

DOWNLINK = DownlinkConfig(command_retry_s=5, command_max_attempts=3, command_ttl_s=60)
TOPIC = "devices/meter-1/commands"


async def post_command(gateway, nursery, command: dict) -> str:
    """POST a command for meter-1; its id."""
    body = json.dumps(command).encode()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_http, server)
    await client.send_all(b"POST /v1/devices/meter-1/commands HTTP/1.1\r\nHost: gw\r\nContent-Type: "
                          b"application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status, _, data = await read_response(client, bytearray())
    await wait_closed(client)
    assert status == 202
    return json.loads(data)["command_id"]


def command(command_id: str, type_: str, qos: int, mid: int = 0, dup: bool = False) -> bytes:
    body = json.dumps({"id": command_id, "type": type_, "payload": {}}, separators=(",", ":")).encode()
    return gen_publish(TOPIC, qos=qos, mid=mid, dup=dup, payload=body)


async def nothing_sent_for(client, seconds: float) -> None:
    with trio.move_on_after(seconds):
        data = await client.receive_some(1)
        pytest.fail(f"sent {data!r}")


@pytest.mark.parametrize("requested, granted", [(0, 0), (1, 1), (2, 1)])
async def test_commands_are_sent_at_the_granted_qos_mqtt_3_8_4_6(tmp_path, autojump_clock, nursery, requested,
                                                                 granted):
    gateway = await start_still(nursery, make_config(tmp_path, downlink=DOWNLINK), MemorySink())
    client = await connect_memory(gateway, nursery, "meter-1")
    await client.send_all(gen_subscribe(1, [(TOPIC, requested)]))
    assert await read_exactly(client, 5) == gen_suback(1, [granted])
    command_id = await post_command(gateway, nursery, {"type": "REBOOT"})
    expected = command(command_id, "REBOOT", granted, mid=1 if granted else 0)
    assert await read_exactly(client, len(expected)) == expected
    if granted == 0:
        await nothing_sent_for(client, 30)         # QoS 0: no packet id, never sent again
    else:
        await client.send_all(gen_puback(1))
        await nothing_sent_for(client, 30)


async def test_unsubscribe_stops_new_commands_and_completes_the_one_in_flight_mqtt_3_10_4_1_to_3(
        tmp_path, autojump_clock, nursery):
    gateway = await start_still(nursery, make_config(tmp_path, downlink=DOWNLINK), MemorySink())
    client = await connect_memory(gateway, nursery, "meter-1")
    await client.send_all(gen_subscribe(1, [(TOPIC, 1)]))
    assert await read_exactly(client, 5) == gen_suback(1, [1])
    first = await post_command(gateway, nursery, {"type": "REBOOT"})
    expected = command(first, "REBOOT", 1, mid=1)
    assert await read_exactly(client, len(expected)) == expected
    start = trio.current_time()
    await client.send_all(gen_unsubscribe(2, [TOPIC]))             # the filter matches byte for byte
    assert await read_exactly(client, 4) == gen_unsuback(2)
    second = await post_command(gateway, nursery, {"type": "SYNC"})  # accepted, held for a subscription
    # the command in flight is still delivered: sent again with DUP at its retry time, until acknowledged
    again = command(first, "REBOOT", 1, mid=1, dup=True)
    assert await read_exactly(client, len(again)) == again
    assert trio.current_time() - start == 5.0
    await client.send_all(gen_puback(1))
    await nothing_sent_for(client, 20)                              # no new command while unsubscribed
    await client.send_all(gen_subscribe(3, [(TOPIC, 1)]))
    assert await read_exactly(client, 5) == gen_suback(3, [1])
    held = command(second, "SYNC", 1, mid=2)
    assert await read_exactly(client, len(held)) == held


async def test_commands_go_out_and_are_resent_in_the_order_they_were_posted_mqtt_4_6_0_1(tmp_path, autojump_clock,
                                                                                        nursery):
    # a client's rule (MQTT-4.6.0-1) that the gateway keeps for its own QoS 1 sends as well
    gateway = await start_still(nursery, make_config(tmp_path, downlink=DOWNLINK), MemorySink())
    client = await connect_memory(gateway, nursery, "meter-1")
    types = ("REBOOT", "SYNC", "RESET")
    ids = [await post_command(gateway, nursery, {"type": type_}) for type_ in types]
    await client.send_all(gen_subscribe(1, [(TOPIC, 1)]))           # all three were waiting for it
    assert await read_exactly(client, 5) == gen_suback(1, [1])
    sent = list(zip(ids, types, strict=True))
    first = b"".join(command(i, t, 1, mid=n) for n, (i, t) in enumerate(sent, 1))
    assert await read_exactly(client, len(first)) == first
    again = b"".join(command(i, t, 1, mid=n, dup=True) for n, (i, t) in enumerate(sent, 1))
    assert await read_exactly(client, len(again)) == again
