"""gridgate-loadgen: the open-loop schedule, the exact histogram merge,
argument errors; fleets under the autojump clock against an in-memory MQTT
broker, where every count, time and percentile is exact (a stall, an
outage, the offline buffer); and runs over loopback against gridgate (MQTT,
HTTP on both engines, WebSocket) and mosquitto, which must end with every
sent reading acknowledged and every acknowledged reading in the spool."""
from __future__ import annotations

import functools
import http.client
import json
import math
import os
import random
import re
import resource
import socket
import subprocess
import sys
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from binaries import require
from gatewayproc import GatewayProcess, gridgate_env, spool_stats
from loadgen.connect import open_tcp
from loadgen.device import OFFLINE_BUFFER, Backoff, Device, DeviceOptions, drive
from loadgen.limits import check_capacity, parse_ip_range
from loadgen.mqtt_device import MqttDevice, RawSocketStream
from loadgen.runner import RunPlan, SelfCheck, run_share
from loadgen.schedule import Schedule, intended_time
from loadgen.stats import Stats, cpu_bottleneck_warning, new_histogram

LOADGEN = [sys.executable, "-m", "loadgen.cli"]
PERCENTILE_KEYS = ["p50", "p90", "p99", "p99.9", "max"]
# HdrHistogram at 3 significant digits: a recorded value reads back within 0.1%
HDR = 1e-3


def test_open_loop_schedule_is_fixed_in_advance():
    s = Schedule(start=100.0, rate_per_device=4.0, offset=0.1)
    assert [s.advance() for _ in range(4)] == [100.1, 100.35, 100.6, 100.85]
    assert intended_time(0.0, 10.0, 25) == 2.5


def test_histogram_merge_across_processes_is_exact():
    rng = random.Random(5)
    samples = [[rng.randint(1, 5_000_000) for _ in range(5000)] for _ in range(3)]
    parts = []
    for chunk in samples:
        st = Stats(sent=len(chunk), acked=len(chunk))
        for v in chunk:
            st.record_latency_us(v)
        parts.append(Stats.from_wire(st.to_wire()))   # as a worker ships it
    merged = Stats()
    for p in parts:
        merged.merge(p)
    whole = new_histogram()
    for v in (v for chunk in samples for v in chunk):
        whole.record_value(v)
    assert merged.acked == 15000
    assert merged.histogram.get_total_count() == whole.get_total_count()
    for pct in (50, 90, 99, 99.9, 100):
        assert merged.histogram.get_value_at_percentile(pct) == whole.get_value_at_percentile(pct)


def test_cpu_per_reading_is_over_acked_readings_and_merges_across_processes():
    a = Stats(sent=300_000, acked=300_000, cpu_s=1.5, cpu_shares=[0.3])
    b = Stats(sent=100_000, acked=100_000, cpu_s=0.5, cpu_shares=[0.1])
    assert a.cpu_us_per_reading() == pytest.approx(5.0)
    merged = Stats()
    for part in (a, b):
        merged.merge(Stats.from_wire(part.to_wire()))     # as workers ship them
    assert (merged.cpu_s, merged.cpu_shares) == (2.0, [0.3, 0.1])
    assert merged.cpu_us_per_reading() == pytest.approx(5.0)
    summary = merged.summary()
    assert summary["loadgen_cpu_us_per_reading"] == 5.0 and summary["loadgen_cpu_per"] == "acked"
    assert summary["loadgen_cpu_share_per_process"] == [0.3, 0.1]
    assert re.search(r"^loadgen CPU +5\.00 us per acked reading \(2\.00 s user\+sys; 2 processes, busiest 30% "
                     r"of a core\)$", merged.table(), re.MULTILINE), merged.table()
    # nothing acknowledged (MQTT QoS 0): per sent reading
    qos0 = Stats(sent=400_000, cpu_s=1.0, cpu_shares=[0.2])
    assert qos0.cpu_us_per_reading() == pytest.approx(2.5) and qos0.summary()["loadgen_cpu_per"] == "sent"
    # nothing sent (--idle), or nothing measured: no figure rather than a made-up one
    assert Stats(cpu_s=1.0, cpu_shares=[0.2]).cpu_us_per_reading() is None
    assert Stats(sent=10, acked=10).summary()["loadgen_cpu_us_per_reading"] is None
    assert "loadgen CPU" not in Stats(sent=10, acked=10).table()


