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

The fleet shape's read (one whole PUBACK) is then served in ``_poll``
itself: read into one buffer (``recv_into``: no 64 KiB bytes made and
shrunk per read), the ack counted, its latency tallied by histogram bucket
(``LatencyTally``, flushed to the HdrHistogram every 0.25 s and at the end:
``record_value`` is Python, 2.8 us a call here) and the next reading sent,
with no Python call between the read and the send. Anything else (a partial
or longer read, MQTT 5 reason codes, an open-loop schedule, a replay, bytes
the kernel did not take, the drain) goes the general way. One ``_poll``
pass over 500 loopback devices, each with a PUBACK waiting: 17 -> 12.5 us
per reading, against a floor of 9.5 us for the same reads and sends with no
accounting. Whole runs, same shared box at load 6-8, 3 alternating rounds:
1,000 x 1, --procs 2, loadgen_cpu_us_per_reading_steady 22.4-26.0 -> 17.8-
21.8 us against gridgate and mosquitto; 500 x 1 against mosquitto, /proc
user / sys over seconds 3-8: 9.4-12.9 / 11.5-13.6 -> 7.2-7.8 / 7.6-9.1 us.
What is left is mostly the kernel's send and recv on loopback TCP (about
8-9 us a pair on this VM, conntrack on). The window shape's 5 us, whose one
send and one recv carry 10 readings, is out of reach while each reading
needs a syscall pair of its own (io_uring could batch them across sockets;
Python's standard library has no binding).
"""
from __future__ import annotations

import heapq
import random
import select
import socket

import trio
from hdrh.histogram import HdrHistogram

from loadgen.device import connection_loop, device_schedule
from loadgen.mqtt_device import MqttDevice, RawSocketStream
from loadgen.schedule import Schedule
from loadgen.stats import Stats, new_histogram

__all__ = ["MuxDevice", "Mux", "drive_muxed", "LatencyTally"]

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_PINGREQ = b"\xc0\x00"
_MAX_EVENTS = 1024
_READ_SIZE = 65536
# a PUBLISH's packet id, for each id (2 bytes each, made once)
_PIDS = [pid.to_bytes(2, "big") for pid in range(65536)]
# Stats' HdrHistogram (1 us .. 60 s, 3 significant digits) has 2,048
# sub-buckets of 1 us: a value's bucket is its top 11 bits (LatencyTally)
_SUB_BUCKET_BITS = new_histogram().sub_bucket_count.bit_length() - 1
# how often the tallied latencies reach the histogram (the progress line's p99 lags by at most this)
_FLUSH_INTERVAL = 0.25


class LatencyTally:
    """Latencies (us) counted by the histogram bucket they fall in, added to
    the HdrHistogram in bulk (``flush``). ``HdrHistogram.record_value`` is
    Python (about 2.8 us a call here); at one ack per read it was the largest
    part of the fleet shape's Python time. Exact: a value is kept as the
    lowest value of its bucket (1 us .. 60 s at 3 significant digits: below
    2,048 every value has its own; above, 2,048 buckets per power of two), so
    the histogram's counts, percentiles, min and max are those of recording
    each value (tests/loadgen/test_mqtt_mux_fast.py)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, us: int, count: int) -> None:
        shift = us.bit_length() - _SUB_BUCKET_BITS
        if shift > 0:
            us = us >> shift << shift
        counts = self.counts
        counts[us] = counts.get(us, 0) + count

    def flush(self, histogram: HdrHistogram) -> None:
        record = histogram.record_value
        for us, count in self.counts.items():
            record(us, count)
        self.counts.clear()


class MuxSlot:
    """What the ``Mux`` keeps on each device it runs (a mixin before the device's kind)."""

    sock: socket.socket | None = None
    schedule: Schedule | None = None
    done: trio.Event
    clean = False
    out = b""                       # bytes the kernel did not take yet (bounded by the window)
    wake_at: float | None = None    # the open-loop due this device sits in the mux's heap for
    pong_due: float | None = None   # a keepalive's answer is owed by then (ws; MQTT's is not awaited)
    # MQTT QoS 1, not --idle: the mux's, where its acks' latencies go (None: ws,
    # QoS 0 and idle devices, which never take the fleet shape's fast paths)
    tally: LatencyTally | None = None
    # the mux's tally for every device it runs (ws tallies its acks there: no fast path of _poll's)
    latencies: LatencyTally | None = None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.done = trio.Event()


