"""workers: ``gridgate serve --workers N`` for N in --workers (default 1,2)
against mosquitto (issue 22; DESIGN section 12).

Two measurements, each ratio from one run:

- QoS 1 throughput: ``gridgate-loadgen mqtt --devices 100 --inflight 10
  --procs 2`` against each contender in alternating rounds; readings/s, the
  server's CPU per acked reading (user + system of the whole process tree:
  supervisor, workers and the workers' private nats-server, from /proc), and
  the load generator's own CPU per reading (its --json). On 2 cores the load
  generator competes with the workers, so readings/s cannot double; CPU per
  reading is the figure that says whether a second worker costs extra (the
  aim: under 10% more than one).
- Capacity: 15,000 idle MQTT connections per worker (1 worker: 15k; 2:
  30,000, more than one process's 20,000 open files), RSS per connection of
  the whole tree; the aim: 2 workers within 10% of one worker's.

What the second worker's extra CPU per reading is made of (2026-12-05, 8 s
runs alternating, the 2 cores busy with other engineers' work, load 5-8):
not the cluster mode (supervisor and private nats-server 0.00 us per reading,
the worker's NATS thread 0.01-0.06, prometheus-client's multiprocess values
about 0.05 by py-spy), and not the smaller group commits of a worker that
serves half the devices (one gateway at 50 devices x 10, about 240 readings
per batch as a worker's, costs what it costs at 100 x 10, about 500: 6.48,
6.03, 7.22 against 6.82, 5.88, 7.05 us). Two independent lone gateways side
by side, each under its own load generator of 50 x 10, cost what 2 workers
cost (6 rounds: median 7.9 against 7.7 us, round by round 0.86-1.07x; one
gateway at 100 x 10 in the same rounds: median 6.4): the excess is two busy
gateway processes sharing two cores with the load generator (py-spy sees
their time in epoll_wait grow: woken, waiting for a core), not work a
worker repeats.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from bench import conns, procs

DEVICES = 100
INFLIGHT = 10
LOADGEN_PROCS = 2
IDLE_PER_WORKER = 15_000
TARGET_CPU_GROWTH = 1.10
TARGET_RSS_GROWTH = 1.10


def run(duration: float, rounds: int, out: Path, profile: bool, log=print, workers: tuple[int, ...] = (1, 2),
        idle_per_worker: int = IDLE_PER_WORKER) -> dict:
    if profile:
        log("  workers: not profiled (several processes; profile one gateway with the mqtt scenario)")
    others, skipped = procs.gridgate_and_mosquitto(log)
    names = [f"gridgate-w{n}" for n in workers] + [n for n in others if n == "mosquitto"]
    results: dict = {"scenario": "workers", "duration_s": duration, "rounds": rounds, "workers": list(workers),
                     "devices": DEVICES, "inflight": INFLIGHT, "loadgen_procs": LOADGEN_PROCS,
                     "idle_per_worker": idle_per_worker, "skipped": skipped, "runs": [], "idle": []}
    for rnd in range(rounds):
        for name in names:
            run_ = _qos1(name, duration)
            run_["round"] = rnd
            results["runs"].append(run_)
            log(f"  round {rnd + 1}/{rounds} QoS 1 {name:12s} {run_['readings_per_s']:>9,.0f} readings/s  server "
                f"{run_['server_cpu_us']:.1f} us/reading  loadgen {run_['loadgen_cpu_us']} us/reading"
                + (f"  spool {'=' if run_['spool_matches'] else '!='} acked" if "spool_matches" in run_ else ""))
    for n in workers:
        name = f"gridgate-w{n}"
        try:
            idle = conns._one(name, idle_per_worker * n, lambda n=n: procs.gridgate_workers(n))
        except RuntimeError as exc:
            idle = {"contender": name, "connections": idle_per_worker * n, "error": str(exc)}
            log(f"  {name} {idle_per_worker * n:,} idle connections: FAILED: {exc}")
        else:
            log(f"  {name} {idle['connections']:,} idle connections: RSS {idle['rss_kb'] / 1024:.1f} MiB "
                f"(at 0: {idle['rss0_kb'] / 1024:.1f})  {idle['per_conn_kib']:.2f} KiB/connection")
        results["idle"].append(idle)
    results["summary"] = summarize(results)
    return results


def _start(name: str) -> procs.Server:
    if name.startswith("gridgate-w"):
        return procs.gridgate_workers(int(name[len("gridgate-w"):]))
    return procs.mqtt_contender(name)


def _qos1(name: str, duration: float) -> dict:
    server = _start(name)
    try:
        cpu0 = server.cpu_seconds()
        result = procs.loadgen("mqtt", procs.mqtt_address(server), duration, devices=DEVICES, inflight=INFLIGHT,
                               qos=1, procs=LOADGEN_PROCS)
        cpu = server.cpu_seconds() - cpu0
        peak = server.peak_rss_kb()
    finally:
        server.stop()
    acked = result["acked"]
    run_ = {"contender": name, "readings_per_s": result["readings_per_s"], "acked": acked,
            "errors": result["errors"], "server_cpu_s": round(cpu, 3),
            "server_cpu_us": cpu / acked * 1e6 if acked else None,
            "loadgen_cpu_us": result.get("loadgen_cpu_us_per_reading"),
            "p99_ms": result["latency_ms"]["p99"], "peak_rss_kb": peak}
    if name.startswith("gridgate"):
        spooled = procs.spool_records(server.data_dir)
        run_["spool_records"] = spooled
        run_["spool_matches"] = spooled >= acked        # every acked reading stored (resends may add more)
        procs.discard(server.data_dir)
    return run_


def summarize(results: dict) -> dict:
    per: dict = {}
    for name in {r["contender"] for r in results["runs"]}:
        mine = [r for r in results["runs"] if r["contender"] == name]
        cpu = [r["server_cpu_us"] for r in mine if r["server_cpu_us"] is not None]
        lg = [r["loadgen_cpu_us"] for r in mine if r["loadgen_cpu_us"] is not None]
        per[name] = {"readings_per_s": statistics.median(r["readings_per_s"] for r in mine),
                     "readings_per_s_runs": [r["readings_per_s"] for r in mine],
                     "server_cpu_us": statistics.median(cpu) if cpu else None,
                     "loadgen_cpu_us": statistics.median(lg) if lg else None,
                     "errors": sum(r["errors"] for r in mine),
                     "spool_matches_all": all(r.get("spool_matches", True) for r in mine)}
    idle = {i["contender"]: i for i in results["idle"] if "error" not in i}
    out: dict = {"qos1": per, "idle": idle, "targets": {}}
    w = results["workers"]
    if len(w) >= 2:
        one, more = f"gridgate-w{w[0]}", f"gridgate-w{w[-1]}"
        if per.get(one, {}).get("server_cpu_us") and per.get(more, {}).get("server_cpu_us"):
            growth = per[more]["server_cpu_us"] / per[one]["server_cpu_us"]
            out["cpu_growth"] = growth
            out["targets"]["cpu_growth"] = growth <= TARGET_CPU_GROWTH
        if one in idle and more in idle:
            growth = idle[more]["per_conn_kib"] / idle[one]["per_conn_kib"]
            out["rss_growth"] = growth
            out["targets"]["rss_growth"] = growth <= TARGET_RSS_GROWTH
    if "mosquitto" in per:
        out["vs_mosquitto"] = {n: per[n]["readings_per_s"] / per["mosquitto"]["readings_per_s"]
                               for n in per if n != "mosquitto"}
    return out


def table(res: dict) -> list[str]:
    """The markdown section of report.md."""
    s = res["summary"]
    per, idle = s["qos1"], s["idle"]
    names = [f"gridgate-w{n}" for n in res["workers"]] + (["mosquitto"] if "mosquitto" in per else [])
    lines = [f"## workers: gridgate --workers {','.join(map(str, res['workers']))} vs mosquitto", "",
             f"{res['rounds']} rounds, {res['duration_s']:g} s per run; QoS 1 with gridgate-loadgen, {res['devices']} "
             f"devices x {res['inflight']} in flight over {res['loadgen_procs']} processes; server CPU is the whole "
             "process tree (supervisor, workers, private nats-server).", "",
             "| | readings/s (median) | vs mosquitto | server CPU µs/reading | loadgen CPU µs/reading | "
             "every acked reading stored |", "|---|---:|---:|---:|---:|---|"]
    for n in names:
        p = per.get(n)
        if p is None:
            continue
        vs = s.get("vs_mosquitto", {}).get(n)
        lines.append(f"| {n} | {p['readings_per_s']:,.0f} | {'-' if vs is None else f'{vs:.2f}x'} | "
                     f"{_num(p['server_cpu_us'])} | "
                     f"{'-' if p['loadgen_cpu_us'] is None else p['loadgen_cpu_us']} | "
                     f"{'yes' if p['spool_matches_all'] else 'NO'} |")
    if "cpu_growth" in s:
        lines += ["", f"Server CPU per reading, {res['workers'][-1]} workers / 1: **{s['cpu_growth']:.2f}x** "
                      f"(target ≤ {TARGET_CPU_GROWTH:.2f}x: {'met' if s['targets']['cpu_growth'] else 'not met'})."]
    if idle:
        lines += ["", "| idle MQTT connections | RSS at 0 | RSS | KiB per connection |", "|---|---:|---:|---:|"]
        for n in names:
            if n in idle:
                i = idle[n]
                lines.append(f"| {n}: {i['connections']:,} | {i['rss0_kb'] / 1024:.1f} MiB | "
                             f"{i['rss_kb'] / 1024:.1f} MiB | {i['per_conn_kib']:.2f} |")
    if "rss_growth" in s:
        lines += ["", f"RSS per idle connection, {res['workers'][-1]} workers / 1: **{s['rss_growth']:.2f}x** "
                      f"(target ≤ {TARGET_RSS_GROWTH:.2f}x: {'met' if s['targets']['rss_growth'] else 'not met'})."]
    return lines + [""]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