@pytest.mark.parametrize("shares, expected", [
    ([], None),
    ([0.5], None),
    ([0.85], None),                                       # at the threshold, not above it
    ([0.9], "load generator used 90% of a core over the run (above 85%)"),
    ([0.99, 0.98, 0.97], "load generator used 98% of a core per process on average over 3 processes, "
                         "the busiest 99% over the run"),
    # one busy worker of two: its devices waited for it, though the mean is 60%
    ([0.3, 0.9], "load generator used 60% of a core per process on average over 2 processes, the busiest 90%"),
    ([0.84, 0.8], None),
])
def test_the_load_generator_warns_when_it_is_the_bottleneck(shares, expected):
    warning = cpu_bottleneck_warning(shares)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and warning.startswith(expected)
        assert "likely the bottleneck" in warning and "--procs" in warning


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "0 is not a positive integer"),
    (["--target", "nohost"], "'nohost' is not HOST:PORT"),
    (["--duration", "-1"], "-1 is not a number >= 0"),
    (["--qos", "2"], "invalid choice: 2"),
    (["--rate", "x"], "'x' is not a number"),
    (["--devices", "many"], "'many' is not an integer"),
    (["--procs", "20"], "--procs 20 is more than --devices 10"),
    (["--source-ips", "10.0.0.1-10.0.0.5"], "only loopback addresses (127.0.0.0/8) are allowed"),
    (["--source-ips", "127.0.0.9-127.0.0.2"], "the range ends before it starts"),
    (["--backoff-min", "0"], "0 must be greater than 0"),
    (["--backoff-max", "-2"], "-2 is not a number >= 0"),
    (["--backoff-min", "3", "--backoff-max", "2"], "--backoff-min 3 is more than --backoff-max 2"),
])
def test_argument_errors_are_clear(args, message):
    out = run_with_bad_args("mqtt", args)
    assert out.returncode == 2
    assert message in out.stderr


