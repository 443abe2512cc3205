"""Run a share of the fleet in this process, and watch the load generator
itself: a loop that lags its schedule, or a process at 100% CPU, means the
numbers describe the load generator rather than the server."""
from __future__ import annotations

import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from loadgen.connect import open_tcp
from loadgen.device import Device, DeviceOptions, drive
from loadgen.http_device import HttpDevice
from loadgen.mqtt_device import MqttDevice
from loadgen.mqtt_mux import Mux, MuxDevice, drive_muxed
from loadgen.stats import Stats
from loadgen.ws_device import WsDevice
from loadgen.ws_mux import WsMuxDevice

__all__ = ["RunPlan", "run_share", "run_device", "SelfCheck", "DEVICE_KINDS", "process_cpu_s", "uses_mux"]

# DeviceOptions.protocol -> the kind of device that speaks it
DEVICE_KINDS: dict[str, type[Device]] = {"mqtt": MqttDevice, "http": HttpDevice, "ws": WsDevice}


@dataclass(frozen=True)
class RunPlan:
    device: DeviceOptions
    first: int                      # index of this share's first device
    count: int
    duration: float
    connect_rate: float = 0.0       # new connections per second in this share; 0 = all at once
    source_ips: tuple[str, ...] = ()
    seed: int = 1


@dataclass
class SelfCheck:
    seconds: int = 0
    cpu_saturated: int = 0          # seconds at >= 95% of one core
    lagging: int = 0                # seconds whose loop lag exceeded 100 ms
    max_lag_ms: float = 0.0
    cpu: float = 0.0                # last second's CPU share
    _last_cpu: float = field(default=0.0, repr=False)

    def warnings(self) -> list[str]:
        out = []
        if self.cpu_saturated:
            out.append(f"load generator at 100% CPU in {self.cpu_saturated} of {self.seconds} s: "
                       f"it is (part of) the bottleneck; use --procs or fewer devices")
        if self.lagging:
            out.append(f"load generator loop lagged its schedule by up to {self.max_lag_ms:.0f} ms in "
                       f"{self.lagging} of {self.seconds} s: its timings are not the server's")
        return out


async def _monitor(check: SelfCheck, tick: Callable[[], None] | None) -> None:
    check._last_cpu = time.process_time()
    while True:
        worst = 0.0
        for _ in range(10):
            before = trio.current_time()
            await trio.sleep(0.1)
            worst = max(worst, trio.current_time() - before - 0.1)
        cpu_now = time.process_time()
        check.cpu = cpu_now - check._last_cpu
        check._last_cpu = cpu_now
        check.seconds += 1
        check.max_lag_ms = max(check.max_lag_ms, worst * 1000)
        if check.cpu >= 0.95:
            check.cpu_saturated += 1
        if worst > 0.1:
            check.lagging += 1
        if tick is not None:
            tick()


async def run_device(index: int, opts: DeviceOptions, stats: Stats, start: float, deadline: float,
                     local_address: str | None = None, rng: random.Random | None = None,
                     mux: Mux | None = None) -> None:
    """Run device ``index`` of the kind ``opts.protocol`` names until ``deadline``
    (its connections served by ``mux`` when there is one)."""
    if mux is not None:
        muxed = (WsMuxDevice if opts.protocol == "ws" else MuxDevice)(index, opts, stats, local_address)
        await drive_muxed(muxed, mux, start, deadline, rng or random.Random(index))  # type: ignore[arg-type]
        return
    device = DEVICE_KINDS[opts.protocol](index, opts, stats, local_address)
    await drive(device, start, deadline, rng or random.Random(index))


def uses_mux(opts: DeviceOptions) -> bool:
    """Whether one task serves this process's devices (``loadgen.mqtt_mux``):
    plain-TCP MQTT and WebSocket over real sockets (a test that puts an
    in-memory server behind ``Device.open_stream`` keeps the per-device tasks)."""
    kind = DEVICE_KINDS.get(opts.protocol)
    return (opts.protocol in ("mqtt", "ws") and opts.mux and not opts.tls and kind is not None
            and kind.open_stream is open_tcp)


async def _steady_window(plan: RunPlan, stats: Stats, deadline: float) -> None:
    """Add this process's CPU and readings from when all its devices were
    first connected until the deadline to ``stats.steady_*`` (nothing if
    they never all were: a ramp longer than the run, a refusing server)."""
    if plan.device.idle:
        return
    while stats.connected < plan.count:
        if trio.current_time() >= deadline:
            return
        await trio.sleep(0.05)

    def readings() -> int:
        return stats.acked if plan.device.qos or plan.device.protocol != "mqtt" else stats.sent

    cpu0, n0 = process_cpu_s(), readings()
    try:
        await trio.sleep_until(deadline)
    finally:
        stats.steady_cpu_s += process_cpu_s() - cpu0
        stats.steady_readings += readings() - n0


def process_cpu_s() -> float:
    """User + system CPU seconds this process (all its threads) has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_share(plan: RunPlan, stats: Stats, check: SelfCheck,
                    tick: Callable[[], None] | None = None) -> None:
    """Run devices ``plan.first .. plan.first + plan.count - 1`` for ``plan.duration`` s.

    Adds this process's CPU over the run (connects, sending, the drain of the
    last acks and the progress ticks) to ``stats.cpu_s`` and its share of a
    core to ``stats.cpu_shares``."""
    cpu_start = process_cpu_s()
    stats.devices += plan.count
    start = trio.current_time()
    deadline = start + plan.duration
    rng = random.Random(plan.seed)
    async with trio.open_nursery() as nursery:
        monitor = trio.CancelScope()

        async def run_monitor() -> None:
            with monitor:
                await _monitor(check, tick)

        nursery.start_soon(run_monitor)
        steady = trio.CancelScope()

        async def run_steady() -> None:
            with steady:
                await _steady_window(plan, stats, deadline)

        nursery.start_soon(run_steady)
        async with trio.open_nursery() as devices:
            mux = None
            if uses_mux(plan.device):
                mux = Mux(stats, deadline, plan.device.drain_timeout, plan.device.keepalive)
                devices.start_soon(mux.run)
            for n in range(plan.count):
                index = plan.first + n
                local = plan.source_ips[index % len(plan.source_ips)] if plan.source_ips else None
                devices.start_soon(run_device, index, plan.device, stats, start, deadline, local,
                                   random.Random(rng.random()), mux)
                if plan.connect_rate > 0:
                    # Ramp on an absolute timetable with +-50% jitter (no
                    # lockstep storms); a busy loop catches up instead of
                    # drifting further behind with every sleep.
                    await trio.sleep_until(start + (n + rng.uniform(0.5, 1.5)) / plan.connect_rate)
        elapsed = trio.current_time() - start
        stats.elapsed_s = elapsed
        monitor.cancel()
        steady.cancel()         # the devices ended before the deadline (they stopped): the window ends now
    cpu = process_cpu_s() - cpu_start
    stats.cpu_s += cpu
    stats.cpu_shares.append(cpu / elapsed if elapsed > 0 else 0.0)
