"""Flow control as a user sees it: a real ``gridgate serve`` process, paho,
mosquitto_pub, curl and plain sockets (real time: only lower bounds on
durations, which a slow machine cannot break)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import paho.mqtt.client as paho

from binaries import require
from gatewayproc import GatewayProcess, gridgate_env, spool_stats
from mqtt_frames import gen_connack, gen_connect, gen_disconnect
from rawclient import RawClient


def start(tmp_path, **env: str) -> GatewayProcess:
    return GatewayProcess(tmp_path / "data", env=gridgate_env(**env))


def test_a_paho_device_over_its_quota_is_slowed_to_it_and_loses_nothing(tmp_path):
    gw = start(tmp_path, GRIDGATE_LIMITS_DEVICE_READINGS_PER_S="50", GRIDGATE_LIMITS_DEVICE_READINGS_BURST="10")
    try:
        acked = threading.Semaphore(0)
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="meter-1")
        client.on_publish = lambda *a: acked.release()
        client.connect(*gw.mqtt)
        client.loop_start()
        started = time.monotonic()
        for n in range(110):
            client.publish("devices/meter-1/telemetry", json.dumps({"temperature": 20, "seq": n}), qos=1)
        for _ in range(110):
            assert acked.acquire(timeout=30)
        elapsed = time.monotonic() - started
        client.loop_stop()
        client.disconnect()
        # 10 at once, then 50/s. A read's readings are acked before the pause
        # that pays for them, so the last read (up to paho's 20 in flight)
        # is acked unpaid: (110 - 10 - 20) / 50 s at the least
        assert elapsed >= (110 - 10 - 20) / 50, elapsed
        assert gw.metric('gridgate_readings_limited_total{limit="_device",protocol="mqtt"}') > 0
    finally:
        assert gw.stop() == 0, gw.log()
    assert spool_stats(gw.data_dir)["records"] == 110


def test_curl_over_quota_gets_429_with_retry_after(tmp_path):
    curl = require("curl")
    gw = start(tmp_path, GRIDGATE_LIMITS_DEVICE_READINGS_PER_S="0.1", GRIDGATE_LIMITS_DEVICE_READINGS_BURST="1")
    try:
        host, port = gw.http
        url = f"http://{host}:{port}/v1/telemetry"
        body = json.dumps({"device_id": "meter-1", "temperature": 20})
        outs = [subprocess.run([curl, "-s", "-i", "-H", "Content-Type: application/json", "--data", body, url],
                               capture_output=True, text=True, timeout=30) for _ in range(2)]
        assert outs[0].stdout.startswith("HTTP/1.1 202 ")
        head, _, payload = outs[1].stdout.partition("\n\n")      # text mode: CRLF read as LF
        assert head.startswith("HTTP/1.1 429 ")
        assert "\nretry-after: 10\n" in head.lower() + "\n"
        assert json.loads(payload)["error"] == "rate_limited"
    finally:
        assert gw.stop() == 0, gw.log()
    stats = spool_stats(gw.data_dir)
    assert stats["records"] == 1 and stats["rejected"] == 0          # counted, never dead-lettered


def test_mosquitto_pub_reconnecting_16_times_is_banned_and_an_operator_lifts_it(tmp_path):
    mosquitto_pub, curl = require("mosquitto_pub"), require("curl")
    gw = start(tmp_path)
    try:
        host, port = gw.mqtt

        def pub() -> subprocess.CompletedProcess:
            return subprocess.run([mosquitto_pub, "-h", host, "-p", str(port), "-i", "meter-1", "-q", "1",
                                   "-t", "devices/meter-1/telemetry", "-m", '{"temperature": 20}'],
                                  capture_output=True, text=True, timeout=30)

        assert all(pub().returncode == 0 for _ in range(15))
        refused = pub()
        assert refused.returncode != 0 and "not authori" in refused.stderr.lower(), refused.stderr
        api = "http://{}:{}".format(*gw.http)
        bans = json.loads(subprocess.run([curl, "-s", f"{api}/v1/bans"], capture_output=True,
                                         text=True, timeout=30).stdout)
        assert [(b["kind"], b["key"], b["reason"]) for b in bans["bans"]] == [("client_id", "meter-1", "flapping")]
        lifted = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE",
                                 f"{api}/v1/bans/client_id/meter-1"],
                                capture_output=True, text=True, timeout=30)
        assert lifted.stdout == "200"
        assert pub().returncode == 0
    finally:
        assert gw.stop() == 0, gw.log()
    assert spool_stats(gw.data_dir)["records"] == 16


def test_the_21st_connection_from_one_address_is_refused_while_another_address_connects(tmp_path):
    gw = start(tmp_path, GRIDGATE_LIMITS_MAX_CONNECTIONS_PER_IP="20")
    clients: list[RawClient] = []
    try:
        for i in range(20):
            client = RawClient(gw.mqtt)
            assert client.connect(f"meter-{i}") == gen_connack(0)
            clients.append(client)
        extra = RawClient(gw.mqtt)
        extra.send(gen_connect("meter-20"))
        assert extra.recv_exactly(4) == gen_connack(3)
        assert extra.closed_by_server()
        # another address: bind the client end to 127.0.0.2 (all of 127/8 is loopback)
        other = socket.create_connection(gw.mqtt, timeout=10, source_address=("127.0.0.2", 0))
        other.sendall(gen_connect("meter-21"))
        assert other.recv(4) == gen_connack(0)
        other.close()
        # one leaves: its place is free again. The server frees an address's
        # place before it closes the socket, so the client's EOF means it is free.
        leaving = clients.pop()
        leaving.send(gen_disconnect())
        assert leaving.closed_by_server()
        again = RawClient(gw.mqtt)
        assert again.connect("meter-22") == gen_connack(0)
        clients.append(again)
    finally:
        for c in clients:       # gone before /metrics, one more connection from 127.0.0.1, is asked
            c.send(gen_disconnect())
            c.closed_by_server()
            c.close()
    try:
        assert gw.metric('gridgate_connections_over_ip_limit_total{protocol="mqtt"}') == 1
    finally:
        assert gw.stop() == 0, gw.log()


def test_accept_rate_off_serves_a_burst(tmp_path):
    """Guard for the accept loop: with accept_rate_per_s off the burst path stays."""
    gw = start(tmp_path, GRIDGATE_LIMITS_ACCEPT_RATE_PER_S="0")
    try:
        clients = [RawClient(gw.mqtt) for _ in range(50)]
        assert all(c.connect(f"m-{i}") == gen_connack(0) for i, c in enumerate(clients))
        for c in clients:
            c.close()
    finally:
        assert gw.stop() == 0, gw.log()


def test_accept_rate_paces_new_connections(tmp_path):
    gw = start(tmp_path, GRIDGATE_LIMITS_ACCEPT_RATE_PER_S="20")
    try:
        started = time.monotonic()
        clients = [RawClient(gw.mqtt) for _ in range(50)]          # the kernel backlog holds the excess
        assert all(c.connect(f"m-{i}") == gen_connack(0) for i, c in enumerate(clients))
        # 20 from the bucket at once, then 20/s: 30 more take 1.5 s at the least
        assert time.monotonic() - started >= 1.5 * 0.95
        for c in clients:
            c.close()
    finally:
        assert gw.stop() == 0, gw.log()


def test_sighup_reloads_the_limits_and_a_bad_file_keeps_the_running_ones(tmp_path):
    config = tmp_path / "gridgate.toml"
    config.write_text("[limits]\nmax_connections_per_ip = 0\n")
    gw = GatewayProcess(tmp_path / "data", "--config", str(config))
    clients: list[RawClient] = []
    try:
        first = RawClient(gw.mqtt)
        assert first.connect("meter-1") == gen_connack(0)
        clients.append(first)
        config.write_text("[limits]\nmax_connections_per_ip = 2\n")
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_line("SIGHUP: reloaded limits")
        second = RawClient(gw.mqtt)
        assert second.connect("meter-2") == gen_connack(0)
        clients.append(second)
        third = RawClient(gw.mqtt)
        assert third.connect("meter-3") == gen_connack(3)               # the new limit holds
        first.sock.settimeout(0.5)
        assert first.closed_by_server() is False                        # no connection dropped
        config.write_text("[limits]\nmax_connections_per_ip = -1\nbogus = 1\n")
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_line("SIGHUP: the new configuration is unusable, keeping the running one")
        gw.wait_for_line("limits.bogus: unknown key")
        assert RawClient(gw.mqtt).connect("meter-4") == gen_connack(3)  # still 2
    finally:
        for c in clients:
            c.close()
        assert gw.stop() == 0, gw.log()

