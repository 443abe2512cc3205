"""The MQTT 5.0 session, byte for byte: every reason code it sends, checked
against frames built independently of the codec (tests/mqtt5_frames.py).

An embedded gateway in the test's own Trio run, over both transports the
session knows: a real Unix socket pair (the direct-write path, as on TCP)
and Trio's in-memory stream (the writer-task path, as under WebSocket).
Real clock (the spool opens on worker threads, which the autojump clock
would leap over), every wait bounded by fail_after and waiting on the event
it needs, never on elapsed time.
"""
from __future__ import annotations

import ssl
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import gridgate
from gridgate.config import AuthConfig, Config, ConfigError, DownlinkConfig, LimitsConfig, MQTTConfig, TLSConfig
from gridgate.downlink.wire import Command
from gridgate.protocols.mqtt.session5 import close_code, trace_context
from gridgate.protocols.mqtt.session_store import SessionStore, StoredSession
from gridgate.security.passwords import format_line, hash_password
from inprocess import GatedSink, MemorySink, make_config, read_exactly, read_packet, wait_closed
from mqtt5_frames import (
    AUTH_METHOD,
    CONTENT_TYPE,
    CORRELATION_DATA,
    MAXIMUM_PACKET_SIZE,
    MESSAGE_EXPIRY,
    PAYLOAD_FORMAT,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    REQUEST_PROBLEM_INFO,
    RESPONSE_TOPIC,
    RETAIN_AVAILABLE,
    SERVER_KEEP_ALIVE,
    SESSION_EXPIRY,
    SHARED_AVAILABLE,
    SUBSCRIPTION_ID_AVAILABLE,
    TOPIC_ALIAS,
    TOPIC_ALIAS_MAXIMUM,
    WILDCARD_AVAILABLE,
    connack5,
    connect5,
    disconnect5,
    pingreq5,
    pingresp5,
    prop_bin,
    prop_byte,
    prop_str,
    prop_u16,
    prop_u32,
    prop_user,
    props,
    puback5,
    pubcomp5,
    publish5,
    pubrec5,
    pubrel5,
    suback5,
    subscribe5,
    unsuback5,
    unsubscribe5,
)
from mqtt_frames import gen_connack, gen_connect
from security.pki import CA

TIMEOUT = 20


def socket_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


PAIRS = {"socket": socket_pair, "memory": trio.testing.memory_stream_pair}


def server_connack(receive_maximum: int = 1024, max_packet: int = 1_048_576, alias_max: int = 16,
                   keepalive: int | None = None) -> bytes:
    """The CONNACK DESIGN section 4 says the gateway sends, properties in identifier order."""
    items = [prop_u16(SERVER_KEEP_ALIVE, keepalive)] if keepalive is not None else []
    items.append(prop_u16(RECEIVE_MAXIMUM, receive_maximum))
    if alias_max:
        items.append(prop_u16(TOPIC_ALIAS_MAXIMUM, alias_max))
    items += [prop_byte(RETAIN_AVAILABLE, 0), prop_u32(MAXIMUM_PACKET_SIZE, max_packet),
              prop_byte(WILDCARD_AVAILABLE, 0), prop_byte(SUBSCRIPTION_ID_AVAILABLE, 0),
              prop_byte(SHARED_AVAILABLE, 0)]
    return connack5(0, props(*items))


def command_props(expiry: int, command_id: str, client_id: str = "meter-1") -> bytes:
    """A command PUBLISH's properties: Message Expiry, Response Topic, Correlation Data (the command id)."""
    return props(prop_u32(MESSAGE_EXPIRY, expiry), prop_str(RESPONSE_TOPIC, f"devices/{client_id}/commands/ack"),
                 prop_bin(CORRELATION_DATA, command_id.encode()))


def reason(text: str) -> bytes:
    return props(prop_str(REASON_STRING, text))




@asynccontextmanager
async def serving(sink=None, **sections):
    """A gateway (its spool in a temporary directory) and a nursery for its
    connection handlers; graceful stop at the end, which also ends the
    connections still open."""
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(TIMEOUT):
        config = make_config(Path(tmp), **sections)
        async with trio.open_nursery() as gateway_nursery:
            gateway = await gateway_nursery.start(gridgate.serve, config, sink if sink is not None else MemorySink())
            async with trio.open_nursery() as nursery:
                yield gateway, nursery
                gateway.stop()          # closes the connections the test left open


async def open_client(gateway, nursery, pair: str = "socket"):
    client, server = PAIRS[pair]()
    nursery.start_soon(gateway.handle_mqtt, server)
    return client


async def connected(gateway, nursery, client_id: str = "meter-1", pair: str = "socket", properties: bytes = b"\x00",
                    **kw) -> trio.abc.Stream:
    client = await open_client(gateway, nursery, pair)
    await client.send_all(connect5(client_id, properties=properties))
    assert await read_packet(client) == server_connack(**kw)
    return client


def dead_letters(gateway) -> list[dict]:
    return list(gateway.spool.spool.iter_rejections())


# -- CONNECT --------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS)
async def test_level_5_connect_gets_the_servers_connack_properties(pair):
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery, "meter-1", pair)
        await client.send_all(pingreq5())
        assert await read_packet(client) == pingresp5()
        await client.send_all(disconnect5())
        await wait_closed(client)


