"""MQTT 3.1/3.1.1 conformance of a real ``gridgate serve``, raw bytes over
loopback TCP (tests/rawclient.py) and WebSocket (the websockets client).

Each test names the normative statements of MQTT 3.1.1 it checks
(docs/mqtt-conformance.md lists them all). Frames and the expected answers
are built with tests/mqtt_frames.py, independently of the gateway's codec.
One gateway serves the module's tests that need no spool of their own; every
device id is unique to its test, so the tests do not see each other.
"""
from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator

import pytest
from websockets.sync.client import connect as ws_connect

from gatewayproc import GatewayProcess, spool_export
from mqtt_frames import (
    gen_connack,
    gen_connect,
    gen_disconnect,
    gen_pingreq,
    gen_pingresp,
    gen_puback,
    gen_pubcomp,
    gen_publish,
    gen_pubrec,
    gen_pubrel,
    gen_suback,
    gen_subscribe,
    gen_unsuback,
    gen_unsubscribe,
)
from rawclient import RawClient

READING = b'{"humidity": 40}'


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("mqtt311") / "data")
    try:
        yield gw
    finally:
        gw.kill()


def connected(gateway: GatewayProcess, client_id: str, **kw) -> RawClient:
    c = RawClient(gateway.mqtt)
    assert c.connect(client_id, **kw) == gen_connack(0)
    return c


def protocol_errors(gateway: GatewayProcess, reason: str) -> float:
    return gateway.metric(f'gridgate_protocol_errors_total{{protocol="mqtt",reason="{reason}"}}')


# -- section 1.5.3: control characters and non-characters (MAY close, taken as MUST) --------------------


@pytest.mark.parametrize("topic", ["devices/m-ctl/telemetry\x1b[2J", "telemetry\u0085", "telemetry\ufdd0",
                                   "telemetry\U0010ffff"], ids=["ESC", "NEL", "U+FDD0", "U+10FFFF"])
def test_a_control_character_or_non_character_closes_only_that_connection(gateway, topic):
    before = protocol_errors(gateway, "bad_char")
    steady = connected(gateway, "m-steady-ctl")
    bad = connected(gateway, "m-ctl")
    bad.send(gen_publish(topic, qos=1, mid=1, payload=READING))
    assert bad.closed_by_server()
    assert bad.buf == b""                                   # no PUBACK: closed without an answer (MQTT-4.8.0-1)
    assert protocol_errors(gateway, "bad_char") == before + 1
    steady.send(gen_publish("telemetry", qos=1, mid=7, payload=READING))
    assert steady.recv_exactly(4) == gen_puback(7)
    steady.send(gen_disconnect())
    assert steady.closed_by_server()


# -- CONNECT and CONNACK (sections 3.1, 3.2) ------------------------------------------------------------------


def test_connack_is_the_first_packet_with_session_present_0(gateway):
    # MQTT-3.2.0-1, MQTT-3.1.4-4; MQTT-3.2.2-1 (CleanSession 1) and MQTT-3.2.2-3 (CleanSession 0: no stored session)
    for clean in (True, False):
        c = RawClient(gateway.mqtt)
        c.send(gen_connect("m-first", clean_session=clean) + gen_pingreq())
        assert c.recv_exactly(6) == gen_connack(0, session_present=False) + gen_pingresp()
        c.close()


@pytest.mark.parametrize("client_id", ["0", "z", "Z", "0123456789abcdefghijklm", "nopqrstuvwxyzABCDEFGHIJ",
                                       "KLMNOPQRSTUVWXYZ0123456"])
def test_client_ids_of_1_to_23_alphanumerics_are_accepted(gateway, client_id):
    # MQTT-3.1.3-5: every character of the set, the shortest and the longest
    c = connected(gateway, client_id)
    c.send(gen_disconnect())
    assert c.closed_by_server()


