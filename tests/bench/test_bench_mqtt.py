"""``python -m bench mqtt`` at a small scale: gridgate and mosquitto, MQTT
3.1.1 at QoS 0 and 1 and MQTT 5.0 at QoS 1, one 1 s round each. Checks
what the report is made of: every run measured, every acked reading in
gridgate's spool, the MQTT 5 / 3.1.1 ratios and the report's rows."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # bench/ is not an installed package

from bench import mqtt, report  # noqa: E402
from binaries import require  # noqa: E402


def test_a_small_mqtt_run_measures_3_1_1_and_5_side_by_side(tmp_path):
    require("mosquitto")
    lines: list[str] = []
    res = mqtt.run(1.0, 1, tmp_path, False, log=lines.append)
    runs = res["runs"]
    assert sorted((r["contender"], r["qos"], r["mqtt_version"]) for r in runs) == sorted(
        (name, qos, version) for qos, version in mqtt.RUNS for name in ("gridgate", "mosquitto"))
    for r in runs:
        assert r["errors"] == 0 and r["readings_per_s"] > 0, r
        if r["contender"] == "gridgate":
            assert r["spool_matches"], r
    s = res["summary"]
    assert set(s) == {"qos0", "qos1", "qos1_mqtt5"}
    assert s["qos1_mqtt5"]["gridgate_mqtt5_vs_mqtt311"] > 0 and s["qos1_mqtt5"]["gridgate_vs_mosquitto"] > 0
    assert any("QoS 1 MQTT 5 gridgate" in line for line in lines)
    md = "\n".join(report.mqtt_tables(res))
    assert "| 1 (MQTT 5) | gridgate |" in md and "MQTT 5 / MQTT 3.1.1 QoS 1 readings/s through gridgate" in md
    targets = "\n".join(report._targets({"mqtt": res}))
    assert "MQTT 5 QoS 1 >= 0.95x MQTT 3.1.1 QoS 1 through gridgate" in targets
