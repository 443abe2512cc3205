"""ws: the server CPU per acked reading of ``/v1/ws`` and of MQTT over
``/mqtt`` against MQTT and HTTP (issue 24, "WebSocket within 2x of MQTT").

One gateway with its MQTT, HTTP and WebSocket listeners; in each round
``gridgate-loadgen`` drives mqtt (QoS 1), http and ws in turn, then
``bench/mqtt_ws_driver.py`` MQTT QoS 1 over ``/mqtt`` (gridgate-loadgen has
no such mode), DEVICES devices x INFLIGHT messages in flight x --duration
seconds each, one reading per message. For every run: the gateway's user + sys CPU from
/proc/PID/stat over the run (all its threads) divided by the readings the
load generator counted as acked, and the load generator's own CPU per
reading (its ``loadgen_cpu_us_per_reading``, and ``_steady``: from when
every device was connected, what the 5 us budget is judged on, as for
mqtt). The ratios ws / mqtt and
http / mqtt are taken within each round (same machine state), then the
median over rounds. Absolute microseconds depend on what else runs on the
cores; compare the ratios.

    python -m bench ws [--duration S] [--rounds N]
    python -m bench.ws [--duration S] [--rounds N] [--json FILE] [--baseline-src DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procs

PROTOCOLS = ("mqtt", "http", "ws", "mqtt-ws")
LISTENERS = {"mqtt": "mqtt", "http": "http", "ws": "ws", "mqtt-ws": "ws"}
DEVICES = 20
INFLIGHT = 10
TARGET_WS_VS_MQTT = 2.0
LOADGEN_BUDGET_US = 5.0

Log = Callable[[str], None]


def start_gateway(src: Path | None = None) -> procs.Server:
    """A gateway with all three listeners; ``src``: run the gridgate package
    found there instead (the baseline of a before/after run)."""
    data_dir = procs.scratch_dir("gridgate-bench-ws-")
    cmd = [str(procs.BIN / "gridgate"), "serve", "--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0",
           "--ws", "127.0.0.1:0", "--data-dir", str(data_dir)]
    env = {"ENVIRONMENT": "bench", "SERVICE_NAME": "gridgate-bench"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    server = procs.Server("gridgate" if src is None else "gridgate-baseline", cmd, env)
    for name in sorted(set(LISTENERS.values())):
        if name not in server.addresses:
            server.stop()
            raise RuntimeError(f"gridgate did not report its {name} listener: {server.addresses}")
    return server


def _mqtt_ws(server: procs.Server, duration: float) -> dict[str, Any]:
    """MQTT over WebSocket (bench/mqtt_ws_driver.py), in gridgate-loadgen's --json terms."""
    host, port = server.addresses["ws"]
    proc = subprocess.run([sys.executable, "-m", "bench.mqtt_ws_driver", "--target", f"{host}:{port}",
                           "--devices", str(DEVICES), "--inflight", str(INFLIGHT), "--duration", str(duration)],
                          capture_output=True, text=True, timeout=duration * 4 + 60, cwd=procs.ROOT,
                          # the caller's PYTHONPATH kept after the root (a worktree's src: its gridgate)
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              p for p in (str(procs.ROOT), os.environ.get("PYTHONPATH", "")) if p)})
    if proc.returncode != 0:
        raise RuntimeError(f"mqtt_ws_driver failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    acked = out["acked"]
    return {"acked": acked, "errors": out["errors"], "readings_per_s": acked / duration,
            "loadgen_cpu_us_per_reading": out["cpu_s"] * 1e6 / acked if acked else None}


def measure(server: procs.Server, protocol: str, duration: float) -> dict[str, Any]:
    """One loadgen run against ``server``; its CPU per acked reading."""
    opts: dict[str, Any] = {"devices": DEVICES, "inflight": INFLIGHT, "no_reconnect": True}
    if protocol == "mqtt":
        opts["qos"] = 1
    cpu0 = server.cpu_seconds()
    if protocol == "mqtt-ws":
        result = _mqtt_ws(server, duration)
    else:
        result = procs.loadgen(protocol, server.addresses[protocol], duration, **opts)
    time.sleep(0.2)          # the last batch's fsync and acks, already counted by the loadgen
    server_cpu = server.cpu_seconds() - cpu0
    acked = result["acked"]
    return {"protocol": protocol, "acked": acked, "errors": result["errors"],
            "readings_per_s": result["readings_per_s"], "server_cpu_s": round(server_cpu, 3),
            "server_cpu_us_per_reading": server_cpu * 1e6 / acked if acked else None,
            "loadgen_cpu_us_per_reading": result.get("loadgen_cpu_us_per_reading"),
            # from when every device was connected to the deadline (gridgate-loadgen only; not mqtt-ws's driver)
            "loadgen_cpu_us_per_reading_steady": result.get("loadgen_cpu_us_per_reading_steady")}


def run(duration: float, rounds: int, out: Path, profile: bool, log: Log = print,
        baseline_src: Path | None = None) -> dict[str, Any]:
    """``python -m bench``'s entry: ``rounds`` rounds of mqtt, http, ws and
    mqtt-ws; with ``profile``, one more ws run under py-spy (not counted);
    with ``baseline_src``, a second gateway from that source tree measured
    the same way in the same rounds (before/after in one run)."""
    servers = {"current": start_gateway()}
    runs: list[dict[str, Any]] = []
    profiled = None
    try:
        if baseline_src is not None:
            servers["baseline"] = start_gateway(baseline_src)
        for round_ in range(rounds):
            for protocol in PROTOCOLS:
                for label, server in servers.items():
                    r = measure(server, protocol, duration)
                    r["round"], r["gateway"] = round_, label
                    runs.append(r)
                    log(f"  round {round_ + 1} {label} {protocol:>7}: {r['acked']} acked, "
                        f"{r['readings_per_s']:.0f}/s, server {_us(r['server_cpu_us_per_reading'])} us/reading, "
                        f"loadgen {_us(r['loadgen_cpu_us_per_reading'])} us/reading, errors {r['errors']}")
        if profile:
            server = servers["current"]
            server.profile(out / "profiles", "ws-gateway", duration)
            measure(server, "ws", duration)
            profiled = server.finish_profile()
    finally:
        for server in servers.values():
            server.stop()
    res = summarize([r for r in runs if r["gateway"] == "current"], duration)
    if baseline_src is not None:
        res["baseline"] = summarize([r for r in runs if r["gateway"] == "baseline"], duration)
        res["baseline"]["src"] = str(baseline_src)
    if profiled is not None:
        res["profile"] = profiled
    return res


def summarize(runs: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    per: dict[str, dict[str, float | None]] = {}
    for protocol in PROTOCOLS:
        mine = [r for r in runs if r["protocol"] == protocol]
        per[protocol] = {key: _median(r[key] for r in mine)
                         for key in ("server_cpu_us_per_reading", "loadgen_cpu_us_per_reading",
                                     "loadgen_cpu_us_per_reading_steady", "readings_per_s")}
    ratios: dict[str, float | None] = {}
    for protocol in PROTOCOLS[1:]:
        within = []
        for round_ in {r["round"] for r in runs}:
            by = {r["protocol"]: r["server_cpu_us_per_reading"] for r in runs if r["round"] == round_}
            if by.get("mqtt") and by.get(protocol):
                within.append(by[protocol] / by["mqtt"])
        ratios[f"{protocol}_vs_mqtt"] = _median(within)
    ws_ratio, mqtt_ws_ratio = ratios["ws_vs_mqtt"], ratios["mqtt-ws_vs_mqtt"]
    return {"devices": DEVICES, "inflight": INFLIGHT, "duration_s": duration, "runs": runs, "per_protocol": per,
            "ratios": ratios, "target_ws_vs_mqtt": TARGET_WS_VS_MQTT,
            "target_met": None if ws_ratio is None else ws_ratio <= TARGET_WS_VS_MQTT,
            "mqtt_ws_target_met": None if mqtt_ws_ratio is None else mqtt_ws_ratio <= TARGET_WS_VS_MQTT}


def table(res: dict[str, Any]) -> list[str]:
    """Markdown rows for the report and the README."""
    base = res.get("baseline")
    lines = ["## ws: server CPU per acked reading, /v1/ws and MQTT over /mqtt vs MQTT and HTTP", "",
             f"{res['devices']} devices x {res['inflight']} in flight x {res['duration_s']:g} s per run, "
             "one reading per message, one gateway; ratios taken within each round, then the median"
             + (f"; baseline: a second gateway from {base['src']}, same rounds and load generators" if base else ""),
             "",
             "| protocol | server CPU us / acked reading | vs MQTT | readings/s | loadgen CPU us / reading |"
             + (" baseline: server CPU us | vs MQTT | readings/s |" if base else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if base else "")]
    for protocol in PROTOCOLS:
        row = f"| {protocol} |"
        for summary in [res, base] if base else [res]:
            p = summary["per_protocol"][protocol]
            ratio = "1.00x" if protocol == "mqtt" else _x(summary["ratios"].get(f"{protocol}_vs_mqtt"))
            row += f" {_us(p['server_cpu_us_per_reading'])} | {ratio} | {_us(p['readings_per_s'], 0)} |"
            if summary is res:
                steady = p.get("loadgen_cpu_us_per_reading_steady")
                row += f" {_us(steady or p['loadgen_cpu_us_per_reading'])}{' (connected)' if steady else ''} |"
        lines.append(row)
    lines += ["", f"server CPU per reading <= {TARGET_WS_VS_MQTT:g}x MQTT's: /v1/ws {_met(res['target_met'])}, "
              f"MQTT over /mqtt {_met(res.get('mqtt_ws_target_met'))}; loadgen budget {LOADGEN_BUDGET_US:g} us per "
              "reading (mqtt-ws: bench/mqtt_ws_driver.py, not gridgate-loadgen)", ""]
    if res.get("profile"):
        from bench import report  # report imports this module for the table

        total, top = report.profile_top(Path(res["profile"]["speedscope_json"]))
        lines += [f"py-spy of the gateway in one more ws run ({total:,} samples; Python frames, compiled code "
                  "under its caller): " + res["profile"]["flamegraph_svg"], "",
                  "| function (own time, leaf) | own | total |", "|---|---:|---:|",
                  *[f"| `{name}` | {a:.1%} | {b:.1%} |" for name, a, b in top], ""]
    return lines


def _met(met: bool | None) -> str:
    return "met" if met else "not met" if met is not None else "not measured"


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _us(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ws", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per loadgen run (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of mqtt, http, ws (default 2)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--baseline-src", type=Path, metavar="DIR",
                        help="also measure a gateway run from this source tree (DIR holds the gridgate package, "
                             "built: e.g. an older checkout's src/), in the same rounds")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1:
        parser.error("--duration must be > 0 and --rounds >= 1")
    if args.baseline_src is not None and not (args.baseline_src / "gridgate" / "__init__.py").exists():
        parser.error(f"--baseline-src: no gridgate package in {args.baseline_src}")
    res = run(args.duration, args.rounds, Path("."), False, baseline_src=args.baseline_src)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2))
    print("\n".join(table(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
