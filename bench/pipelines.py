"""pipelines: gridgate's std (h11) and fast (compiled) HTTP engines under the
same load in the same run, plus the uvicorn + httptools reference, and at
1,000 connections the floor: a bare Trio responder (bench/floor_app.py)
whose peak RSS is the least any Trio-based engine holds there, so the RSS
target can be read against what Trio allows.

Rounds alternate (std, fast, reference, std, fast, reference, ...) so drift
of a shared machine hits every contender alike. Each round starts a fresh
server, reads its RSS before any load, drives it, reads its peak RSS and
stops it. Drivers:

* wrk (when installed), C: the server is the bottleneck, not the client.
  One reading per request, 64 keep-alive connections, then the same at
  1,000 connections for the RSS comparison, where the floor runs too.
  wrk runs one thread pinned to one CPU and every thread of the server is
  pinned to the others (see WRK_SETUP): unpinned on a 2-core machine, wrk's
  thread and the server take turns on both cores and wrk's share of them
  decides the ratio as much as the server does. Each run records both
  sides' CPU (the server's from /proc, wrk's from getrusage of the children)
  so the report shows that the server is the busy one.
* gridgate-loadgen http: devices posting over keep-alive with 4 requests
  pipelined each, latency from the intended send time.

With --profile, one extra run per gridgate engine on GATE_DRIVER is recorded
with py-spy after the counted rounds; it is kept in results.json (marked
"profiled") but left out of the medians, since two samplers share the
machine's 2 cores with the server.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from bench import procs

CONTENDERS = ("std", "fast", "reference", "floor")
GRIDGATE = ("std", "fast")
# The floor is measured for its RSS, which matters at 1,000 connections only;
# elsewhere it would just cost a server per round.
FLOOR_DRIVER = "wrk-1000"
# The driver bench.perfcheck gates on and the one profiled: see
# bench/perfcheck.py for the run-to-run spread that chose it.
GATE_DRIVER = "loadgen"
# How wrk shares the machine with the server, applied alike to every contender.
WRK_THREADS = 1
WRK_SETUP = ("wrk -t1 pinned to the first CPU of the bench's affinity (taskset), every thread of the server "
             "pinned to the others; one POST of one reading per request (bench/wrk_post.lua), keep-alive")


def available_drivers() -> list[tuple[str, dict]]:
    drivers = []
    if shutil.which("wrk"):
        drivers += [("wrk-64", {"connections": 64}), ("wrk-1000", {"connections": 1000})]
    drivers.append(("loadgen", {"devices": 64, "inflight": 4}))
    return drivers


def _start(name: str) -> procs.Server:
    if name == "reference":
        return procs.reference_app()
    if name == "floor":
        return procs.floor_app()
    return procs.gridgate(engine=name)


def _contenders_for(driver: str, contenders: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in contenders if n != "floor" or driver == FLOOR_DRIVER)


def _target(server: procs.Server) -> tuple[str, int]:
    return server.address or server.addresses["http"]


def run(duration: float, rounds: int, out: Path, profile: bool, log=print,
        drivers: list[str] | None = None, contenders: tuple[str, ...] = CONTENDERS) -> dict:
    """`drivers` / `contenders` narrow the run (bench.perfcheck uses one
    driver and the two gridgate engines); by default everything available.
    The floor runs only on FLOOR_DRIVER, and never in the profile pass."""
    chosen = [(d, o) for d, o in available_drivers() if drivers is None or d in drivers]
    if drivers is not None and len(chosen) != len(drivers):
        missing = set(drivers) - {d for d, _ in chosen}
        raise RuntimeError(f"driver(s) not available: {', '.join(sorted(missing))} (is wrk installed?)")
    skipped = {} if shutil.which("wrk") else {"wrk": "not installed (apt-get install wrk): gridgate-loadgen only"}
    results: dict = {"scenario": "pipelines", "duration_s": duration, "rounds": rounds, "skipped": skipped,
                     "contenders": list(contenders), "gate_driver": GATE_DRIVER, "runs": [], "hot_path": {},
                     "spool_writer": {}, "wrk_setup": WRK_SETUP if cpu_split() else "wrk -t1, unpinned (one CPU)"}
    for rnd in range(rounds):
        for driver, opts in chosen:
            for name in _contenders_for(driver, contenders):
                run_ = _one(name, driver, opts, duration, None, results)
                run_.update(round=rnd)
                results["runs"].append(run_)
                log(_line(run_, f"round {rnd + 1}/{rounds}"))
    if profile:
        gate = [(d, o) for d, o in chosen if d == GATE_DRIVER] or chosen[:1]
        for name in contenders:
            if name not in GRIDGATE:
                continue
            run_ = _one(name, gate[0][0], gate[0][1], duration, out / "profiles", results)
            run_.update(round=None, profiled=True)
            results["runs"].append(run_)
            log(_line(run_, "profiled   "))
    results["summary"] = summarize(results["runs"], contenders)
    return results


def _one(name: str, driver: str, opts: dict, duration: float, profile_dir: Path | None, results: dict) -> dict:
    """One server, one driver, one round; a gridgate server's start-up line
    goes to ``results["hot_path"]`` and ``results["spool_writer"]``."""
    server = _start(name)
    try:
        idle_rss = server.rss_kb()
        if profile_dir is not None:
            server.profile(profile_dir, f"pipelines-{driver}-{name}", duration)
        split = cpu_split() if driver.startswith("wrk") else None
        if split is not None:
            pin_process(server, split[1])
        cpu0 = server.cpu_seconds()
        children0 = _children_cpu_s()
        wall0 = time.monotonic()
        with _pinned(split[0] if split is not None else None):
            run_ = _drive(server, driver, opts, duration)
        wall = time.monotonic() - wall0
        run_["server_cpu_s"] = server.cpu_seconds() - cpu0
        # the driver is the only child that ends in this window, so this is its CPU
        run_["client_cpu_s"] = _children_cpu_s() - children0
        run_["server_cores"] = run_["server_cpu_s"] / wall
        run_["client_cores"] = run_["client_cpu_s"] / wall
        run_["pinned"] = split is not None
        profile_files = server.finish_profile()
        run_["peak_rss_kb"] = server.peak_rss_kb()
        run_["idle_rss_kb"] = idle_rss
        if name in GRIDGATE:
            results["hot_path"][name] = _startup_field(server, "hot path:")
            results["spool_writer"][name] = _startup_field(server, "spool writer:")
    finally:
        server.stop()
    if profile_files:
        run_["profile"] = profile_files
    if name in GRIDGATE:
        run_["spool_records"] = procs.spool_records(server.data_dir)
        procs.discard(server.data_dir)
    if driver.startswith("wrk"):
        run_["connections"] = opts["connections"]
        readings = run_["answered"] - run_["non2xx"]
    else:
        run_["connections"] = opts["devices"]
        readings = run_["acked"]
    # CPU cost per reading: unlike readings/s it barely moves when other
    # work on a shared machine takes cores away from the server
    run_["cpu_us_per_reading"] = run_["server_cpu_s"] * 1e6 / readings if readings else None
    run_["client_cpu_us_per_reading"] = run_["client_cpu_s"] * 1e6 / readings if readings else None
    run_.update(contender=name, driver=driver)
    return run_


def cpu_split() -> tuple[set[int], set[int]] | None:
    """(wrk's CPU, the server's CPUs) out of this process's affinity; None
    on a single CPU, where there is nothing to split."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def pin_process(server: procs.Server, cpus: set[int]) -> None:
    """Every thread of the server (its SQLite writer too) onto ``cpus``."""
    for pid in server._pids():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def _pinned(cpus: set[int] | None) -> Iterator[None]:
    """This thread on ``cpus`` for the block, so the driver it starts
    inherits them (procs.wrk takes no taskset prefix); then as before."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _startup_field(server: procs.Server, key: str) -> str | None:
    """The part of gridgate's start-up line from ``key`` ("hot path:", "spool
    writer:") to the next ";": which hot path and which spool writer it uses."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in list(server.lines):
            if key in line:
                return line[line.index(key):].split(";")[0]
        time.sleep(0.05)
    return None