@pytest.mark.parametrize("connect, reason", [
    (gen_connect("", clean_session=True), "identifier_rejected"),          # MQTT-3.1.3-6 is a MAY, not taken
    (gen_connect("m-bad id"), "identifier_rejected"),                      # MQTT-3.1.3-9: not a device id
    (gen_connect("m" * 24, proto_name=b"MQIsdp", proto_ver=3), "identifier_rejected"),     # MQTT 3.1: 1..23
    (gen_connect("\u00e9" * 12, proto_name=b"MQIsdp", proto_ver=3), "identifier_rejected"),
], ids=["empty", "not-a-device-id", "3.1-24-bytes", "3.1-12-chars-24-bytes"])
def test_a_refused_client_id_gets_connack_2_and_a_close(gateway, connect, reason):
    # MQTT-3.1.3-9, MQTT-3.2.2-4 (Session Present 0), MQTT-3.2.2-5 (then close)
    before = protocol_errors(gateway, reason)
    c = RawClient(gateway.mqtt)
    c.send(connect)
    assert c.recv_exactly(4) == gen_connack(2)
    assert c.closed_by_server()
    assert c.buf == b""
    assert protocol_errors(gateway, reason) == before + 1


def test_mqtt_3_1_client_id_of_23_bytes_is_accepted(gateway):
    c = RawClient(gateway.mqtt)
    assert c.connect("m" * 23, proto_name=b"MQIsdp", proto_ver=3) == gen_connack(0)
    c.close()


@pytest.mark.parametrize("connect", [
    gen_connect("m-malformed", flags=0x03),                                  # reserved flag (MQTT-3.1.2-3)
    gen_connect("m-malformed", flags=0x42),                                  # password without user name
    gen_connect("m-malformed", will_topic="a/+", will_payload=b""),          # Will topic with a wildcard
    gen_connect("m-malformed\x01"),                                          # a control character
], ids=["reserved-flag", "password-without-user", "will-wildcard", "control-character"])
def test_a_malformed_connect_is_closed_without_a_connack(gateway, connect):
    # MQTT-3.1.4-1, MQTT-3.2.2-6
    c = RawClient(gateway.mqtt)
    c.send(connect)
    assert c.closed_by_server()
    assert c.buf == b""


def test_nothing_after_a_refused_connect_is_processed(tmp_path):
    # MQTT-3.1.4-5: a refused CONNECT and a reading in one write; the reading is not stored
    gw = GatewayProcess(tmp_path / "data")
    try:
        c = RawClient(gw.mqtt)
        c.send(gen_connect("m-refused id") + gen_publish("telemetry", qos=1, mid=1, payload=READING))
        assert c.recv_exactly(4) == gen_connack(2)
        assert c.closed_by_server()
        assert c.buf == b""
        ok = connected(gw, "m-after")
        ok.send(gen_publish("telemetry", qos=1, mid=2, payload=READING))
        assert ok.recv_exactly(4) == gen_puback(2)
    finally:
        assert gw.stop() == 0
    assert [r["device_id"] for r in spool_export(gw.data_dir)] == ["m-after"]
    assert spool_export(gw.data_dir, rejected=True) == []


# -- packet identifiers and acknowledgements (sections 2.3.1, 3.3.4, 4.3) --------------------------------------


@pytest.mark.parametrize("mid", [1, 255, 256, 65535])
def test_every_answer_carries_the_packet_id_of_what_it_answers(gateway, mid):
    # MQTT-2.3.1-6 (PUBACK, PUBREC), MQTT-2.3.1-7 (SUBACK, UNSUBACK), MQTT-3.3.4-1 (the answer per QoS),
    # MQTT-3.8.4-2, MQTT-3.10.4-4; PUBCOMP carries the PUBREL's (MQTT-4.3.3-2)
    c = connected(gateway, f"m-ids-{mid}")
    c.send(gen_publish("telemetry", qos=1, mid=mid, payload=READING))
    assert c.recv_exactly(4) == gen_puback(mid)
    c.send(gen_publish("telemetry", qos=2, mid=mid, payload=READING))
    assert c.recv_exactly(4) == gen_pubrec(mid)
    c.send(gen_pubrel(mid))
    assert c.recv_exactly(4) == gen_pubcomp(mid)
    c.send(gen_subscribe(mid, [(f"devices/m-ids-{mid}/commands", 1)]))
    assert c.recv_exactly(5) == gen_suback(mid, [1])
    c.send(gen_unsubscribe(mid, [f"devices/m-ids-{mid}/commands"]))
    assert c.recv_exactly(4) == gen_unsuback(mid)
    c.close()