async def test_connect_split_byte_by_byte_is_served_as_5():
    async with serving() as (gateway, nursery):
        client = await open_client(gateway, nursery)
        for b in connect5("meter-1"):
            await client.send_all(bytes([b]))
        assert await read_packet(client) == server_connack()


async def test_3_1_1_and_3_1_clients_are_still_served_by_the_3_1_1_session():
    async with serving() as (gateway, nursery):
        for level, name in ((4, "MQTT"), (3, "MQIsdp")):
            client = await open_client(gateway, nursery)
            await client.send_all(gen_connect(f"meter-{level}", proto_ver=level, proto_name=name.encode()))
            assert await read_exactly(client, 4) == gen_connack(0)
        client = await open_client(gateway, nursery)
        await client.send_all(gen_connect("meter-6", proto_ver=6))
        assert await read_exactly(client, 4) == gen_connack(1)
        await wait_closed(client)


async def test_config_sets_receive_maximum_alias_maximum_and_server_keep_alive():
    mqtt = MQTTConfig(listen="", receive_maximum=10, topic_alias_maximum=0, max_keepalive_s=60)
    async with serving(mqtt=mqtt) as (gateway, nursery):
        for keepalive in (0, 61):
            client = await open_client(gateway, nursery)
            await client.send_all(connect5(f"meter-{keepalive}", keepalive=keepalive))
            assert await read_packet(client) == server_connack(10, alias_max=0, keepalive=60)
            assert gateway.conns.get_device(f"meter-{keepalive}").keepalive_timeout == 90
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-30", keepalive=30))
        assert await read_packet(client) == server_connack(10, alias_max=0)        # a shorter one stands
        assert gateway.conns.get_device("meter-30").keepalive_timeout == 45


@pytest.mark.parametrize("client_id", ["", "bad id", "x" * 129])
async def test_client_id_that_is_no_device_id_gets_0x85(client_id):
    async with serving() as (gateway, nursery):
        client = await open_client(gateway, nursery)
        await client.send_all(connect5(client_id))
        assert await read_packet(client) == connack5(0x85, reason("identifier rejected"))
        await wait_closed(client)


async def test_authentication_method_gets_0x8c():
    async with serving() as (gateway, nursery):
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1", properties=props(prop_str(AUTH_METHOD, "SCRAM-SHA-1"))))
        assert await read_packet(client) == connack5(0x8C, reason(
            "authentication method 'SCRAM-SHA-1' is not supported"))
        await wait_closed(client)


async def test_flapping_client_id_is_banned_with_0x8a():
    limits = LimitsConfig(flapping_max_connects=2, flapping_window_s=60, flapping_ban_s=300)
    async with serving(limits=limits) as (gateway, nursery):
        for _ in range(2):
            client = await connected(gateway, nursery, "meter-1")
            await client.send_all(disconnect5())
            await wait_closed(client)
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1"))
        assert await read_packet(client) == connack5(0x8A, reason("banned: flapping"))
        await wait_closed(client)


async def test_malformed_connect_gets_connack_not_disconnect():
    async with serving() as (gateway, nursery):
        client = await open_client(gateway, nursery)
        bad = bytearray(connect5("meter-1"))
        bad[9] |= 0x01                       # the reserved connect flag (MQTT-3.1.2-3)
        await client.send_all(bytes(bad))
        packet = await read_packet(client)
        assert packet[:4] == b"\x20" + bytes([len(packet) - 2]) + b"\x00\x81"
        await wait_closed(client)


# -- PUBLISH: the reason code says what became of the reading ---------------------------------


@pytest.mark.parametrize("pair", PAIRS)
async def test_good_reading_gets_0x00_once_durable_and_is_stored(pair):
    sink = GatedSink()
    async with serving(sink) as (gateway, nursery):
        client = await connected(gateway, nursery, "meter-1", pair)
        await client.send_all(publish5("telemetry", b'{"temperature": 21.5}', qos=1, mid=7))
        with trio.fail_after(TIMEOUT):
            while not sink.waiting:
                await trio.sleep(0.01)
        # nothing while the sink holds the batch (0x00 means durable): the
        # next packet the client gets is the PINGRESP it asks for now
        await client.send_all(pingreq5())
        assert await read_packet(client) == pingresp5()
        sink.gate.set()
        assert await read_packet(client) == puback5(7)
        assert [r.fields for b in sink.batches for r in b] == [{"temperature_mc": 21500}]


async def test_out_of_range_reading_gets_0x99_with_the_reason_and_is_dead_lettered():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("devices/meter-1/telemetry", b'{"temperature": 500}', qos=1, mid=1))
        assert await read_packet(client) == puback5(1, 0x99, reason("out_of_range: temperature"))
        (dead,) = dead_letters(gateway)
        assert (dead["reason"], dead["field"], dead["device_id"]) == ("out_of_range", "temperature", "meter-1")


@pytest.mark.parametrize("payload, text", [
    (b"not json", "malformed: payload is not valid JSON"),
    (b"\xc1", "malformed: payload is not valid MessagePack"),         # the first byte chose MessagePack
    (b'{"temperature": 20, "temperature_unit": "X"}', "bad_unit: temperature_unit"),
    (b'"just a string"', "not_object: payload must be an object or an array of objects"),
])
async def test_every_validation_rejection_is_0x99(payload, text):
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("telemetry", payload, qos=1, mid=3))
        assert await read_packet(client) == puback5(3, 0x99, reason(text))
        assert len(dead_letters(gateway)) == 1


