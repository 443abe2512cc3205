"""The mqtts, https and wss listeners of a real ``gridgate serve``, driven by
real clients (mosquitto_pub, paho, curl, the websockets client) with
certificates made in the test: what they send lands in the spool; what TLS
refuses is closed, counted and stores nothing, and the gateway serves on."""
from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from websockets.sync.client import connect as ws_connect

from binaries import require
from gatewayproc import GatewayProcess, run_cli, spool_export, spool_stats
from security.pki import CA, Leaf

READING = {"device_id": "meter-1", "temperature": 21.5}


class TLSGateway:
    """A gateway with every TLS listener on an ephemeral loopback port, and
    the PKI it was given."""

    def __init__(self, tmp_path: Path, *, kind: str = "ecdsa", client_certs: bool = False,
                 revoked: list[Leaf] | None = None, engine: str = "fast", handshake_timeout_s: float = 10.0,
                 ca: CA | None = None) -> None:
        self.ca = ca or CA("ecdsa")
        self.dir = tmp_path
        self.ca_file = self.ca.write(tmp_path, "ca")
        cert, key = self.ca.server(kind).write(tmp_path, "server")
        tls = [f'cert_file = "{cert}"', f'key_file = "{key}"', f"handshake_timeout_s = {handshake_timeout_s}"]
        if client_certs:
            # the only credential store: a verified certificate names the device (its CN)
            tls += [f'client_ca_file = "{self.ca_file}"', "require_client_cert = true"]
        if revoked is not None:
            (tmp_path / "crl.pem").write_bytes(self.ca.crl(revoked))
            tls.append(f'crl_file = "{tmp_path / "crl.pem"}"')
        config = tmp_path / "gridgate.toml"
        config.write_text(
            '[mqtt]\ntls_listen = "127.0.0.1:0"\n[http]\ntls_listen = "127.0.0.1:0"\n'
            '[websocket]\ntls_listen = "127.0.0.1:0"\n[tls]\n' + "\n".join(tls) + "\n")
        self.proc = GatewayProcess(tmp_path / "data", "--config", str(config), "--http-engine", engine)

    def client_context(self, leaf: Leaf | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if leaf is not None:
            ctx.load_cert_chain(*leaf.write(self.dir, f"client-{leaf.cert.serial_number}"))
        return ctx

    def failures(self, listener: str, reason: str) -> float:
        return self.proc.metric(f'gridgate_tls_handshake_failures_total{{listener="{listener}",reason="{reason}"}}')

    def handshakes(self, listener: str) -> float:
        return self.proc.metric(f'gridgate_tls_handshake_seconds_count{{listener="{listener}"}}')

    def stop_and_export(self) -> list[dict]:
        assert self.proc.stop() == 0, self.proc.log()
        return spool_export(self.proc.data_dir)


@pytest.fixture
def mosquitto_pub() -> str:
    return require("mosquitto_pub")


@pytest.fixture
def curl() -> str:
    return require("curl")


def mqtts_publish(binary: str, gw: TLSGateway, device: str, *args: str) -> subprocess.CompletedProcess:
    host, port = gw.proc.mqtts
    return subprocess.run([binary, "-h", "localhost", "-p", str(port), "--cafile", gw.ca_file, "-q", "1",
                           "-t", "telemetry", "-i", device, "-m", json.dumps({"battery_mv": 3700}), *args],
                          capture_output=True, text=True, timeout=60)


# -- real clients, each protocol --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_mosquitto_pub_over_mqtts_lands_in_the_spool(mosquitto_pub, tmp_path, kind):
    gw = TLSGateway(tmp_path, kind=kind)
    try:
        out = mqtts_publish(mosquitto_pub, gw, "meter-1")
        assert out.returncode == 0, out.stderr
        assert gw.handshakes("mqtts") == 1
        log = gw.proc.log()
        assert f"mqtts=127.0.0.1:{gw.proc.mqtts[1]}" in log
        assert f"https=127.0.0.1:{gw.proc.https[1]}" in log
        assert f"wss=127.0.0.1:{gw.proc.wss[1]}" in log
    finally:
        records = gw.stop_and_export()
    assert [(r["device_id"], r["protocol"], r["fields"]) for r in records] == [
        ("meter-1", "mqtt", {"battery_mv": 3700})]


def test_paho_qos1_over_tls(tmp_path):
    gw = TLSGateway(tmp_path)
    host, port = gw.proc.mqtts
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="meter-2")
    client.tls_set_context(gw.client_context())
    try:
        client.connect("localhost", port, keepalive=30)
        client.loop_start()
        infos = [client.publish("devices/meter-2/telemetry", json.dumps({"humidity": 40 + i}), qos=1)
                 for i in range(50)]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()
        client.disconnect()
        client.loop_stop()
    finally:
        records = gw.stop_and_export()
    assert sorted(r["fields"]["humidity"] for r in records) == list(range(40, 90))
    assert {r["device_id"] for r in records} == {"meter-2"}


