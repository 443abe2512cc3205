"""sslscan (a TLS scanner) against the gateway's TLS ports: only TLS 1.2 and
1.3, only forward-secret AEAD suites, no insecure renegotiation, no
compression; the gateway counts the scanner's refused probes and serves on.

OpenSSL 3 builds without zlib cannot test compression at all (sslscan says
so); the context's OP_NO_COMPRESSION is checked in test_tls_context."""
from __future__ import annotations

import re
import socket
import ssl
import subprocess

import pytest

from binaries import require
from gatewayproc import GatewayProcess
from security.pki import CA

# Every suite the gateway may accept: TLS 1.3's AEAD suites and Mozilla
# "intermediate"'s ECDHE ones for TLS 1.2.
ALLOWED_SUITE = re.compile(r"TLS_AES_(128|256)_GCM_SHA(256|384)|TLS_CHACHA20_POLY1305_SHA256"
                           r"|ECDHE-(ECDSA|RSA)-(AES128-GCM-SHA256|AES256-GCM-SHA384|CHACHA20-POLY1305)")
WEAK = re.compile(r"CBC|RC4|DES|NULL|EXP|MD5|anon|PSK|SRP|SHA(?!256|384)", re.IGNORECASE)


def scan(sslscan: str, address: tuple[str, int]) -> dict:
    host, port = address
    out = subprocess.run([sslscan, "--no-colour", f"{host}:{port}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    protocols = dict(re.findall(r"^(SSLv[23]|TLSv1\.[0-3])\s+(enabled|disabled)$", text, re.MULTILINE))
    suites = re.findall(r"^(?:Preferred|Accepted)\s+(\S+)\s+\d+ bits\s+(\S+)", text, re.MULTILINE)
    renegotiation = re.search(r"TLS renegotiation:\n(.*)\n", text)
    compression = re.search(r"TLS Compression:\n(.*)\n", text)
    assert renegotiation and compression, text
    return {"protocols": protocols, "suites": suites, "renegotiation": renegotiation.group(1).strip(),
            "compression": compression.group(1).strip(), "text": text}


def tls_gateway(tmp_path, kind: str, min_version: str = "1.2") -> GatewayProcess:
    ca = CA("ecdsa")
    ca.write(tmp_path, "ca")
    cert, key = ca.server(kind).write(tmp_path, "server")
    config = tmp_path / "gridgate.toml"
    config.write_text(f'[mqtt]\ntls_listen = "127.0.0.1:0"\n[http]\ntls_listen = "127.0.0.1:0"\n'
                      f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nmin_version = "{min_version}"\n')
    return GatewayProcess(tmp_path / "data", "--config", str(config))


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_sslscan_finds_only_tls12_and_13_with_strong_suites(tmp_path, kind):
    sslscan = require("sslscan")
    gw = tls_gateway(tmp_path, kind)
    try:
        for listener in ("mqtts", "https"):
            result = scan(sslscan, getattr(gw, listener))
            assert result["protocols"] == {"SSLv2": "disabled", "SSLv3": "disabled", "TLSv1.0": "disabled",
                                           "TLSv1.1": "disabled", "TLSv1.2": "enabled", "TLSv1.3": "enabled"}, \
                result["text"]
            versions = {version for version, _ in result["suites"]}
            assert versions == {"TLSv1.2", "TLSv1.3"}, result["text"]
            names = [name for _, name in result["suites"]]
            assert all(ALLOWED_SUITE.fullmatch(name) and not WEAK.search(name) for name in names), names
            tls12 = {name for version, name in result["suites"] if version == "TLSv1.2"}
            auth = "ECDSA" if kind == "ecdsa" else "RSA"
            assert tls12 == {f"ECDHE-{auth}-AES128-GCM-SHA256", f"ECDHE-{auth}-AES256-GCM-SHA384",
                             f"ECDHE-{auth}-CHACHA20-POLY1305"}, result["text"]
            # neither secure nor insecure renegotiation: OP_NO_RENEGOTIATION
            assert result["renegotiation"] == "Session renegotiation not supported", result["text"]
            assert result["compression"] in ("Compression disabled", "OpenSSL version does not support compression")
        # the scanner's refused probes are counted, and a device is still served
        assert gw.metric('gridgate_tls_handshake_failures_total{listener="mqtts",reason="protocol_version"}') >= 1
        assert gw.metric('gridgate_tls_handshake_failures_total{listener="mqtts",reason="no_shared_cipher"}') >= 1
        # what a scanner probes has a reason of its own, none is left to "other"
        assert gw.metric('gridgate_tls_handshake_failures_total{listener="mqtts",reason="other"}') == 0
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with socket.create_connection(gw.https, timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        assert gw.stop() == 0, gw.log()


def test_sslscan_with_min_version_13_finds_tls13_alone(tmp_path):
    sslscan = require("sslscan")
    gw = tls_gateway(tmp_path, "ecdsa", min_version="1.3")
    try:
        result = scan(sslscan, gw.mqtts)
        assert result["protocols"]["TLSv1.2"] == "disabled" and result["protocols"]["TLSv1.3"] == "enabled"
        assert {version for version, _ in result["suites"]} == {"TLSv1.3"}, result["text"]
    finally:
        assert gw.stop() == 0, gw.log()
