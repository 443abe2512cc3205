"""The TLS listeners of an embedded gateway (DESIGN section 7), over real
loopback TCP with Trio's own TLS client: addresses, the session behind the
handshake, /readyz, and the start refused for an unusable certificate."""
from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing

import gridgate
from gridgate.config import ConfigError, HTTPConfig, MQTTConfig, TLSConfig, WebSocketConfig
from inprocess import MemorySink, make_config, read_exactly
from mqtt_frames import gen_connack, gen_connect, gen_puback, gen_publish
from security.pki import CA


@pytest.fixture
def pki(tmp_path):
    ca = CA("ecdsa")
    cert, key = ca.server().write(tmp_path, "server")
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    return TLSConfig(cert_file=cert, key_file=key), client


async def test_mqtts_serves_the_mqtt_session_over_the_tls_stream(start_gateway, pki):
    tls, client_ctx = pki
    sink = MemorySink()
    gateway = await start_gateway(sink, mqtt=MQTTConfig(listen="", tls_listen="127.0.0.1:0"), tls=tls)
    assert set(gateway.addresses) == {"mqtts"}
    host, port = gateway.addresses["mqtts"]
    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=client_ctx)
    # the SSLStream's server_hostname is checked against the certificate: localhost, 127.0.0.1
    await stream.send_all(gen_connect("meter-1"))
    assert await read_exactly(stream, 4) == gen_connack(0)
    (session,) = list(gateway.conns)
    # the peer is the TCP connection's, not the name of the stream class
    assert session.remote.startswith("127.0.0.1:") and session.protocol == "mqtt"
    # batches of publishes across TLS records: the session reads the TLS
    # stream, never the raw socket under it
    await stream.send_all(b"".join(gen_publish("telemetry", qos=1, mid=i, payload=b'{"battery_mv": %d}' % (3000 + i))
                                   for i in range(1, 201)))
    assert await read_exactly(stream, 4 * 200) == b"".join(gen_puback(i) for i in range(1, 201))
    await stream.aclose()
    with trio.fail_after(10):
        while sum(len(b) for b in sink.batches) < 200:
            await trio.sleep(0.01)
    assert sorted(r.fields["battery_mv"] for b in sink.batches for r in b) == list(range(3001, 3201))
    assert gateway.metrics.registry.get_sample_value("gridgate_tls_handshake_seconds_count",
                                                     {"listener": "mqtts"}) == 1


async def test_a_closed_tls_listener_makes_the_gateway_not_ready(start_gateway, pki):
    tls, _ = pki
    gateway = await start_gateway(MemorySink(), mqtt=MQTTConfig(listen="127.0.0.1:0"),
                                  http=HTTPConfig(listen="", tls_listen="127.0.0.1:0"),
                                  websocket=WebSocketConfig(listen="", tls_listen="127.0.0.1:0"), tls=tls)
    assert set(gateway.addresses) == {"mqtt", "https", "wss"}
    https_port = gateway.addresses["https"][1]
    (https_listener,) = [lst for lst in gateway._listeners if lst.socket.getsockname()[1] == https_port]
    await https_listener.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert gateway.not_ready_reasons() == [
        f"https listener 127.0.0.1:{https_port} stopped accepting: the listener was closed"]


async def test_serve_refuses_an_unusable_certificate_before_it_listens(tmp_path, pki, nursery):
    tls, _ = pki
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="127.0.0.1:0", tls_listen="127.0.0.1:0"),
                         tls=TLSConfig(cert_file=tls.cert_file, key_file=str(tmp_path / "missing.key")))
    with pytest.raises(ConfigError) as info:
        await nursery.start(gridgate.serve, config)
    assert info.value.problems == [
        f"tls.cert_file {tls.cert_file} / tls.key_file {tmp_path / 'missing.key'}: No such file or directory"]
    assert not (tmp_path / "data").exists()        # refused before the spool was opened


async def test_a_graceful_stop_closes_open_tls_connections_and_ends(tmp_path, pki):
    tls, client_ctx = pki
    sink = MemorySink()
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="", tls_listen="127.0.0.1:0"),
                         http=HTTPConfig(listen="", tls_listen="127.0.0.1:0"), tls=tls)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            mqtt = await trio.open_ssl_over_tcp_stream(*gateway.addresses["mqtts"], ssl_context=client_ctx)
            await mqtt.send_all(gen_connect("meter-1") + gen_publish("telemetry", qos=1, mid=1,
                                                                        payload=b'{"battery_mv": 3300}'))
            assert await read_exactly(mqtt, 8) == gen_connack(0) + gen_puback(1)
            # an https client that connected and said nothing yet: idle keep-alive
            https = await trio.open_ssl_over_tcp_stream(*gateway.addresses["https"], ssl_context=client_ctx)
            await https.do_handshake()
            gateway.stop()
            for stream in (mqtt, https):
                try:
                    assert await stream.receive_some(1024) == b""
                except trio.BrokenResourceError:
                    pass                 # closed without close_notify: the TCP connection ended all the same
        # serve() returned: the nursery ended with it
    assert [r.fields for b in sink.batches for r in b] == [{"battery_mv": 3300}]
