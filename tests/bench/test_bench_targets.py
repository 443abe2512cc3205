"""The targets table of ``python -m bench all``: each target judged from the
run's own ratios, the load generator's CPU beside it, and for a short target
the top function of the profile taken under that load."""
from __future__ import annotations

import json
from pathlib import Path

from bench import targets


def _speedscope(path: Path, stacks: list[list[str]]) -> Path:
    """A py-spy speedscope file: one sample per stack (root first)."""
    names = sorted({n for s in stacks for n in s})
    index = {n: i for i, n in enumerate(names)}
    doc = {"shared": {"frames": [{"name": n, "file": f"/src/gridgate/{n}.py"} for n in names]},
           "profiles": [{"type": "sampled", "samples": [[index[n] for n in s] for s in stacks],
                         "weights": [0.005] * len(stacks)}]}
    path.write_text(json.dumps(doc))
    return path


def _mqtt_scenario(q1_by_round: float, q1_medians: float, profile: Path | None) -> dict:
    def per(ratio_rounds: float, ratio_medians: float) -> dict:
        return {"gridgate": {"readings_per_s": 60_000.0, "server_cpu_us_per_reading": 9.0,
                             "loadgen_cpu_us_per_reading": 4.2},
                "mosquitto": {"readings_per_s": 40_000.0, "server_cpu_us_per_reading": 9.5},
                "gridgate_vs_mosquitto": ratio_medians, "gridgate_vs_mosquitto_by_round_median": ratio_rounds}
    runs = [{"contender": "gridgate", "qos": 1, "mqtt_version": 4, "readings_per_s": 1.0, "profiled": True,
             "profile": {"speedscope_json": str(profile)}}] if profile else []
    return {"scenario": "mqtt", "skipped": {}, "runs": runs,
            "summary": {"qos1": per(q1_by_round, q1_medians), "qos0": per(1.1, 1.05)}}


def test_a_short_target_names_the_profiles_top_function(tmp_path: Path) -> None:
    prof = _speedscope(tmp_path / "p.speedscope.json",
                       [["run", "_handle", "validate"]] * 6 + [["run", "_write"]] * 3 + [["run"]])
    found = targets.rows({"mqtt": _mqtt_scenario(1.41, 1.57, prof)})
    qos1 = next(r for r in found if r.target.startswith("MQTT QoS 1"))
    # judged on the median of the per-round ratios, not the ratio of medians
    assert qos1.ok is False
    assert "1.41x" in qos1.measured and "ratio of medians 1.57x" in qos1.measured
    assert qos1.bottleneck.startswith("`validate (gridgate/validate.py)` 60% own")
    assert qos1.loadgen == "4.2 µs"
    qos0 = next(r for r in found if r.target.startswith("MQTT QoS 0"))
    assert qos0.ok is True and qos0.bottleneck == "-"
    loadgen = next(r for r in found if r.target.startswith("gridgate-loadgen mqtt"))
    assert loadgen.ok is True


def test_a_short_target_without_a_profile_says_how_to_get_one() -> None:
    found = targets.rows({"mqtt": _mqtt_scenario(1.2, 1.3, None)})
    qos1 = next(r for r in found if r.target.startswith("MQTT QoS 1"))
    assert qos1.ok is False and "--profile" in qos1.bottleneck


def test_a_met_target_and_the_markdown_table() -> None:
    md = "\n".join(targets.table({"mqtt": _mqtt_scenario(1.6, 1.7, None)}))
    assert "| #24 | MQTT QoS 1 (acks after durable) >= 1.5x mosquitto, aim 2x | 1.60x" in md
    assert "| met |" in md and "0 short" in md


def test_memory_targets_are_measured_above_the_floor() -> None:
    pipelines = {"runs": [], "summary": {"wrk-1000": {
        "fast": {"rss_per_conn_kb": 10.0}, "std": {"rss_per_conn_kb": 16.0}, "floor": {"rss_per_conn_kb": 6.0}}}}
    row = targets.rows({"pipelines": pipelines})[0]
    # (10 - 6) / (16 - 6) = 0.4
    assert row.ok is True and row.measured.startswith("0.40x")
    conns = {"levels": [1000, 15000], "target_kib": 4.0, "summary": {"gridgate_at_top_kib": 4.5}}
    row = targets.rows({"conns": conns})[0]
    assert row.ok is False and "15,000" in row.target


def test_mosquitto_missing_is_not_judged() -> None:
    found = targets.rows({"mqtt": {"skipped": {"mosquitto": "not installed"}, "summary": {}, "runs": []}})
    assert [r.ok for r in found] == [None]


def test_a_short_target_without_its_own_load_profiled_says_which_load_was(tmp_path: Path) -> None:
    prof = _speedscope(tmp_path / "p.speedscope.json", [["serve", "_telemetry"]] * 3 + [["serve"]])
    pipelines = {"runs": [{"driver": "loadgen", "contender": "fast", "profiled": True,
                           "profile": {"speedscope_json": str(prof)}}],
                 "summary": {"wrk-64": {"fast": {"readings_per_s": 10.0, "cpu_us_per_reading": 50.0},
                                        "reference": {"readings_per_s": 9.0, "cpu_us_per_reading": 60.0},
                                        "fast_vs_reference": 10 / 9}}}
    row = targets.rows({"pipelines": pipelines})[0]
    assert row.ok is False and row.measured == "1.11x; server CPU 50 vs 60 µs/reading (1.20x per CPU-µs)"
    assert row.bottleneck.endswith("(profiled under loadgen fast)")
    assert row.bottleneck.startswith("`_telemetry (gridgate/_telemetry.py)` 75% own")