def test_an_acknowledged_packet_id_is_free_for_a_new_reading(tmp_path):
    # MQTT-4.3.2-2: after the PUBACK the same packet id is a new publication, DUP or not;
    # MQTT-4.3.3-2: after the PUBCOMP likewise, while before the PUBREL a resend is not stored again
    gw = GatewayProcess(tmp_path / "data")
    try:
        c = connected(gw, "m-reuse")
        for humidity, dup in ((1, False), (2, True), (3, False)):
            c.send(gen_publish("telemetry", qos=1, mid=9, dup=dup, payload=b'{"humidity": %d}' % humidity))
            assert c.recv_exactly(4) == gen_puback(9)
        c.send(gen_publish("telemetry", qos=2, mid=9, payload=b'{"humidity": 4}'))
        assert c.recv_exactly(4) == gen_pubrec(9)
        c.send(gen_publish("telemetry", qos=2, mid=9, dup=True, payload=b'{"humidity": 4}'))
        assert c.recv_exactly(4) == gen_pubrec(9)
        c.send(gen_pubrel(9))
        assert c.recv_exactly(4) == gen_pubcomp(9)
        c.send(gen_publish("telemetry", qos=2, mid=9, payload=b'{"humidity": 5}'))
        assert c.recv_exactly(4) == gen_pubrec(9)
        c.send(gen_pubrel(9) + gen_disconnect())
        assert c.recv_exactly(4) == gen_pubcomp(9)
    finally:
        assert gw.stop() == 0
    assert sorted(r["fields"]["humidity"] for r in spool_export(gw.data_dir)) == [1, 2, 3, 4, 5]


def test_a_msgpack_reading_keyed_by_a_number_is_dead_lettered_and_holds_nothing_up(tmp_path):
    # A MessagePack map may have a float key. Its rejection named that float as the
    # field, which no spool row can hold: the batch failed, was retried for ever,
    # and no device was acknowledged again (found by the validator fuzz target).
    import msgspec

    gw = GatewayProcess(tmp_path / "data")
    try:
        c = connected(gw, "m-float-key")
        c.send(gen_publish("telemetry", qos=1, mid=1, payload=msgspec.msgpack.encode({float("nan"): 1, 1.5: 2})))
        assert c.recv_exactly(4) == gen_puback(1)
        other = connected(gw, "m-after-float")
        other.send(gen_publish("telemetry", qos=1, mid=2, payload=READING))
        assert other.recv_exactly(4) == gen_puback(2)
    finally:
        assert gw.stop() == 0
    assert [r["device_id"] for r in spool_export(gw.data_dir)] == ["m-after-float"]
    [dead] = spool_export(gw.data_dir, rejected=True)
    assert (dead["reason"], dead["field"], dead["device_id"]) == ("bad_type", "nan", "m-float-key")


@pytest.mark.parametrize("mid", [1, 4242, 65535])
def test_an_unsolicited_pubrec_is_answered_with_pubrel_of_the_same_packet_id(gateway, mid):
    # MQTT-4.3.3-1: the PUBREC's receiver sends PUBREL with the packet id it got. gridgate never
    # publishes at QoS 2, so every PUBREC is unsolicited; the PUBCOMP that ends the flow is taken
    # in silence and the connection carries on.
    c = connected(gateway, f"m-pubrec-{mid}")
    c.send(gen_pubrec(mid))
    assert c.recv_exactly(4) == gen_pubrel(mid)
    c.send(gen_pubcomp(mid) + gen_pingreq())
    assert c.recv_exactly(2) == gen_pingresp()
    c.send(gen_publish("telemetry", qos=1, mid=mid, payload=READING))
    assert c.recv_exactly(4) == gen_puback(mid)
    c.close()


