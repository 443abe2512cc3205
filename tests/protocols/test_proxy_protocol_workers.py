"""PROXY protocol under ``gridgate serve --workers 2``: every worker reads
the headers of the connections the kernel hands it, with the same
trusted_proxies (one config file for all)."""
from __future__ import annotations

import http.client
import socket

from gatewayproc import spool_stats
from mqtt_frames import gen_connack, gen_connect, gen_puback, gen_publish
from proxy_headers import v2
from test_cluster import Cluster


def exchange(addr: tuple[str, int], data: bytes, want: int, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(addr, timeout=20, source_address=(source, 0)) as sock:
        sock.sendall(data)
        got = b""
        while len(got) < want:
            try:
                chunk = sock.recv(want - len(got))
            except ConnectionResetError:      # closed with our bytes unread
                break
            if not chunk:
                break
            got += chunk
        return got


def test_every_worker_reads_the_header(tmp_path):
    config = tmp_path / "gridgate.toml"
    config.write_text('[service]\ntrusted_proxies = ["127.0.0.1/32"]\n[mqtt]\nproxy_protocol = "v2"\n')
    cluster = Cluster(tmp_path / "data", "2", "--config", str(config))
    try:
        addr = cluster.addresses["mqtt"]
        for i in range(20):
            reading = b'{"device_id": "meter-%02d", "battery_mv": 3000}' % i
            sent = v2(f"192.0.2.{i + 1}", "10.0.0.1", 40000 + i, 1883) + gen_connect(f"meter-{i:02d}") \
                + gen_publish("telemetry", 1, reading, mid=1)
            assert exchange(addr, sent, 8) == gen_connack(0) + gen_puback(1)
        # not from the trusted proxy: closed without a CONNACK by whichever worker took it
        assert exchange(addr, v2("192.0.2.99", "10.0.0.1", 1, 1883) + gen_connect("meter-99"), 4,
                        source="127.0.0.2") == b""
        # /metrics on either worker: the sum of both
        conn = http.client.HTTPConnection(*cluster.addresses["http"], timeout=20)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.close()
        assert 'gridgate_proxy_protocol_refused_total{listener="mqtt",reason="untrusted_source"} 1.0' in metrics
        assert cluster.stop() == 0
        stats = spool_stats(cluster.data_dir)
        assert stats["records"] == 20
        # 20 connections spread by the kernel's hash: both workers wrote some (2**-19 chance otherwise)
        assert all(stats["shards"][w]["records"] > 0 for w in ("worker-0", "worker-1"))
    finally:
        cluster.kill()
