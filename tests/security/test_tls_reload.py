"""SIGHUP and TLS: a revoked device certificate's connection is closed and
refused from then on, the other devices stay connected; a CRL that does not
load keeps the running set (real gateway, paho and mosquitto_pub over mqtts)."""
from __future__ import annotations

import signal
import ssl
import threading

import paho.mqtt.client as paho

from binaries import require
from security.pki import CA, Leaf
from security.test_tls_listeners import TLSGateway, mqtts_publish


class Device:
    """A paho client over mqtts with its own certificate, kept connected."""

    def __init__(self, gw: TLSGateway, name: str, leaf: Leaf) -> None:
        cert, key = leaf.write(gw.dir, name)
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.acked = threading.Semaphore(0)
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=name)
        self.client.tls_set(ca_certs=gw.ca_file, certfile=cert, keyfile=key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.on_publish = lambda *a: self.acked.release()
        self.client.connect("localhost", gw.proc.mqtts[1], keepalive=60)
        self.client.loop_start()
        assert self.connected.wait(20)
        self.name = name

    def publish_acked(self) -> bool:
        self.client.publish(f"devices/{self.name}/telemetry", '{"temperature": 20}', qos=1)
        return self.acked.acquire(timeout=20)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_sighup_with_a_new_crl_closes_the_revoked_device_and_keeps_the_others(tmp_path):
    mosquitto_pub = require("mosquitto_pub")
    ca = CA("ecdsa")
    gw = TLSGateway(tmp_path, client_certs=True, revoked=[], ca=ca)
    leaf_a, leaf_b = ca.issue(cn="meter-a"), ca.issue(cn="meter-b")
    a, b = Device(gw, "meter-a", leaf_a), Device(gw, "meter-b", leaf_b)
    try:
        assert a.publish_acked() and b.publish_acked()
        (tmp_path / "crl.pem").write_bytes(ca.crl([leaf_a]))
        gw.proc.proc.send_signal(signal.SIGHUP)
        gw.proc.wait_for_line("SIGHUP: TLS reloaded; 1 connections whose certificate is no longer accepted closed")
        assert a.disconnected.wait(20)
        assert not b.disconnected.is_set() and b.publish_acked()
        # meter-a is refused at the handshake from now on (mosquitto_pub over the files it used)
        refused = mqtts_publish(mosquitto_pub, gw, "meter-a", "--cert", str(tmp_path / "meter-a.crt"),
                                "--key", str(tmp_path / "meter-a.key"))
        assert refused.returncode != 0
        # a CRL that does not load: the old set stays, meter-b goes on, meter-a stays out
        (tmp_path / "crl.pem").write_text("not a CRL\n")
        gw.proc.proc.send_signal(signal.SIGHUP)
        gw.proc.wait_for_line("SIGHUP: TLS not reloaded, the old certificates and CRL stay")
        assert b.publish_acked()
        assert mqtts_publish(mosquitto_pub, gw, "meter-a", "--cert", str(tmp_path / "meter-a.crt"),
                             "--key", str(tmp_path / "meter-a.key")).returncode != 0
        assert mqtts_publish(mosquitto_pub, gw, "meter-b", "--cert", str(tmp_path / "meter-b.crt"),
                             "--key", str(tmp_path / "meter-b.key")).returncode == 0
    finally:
        a.stop()
        b.stop()
    records = gw.stop_and_export()
    assert sorted(r["device_id"] for r in records) == ["meter-a", "meter-b", "meter-b", "meter-b", "meter-b"]
