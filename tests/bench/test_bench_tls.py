"""``python -m bench tls`` at a small scale: real gridgate and mosquitto TLS
listeners on loopback with the run's ECDSA certificate, 1 s timed runs, 200
idle TLS connections, 4 devices. Each number must have been measured (no
errors, handshakes done, RSS grown, every contender and transport in the
table); the targets' values are not asserted here (a shared machine)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # bench/ is not an installed package

from bench import procs, report, tls  # noqa: E402
from bench.__main__ import SCENARIOS  # noqa: E402

IDLE = 200
DEVICES = 4


def test_tls_is_a_registered_scenario():
    assert "tls" in SCENARIOS
    assert procs.missing_bench_dependencies(["tls"], False) == []


def test_the_certificate_is_ecdsa_p256_for_loopback(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    files = tls.make_pki(tmp_path)
    cert = x509.load_pem_x509_certificate(Path(files["cert"]).read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)


@pytest.mark.skipif(procs.mosquitto_path() is None, reason="mosquitto is not installed")
def test_a_small_tls_run_measures_both_servers(tmp_path):
    lines: list[str] = []
    res = tls.run(1, 1, tmp_path, False, log=lines.append, idle_connections=IDLE, devices=DEVICES)
    assert res["skipped"] == {}
    for h in res["handshakes"]:
        assert h["errors"] == 0 and h["handshakes"] > 0, h
        assert h["server_cpu_us_per_handshake"] > 0
    assert {h["contender"] for h in res["handshakes"]} == {"gridgate", "mosquitto"}
    for i in res["idle"]:
        assert "error" not in i, i
        assert i["server_count_after_settle"] == IDLE and i["rss_kb"] > i["rss0_kb"], i
    assert len(res["qos1"]) == 8        # 2 contenders x 2 transports x 2 windows
    for q in res["qos1"]:
        assert q["errors"] == 0 and q["acked"] == q["sent"] > 0, q
    s = res["summary"]
    assert s["handshake_cpu_vs_mosquitto"] > 0 and s["qos1_tls_x10_vs_mosquitto"] > 0
    assert set(s["targets"]) == {"qos1_tls_x10", "handshake_cpu", "idle_kib"}
    assert all(v is not None for v in s["targets"].values())
    assert len(lines) == 2 + 2 + 8
    written = report.write({"machine": "test", "command": "python -m bench tls", "started": "now",
                            "scenarios": {"tls": res}}, tmp_path)
    assert "## tls: mqtts, gridgate vs mosquitto" in written
    assert "| KiB per idle TLS connection |" in written
    assert written.count("QoS 1 readings/s, 4 x") == 4 and "| - |" not in written.split("## tls")[1]