@pytest.mark.parametrize("engine", ["fast", "std"])
def test_curl_posts_over_https_on_both_engines(curl, tmp_path, engine):
    gw = TLSGateway(tmp_path, engine=engine)
    host, port = gw.proc.https
    try:
        # two requests on one connection: keep-alive over TLS, then a reading each
        url = f"https://localhost:{port}/v1/telemetry"
        out = subprocess.run([curl, "-sS", "--cacert", gw.ca_file, "-H", "Content-Type: application/json",
                              "--data-binary", json.dumps([READING] * 3), url, "--next", "--cacert", gw.ca_file,
                              "-H", "Content-Type: application/json", "--data-binary", json.dumps(READING), url],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        answers = [json.loads(line) for line in out.stdout.replace("}{", "}\n{").splitlines()]
        assert answers == [{"accepted": 3, "rejected": 0, "errors": []}, {"accepted": 1, "rejected": 0, "errors": []}]
        assert gw.handshakes("https") == 1
    finally:
        records = gw.stop_and_export()
    assert len(records) == 4 and {(r["device_id"], r["protocol"]) for r in records} == {("meter-1", "http")}


def test_websockets_client_over_wss(tmp_path):
    gw = TLSGateway(tmp_path)
    host, port = gw.proc.wss
    try:
        with ws_connect(f"wss://localhost:{port}/v1/ws?device_id=meter-3", ssl=gw.client_context()) as ws:
            ws.send(json.dumps({"seq": 1, "readings": [{"temperature": 20}, {"humidity": 500}]}))
            answer = json.loads(ws.recv(timeout=10))
        assert (answer["ack"], answer["accepted"], answer["rejected"]) == (1, 1, 1)
    finally:
        records = gw.stop_and_export()
    assert [(r["device_id"], r["protocol"], r["fields"]) for r in records] == [
        ("meter-3", "ws", {"temperature_mc": 20000})]


def test_paho_over_wss_to_mqtt(tmp_path):
    gw = TLSGateway(tmp_path)
    host, port = gw.proc.wss
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="meter-ws", transport="websockets")
    client.ws_set_options(path="/mqtt")
    client.tls_set_context(gw.client_context())
    try:
        client.connect("localhost", port, keepalive=30)
        client.loop_start()
        infos = [client.publish("devices/meter-ws/telemetry", json.dumps({"humidity": 10 + i}), qos=1)
                 for i in range(20)]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()
        client.disconnect()
        client.loop_stop()
    finally:
        records = gw.stop_and_export()
    assert sorted(r["fields"]["humidity"] for r in records) == list(range(10, 30))
    assert {(r["device_id"], r["protocol"]) for r in records} == {("meter-ws", "mqtt-ws")}


# -- mutual TLS -----------------------------------------------------------------------------------


