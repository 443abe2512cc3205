"""Identity as users meet it: a real ``gridgate serve`` with a password file
made by mosquitto_passwd and a JWT key file, driven by mosquitto_pub,
paho-mqtt (TCP and WebSocket), curl and the ``websockets`` client."""
from __future__ import annotations

import json
import subprocess
import threading

import paho.mqtt.client as paho
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from binaries import require
from gatewayproc import GatewayProcess, spool_export, spool_stats
from security.jwt_helpers import make_key, public_pem, token


@pytest.fixture
def secured(tmp_path):
    mosquitto_passwd = require("mosquitto_passwd")
    passwd = tmp_path / "passwd"
    subprocess.run([mosquitto_passwd, "-c", "-b", str(passwd), "meter-1", "one pw"], check=True)
    subprocess.run([mosquitto_passwd, "-b", str(passwd), "meter-2", "two"], check=True)
    key = make_key("RS256")
    (tmp_path / "keys.toml").write_text(f'"meter-4" = """{public_pem(key)}"""\n')
    config = tmp_path / "gridgate.toml"
    config.write_text(f'[auth]\npassword_file = "{passwd}"\njwt_keys_file = "{tmp_path / "keys.toml"}"\n'
                      "failure_delay_ms = 200\n")
    gw = GatewayProcess(tmp_path / "data", "--config", str(config))
    yield gw, key
    assert gw.stop() == 0, gw.log()


def mosquitto_pub(addr, *args: str) -> subprocess.CompletedProcess:
    host, port = addr
    return subprocess.run([require("mosquitto_pub"), "-h", host, "-p", str(port), "-q", "1", *args],
                          capture_output=True, text=True, timeout=60)


def test_mosquitto_pub_with_a_mosquitto_passwd_file(secured):
    gw, key = secured
    ok = mosquitto_pub(gw.mqtt, "-i", "meter-1", "-u", "meter-1", "-P", "one pw", "-t", "telemetry",
                       "-m", '{"battery_mv": 3700}')
    assert ok.returncode == 0, ok.stderr
    wrong = mosquitto_pub(gw.mqtt, "-i", "meter-1", "-u", "meter-1", "-P", "one", "-t", "telemetry", "-m", "{}")
    assert wrong.returncode != 0 and "bad user name or password" in wrong.stderr.lower()
    other = mosquitto_pub(gw.mqtt, "-i", "meter-2", "-u", "meter-1", "-P", "one pw", "-t", "telemetry", "-m", "{}")
    assert other.returncode != 0 and "not authori" in other.stderr.lower()
    anonymous = mosquitto_pub(gw.mqtt, "-i", "meter-1", "-t", "telemetry", "-m", "{}")
    assert anonymous.returncode != 0 and "not authori" in anonymous.stderr.lower()
    # a JWT as the password (RS256)
    tok = token(key, "RS256", sub="meter-4")
    jwt_ok = mosquitto_pub(gw.mqtt, "-i", "meter-4", "-u", "meter-4", "-P", tok, "-t", "devices/meter-4/telemetry",
                           "-m", '{"battery_mv": 3600}')
    assert jwt_ok.returncode == 0, jwt_ok.stderr
    assert gw.stop() == 0, gw.log()
    assert sorted(r["device_id"] for r in spool_export(gw.data_dir)) == ["meter-1", "meter-4"]
    assert spool_stats(gw.data_dir)["rejected"] == 0
    # no secret in the log
    assert "one pw" not in gw.log() and tok not in gw.log()


