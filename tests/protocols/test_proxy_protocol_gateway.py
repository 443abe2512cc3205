"""PROXY protocol listeners of an embedded gateway, driven over real loopback
sockets under the autojump clock: the test plays the load balancer
(127.0.0.1, trusted) and names clients in its headers. Sessions, limits,
bans and certificate identities see the client; untrusted peers, missing,
malformed and slow headers close the connection, counted by reason and
logged once per peer."""
from __future__ import annotations

import logging
import ssl

import pytest
import trio
import trustme

import gridgate
from autojump import start_still
from gridgate.config import (
    AuthConfig,
    ConnectionsConfig,
    HTTPConfig,
    LimitsConfig,
    MQTTConfig,
    TLSConfig,
    WebSocketConfig,
)
from gridgate.security.passwords import format_line, hash_password
from inprocess import make_config
from mqtt_frames import gen_connack, gen_connect, gen_puback, gen_publish
from proxy_headers import ssl_tlv, v1, v2

LOOPBACK = "127.0.0.1:0"
LONG = 10_000_000.0        # seconds: idle timeouts no test reaches


@pytest.fixture
def proxied_gateway(nursery, tmp_path):
    async def start(trusted=("127.0.0.0/8",), **sections):
        # the autojump clock leaps while the spool's thread writes: no idle reaping meanwhile
        sections.setdefault("connections", ConnectionsConfig(idle_timeout_s=LONG, reap_interval_s=LONG / 10))
        config = make_config(tmp_path, **sections)
        config.service.trusted_proxies = list(trusted)
        return await start_still(nursery, config)
    return start


async def open_from(addr: tuple[str, int], source: str = "127.0.0.1") -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(addr)
    return trio.SocketStream(sock)


async def read_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return buf
        buf += chunk
    return buf


async def closed_silently(stream: trio.abc.Stream) -> bool:
    """True when the server closes without sending a byte."""
    with trio.fail_after(60):
        try:
            return await stream.receive_some(1024) == b""
        except trio.BrokenResourceError:
            return True


def refused(gw, listener: str, reason: str) -> float:
    return gw.metrics.registry.get_sample_value("gridgate_proxy_protocol_refused_total",
                                                {"listener": listener, "reason": reason}) or 0.0


async def mqtt_via_proxy(addr, header: bytes, client_id: str, **kw) -> tuple[trio.SocketStream, bytes]:
    stream = await open_from(addr)
    await stream.send_all(header + gen_connect(client_id, **kw))
    return stream, await read_exactly(stream, 4)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_mqtt_sessions_see_the_client_address(autojump_clock, proxied_gateway, version):
    gw = await proxied_gateway(mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol=version))
    header = (v1 if version == "v1" else v2)("192.0.2.7", "10.0.0.1", 56324, 1883)
    stream, connack = await mqtt_via_proxy(gw.addresses["mqtt"], header, "meter-1")
    assert connack == gen_connack(0)
    await stream.send_all(gen_publish("telemetry", 1, b'{"device_id": "meter-1", "battery_mv": 1}', mid=7))
    assert await read_exactly(stream, 4) == gen_puback(7)
    assert [s.remote for s in gw.conns] == ["192.0.2.7:56324"]
    assert (await gw.spool.stats())["records"] == 1
    await stream.aclose()


async def test_a_header_split_byte_by_byte(autojump_clock, proxied_gateway):
    gw = await proxied_gateway(mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol="v2"))
    stream = await open_from(gw.addresses["mqtt"])
    data = v2("2001:db8::7", "2001:db8::1", 4000, 1883, crc=True) + gen_connect("meter-1")
    for i in range(len(data)):
        await stream.send_all(data[i:i + 1])
        await trio.sleep(0.01)
    assert await read_exactly(stream, 4) == gen_connack(0)
    assert [s.remote for s in gw.conns] == ["[2001:db8::7]:4000"]


async def test_local_keeps_the_proxy_address(autojump_clock, proxied_gateway):
    gw = await proxied_gateway(mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol="v2"))
    _, connack = await mqtt_via_proxy(gw.addresses["mqtt"], v2(command=0), "meter-1")
    assert connack == gen_connack(0)
    assert [s.remote.rsplit(":", 1)[0] for s in gw.conns] == ["127.0.0.1"]


