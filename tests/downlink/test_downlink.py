"""Downlink commands in an embedded gateway under the autojump MockClock:
routing (offline, takeover), MQTT redelivery with DUP and expiry at exact
times, config push after the SUBACK, WebSocket command acks and heartbeats
(trio-websocket's client over in-memory streams), and the config checks.

Commands are POSTed through the HTTP listener's connection handler on an
in-memory stream, once per HTTP engine (ids fast/std). Gateways start with
the clock still (``autojump.start_still``), so every time is exact and the
same on a busy machine as on an idle one."""
from __future__ import annotations

import json

import msgspec
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, wrap_client_stream

from autojump import start_still
from gridgate.config import Config, ConfigError, ConnectionsConfig, DownlinkConfig, HTTPConfig, WebSocketConfig
from gridgate.downlink.commands import CommandOutbox, new_command
from gridgate.observability.metrics import Metrics
from inprocess import MemorySink, connect_memory, make_config, read_exactly, read_response, wait_closed
from mqtt_frames import gen_puback, gen_publish, gen_suback, gen_subscribe

DOWNLINK = DownlinkConfig(command_retry_s=5, command_max_attempts=3, command_ttl_s=60)


@pytest.fixture(params=["fast", "std"], ids=["fast", "std"])
def engine(request) -> str:
    """The HTTP engine that takes the POST /v1/devices/{id}/commands."""
    return request.param


def http(engine: str) -> HTTPConfig:
    return HTTPConfig(listen="", engine=engine)