def test_mutual_tls_accepts_a_device_certificate_and_refuses_the_rest(mosquitto_pub, tmp_path):
    ca = CA("ecdsa")
    good, revoked = ca.issue(cn="meter-1"), ca.issue(cn="meter-2")
    expired = ca.issue(cn="meter-3", not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                       not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
    stranger = CA("ecdsa", "another CA").issue(cn="meter-4")
    gw = TLSGateway(tmp_path, ca=ca, client_certs=True, revoked=[revoked])
    try:
        refused = {}
        for name, leaf in (("revoked", revoked), ("expired", expired), ("wrong-ca", stranger)):
            cert, key = leaf.write(tmp_path, name)
            out = mqtts_publish(mosquitto_pub, gw, leaf.cert.subject.rfc4514_string(), "--cert", cert, "--key", key)
            refused[name] = out.returncode
        no_cert = mqtts_publish(mosquitto_pub, gw, "meter-5")
        cert, key = good.write(tmp_path, "good")
        ok = mqtts_publish(mosquitto_pub, gw, "meter-1", "--cert", cert, "--key", key)
        assert ok.returncode == 0, ok.stderr
        assert all(code != 0 for code in refused.values()), refused
        assert no_cert.returncode != 0
        assert gw.failures("mqtts", "revoked") == 1
        assert gw.failures("mqtts", "bad_certificate") == 1
        assert gw.failures("mqtts", "unknown_ca") == 1
        assert gw.failures("mqtts", "no_certificate") == 1
        assert gw.handshakes("mqtts") == 1
        # no password: the certificate named the device
        assert gw.proc.metric('gridgate_auth_successes_total{method="certificate",protocol="mqtt"}') == 1

        # the same certificates over https
        host, port = gw.proc.https
        with pytest.raises(ssl.SSLError, match="certificate revoked"):
            http_post_tls(port, gw.client_context(revoked), json.dumps(READING).encode())
        body = http_post_tls(port, gw.client_context(good), json.dumps(READING).encode())
        assert json.loads(body)["accepted"] == 1
        assert gw.failures("https", "revoked") == 1
    finally:
        records = gw.stop_and_export()
    assert sorted((r["device_id"], r["protocol"]) for r in records) == [("meter-1", "http"), ("meter-1", "mqtt")]
    assert spool_stats(gw.proc.data_dir)["rejected"] == 0


def http_post_tls(port: int, context: ssl.SSLContext, body: bytes) -> bytes:
    """One POST /v1/telemetry over TLS with the stdlib; the answer's body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /v1/telemetry HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 2"), head
    return rest


# -- what is not a TLS client ------------------------------------------------------------------------


def test_plaintext_to_each_tls_port_is_closed_and_counted_and_others_are_served(mosquitto_pub, tmp_path):
    gw = TLSGateway(tmp_path)
    try:
        host, mqtts = gw.proc.mqtts
        # a plain MQTT client on the TLS port: closed at its CONNECT
        out = subprocess.run([mosquitto_pub, "-h", host, "-p", str(mqtts), "-q", "1", "-t", "telemetry",
                              "-i", "meter-9", "-m", '{"battery_mv": 1}'], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0
        for listener, request in (("https", b"POST /v1/telemetry HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"),
                                  ("wss", b"GET /v1/ws?device_id=m HTTP/1.1\r\nHost: gw\r\n"
                                          b"Upgrade: websocket\r\n\r\n")):
            with socket.create_connection(getattr(gw.proc, listener), timeout=10) as sock:
                sock.sendall(request)
                closed_with = _read_until_closed(sock)
            # whatever TLS alert OpenSSL wrote, never an HTTP answer
            assert b"HTTP/" not in closed_with
        assert gw.failures("mqtts", "plaintext") == 1
        assert gw.failures("https", "plaintext") == 1
        assert gw.failures("wss", "plaintext") == 1
        # still serving: TLS and plain alike
        assert mqtts_publish(mosquitto_pub, gw, "meter-1").returncode == 0
        plain = subprocess.run([mosquitto_pub, "-h", host, "-p", str(gw.proc.mqtt[1]), "-q", "1", "-t", "telemetry",
                                "-i", "meter-2", "-m", '{"battery_mv": 2}'], capture_output=True, text=True, timeout=30)
        assert plain.returncode == 0, plain.stderr
        assert gw.proc.alive()
    finally:
        records = gw.stop_and_export()
    assert sorted(r["device_id"] for r in records) == ["meter-1", "meter-2"]


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_stalling_handshake_is_closed_at_the_timeout_while_others_are_served(mosquitto_pub, tmp_path):
    # real sockets, so real time: a short configured timeout (the exact
    # instant is tested under the autojump clock in test_tls_context)
    timeout_s = 3.0
    gw = TLSGateway(tmp_path, handshake_timeout_s=timeout_s)
    try:
        started = time.monotonic()
        stalled = [socket.create_connection(address, timeout=10)
                   for address in (gw.proc.mqtts, gw.proc.mqtts, gw.proc.https, gw.proc.wss)]
        stalled[1].sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")     # half a ClientHello
        # the accept loop is not held up: a device handshakes and publishes
        # before the first stalled handshake times out (a handshake in the
        # accept loop would hold it for two timeouts on mqtts)
        assert mqtts_publish(mosquitto_pub, gw, "meter-1").returncode == 0
        assert time.monotonic() - started < timeout_s
        for sock in stalled:
            assert _read_until_closed(sock) == b""
            waited = time.monotonic() - started
            assert timeout_s - 0.1 <= waited < timeout_s + 5.0, waited
            sock.close()
        assert gw.failures("mqtts", "timeout") == 2
        assert gw.failures("https", "timeout") == 1
        assert gw.failures("wss", "timeout") == 1
        assert gw.handshakes("mqtts") == 1
    finally:
        records = gw.stop_and_export()
    assert [r["device_id"] for r in records] == ["meter-1"]


# -- start-up ------------------------------------------------------------------------------------------


def test_an_unusable_certificate_stops_the_start_with_exit_2_naming_the_file(tmp_path):
    ca = CA("ecdsa")
    cert, _ = ca.server().write(tmp_path, "server")
    _, wrong_key = ca.server().write(tmp_path, "other")
    config = tmp_path / "gridgate.toml"
    config.write_text(f'[mqtt]\ntls_listen = "127.0.0.1:0"\n[tls]\ncert_file = "{cert}"\nkey_file = "{wrong_key}"\n')
    out = run_cli("serve", "--config", str(config), "--mqtt", "127.0.0.1:0", "--http", "", "--ws", "",
                  "--data-dir", str(tmp_path / "data"))
    assert out.returncode == 2, out.stderr
    assert f"tls.cert_file {cert} / tls.key_file {wrong_key}: the key does not belong to the certificate" in out.stderr
    assert "PRIVATE KEY" not in out.stderr


def test_a_tls_port_in_use_is_a_listen_error_exit_1(tmp_path):
    ca = CA("ecdsa")
    cert, key = ca.server().write(tmp_path, "server")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gridgate.toml"
        config.write_text(f'[mqtt]\ntls_listen = "127.0.0.1:{port}"\n[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
        out = run_cli("serve", "--config", str(config), "--mqtt", "127.0.0.1:0", "--http", "", "--ws", "",
                      "--data-dir", str(tmp_path / "data"))
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on mqtts 127.0.0.1:{port}:" in out.stderr
