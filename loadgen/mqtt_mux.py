"""Many plain-TCP MQTT devices driven by one task per process (the fleet shape).

With one reader and one sender task per device, a device at one reading in
flight costs two Trio task wake-ups per reading, and the load generator, not
the server, was the bottleneck of the 1,000 devices x 1 in flight shape
(80-95 us of its CPU per reading). Here every connected device's
non-blocking socket sits in one ``select.epoll``; one task waits for it with
``trio.lowlevel.wait_readable`` and, per wake-up, reads every ready socket,
counts its PUBACKs, records their latencies and sends the device's next
readings in the same pass. A reading costs a ``recv``, a ``send`` and a few
dict operations, whatever the number of devices.

What each device does is unchanged: the frames, the ack parsing, the
window, the closed- and open-loop schedules (latency from the intended send
time), keepalive pings, the drain of the last acks and DISCONNECT at the
end. Connecting (with CONNACK refusals, backoff and reconnects, replay of
what a drop left owed) stays in one small task per device, which sleeps
while the mux runs its connection and wakes only when it ends.

Used for ``mqtt`` without ``--tls`` and for ``ws`` (``DeviceOptions.mux``;
the ws device is ``loadgen.ws_mux.WsMuxDevice``); TLS needs a
per-connection ``SSLObject`` whose reads and writes are not one syscall, and
http keeps its per-device driver. The mux asks a device only for its
frames (``_frames``), what a read means (``take_read``: acks counted,
answers owed), a keepalive (``ping_bytes``) and its ``goodbye``.

Measured on 2 shared cores (load 6-8), --procs 2, QoS 1, CPU per acked
reading once every device had connected: 1,000 x 1 against mosquitto 26 us
with the mux, 56 with --no-mux; against gridgate 33 and 60; 100 x 10
against gridgate 4.4 and 6.3. About half of the fleet shape's remaining cost
is the kernel's loopback send, one per reading.
"""
from __future__ import annotations

import heapq
import random
import select
import socket

import trio

from loadgen.device import connection_loop, device_schedule
from loadgen.mqtt_device import MqttDevice, RawSocketStream
from loadgen.schedule import Schedule
from loadgen.stats import Stats

__all__ = ["MuxDevice", "Mux", "drive_muxed"]

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_PINGREQ = b"\xc0\x00"
_MAX_EVENTS = 1024


class MuxSlot:
    """What the ``Mux`` keeps on each device it runs (a mixin before the device's kind)."""

    sock: socket.socket | None = None
    schedule: Schedule | None = None
    done: trio.Event
    clean = False
    out = b""                       # bytes the kernel did not take yet (bounded by the window)
    wake_at: float | None = None    # the open-loop due this device sits in the mux's heap for
    pong_due: float | None = None   # a keepalive's answer is owed by then (ws; MQTT's is not awaited)

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.done = trio.Event()


class MuxDevice(MuxSlot, MqttDevice):
    """An ``MqttDevice`` whose connection the ``Mux`` runs."""

    def take_read(self, data: bytes, now: float) -> bytes:
        """Count the PUBACKs of one read; nothing to answer."""
        if len(data) == 4 and data[0] == 0x40 and data[1] == 2 and not self._buf:
            # the fleet shape's usual read: one whole PUBACK, counted without
            # take_acks' general pass (a third of the loadgen's Python time)
            due = self.inflight.pop((data[2] << 8) | data[3], None)
            if due is not None:
                batch = self.opts.batch
                self.stats.acked += batch
                self.stats.histogram.record_value(min(max(int((now - due) * 1e6), 1), 60_000_000), batch)
        else:
            self.take_acks(data, now)
        return b""

    def ping_bytes(self, now: float) -> bytes:
        return _PINGREQ


