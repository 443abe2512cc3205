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

With ``nats`` among the kinds, each round also measures nats-server's own
floor: a raw-socket publisher (:func:`nats_server_floor`) stores messages
shaped as the sink's (MessagePack body of one loadgen reading, the
``Nats-Msg-Id`` and ``Nats-Expected-Stream`` headers, one subject per device,
a window of 512 publishes whose acks come back on 512 reused reply subjects,
128 per write) in a fresh ``nats-server -js`` with no gateway running, and
reports the server's CPU per stored message. That is what JetStream costs per
reading on this machine whatever the gateway does; the report puts it next
to the sink's own row.

From that floor and the load generator's own CPU per reading in the nats runs
(both share this machine's cores with the gateway) the summary gives two
ceilings for one reading per message (:func:`machine_ceiling`): the rate at
which those two alone would take every core the bench may use, that is with a
gateway that cost nothing (``machine_ceiling_*``), and the same with the
gateway's CPU outside the sink's loop thread as measured in those runs, that
is with a JetStream publisher that cost nothing (``publisher_free_ceiling_*``).
Under the target's 0.8x the spool, the first says no gateway can meet it on
this machine, the second that no publisher can.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import msgspec

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


FLOOR_MESSAGES = 60_000
FLOOR_WINDOW = 512
FLOOR_PER_WRITE = 128
FLOOR_DEVICES = 100


def _floor_frames(count: int, inbox: bytes) -> list[bytes]:
    """HPUB frames shaped as the sink's one-reading messages (bench may not import gridgate.sinks)."""
    now = time.time_ns()
    frames = []
    for i in range(count):
        device = f"lg-{i % FLOOR_DEVICES:06d}"
        record = {"device_id": device, "ts_ns": now + i, "received_ns": now + i, "protocol": "mqtt",
                  "fields": {"temperature": 21.5, "battery_mv": 3700, "humidity": 40.0},
                  "tags": {"region": "loadgen", "site": "site-a"}}
        body = msgspec.msgpack.encode(record)
        digest = hashlib.blake2b(body, digest_size=12).hexdigest()
        header = (b"NATS/1.0\r\nNats-Msg-Id: %s:%d:%s\r\nNats-Expected-Stream: TELEMETRY\r\n\r\n"
                  % (device.encode(), now + i, digest.encode()))
        frames.append(b"HPUB telemetry.loadgen.%s %s.%d %d %d\r\n%s%s\r\n" % (
            device.encode(), inbox, i % FLOOR_WINDOW, len(header), len(header) + len(body), header, body))
    return frames


class _RawNats:
    """A bare NATS connection: CONNECT, one inbox subscription, MSG parsing (acks only)."""

    def __init__(self, port: int, inbox: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,'
                          b'"protocol":1}\r\nSUB %s.> 1\r\nPING\r\n' % inbox)
        while b"PONG\r\n" not in self.buf:
            self._fill()
        self.buf.clear()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("nats-server closed the connection")
        self.buf += data

    def messages(self) -> list[bytes]:
        """Wait for a read; the bodies of the whole messages in the buffer (PINGs answered)."""
        self._fill()
        buf, pos, bodies = self.buf, 0, []
        while (eol := buf.find(b"\r\n", pos)) >= 0:
            line = bytes(buf[pos:eol])
            if line.startswith((b"MSG ", b"HMSG ")):
                end = eol + 2 + int(line.split()[-1])
                if end + 2 > len(buf):
                    break
                bodies.append(bytes(buf[eol + 2:end]))
                pos = end + 2
            else:
                if line == b"PING":
                    self.sock.sendall(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    raise RuntimeError(f"nats-server: {line.decode(errors='replace')}")
                pos = eol + 2
        del buf[:pos]
        return bodies


def nats_server_floor(work: Path, messages: int = FLOOR_MESSAGES) -> dict:
    """nats-server's CPU per stored message from a raw-socket publisher (the module docstring)."""
    from natsproc import NatsServer
    server = NatsServer(work / "nats-floor").start()
    try:
        inbox = b"_INBOX.floor"
        conn = _RawNats(server.port, inbox)
        config = {"name": "TELEMETRY", "subjects": ["telemetry.*.*"], "num_replicas": 1, "storage": "file",
                  "duplicate_window": 120 * 10**9}
        data = json.dumps(config).encode()
        conn.sock.sendall(b"PUB $JS.API.STREAM.CREATE.TELEMETRY %s.api %d\r\n%s\r\n" % (inbox, len(data), data))
        while not (bodies := conn.messages()):
            pass
        if b'"error"' in bodies[0]:
            raise RuntimeError(f"nats-server refused the stream: {bodies[0].decode(errors='replace')}")
        frames = _floor_frames(messages, inbox)
        cpu_before, started = procs.cpu_seconds(server.proc.pid), time.perf_counter()
        sent = acked = 0
        while acked < messages:
            # a bounded window, as the sink: at most FLOOR_WINDOW publishes unacked
            while sent < messages and sent - acked + FLOOR_PER_WRITE <= FLOOR_WINDOW:
                chunk = frames[sent:sent + FLOOR_PER_WRITE]
                conn.sock.sendall(b"".join(chunk))
                sent += len(chunk)
            for body in conn.messages():
                if b'"error"' in body or not body.startswith(b'{"stream":"TELEMETRY"'):
                    raise RuntimeError(f"nats-server did not store a message: {body.decode(errors='replace')}")
                acked += 1
        elapsed = time.perf_counter() - started
        cpu_s = procs.cpu_seconds(server.proc.pid) - cpu_before
        conn.sock.close()
        return {"messages": messages, "server_cpu_us_per_message": round(cpu_s * 1e6 / messages, 2),
                "messages_per_s": round(messages / elapsed)}
    finally:
        server.stop()


def machine_ceiling(cores: int, floor_us: float | None, loadgen_us: float | None,
                    gateway_us: float = 0.0) -> float | None:
    """Readings/s at which nats-server at its floor, the load generator and
    ``gateway_us`` of gateway CPU per reading use ``cores`` whole cores.

    CPU adds up across processes on shared cores, so one-reading-per-message
    JetStream cannot pass this on this machine while each costs that much.
    """
    if not floor_us or loadgen_us is None or cores <= 0:
        return None
    return cores * 1e6 / (floor_us + loadgen_us + gateway_us)


def _cores() -> int:
    """The cores this bench (and the servers it starts, which inherit its affinity) may run on."""
    return len(os.sched_getaffinity(0))


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
    floors: list[dict] = []
    for rnd in range(rounds):
        if "nats" in kinds and shutil.which("nats-server") is not None:
            floor_dir = procs.scratch_dir("gridgate-bench-nats-floor-")
            floor = nats_server_floor(floor_dir)
            procs.discard(floor_dir)
            floors.append(floor)
            log(f"  round {rnd + 1}/{rounds} nats-server floor (raw publisher, no gateway): "
                f"{floor['server_cpu_us_per_message']} CPU-us/message at {floor['messages_per_s']:,} messages/s")
        for kind in kinds:
            work = procs.scratch_dir(f"gridgate-bench-{kind}-")
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
                       # once every device is connected when the load generator says (the lower figure)
                       "loadgen_cpu_us_per_reading": (result.get("loadgen_cpu_us_per_reading_steady")
                                                      or result.get("loadgen_cpu_us_per_reading")),
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
                procs.discard(work)
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
               "loadgen_cpu_us_per_reading": (
                   round(statistics.median(lgs), 1)
                   if (lgs := [r["loadgen_cpu_us_per_reading"] for r in mine
                               if r.get("loadgen_cpu_us_per_reading") is not None]) else None),
               "pending_at_end": max(r["pending_at_end"] for r in mine),
               "drain_s": max(r["drain_s"] for r in mine)}
        for kind in kinds if (mine := [r for r in results["runs"] if r["kind"] == kind])}
    summary = results["summary"]
    if floors:
        results["nats_server_floor"] = floors
        if "nats" in summary:
            summary["nats"]["nats_server_floor_us_per_message"] = round(statistics.median(
                f["server_cpu_us_per_message"] for f in floors), 2)
    spool = summary.get("spool", {}).get("readings_per_s")
    if "nats_server_floor_us_per_message" in summary.get("nats", {}):
        nats = summary["nats"]
        cores, floor, loadgen = _cores(), nats["nats_server_floor_us_per_message"], nats["loadgen_cpu_us_per_reading"]
        gateway, sink_thread = nats["server_cpu_us_per_reading"], nats["sink_loop_cpu_us_per_reading"]
        ceilings = {"machine_ceiling": machine_ceiling(cores, floor, loadgen)}
        # the gateway's CPU outside the sink's loop thread: what a free publisher still costs
        others = max(0.0, gateway - sink_thread) if gateway and sink_thread is not None else None
        if others is not None:
            ceilings["publisher_free_ceiling"] = machine_ceiling(cores, floor, loadgen, others)
        for name, ceiling in ceilings.items():
            if ceiling is not None:
                nats["machine_cores"] = cores
                nats[f"{name}_readings_per_s"] = round(ceiling)
                nats[f"{name}_ratio_to_spool"] = round(ceiling / spool, 2) if spool else None
        if (ceiling := ceilings["machine_ceiling"]) is not None:
            log(f"  nats: this machine's ceiling for one reading per message: {ceiling:,.0f} readings/s "
                f"({cores} cores / (nats-server's floor {floor} + the load generator's {loadgen} CPU-us per "
                f"reading), with a gateway that cost nothing)"
                + (f", {ceiling / spool:.2f}x the spool" if spool else ""))
        if (ceiling := ceilings.get("publisher_free_ceiling")) is not None:
            log(f"  nats: with the gateway's CPU outside the sink's loop thread as measured "
                f"({others:.1f} us), that is a publisher that cost nothing: "
                f"{ceiling:,.0f} readings/s" + (f", {ceiling / spool:.2f}x the spool" if spool else ""))
    for kind, row in summary.items():
        # each sink's median next to the spool's, both from this run
        row["ratio_to_spool"] = round(row["readings_per_s"] / spool, 2) if spool else None
        if kind != "spool" and spool:
            log(f"  {kind}: {row['readings_per_s']:,.0f} readings/s, {row['ratio_to_spool']:.2f}x the spool's "
                f"{spool:,.0f} (medians), gateway {row['server_cpu_us_per_reading']} CPU-us/reading (its sink loop "
                f"thread {row['sink_loop_cpu_us_per_reading']}), its server {row['sink_server_cpu_us_per_reading']}"
                + (f" (its floor from a raw publisher {row['nats_server_floor_us_per_message']})"
                   if "nats_server_floor_us_per_message" in row else ""))
    return results
