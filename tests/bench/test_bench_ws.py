"""``python -m bench ws`` at a small scale: one gateway, 1 s each of
gridgate-loadgen mqtt, http and ws and of MQTT over /mqtt. Checks what the table is made of: every
protocol acked readings without errors, the gateway's CPU per reading and
the ratios to MQTT computed, the loadgen's own CPU reported (ws's once connected)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # bench/ is not an installed package

from bench import ws  # noqa: E402
from bench.__main__ import SCENARIOS  # noqa: E402


def test_ws_scenario_measures_every_protocol_against_one_gateway(tmp_path, monkeypatch):
    assert "ws" in SCENARIOS
    monkeypatch.setattr(ws, "DEVICES", 4)
    lines: list[str] = []
    res = ws.run(1.0, 1, tmp_path, False, log=lines.append)
    assert [r["protocol"] for r in res["runs"]] == list(ws.PROTOCOLS) and len(lines) == len(ws.PROTOCOLS)
    for r in res["runs"]:
        assert r["acked"] > 0 and r["errors"] == 0, r
        assert r["server_cpu_us_per_reading"] > 0 and r["loadgen_cpu_us_per_reading"] > 0, r
    # the ws budget is judged on the loadgen's CPU once every device has connected (as mqtt's)
    assert res["per_protocol"]["ws"]["loadgen_cpu_us_per_reading_steady"] > 0
    assert all(res["ratios"][f"{p}_vs_mqtt"] > 0 for p in ("http", "ws", "mqtt-ws"))
    assert res["target_met"] == (res["ratios"]["ws_vs_mqtt"] <= ws.TARGET_WS_VS_MQTT)
    table = "\n".join(ws.table(res))
    assert "(connected) |" in table.split("| ws |")[1].splitlines()[0]
    assert "| ws |" in table and "| mqtt-ws |" in table and "| mqtt |" in table and "1.00x" in table