async def test_untrusted_missing_malformed_and_slow_headers_close(autojump_clock, proxied_gateway, caplog):
    caplog.set_level(logging.WARNING, "gridgate")
    gw = await proxied_gateway(mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol="v2"),
                               http=HTTPConfig(listen=LOOPBACK, proxy_protocol="v1"),
                               trusted=("127.0.0.1/32",))
    mqtt, http = gw.addresses["mqtt"], gw.addresses["http"]
    # from 127.0.0.2, not a trusted proxy: closed before anything is read, twice, logged once
    for _ in range(2):
        stream = await open_from(mqtt, "127.0.0.2")
        await stream.send_all(v2("192.0.2.7", "10.0.0.1", 1, 2) + gen_connect("meter-1"))
        assert await closed_silently(stream)
    assert refused(gw, "mqtt", "untrusted_source") == 2
    untrusted_logs = [r.getMessage() for r in caplog.records if "127.0.0.2" in r.getMessage()]
    assert len(untrusted_logs) == 1 and "untrusted_source" in untrusted_logs[0]
    # a client that skipped the proxy: no header at all
    stream = await open_from(mqtt)
    await stream.send_all(gen_connect("meter-1"))
    assert await closed_silently(stream)
    assert refused(gw, "mqtt", "not_proxy") == 1
    stream = await open_from(http)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert await closed_silently(stream)
    assert refused(gw, "http", "not_proxy") == 1
    # malformed, the other version, over-long
    for sent, reason in ((b"PROXY TCP4 192.0.2.7 10.0.0.1 01 2\r\n", "malformed"),
                         (v2("192.0.2.7", "10.0.0.1", 1, 2), "wrong_version"),
                         (b"PROXY UNKNOWN " + b"x" * 200, "too_long")):
        stream = await open_from(http)
        await stream.send_all(sent)
        assert await closed_silently(stream)
        assert refused(gw, "http", reason) == 1
    # half a header, then nothing: closed at the deadline, not before
    stream = await open_from(mqtt)
    await stream.send_all(v2("192.0.2.7", "10.0.0.1", 1, 2)[:20])
    start = trio.current_time()
    assert await closed_silently(stream)
    assert trio.current_time() - start == pytest.approx(gw.config.service.proxy_header_timeout_s, abs=0.01)
    assert refused(gw, "mqtt", "timeout") == 1
    assert len(gw.conns) == 0
    # the gateway serves on
    _, connack = await mqtt_via_proxy(mqtt, v2("192.0.2.7", "10.0.0.1", 1, 2), "meter-1")
    assert connack == gen_connack(0)


async def test_max_connections_per_ip_counts_the_client(autojump_clock, proxied_gateway):
    gw = await proxied_gateway(mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol="v2"),
                               limits=LimitsConfig(max_connections_per_ip=1))
    addr = gw.addresses["mqtt"]
    first, connack = await mqtt_via_proxy(addr, v2("192.0.2.7", "10.0.0.1", 1, 2), "meter-1")
    assert connack == gen_connack(0)
    # every connection comes from 127.0.0.1 (the proxy); only the client's address counts
    _, connack = await mqtt_via_proxy(addr, v2("192.0.2.7", "10.0.0.1", 2, 2), "meter-2")
    assert connack == gen_connack(3)
    _, connack = await mqtt_via_proxy(addr, v2("192.0.2.8", "10.0.0.1", 3, 2), "meter-3")
    assert connack == gen_connack(0)


async def test_failed_logins_ban_the_client_address_not_the_proxy(autojump_clock, proxied_gateway, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text(format_line("meter-1", hash_password(b"right")) + format_line("meter-2", hash_password(b"pw")))
    gw = await proxied_gateway(mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol="v1"),
                               auth=AuthConfig(password_file=str(passwd), failures_before_ban=2, ban_s=3600,
                                               failure_delay_ms=100))
    addr = gw.addresses["mqtt"]
    attacker = v1("192.0.2.66", "10.0.0.1", 1, 2)
    for _ in range(2):
        _, connack = await mqtt_via_proxy(addr, attacker, "meter-1", username="meter-1", password=b"wrong")
        assert connack == gen_connack(4)
    # banned: even the right password from that client is refused at once
    _, connack = await mqtt_via_proxy(addr, attacker, "meter-1", username="meter-1", password=b"right")
    assert connack == gen_connack(5)
    # another client behind the same proxy is served
    _, connack = await mqtt_via_proxy(addr, v1("192.0.2.7", "10.0.0.1", 1, 2), "meter-2", username="meter-2",
                                      password=b"pw")
    assert connack == gen_connack(0)
    assert [address for address, _ in gw.services.auth.active_bans()] == ["192.0.2.66"]


