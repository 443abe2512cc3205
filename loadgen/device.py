"""What every simulated device shares, whatever its protocol.

``DeviceOptions`` describes a device; ``Device`` is the base each kind
(``mqtt_device.MqttDevice``, ``http_device.HttpDevice``,
``ws_device.WsDevice``) builds on; ``drive`` runs one device until its
deadline: connect with backoff, send on the closed- or open-loop schedule,
and after a drop reconnect and replay what was owed. The kinds import this
module and never each other; ``runner.run_device`` picks the kind.
"""
from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from loadgen.connect import open_tcp
from loadgen.schedule import Schedule
from loadgen.stats import Stats

__all__ = ["DeviceOptions", "Device", "Backoff", "drive", "OFFLINE_BUFFER", "READING"]

OFFLINE_BUFFER = 500          # readings a device keeps while disconnected (the seed's edge cache)

# The reading every simulated device sends (HTTP devices add their device_id).
READING = {"temperature": 21.5, "battery_mv": 3700, "humidity": 40.0, "location": "loadgen/site-a"}


@dataclass(frozen=True)
class DeviceOptions:
    host: str
    port: int
    qos: int = 1
    inflight: int = 10
    batch: int = 1
    rate_per_device: float = 0.0          # readings/s; 0 = closed loop
    payload: str = "json"
    idle: bool = False
    keepalive: int = 60
    client_prefix: str = "loadgen"
    connect_timeout: float = 10.0
    drain_timeout: float = 10.0
    backoff_base: float = 0.1             # --backoff-min: the first reconnect's bound, doubled per failure
    backoff_max: float = 5.0              # --backoff-max: the cap of that bound
    reconnect: bool = True                # False (--no-reconnect): a drop or refusal ends the device
    protocol: str = "mqtt"                # "mqtt", "http" or "ws"
    tls: bool = False                     # --tls: MQTT over TLS (loadgen.tls)
    cafile: str = ""                      # --cafile: the CAs the server's certificate chains to ("" = system's)
    mqtt_version: int = 4                 # --mqtt-version: 4 (3.1.1) or 5
    problem_info: bool = True             # MQTT 5 Request Problem Information (--no-problem-info: 0)
    mux: bool = True                      # plain-TCP MQTT: one task serves all devices (--no-mux: tasks each)