async def test_another_topic_is_0x90_and_dead_lettered_bad_topic():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("devices/meter-9/telemetry", b'{"x": 1}', qos=1, mid=2))
        assert await read_packet(client) == puback5(2, 0x90, reason(
            "bad_topic: topic"))
        assert [d["reason"] for d in dead_letters(gateway)] == ["bad_topic"]


async def test_request_problem_information_0_sends_no_reason_string():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery, properties=props(prop_byte(REQUEST_PROBLEM_INFO, 0)))
        await client.send_all(publish5("telemetry", b'{"temperature": 500}', qos=1, mid=4))
        assert await read_packet(client) == puback5(4, 0x99)


async def test_batch_is_0x00_when_any_item_was_stored_and_counts_the_rejected():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("telemetry", b'[{"temperature": 500}, {"temperature": 20}, 5]', qos=1, mid=5))
        assert await read_packet(client) == puback5(5, 0, reason(
            "2 of 3 items rejected, first out_of_range: temperature"))
        await client.send_all(publish5("telemetry", b'[{"temperature": 500}, 5]', qos=1, mid=6))
        assert await read_packet(client) == puback5(6, 0x99, reason(
            "out_of_range: temperature (2 of 2 items rejected)"))


async def test_qos2_pubrec_carries_the_reason_and_pubrel_completes():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("telemetry", b'{"temperature": 20}', qos=2, mid=9))
        assert await read_packet(client) == pubrec5(9)
        # a redelivery before PUBREL is answered again and stored once
        await client.send_all(publish5("telemetry", b'{"temperature": 20}', qos=2, mid=9, dup=True))
        assert await read_packet(client) == pubrec5(9)
        await client.send_all(pubrel5(9))
        assert await read_packet(client) == pubcomp5(9)
        await client.send_all(pubrel5(9))
        assert await read_packet(client) == pubcomp5(9, 0x92)          # packet identifier not found
        await client.send_all(pubrec5(44))                              # gridgate sent no QoS 2 PUBLISH
        assert await read_packet(client) == pubrel5(44, 0x92)
        await client.send_all(publish5("telemetry", b'{"temperature": 500}', qos=2, mid=10))
        assert await read_packet(client) == pubrec5(10, 0x99, reason("out_of_range: temperature"))
        await client.send_all(disconnect5())
        await wait_closed(client)


@pytest.mark.parametrize("payload, properties, fields", [
    # the Content Type names the decoder, whatever the first byte
    (b"\x81\xa7battery\xcd\x0e\x74", props(prop_str(CONTENT_TYPE, "application/msgpack")), {"battery": 3700}),
    (b' {"battery": 1}', props(prop_str(CONTENT_TYPE, "application/json; charset=utf-8")), {"battery": 1}),
    (b' {"battery": 2}', props(prop_byte(PAYLOAD_FORMAT, 1)), {"battery": 2}),
])
async def test_payload_format_and_content_type_choose_the_decoder(payload, properties, fields):
    sink = MemorySink()
    async with serving(sink) as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("telemetry", payload, qos=1, mid=1, properties=properties))
        assert await read_packet(client) == puback5(1)
        assert [r.fields for b in sink.batches for r in b] == [fields]


async def test_json_content_type_on_msgpack_bytes_is_0x99_malformed():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("telemetry", b"\x81\xa1x\x01", qos=1, mid=1,
                                       properties=props(prop_str(CONTENT_TYPE, "application/json"))))
        assert await read_packet(client) == puback5(1, 0x99, reason("malformed: payload is not valid JSON"))


async def test_topic_alias_set_then_used():
    sink = MemorySink()
    async with serving(sink) as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("devices/meter-1/telemetry", b'{"n": 1}', qos=1, mid=1,
                                       properties=props(prop_u16(TOPIC_ALIAS, 3))))
        await client.send_all(publish5("", b'{"n": 2}', qos=1, mid=2, properties=props(prop_u16(TOPIC_ALIAS, 3))))
        assert await read_packet(client) + await read_packet(client) == puback5(1) + puback5(2)
        assert sorted(r.fields["n"] for b in sink.batches for r in b) == [1, 2]


async def test_topic_alias_over_the_maximum_is_disconnect_0x94():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("telemetry", b"{}", properties=props(prop_u16(TOPIC_ALIAS, 17))))
        packet = await read_packet(client)
        assert packet[0] == 0xE0 and packet[2] == 0x94
        await wait_closed(client)


# -- flow control ---------------------------------------------------------------------------


async def test_more_unacknowledged_publishes_than_receive_maximum_is_disconnect_0x93():
    sink = GatedSink()
    async with serving(sink, mqtt=MQTTConfig(listen="", receive_maximum=2)) as (gateway, nursery):
        client = await connected(gateway, nursery, receive_maximum=2)
        for mid in (1, 2, 3):
            await client.send_all(publish5("telemetry", b'{"n": 1}', qos=1, mid=mid))
        assert await read_packet(client) == disconnect5(0x93, reason(
            "more than Receive Maximum 2 publishes unacknowledged"))
        sink.gate.set()
        await wait_closed(client)