def _paho_connect(addr, client_id: str, user: str, password: str, transport: str = "tcp") -> int:
    host, port = addr
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, transport=transport)
    if transport == "websockets":
        client.ws_set_options(path="/mqtt")
    client.username_pw_set(user, password)
    done, codes = threading.Event(), []

    def on_connect(_c, _u, _flags, reason_code, _props):
        codes.append(reason_code.value if hasattr(reason_code, "value") else int(reason_code))
        done.set()
    client.on_connect = on_connect
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        assert done.wait(20)
        if codes[0] == 0:
            info = client.publish("telemetry", json.dumps({"battery_mv": 3500}), qos=1)
            info.wait_for_publish(timeout=10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


def test_paho_over_tcp_and_websocket(secured):
    gw, _ = secured
    # paho (MQTT 3.1.1) reports the CONNACK return code as its v5 equivalent
    assert _paho_connect(gw.mqtt, "meter-2", "meter-2", "two") == 0
    assert _paho_connect(gw.mqtt, "meter-2", "meter-2", "nope") == 134            # 0x04 -> bad user name or password
    assert _paho_connect(gw.mqtt, "meter-1", "meter-2", "two") == 135             # 0x05 -> not authorized
    assert _paho_connect(gw.ws, "meter-2", "meter-2", "two", "websockets") == 0
    assert _paho_connect(gw.ws, "meter-2", "meter-2", "bad", "websockets") == 134
    assert gw.stop() == 0, gw.log()
    assert spool_stats(gw.data_dir)["records"] == 2


def curl(gw, *args: str, body: str = '{"device_id": "meter-1", "battery_mv": 3300}') -> tuple[int, str, str]:
    host, port = gw.http
    out = subprocess.run([require("curl"), "-sS", "-o", "-", "-D", "/dev/stderr", "-w", "\n%{http_code}",
                          "-H", "Content-Type: application/json", "--data-binary", body, *args,
                          f"http://{host}:{port}/v1/telemetry"], capture_output=True, text=True, timeout=60)
    text, _, code = out.stdout.rpartition("\n")
    return int(code), text, out.stderr


def test_curl_with_basic_and_bearer(secured):
    gw, key = secured
    code, body, _ = curl(gw, "-u", "meter-1:one pw")
    assert code == 202 and json.loads(body)["accepted"] == 1
    tok = token(key, "RS256", sub="meter-4")
    code, body, _ = curl(gw, "-H", f"Authorization: Bearer {tok}", body='{"device_id": "meter-4", "humidity": 5}')
    assert code == 202 and json.loads(body)["accepted"] == 1
    code, body, headers = curl(gw)
    assert code == 401 and json.loads(body)["error"] == "unauthorized"
    assert "www-authenticate: bearer" in headers.lower()
    code, _, _ = curl(gw, "-u", "meter-1:wrong")
    assert code == 401
    code, body, _ = curl(gw, "-H", f"Authorization: Bearer {tok}")      # meter-4 writing meter-1's reading
    assert code == 202 and json.loads(body)["errors"][0]["reason"] == "not_authorized"
    assert gw.stop() == 0, gw.log()
    stats = spool_stats(gw.data_dir)
    assert (stats["records"], stats["rejected"]) == (2, 1)


def test_websockets_client(secured):
    gw, key = secured
    host, port = gw.ws
    url = f"ws://{host}:{port}/v1/ws?device_id=meter-4"
    with pytest.raises(InvalidStatus) as info:
        ws_connect(url, open_timeout=20).close()
    assert info.value.response.status_code == 401
    assert info.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    tok = token(key, "RS256", sub="meter-4")
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {tok}"}, open_timeout=20) as ws:
        ws.send(json.dumps({"seq": 7, "readings": [{"battery_mv": 3100}]}))
        assert json.loads(ws.recv(timeout=20)) == {"ack": 7, "accepted": 1, "rejected": 0, "errors": []}
    assert gw.stop() == 0, gw.log()
    assert spool_stats(gw.data_dir)["records"] == 1


def _wait_for_line(gw, text: str, after: int, timeout: float = 30) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not any(text in line for line in gw.lines[after:]):
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.05)


def test_sighup_reloads_the_password_file(secured, tmp_path):
    import signal

    from gatewayproc import run_cli
    gw, _ = secured
    passwd = tmp_path / "passwd"
    assert run_cli("passwd", str(passwd), "meter-3", "-b", "three").returncode == 0
    denied = mosquitto_pub(gw.mqtt, "-i", "meter-3", "-u", "meter-3", "-P", "three", "-t", "telemetry", "-m", "{}")
    assert denied.returncode != 0                          # not read yet
    mark = len(gw.lines)
    gw.proc.send_signal(signal.SIGHUP)
    _wait_for_line(gw, "credentials reloaded", mark)
    ok = mosquitto_pub(gw.mqtt, "-i", "meter-3", "-u", "meter-3", "-P", "three", "-t", "telemetry",
                       "-m", '{"battery_mv": 3000}')
    assert ok.returncode == 0, ok.stderr
    # a broken file: said in the log, the old set stays, the gateway serves on
    good = passwd.read_text()
    passwd.write_text(good + "broken line\n")
    mark = len(gw.lines)
    gw.proc.send_signal(signal.SIGHUP)
    _wait_for_line(gw, "credentials reload failed", mark)
    assert mosquitto_pub(gw.mqtt, "-i", "meter-3", "-u", "meter-3", "-P", "three", "-t", "telemetry",
                         "-m", '{"battery_mv": 3001}').returncode == 0
    assert gw.stop() == 0, gw.log()
    assert spool_stats(gw.data_dir)["records"] == 2
