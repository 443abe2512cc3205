"""The mux's fleet-shape path (loadgen.mqtt_mux: a read of one whole PUBACK
counted, its latency tallied and the next reading sent in ``Mux._poll``
itself) and the tally its latencies go through (``LatencyTally``): the same
histogram as one ``record_value`` per reading, and exact counts whatever
way the acks arrive (whole, split over two reads, doubled, behind another
packet), against a real TCP acker in this process."""
from __future__ import annotations

import random
import socket
from functools import partial

import pytest
import trio
from hypothesis import given, settings, strategies as st

from loadgen.device import DeviceOptions
from loadgen.mqtt_mux import LatencyTally, Mux
from loadgen.runner import RunPlan, SelfCheck, run_share
from loadgen.stats import HIGHEST_US, Stats, new_histogram

PERCENTILES = (0.0, 1.0, 10.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0)


def assert_same_histogram(a, b) -> None:
    assert list(a.counts) == list(b.counts)
    assert a.get_total_count() == b.get_total_count()
    assert (a.get_min_value(), a.get_max_value()) == (b.get_min_value(), b.get_max_value())
    assert a.get_percentile_to_value_dict(PERCENTILES) == b.get_percentile_to_value_dict(PERCENTILES)
    assert a.get_mean_value() == pytest.approx(b.get_mean_value())
    # what a worker sends its parent
    assert a.encode() == b.encode()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, HIGHEST_US), st.integers(1, 5)), min_size=1, max_size=300),
       st.integers(0, 3))
def test_the_tally_gives_the_histogram_of_recording_each_value(samples, flushes):
    direct, tallied, tally = new_histogram(), new_histogram(), LatencyTally()
    cut = sorted(random.Random(len(samples)).sample(range(len(samples) + 1), min(flushes, len(samples) + 1)))
    for i, (us, count) in enumerate(samples):
        direct.record_value(us, count)
        tally.add(us, count)
        if i in cut:
            tally.flush(tallied)
    tally.flush(tallied)
    assert not tally.counts
    assert_same_histogram(direct, tallied)


def test_the_tally_keeps_values_apart_where_the_histogram_does():
    tally = LatencyTally()
    for us in (1, 2047, 2048, 2049, 2050, 4095, 4096, 4099, 59_999_999):
        tally.add(us, 1)
    # below 2,048 us every value is its own bucket; above, 2,048 buckets per power of two
    assert tally.counts == {1: 1, 2047: 1, 2048: 2, 2050: 1, 4094: 1, 4096: 2, 59_998_208: 1}


async def _acker(stream: trio.SocketStream, log: dict[str, int]) -> None:
    """A QoS 1 acker that answers the n-th PUBLISH of a connection in one of
    four ways: a whole PUBACK; split in two writes; the PUBACK twice (the
    second acks nothing in flight); behind a PINGRESP in one write."""
    buf = b""
    n = 0
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
        while len(buf) >= 2:
            length, mult, i = 0, 1, 1
            while True:
                byte = buf[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            if len(buf) < i + length:
                break
            kind, body, buf = buf[0], buf[i:i + length], buf[i + length:]
            if kind == 0x10:
                await stream.send_all(b"\x20\x02\x00\x00")
            elif kind == 0xC0:
                await stream.send_all(b"\xd0\x00")
            elif kind == 0xE0:
                log["disconnects"] += 1
                return
            elif kind == 0x32:
                topic_len = (body[0] << 8) | body[1]
                ack = b"\x40\x02" + body[2 + topic_len:4 + topic_len]
                log["publishes"] += 1
                way = n % 4
                n += 1
                if way == 0:
                    await stream.send_all(ack)
                elif way == 1:
                    await stream.send_all(ack[:3])
                    await trio.sleep(0.002)
                    await stream.send_all(ack[3:])
                elif way == 2:
                    await stream.send_all(ack)
                    await stream.send_all(ack)
                else:
                    await stream.send_all(b"\xd0\x00" + ack)


@pytest.mark.parametrize("inflight", [1, 3])
async def test_every_ack_is_counted_once_however_it_arrives(inflight):
    log = {"publishes": 0, "disconnects": 0}
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, partial(_acker, log=log), 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        stats, check = Stats(), SelfCheck()
        opts = DeviceOptions(host="127.0.0.1", port=port, qos=1, inflight=inflight, drain_timeout=5)
        await run_share(RunPlan(device=opts, first=0, count=20, duration=1.5), stats, check)
        with trio.fail_after(5):
            while log["disconnects"] < 20:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert (stats.errors, stats.reconnects, stats.connects) == (0, 0, 20)
    # every PUBLISH the acker read was sent once and acked once: the doubled
    # PUBACKs and the PINGRESPs count for nothing
    assert stats.sent == stats.acked == log["publishes"] > 20 * 8
    assert stats.histogram.get_total_count() == stats.acked
    assert stats.histogram.get_value_at_percentile(50) >= 1


async def _connack_then_deaf(stream: trio.SocketStream) -> None:
    """Answer the CONNECT, then never read again: the client's socket fills."""
    await stream.receive_some(65536)
    await stream.send_all(b"\x20\x02\x00\x00")
    await trio.sleep_forever()


async def test_qos0_with_every_socket_full_the_mux_waits_instead_of_spinning(monkeypatch):
    """Closed-loop QoS 0 against a server that stopped reading: once every
    device's socket is full, the mux waits on epoll (woken by its timers)
    rather than passing over the full sockets without end."""
    polls = 0
    real_poll = Mux._poll

    def counting_poll(self, now):
        nonlocal polls
        polls += 1
        real_poll(self, now)

    real_run_connection = Mux.run_connection

    async def small_buffers(self, dev, stream):
        # a few KiB to fill rather than loopback's megabytes: full within a few passes
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return await real_run_connection(self, dev, stream)

    monkeypatch.setattr(Mux, "_poll", counting_poll)
    monkeypatch.setattr(Mux, "run_connection", small_buffers)
    async with trio.open_nursery() as nursery:
        listener = trio.socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # accepted sockets inherit it
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, _connack_then_deaf, [trio.SocketListener(listener)])
        stats, check = Stats(), SelfCheck()
        opts = DeviceOptions(host="127.0.0.1", port=port, qos=0, inflight=10, drain_timeout=0.5)
        await run_share(RunPlan(device=opts, first=0, count=5, duration=1.5), stats, check)
        nursery.cancel_scope.cancel()
    assert stats.connects == 5 and stats.errors == 0
    assert stats.sent > 0
    # Filling five sockets of a few KiB at 10 readings a pass takes a few
    # dozen passes, and the mux's timers (the latency flush every 0.25 s,
    # keepalive pings, the deadline) a dozen more wake-ups in 1.5 s. Spinning
    # over full sockets was tens of thousands of passes in the same time.
    assert polls < 500, polls