async def test_acked_publishes_free_their_place_in_receive_maximum():
    async with serving(mqtt=MQTTConfig(listen="", receive_maximum=1)) as (gateway, nursery):
        client = await connected(gateway, nursery, receive_maximum=1)
        for mid in range(1, 6):
            await client.send_all(publish5("telemetry", b'{"n": 1}', qos=1, mid=mid))
            assert await read_packet(client) == puback5(mid)


async def test_retained_publish_is_disconnect_0x9a():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("telemetry", b'{"n": 1}', qos=1, mid=1, retain=True))
        assert await read_packet(client) == disconnect5(0x9A, reason("retained messages are not supported"))
        await wait_closed(client)


# -- SUBSCRIBE / UNSUBSCRIBE --------------------------------------------------------------------


async def test_subscribe_reason_codes():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(subscribe5(1, [("devices/meter-1/commands", 2), ("devices/meter-2/commands", 1),
                                             ("devices/+/commands", 1), ("$share/g/devices/meter-1/commands", 1),
                                             ("a/#/b", 0)]))
        assert await read_packet(client) == suback5(1, [0x01, 0x87, 0xA2, 0x9E, 0x8F])
        await client.send_all(unsubscribe5(2, ["devices/meter-1/commands", "other"]))
        assert await read_packet(client) == unsuback5(2, [0x00, 0x11])


# -- server DISCONNECT reasons ----------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS)
async def test_takeover_sends_0x8e_to_the_older_connection(pair):
    async with serving() as (gateway, nursery):
        old = await connected(gateway, nursery, "meter-1", pair)
        new = await connected(gateway, nursery, "meter-1", pair)
        assert await read_packet(old) == disconnect5(0x8E)
        await wait_closed(old)
        await new.send_all(pingreq5())
        assert await read_packet(new) == pingresp5()


@pytest.mark.parametrize("pair", PAIRS)
async def test_graceful_stop_sends_0x8b(pair):
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery, "meter-1", pair)
        gateway.stop()
        assert await read_packet(client) == disconnect5(0x8B)
        await wait_closed(client)


async def test_keepalive_timeout_sends_0x8d():
    async with serving() as (gateway, nursery):
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1", keepalive=1))
        assert await read_packet(client) == server_connack()
        # the reaper closes it 1.5 s after the last packet: wait for its word, not for time
        assert await read_packet(client) == disconnect5(0x8D)
        await wait_closed(client)


async def test_malformed_packet_after_connect_is_disconnect_0x81_and_counted():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(b"\xc0\x01\x00")              # PINGREQ with a remaining length (3.12.1)
        packet = await read_packet(client)
        assert packet[0] == 0xE0 and packet[2] == 0x81
        await wait_closed(client)
        assert gateway.metrics.registry.get_sample_value(
            "gridgate_protocol_errors_total", {"protocol": "mqtt", "reason": "malformed_packet"}) == 1


async def test_packet_over_max_packet_bytes_is_disconnect_0x95():
    async with serving(mqtt=MQTTConfig(listen="", max_packet_bytes=256)) as (gateway, nursery):
        client = await connected(gateway, nursery, max_packet=256)
        await client.send_all(publish5("telemetry", b"x" * 300, qos=1, mid=1))
        packet = await read_packet(client)
        assert packet[0] == 0xE0 and packet[2] == 0x95
        await wait_closed(client)


async def test_maximum_packet_size_of_the_client_drops_the_reason_string():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery, properties=props(prop_u32(MAXIMUM_PACKET_SIZE, 8)))
        await client.send_all(publish5("telemetry", b'{"temperature": 500}', qos=1, mid=1))
        assert await read_packet(client) == puback5(1, 0x99)



async def test_connect_announcing_more_than_max_packet_bytes_is_closed_at_its_fixed_header():
    """The version is told from the bytes after the fixed header; a CONNECT
    too large to take is refused before they come (nothing waits for them)."""
    async with serving() as (gateway, nursery):
        client = await open_client(gateway, nursery)
        await client.send_all(b"\x10\xff\xff\xff\x7f")
        await wait_closed(client)
        assert gateway.metrics.registry.get_sample_value(
            "gridgate_protocol_errors_total", {"protocol": "mqtt", "reason": "too_large"}) == 1


@pytest.mark.parametrize("why, code", [
    ("taken over", 0x8E), ("taken over by node b-1", 0x8E),
    ("reaped: no packet for 1.5s (1.5 x keepalive = 1.5s)", 0x8D), ("reaped: silent for 300s", 0x8D),
    ("gateway shutting down", 0x8B),
    ("credentials removed", 0x87), ("client certificate revoked", 0x87), ("a client certificate is now required", 0x87),
    ("client closed", None), ("peer stopped reading", None), (None, None),
])
def test_close_reason_to_disconnect_code(why, code):
    assert close_code(why) == code


async def test_mqtts_serves_mqtt5_over_the_tls_stream(tmp_path):
    ca = CA("ecdsa")
    cert, key = ca.server().write(tmp_path, "server")
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    async with serving(mqtt=MQTTConfig(listen="", tls_listen="127.0.0.1:0"),
                       tls=TLSConfig(cert_file=cert, key_file=key)) as (gateway, _):
        host, port = gateway.addresses["mqtts"]
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=client_ctx)
        await stream.send_all(connect5("meter-1"))
        assert await read_packet(stream) == server_connack()
        await stream.send_all(publish5("telemetry", b'{"temperature": 500}', qos=1, mid=1))
        assert await read_packet(stream) == puback5(1, 0x99, reason("out_of_range: temperature"))
        await stream.send_all(disconnect5())
        try:
            await wait_closed(stream)
        except trio.BrokenResourceError:
            pass                  # the server closes TCP without a TLS close_notify