def _line(run_: dict, prefix: str) -> str:
    lat = run_["latency_ms"]
    cpu = run_.get("cpu_us_per_reading")
    return (f"  {prefix} {run_['driver']:9s} {run_['contender']:9s} {run_['readings_per_s']:>10,.0f} readings/s  "
            f"p50 {lat['p50']} ms  p99 {lat['p99']} ms  peak RSS {run_['peak_rss_kb'] / 1024:.0f} MiB  "
            f"server {'-' if cpu is None else f'{cpu:.1f}'} us/reading, {run_['server_cores']:.2f} cores; "
            f"{run_['driver'].split('-')[0]} {run_['client_cores']:.2f} cores")


def _drive(server: procs.Server, driver: str, opts: dict, duration: float) -> dict:
    target = _target(server)
    if driver.startswith("wrk"):
        result = procs.wrk(target, duration, opts["connections"], threads=WRK_THREADS)
        assert result is not None
        return result
    result = procs.loadgen("http", target, duration, devices=opts["devices"], inflight=opts["inflight"])
    return {"readings_per_s": result["readings_per_s"], "acked": result["acked"], "errors": result["errors"],
            "latency_ms": {k: result["latency_ms"][k] for k in ("p50", "p90", "p99", "p99.9", "max")},
            "warnings": result["warnings"]}


