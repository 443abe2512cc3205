"""The whole scale-out story at once (issue 22's acceptance test): three
gateway processes behind a real HAProxy (deploy/haproxy.cfg, ``mode tcp``,
``send-proxy-v2``) forming one cluster over a real three-node NATS cluster
that is also their JetStream sink (replicas 3); 1,000 gridgate-loadgen
devices with reconnect through HAProxy. Mid-stream one gateway is killed
with SIGKILL, later one NATS node too; the devices reconnect through HAProxy
to the live gateways. Afterwards the killed gateway is started again on its
own data dir (what it had acknowledged but not yet forwarded replays from
its spool) and JetStream must hold every reading any gateway acknowledged.

The NATS node killed is the one holding the most client connections (the
gateways' sink and bus connections move to the others) among those that
do not lead the stream. SIGKILLing the stream's leader under this load is
a nats-server fault, not a gateway one: in 1 of 22 runs with every
JetStream ack logged, Debian's nats-server 2.9.10 acknowledged two
different messages with the same stream sequence (the second from a node
elected while missing that sequence) and kept only one of them, so an
acknowledged reading was gone whatever the client did (README, "JetStream
and a killed stream leader").

Before the load, with a quiet cluster: a command POSTed to one gateway
reaches a device held by another, and a device connecting twice through
HAProxy (leastconn: the second connection lands on another gateway) keeps
only its newest session. Every wait is bounded."""
from __future__ import annotations

import functools
import json
import subprocess
import time
from pathlib import Path

import pytest
import trustme

from binaries import require
from cluster import clients
from cluster.clients import Device
from gatewayproc import BIN, GatewayProcess, gridgate_env, spool_stats
from haproxyproc import HAProxy
from natsproc import NatsCluster
from sinks.jetstream_reader import stream_info, stream_messages

DEVICES = 1_000
LOAD_S = 24
RATE = 1_500                 # readings/s over the fleet: bounded, and light enough for 2 shared cores

# three gateways, a NATS cluster and HAProxy on 2 shared cores: more patience than the two-node tests
request = functools.partial(clients.request, timeout=20.0)
until = functools.partial(clients.until, timeout=20.0, interval=0.1)


def gateway_env(name: str, nats_urls: list[str]) -> dict[str, str]:
    urls = ",".join(nats_urls)
    return gridgate_env(
        GRIDGATE_SERVICE_TRUSTED_PROXIES="127.0.0.1/32",
        # MQTT only through HAProxy: the test reads each gateway's HTTP API directly
        # (/metrics, the directory, commands), which a PROXY listener would refuse
        GRIDGATE_MQTT_PROXY_PROTOCOL="v2",
        GRIDGATE_SINK_KIND="nats", GRIDGATE_SINK_OPEN_S="0.5", GRIDGATE_SINK_WRITE_TIMEOUT_S="15",
        GRIDGATE_NATS_SERVERS=urls, GRIDGATE_NATS_REPLICAS="3",
        GRIDGATE_CLUSTER_NATS_SERVERS=urls, GRIDGATE_CLUSTER_NODE=name,
        GRIDGATE_CLUSTER_HEARTBEAT_S="0.25", GRIDGATE_CLUSTER_PRESENCE_TIMEOUT_S="1.5",
    )


def start_gateway(tmp_path: Path, name: str, nats_urls: list[str], ports: dict | None = None) -> GatewayProcess:
    args = []
    if ports is not None:          # a restart: the same ports, so HAProxy's server line finds it again
        args = [arg for kind in ("mqtt", "http", "ws") for arg in (f"--{kind}", "{}:{}".format(*ports[kind]))]
    gw = GatewayProcess(tmp_path / f"data-{name}", *args, env=gateway_env(name, nats_urls), start_timeout=60)
    gw.wait_for_line(f"cluster: node {name} joined", timeout=30)
    return gw


class Cluster:
    def __init__(self, tmp_path: Path) -> None:
        haproxy = require("haproxy")
        require("nats-server")
        self.tmp = tmp_path
        self.nats = NatsCluster(tmp_path / "nats").start()
        self.gateways: dict[str, GatewayProcess] = {}
        try:
            for name in ("gw1", "gw2", "gw3"):
                self.gateways[name] = start_gateway(tmp_path, name, self.nats.urls)
            for gw in self.gateways.values():             # each has heard the other two
                for other in self.gateways:
                    if gw is not self.gateways[other]:
                        gw.wait_for_line(f"cluster: node {other} joined (", timeout=30)
            ca = trustme.CA()
            ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
            cert = ca.issue_cert("gridgate.test", "127.0.0.1")
            (tmp_path / "lb.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems)
                                              + cert.private_key_pem.bytes())
            addrs = [gw.addresses for gw in self.gateways.values()]
            self.proxy = HAProxy(haproxy, tmp_path, addrs[0], more_gateways=addrs[1:], tls_pem=tmp_path / "lb.pem",
                                 client_ca=tmp_path / "ca.pem")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "proxy", None) is not None:
            self.proxy.stop()
        for gw in self.gateways.values():
            gw.kill()
        self.nats.stop()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def busiest_follower(cluster: Cluster) -> str:
    """The NATS node with the most client connections that does not lead the stream (module docstring)."""
    # None while an election is on: ask again
    leader = until(lambda: stream_info(cluster.nats.urls).cluster.leader, timeout=20, what="the stream's leader")
    followers = [node for node in cluster.nats.nodes if node.name != leader and node.running()]
    return max(followers, key=lambda node: node.client_connections()).name