async def test_over_quota_with_reject_is_0x97_counted_and_not_dead_lettered():
    # one reading of burst, then one per 1,000 s: the second is over whatever the machine's speed
    limits = LimitsConfig(device_readings_per_s=0.001, device_readings_burst=1, mqtt5_on_limit="reject")
    sink = MemorySink()
    async with serving(sink, limits=limits) as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(publish5("telemetry", b'{"n": 1}', qos=1, mid=1))
        assert await read_packet(client) == puback5(1)
        await client.send_all(publish5("telemetry", b'{"n": 2}', qos=1, mid=2))
        assert await read_packet(client) == puback5(2, 0x97, reason("quota_exceeded: device"))
        # the connection is not paused: it still answers at once
        await client.send_all(pingreq5())
        assert await read_packet(client) == pingresp5()
        assert dead_letters(gateway) == []
        assert [r.fields["n"] for b in sink.batches for r in b] == [1]
        assert gateway.metrics.registry.get_sample_value(
            "gridgate_readings_limited_total", {"limit": "_device", "protocol": "mqtt"}) == 1
        assert gateway.metrics.registry.get_sample_value("gridgate_http_429_total", {"limit": "_device"}) is None


async def test_over_quota_with_pause_acks_as_usual():
    limits = LimitsConfig(device_readings_per_s=1000, device_readings_burst=1)
    async with serving(limits=limits) as (gateway, nursery):
        client = await connected(gateway, nursery)
        for mid in (1, 2, 3):
            await client.send_all(publish5("telemetry", b'{"n": 1}', qos=1, mid=mid))
            assert await read_packet(client) == puback5(mid)


@pytest.fixture
def auth_config(tmp_path):
    """meter-1 with password "pw", allowed by the ACL to write only its own telemetry topic."""
    (tmp_path / "pw").write_text(format_line("meter-1", hash_password(b"pw")))
    (tmp_path / "acl").write_text("user meter-1\ntopic write devices/meter-1/telemetry\n")
    return AuthConfig(password_file=str(tmp_path / "pw"), acl_file=str(tmp_path / "acl"), failure_delay_ms=0)


@pytest.mark.parametrize("client_id, username, password, code, text", [
    ("meter-1", "meter-1", b"wrong", 0x86, "not authorized: bad_password"),
    ("meter-1", None, None, 0x87, "not authorized: no credentials"),
    ("meter-2", "meter-1", b"pw", 0x87, "not authorized: client id"),
])
async def test_authentication_refusals(auth_config, client_id, username, password, code, text):
    async with serving(auth=auth_config) as (gateway, nursery):
        client = await open_client(gateway, nursery)
        await client.send_all(connect5(client_id, username=username, password=password))
        assert await read_packet(client) == connack5(code, reason(text))
        await wait_closed(client)


async def test_publish_the_acl_refuses_is_0x87_and_dead_lettered(auth_config):
    async with serving(auth=auth_config) as (gateway, nursery):
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1", username="meter-1", password=b"pw"))
        assert await read_packet(client) == server_connack()
        await client.send_all(publish5("telemetry", b'{"n": 1}', qos=1, mid=1))
        assert await read_packet(client) == puback5(1, 0x87, reason("not_authorized: topic"))
        await client.send_all(publish5("devices/meter-1/telemetry", b'{"n": 1}', qos=1, mid=2))
        assert await read_packet(client) == puback5(2)
        assert [d["reason"] for d in dead_letters(gateway)] == ["not_authorized"]