def test_the_ws_loadgen_is_judged_once_connected_else_on_the_whole_run() -> None:
    def ws(**loadgen: float) -> dict:
        return {"devices": 20, "inflight": 10, "ratios": {"ws_vs_mqtt": 1.5},
                "per_protocol": {"ws": {"server_cpu_us_per_reading": 15.0, **loadgen}}}

    def row(scen: dict):
        return next(r for r in targets.rows({"ws": scen}) if r.target.startswith("gridgate-loadgen ws"))

    # the connects push the whole run's figure over the budget; the steady one is judged
    steady = row(ws(loadgen_cpu_us_per_reading=5.6, loadgen_cpu_us_per_reading_steady=4.8))
    assert steady.ok is True and steady.measured == "4.8 µs" and "(20 x 10, connected)" in steady.target
    server = next(r for r in targets.rows({"ws": ws(loadgen_cpu_us_per_reading=5.6,
                                                    loadgen_cpu_us_per_reading_steady=4.8)})
                  if r.target.startswith("/v1/ws"))
    assert server.ok is True and server.loadgen == "4.8 µs"
    whole = row(ws(loadgen_cpu_us_per_reading=5.6))
    assert whole.ok is False and whole.measured == "5.6 µs" and "(20 x 10, whole run)" in whole.target
    assert "loadgen/ws_device.py" in whole.bottleneck


def _sinks_scenario(floor: float) -> dict:
    return {"scenario": "sinks", "runs": [], "summary": {
        "spool": {"readings_per_s": 100_000.0, "server_cpu_us_per_reading": 5.6},
        "nats": {"readings_per_s": 35_000.0, "server_cpu_us_per_reading": 11.0,
                 "sink_server_cpu_us_per_reading": 10.3, "nats_server_floor_us_per_message": floor}}}


def test_a_short_jetstream_target_names_nats_server_when_it_costs_more_than_the_spool_path() -> None:
    [row] = [r for r in targets.rows({"sinks": _sinks_scenario(9.3)}) if r.target.startswith("JetStream")]
    assert row.ok is False
    assert row.measured == ("0.35x; gateway CPU 11.0 µs/reading, nats-server 10.3 (its floor, from a raw "
                            "publisher: 9.3); the spool path's gateway CPU 5.6")
    assert row.bottleneck.startswith("nats-server's own CPU per stored message (9.3 µs) is more than the "
                                     "spool path's whole gateway CPU (5.6)")
    # a nats-server cheaper than the spool path: the gateway's profile is what is named
    [row] = [r for r in targets.rows({"sinks": _sinks_scenario(2.0)}) if r.target.startswith("JetStream")]
    assert row.ok is False and not row.bottleneck.startswith("nats-server")


def _jetstream_row(scen: dict) -> targets.Row:
    [row] = [r for r in targets.rows({"sinks": scen}) if r.target.startswith("JetStream")]
    return row


def test_a_jetstream_target_above_this_machines_ceiling_says_so() -> None:
    """nats-server's floor plus the load generator fill the cores below 0.8x the spool: no gateway meets it here."""
    scen = _sinks_scenario(7.2)
    scen["summary"]["nats"] |= {"loadgen_cpu_us_per_reading": 3.8, "machine_cores": 2,
                                "machine_ceiling_readings_per_s": 181_818, "machine_ceiling_ratio_to_spool": 0.7}
    row = _jetstream_row(scen)
    assert row.ok is False and row.loadgen == "3.8 µs"
    assert row.measured.endswith("; this machine's ceiling 0.70x")
    assert row.bottleneck.startswith("this machine: nats-server at its floor (7.2 µs per message) and the load "
                                     "generator (3.8 µs per reading) alone fill its 2 cores at 181,818 readings/s, "
                                     "0.70x the spool, with a gateway that cost nothing; in gridgate: ")
    # a ceiling above the target: the machine is not what is named
    scen["summary"]["nats"]["machine_ceiling_ratio_to_spool"] = 1.4
    row = _jetstream_row(scen)
    assert row.ok is False and not row.bottleneck.startswith("this machine")


def test_a_jetstream_target_a_free_publisher_could_not_meet_names_the_machine() -> None:
    """Above the zero-gateway ceiling, but under it once the gateway's other threads count: the publisher is not it."""
    scen = _sinks_scenario(6.9)
    scen["summary"]["nats"] |= {"loadgen_cpu_us_per_reading": 2.5, "machine_cores": 2,
                                "machine_ceiling_readings_per_s": 212_766, "machine_ceiling_ratio_to_spool": 0.8,
                                "publisher_free_ceiling_readings_per_s": 146_000,
                                "publisher_free_ceiling_ratio_to_spool": 0.55}
    row = _jetstream_row(scen)
    assert row.ok is False
    assert row.measured.endswith("; this machine's ceiling 0.80x (0.55x with a publisher that cost nothing)")
    assert row.bottleneck.startswith("this machine: with a JetStream publisher that cost nothing, nats-server at "
                                     "its floor, the load generator and the gateway's other threads fill its 2 "
                                     "cores at 146,000 readings/s, 0.55x the spool; in gridgate: ")
    # both ceilings above the target: the gateway's profile, not the machine
    scen["summary"]["nats"]["publisher_free_ceiling_ratio_to_spool"] = 0.9
    row = _jetstream_row(scen)
    assert not row.bottleneck.startswith("this machine")
