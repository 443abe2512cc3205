"""Gateways acting as one over a real nats-server (DESIGN section 12):
presence, takeover across nodes, downlink commands routed to the node that
holds the device, cluster-wide device and connection lookups, node loss.

Real processes: one ``nats-server``, two or three ``gridgate serve`` with
``[cluster]`` pointing at it, paho-mqtt devices. Every wait is bounded and
polls a real answer (no sleeps standing in for "long enough")."""
from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from binaries import require
from cluster.clients import Device, request, until
from gatewayproc import GatewayProcess
from natsproc import NatsServer

HEARTBEAT_S = 0.2
PRESENCE_TIMEOUT_S = 1.0


@pytest.fixture
def nats(tmp_path):
    require("nats-server")
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


def start_node(tmp_path: Path, nats: NatsServer, name: str,
               presence_timeout_s: float = PRESENCE_TIMEOUT_S) -> GatewayProcess:
    conf = tmp_path / f"{name}.toml"
    conf.write_text(f"""
[cluster]
nats_servers = ["{nats.url}"]
node = "{name}"
heartbeat_s = {HEARTBEAT_S}
presence_timeout_s = {presence_timeout_s}
request_timeout_s = 2.0
""")
    gw = GatewayProcess(tmp_path / f"data-{name}", "--config", str(conf))
    gw.wait_for_line(f"cluster: node {name} joined")
    return gw


@pytest.fixture
def nodes(tmp_path, nats):
    started: list[GatewayProcess] = []

    def start(*names: str, presence_timeout_s: float = PRESENCE_TIMEOUT_S) -> list[GatewayProcess]:
        for name in names:
            started.append(start_node(tmp_path, nats, name, presence_timeout_s))
        return started[-len(names):]

    yield start
    for gw in started:
        gw.kill()


def held_by(gw: GatewayProcess, device_id: str, node: str):
    def check():
        status, info = request(gw.http, "GET", f"/v1/devices/{device_id}")
        return status == 200 and info.get("online") and info.get("node", node) == node and info
    return check


def test_a_command_posted_to_one_node_reaches_a_device_held_by_another(nodes):
    a, b = nodes("gw-a", "gw-b")
    device = Device(a.mqtt, "meter-1")
    try:
        info = until(held_by(b, "meter-1", "gw-a"), what="gw-b sees meter-1 on gw-a")
        assert info["node"] == "gw-a" and info["protocol"] == "mqtt"
        # HEAD: the remote answer's head alone (the fast engine renders it once the other node answered)
        conn = http.client.HTTPConnection(*b.http, timeout=10)
        conn.request("HEAD", "/v1/devices/meter-1")
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.headers["content-length"]) > 0 and resp.read() == b""
        conn.request("GET", "/healthz")            # the connection is still in step after it
        assert conn.getresponse().read() == b'{"status":"ok"}'
        conn.close()
        status, answer = request(b.http, "POST", "/v1/devices/meter-1/commands",
                                 {"type": "reboot", "payload": {"delay_s": 5}})
        assert status == 202, answer
        assert answer["delivered"] is True
        got = until(lambda: device.commands, what="the command at the device")
        assert got[0]["type"] == "reboot" and got[0]["id"] == answer["command_id"]
        # a bad command is refused by the node it was POSTed to, never forwarded
        status, answer = request(b.http, "POST", "/v1/devices/meter-1/commands", {"payload": 1})
        assert status == 400
        # the whole cluster's connections, from either node
        status, conns = request(b.http, "GET", "/v1/connections")
        # (gw-b's own count includes the HTTP connection asking)
        assert status == 200 and conns["by_protocol"] == {"mqtt": 1, "http": 1} and conns["total"] == 2
        assert conns["nodes"]["gw-a"] == {"total": 1, "by_protocol": {"mqtt": 1}}
        assert conns["nodes"]["gw-b"] == {"total": 1, "by_protocol": {"http": 1}}
        assert conns["nodes_missing"] == []
    finally:
        device.close()
    # gone from the whole cluster once it disconnects
    until(lambda: request(b.http, "POST", "/v1/devices/meter-1/commands", {"type": "reboot"})[0] == 404,
          what="device_offline on gw-b")