# -- trace context --------------------------------------------------------------------------

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("user_properties, expected", [
    ((("traceparent", TRACEPARENT), ("tracestate", "congo=t61rcWkgMzE")), (TRACEPARENT, "congo=t61rcWkgMzE")),
    ((("tracestate", "a=b"), ("vendor", "x"), ("traceparent", TRACEPARENT)), (TRACEPARENT, "a=b")),
    ((("traceparent", TRACEPARENT),), (TRACEPARENT, None)),
    ((("tracestate", "a=b"),), (None, None)),                                  # a state without a parent
    ((("traceparent", TRACEPARENT.upper()),), (None, None)),                   # W3C: lowercase hex only
    ((("traceparent", "00-" + "0" * 32 + "-b7ad6b7169203331-01"),), (None, None)),     # all-zero trace id
    ((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01"),), (None, None)),
    ((("traceparent", "ff" + TRACEPARENT[2:]),), (None, None)),                 # version ff is invalid
    ((("traceparent", "01" + TRACEPARENT[2:] + "-later"),), ("01" + TRACEPARENT[2:] + "-later", None)),
    ((("traceparent", TRACEPARENT), ("tracestate", "x" * 513)), (TRACEPARENT, None)),     # over 512 characters
    ((("traceparent", "garbage"), ("traceparent", TRACEPARENT)), (TRACEPARENT, None)),   # the first valid one
])
def test_trace_context_from_user_properties(user_properties, expected):
    assert trace_context(user_properties) == expected


async def test_traceparent_and_tracestate_user_properties_are_kept_on_the_record():
    sink = MemorySink()
    async with serving(sink) as (gateway, nursery):
        client = await connected(gateway, nursery)
        trace = props(prop_user("traceparent", TRACEPARENT), prop_user("tracestate", "congo=t61rcWkgMzE"),
                      prop_user("other", "ignored"))
        await client.send_all(publish5("telemetry", b'[{"n": 1}, {"n": 2}]', qos=1, mid=1, properties=trace))
        await client.send_all(publish5("telemetry", b'{"n": 3}', qos=1, mid=2,
                                       properties=props(prop_user("traceparent", "not a traceparent"))))
        assert await read_packet(client) + await read_packet(client) == puback5(1) + puback5(2)
        records = sorted((r for b in sink.batches for r in b), key=lambda r: r.fields["n"])
        assert [(r.traceparent, r.tracestate) for r in records] == [
            (TRACEPARENT, "congo=t61rcWkgMzE"), (TRACEPARENT, "congo=t61rcWkgMzE"), (None, None)]


# -- downlink ---------------------------------------------------------------------------------


async def test_command_carries_its_ttl_as_message_expiry_and_is_acknowledged():
    async with serving(downlink=DownlinkConfig(command_ttl_s=42.5)) as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(subscribe5(1, [("devices/meter-1/commands", 1)]))
        assert await read_packet(client) == suback5(1, [0x01])
        command = Command(id="c-1", type="REBOOT", payload={"delay_s": 5})
        assert gateway.conns.get_device("meter-1").send_command(command)
        assert await read_packet(client) == publish5(
            "devices/meter-1/commands", b'{"id":"c-1","type":"REBOOT","payload":{"delay_s":5}}', qos=1, mid=1,
            properties=command_props(43, "c-1"))       # whole seconds, rounded up
        await client.send_all(puback5(1))
        with trio.fail_after(TIMEOUT):
            while gateway.metrics.registry.get_sample_value(
                    "gridgate_commands_acknowledged_total", {"protocol": "mqtt"}) != 1:
                await trio.sleep(0.01)


async def test_command_over_the_clients_maximum_packet_size_is_never_sent():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery, properties=props(prop_u32(MAXIMUM_PACKET_SIZE, 128)))
        await client.send_all(subscribe5(1, [("devices/meter-1/commands", 1)]))
        assert await read_packet(client) == suback5(1, [0x01])
        session = gateway.conns.get_device("meter-1")
        assert session.send_command(Command(id="big", type="CONFIG", payload={"x": "y" * 100}))
        assert session.send_command(Command(id="s", type="PING", payload=None))
        # the small one comes, with the next packet id; the big one never does
        packet = await read_packet(client)
        assert packet == publish5("devices/meter-1/commands", b'{"id":"s","type":"PING","payload":null}', qos=1,
                                  mid=2, properties=command_props(60, "s"))


async def test_a_will_is_accepted_and_a_retained_will_is_refused_with_0x9a():
    async with serving() as (gateway, nursery):
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1", will=("devices/meter-1/status", b"gone", 1, False)))
        assert await read_packet(client) == server_connack()
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-2", will=("devices/meter-2/status", b"gone", 1, True)))
        assert await read_packet(client) == connack5(0x9A, reason("retained messages are not supported"))
        await wait_closed(client)


async def test_credentials_removed_by_a_reload_is_disconnect_0x87(auth_config, tmp_path):
    async with serving(auth=auth_config) as (gateway, nursery):
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1", username="meter-1", password=b"pw"))
        assert await read_packet(client) == server_connack()
        (tmp_path / "pw").write_text(format_line("meter-9", hash_password(b"other")))
        assert gateway.reload_credentials() == []
        assert await read_packet(client) == disconnect5(0x87)
        await wait_closed(client)


async def test_the_clients_receive_maximum_bounds_its_commands():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery, properties=props(prop_u16(RECEIVE_MAXIMUM, 2)))
        await client.send_all(subscribe5(1, [("devices/meter-1/commands", 1)]))
        assert await read_packet(client) == suback5(1, [0x01])
        session = gateway.conns.get_device("meter-1")
        assert session.send_command(Command(id="a", type="PING", payload=None))
        assert session.send_command(Command(id="b", type="PING", payload=None))
        assert not session.send_command(Command(id="c", type="PING", payload=None))     # a third would exceed it
        first, second = await read_packet(client), await read_packet(client)
        assert (first[0], second[0]) == (0x32, 0x32)                                      # QoS 1 PUBLISHes
        await client.send_all(puback5(1))
        with trio.fail_after(TIMEOUT):
            while not session.send_command(Command(id="d", type="PING", payload=None)):  # room once acked
                await trio.sleep(0.01)
        assert await read_packet(client) == publish5("devices/meter-1/commands",
                                                     b'{"id":"d","type":"PING","payload":null}', qos=1, mid=3,
                                                     properties=command_props(60, "d"))


