"""``python -m bench storm`` at a small scale: 200 MQTT devices (two loadgen
processes) against a real gridgate on loopback, restarted with SIGTERM on
the same ports and data dir, with accept_rate_per_s off and on. Every
device must be back, the probes measured at rest and in the storm, and
every acknowledged reading in the spool. Bounded: the fleet's own
--duration, and every wait in the scenario has a bound."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # bench/ is not an installed package

from bench import report, storm  # noqa: E402
from bench.__main__ import SCENARIOS  # noqa: E402

DEVICES = 200


def test_storm_is_a_registered_scenario():
    assert "storm" in SCENARIOS


def test_a_small_storm_reconnects_everyone_and_loses_nothing(tmp_path):
    lines: list[str] = []
    res = storm.run(0, 1, tmp_path, False, log=lines.append, devices=DEVICES, settings=(0.0, 400.0),
                    storm_s=15, baseline_s=1)
    runs = res["runs"]
    assert [r["accept_rate_per_s"] for r in runs] == [0.0, 400.0]
    for r in runs:
        assert "error" not in r, r
        # every device and probe is connected to the restarted gateway
        assert r["reconnect_s"] is not None and r["reconnect_s"] >= r["restart_gap_s"] > 0
        assert r["connected_at_end_of_storm"] == DEVICES + storm.PROBE_DEVICES
        fleet = r["fleet"]
        # each device connected to the first gateway, dropped once, came back once
        assert (fleet["connects"], fleet["reconnects"], fleet["peak_connected"]) == (2 * DEVICES, DEVICES, DEVICES)
        assert fleet["errors"] >= DEVICES and fleet["dropped"] == 0
        assert fleet["acked"] == fleet["sent"] - fleet["unacked_at_drop"] > 0
        # the probes were measured, at rest and in the storm
        for key in ("rest_http", "rest_mqtt", "storm_http", "storm_mqtt"):
            assert r[key]["samples"] > 0 and 0 < r[key]["p99"] <= r[key]["max"], (key, r[key])
        assert r["peak_rss_kb"] > 0 and r["accept_errors"] >= 0
        assert r["acked_total"] >= fleet["acked"] + r["storm_mqtt"]["samples"]
        assert r["nothing_lost"] and r["spool_records"] >= r["acked_total"]
    assert len(lines) == 2 and "accept_rate_per_s off" in lines[0] and "accept_rate_per_s=400" in lines[1]
    md = "\n".join(report.storm_table(res))
    assert "| | accept_rate_per_s off | accept_rate_per_s = 400 |" in md
    assert md.count(": yes |") == 2 and "**NO**" not in md
    # and through report.write, as python -m bench writes it
    written = report.write({"machine": "test", "command": "python -m bench storm", "started": "now",
                            "scenarios": {"storm": res}}, tmp_path)
    assert "## storm: the fleet reconnects after a gateway restart" in written
