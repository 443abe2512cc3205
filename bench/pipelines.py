"""pipelines: gridgate's std (h11) and fast (compiled) HTTP engines under the
same load in the same run, plus the uvicorn + httptools reference.

Rounds alternate (std, fast, reference, std, fast, reference, ...) so drift
of a shared machine hits every contender alike. Each round starts a fresh
server, drives it, reads its peak RSS and stops it. Drivers:

* wrk (when installed), C: the server is the bottleneck, not the client.
  One reading per request, 64 keep-alive connections, then the same at
  1,000 connections for the RSS comparison.
* gridgate-loadgen http: devices posting over keep-alive with 4 requests
  pipelined each, latency from the intended send time.
"""
from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from bench import procs

CONTENDERS = ("std", "fast", "reference")


def _start(name: str) -> procs.Server:
    if name == "reference":
        return procs.reference_app()
    return procs.gridgate(engine=name)


def _target(server: procs.Server) -> tuple[str, int]:
    return server.address or server.addresses["http"]


def run(duration: float, rounds: int, out: Path, profile: bool, log=print) -> dict:
    drivers = []
    if shutil.which("wrk"):
        drivers += [("wrk-64", {"connections": 64}), ("wrk-1000", {"connections": 1000})]
    drivers.append(("loadgen", {"devices": 64, "inflight": 4}))
    results: dict = {"scenario": "pipelines", "duration_s": duration, "rounds": rounds, "runs": []}
    for rnd in range(rounds):
        for driver, opts in drivers:
            for name in CONTENDERS:
                server = _start(name)
                try:
                    if profile and driver == drivers[0][0] and rnd == 0 and name != "reference":
                        server.profile(out / "profiles", f"pipelines-{name}", duration)
                    run = _drive(server, driver, opts, duration)
                    server.finish_profile()
                    run["peak_rss_kb"] = server.peak_rss_kb()
                finally:
                    server.stop()
                if name != "reference":
                    run["spool_records"] = procs.spool_records(server.data_dir)
                run.update(contender=name, driver=driver, round=rnd)
                results["runs"].append(run)
                log(f"  round {rnd + 1}/{rounds} {driver:9s} {name:9s} {run['readings_per_s']:>10,.0f} readings/s  "
                    f"p50 {run['latency_ms']['p50']} ms  p99 {run['latency_ms']['p99']} ms  "
                    f"peak RSS {run['peak_rss_kb'] / 1024:.0f} MiB")
    results["summary"] = summarize(results["runs"])
    return results


def _drive(server: procs.Server, driver: str, opts: dict, duration: float) -> dict:
    target = _target(server)
    if driver.startswith("wrk"):
        result = procs.wrk(target, duration, opts["connections"], threads=2 if opts["connections"] > 100 else 1)
        assert result is not None
        return result
    result = procs.loadgen("http", target, duration, devices=opts["devices"], inflight=opts["inflight"])
    return {"readings_per_s": result["readings_per_s"], "acked": result["acked"], "errors": result["errors"],
            "latency_ms": {k: result["latency_ms"][k] for k in ("p50", "p99", "p99.9", "max")},
            "warnings": result["warnings"]}


def summarize(runs: list[dict]) -> dict:
    """Median per (driver, contender) over the rounds, and the ratios."""
    out: dict = {}
    for driver in sorted({r["driver"] for r in runs}):
        per: dict = {}
        for name in CONTENDERS:
            mine = [r for r in runs if r["driver"] == driver and r["contender"] == name]
            if not mine:
                continue
            per[name] = {
                "readings_per_s": statistics.median(r["readings_per_s"] for r in mine),
                "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in mine),
                "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in mine),
                "peak_rss_mib": statistics.median(r["peak_rss_kb"] for r in mine) / 1024,
            }
        if "std" in per and "fast" in per:
            per["fast_vs_std"] = per["fast"]["readings_per_s"] / per["std"]["readings_per_s"]
            per["fast_vs_std_rss"] = per["fast"]["peak_rss_mib"] / per["std"]["peak_rss_mib"]
        if "reference" in per and "fast" in per:
            per["fast_vs_reference"] = per["fast"]["readings_per_s"] / per["reference"]["readings_per_s"]
        out[driver] = per
    return out