PERCENTILES = ("p50", "p90", "p99", "p99.9", "max")


def summarize(runs: list[dict], contenders: tuple[str, ...] = CONTENDERS) -> dict:
    """Median per (driver, contender) over the counted rounds, and the ratios."""
    out: dict = {}
    counted = [r for r in runs if not r.get("profiled")]
    for driver in sorted({r["driver"] for r in counted}):
        per: dict = {}
        for name in contenders:
            mine = [r for r in counted if r["driver"] == driver and r["contender"] == name]
            if not mine:
                continue
            conns = mine[0]["connections"]
            per[name] = {
                "readings_per_s": statistics.median(r["readings_per_s"] for r in mine),
                "readings_per_s_runs": [r["readings_per_s"] for r in mine],
                "peak_rss_mib": statistics.median(r["peak_rss_kb"] for r in mine) / 1024,
                "idle_rss_mib": statistics.median(r["idle_rss_kb"] for r in mine) / 1024,
                # peak under load minus RSS before any connection, per connection
                "rss_per_conn_kb": statistics.median((r["peak_rss_kb"] - r["idle_rss_kb"]) / conns for r in mine),
                "connections": conns,
                "cpu_us_per_reading": _median_or_none(r.get("cpu_us_per_reading") for r in mine),
                "client_cpu_us_per_reading": _median_or_none(r.get("client_cpu_us_per_reading") for r in mine),
                "server_cores": _median_or_none(r.get("server_cores") for r in mine),
                "client_cores": _median_or_none(r.get("client_cores") for r in mine),
            }
            for k in PERCENTILES:
                values = [r["latency_ms"][k] for r in mine if r["latency_ms"].get(k) is not None]
                per[name][f"{k}_ms"] = statistics.median(values) if values else None
        if "std" in per and "fast" in per:
            per["fast_vs_std"] = per["fast"]["readings_per_s"] / per["std"]["readings_per_s"]
            per["fast_vs_std_rss"] = per["fast"]["peak_rss_mib"] / per["std"]["peak_rss_mib"]
            fast_runs = [r for r in counted if r["driver"] == driver and r["contender"] == "fast"]
            std_runs = [r for r in counted if r["driver"] == driver and r["contender"] == "std"]
            per["fast_vs_std_by_round"] = [f["readings_per_s"] / s["readings_per_s"]
                                           for f, s in zip(fast_runs, std_runs, strict=False)]
            if per["fast"]["cpu_us_per_reading"] and per["std"]["cpu_us_per_reading"]:
                # readings per server CPU-second, fast over std
                per["fast_vs_std_cpu"] = per["std"]["cpu_us_per_reading"] / per["fast"]["cpu_us_per_reading"]
        if "reference" in per and "fast" in per:
            per["fast_vs_reference"] = per["fast"]["readings_per_s"] / per["reference"]["readings_per_s"]
        if "floor" in per and "std" in per:
            # the least peak RSS a Trio server reaches here, over std's: no
            # Trio-based engine's ratio to std can go much under this one
            per["floor_vs_std_rss"] = per["floor"]["peak_rss_mib"] / per["std"]["peak_rss_mib"]
        out[driver] = per
    return out


def _median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