class Device:
    """The interface ``drive`` runs, and what the kinds have in common.

    A kind implements ``connect() -> stream``; ``reader``, ``pinger`` and
    ``sender`` run together on a stream (``sender`` is shared: it calls
    ``send``, which calls the kind's ``_frames`` unless the kind overrides
    ``send``); then ``drain()``; ``say_goodbye(stream)`` after a clean end;
    ``close(stream)`` always. ``inflight`` (a kind's own container of
    intended send times), ``owed()`` and ``replay`` say what a dropped
    connection owes. ``background`` is a nursery that lives as long as the
    device, for connections that need helper tasks of their own (the
    WebSocket client's reader).
    """

    # How a device opens its TCP connection (``trio.open_tcp_stream``'s
    # signature; ``open_tcp`` connects to an IP address directly, cheaply
    # when refused). A test may put an in-memory server behind it to run a
    # fleet under the autojump clock.
    open_stream = staticmethod(open_tcp)

    goodbye = b""                 # bytes that end a connection cleanly (MQTT: DISCONNECT)
    windowed = True               # False: nothing is acknowledged, so the window never fills (MQTT QoS 0)
    background: trio.Nursery | None = None
    inflight: Any

    def __init__(self, index: int, opts: DeviceOptions, stats: Stats, local_address: str | None) -> None:
        self.opts = opts
        self.stats = stats
        self.local_address = local_address
        self.client_id = f"{opts.client_prefix}-{index:06d}"
        self.replay: list[float] = []               # intended times of readings owed after a drop
        self.ack_event = trio.Event()
        self.last_send = 0.0

    # -- what each kind provides ------------------------------------------------

    async def connect(self) -> Any:
        raise NotImplementedError

    async def reader(self, stream: Any) -> None:
        raise NotImplementedError

    async def pinger(self, stream: Any) -> None:
        raise NotImplementedError

    def _frames(self, dues: list[float]) -> bytes:
        """The bytes of one message per intended time in ``dues``, each put in flight."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------

    async def sender(self, stream: Any, schedule: Schedule | None, deadline: float) -> None:
        opts = self.opts
        window = opts.inflight
        # A full window waits for an ack or the deadline. Not a cancel scope
        # per wait (entering and leaving one cost more CPU than the window's
        # frames): one task sets the current ack_event at the deadline. No
        # checkpoint lies between the deadline check below and the wait, so
        # a wait that starts before the deadline is woken by it.
        bounded = self.background is not None
        if bounded:
            assert self.background is not None
            self.background.start_soon(self._wake_at, deadline)
        while True:
            now = trio.current_time()
            if now >= deadline:
                return
            free = window - len(self.inflight) if self.windowed else window
            if free <= 0:
                self.ack_event = trio.Event()
                if bounded:
                    await self.ack_event.wait()
                else:
                    with trio.move_on_at(deadline):
                        await self.ack_event.wait()
                continue
            dues = self.take_dues(schedule, free, now)
            if not dues:                # open loop, nothing due yet
                assert schedule is not None
                with trio.move_on_at(min(schedule.next_due(), deadline)):
                    await trio.sleep_forever()
                continue
            await self.send(stream, dues)
            self.last_send = now
            if not self.windowed:
                await trio.lowlevel.checkpoint()

    def take_dues(self, schedule: Schedule | None, free: int, now: float) -> list[float]:
        """The intended send times of up to ``free`` readings to send now:
        what a drop left owed first, then in closed loop (no ``schedule``) now
        for the rest of the window, in open loop the readings that fell due
        (counted in ``behind`` when more than 10 ms late). Shared by ``sender``
        and the mux (loadgen/mqtt_mux.py)."""
        opts, stats = self.opts, self.stats
        dues: list[float] = []
        if self.replay:
            dues, self.replay = self.replay[:free], self.replay[free:]
            stats.replayed += len(dues) * opts.batch
        if schedule is None:  # closed loop: as fast as the window allows
            dues.extend([now] * (free - len(dues)))
        else:
            while len(dues) < free and schedule.next_due() <= now:
                due = schedule.advance()
                if now - due > 0.01:
                    stats.behind += opts.batch
                dues.append(due)
        return dues

    async def _wake_at(self, deadline: float) -> None:
        await trio.sleep_until(deadline)
        self.ack_event.set()

    async def send(self, stream: Any, dues: list[float]) -> None:
        """Send one message per intended time in ``dues`` (all in one write)
        and count them in ``stats.sent``.

        Counted before the write: ``_frames`` has put them in flight, so if
        the write fails they are owed (``unacked_at_drop``) and resent, and
        acked == sent - unacked_at_drop holds exactly."""
        frames = self._frames(dues)
        self.stats.sent += len(dues) * self.opts.batch
        await stream.send_all(frames)

    def owed(self) -> list[float]:
        """Intended times of what was sent and not acknowledged."""
        return list(self.inflight.values())

    async def say_goodbye(self, stream: Any) -> None:
        """End a connection cleanly (the caller bounds the time)."""
        if self.goodbye:
            await stream.send_all(self.goodbye)

    async def close(self, stream: Any) -> None:
        await trio.aclose_forcefully(stream)

    async def drain(self) -> None:
        """Wait (bounded) for the acks still owed at the end of the run."""
        with trio.move_on_after(self.opts.drain_timeout):
            while self.inflight:
                self.ack_event = trio.Event()
                await self.ack_event.wait()


class Backoff:
    """Exponential backoff with full jitter (AWS Architecture Blog, "Exponential
    Backoff And Jitter"): the n-th wait since the last good connect is
    ``uniform(0, min(cap, base * 2**n))``.

    Full jitter, not +-50% around the exponential: a fleet that dropped at
    once must not come back in waves at base, 2 base, 4 base ...; spread
    over the whole bound, each attempt's arrivals are as flat as they can be.
    Seeded per device (``rng``), so a run's schedule is reproducible."""

    __slots__ = ("base", "cap", "rng", "attempt")
    base: float
    cap: float
    rng: random.Random
    attempt: int

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base, self.cap, self.rng, self.attempt = base, cap, rng, 0

    def bound(self) -> float:
        """The upper bound of the next wait."""
        # the exponent is capped first: base * 2**1100 is not a float
        return min(self.cap, self.base * (1 << min(self.attempt, 64)))

    def next_delay(self) -> float:
        """The next wait, and one more attempt counted."""
        delay = self.rng.random() * self.bound()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """A connect succeeded: the next drop starts again from ``base``."""
        self.attempt = 0


async def drive(dev: Device, start: float, deadline: float, rng: random.Random) -> None:
    """Run ``dev`` until ``deadline``: connect (with backoff), send, and
    after a drop reconnect and replay what it buffered."""
    async with trio.open_nursery() as background:
        dev.background = background
        await _run_connections(dev, dev.opts, dev.stats, start, deadline, rng)
        background.cancel_scope.cancel()


async def _sleep_before_deadline(delay: float, deadline: float) -> None:
    await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))