class Mux:
    """One process's devices on one epoll, served by ``run``."""

    def __init__(self, stats: Stats, deadline: float, drain_timeout: float, keepalive: int) -> None:
        self.stats = stats
        self.deadline = deadline
        self.drain_timeout = drain_timeout
        self.ping_interval = max(keepalive / 2, 0.5)
        self.epoll = select.epoll()
        self.devices: dict[int, MuxDevice] = {}       # fd -> device
        self.hungry: set[MuxDevice] = set()           # closed-loop QoS 0: always ready to send more
        self.timers: list[tuple[float, int, MuxDevice]] = []   # open-loop dues (heap)
        self._seq = 0
        self.draining = False
        self.finished = False
        # the mux's current wait: a device that joins cancels it, so its
        # first open-loop due or a fleet's first socket is not missed
        self._wait: trio.CancelScope | None = None

    # -- the device tasks' side -------------------------------------------------

    async def run_connection(self, dev: MuxDevice, stream: RawSocketStream) -> bool:
        """Serve ``dev`` on ``stream`` until the run ends (True: cleanly) or the
        connection drops (False). The socket is closed when this returns."""
        sock = stream.socket
        dev.sock, dev.out, dev.clean = sock, b"", False
        dev.done = trio.Event()
        if self.draining or self.finished:
            # connected after the deadline: nothing to send, end it politely
            self._goodbye(dev, sock)
            sock.close()
            return True
        fd = sock.fileno()
        self.devices[fd] = dev
        self.epoll.register(fd, _IN)
        dev.last_send = now = trio.current_time()
        dev.pong_due = None
        self._take(dev, b"", now)       # what came with the handshake (a ws command)
        if dev.sock is not None:
            self._fill(dev, now)
        if self._wait is not None:
            self._wait.cancel()
        try:
            await dev.done.wait()
        finally:
            if dev.sock is not None:        # cancelled: the mux did not end it
                self._forget(dev)
        return dev.clean

    # -- the mux task ---------------------------------------------------------------

    async def run(self) -> None:
        """Serve every device until the deadline, then drain (bounded) and end each one cleanly."""
        next_ping = trio.current_time() + self.ping_interval
        drain_until = self.deadline + self.drain_timeout
        try:
            while True:
                now = trio.current_time()
                if not self.draining and now >= self.deadline:
                    self.draining = True
                    self.hungry.clear()
                    self.timers.clear()
                    for dev in list(self.devices.values()):
                        if self._finished(dev):
                            self._end(dev)
                if self.draining and (not self.devices or now >= drain_until):
                    for dev in list(self.devices.values()):
                        self._end(dev)
                    return
                if now >= next_ping:
                    self._ping(now)
                    next_ping = now + self.ping_interval
                timers = self.timers
                while timers and timers[0][0] <= now:
                    _, _, dev = heapq.heappop(timers)
                    if dev.wake_at is not None and dev.sock is not None and not self.draining:
                        dev.wake_at = None
                        self._fill(dev, now)
                for dev in list(self.hungry):
                    if not dev.out and dev.sock is not None:
                        self._fill(dev, now)
                self._poll(now)
                if self.hungry or (self.draining and not self.devices):
                    # more to send now, or the last device just ended: no waiting
                    await trio.lowlevel.checkpoint()
                    continue
                wake = min(next_ping, drain_until if self.draining else self.deadline)
                if timers:
                    wake = min(wake, timers[0][0])
                # One cancel scope for as many waits as come before ``wake``: a
                # scope per wait (made, entered, left) cost more than a read of
                # acks when only a few devices are ready at each wake-up
                with trio.move_on_at(wake) as self._wait:
                    while True:
                        await trio.lowlevel.wait_readable(self.epoll.fileno())
                        now = trio.current_time()
                        self._poll(now)
                        if self.hungry or (self.draining and not self.devices) or (timers and timers[0][0] < wake):
                            break       # what the loop above does now: fill, end, or wait less
                self._wait = None
        finally:
            self.finished = True
            for dev in list(self.devices.values()):
                self._forget(dev)
            self.epoll.close()

    def _poll(self, now: float) -> None:
        devices = self.devices
        for fd, ev in self.epoll.poll(0, _MAX_EVENTS):
            dev = devices.get(fd)
            if dev is None:
                continue
            if ev & _OUT and dev.out:
                self._flush(dev)
                if dev.sock is None:
                    continue
            if ev & ~_OUT:              # readable, or an error or hang-up a recv will report
                self._read(dev, now)

    def _read(self, dev: MuxDevice, now: float) -> None:
        assert dev.sock is not None
        try:
            data = dev.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(dev)
            return
        if not data:
            self._drop(dev)
            return
        if not self._take(dev, data, now):
            return
        if not self.draining:
            self._fill(dev, now)
        elif self._finished(dev):
            self._end(dev)

    def _take(self, dev: MuxDevice, data: bytes, now: float) -> bool:
        """``dev``'s read taken and its answers written; False if that ended the connection."""
        try:
            answers = dev.take_read(data, now)
        except ConnectionError:         # the server closed it (a ws close frame)
            self._drop(dev)
            return False
        if answers:
            self._write(dev, answers)
        return dev.sock is not None

    @staticmethod
    def _finished(dev: MuxDevice) -> bool:
        """Whether a draining device is done: everything written (what is
        counted as sent must reach the wire) and, with acks, acknowledged."""
        return not dev.out and (not dev.inflight or not dev.windowed)

    def _fill(self, dev: MuxDevice, now: float) -> None:
        """Send what ``dev``'s window and schedule allow now (the per-device
        ``Device.sender``'s rules: replay first, then closed loop fills the
        window, open loop takes the readings that fell due)."""
        opts, stats = dev.opts, self.stats
        if opts.idle:
            return
        window = opts.inflight
        free = window - len(dev.inflight) if dev.windowed else window
        if free <= 0:
            return
        schedule = dev.schedule
        dues = dev.take_dues(schedule, free, now)
        if schedule is None:
            if not dev.windowed:
                self.hungry.add(dev)
        else:
            if len(dues) < free:
                # the window has room: wake at the next due (once per due)
                due = schedule.next_due()
                if dev.wake_at != due:
                    dev.wake_at = due
                    self._seq += 1
                    heapq.heappush(self.timers, (due, self._seq, dev))
            if not dues:
                return
        frames = dev._frames(dues)
        stats.sent += len(dues) * opts.batch
        dev.last_send = now
        self._write(dev, frames)

    def _write(self, dev: MuxDevice, data: bytes) -> None:
        if dev.out:
            dev.out += data
            return
        assert dev.sock is not None
        try:
            sent = dev.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(dev)
            return
        if sent < len(data):
            dev.out = data[sent:]
            self.epoll.modify(dev.sock.fileno(), _IN | _OUT)

    def _flush(self, dev: MuxDevice) -> None:
        assert dev.sock is not None
        try:
            sent = dev.sock.send(dev.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(dev)
            return
        dev.out = dev.out[sent:]
        if not dev.out:
            self.epoll.modify(dev.sock.fileno(), _IN)
            if self.draining and self._finished(dev):
                self._end(dev)

    def _ping(self, now: float) -> None:
        for dev in list(self.devices.values()):
            if dev.pong_due is not None and now > dev.pong_due:
                self._drop(dev)         # no answer to the last keepalive: the connection is dead
            elif now - dev.last_send >= self.ping_interval:
                dev.last_send = now
                self._write(dev, dev.ping_bytes(now))

    @staticmethod
    def _goodbye(dev: MuxDevice, sock: socket.socket) -> None:
        try:
            sock.send(dev.goodbye)
        except OSError:
            pass

    def _forget(self, dev: MuxDevice) -> None:
        sock = dev.sock
        if sock is None:
            return
        dev.sock = None
        self.hungry.discard(dev)
        dev.wake_at = None
        fd = sock.fileno()
        if self.devices.get(fd) is dev:
            del self.devices[fd]
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass
        sock.close()

    def _end(self, dev: MuxDevice) -> None:
        """The run is over for ``dev``: DISCONNECT (if the kernel takes it now) and close."""
        if dev.sock is not None and not dev.out:
            self._goodbye(dev, dev.sock)
        self._forget(dev)
        dev.clean = True
        dev.done.set()

    def _drop(self, dev: MuxDevice) -> None:
        self._forget(dev)
        dev.clean = False
        dev.done.set()


async def drive_muxed(dev: MuxDevice, mux: Mux, start: float, deadline: float, rng: random.Random) -> None:
    """``device.drive`` for a device whose connections the mux runs: connect
    (with backoff), hand the socket over, and after a drop reconnect and
    replay what it owed (``device.connection_loop``)."""
    dev.schedule = device_schedule(dev.opts, start, rng)

    async def serve(stream: RawSocketStream) -> bool:
        assert isinstance(stream, RawSocketStream)
        if dev.opts.idle:
            dev.replay = []
        return await mux.run_connection(dev, stream)

    await connection_loop(dev, dev.schedule, deadline, rng, serve)
