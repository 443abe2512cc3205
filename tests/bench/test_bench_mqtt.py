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

from bench import mqtt, report, targets  # noqa: E402
from binaries import require  # noqa: E402


def test_a_small_mqtt_run_measures_3_1_1_and_5_side_by_side(tmp_path):
    require("mosquitto")
    lines: list[str] = []
    res = mqtt.run(1.0, 1, tmp_path, False, log=lines.append)
    runs = res["runs"]
    assert sorted((r["contender"], r["qos"], r["mqtt_version"], r["shape"]) for r in runs) == sorted(
        [(name, qos, version, "window") for qos, version in mqtt.RUNS for name in ("gridgate", "mosquitto")]
        + [(name, qos, version, "fleet") for qos, version in mqtt.FLEET_RUNS for name in ("gridgate", "mosquitto")])
    for r in runs:
        assert r["errors"] == 0 and r["readings_per_s"] > 0, r
        # both CPUs measured for every run: the server's tree from /proc, the loadgen's own
        assert r["server_cpu_us"] > 0 and r["loadgen_cpu_us"] > 0, r
        assert (r["devices"], r["inflight"]) == mqtt.SHAPES[r["shape"]]
        if r["contender"] == "gridgate":
            assert r["spool_matches"], r
    s = res["summary"]
    assert set(s) == {"qos0", "qos1", "qos1_mqtt5", "fleet_qos1"}
    fleet = s["fleet_qos1"]
    assert fleet["gridgate"]["server_cpu_us_per_reading"] > 0 and fleet["mosquitto"]["loadgen_cpu_us_per_reading"] > 0
    # one round: the median of the per-round ratios is that round's, the ratio of the medians too
    assert fleet["gridgate_vs_mosquitto_rounds"] == [fleet["gridgate_vs_mosquitto"]]
    assert fleet["gridgate_vs_mosquitto_by_round_median"] == fleet["gridgate_vs_mosquitto"]
    assert any("QoS 1 1000x1 gridgate" in line for line in lines)
    assert s["qos1_mqtt5"]["gridgate_mqtt5_vs_mqtt311"] > 0 and s["qos1_mqtt5"]["gridgate_vs_mosquitto"] > 0
    assert any("QoS 1 MQTT 5 gridgate" in line for line in lines)
    md = "\n".join(report.mqtt_tables(res))
    assert "| 1 (fleet) | gridgate |" in md and "| 1 (fleet) | gridgate / mosquitto |" in md
    assert "| 1 (MQTT 5) | gridgate |" in md and "MQTT 5 / MQTT 3.1.1 QoS 1 readings/s through gridgate" in md
    judged = "\n".join(targets.table({"mqtt": res}))
    assert "MQTT 5 QoS 1 >= 0.95x MQTT 3.1.1 QoS 1 through gridgate" in judged
    assert "MQTT fleet shape (1,000 devices x 1 in flight, QoS 1)" in judged