async def _run_connections(dev: Device, opts: DeviceOptions, stats: Stats, start: float, deadline: float,
                           rng: random.Random) -> None:
    schedule = device_schedule(opts, start, rng)

    async def serve(stream: Any) -> bool:
        clean = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dev.reader, stream)
                nursery.start_soon(dev.pinger, stream)
                if opts.idle:
                    await trio.sleep_until(deadline)
                else:
                    await dev.sender(stream, schedule, deadline)
                    await dev.drain()
                nursery.cancel_scope.cancel()
            clean = True
            with trio.move_on_after(2):
                await dev.say_goodbye(stream)
        except* (OSError, ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass                    # a drop: counted by connection_loop
        finally:
            await dev.close(stream)
        return clean

    await connection_loop(dev, schedule, deadline, rng, serve)


def device_schedule(opts: DeviceOptions, start: float, rng: random.Random) -> Schedule | None:
    """The open-loop schedule of one device, or None (closed loop, or idle)."""
    if opts.rate_per_device > 0 and not opts.idle:
        # spread devices over the first period so they do not all fire at once
        return Schedule(start, opts.rate_per_device / opts.batch,
                        offset=rng.random() * opts.batch / opts.rate_per_device)
    return None


async def connection_loop(dev: Device, schedule: Schedule | None, deadline: float, rng: random.Random,
                          serve: Callable[[Any], Awaitable[bool]]) -> None:
    """One device's connections until the deadline: connect (with backoff
    after a refusal or a drop), count, let ``serve`` run the connection
    (True: it ended cleanly, the device is done), and after a drop owe again
    what was in flight and reconnect. Shared by the per-device tasks and the
    mux (loadgen/mqtt_mux.py), which differ only in how they serve."""
    opts, stats = dev.opts, dev.stats
    backoff = Backoff(opts.backoff_base, opts.backoff_max, rng)
    was_connected = False
    while trio.current_time() < deadline:
        try:
            stream = await dev.connect()
        except (OSError, ConnectionError, trio.TooSlowError):
            # refused (CONNACK != 0, ECONNREFUSED, a reset) or timed out
            stats.errors += 1
            if not opts.reconnect:
                return
            await _sleep_before_deadline(backoff.next_delay(), deadline)
            continue
        backoff.reset()
        stats.connects += 1
        stats.connected += 1
        stats.peak_connected = max(stats.peak_connected, stats.connected)
        if was_connected:
            stats.reconnects += 1
        was_connected = True
        if schedule is not None:
            _buffer_missed(dev, schedule, stats)
        try:
            clean = await serve(stream)
        finally:
            stats.connected -= 1
        if clean:
            return
        stats.errors += 1
        # dropped: what was in flight is owed again (a real device resends QoS 1)
        stats.unacked_at_drop += len(dev.inflight) * opts.batch
        dev.replay = sorted(dev.replay + dev.owed())[-OFFLINE_BUFFER:]
        dev.inflight.clear()
        if not opts.reconnect:
            return
        # the first wait after a drop is attempt 0 of the ladder: a whole
        # fleet dropped at once spreads over [0, base) before its first try
        await _sleep_before_deadline(backoff.next_delay(), deadline)


def _buffer_missed(dev: Device, schedule: Schedule, stats: Stats) -> None:
    """Readings that fell due while disconnected go to the offline buffer
    (at most OFFLINE_BUFFER; older ones are dropped, as on a real device)."""
    now = trio.current_time()
    missed = []
    while schedule.next_due() <= now:
        missed.append(schedule.advance())
    owed = dev.replay + missed
    if len(owed) > OFFLINE_BUFFER:
        stats.dropped += (len(owed) - OFFLINE_BUFFER) * dev.opts.batch
        owed = owed[-OFFLINE_BUFFER:]
    dev.replay = owed