class MuxDevice(MuxSlot, MqttDevice):
    """An ``MqttDevice`` whose connection the ``Mux`` runs."""

    def take_read(self, data: bytes, now: float) -> bytes:
        """Count the PUBACKs of one read; nothing to answer."""
        if len(data) == 4 and data[0] == 0x40 and data[1] == 2 and not self._buf:
            self.take_puback((data[2] << 8) | data[3], now)
        else:
            self.take_acks(data, now)
        return b""

    def take_puback(self, pid: int, now: float) -> None:
        """The fleet shape's usual read: one whole PUBACK, counted without
        take_acks' general pass, its latency tallied (``LatencyTally``)."""
        due = self.inflight.pop(pid, None)
        if due is not None:
            batch = self.opts.batch
            self.stats.acked += batch
            latency = min(max(int((now - due) * 1e6), 1), 60_000_000)
            if self.tally is not None:
                self.tally.add(latency, batch)
            else:
                self.stats.histogram.record_value(latency, batch)

    def frames_now(self, free: int, now: float) -> bytes:
        """Closed loop with nothing owed: ``free`` readings intended now, put
        in flight (``_frames([now] * free)`` without the list, for one)."""
        if free != 1:
            return self._frames([now] * free)
        inflight = self.inflight
        pid = self.next_pid
        while pid in inflight:
            pid = pid % 65535 + 1
        self.next_pid = pid % 65535 + 1
        inflight[pid] = now
        frame: bytes = self.head + _PIDS[pid] + self.tail
        return frame

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
        self.tally = LatencyTally()
        # every read lands here (recv_into): no 64 KiB bytes made and shrunk per read
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)
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
        if isinstance(dev, MuxDevice) and dev.windowed and not dev.opts.idle:
            dev.tally = self.tally      # and with it _poll's and _fill's fast paths
        dev.latencies = self.tally      # ws: where take_read tallies its acks' latencies
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
        next_flush = trio.current_time() + _FLUSH_INTERVAL
        drain_until = self.deadline + self.drain_timeout
        try:
            while True:
                now = trio.current_time()
                if now >= next_flush:
                    self.tally.flush(self.stats.histogram)
                    next_flush = now + _FLUSH_INTERVAL
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
                if self._can_send_more() or (self.draining and not self.devices):
                    # more to send now, or the last device just ended: no waiting
                    await trio.lowlevel.checkpoint()
                    continue
                wake = min(next_ping, next_flush, drain_until if self.draining else self.deadline)
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
                        if (self._can_send_more() or (self.draining and not self.devices)
                                or (timers and timers[0][0] < wake)):
                            break       # what the loop above does now: fill, end, or wait less
                self._wait = None
        finally:
            self.finished = True
            for dev in list(self.devices.values()):
                self._forget(dev)
            self.epoll.close()
            self.tally.flush(self.stats.histogram)

    def _can_send_more(self) -> bool:
        """Whether a closed-loop QoS 0 device can be sent more now. One whose
        socket is full keeps the rest in ``out`` and waits for EPOLLOUT: with
        every one so, passing over them again and again (a checkpoint and an
        empty ``epoll.poll`` each time) spun the process at a full core while
        the server was the one behind, and took that core from the server it
        measures (QoS 0 against gridgate: 7.1 us of the loadgen's CPU per
        reading, against the server's 3.9). The mux waits on epoll instead."""
        for dev in self.hungry:
            if not dev.out:
                return True
        return False

    def _poll(self, now: float) -> None:
        devices, stats, rbuf = self.devices, self.stats, self._rbuf
        counts = self.tally.counts
        serving = not self.draining
        for fd, ev in self.epoll.poll(0, _MAX_EVENTS):
            dev = devices.get(fd)
            if dev is None:
                continue
            if ev == _IN and serving and dev.tally is not None and not dev._buf and not dev.out:
                # The fleet shape's every read, in line (a Python call costs
                # about 0.2 us here, and this was six of them per reading):
                # one whole PUBACK, counted and its latency tallied (as
                # take_puback and LatencyTally.add), then the window's free
                # slot filled as _fill would (closed loop, nothing owed). Any
                # other read, or state, takes the general path below.
                sock = dev.sock
                assert sock is not None
                try:
                    n = sock.recv_into(rbuf)
                except BlockingIOError:
                    continue
                except OSError:
                    self._drop(dev)
                    continue
                if n != 4 or rbuf[0] != 0x40 or rbuf[1] != 2:
                    if not n:
                        self._drop(dev)
                    elif self._take(dev, self._rview[:n].tobytes(), now):
                        self._fill(dev, now)
                    continue
                inflight = dev.inflight
                due = inflight.pop((rbuf[2] << 8) | rbuf[3], None)
                if due is not None:
                    batch = dev.opts.batch
                    stats.acked += batch
                    us = int((now - due) * 1e6)
                    if us < 1:
                        us = 1
                    elif us > 60_000_000:
                        us = 60_000_000
                    shift = us.bit_length() - _SUB_BUCKET_BITS
                    if shift > 0:
                        us = us >> shift << shift
                    counts[us] = counts.get(us, 0) + batch
                if dev.schedule is not None or dev.replay or len(inflight) != dev.opts.inflight - 1:
                    self._fill(dev, now)
                    continue
                pid = dev.next_pid
                while pid in inflight:
                    pid = pid % 65535 + 1
                dev.next_pid = pid % 65535 + 1
                inflight[pid] = now
                stats.sent += dev.opts.batch
                dev.last_send = now
                frame = dev.head + _PIDS[pid] + dev.tail
                try:
                    sent = sock.send(frame)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._drop(dev)
                    continue
                if sent < len(frame):
                    dev.out = frame[sent:]
                    self.epoll.modify(fd, _IN | _OUT)
                continue
            if ev & _OUT and dev.out:
                self._flush(dev)
                if dev.sock is None:
                    continue
            if ev & ~_OUT:              # readable, or an error or hang-up a recv will report
                self._read(dev, now)

    def _read(self, dev: MuxDevice, now: float) -> None:
        assert dev.sock is not None
        rbuf = self._rbuf
        try:
            n = dev.sock.recv_into(rbuf)
        except BlockingIOError:
            return
        except OSError:
            self._drop(dev)
            return
        if not n:
            self._drop(dev)
            return
        if n == 4 and rbuf[0] == 0x40 and rbuf[1] == 2 and dev.tally is not None and not dev._buf:
            # one whole PUBACK (the fleet shape's every read), not copied out
            dev.take_puback((rbuf[2] << 8) | rbuf[3], now)
        elif not self._take(dev, self._rview[:n].tobytes(), now):
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
        if schedule is None and dev.tally is not None and not dev.replay:
            # closed-loop QoS 1 with nothing owed: the window's free slots, intended now
            stats.sent += free * opts.batch
            dev.last_send = now
            self._write(dev, dev.frames_now(free, now))
            return
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