async def post_command(gateway, nursery, device_id: str, command: dict) -> tuple[int, dict]:
    """POST /v1/devices/{device_id}/commands over a fresh in-memory HTTP connection."""
    body = json.dumps(command).encode()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_http, server)
    await client.send_all(b"POST /v1/devices/%s/commands HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                          b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (device_id.encode(), len(body), body))
    status, _, data = await read_response(client, bytearray())
    await wait_closed(client)
    await client.aclose()
    return status, json.loads(data)


def command_publish(command_id: str, type_: str, payload: object, mid: int, dup: bool = False,
                    device_id: str = "meter-1") -> bytes:
    body = json.dumps({"id": command_id, "type": type_, "payload": payload}, separators=(",", ":")).encode()
    return gen_publish(f"devices/{device_id}/commands", qos=1, mid=mid, dup=dup, payload=body)


def counter(gateway, name: str, **labels: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def subscribe(client, device_id: str, qos: int = 1) -> None:
    await client.send_all(gen_subscribe(1, [(f"devices/{device_id}/commands", qos)]))
    assert await read_exactly(client, 5) == gen_suback(1, [qos])


async def test_command_to_an_offline_device_is_404(tmp_path, engine, autojump_clock, nursery):
    gateway = await start_still(nursery, make_config(tmp_path, http=http(engine)), MemorySink())
    assert await post_command(gateway, nursery, "meter-0", {"type": "REBOOT"}) == (
        404, {"error": "device_offline", "detail": "no live connection holds device 'meter-0'"})


async def test_after_a_takeover_the_command_goes_to_the_new_connection(tmp_path, engine, autojump_clock, nursery):
    gateway = await start_still(nursery, make_config(tmp_path, http=http(engine)), MemorySink())
    old = await connect_memory(gateway, nursery, "meter-1")
    await subscribe(old, "meter-1")
    new = await connect_memory(gateway, nursery, "meter-1")
    await subscribe(new, "meter-1")
    with trio.fail_after(1):
        await wait_closed(old)
    status, body = await post_command(gateway, nursery, "meter-1", {"type": "REBOOT", "payload": {"delay_s": 3}})
    assert (status, body["delivered"]) == (202, True)
    expected = command_publish(body["command_id"], "REBOOT", {"delay_s": 3}, mid=1)
    assert await read_exactly(new, len(expected)) == expected
    await new.send_all(gen_puback(1))
    await trio.sleep(3600)   # acknowledged: never resent
    assert counter(gateway, "gridgate_commands_acknowledged_total", protocol="mqtt") == 1
    assert counter(gateway, "gridgate_commands_redelivered_total", protocol="mqtt") == 0


async def test_unacknowledged_command_is_resent_with_dup_then_expires(tmp_path, engine, autojump_clock):
    config = make_config(tmp_path, downlink=DOWNLINK, http=http(engine))
    async with trio.open_nursery() as nursery:
        gateway = await start_still(nursery, config, MemorySink())
        client = await connect_memory(gateway, nursery, "meter-1")
        await subscribe(client, "meter-1")
        status, body = await post_command(gateway, nursery, "meter-1", {"type": "REBOOT"})
        assert status == 202
        start = trio.current_time()
        first = command_publish(body["command_id"], "REBOOT", {}, mid=1)
        again = command_publish(body["command_id"], "REBOOT", {}, mid=1, dup=True)
        times = []
        for expected in (first, again, again):   # command_max_attempts = 3
            assert await read_exactly(client, len(expected)) == expected
            times.append(trio.current_time() - start)
        assert times == [0.0, 5.0, 10.0]
        with trio.move_on_after(200):              # (idle_timeout_s 300 would close it)
            await client.receive_some(1)
            pytest.fail("sent after the last attempt")
        assert counter(gateway, "gridgate_commands_expired_total", protocol="mqtt", reason="attempts") == 1
        assert counter(gateway, "gridgate_commands_sent_total", protocol="mqtt") == 1
        assert counter(gateway, "gridgate_commands_redelivered_total", protocol="mqtt") == 2
        # a late PUBACK for the expired command changes nothing
        await client.send_all(gen_puback(1))
        await trio.testing.wait_all_tasks_blocked()
        assert counter(gateway, "gridgate_commands_acknowledged_total", protocol="mqtt") == 0
        assert len(gateway.conns) == 1
        gateway.stop()
    # closing the connection found nothing pending: still one expiry in all
    assert gateway.metrics.render().count(b"gridgate_commands_expired_total{") == 1


# The command is posted at these clock readings. 30.0 is where the sum of
# sleeps this test once used, 30.0 + 29.999 + 0.001, falls one ulp short of
# the outbox's deadline 30.0 + 30 (the test woke first and saw no expiry);
# the deadlines below are absolute, as the outbox's are.
@pytest.mark.parametrize("posted_at", [0.0, 30.0, 98970.0])
async def test_command_waits_for_the_subscription_and_expires_after_its_ttl(tmp_path, engine, posted_at,
                                                                           autojump_clock, nursery):
    config = make_config(tmp_path, downlink=DownlinkConfig(command_ttl_s=30), http=http(engine))
    gateway = await start_still(nursery, config, MemorySink())
    await trio.sleep_until(posted_at)
    client = await connect_memory(gateway, nursery, "meter-1")
    start = trio.current_time()
    assert start == posted_at
    assert (await post_command(gateway, nursery, "meter-1", {"type": "REBOOT"}))[0] == 202
    await trio.sleep_until(start + 29.999)
    await trio.testing.wait_all_tasks_blocked()
    assert counter(gateway, "gridgate_commands_expired_total", protocol="mqtt", reason="ttl") == 0
    await trio.sleep_until(start + 30)
    await trio.testing.wait_all_tasks_blocked()     # the outbox woke at the same deadline: it has run
    assert trio.current_time() - start == 30.0
    assert counter(gateway, "gridgate_commands_expired_total", protocol="mqtt", reason="ttl") == 1
    await subscribe(client, "meter-1")       # nothing left to deliver
    with trio.move_on_after(60):
        await client.receive_some(1)
        pytest.fail("an expired command was sent")
    assert counter(gateway, "gridgate_commands_sent_total", protocol="mqtt") == 0


async def test_device_config_is_pushed_right_after_the_suback(tmp_path, autojump_clock, nursery):
    config = make_config(tmp_path, devices={"meter-1": {"report_interval_s": 15, "mode": "eco"}})
    gateway = await start_still(nursery, config, MemorySink())
    client = await connect_memory(gateway, nursery, "meter-1")
    await client.send_all(gen_subscribe(1, [("devices/meter-1/commands", 1)]))
    suback = gen_suback(1, [1])
    assert await read_exactly(client, len(suback)) == suback
    head = await read_exactly(client, 1)
    length = multiplier = 0
    for _ in range(4):                              # the remaining length (section 2.2.3): at most 4 bytes
        byte = await read_exactly(client, 1)
        head += byte
        length += (byte[0] & 0x7F) << (7 * multiplier)
        multiplier += 1
        if byte[0] < 0x80:
            break
    packet = head + await read_exactly(client, length)
    command = json.loads(packet[len(head) + 2 + len("devices/meter-1/commands") + 2:])
    assert packet == command_publish(command["id"], "UPDATE_CONFIG",
                                     {"report_interval_s": 15, "mode": "eco"}, mid=1)
    other = await connect_memory(gateway, nursery, "meter-2")   # no config: nothing pushed
    await subscribe(other, "meter-2")
    with trio.move_on_after(60):
        await other.receive_some(1)
        pytest.fail("pushed a config to a device that has none")


def test_outbox_is_bounded_and_closing_expires_what_is_pending():
    outbox = CommandOutbox("mqtt", DownlinkConfig(max_queued=2), Metrics(), redeliver=True, packet_ids=True)
    assert outbox.offer(new_command("A", {}), 0.0) and outbox.offer(new_command("B", {}), 0.0)
    assert not outbox.offer(new_command("C", {}), 0.0)
    outbox.set_ready(True)
    sends, next_poll = outbox.poll(0.0)
    assert [s.key for s in sends] == [1, 2] and next_poll == 10.0
    assert outbox.ack(2) and not outbox.ack(2)
    outbox.close()
    assert outbox.metrics.registry.get_sample_value(
        "gridgate_commands_expired_total", {"protocol": "mqtt", "reason": "disconnected"}) == 1


async def open_ws(gateway, nursery, path: str):
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_ws, server)
    return await wrap_client_stream(nursery, client, "gw", path)


async def test_websocket_command_ack_and_expiry(tmp_path, engine, autojump_clock, nursery):
    config = make_config(tmp_path, downlink=DownlinkConfig(command_ttl_s=30), http=http(engine),
                         websocket=WebSocketConfig(listen="", ping_interval_s=0))
    gateway = await start_still(nursery, config, MemorySink())
    ws = await open_ws(gateway, nursery, "/v1/ws?device_id=meter-1")
    await ws.send_message(msgspec.msgpack.encode({"battery_mv": 3000}))   # the device speaks MessagePack
    await trio.testing.wait_all_tasks_blocked()
    status, first = await post_command(gateway, nursery, "meter-1", {"type": "REBOOT"})
    assert status == 202
    message = await ws.get_message()
    assert msgspec.msgpack.decode(message) == {"command": {"id": first["command_id"], "type": "REBOOT",
                                                           "payload": {}}}
    await ws.send_message(json.dumps({"command_ack": first["command_id"]}))   # now JSON
    await trio.testing.wait_all_tasks_blocked()
    status, second = await post_command(gateway, nursery, "meter-1", {"type": "PING_ME"})
    sent = trio.current_time()
    assert json.loads(await ws.get_message())["command"]["id"] == second["command_id"]
    assert trio.current_time() == sent
    await trio.sleep_until(sent + 30)        # never acknowledged, never resent
    await trio.testing.wait_all_tasks_blocked()   # the outbox's own wake-up at sent + 30 ran too
    assert counter(gateway, "gridgate_commands_acknowledged_total", protocol="ws") == 1
    assert counter(gateway, "gridgate_commands_expired_total", protocol="ws", reason="ttl") == 1
    assert gateway.conns.device_info("meter-1")["protocol"] == "ws"
    await ws.aclose()


async def test_websocket_pings_count_as_heartbeats(tmp_path, autojump_clock, nursery):
    config = make_config(tmp_path, connections=ConnectionsConfig(idle_timeout_s=300, reap_interval_s=30),
                         websocket=WebSocketConfig(listen="", ping_interval_s=0))
    gateway = await start_still(nursery, config, MemorySink())
    start = trio.current_time()             # the reaper scans at start + 30 k
    ws = await open_ws(gateway, nursery, "/v1/ws?device_id=meter-1")
    for _ in range(20):                     # 20 x 100 s: far past idle_timeout_s
        await trio.sleep(100)
        await ws.ping()                     # returns once the pong is back
    assert gateway.conns.reaped == 0 and len(gateway.conns) == 1
    assert trio.current_time() - start == 2000.0
    with trio.fail_after(400):
        with pytest.raises(ConnectionClosed):   # the reaper closes it
            await ws.get_message()
    # silent since 2000: the first scan at least 300 s later is the one at 2310
    assert trio.current_time() - start == 2310.0
    assert gateway.conns.reaped == 1


async def test_server_pings_keep_a_quiet_but_live_websocket(tmp_path, autojump_clock, nursery):
    config = make_config(tmp_path, connections=ConnectionsConfig(idle_timeout_s=300, reap_interval_s=30),
                         websocket=WebSocketConfig(listen="", ping_interval_s=30))
    gateway = await start_still(nursery, config, MemorySink())
    await open_ws(gateway, nursery, "/v1/ws?device_id=meter-1")   # its library answers pings
    await trio.sleep(3600)
    assert gateway.conns.reaped == 0 and len(gateway.conns) == 1


def test_device_configs_are_checked_at_load(tmp_path):
    bad_file = tmp_path / "devices.json"
    bad_file.write_text(json.dumps({"meter-1": {"a": 1}, "bad id": {}, "meter-2": [1]}))
    toml = tmp_path / "g.toml"
    toml.write_text(f'[downlink]\ndevices_file = "{bad_file}"\n[devices."meter-1"]\nb = 2\n'
                    '[devices."-x"]\nc = 3\n[devices.meter-3]\nbig = "' + "x" * 70000 + '"\n')
    with pytest.raises(ConfigError) as info:
        Config.load(toml, env={"ENVIRONMENT": "t", "SERVICE_NAME": "s"})
    where = f"downlink.devices_file {str(bad_file)!r}"
    assert info.value.problems == [
        "devices.-x: not a valid device id ([A-Za-z0-9][A-Za-z0-9._:-]{0,127})",
        "devices.meter-3: UPDATE_CONFIG of 70085 bytes exceeds downlink.max_command_bytes 65536",
        f"{where}: device 'bad id': not a valid device id ([A-Za-z0-9][A-Za-z0-9._:-]{{0,127}})",
        f"{where}: device 'meter-2': the config must be a table, not list",
        f"device 'meter-1' is configured both in [devices] and in {str(bad_file)!r}",
    ]
    missing = tmp_path / "g2.toml"
    missing.write_text('[downlink]\ndevices_file = "/nonexistent/devices.toml"\n')
    with pytest.raises(ConfigError) as info:
        Config.load(missing, env={"ENVIRONMENT": "t", "SERVICE_NAME": "s"})
    assert info.value.problems == ["downlink.devices_file '/nonexistent/devices.toml' does not exist"]
    good = tmp_path / "g3.toml"
    good.write_text('[devices."meter-1"]\nreport_interval_s = 15\nlimits = {max_c = 80}\n')
    config = Config.load(good, env={"ENVIRONMENT": "t", "SERVICE_NAME": "s"})
    assert config.device_configs() == {"meter-1": {"report_interval_s": 15, "limits": {"max_c": 80}}}
    assert '[devices.meter-1]\nreport_interval_s = 15\nlimits = {max_c = 80}\n' in config.to_toml()
