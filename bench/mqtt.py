"""mqtt: gridgate vs mosquitto on the same load generator, QoS 0 and QoS 1.

Each round starts a fresh server, drives it with ``gridgate-loadgen mqtt
--devices 100 --inflight 10 --procs 2`` (closed loop: each device keeps 10
readings unacknowledged), reads its peak RSS and stops it: MQTT 3.1.1 at
QoS 0 and 1, and MQTT 5.0 at QoS 1 (``--mqtt-version 5``; mosquitto serves
5.0 as well). Rounds alternate
(gridgate, mosquitto, gridgate, mosquitto, ...) so drift of a shared machine
hits both alike.

The fleet shape runs beside them: 1,000 devices x 1 in flight at QoS 1
(real meters send one reading and wait for its ack), the figure that sizes
a deployment. Every run reports the server's CPU per reading (user + system
of its process tree, from /proc, over the load generator's run) and the load
generator's own (its ``loadgen_cpu_us_per_reading``), so a run in which the
load generator was the bottleneck shows as one. gridgate / mosquitto is
given as the ratio of the medians and as the median of the per-round ratios.

The two do different work and the report says so: gridgate validates and
normalizes every reading and sends a QoS 1 PUBACK only after the reading is
committed to its SQLite spool; mosquitto (no persistence, no subscriber)
acknowledges on receipt and drops the message. At QoS 0 nothing is
acknowledged, so readings/s is what the load generator wrote; gridgate's
spool count says how many of those were actually stored.

mosquitto not installed: that contender is skipped and the results say so.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench import procs

DEVICES = 100
INFLIGHT = 10
LOADGEN_PROCS = 2
QOS_LEVELS = (0, 1)
FLEET_DEVICES = 1000
FLEET_INFLIGHT = 1
# (QoS, MQTT protocol level) of each measured run: 3.1.1 at both QoS, MQTT 5.0 at QoS 1
# (issue 21: 5.0 must keep 3.1.1's pace through gridgate, and beat mosquitto's 5.0)
RUNS = ((0, 4), (1, 4), (1, 5))
# the shapes: "window" is DEVICES x INFLIGHT (every run of RUNS), "fleet" is
# FLEET_DEVICES x FLEET_INFLIGHT, at QoS 1 over MQTT 3.1.1 (issue 24)
FLEET_RUNS = ((1, 4),)
SHAPES = {"window": (DEVICES, INFLIGHT), "fleet": (FLEET_DEVICES, FLEET_INFLIGHT)}
CONTENDERS = ("gridgate", "mosquitto")
# (QoS, MQTT version, shape) of the --profile runs: the loads of issue 24's MQTT targets
PROFILED = ((1, 4, "window"), (0, 4, "window"), (1, 5, "window"), (1, 4, "fleet"))


def run(duration: float, rounds: int, out: Path, profile: bool, log=print) -> dict:
    contenders, skipped = procs.gridgate_and_mosquitto(log)
    results: dict = {"scenario": "mqtt", "duration_s": duration, "rounds": rounds, "devices": DEVICES,
                     "inflight": INFLIGHT, "loadgen_procs": LOADGEN_PROCS, "skipped": skipped,
                     "fleet": {"devices": FLEET_DEVICES, "inflight": FLEET_INFLIGHT},
                     "versions": {"mosquitto": procs.mosquitto_version()} if "mosquitto" in contenders else {},
                     "runs": []}
    plan = [(qos, version, "window") for qos, version in RUNS] + [(qos, version, "fleet")
                                                                  for qos, version in FLEET_RUNS]
    for rnd in range(rounds):
        for qos, version, shape in plan:
            for name in contenders:
                run_ = _one(name, qos, duration, None, version, shape)
                run_.update(round=rnd)
                results["runs"].append(run_)
                log(_line(run_, f"round {rnd + 1}/{rounds}"))
    if profile:
        # Extra runs, not counted in the medians: two py-spy samplers cost CPU
        # on a 2-core machine, and only gridgate is a Python process. One per
        # load whose target the report judges, so a short target's next
        # bottleneck comes from a profile under that very load.
        for qos, version, shape in PROFILED:
            run_ = _one("gridgate", qos, duration, out / "profiles", version, shape)
            run_.update(round=None, profiled=True)
            results["runs"].append(run_)
            log(_line(run_, "profiled   "))
    results["summary"] = summarize(results["runs"])
    return results


def _one(name: str, qos: int, duration: float, profile_dir: Path | None, version: int = 4,
         shape: str = "window") -> dict:
    devices, inflight = SHAPES[shape]
    server = procs.mqtt_contender(name)
    server.tree = True          # the CPU of whatever the server runs, children included
    try:
        if profile_dir is not None:
            server.profile(profile_dir, f"mqtt-qos{qos}{'-fleet' if shape == 'fleet' else ''}-{name}", duration)
        cpu0 = server.cpu_seconds()
        result = procs.loadgen("mqtt", procs.mqtt_address(server), duration, devices=devices, inflight=inflight,
                               qos=qos, procs=LOADGEN_PROCS, mqtt_version=version)
        server_cpu = server.cpu_seconds() - cpu0
        profile_files = server.finish_profile()
        drain_s = _wait_drained(server) if name == "gridgate" else None
        peak = server.peak_rss_kb()
    finally:
        server.stop()
    readings = result["acked"] if qos else result["sent"]
    run_ = {"contender": name, "qos": qos, "mqtt_version": version, "shape": shape, "devices": devices,
            "inflight": inflight, "readings_per_s": result["readings_per_s"],
            "server_cpu_s": round(server_cpu, 3),
            "server_cpu_us": round(server_cpu * 1e6 / readings, 2) if readings else None,
            "loadgen_cpu_us": result.get("loadgen_cpu_us_per_reading"),
            # the same once every device had connected (a fleet's 1,000 connects left out)
            "loadgen_cpu_us_steady": result.get("loadgen_cpu_us_per_reading_steady"),
            "loadgen_cpu_shares": result.get("loadgen_cpu_share_per_process"),
            "sent": result["sent"],
            "acked": result["acked"], "errors": result["errors"], "reconnects": result["reconnects"],
            "elapsed_s": result["elapsed_s"],
            "latency_ms": {k: result["latency_ms"][k] for k in ("p50", "p90", "p99", "p99.9", "max")},
            "peak_rss_kb": peak, "warnings": result["warnings"]}
    if drain_s is not None:
        run_["drain_s"] = drain_s
    if profile_files:
        run_["profile"] = profile_files
    if name == "gridgate":
        spooled = procs.spool_records(server.data_dir)
        run_["spool_records"] = spooled
        # QoS 1: every acknowledged reading must be in the spool; QoS 0: what
        # was stored of what the load generator wrote.
        run_["spool_matches"] = spooled == (result["acked"] if qos else result["sent"])
        procs.discard(server.data_dir)
    return run_


def _wait_drained(server: procs.Server, timeout: float = 60.0) -> float:
    """Seconds until gridgate has closed every client connection after the
    load generator ended: at QoS 0 it may still be reading what the clients
    wrote, and a SIGTERM now would cut that short (QoS 0 is at most once).
    Bounded; the spool count then says what was stored."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if procs.gridgate_connections(server.addresses["http"]) == 0:
                break
        except OSError:
            pass
        time.sleep(0.1)
    return round(time.monotonic() - t0, 2)


