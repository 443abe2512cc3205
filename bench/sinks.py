"""sinks: what each sink costs. The same MQTT QoS 1 load (acks after
durable) into gridgate writing to the spool, to InfluxDB and to NATS
JetStream (one reading per message, and ``nats-batch``: the batched format,
``subject = "telemetry.{region}"``, ``readings_per_message = 500``), in
alternating rounds of one run. InfluxDB and nats-server are
started here (Debian packages influxdb, nats-server) on free loopback ports
with throw-away data directories; a sink whose server is not installed is
skipped and the report says so.

For the external sinks the spool stays underneath as store-and-forward: a
batch the sink is too slow for (write_timeout_s) goes pending and is
replayed, so the report gives the records still pending at the end and the
time the replayer needed to drain them - throughput that only looks good
because it piles up in the spool would show there.

CPU per acked reading, from /proc: the gateway (every thread), of which the
JetStream sink's asyncio loop thread (named ``gridgate-nats-*`` by
gridgate.asyncio_thread), and the sink's own server (influxd, nats-server).

``BENCH_SINKS=spool,nats python -m bench sinks`` runs only the kinds named.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import procs

sys.path.insert(0, str(procs.ROOT / "tests"))   # the test suite's server starters

KINDS = ("spool", "influxdb", "nats", "nats-batch")
# nats-batch: the opt-in batched message format ([nats] readings_per_message)
# on a per-region subject. The loadgen's readings all carry the location
# "loadgen/site-a", so every reading of a write shares one subject: the
# format's best case, which is the case it is meant for.
BATCH_SUBJECT = "telemetry.{region}"
BATCH_READINGS_PER_MESSAGE = 500
# BENCH_SINKS=spool,nats runs only those kinds (not GRIDGATE_*: gridgate reads
# those as its config). Keep spool among them: the ratios are to the spool of the same run.
KINDS_ENV = "BENCH_SINKS"


def _kinds() -> tuple[str, ...]:
    chosen = os.environ.get(KINDS_ENV, "").strip()
    if not chosen:
        return KINDS
    kinds = tuple(k.strip() for k in chosen.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"{KINDS_ENV}: unknown sink kind(s) {unknown}; known: {', '.join(KINDS)}")
    return kinds


# the OS name gridgate.asyncio_thread gives the JetStream sink's asyncio loop
# thread ("gridgate-nats-<stream>", cut to the kernel's 15 bytes)
SINK_THREAD_PREFIX = "gridgate-nats"


def _thread_cpu_seconds(pid: int, prefix: str) -> float:
    """User + system CPU of the threads of ``pid`` whose kernel name starts with ``prefix``."""
    total = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:         # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name.startswith(prefix):
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _readyz(server: procs.Server) -> dict:
    host, port = server.addresses["http"]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())
    except OSError as err:          # refused, reset, timed out: say whether gridgate is still running
        code = server.proc.poll()
        state = "running" if code is None else f"exited with code {code}"
        tail = "\n".join(server.lines[-15:])
        raise RuntimeError(f"gridgate did not answer /readyz on {host}:{port} after the load ({err}; it is "
                           f"{state}); its log ends:\n{tail}") from err


def _external(kind: str, work: Path):
    """(started server process or None, gridgate env) for one sink kind."""
    if kind == "influxdb":
        if shutil.which("influxd") is None:
            return None, None
        from influxproc import InfluxProcess
        influx = InfluxProcess(work / "influx")
        influx.start()
        return influx, {"GRIDGATE_SINK_KIND": "influxdb", "GRIDGATE_INFLUXDB_URL": influx.url}
    if kind in ("nats", "nats-batch"):
        if shutil.which("nats-server") is None:
            return None, None
        from natsproc import NatsServer
        server = NatsServer(work / "nats").start()
        env = {"GRIDGATE_SINK_KIND": "nats", "GRIDGATE_NATS_SERVERS": server.url}
        if kind == "nats-batch":
            env |= {"GRIDGATE_NATS_SUBJECT": BATCH_SUBJECT,
                    "GRIDGATE_NATS_READINGS_PER_MESSAGE": str(BATCH_READINGS_PER_MESSAGE)}
        return server, env
    return None, {}


def run(duration: float, rounds: int, out: Path, profile: bool, log=print) -> dict:
    results: dict = {"scenario": "sinks", "duration_s": duration, "rounds": rounds, "runs": [], "skipped": []}
    kinds = _kinds()
    for rnd in range(rounds):
        for kind in kinds:
            work = Path(tempfile.mkdtemp(prefix=f"gridgate-bench-{kind}-"))
            external, env = _external(kind, work)
            if env is None:
                if rnd == 0:
                    results["skipped"].append(kind)
                    log(f"  {kind}: its server is not installed; skipped")
                continue
            server = procs.gridgate(mqtt=True, extra_env=env, data_dir=work / "data")
            try:
                if profile and rnd == 0:
                    server.profile(out / "profiles", f"sinks-{kind}", duration)
                cpu_before = server.cpu_seconds()
                loop_cpu_before = _thread_cpu_seconds(server.pid, SINK_THREAD_PREFIX)
                # the sink's own server (influxd, nats-server) shares the cores too
                sink_pid = getattr(getattr(external, "proc", None), "pid", None)
                sink_cpu_before = procs.cpu_seconds(sink_pid) if sink_pid else 0.0
                result = procs.loadgen("mqtt", server.addresses["mqtt"], duration, devices=100, inflight=10,
                                       qos=1, procs=2)
                # the gateway's own CPU (user+sys from /proc, every thread) per acked reading
                cpu_s = server.cpu_seconds() - cpu_before
                # of which the JetStream sink's asyncio loop thread (0 for the other sinks)
                loop_cpu_s = _thread_cpu_seconds(server.pid, SINK_THREAD_PREFIX) - loop_cpu_before
                sink_cpu_s = procs.cpu_seconds(sink_pid) - sink_cpu_before if sink_pid else None
                profiled = server.finish_profile()
                started = time.monotonic()
                pending = _readyz(server).get("sink", {}).get("pending", 0)
                left = pending
                while left and time.monotonic() - started < 120:
                    time.sleep(0.2)
                    left = _readyz(server)["sink"]["pending"]
                run = {"kind": kind, "round": rnd, "readings_per_s": result["readings_per_s"],
                       "acked": result["acked"], "errors": result["errors"],
                       "server_cpu_us_per_reading": (round(cpu_s * 1e6 / result["acked"], 1)
                                                     if result["acked"] else None),
                       "sink_loop_cpu_us_per_reading": (round(loop_cpu_s * 1e6 / result["acked"], 1)
                                                        if result["acked"] and loop_cpu_s else None),
                       "sink_server_cpu_us_per_reading": (round(sink_cpu_s * 1e6 / result["acked"], 1)
                                                          if result["acked"] and sink_cpu_s is not None else None),
                       "latency_ms": {k: result["latency_ms"][k] for k in ("p50", "p99", "p99.9", "max")},
                       "pending_at_end": pending, "drain_s": round(time.monotonic() - started, 2) if pending else 0.0,
                       "peak_rss_kb": server.peak_rss_kb()}
                if profiled:
                    run["profile"] = profiled     # round 0's run, sampled while counted
            finally:
                server.stop()
                if external is not None:
                    external.stop()
            results["runs"].append(run)
            log(f"  round {rnd + 1}/{rounds} {kind:10s} {run['readings_per_s']:>10,.0f} readings/s  "
                f"p99 {run['latency_ms']['p99']} ms  gateway {run['server_cpu_us_per_reading']} CPU-us/reading  "
                + (f"(its sink loop thread {run['sink_loop_cpu_us_per_reading']})  "
                   if run["sink_loop_cpu_us_per_reading"] is not None else "")
                + (f"{kind.split('-')[0]} server {run['sink_server_cpu_us_per_reading']}  "
                   if run["sink_server_cpu_us_per_reading"] is not None else "") +
                f"pending at end {run['pending_at_end']}")
    results["summary"] = {
        kind: {"readings_per_s": statistics.median(r["readings_per_s"] for r in mine),
               "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in mine),
               "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in mine),
               "server_cpu_us_per_reading": round(statistics.median(r["server_cpu_us_per_reading"] or 0.0
                                                                    for r in mine), 1),
               "sink_loop_cpu_us_per_reading": (
                   round(statistics.median(loops), 1)
                   if (loops := [r["sink_loop_cpu_us_per_reading"] for r in mine
                                 if r["sink_loop_cpu_us_per_reading"] is not None]) else None),
               "sink_server_cpu_us_per_reading": (
                   round(statistics.median(cpus), 1)
                   if (cpus := [r["sink_server_cpu_us_per_reading"] for r in mine
                                if r["sink_server_cpu_us_per_reading"] is not None]) else None),
               "pending_at_end": max(r["pending_at_end"] for r in mine),
               "drain_s": max(r["drain_s"] for r in mine)}
        for kind in kinds if (mine := [r for r in results["runs"] if r["kind"] == kind])}
    summary = results["summary"]
    spool = summary.get("spool", {}).get("readings_per_s")
    for kind, row in summary.items():
        # each sink's median next to the spool's, both from this run
        row["ratio_to_spool"] = round(row["readings_per_s"] / spool, 2) if spool else None
        if kind != "spool" and spool:
            log(f"  {kind}: {row['readings_per_s']:,.0f} readings/s, {row['ratio_to_spool']:.2f}x the spool's "
                f"{spool:,.0f} (medians), gateway {row['server_cpu_us_per_reading']} CPU-us/reading (its sink loop "
                f"thread {row['sink_loop_cpu_us_per_reading']}), its server {row['sink_server_cpu_us_per_reading']}")
    return results
