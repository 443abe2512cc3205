"""A real gridgate behind a real HAProxy running deploy/haproxy.cfg (mode tcp,
send-proxy-v2 for MQTT, send-proxy-v2-ssl-cn for MQTT over TLS ended at
HAProxy, send-proxy (v1) for HTTP). Clients connect to HAProxy from
loopback addresses of their own (127.0.0.2, .3, ...); every connection
gridgate accepts comes from HAProxy's 127.0.0.1, yet logs, /v1/connections,
the per-address limit and address bans see the client's address."""
from __future__ import annotations

import base64
import http.client
import json
import queue
import socket
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion
from websockets.sync.client import connect as ws_connect

from binaries import require
from gatewayproc import GatewayProcess, gridgate_env, run_cli
from gridgate.security.passwords import format_line, hash_password
from haproxyproc import HAProxy
from mqtt_frames import gen_connect
from proxy_headers import v2

# paho's reason codes for MQTT 3.1.1 CONNACK return codes 0, 3 and 5
ACCEPTED, SERVER_UNAVAILABLE, NOT_AUTHORIZED = 0, 136, 135


class Setup:
    def __init__(self, gateway: GatewayProcess, proxy: HAProxy, token: str, ca: trustme.CA, tmp: Path) -> None:
        self.gateway, self.proxy, self.token, self.ca, self.tmp = gateway, proxy, token, ca, tmp

    def get(self, path: str, source: str = "127.0.0.1") -> tuple[int, object]:
        """GET through HAProxy's HTTP frontend (gridgate's HTTP listener takes PROXY v1 only)."""
        conn = http.client.HTTPConnection(*self.proxy.frontends["http"], timeout=20, source_address=(source, 0))
        conn.request("GET", path, headers={"authorization": f"Bearer {self.token}"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        is_json = resp.getheader("content-type", "").startswith("application/json")
        return resp.status, json.loads(body) if is_json else body.decode()

    def metric(self, prefix: str) -> float:
        _, text = self.get("/metrics")
        assert isinstance(text, str)
        values = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix + " ")]
        return values[0] if values else 0.0


@pytest.fixture(scope="module")
def behind_haproxy(tmp_path_factory):
    haproxy = require("haproxy")
    tmp = tmp_path_factory.mktemp("haproxy")
    (tmp / "passwd").write_text(format_line("meter-1", hash_password(b"pw1"))
                                + format_line("meter-2", hash_password(b"pw2"))
                                + format_line("meter-3", hash_password(b"pw3")))
    out = run_cli("admin-token", "ops", "--scope", "devices:read")
    assert out.returncode == 0, out.stderr
    (tmp / "admin.toml").write_text(out.stderr.split("\n", 1)[1])
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    server = ca.issue_cert("gridgate.test", "127.0.0.1")
    (tmp / "lb.pem").write_bytes(b"".join(p.bytes() for p in server.cert_chain_pems) + server.private_key_pem.bytes())
    gateway = GatewayProcess(tmp / "data", env=gridgate_env(
        GRIDGATE_SERVICE_TRUSTED_PROXIES="127.0.0.1/32",
        GRIDGATE_SERVICE_LOG_LEVEL="debug",
        GRIDGATE_MQTT_PROXY_PROTOCOL="v2",
        GRIDGATE_HTTP_PROXY_PROTOCOL="v1",
        GRIDGATE_WEBSOCKET_PROXY_PROTOCOL="v2",
        GRIDGATE_LIMITS_MAX_CONNECTIONS_PER_IP="2",
        GRIDGATE_AUTH_PASSWORD_FILE=str(tmp / "passwd"),
        GRIDGATE_AUTH_FAILURES_BEFORE_BAN="2",
        GRIDGATE_AUTH_FAILURE_DELAY_MS="100",
        GRIDGATE_ADMIN_TOKENS_FILE=str(tmp / "admin.toml"),
    ))
    try:
        proxy = HAProxy(haproxy, tmp, gateway.addresses, tls_pem=tmp / "lb.pem", client_ca=tmp / "ca.pem")
    except BaseException:
        gateway.kill()
        raise
    try:
        yield Setup(gateway, proxy, out.stdout.strip(), ca, tmp)
    finally:
        proxy.stop()
        assert gateway.stop() == 0, gateway.log()