def test_a_device_connecting_through_another_node_keeps_only_its_newest_session(nodes):
    a, b = nodes("gw-a", "gw-b")
    first = Device(a.mqtt, "meter-7")
    until(held_by(b, "meter-7", "gw-a"), what="gw-b sees meter-7 on gw-a")
    second = Device(b.mqtt, "meter-7")
    try:
        assert first.disconnected.wait(10), "the older session on gw-a was not closed"
        until(held_by(a, "meter-7", "gw-b"), what="gw-a sees meter-7 on gw-b")
        status, answer = request(a.http, "POST", "/v1/devices/meter-7/commands", {"type": "ping"})
        assert status == 202, answer
        until(lambda: second.commands, what="the command at the newest session")
        assert first.commands == []
        assert a.metric("gridgate_cluster_takeovers_total") == 1
    finally:
        first.close()
        second.close()


def test_a_dead_node_is_forgotten_and_its_devices_are_reachable_again_elsewhere(nodes):
    a, b = nodes("gw-a", "gw-b")
    device = Device(a.mqtt, "meter-9")
    until(held_by(b, "meter-9", "gw-a"), what="gw-b sees meter-9 on gw-a")
    a.kill()                                  # SIGKILL: no bye, no unbind
    device.close()
    # presence expires after presence_timeout_s of silence: gw-a is no longer waited for
    b.wait_for_line(f"node gw-a not heard for {PRESENCE_TIMEOUT_S:g}s: it is gone")
    assert request(b.http, "GET", "/v1/devices/meter-9")[0] == 404
    assert b.metric("gridgate_cluster_nodes_lost_total") == 1
    assert request(b.http, "POST", "/v1/devices/meter-9/commands", {"type": "x"})[1]["error"] == "device_offline"
    again = Device(b.mqtt, "meter-9")
    try:
        status, answer = request(b.http, "POST", "/v1/devices/meter-9/commands", {"type": "x"})
        assert status == 202, answer
        until(lambda: again.commands, what="the command after the reconnect")
    finally:
        again.close()


def test_a_node_joining_late_reaches_what_the_others_hold(nodes):
    (a,) = nodes("gw-a")
    devices = [Device(a.mqtt, f"meter-{i}") for i in range(5)]
    try:
        (c,) = nodes("gw-c")
        for d in devices:
            until(held_by(c, d.id, "gw-a"), what=f"gw-c sees {d.id}")
    finally:
        for d in devices:
            d.close()


def test_a_graceful_stop_says_bye(nodes):
    a, b = nodes("gw-a", "gw-b")
    device = Device(a.mqtt, "meter-3")
    until(held_by(b, "meter-3", "gw-a"), what="gw-b sees meter-3")
    device.close()
    assert a.stop() == 0
    b.wait_for_line("cluster: node gw-a left")
    assert b.metric("gridgate_cluster_nodes_lost_total") == 0


def test_a_silent_node_makes_a_miss_a_timeout_not_an_offline(nodes):
    a, b = nodes("gw-a", "gw-b", presence_timeout_s=600)
    device = Device(a.mqtt, "meter-4")
    until(held_by(b, "meter-4", "gw-a"), what="gw-b sees meter-4 on gw-a")
    a.kill()
    device.close()
    # gw-a may still hold it as far as gw-b knows (600 s of presence): not a 404
    status, answer = request(b.http, "POST", "/v1/devices/meter-4/commands", {"type": "x"})
    assert (status, answer["error"]) == (504, "cluster_timeout")
    assert "gw-a did not answer" in answer["detail"]
    status, conns = request(b.http, "GET", "/v1/connections")
    assert status == 200 and conns["nodes_missing"] == ["gw-a"]


def test_two_gateways_with_one_node_name_are_told_so(tmp_path, nats):
    a = start_node(tmp_path, nats, "gw-same")
    b = GatewayProcess(tmp_path / "data-b", "--config", str(tmp_path / "gw-same.toml"))
    try:
        a.wait_for_line("another gateway uses this node's name 'gw-same'")
        b.wait_for_line("another gateway uses this node's name 'gw-same'")
    finally:
        a.kill()
        b.kill()
