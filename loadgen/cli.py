"""``gridgate-loadgen``: simulate a fleet of devices and measure the server.

    gridgate-loadgen mqtt --target HOST:PORT --devices N --duration S [--rate R] [--qos 0|1]
        [--inflight W] [--batch K] [--procs P] [--source-ips A-B] [--payload json|msgpack]
        [--idle] [--connect-rate C] [--keepalive K] [--json FILE]
        [--reconnect | --no-reconnect] [--backoff-min B] [--backoff-max M]
    gridgate-loadgen http ...   (the same, without --qos and --keepalive)
    gridgate-loadgen ws ...     (the same, without --qos)

``--rate 0`` (the default) is closed loop: each device keeps ``--inflight``
readings unacknowledged and sends more as acks arrive. ``--rate R`` is open
loop: R readings/s over the whole fleet on a fixed schedule, latency measured
from each reading's intended send time, so a stalled server shows in the
percentiles instead of slowing the load down. ``mqtt`` works against any
MQTT 3.1.1 broker; ``http`` posts to gridgate's ``/v1/telemetry``; ``ws``
sends ``{"seq": n, "readings": [...]}`` envelopes on gridgate's WebSocket
channel ``/v1/ws`` and counts a reading acked when its ``{"ack": n}`` arrives.

A device whose connection drops, or whose connect is refused (CONNACK != 0,
ECONNREFUSED, a reset, a timeout), waits and tries again (``--reconnect``,
the default) until ``--duration`` ends: exponential backoff with full jitter,
the n-th wait since its last good connect uniform in [0, min(M, B * 2**n)).
What was unacknowledged at the drop, and what fell due while it was away, is
sent again after the reconnect (``replayed``). ``--no-reconnect``: a device
that drops or is refused stops (counted in ``errors``).

``mqtt`` devices on plain TCP, and ``ws`` devices, are served by one task per
process (``loadgen.mqtt_mux``: their sockets on one epoll, each ack read and
the next reading sent in one pass), so the fleet shape (1,000 devices x 1 in
flight) costs about half the CPU per reading that a reader and a sender task
per device did; ``--no-mux`` keeps those tasks (as ``--tls`` and http do).

The load generator reports its own CPU (user + system, from getrusage, over
the run, summed over every process with ``--procs``) per acknowledged reading
(per sent reading when nothing is acknowledged), in the table and in
``--json`` (``loadgen_cpu_us_per_reading``; ``_steady``: from when every
device had connected, the connects left out), and warns when one of its
processes used more than 85% of a core over the run: then it, not the
server, is likely the bottleneck.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys

import trio

from loadgen.device import DeviceOptions
from loadgen.limits import check_capacity, parse_ip_range, raise_open_file_limit
from loadgen.runner import RunPlan, SelfCheck, process_cpu_s, run_share
from loadgen.stats import Stats, cpu_bottleneck_warning

EXIT_USAGE = 2


def _target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridgate-loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    m = sub.add_parser("mqtt", help="MQTT 3.1.1 or 5.0 devices (gridgate, mosquitto, any broker)")
    h = sub.add_parser("http", help="devices posting to POST /v1/telemetry over HTTP/1.1 keep-alive")
    w = sub.add_parser("ws", help="devices on gridgate's WebSocket channel /v1/ws (seq'd envelopes, acks, "
                                  "commands)")
    for p in (m, h, w):
        _common(p)
    m.add_argument("--qos", type=int, choices=(0, 1), default=1)
    m.add_argument("--keepalive", type=int, default=60, metavar="K", help="MQTT keepalive, seconds")
    m.add_argument("--tls", action="store_true", help="MQTT over TLS (mqtts); the server's name is checked")
    m.add_argument("--cafile", metavar="FILE", default="",
                   help="PEM CAs the server's certificate chains to (with --tls; default: the system's)")
    m.add_argument("--mqtt-version", type=int, choices=(4, 5), default=4, metavar="{4,5}",
                   help="4: MQTT 3.1.1 (default); 5: MQTT 5.0, whose PUBACKs say why a reading was refused "
                        "(counted by reason code and Reason String)")
    m.add_argument("--problem-info", action=argparse.BooleanOptionalAction, default=True,
                   help="MQTT 5 Request Problem Information: the server may send Reason Strings "
                        "(default on; --no-problem-info asks it not to)")
    m.add_argument("--mux", action=argparse.BooleanOptionalAction, default=True,
                   help="one task per process serves every plain-TCP device on one epoll (default); "
                        "--no-mux: a reader and a sender task per device, as with --tls")
    w.add_argument("--keepalive", type=_positive_int, default=60, metavar="K",
                   help="send a WebSocket ping when nothing was sent for K/2 seconds")
    w.add_argument("--mux", action=argparse.BooleanOptionalAction, default=True,
                   help="one task per process serves every device on one epoll (default); "
                        "--no-mux: a reader and a sender task per device")
    return parser


def _common(m: argparse.ArgumentParser) -> None:
    m.add_argument("--target", type=_target, required=True, metavar="HOST:PORT")
    m.add_argument("--devices", type=_positive_int, required=True, metavar="N")
    m.add_argument("--duration", type=_positive_float, required=True, metavar="S")
    m.add_argument("--rate", type=_non_negative_float, default=0.0, metavar="R",
                   help="readings/s over the whole fleet; 0 = closed loop, as fast as acks allow")
    m.add_argument("--inflight", type=_positive_int, default=10, metavar="W",
                   help="unacknowledged messages (HTTP: pipelined requests) per device")
    m.add_argument("--batch", type=_positive_int, default=1, metavar="K", help="readings per message")
    m.add_argument("--procs", type=_positive_int, default=1, metavar="P", help="worker processes")
    m.add_argument("--source-ips", metavar="A-B", help="spread connections over these loopback addresses")
    m.add_argument("--payload", choices=("json", "msgpack"), default="json")
    m.add_argument("--idle", action="store_true", help="connect and send keepalives only")
    m.add_argument("--connect-rate", type=_non_negative_float, default=0.0, metavar="C",
                   help="new connections per second over the fleet (with jitter); 0 = all at once")
    m.add_argument("--client-prefix", default="loadgen", help="client ids are PREFIX-000000 ...")
    m.add_argument("--json", metavar="FILE", help="write the results (and the merged histogram) as JSON")
    m.add_argument("--reconnect", action=argparse.BooleanOptionalAction, default=True,
                   help="after a drop or a refused connect, back off and connect again (default); "
                        "--no-reconnect: such a device stops")
    m.add_argument("--backoff-min", type=_positive_float, default=0.1, metavar="B",
                   help="bound of the first wait after a drop or failure, doubled per failure (default 0.1 s)")
    m.add_argument("--backoff-max", type=_positive_float, default=5.0, metavar="M",
                   help="cap of the wait's bound (default 5 s); each wait is uniform in [0, bound)")


def _plans(args: argparse.Namespace, sources: tuple[str, ...]) -> list[RunPlan]:
    host, port = args.target
    device = DeviceOptions(
        host=host, port=port, qos=getattr(args, "qos", 1), inflight=args.inflight, batch=args.batch,
        rate_per_device=args.rate / args.devices, payload=args.payload, idle=args.idle,
        keepalive=getattr(args, "keepalive", 60), client_prefix=args.client_prefix, protocol=args.protocol,
        reconnect=args.reconnect, backoff_base=args.backoff_min, backoff_max=args.backoff_max,
        tls=getattr(args, "tls", False), cafile=getattr(args, "cafile", ""),
        mqtt_version=getattr(args, "mqtt_version", 4), problem_info=getattr(args, "problem_info", True),
        mux=getattr(args, "mux", True))
    plans, first = [], 0
    for p in range(args.procs):
        count = args.devices // args.procs + (1 if p < args.devices % args.procs else 0)
        plans.append(RunPlan(device=device, first=first, count=count, duration=args.duration,
                             connect_rate=args.connect_rate / args.procs, source_ips=sources, seed=p + 1))
        first += count
    return plans


class Progress:
    def __init__(self, out=sys.stderr) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last_sent = self.last_acked = 0
        self.seconds = 0

    def show(self, stats: Stats, cpu: float | None) -> None:
        self.seconds += 1
        # p99 alone: each percentile is a pass over the histogram's counts in
        # Python, which every second cost the ws load generator ~8% of its CPU
        h = stats.histogram
        p99 = h.get_value_at_percentile(99.0) / 1000.0 if h.get_total_count() else None
        line = (f"t={self.seconds}s connected={stats.connected}/{stats.devices} "
                f"sent/s={stats.sent - self.last_sent} acked/s={stats.acked - self.last_acked} "
                f"p99={'-' if p99 is None else f'{p99:.1f}ms'} errors={stats.errors}"
                + ("" if cpu is None else f" loadgen-cpu={cpu:.0%}"))
        self.last_sent, self.last_acked = stats.sent, stats.acked
        if self.tty:
            self.out.write("\r" + line.ljust(100))
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")


async def _run_local(plan: RunPlan, progress: Progress) -> tuple[Stats, list[str]]:
    stats, check = Stats(), SelfCheck()
    await run_share(plan, stats, check, lambda: progress.show(stats, check.cpu))
    return stats, check.warnings()


async def _run_workers(plans: list[RunPlan], progress: Progress) -> tuple[Stats, list[str]]:
    latest: list[Stats] = [Stats() for _ in plans]
    final: list[Stats | None] = [None] * len(plans)
    warnings: list[str] = []

    async def worker(i: int, plan: RunPlan) -> None:
        payload = json.dumps(dataclasses.asdict(plan))
        proc = await trio.lowlevel.open_process([sys.executable, "-m", "loadgen.worker", payload],
                                                stdout=subprocess.PIPE)
        buf = b""
        try:
            assert proc.stdout is not None
            while True:
                chunk = await proc.stdout.receive_some(1 << 20)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    kind, _, body = line.decode().partition(" ")
                    if kind == "S":
                        latest[i] = Stats.from_wire(body)
                    elif kind == "F":
                        final[i] = Stats.from_wire(body)
                    elif kind == "W":
                        warnings.extend(f"worker {i}: {w}" for w in json.loads(body))
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        if proc.returncode != 0 or final[i] is None:
            raise RuntimeError(f"loadgen worker {i} failed (exit code {proc.returncode})")

    async def show() -> None:
        while True:
            await trio.sleep(1)
            merged = Stats()
            for s in latest:
                merged.merge(s)
            progress.show(merged, None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(show)
        async with trio.open_nursery() as workers:
            for i, plan in enumerate(plans):
                workers.start_soon(worker, i, plan)
        nursery.cancel_scope.cancel()
    total = Stats()
    for s in final:
        assert s is not None
        total.merge(s)
    return total, warnings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sources = parse_ip_range(args.source_ips) if args.source_ips else ()
    except ValueError as exc:
        parser.error(str(exc))
    if args.procs > args.devices:
        parser.error(f"--procs {args.procs} is more than --devices {args.devices}")
    if getattr(args, "cafile", "") and not args.tls:
        parser.error("--cafile needs --tls")
    if not getattr(args, "problem_info", True) and args.mqtt_version != 5:
        parser.error("--no-problem-info is an MQTT 5 request: add --mqtt-version 5")
    if args.backoff_min > args.backoff_max:
        parser.error(f"--backoff-min {args.backoff_min:g} is more than --backoff-max {args.backoff_max:g}")
    fd_limit = raise_open_file_limit()
    problems = check_capacity(args.devices, args.procs, fd_limit, len(sources))
    if problems:
        for p in problems:
            print(f"gridgate-loadgen: {p}", file=sys.stderr)
        return EXIT_USAGE
    plans = _plans(args, sources)
    progress = Progress()
    if args.procs == 1:
        stats, warnings = trio.run(_run_local, plans[0], progress)
    else:
        parent_cpu = process_cpu_s()
        stats, warnings = trio.run(_run_workers, plans, progress)
        # the workers measured their own runs; the parent's merging counts too
        stats.cpu_s += process_cpu_s() - parent_cpu
    progress.end()
    busy = cpu_bottleneck_warning(stats.cpu_shares)
    if busy is not None:
        warnings.append(busy)
    print(stats.table())
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        result = {"protocol": args.protocol, "target": f"{args.target[0]}:{args.target[1]}",
                  "options": {k: v for k, v in vars(args).items() if k not in ("target", "json")},
                  **stats.summary(), "warnings": warnings,
                  "histogram": stats.histogram.encode().decode("ascii")}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