def paho(addr, client_id: str, source: str, *, username: str | None = None, password: str | None = None,
         tls: dict | None = None) -> tuple[mqtt.Client, int]:
    """A paho client connected from ``source`` (its own loopback address) and its CONNACK's reason code."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    codes: queue.Queue[int] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, rc, _p: codes.put(rc.value)
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set(**tls)
    client.connect(addr[0], addr[1], keepalive=60, bind_address=source)
    client.loop_start()
    try:
        code = codes.get(timeout=20)
    except queue.Empty:
        client.loop_stop()
        raise AssertionError(f"no CONNACK for {client_id} from {source}") from None
    if code != ACCEPTED:
        client.loop_stop()      # no automatic reconnects of a refused client
    return client, code


def close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def publish(client: mqtt.Client, device: str) -> None:
    info = client.publish("telemetry", json.dumps({"device_id": device, "battery_mv": 3000}), qos=1)
    info.wait_for_publish(timeout=20)
    assert info.is_published()


def remote_of(setup: Setup, device: str) -> str:
    """The connection address GET /v1/devices/{id} reports for an online device."""
    status, body = setup.get(f"/v1/devices/{device}")
    assert status == 200 and isinstance(body, dict) and body["online"], body
    return str(body["remote"])


def test_a_client_is_seen_with_its_own_address(behind_haproxy):
    setup = behind_haproxy
    client, code = paho(setup.proxy.frontends["mqtt"], "meter-1", "127.0.0.2", username="meter-1", password="pw1")
    assert code == ACCEPTED
    try:
        publish(client, "meter-1")
        assert remote_of(setup, "meter-1").startswith("127.0.0.2:")
        setup.gateway.wait_for_line("connect mqtt from 127.0.0.2:")
    finally:
        close(client)


def test_http_through_haproxy_send_proxy_v1(behind_haproxy):
    setup = behind_haproxy
    conn = http.client.HTTPConnection(*setup.proxy.frontends["http"], timeout=20, source_address=("127.0.0.5", 0))
    try:
        conn.request("POST", "/v1/telemetry", body=json.dumps({"device_id": "meter-2", "battery_mv": 1}),
                     headers={"content-type": "application/json",
                              "authorization": "Basic " + base64.b64encode(b"meter-2:pw2").decode()})
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (200, 202)
        setup.gateway.wait_for_line("connect http from 127.0.0.5:")
        assert setup.metric('gridgate_connections_opened_total{protocol="http"}') >= 1
    finally:
        conn.close()


def test_websocket_through_haproxy_send_proxy_v2(behind_haproxy):
    setup = behind_haproxy
    host, port = setup.proxy.frontends["ws"]
    sock = socket.create_connection((host, port), timeout=20, source_address=("127.0.0.10", 0))
    auth = {"authorization": "Basic " + base64.b64encode(b"meter-3:pw3").decode()}
    with ws_connect(f"ws://{host}:{port}/v1/ws?device_id=meter-3", sock=sock, additional_headers=auth) as ws:
        ws.send(json.dumps({"seq": 1, "readings": [{"battery_mv": 3000}]}))
        assert json.loads(ws.recv(timeout=20)) == {"ack": 1, "accepted": 1, "rejected": 0, "errors": []}
        assert remote_of(setup, "meter-3").startswith("127.0.0.10:")


def test_max_connections_per_ip_applies_to_the_client_address(behind_haproxy):
    setup = behind_haproxy
    addr = setup.proxy.frontends["mqtt"]
    first, c1 = paho(addr, "meter-1", "127.0.0.3", username="meter-1", password="pw1")
    second, c2 = paho(addr, "meter-2", "127.0.0.3", username="meter-2", password="pw2")
    try:
        assert (c1, c2) == (ACCEPTED, ACCEPTED)
        _, c3 = paho(addr, "meter-1", "127.0.0.3", username="meter-1", password="pw1")
        assert c3 == SERVER_UNAVAILABLE              # a third from 127.0.0.3: over the limit of 2
        other, c4 = paho(addr, "meter-3", "127.0.0.6", username="meter-3", password="pw3")
        assert c4 == ACCEPTED                        # another client behind the same proxy
        close(other)
    finally:
        close(first)
        close(second)


def test_a_banned_client_address_is_refused_through_the_proxy(behind_haproxy):
    setup = behind_haproxy
    addr = setup.proxy.frontends["mqtt"]
    for _ in range(2):
        _, code = paho(addr, "meter-1", "127.0.0.4", username="meter-1", password="wrong")
        assert code == 134                           # bad user name or password
    _, code = paho(addr, "meter-1", "127.0.0.4", username="meter-1", password="pw1")
    assert code == NOT_AUTHORIZED                    # banned: refused at once
    status, body = setup.get("/v1/bans")
    assert status == 200 and isinstance(body, dict)
    assert "127.0.0.4" in json.dumps(body) and "127.0.0.1" not in json.dumps(body)
    client, code = paho(addr, "meter-1", "127.0.0.7", username="meter-1", password="pw1")
    assert code == ACCEPTED
    close(client)


def test_tls_ended_at_haproxy_the_certificate_cn_is_the_identity(behind_haproxy):
    setup = behind_haproxy
    device = setup.ca.issue_cert("meter-7.devices", common_name="meter-7")
    cert, key = setup.tmp / "meter-7.pem", setup.tmp / "meter-7.key"
    device.cert_chain_pems[0].write_to_path(str(cert))
    device.private_key_pem.write_to_path(str(key))
    tls = {"ca_certs": str(setup.tmp / "ca.pem"), "certfile": str(cert), "keyfile": str(key)}
    addr = setup.proxy.frontends["mqtts"]
    # no user name or password: the verified certificate HAProxy vouched for is the identity
    client, code = paho(addr, "meter-7", "127.0.0.8", tls=tls)
    assert code == ACCEPTED
    try:
        publish(client, "meter-7")
        assert remote_of(setup, "meter-7").startswith("127.0.0.8:")
    finally:
        close(client)
    # the identity binds the client id
    _, code = paho(addr, "meter-1", "127.0.0.8", tls=tls)
    assert code == NOT_AUTHORIZED
    # TLS without a client certificate: no identity, no credentials
    _, code = paho(addr, "meter-7", "127.0.0.8", tls={"ca_certs": str(setup.tmp / "ca.pem")})
    assert code == NOT_AUTHORIZED


def test_a_header_from_an_untrusted_address_is_closed(behind_haproxy):
    setup = behind_haproxy
    before = setup.metric('gridgate_proxy_protocol_refused_total{listener="mqtt",reason="untrusted_source"}')
    # straight to gridgate from 127.0.0.9, forging HAProxy's header
    sock = socket.create_connection(setup.gateway.mqtt, timeout=20, source_address=("127.0.0.9", 0))
    try:
        sock.sendall(v2("203.0.113.1", "127.0.0.1", 1, 1883) + gen_connect("meter-1"))
        assert sock.recv(1024) == b""
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    after = setup.metric('gridgate_proxy_protocol_refused_total{listener="mqtt",reason="untrusted_source"}')
    assert after == before + 1
    setup.gateway.wait_for_line("closing a connection from 127.0.0.9:")