def _line(run_: dict, prefix: str) -> str:
    lat = run_["latency_ms"]
    extra = ""
    if "spool_records" in run_:
        extra = f"  spool {run_['spool_records']:,} ({'=' if run_['spool_matches'] else '!='} " \
                f"{'acked' if run_['qos'] else 'sent'})"
    p = "-" if lat["p99"] is None else f"{lat['p99']}"
    v5 = " MQTT 5" if run_.get("mqtt_version") == 5 else ""
    fleet = f" {run_['devices']}x{run_['inflight']}" if run_.get("shape") == "fleet" else ""
    cpu = ""
    if run_.get("server_cpu_us") is not None:
        cpu = (f"  CPU us/reading server {run_['server_cpu_us']:.1f} loadgen {_num(run_.get('loadgen_cpu_us'))} "
               f"({_num(run_.get('loadgen_cpu_us_steady'))} once connected)")
    return (f"  {prefix} QoS {run_['qos']}{v5}{fleet} {run_['contender']:9s} {run_['readings_per_s']:>10,.0f} "
            f"readings/s  p50 {lat['p50']} ms  p99 {p} ms  peak RSS {run_['peak_rss_kb'] / 1024:.0f} MiB{cpu}{extra}")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def summarize(runs: list[dict]) -> dict:
    """Median per (QoS, MQTT version, shape, contender) over the counted
    rounds, gridgate / mosquitto (ratio of the medians, and the median of the
    per-round ratios), and MQTT 5 / 3.1.1 at QoS 1 for each contender.
    Keys: qos0, qos1 (3.1.1), qos1_mqtt5, fleet_qos1 (FLEET_DEVICES x
    FLEET_INFLIGHT). Each contender's entry holds server_cpu_us_per_reading
    and loadgen_cpu_us_per_reading (medians, CPU us per acked reading, per
    sent one at QoS 0); gridgate_vs_mosquitto is the ratio of the medians,
    gridgate_vs_mosquitto_by_round_median the median of the per-round ratios
    (gridgate_vs_mosquitto_rounds)."""
    out: dict = {}
    counted = [r for r in runs if not r.get("profiled")]
    plan = [(q, v, "window") for q, v in RUNS] + [(q, v, "fleet") for q, v in FLEET_RUNS]
    for qos, version, shape in plan:
        per: dict = {}
        for name in CONTENDERS:
            mine = [r for r in counted if r["qos"] == qos and r["contender"] == name
                    and r.get("mqtt_version", 4) == version and r.get("shape", "window") == shape]
            if not mine:
                continue
            per[name] = {
                "readings_per_s": statistics.median(r["readings_per_s"] for r in mine),
                "readings_per_s_runs": [r["readings_per_s"] for r in mine],
                "peak_rss_mib": statistics.median(r["peak_rss_kb"] for r in mine) / 1024,
                "errors": sum(r["errors"] for r in mine),
                "server_cpu_us_per_reading": _median([r.get("server_cpu_us") for r in mine]),
                "loadgen_cpu_us_per_reading": _median([r.get("loadgen_cpu_us") for r in mine]),
                "loadgen_cpu_us_per_reading_steady": _median([r.get("loadgen_cpu_us_steady") for r in mine]),
            }
            for k in ("p50", "p90", "p99", "p99.9", "max"):
                values = [r["latency_ms"][k] for r in mine if r["latency_ms"][k] is not None]
                per[name][f"{k}_ms"] = statistics.median(values) if values else None
            if name == "gridgate":
                per[name]["spool_matches_all"] = all(r["spool_matches"] for r in mine)
                per[name]["drain_s"] = statistics.median(r.get("drain_s", 0.0) for r in mine)
                per[name]["acked"] = [r["acked"] if qos else r["sent"] for r in mine]
                per[name]["spool_records"] = [r["spool_records"] for r in mine]
        if "gridgate" in per and "mosquitto" in per:
            per["gridgate_vs_mosquitto"] = per["gridgate"]["readings_per_s"] / per["mosquitto"]["readings_per_s"]
            rounds = _round_ratios([r for r in counted if r["qos"] == qos and r.get("mqtt_version", 4) == version
                                    and r.get("shape", "window") == shape])
            per["gridgate_vs_mosquitto_rounds"] = rounds
            per["gridgate_vs_mosquitto_by_round_median"] = statistics.median(rounds) if rounds else None
            g, m = per["gridgate"]["server_cpu_us_per_reading"], per["mosquitto"]["server_cpu_us_per_reading"]
            per["server_cpu_gridgate_vs_mosquitto"] = g / m if g and m else None
        out[summary_key(qos, version, shape)] = per
    v5, v4 = out.get("qos1_mqtt5", {}), out.get("qos1", {})
    for name in CONTENDERS:
        if name in v5 and name in v4 and v4[name]["readings_per_s"]:
            v5[f"{name}_mqtt5_vs_mqtt311"] = v5[name]["readings_per_s"] / v4[name]["readings_per_s"]
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _round_ratios(runs: list[dict]) -> list[float]:
    """gridgate / mosquitto readings/s of each round that measured both."""
    by_round: dict = {}
    for r in runs:
        by_round.setdefault(r.get("round"), {})[r["contender"]] = r["readings_per_s"]
    return [pair["gridgate"] / pair["mosquitto"] for _, pair in sorted(by_round.items(), key=lambda kv: str(kv[0]))
            if pair.get("gridgate") and pair.get("mosquitto")]


def summary_key(qos: int, version: int, shape: str = "window") -> str:
    return ("fleet_" if shape == "fleet" else "") + f"qos{qos}" + ("_mqtt5" if version == 5 else "")