def run_with_bad_args(subcommand: str, args: list[str]) -> subprocess.CompletedProcess:
    """The loadgen with valid defaults, ``args`` (flag, value pairs) overriding them."""
    base = {"--target": "127.0.0.1:1", "--devices": "10", "--duration": "1"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = [x for kv in base.items() for x in kv]
    return subprocess.run(LOADGEN + [subcommand, *argv], capture_output=True, text=True, timeout=30)


def test_capacity_is_checked_before_connecting():
    assert check_capacity(15000, 2, 20000, 19) == []
    (fds,) = check_capacity(30000, 1, 20000, 2)
    assert fds == ("30000 devices over 1 process(es) is 30000 sockets per process, but one process may open "
                   "20000 files (19936 after a reserve of 64): use --procs 2 or more")
    (ports,) = check_capacity(30000, 2, 20000, 1)
    assert ports.startswith("30000 connections to one target need more than 28000 source ports")
    assert parse_ip_range("127.0.0.2-127.0.0.4") == ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def test_too_many_devices_for_one_process_is_refused_with_advice():
    out = subprocess.run(LOADGEN + ["mqtt", "--target", "127.0.0.1:1", "--devices", "50000", "--duration", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "use --procs" in out.stderr and "--source-ips" in out.stderr


# -- fleets under the autojump clock, on an in-memory broker ---------------------------


def take_packets(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete MQTT packets at the start of ``buf`` as (first byte, body), and the rest."""
    packets = []
    while True:
        length, mult, i = 0, 1, 1
        while i < min(len(buf), 5):         # the remaining length: at most 4 bytes, 7 bits each
            byte = buf[i]
            length += (byte & 0x7F) * mult
            i += 1
            if not byte & 0x80:
                break
            mult *= 128
        else:
            return packets, buf
        if len(buf) < i + length:
            return packets, buf
        packets.append((buf[0], buf[i:i + length]))
        buf = buf[i + length:]


class MemoryBroker:
    """A minimal MQTT 3.1.1 acker put behind ``Device.open_stream``: each
    connection is a ``trio.testing.memory_stream_pair``, so a fleet runs
    under the autojump clock and every time in it is exact.

    It can stall once (the first connection to read at or after ``stall_at``
    stops reading for ``stall_for`` s), stop acking the connections open in
    [``mute_at``, ``drop_at``), drop them at ``drop_at``, and refuse new ones
    in [``drop_at``, ``refuse_until``). ``connects``: when it accepted each.
    """

    def __init__(self, nursery: trio.Nursery, *, stall_at: float = math.inf, stall_for: float = 0.0,
                 mute_at: float = math.inf, drop_at: float = math.inf, refuse_until: float = -math.inf) -> None:
        self.nursery = nursery
        self.stall_at, self.stall_for, self.stalled = stall_at, stall_for, False
        self.mute_at, self.drop_at, self.refuse_until = mute_at, drop_at, refuse_until
        self.connects: list[float] = []

    async def open_stream(self, host: str, port: int, *, local_address: str | None = None) -> trio.abc.Stream:
        now = trio.current_time()
        if self.drop_at <= now < self.refuse_until:
            raise ConnectionRefusedError(111, "Connection refused")
        client, server = trio.testing.memory_stream_pair()
        self.connects.append(now)
        self.nursery.start_soon(self._serve, server, self.drop_at if now < self.drop_at else math.inf)
        return client

    def muted(self) -> bool:
        return self.mute_at <= trio.current_time() < self.drop_at

    async def _serve(self, stream: trio.abc.Stream, drop_at: float) -> None:
        buf = b""
        with trio.move_on_at(drop_at):
            while data := await stream.receive_some(65536):
                if not self.stalled and trio.current_time() >= self.stall_at:
                    self.stalled = True
                    await trio.sleep(self.stall_for)
                packets, buf = take_packets(buf + data)
                acks = []
                for first, body in packets:
                    if first == 0x10:                                           # CONNECT
                        acks.append(b"\x20\x02\x00\x00")
                    elif first & 0xF0 == 0x30 and first & 0x06 and not self.muted():     # PUBLISH, QoS > 0
                        topic_len = (body[0] << 8) | body[1]
                        acks.append(b"\x40\x02" + body[2 + topic_len:4 + topic_len])
                if acks:
                    await stream.send_all(b"".join(acks))
        await stream.aclose()


@pytest.fixture
def broker_factory(nursery, monkeypatch):
    """``broker_factory(**schedule)``: a MemoryBroker every device of the test connects to."""
    def make(**schedule) -> MemoryBroker:
        broker = MemoryBroker(nursery, **schedule)
        monkeypatch.setattr(Device, "open_stream", staticmethod(broker.open_stream))
        return broker
    return make


def latency_ms(stats: Stats) -> dict:
    lat = stats.latency_ms()
    assert list(lat) == PERCENTILE_KEYS
    return lat


async def test_a_stalled_server_shows_in_the_open_loop_percentiles(broker_factory, autojump_clock):
    t0 = trio.current_time()
    broker = broker_factory(stall_at=t0 + 1.0, stall_for=1.0)
    stats, check = Stats(), SelfCheck()
    opts = DeviceOptions(host="broker", port=1883, qos=1, inflight=10, rate_per_device=50.0)
    await run_share(RunPlan(device=opts, first=0, count=4, duration=3.0), stats, check)
    assert trio.current_time() == t0 + 3.0 and stats.elapsed_s == 3.0
    assert broker.connects == [t0] * 4
    # 4 devices x 50/s x 3 s, each acknowledged
    assert (stats.sent, stats.acked, stats.errors, stats.reconnects) == (600, 600, 0, 0)
    assert stats.histogram.get_total_count() == 600
    # The server stopped reading one connection for 1 s, right after a reading
    # due at t_s. Its device sent 10 (its window: due t_s .. t_s + 0.18 s); the
    # 40 due at t_s + 0.2 .. 0.98 waited for acks, and went out late, at t_s + 1 s.
    assert stats.behind == 40
    # All 50 were acked at t_s + 1 s: measured from their intended send times,
    # they waited 1000, 980, ..., 20 ms (not just the 10 that were sent: no
    # coordinated omission); every other reading took no time (recorded as
    # 1 us). Of 600 samples: p50 and p90 (the 300th and 540th) are instant; p99
    # is the 594th = the 44th of 20, 40, ..., 1000 ms; p99.9 the 599th; max the 600th.
    lat = latency_ms(stats)
    assert lat == {"p50": 0.001, "p90": 0.001, "p99": pytest.approx(880, rel=HDR),
                   "p99.9": pytest.approx(980, rel=HDR), "max": pytest.approx(1000, rel=HDR)}
    assert stats.histogram.get_count_at_value(1) == 550


class MidRandom(random.Random):
    """Every jitter at its midpoint: a device's schedule offset is half a
    period and each backoff is exactly min(backoff_max, backoff_base * 2**n) / 2."""

    def random(self) -> float:
        return 0.5

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


# One device, 16 readings/s due at (k + 0.5) / 16 s; the broker acks those of
# [0, 0.5) (8), holds back those of [0.5, 1.0) (8, unacked at the drop), drops
# the connection at 1.0 and refuses until `back`. Full jitter at its midpoint
# with base 0.5 and cap 2.0: waits of 0.25, 0.5, 1.0, 1.0, ... s, so tries at
# 1.25, 1.75, 2.75, 3.75, 4.75, ... until one at or after `back` connects
# (times in quarters of a second: exact in binary, and never a reading's due
# time). On reconnect, what is owed is the 8 unacked readings and those due in
# [1.0, reconnect), at most OFFLINE_BUFFER (500) of them, newest kept; then 16
# more on time until the deadline, reconnect + 1.0.
OUTAGES = [
    # back, reconnect, failed connects, readings owed on reconnect, kept (= replayed), oldest kept
    (3.0, 3.75, 3, 8 + 44, 52, 8.5 / 16),
    (40.0, 40.75, 3 + 37, 8 + 636, OFFLINE_BUFFER, 152.5 / 16),
]


@pytest.mark.parametrize("back, reconnect, failed, owed, kept, oldest", OUTAGES, ids=["2s-outage", "39s-outage"])
async def test_an_offline_device_buffers_and_replays_what_it_owes(broker_factory, autojump_clock, back, reconnect,
                                                                  failed, owed, kept, oldest):
    t0 = trio.current_time()
    broker = broker_factory(mute_at=t0 + 0.5, drop_at=t0 + 1.0, refuse_until=t0 + back)
    stats = Stats()
    opts = DeviceOptions(host="broker", port=1883, qos=1, inflight=1000, rate_per_device=16.0,
                         backoff_base=0.5, backoff_max=2.0)
    await drive(MqttDevice(0, opts, stats, None), t0, t0 + reconnect + 1.0, MidRandom())
    assert trio.current_time() == t0 + reconnect + 1.0
    assert broker.connects == [t0, t0 + reconnect]
    assert (stats.connects, stats.reconnects, stats.errors) == (2, 1, 1 + failed)   # the drop, then the refusals
    assert stats.unacked_at_drop == 8
    assert (stats.dropped, stats.replayed) == (owed - kept, kept)
    assert stats.sent == 8 + 8 + kept + 16
    # what was unacked at the drop was sent twice (unless the buffer dropped it):
    # every reading sent is acked but those
    assert stats.acked == stats.sent - stats.unacked_at_drop == 8 + kept + 16
    # the on-time readings took no time; each replayed one waited from its
    # intended time until the reconnect, the oldest kept the longest
    assert stats.histogram.get_count_at_value(1) == 8 + 16
    assert stats.histogram.get_total_count() == stats.acked
    assert latency_ms(stats)["max"] == pytest.approx((reconnect - oldest) * 1000, rel=HDR)


async def test_without_reconnect_a_dropped_device_stops(broker_factory, autojump_clock):
    t0 = trio.current_time()
    broker = broker_factory(mute_at=t0 + 0.5, drop_at=t0 + 1.0, refuse_until=t0 + 1.5)
    stats = Stats()
    opts = DeviceOptions(host="broker", port=1883, qos=1, inflight=1000, rate_per_device=16.0, reconnect=False)
    await drive(MqttDevice(0, opts, stats, None), t0, t0 + 10.0, MidRandom())
    # it ends at the drop, long before its deadline, and never tries again
    assert trio.current_time() == t0 + 1.0
    assert broker.connects == [t0]
    assert (stats.connects, stats.reconnects, stats.errors, stats.connected) == (1, 0, 1, 0)
    assert (stats.sent, stats.acked, stats.unacked_at_drop, stats.replayed) == (16, 8, 8, 0)


async def test_without_reconnect_a_refused_device_stops(broker_factory, autojump_clock):
    t0 = trio.current_time()
    broker = broker_factory(drop_at=t0, refuse_until=t0 + 1.0)
    stats = Stats()
    opts = DeviceOptions(host="broker", port=1883, qos=1, rate_per_device=16.0, reconnect=False)
    await drive(MqttDevice(0, opts, stats, None), t0, t0 + 10.0, MidRandom())
    assert trio.current_time() == t0 and broker.connects == []
    assert (stats.connects, stats.errors, stats.sent) == (0, 1, 0)


class SeqRandom(random.Random):
    """random() returns the given values in turn (then fails the test)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_backoff_bounds_double_from_base_up_to_the_cap_and_reset():
    backoff = Backoff(0.1, 1.0, SeqRandom([1.0 - 1e-12] * 7 + [0.5]))
    bounds = []
    for _ in range(7):
        bounds.append(backoff.bound())
        assert backoff.next_delay() == pytest.approx(bounds[-1], rel=1e-9)   # random() at its top
    assert bounds == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert backoff.attempt == 7
    backoff.reset()
    assert (backoff.attempt, backoff.bound()) == (0, 0.1)
    assert backoff.next_delay() == pytest.approx(0.05)        # full jitter: random() x bound, from 0


def test_backoff_after_many_failures_stays_at_the_cap():
    backoff = Backoff(0.1, 5.0, SeqRandom([0.25]))
    backoff.attempt = 5000            # 0.1 * 2**5000 is not a float: the bound is the cap
    assert backoff.next_delay() == 1.25


def test_backoff_with_a_seed_is_full_jitter_and_reproducible():
    def delays(seed: int) -> list[float]:
        backoff = Backoff(0.1, 5.0, random.Random(seed))
        return [backoff.next_delay() for _ in range(2000)]

    first = delays(7)
    assert first == delays(7) and first != delays(8)
    # each is uniform(0, min(5, 0.1 * 2**n)): the same draws, scaled by the bound
    reference = random.Random(7)
    assert first == [reference.random() * (0.1 * 2 ** n if n < 6 else 5.0) for n in range(2000)]
    # past the cap (n >= 6), spread over the whole of [0, 5): not clustered
    # around the midpoint as +-50% jitter would be
    capped = first[6:]
    assert 0 <= min(capped) < 0.05 and 4.95 < max(capped) < 5.0
    quarters = [sum(1 for d in capped if q * 1.25 <= d < (q + 1) * 1.25) for q in range(4)]
    assert all(400 <= n <= 600 for n in quarters), quarters


class ChunkStream:
    """What a device reads from: the given chunks, one per receive_some, then EOF."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""


def puback(pid: int) -> bytes:
    return b"\x40\x02" + pid.to_bytes(2, "big")


async def test_acks_are_counted_exactly_however_the_reads_split_them(autojump_clock):
    stats = Stats()
    dev = MqttDevice(0, DeviceOptions(host="x", port=1, qos=1, inflight=100, batch=2), stats, None)
    t0 = trio.current_time()
    dev.inflight.update({1: t0 - 0.5, 2: t0 - 0.5, 3: t0 - 0.25, 4: t0 - 0.125, 300: t0 - 1.0})
    chunks = [
        puback(1) + puback(2) + puback(3)[:2],           # whole PUBACKs, then half of one
        puback(3)[2:] + puback(99),                       # its other half; an ack of nothing in flight
        b"\xd0\x00" + puback(4)[:1],                      # a PINGRESP, then a PUBACK a byte at a time
        puback(4)[1:3], puback(4)[3:] + puback(300),
    ]
    with pytest.raises(ConnectionError, match="server closed the connection"):
        await dev.reader(ChunkStream(chunks))
    assert dev.inflight == {}
    assert stats.acked == 5 * 2                            # 5 acked messages of 2 readings
    assert stats.histogram.get_total_count() == 10
    # no time passed while reading: each latency is its intended time's age
    for ms, count in [(500, 4), (250, 2), (125, 2), (1000, 2)]:
        assert stats.histogram.get_count_at_value(ms * 1000) == count


async def test_raw_socket_stream_sends_everything_and_refuses_a_second_sender():
    a, b = trio.socket.socketpair()
    ours = RawSocketStream(socket.socket(fileno=a.detach()))
    peer = trio.SocketStream(b)
    data = bytes(range(256)) * 16384                       # 4 MiB: more than the kernel's buffers
    received = bytearray()

    async def read_slowly() -> None:
        while len(received) < len(data):
            await trio.sleep(0.001)
            received.extend(await peer.receive_some(1 << 16))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        nursery.start_soon(ours.send_all, data)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await ours.send_all(b"x")
    assert bytes(received) == data
    await peer.send_all(b"ack")
    assert await ours.receive_some(10) == b"ack"
    await peer.aclose()
    assert await ours.receive_some(10) == b""
    await ours.aclose()
    assert ours.socket.fileno() == -1


# -- runs over loopback against real servers ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def gridgate_process(data_dir, *args: str, env: dict[str, str] | None = None):
    """A ``gridgate serve`` child (started and stopped off the event loop); it must exit 0."""
    gw = await trio.to_thread.run_sync(functools.partial(GatewayProcess, data_dir, *args, env=env))
    try:
        yield gw
    finally:
        assert await trio.to_thread.run_sync(gw.stop) == 0, gw.log()


async def run_loadgen(tmp_path, name: str, *args: str) -> dict:
    """``gridgate-loadgen ARGS --json FILE``: its JSON, once its table agrees with it."""
    out_json = tmp_path / f"{name}.json"
    with trio.fail_after(180):
        out = await trio.run_process(LOADGEN + [*args, "--json", str(out_json)], capture_stdout=True,
                                     capture_stderr=True, check=False)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    result = json.loads(out_json.read_text())
    table = out.stdout.decode()
    for row in ("sent", "acked"):
        assert re.search(rf"^{row} +{result[row]}$", table, re.MULTILINE), table
    p999 = result["latency_ms"]["p99.9"]
    assert ("p99.9=-" if p999 is None else f"p99.9={p999:.2f}") in table
    # its own CPU, measured over the run, per acked (or, unacknowledged, sent) reading
    per_reading = result["loadgen_cpu_us_per_reading"]
    readings = result["acked"] or result["sent"]
    assert len(result["loadgen_cpu_share_per_process"]) == result["options"]["procs"]
    if readings:
        assert per_reading > 0 and result["loadgen_cpu_s"] > 0
        # loadgen_cpu_s is rounded to the millisecond: up to 0.5 ms over the readings
        assert per_reading == pytest.approx(result["loadgen_cpu_s"] * 1e6 / readings, abs=500 / readings + 1e-3)
        row = re.search(r"^loadgen CPU +([\d.]+) us per (acked|sent) reading", table, re.MULTILINE)
        assert row and float(row.group(1)) == pytest.approx(per_reading, abs=0.006), table
        assert row.group(2) == result["loadgen_cpu_per"]
    else:
        assert per_reading is None
    return result


def assert_latency_accounted(result: dict, duration: float) -> None:
    """One latency sample per acked reading, percentiles in order and above
    zero; the run lasted at least its duration and its rate is acked/elapsed."""
    lat = result["latency_ms"]
    values = [lat[k] for k in PERCENTILE_KEYS]
    assert values[0] > 0 and values == sorted(values), lat
    assert result["latency_samples"] == result["acked"]
    assert result["elapsed_s"] >= duration
    assert result["readings_per_s"] == pytest.approx(result["acked"] / result["elapsed_s"], rel=1e-3)


async def test_1000_devices_against_gridgate_acked_equals_spool(tmp_path):
    async with gridgate_process(tmp_path / "data") as gw:
        result = await run_loadgen(tmp_path, "gridgate", "mqtt", "--target", f"127.0.0.1:{gw.mqtt[1]}",
                                   "--devices", "1000", "--qos", "1", "--duration", "5")
    assert (result["devices"], result["peak_connected"], result["connects"]) == (1000, 1000, 1000)
    assert (result["errors"], result["reconnects"], result["unacked_at_drop"]) == (0, 0, 0)
    assert result["acked"] == result["sent"] > 0
    assert_latency_accounted(result, 5)
    stored = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert stored["records"] == result["acked"]


async def test_mqtt5_devices_against_gridgate_acked_equals_spool(tmp_path):
    async with gridgate_process(tmp_path / "data") as gw:
        result = await run_loadgen(tmp_path, "gridgate5", "mqtt", "--target", f"127.0.0.1:{gw.mqtt[1]}",
                                   "--devices", "50", "--qos", "1", "--duration", "2", "--mqtt-version", "5")
    assert (result["peak_connected"], result["errors"], result["refusals"]) == (50, 0, {})
    assert result["acked"] == result["sent"] > 0
    assert result["options"]["mqtt_version"] == 5
    assert_latency_accounted(result, 2)
    stored = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert stored["records"] == result["acked"]


@pytest.mark.parametrize("problem_info", [True, False], ids=["reason-strings", "no-problem-info"])
async def test_mqtt5_refusals_are_counted_by_reason_code_and_string(tmp_path, problem_info):
    # the loadgen's readings carry temperature 21.5: over this maximum every one is refused
    conf = tmp_path / "cold.toml"
    conf.write_text("[fields.temperature]\nmin = -40\nmax = 0\n")
    async with gridgate_process(tmp_path / "data", "--config", str(conf)) as gw:
        result = await run_loadgen(tmp_path, "refused", "mqtt", "--target", f"127.0.0.1:{gw.mqtt[1]}",
                                   "--devices", "4", "--qos", "1", "--duration", "1", "--mqtt-version", "5",
                                   *([] if problem_info else ["--no-problem-info"]))
    key = "0x99 out_of_range: temperature" if problem_info else "0x99"
    assert result["acked"] == 0 and result["sent"] > 0
    # every reading answered by the end was refused; those still in flight at the end, not yet
    assert result["refusals"] == {key: result["rejected"]}
    assert 0 < result["rejected"] <= result["sent"] and result["errors"] == result["rejected"]
    stored = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert stored["records"] == 0 and stored["rejected"] >= result["rejected"]     # dead-lettered


def test_no_problem_info_needs_mqtt_5():
    out = subprocess.run(LOADGEN + ["mqtt", "--target", "127.0.0.1:1", "--devices", "1", "--duration", "1",
                                    "--no-problem-info"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "--no-problem-info is an MQTT 5 request: add --mqtt-version 5" in out.stderr


async def test_loadgen_cpu_per_reading_over_two_worker_processes(tmp_path):
    async with gridgate_process(tmp_path / "data") as gw:
        result = await run_loadgen(tmp_path, "procs", "mqtt", "--target", f"127.0.0.1:{gw.mqtt[1]}",
                                   "--devices", "40", "--procs", "2", "--qos", "1", "--duration", "2")
    assert result["acked"] == result["sent"] > 0
    shares = result["loadgen_cpu_share_per_process"]
    assert len(shares) == 2 and all(0 < s for s in shares)
    # the parent's share of the work is counted too: the total is at least the workers' own
    assert result["loadgen_cpu_s"] >= sum(shares) * 2 - 0.01
    assert result["loadgen_cpu_us_per_reading"] > 0


async def wait_for_line(stream: trio.abc.ReceiveStream, marker: bytes, seen: bytearray) -> None:
    """Read ``stream`` into ``seen`` until a line holds ``marker``; fail if it ends first."""
    while marker not in seen:
        chunk = await stream.receive_some(65536)
        if not chunk:
            pytest.fail(seen.decode())
        seen += chunk


async def drain(stream: trio.abc.ReceiveStream) -> None:
    """Keep reading, so a pipe nobody else reads cannot fill and block the writer."""
    while await stream.receive_some(65536):
        pass


@pytest.mark.parametrize("version", ["4", "5"], ids=["mqtt311", "mqtt5"])
async def test_1000_devices_against_mosquitto(tmp_path, nursery, version):
    mosquitto = require("mosquitto")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = await trio.lowlevel.open_process([mosquitto, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        log = bytearray()
        with trio.fail_after(30):
            await wait_for_line(broker.stderr, b" running", log)    # logged once its listener is open
        nursery.start_soon(drain, broker.stderr)
        result = await run_loadgen(tmp_path, "mosquitto", "mqtt", "--target", f"127.0.0.1:{port}",
                                   "--devices", "1000", "--qos", "1", "--duration", "5", "--mqtt-version", version)
    finally:
        broker.terminate()
        with trio.fail_after(10):
            await broker.wait()
    assert (result["peak_connected"], result["errors"], result["reconnects"]) == (1000, 0, 0)
    assert result["acked"] == result["sent"] > 0
    assert_latency_accounted(result, 5)


class WatchedStats(Stats):
    """Stats that wake a task when a counter meets a condition: the outage in
    the restart tests is timed by what the fleet did, not by sleeping."""

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        for watched, condition, event in self.__dict__.get("_waiters", ()):
            if watched == name and condition(value):
                event.set()

    async def until(self, name: str, condition) -> None:
        if condition(getattr(self, name)):
            return
        event = trio.Event()
        self.__dict__.setdefault("_waiters", []).append((name, condition, event))
        await event.wait()


async def run_through_a_restart(data, listen_flag: str, opts_for_port, devices: int, duration: float) -> Stats:
    """``devices`` loadgen devices against a gridgate that is SIGKILLed once
    they have 100 readings acknowledged and restarted on the same port once
    every device has seen the drop."""
    stats, check = WatchedStats(), SelfCheck()
    first = await trio.to_thread.run_sync(GatewayProcess, data)
    port = first.addresses[listen_flag.strip("-")][1]
    servers = [first]

    async def outage() -> None:
        await stats.until("acked", lambda n: n >= 100)
        await trio.to_thread.run_sync(first.kill)                   # SIGKILL mid-stream
        await stats.until("connected", lambda n: n == 0)            # every device saw the drop
        servers.append(await trio.to_thread.run_sync(GatewayProcess, data, listen_flag, f"127.0.0.1:{port}"))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage)
            await run_share(RunPlan(device=opts_for_port(port), first=0, count=devices, duration=duration),
                            stats, check)
            nursery.cancel_scope.cancel()    # (outage is done, or the assertions below say why not)
    finally:
        for server in servers[1:]:
            assert await trio.to_thread.run_sync(server.stop) == 0, server.log()
        await trio.to_thread.run_sync(first.kill)
    assert len(servers) == 2, "the outage never happened"
    return stats


async def assert_replayed_after_the_restart(stats: Stats, data, devices: int) -> None:
    assert (stats.connects, stats.reconnects, stats.peak_connected) == (2 * devices, devices, devices)
    assert stats.errors >= devices                  # each device's drop, then any refused reconnects
    assert stats.replayed > 0 and stats.dropped == 0
    # every send was acknowledged except those in flight at the kill, which were resent
    assert stats.acked == stats.sent - stats.unacked_at_drop
    assert stats.histogram.get_total_count() == stats.acked
    # acknowledged readings are durable; resent ones may be stored twice, and
    # nothing is stored that was not sent
    stored = await trio.to_thread.run_sync(spool_stats, data)
    assert stats.acked <= stored["records"] <= stats.sent


async def test_devices_reconnect_and_replay_after_the_server_restarts(tmp_path):
    data = tmp_path / "data"
    stats = await run_through_a_restart(
        data, "--mqtt", lambda port: DeviceOptions(host="127.0.0.1", port=port, qos=1, inflight=50,
                                                   rate_per_device=20.0, backoff_base=0.05, backoff_max=0.5),
        devices=10, duration=6.0)
    await assert_replayed_after_the_restart(stats, data, 10)


def gridgate_mqtt_connections(gw: GatewayProcess) -> int:
    """The gateway's own count of open MQTT connections (GET /v1/connections)."""
    conn = http.client.HTTPConnection(*gw.http, timeout=10)
    try:
        conn.request("GET", "/v1/connections")
        return int(json.loads(conn.getresponse().read())["by_protocol"].get("mqtt", 0))
    finally:
        conn.close()


async def wait_for_mqtt_connections(gw: GatewayProcess, n: int, within: float) -> None:
    with trio.fail_after(within):
        while await trio.to_thread.run_sync(gridgate_mqtt_connections, gw) < n:
            await trio.sleep(0.1)


async def test_the_cli_fleet_reconnects_with_backoff_after_a_gateway_restart(tmp_path):
    """200 devices over two loadgen processes; the gateway is stopped (SIGTERM,
    as an operator restarts it) once it holds them all, and started again on
    the same ports and data dir: every device reconnects, the new gateway
    holds all 200 again, and every acknowledged reading is in the spool."""
    data, devices = tmp_path / "data", 200
    mqtt_port, http_port = free_port(), free_port()
    ports = ("--mqtt", f"127.0.0.1:{mqtt_port}", "--http", f"127.0.0.1:{http_port}", "--ws", "")
    start = functools.partial(GatewayProcess, data, *ports)
    servers = [await trio.to_thread.run_sync(start)]
    result: dict = {}

    async def fleet() -> None:
        result.update(await run_loadgen(
            tmp_path, "restart", "mqtt", "--target", f"127.0.0.1:{mqtt_port}", "--devices", str(devices),
            "--procs", "2", "--rate", "400", "--inflight", "10", "--duration", "12", "--reconnect",
            "--backoff-min", "0.05", "--backoff-max", "1"))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet)
            await wait_for_mqtt_connections(servers[0], devices, within=30)
            await trio.sleep(1)                                       # readings flowing
            assert await trio.to_thread.run_sync(servers[0].stop) == 0, servers[0].log()
            servers.append(await trio.to_thread.run_sync(start))
            # back within the backoff cap of 1 s plus a connect each, on a loaded machine
            await wait_for_mqtt_connections(servers[1], devices, within=8)
        assert await trio.to_thread.run_sync(servers[1].stop) == 0, servers[1].log()
    finally:
        for server in servers:
            await trio.to_thread.run_sync(server.kill)
    assert result, "the loadgen did not finish"
    # each device connected to the first gateway, dropped once and connected to the second
    assert (result["connects"], result["reconnects"], result["peak_connected"]) == (2 * devices, devices, devices)
    assert result["errors"] >= devices and result["dropped"] == 0
    # readings due while the gateway was down were sent after the reconnect
    assert result["replayed"] > 0
    assert result["acked"] == result["sent"] - result["unacked_at_drop"] > 0
    stored = await trio.to_thread.run_sync(spool_stats, data)
    assert result["acked"] <= stored["records"] <= result["sent"]


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 16_000,
                    reason="needs a hard open-file limit of at least 16,000 (these machines have 20,000)")
async def test_15000_idle_connections_over_two_processes(tmp_path):
    async with gridgate_process(tmp_path / "data") as gw:
        # a fleet ramps up: 15,000 SYNs at once overflow any accept queue. The
        # ramp takes 7.5 s at 2,000/s; the 30 s run leaves room for a slow machine.
        result = await run_loadgen(tmp_path, "idle", "mqtt", "--target", f"127.0.0.1:{gw.mqtt[1]}", "--idle",
                                   "--devices", "15000", "--procs", "2", "--source-ips", "127.0.0.2-127.0.0.20",
                                   "--duration", "30", "--connect-rate", "2000")
        assert gw.alive()
    # every device connected once and none was dropped for the whole run; idle: nothing sent
    assert (result["peak_connected"], result["connects"], result["reconnects"], result["errors"]) == (
        15000, 15000, 0, 0)
    assert (result["sent"], result["acked"], result["latency_samples"]) == (0, 0, 0)


ENGINES = pytest.mark.parametrize("engine", ["fast", "std"], ids=["fast", "std"])


@ENGINES
async def test_http_devices_against_gridgate_acked_equals_spool(tmp_path, engine):
    async with gridgate_process(tmp_path / "data", "--http-engine", engine) as gw:
        result = await run_loadgen(tmp_path, "http", "http", "--target", f"127.0.0.1:{gw.http[1]}",
                                   "--devices", "50", "--inflight", "4", "--batch", "3", "--payload", "msgpack",
                                   "--duration", "3")
    assert (result["protocol"], result["peak_connected"], result["reconnects"]) == ("http", 50, 0)
    assert result["errors"] == 0 and result["acked"] == result["sent"] > 0
    assert result["acked"] % 3 == 0
    assert_latency_accounted(result, 3)
    stored = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert stored["records"] == result["acked"]


@ENGINES
async def test_http_non_2xx_answers_are_errors(tmp_path, engine):
    # every request is over the gateway's body limit: 413 and a close, never an ack
    async with gridgate_process(tmp_path / "data", "--http-engine", engine,
                                env=gridgate_env(GRIDGATE_HTTP_MAX_BODY_BYTES="10")) as gw:
        stats, check = Stats(), SelfCheck()
        opts = DeviceOptions(host="127.0.0.1", port=gw.http[1], protocol="http", inflight=1, rate_per_device=10.0,
                             backoff_base=0.05, backoff_max=0.2)
        await run_share(RunPlan(device=opts, first=0, count=2, duration=1.0), stats, check)
    assert stats.sent > 0 and stats.acked == 0
    assert stats.errors >= stats.sent               # each request's 413 (and then the closed connection)
    assert stats.histogram.get_total_count() == 0 and latency_ms(stats)["p50"] is None
    stored = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert stored["records"] == 0


@pytest.mark.parametrize("payload, mux", [("json", "--mux"), ("msgpack", "--mux"), ("json", "--no-mux")])
async def test_ws_devices_against_gridgate_acked_equals_spool(tmp_path, payload, mux):
    # two of the devices have a config: the gateway pushes it as an UPDATE_CONFIG
    # command on connect, and the loadgen must answer each with a command_ack
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({"loadgen-000000": {"report_interval_s": 5}, "loadgen-000049": {"x": 1}}))
    async with gridgate_process(tmp_path / "data", env=gridgate_env(GRIDGATE_DOWNLINK_DEVICES_FILE=str(devices))) as gw:
        result = await run_loadgen(tmp_path, "ws", "ws", "--target", f"127.0.0.1:{gw.ws[1]}", "--devices", "50",
                                   "--inflight", "4", "--batch", "3", "--payload", payload, "--duration", "3", mux)
        acknowledged = await trio.to_thread.run_sync(gw.metric, 'gridgate_commands_acknowledged_total{protocol="ws"}')
        assert acknowledged == 2
    assert result["protocol"] == "ws" and result["peak_connected"] == 50
    assert result["errors"] == 0 and result["rejected"] == 0
    assert result["acked"] == result["sent"] > 0 and result["acked"] % 3 == 0
    assert_latency_accounted(result, 3)
    assert result["commands"] == 2
    # after a clean end (loadgen drained, gateway stopped gracefully) every acked reading is stored, once
    stored = await trio.to_thread.run_sync(spool_stats, tmp_path / "data")
    assert stored["records"] == result["acked"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "argument --batch: 0 is not a positive integer"),
    (["--inflight", "0"], "argument --inflight: 0 is not a positive integer"),
    (["--payload", "cbor"], "argument --payload: invalid choice: 'cbor'"),
    (["--keepalive", "0"], "argument --keepalive: 0 is not a positive integer"),
    (["--qos", "1"], "unrecognized arguments: --qos 1"),
    (["--target", "127.0.0.1"], "'127.0.0.1' is not HOST:PORT"),
])
def test_ws_argument_errors_are_clear(args, message):
    out = run_with_bad_args("ws", args)
    assert out.returncode == 2
    assert message in out.stderr and "usage: gridgate-loadgen" in out.stderr


async def test_ws_devices_reconnect_and_replay_after_the_server_restarts(tmp_path):
    data = tmp_path / "data"
    stats = await run_through_a_restart(
        data, "--ws", lambda port: DeviceOptions(host="127.0.0.1", port=port, protocol="ws", inflight=50,
                                                 rate_per_device=20.0, backoff_base=0.05, backoff_max=0.5),
        devices=10, duration=6.0)
    await assert_replayed_after_the_restart(stats, data, 10)


async def test_open_tcp_connects_from_the_source_address_and_fails_cheaply_when_refused():
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        stream = await open_tcp("127.0.0.1", port, local_address="127.0.0.5")
        server = await listener.accept()
        assert server.socket.getpeername()[0] == "127.0.0.5"
        await stream.send_all(b"x")
        assert await server.receive_some(1) == b"x"
        await stream.aclose()
        await server.aclose()
        # a name goes through trio.open_tcp_stream, and still connects
        named = await open_tcp("localhost", port)
        await (await listener.accept()).aclose()
        await named.aclose()
    # nothing listens there now: refused, and the socket is not leaked
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(ConnectionRefusedError):
            await open_tcp("127.0.0.1", port, local_address="127.0.0.5")
    assert len(os.listdir("/proc/self/fd")) == fds