async def test_a_proxy_verified_certificate_cn_is_the_identity(autojump_clock, proxied_gateway, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text(format_line("meter-9", hash_password(b"pw")))
    gw = await proxied_gateway(mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol="v2"),
                               auth=AuthConfig(password_file=str(passwd), failure_delay_ms=100))
    addr = gw.addresses["mqtt"]
    header = v2("192.0.2.7", "10.0.0.1", 1, 2, tlvs=ssl_tlv("meter-7"))
    stream, connack = await mqtt_via_proxy(addr, header, "meter-7")
    assert connack == gen_connack(0)
    (session,) = list(gw.conns)
    assert (session.identity.name, session.identity.method) == ("meter-7", "certificate")
    await stream.send_all(gen_publish("telemetry", 1, b'{"device_id": "meter-7", "battery_mv": 1}', mid=1))
    assert await read_exactly(stream, 4) == gen_puback(1)
    # the certificate binds the client id
    _, connack = await mqtt_via_proxy(addr, header, "meter-8")
    assert connack == gen_connack(5)
    # not verified by the proxy, or no certificate: no identity, so no credentials
    for tlvs in (ssl_tlv("meter-7", verify=1), ssl_tlv("meter-7", client=0x01)):
        _, connack = await mqtt_via_proxy(addr, v2("192.0.2.7", "10.0.0.1", 1, 2, tlvs=tlvs), "meter-7")
        assert connack == gen_connack(5)


@pytest.mark.parametrize("engine", ["fast", "std"])
async def test_http_both_engines_behind_a_proxy(autojump_clock, proxied_gateway, engine):
    gw = await proxied_gateway(http=HTTPConfig(listen=LOOPBACK, proxy_protocol="v1", engine=engine))
    stream = await open_from(gw.addresses["http"])
    body = b'{"device_id": "meter-1", "battery_mv": 1}'
    await stream.send_all(v1("192.0.2.7", "10.0.0.1", 4242, 80) + b"POST /v1/telemetry HTTP/1.1\r\nhost: gw\r\n"
                          b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode()
                          + b"\r\n\r\n" + body)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        assert chunk
        head += chunk
    assert head.startswith(b"HTTP/1.1 20")
    assert [s.remote for s in gw.conns] == ["192.0.2.7:4242"]


async def test_websocket_behind_a_proxy(autojump_clock, proxied_gateway):
    gw = await proxied_gateway(websocket=WebSocketConfig(listen=LOOPBACK, proxy_protocol="v2"))
    stream = await open_from(gw.addresses["ws"])
    await stream.send_all(v2("192.0.2.7", "10.0.0.1", 4242, 80) + b"GET /v1/ws?device_id=meter-1 HTTP/1.1\r\n"
                          b"host: gw\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                          b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        assert chunk
        head += chunk
    assert head.startswith(b"HTTP/1.1 101")
    assert [s.remote for s in gw.conns] == ["192.0.2.7:4242"]


async def test_tls_listener_reads_the_header_before_the_handshake(autojump_clock, proxied_gateway, tmp_path):
    ca = trustme.CA()
    server_cert = ca.issue_cert("gridgate.test")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    server_cert.private_key_pem.write_to_path(str(key))
    gw = await proxied_gateway(mqtt=MQTTConfig(listen="", tls_listen=LOOPBACK, proxy_protocol="v2"),
                               tls=TLSConfig(cert_file=str(cert), key_file=str(key)))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    raw = await open_from(gw.addresses["mqtts"])
    # a CN TLV on a TLS listener is not an identity: the gateway's own handshake decides
    await raw.send_all(v2("192.0.2.7", "10.0.0.1", 4242, 8883, tlvs=ssl_tlv("meter-7")))
    stream = trio.SSLStream(raw, client_ctx, server_hostname="gridgate.test")
    await stream.send_all(gen_connect("meter-1"))
    assert await read_exactly(stream, 4) == gen_connack(0)
    (session,) = list(gw.conns)
    assert session.remote == "192.0.2.7:4242" and session.identity is None


async def test_proxy_protocol_needs_trusted_proxies(tmp_path):
    config = make_config(tmp_path, mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol="v2"))
    with pytest.raises(gridgate.ConfigError) as caught:
        await gridgate.serve(config)
    assert caught.value.problems == [
        "mqtt.proxy_protocol is set but service.trusted_proxies is empty: name the load balancers' addresses "
        "(CIDRs) whose PROXY headers are believed"]