def holder(cluster: Cluster, device_id: str):
    status, info = request(cluster.gateways["gw1"].http, "GET", f"/v1/devices/{device_id}")
    return info.get("node", "gw1") if status == 200 and info.get("online") else None


def test_three_gateways_behind_haproxy_act_as_one_and_lose_nothing(cluster, tmp_path):
    lb_mqtt = cluster.proxy.frontends["mqtt"]
    # -- a command reaches a device on another gateway; a device connected twice keeps the newest session
    first = Device(lb_mqtt, "field-meter", subscribe_timeout=20)
    node = until(lambda: holder(cluster, "field-meter"), what="field-meter in the cluster's directory")
    second = Device(lb_mqtt, "field-meter", subscribe_timeout=20)              # leastconn: another gateway
    try:
        assert first.disconnected.wait(20), "the older session was not closed"
        newest = until(lambda: (n := holder(cluster, "field-meter")) != node and n, what="the newest session's node")
        other = next(name for name in cluster.gateways if name != newest)
        status, answer = request(cluster.gateways[other].http, "POST", "/v1/devices/field-meter/commands",
                                 {"type": "reboot"})
        assert status == 202, answer
        until(lambda: second.commands, what="the command at the device")
        assert first.commands == []
    finally:
        first.close()
        second.close()

    # -- 1,000 devices through HAProxy; a gateway and a NATS node die mid-stream
    out_json = tmp_path / "loadgen.json"
    loadgen = subprocess.Popen(
        [str(BIN.parent / "gridgate-loadgen"), "mqtt", "--target", "{}:{}".format(*lb_mqtt), "--devices", str(DEVICES),
         "--procs", "2", "--qos", "1", "--rate", str(RATE), "--inflight", "1", "--duration", str(LOAD_S),
         "--connect-rate", "500", "--reconnect", "--backoff-min", "0.1", "--backoff-max", "1",
         "--client-prefix", "fleet", "--json", str(out_json)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        gw2 = cluster.gateways["gw2"]
        until(lambda: gw2.metric('gridgate_connections{protocol="mqtt"}') >= 200, timeout=30,
              what="gw2 holding devices")
        time.sleep(2)                        # readings flowing through all three
        ports = dict(gw2.addresses)
        gw2.kill()                           # SIGKILL: its devices reconnect to gw1 and gw3
        time.sleep(4)
        killed_nats = busiest_follower(cluster)
        cluster.nats.kill(killed_nats)
        _, err = loadgen.communicate(timeout=LOAD_S * 3 + 60)
    finally:
        if loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
    assert loadgen.returncode == 0, err[-3000:]
    result = json.loads(out_json.read_text())
    assert result["acked"] > DEVICES, result
    assert result["reconnects"] > 0, result             # gw2's devices came back through HAProxy
    # -- gw2 back on its own data dir: what it acked and had not forwarded replays from its spool
    cluster.gateways["gw2"] = start_gateway(tmp_path, "gw2", cluster.nats.urls, ports)
    for name, gw in cluster.gateways.items():
        until(lambda gw=gw: gw.metric("gridgate_pending_records") == 0, timeout=90, what=f"{name} drained")
    for name, gw in cluster.gateways.items():
        assert gw.stop() == 0, gw.log()[-3000:]
        assert spool_stats(gw.data_dir)["pending"] == 0, name
    live = [n.url for n in cluster.nats.nodes if n.running()]
    messages = stream_messages(live)
    readings = {(r.device_id, r.ts_ns) for _, _, r in messages if r.device_id.startswith("fleet-")}
    print(f"fleet: acked {result['acked']}, sent {result['sent']}, reconnects {result['reconnects']}, "
          f"errors {result['errors']}; NATS node {killed_nats} killed; "
          f"JetStream: {len(readings)} readings of the fleet")
    assert len(readings) >= result["acked"], (len(readings), result)