def test_mqtt5_config_keys_are_validated(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text("[mqtt]\nreceive_maximum = 0\ntopic_alias_maximum = 70000\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={"ENVIRONMENT": "t", "SERVICE_NAME": "t", "GRIDGATE_MQTT_MAX_KEEPALIVE_S": "-1"})
    assert info.value.problems == [
        "mqtt.receive_maximum: Expected `int` >= 1 (got 0)",
        "mqtt.topic_alias_maximum: Expected `int` <= 65535 (got 70000)",
        "mqtt.max_keepalive_s (from GRIDGATE_MQTT_MAX_KEEPALIVE_S): Expected `int` >= 0 (got '-1')",
    ]
    config = Config.load(None, env={"ENVIRONMENT": "t", "SERVICE_NAME": "t", "GRIDGATE_MQTT_RECEIVE_MAXIMUM": "8",
                                    "GRIDGATE_MQTT_MAX_KEEPALIVE_S": "120"})
    assert (config.mqtt.receive_maximum, config.mqtt.topic_alias_maximum, config.mqtt.max_keepalive_s) == (8, 16, 120)


# -- Session Expiry ---------------------------------------------------------------------------


def server_connack_present() -> bytes:
    """server_connack() with Session Present 1."""
    packet = bytearray(server_connack())
    packet[2] = 0x01
    return bytes(packet)


async def test_a_device_back_within_its_session_expiry_gets_its_unacknowledged_commands():
    async with serving(downlink=DownlinkConfig(command_ttl_s=30)) as (gateway, nursery):
        expiry = props(prop_u32(SESSION_EXPIRY, 60))
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1", properties=expiry))
        assert await read_packet(client) == server_connack()
        await client.send_all(subscribe5(1, [("devices/meter-1/commands", 1)]))
        assert await read_packet(client) == suback5(1, [0x01])
        session = gateway.conns.get_device("meter-1")
        assert session.send_command(Command(id="c-1", type="PING", payload=None))
        assert await read_packet(client) == publish5(
            "devices/meter-1/commands", b'{"id":"c-1","type":"PING","payload":null}', qos=1, mid=1,
            properties=command_props(30, "c-1"))
        await client.send_all(puback5(1))                     # the first acknowledged, the second not
        assert session.send_command(Command(id="c-2", type="PING", payload=None))
        assert await read_packet(client) == publish5(
            "devices/meter-1/commands", b'{"id":"c-2","type":"PING","payload":null}', qos=1, mid=2,
            properties=command_props(30, "c-2"))
        await client.aclose()                                 # gone without a PUBACK
        with trio.fail_after(TIMEOUT):
            while gateway.conns.get_device("meter-1") is not None:
                await trio.sleep(0.01)
        await trio.sleep(1.1)        # so that what is left of the TTL is less than it was
        # back with Clean Start 0: Session Present, subscribed, the command again without a new SUBSCRIBE:
        # DUP=1, its original packet id (MQTT-4.4.0-1; a new one would be 1), what is left of its TTL
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1", clean_start=False, properties=expiry))
        assert await read_packet(client) == server_connack_present()
        frame = await read_packet(client)
        # fixed header 2, topic 2 + 24, packet id 2, property length 1: then Message Expiry (0x02, 4 bytes)
        assert frame[31] == MESSAGE_EXPIRY
        left = int.from_bytes(frame[32:36], "big")
        assert 1 <= left < 30, left
        assert frame == publish5("devices/meter-1/commands", b'{"id":"c-2","type":"PING","payload":null}', qos=1,
                                 mid=2, dup=True, properties=command_props(left, "c-2"))
        assert gateway.metrics.registry.get_sample_value(
            "gridgate_commands_redelivered_total", {"protocol": "mqtt"}) == 1
        await client.send_all(puback5(2))
        await client.send_all(disconnect5())
        await wait_closed(client)
        # acknowledged this time: nothing left to resume, and Clean Start 1 starts afresh anyway
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1", clean_start=False, properties=expiry))
        assert await read_packet(client) == server_connack_present()
        await client.send_all(pingreq5())
        assert await read_packet(client) == pingresp5()          # no command came before it
        await client.send_all(disconnect5())
        await wait_closed(client)
        client = await open_client(gateway, nursery)
        await client.send_all(connect5("meter-1", clean_start=True, properties=expiry))
        assert await read_packet(client) == server_connack()
        assert gateway.metrics.registry.get_sample_value(
            "gridgate_commands_expired_total", {"protocol": "mqtt", "reason": "disconnected"}) is None


async def test_no_session_is_kept_without_session_expiry_or_after_the_client_sets_it_to_0():
    async with serving() as (gateway, nursery):
        for connect_props, disconnect in ((b"\x00", disconnect5()),
                                          (props(prop_u32(SESSION_EXPIRY, 60)),
                                           disconnect5(0, props(prop_u32(SESSION_EXPIRY, 0))))):
            client = await open_client(gateway, nursery)
            await client.send_all(connect5("meter-1", properties=connect_props))
            assert await read_packet(client) == server_connack()
            await client.send_all(subscribe5(1, [("devices/meter-1/commands", 1)]))
            assert await read_packet(client) == suback5(1, [0x01])
            assert gateway.conns.get_device("meter-1").send_command(Command(id="c", type="PING", payload=None))
            assert (await read_packet(client))[0] == 0x32                  # the command, not acknowledged
            await client.send_all(disconnect)
            await wait_closed(client)
            with trio.fail_after(TIMEOUT):
                while gateway.conns.get_device("meter-1") is not None:
                    await trio.sleep(0.01)
            client = await open_client(gateway, nursery)
            await client.send_all(connect5("meter-1", clean_start=False))
            assert await read_packet(client) == server_connack()           # Session Present 0
            await client.send_all(disconnect5())
            await wait_closed(client)
        # not kept: each expired with its connection
        with trio.fail_after(TIMEOUT):
            while gateway.metrics.registry.get_sample_value(
                    "gridgate_commands_expired_total", {"protocol": "mqtt", "reason": "disconnected"}) != 2:
                await trio.sleep(0.01)


def test_session_store_is_bounded_and_expires():
    store = SessionStore(max_sessions=2)
    store.save("a", StoredSession(1, [("cmd-old", 5.0, 1, 1), ("cmd-new", 50.0, None, 0)], until=100.0))
    store.save("b", StoredSession(None, [], until=10.0))
    store.save("c", StoredSession(None, [], until=100.0))           # pushes "a" out
    assert store.peek("a", 0.0) is None and len(store) == 2
    assert store.peek("b", 10.0) is None and len(store) == 1        # expired
    store.save("a", StoredSession(1, [("cmd-old", 5.0, 1, 1), ("cmd-new", 50.0, None, 0)], until=100.0))
    taken = store.take("a", 20.0)
    assert taken is not None and taken.commands == [("cmd-new", 50.0, None, 0)]    # a command past its own TTL left out
    assert store.take("a", 20.0) is None


# -- Response Topic: the device's answer acknowledges the command ----------------------------


def acknowledged(gateway) -> float | None:
    return gateway.metrics.registry.get_sample_value("gridgate_commands_acknowledged_total", {"protocol": "mqtt"})


def acks_refused(gateway) -> float | None:
    return gateway.metrics.registry.get_sample_value("gridgate_command_acks_refused_total", {"protocol": "mqtt"})


async def test_a_publish_to_the_response_topic_acknowledges_the_command_once():
    sink = MemorySink()
    async with serving(sink) as (gateway, nursery):
        client = await connected(gateway, nursery)
        await client.send_all(subscribe5(1, [("devices/meter-1/commands", 1)]))
        assert await read_packet(client) == suback5(1, [0x01])
        session = gateway.conns.get_device("meter-1")
        assert session.send_command(Command(id="c-1", type="REBOOT", payload=None))
        assert session.send_command(Command(id="c-2", type="REBOOT", payload=None))
        assert await read_packet(client) == publish5(
            "devices/meter-1/commands", b'{"id":"c-1","type":"REBOOT","payload":null}', qos=1, mid=1,
            properties=command_props(60, "c-1"))
        assert (await read_packet(client))[0] == 0x32                     # c-2, mid 2
        # c-1 answered before its PUBACK (Correlation Data echoed): acknowledged, no longer in flight
        await client.send_all(publish5("devices/meter-1/commands/ack", b"done", qos=1, mid=7,
                                       properties=props(prop_bin(CORRELATION_DATA, b"c-1"))))
        assert await read_packet(client) == puback5(7)
        assert acknowledged(gateway) == 1
        await client.send_all(puback5(1))                                  # late PUBACK: counted nowhere
        # c-2 PUBACKed, then answered with its id as the payload (no Correlation Data): counted once
        await client.send_all(puback5(2))
        await client.send_all(publish5("devices/meter-1/commands/ack", b"c-2", qos=1, mid=8))
        assert await read_packet(client) == puback5(8)
        assert acknowledged(gateway) == 2
        assert acks_refused(gateway) is None
        # a forged id, and c-2 answered twice: 0x80 Unspecified error with the reason, counted
        await client.send_all(publish5("devices/meter-1/commands/ack", b"", qos=1, mid=9,
                                       properties=props(prop_bin(CORRELATION_DATA, b"forged"))))
        assert await read_packet(client) == puback5(9, 0x80, reason("unknown_command: forged"))
        await client.send_all(publish5("devices/meter-1/commands/ack", b"c-2", qos=2, mid=10))
        assert await read_packet(client) == pubrec5(10, 0x80, reason("unknown_command: c-2"))
        assert acks_refused(gateway) == 2 and acknowledged(gateway) == 2
        # none of it is a reading or a dead letter
        await client.send_all(publish5("telemetry", b'{"n": 1}', qos=1, mid=11))
        assert await read_packet(client) == puback5(11)
        assert [r.fields for b in sink.batches for r in b] == [{"n": 1}]
        assert gateway.metrics.registry.get_sample_value(
            "gridgate_readings_rejected_total", {"protocol": "mqtt", "reason": "bad_topic"}) is None


async def test_a_qos2_answer_is_acknowledged_and_released():
    async with serving() as (gateway, nursery):
        client = await connected(gateway, nursery, pair="memory")
        await client.send_all(subscribe5(1, [("devices/meter-1/commands", 0)]))
        assert await read_packet(client) == suback5(1, [0x00])
        assert gateway.conns.get_device("meter-1").send_command(Command(id="q0", type="PING", payload=None))
        # a QoS 0 subscription: sent untracked, still answerable until its TTL
        assert await read_packet(client) == publish5(
            "devices/meter-1/commands", b'{"id":"q0","type":"PING","payload":null}', properties=command_props(60, "q0"))
        await client.send_all(publish5("devices/meter-1/commands/ack", b"", qos=2, mid=3,
                                       properties=props(prop_bin(CORRELATION_DATA, b"q0"))))
        assert await read_packet(client) == pubrec5(3)
        await client.send_all(pubrel5(3))
        assert await read_packet(client) == pubcomp5(3)
        assert acknowledged(gateway) == 1