@pytest.mark.parametrize("engine", ["fast", "std"])
async def test_http_a_proxy_verified_certificate_cn_authenticates_every_request(autojump_clock, proxied_gateway,
                                                                                tmp_path, engine):
    passwd = tmp_path / "passwd"
    passwd.write_text(format_line("meter-9", hash_password(b"pw")))
    gw = await proxied_gateway(http=HTTPConfig(listen=LOOPBACK, proxy_protocol="v2", engine=engine),
                               auth=AuthConfig(password_file=str(passwd), failure_delay_ms=100))

    async def post(tlvs: bytes) -> bytes:
        stream = await open_from(gw.addresses["http"])
        body = b'{"device_id": "meter-7", "battery_mv": 1}'
        await stream.send_all(v2("192.0.2.7", "10.0.0.1", 4242, 80, tlvs=tlvs)
                              + b"POST /v1/telemetry HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                              b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            assert chunk
            head += chunk
        await stream.aclose()
        return head.split(b" ", 2)[1]

    assert await post(ssl_tlv("meter-7")) in (b"200", b"202")
    assert await post(ssl_tlv("meter-7", verify=1)) == b"401"      # not verified: no identity, no credentials
    assert await post(b"") == b"401"


async def test_a_bug_in_the_header_path_costs_only_its_connection(autojump_clock, proxied_gateway, monkeypatch,
                                                                   caplog):
    import gridgate.gateway

    gw = await proxied_gateway(mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol="v2"))
    real = gridgate.gateway.accept_proxy_header
    calls = 0

    async def broken_once(stream, **kw):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected")
        return await real(stream, **kw)

    monkeypatch.setattr(gridgate.gateway, "accept_proxy_header", broken_once)
    stream = await open_from(gw.addresses["mqtt"])
    await stream.send_all(v2("192.0.2.7", "10.0.0.1", 1, 2) + gen_connect("meter-1"))
    assert await closed_silently(stream)
    assert refused(gw, "mqtt", "internal_error") == 1
    assert any("injected" in r.getMessage() for r in caplog.records)
    _, connack = await mqtt_via_proxy(gw.addresses["mqtt"], v2("192.0.2.7", "10.0.0.1", 1, 2), "meter-1")
    assert connack == gen_connack(0)


async def test_stalled_headers_hold_nothing_but_their_own_socket(autojump_clock, proxied_gateway):
    """200 connections stall mid-header: a good one is served meanwhile, and
    all 200 are closed together at the deadline, counted as timeouts."""
    gw = await proxied_gateway(mqtt=MQTTConfig(listen=LOOPBACK, proxy_protocol="v2"))
    addr = gw.addresses["mqtt"]
    start = trio.current_time()
    stalled = []
    for i in range(200):
        stream = await open_from(addr)
        await stream.send_all(v2("192.0.2.7", "10.0.0.1", i, 2)[:10 + i % 15])
        stalled.append(stream)
    good, connack = await mqtt_via_proxy(addr, v2("192.0.2.8", "10.0.0.1", 1, 2), "meter-1")
    assert connack == gen_connack(0) and len(gw.conns) == 1
    for stream in stalled:
        assert await closed_silently(stream)
    assert trio.current_time() - start == pytest.approx(gw.config.service.proxy_header_timeout_s, abs=0.1)
    assert refused(gw, "mqtt", "timeout") == 200
    await good.send_all(gen_publish("telemetry", 1, b'{"device_id": "meter-1", "battery_mv": 1}', mid=3))
    assert await read_exactly(good, 4) == gen_puback(3)