def test_pingreq_gets_pingresp(gateway):
    # MQTT-3.12.4-1, also several in one read
    c = connected(gateway, "m-ping")
    c.send(gen_pingreq() * 3)
    assert c.recv_exactly(6) == gen_pingresp() * 3
    c.close()


# -- SUBSCRIBE and UNSUBSCRIBE (sections 3.8 - 3.10, 4.7) -------------------------------------------------------


def test_suback_has_a_code_per_filter_in_the_order_of_the_filters(gateway):
    # MQTT-3.8.4-4, MQTT-3.8.4-5, MQTT-3.9.3-1; MQTT-3.8.3-2: wildcard filters are refused (0x80)
    c = connected(gateway, "m-order")
    c.send(gen_subscribe(5, [("a/b", 1), ("devices/m-order/commands", 2), ("#", 0), ("devices/+/commands", 1),
                             ("devices/m-order/commands", 0)]))
    assert c.recv_exactly(9) == gen_suback(5, [0x80, 1, 0x80, 0x80, 0])
    c.close()


def test_a_repeated_subscription_replaces_the_granted_qos(gateway):
    # MQTT-3.8.4-3 (the part without retained messages): the later QoS is the one granted
    c = connected(gateway, "m-resub")
    for qos, granted in ((1, 1), (0, 0), (2, 1)):
        c.send(gen_subscribe(qos + 1, [("devices/m-resub/commands", qos)]))
        assert c.recv_exactly(5) == gen_suback(qos + 1, [granted])
    c.close()


def test_unsuback_comes_once_for_many_filters_and_when_nothing_was_subscribed(gateway):
    # MQTT-3.10.4-5, MQTT-3.10.4-6
    c = connected(gateway, "m-unsub")
    c.send(gen_unsubscribe(3, ["never/subscribed"]))
    assert c.recv_exactly(4) == gen_unsuback(3)
    c.send(gen_unsubscribe(4, ["x", "devices/m-unsub/commands", "#"]) + gen_pingreq())
    assert c.recv_exactly(6) == gen_unsuback(4) + gen_pingresp()
    c.close()


def test_subscription_matching_compares_topics_exactly(gateway):
    # MQTT-4.7.3-4: no normalization, no case folding, no trailing-slash or empty-level leniency
    device = "m-exact"
    own = f"devices/{device}/commands"
    # upper case, trailing slash, an empty level, a leading slash, and FULLWIDTH m (NFKC would make it m)
    variants = [own.upper(), own + "/", own.replace("/", "//", 1), "/" + own, own.replace("m", "\uff4d", 1)]
    assert unicodedata.normalize("NFKC", variants[-1]) == own
    c = connected(gateway, device)
    c.send(gen_subscribe(1, [(v, 1) for v in variants] + [(own, 1)]))
    assert c.recv_exactly(4 + len(variants) + 1) == gen_suback(1, [0x80] * len(variants) + [1])
    c.close()


# -- WebSocket transport (section 6) ---------------------------------------------------------------------


def test_mqtt_over_websocket_does_not_assume_packets_align_with_messages(gateway):
    # MQTT-6.0.0-2 (a packet across messages, many packets in one message), MQTT-6.0.0-4 ("mqtt" selected)
    host, port = gateway.ws
    stream = (gen_connect("m-ws-split") + gen_publish("telemetry", qos=1, mid=1, payload=READING)
              + gen_publish("telemetry", qos=1, mid=2, payload=json.dumps({"humidity": 41}).encode()))
    with ws_connect(f"ws://{host}:{port}/mqtt", subprotocols=["mqtt"], open_timeout=10) as ws:
        assert ws.subprotocol == "mqtt"
        # CONNECT over two messages, one PUBLISH over two, then the rest in one message
        for piece in (stream[:3], stream[3:17], stream[17:40], stream[40:]):
            ws.send(piece)
        received = b""
        expected = gen_connack(0) + gen_puback(1) + gen_puback(2)
        while len(received) < len(expected):
            received += ws.recv(timeout=10)
        assert received == expected
