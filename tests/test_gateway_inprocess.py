"""The gateway embedded in a Trio program: reaper, keepalive and takeover under
the autojump clock (in-memory streams, no real I/O on the timed path), and the
embedding API with a custom sink over real loopback TCP (real time)."""
from __future__ import annotations

import errno
import json
import logging
import socket

import pytest
import trio
import trio.testing

import gridgate
from gridgate.config import MQTTConfig, PipelineConfig, SinkConfig
from gridgate.gateway import ACCEPT_BURST
from inprocess import GatedSink, MemorySink, connect_memory, make_config, read_exactly, wait_closed
from mqtt_frames import gen_connack, gen_connect, gen_pingreq, gen_pingresp, gen_puback, gen_publish


async def test_silent_connection_is_reaped_after_300s_not_before(autojump_clock, start_gateway, nursery):
    gateway = await start_gateway(MemorySink())
    client = await connect_memory(gateway, nursery, "meter-1")
    connected = trio.current_time()
    with trio.move_on_at(connected + 299.999):
        await wait_closed(client)
        pytest.fail("reaped before 300 s")
    assert len(gateway.conns) == 1
    await wait_closed(client)
    assert trio.current_time() == connected + 300.0
    assert gateway.conns.reaped == 1
    assert len(gateway.conns) == 0


async def test_pingreq_every_60s_keeps_a_connection_for_an_hour(autojump_clock, start_gateway, nursery):
    gateway = await start_gateway(MemorySink())
    client = await connect_memory(gateway, nursery, "meter-2", keepalive=60)
    start = trio.current_time()
    for minute in range(1, 61):
        await trio.sleep_until(start + 60.0 * minute)
        await client.send_all(gen_pingreq())
        assert await read_exactly(client, 2) == gen_pingresp()
    assert trio.current_time() == start + 3600.0
    assert len(gateway.conns) == 1 and gateway.conns.reaped == 0


async def test_keepalive_10_closes_after_15s_of_silence(autojump_clock, start_gateway, nursery):
    gateway = await start_gateway(MemorySink())
    client = await connect_memory(gateway, nursery, "meter-3", keepalive=10)
    # traffic inside the window moves the deadline
    await trio.sleep(14)
    await client.send_all(gen_pingreq())
    assert await read_exactly(client, 2) == gen_pingresp()
    last = trio.current_time()
    await wait_closed(client)
    assert trio.current_time() == last + 15.0
    assert len(gateway.conns) == 0


async def test_takeover_closes_the_older_connection(autojump_clock, start_gateway, nursery):
    gateway = await start_gateway(MemorySink())
    old = await connect_memory(gateway, nursery, "meter-4")
    new = await connect_memory(gateway, nursery, "meter-4")
    taken_over = trio.current_time()
    await wait_closed(old)
    assert trio.current_time() == taken_over       # at once, not at a reaper tick
    assert gateway.conns.taken_over == 1
    assert gateway.conns.get_device("meter-4") is not None
    assert len(gateway.conns) == 1
    await new.send_all(gen_pingreq())
    assert await read_exactly(new, 2) == gen_pingresp()


async def test_clients_connecting_together_are_all_served_and_the_port_closes_with_the_gateway(tmp_path):
    # Real sockets, real time: the backlog and the accept burst are the point.
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="127.0.0.1:0"))
    clients = 300
    assert clients > ACCEPT_BURST + 1           # more than one accept burst
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(gridgate.serve, config, MemorySink())
        address = gateway.addresses["mqtt"]
        # all in the backlog before the gateway gets to accept any of them
        # (a blocking connect to loopback completes in the kernel: no await)
        socks = [socket.create_connection(address) for _ in range(clients)]
        streams = [trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in socks]

        async def handshake(i: int, stream: trio.SocketStream) -> None:
            await stream.send_all(gen_connect(f"meter-{i}"))
            assert await read_exactly(stream, 4) == gen_connack(0)

        with trio.fail_after(30):
            async with trio.open_nursery() as clients_nursery:
                for i, stream in enumerate(streams):
                    clients_nursery.start_soon(handshake, i, stream)
        assert len(gateway.conns) == clients
        for stream in streams:
            await stream.aclose()
        gateway.stop()
    # serve() returned: no duplicate of the listening socket is left open
    probe = socket.socket()
    with probe, pytest.raises(ConnectionRefusedError):
        probe.connect(address)


async def test_a_hard_stop_closes_the_port_too(tmp_path):
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="127.0.0.1:0"))
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(gridgate.serve, config, MemorySink())
        stream = await trio.open_tcp_stream(*gateway.addresses["mqtt"])
        await stream.send_all(gen_connect("meter-1"))
        assert await read_exactly(stream, 4) == gen_connack(0)
        nursery.cancel_scope.cancel()
    probe = socket.socket()
    with probe, pytest.raises(ConnectionRefusedError):
        probe.connect(gateway.addresses["mqtt"])


async def test_embedded_gateway_delivers_normalized_batches_to_a_custom_sink(tmp_path):
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="127.0.0.1:0"))
    sink = MemorySink()
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(gridgate.serve, config, sink)
        host, port = gateway.addresses["mqtt"]
        assert host == "127.0.0.1" and port > 0
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(gen_connect("inverter-7"))
        assert await read_exactly(stream, 4) == gen_connack(0)
        readings = [{"temperature": 77, "temperature_unit": "F", "location": "shanghai/factory-a"},
                    {"battery_mv": 3700, "tags": {"vendor": "huawei"}}]
        for mid, reading in enumerate(readings, 1):
            await stream.send_all(gen_publish("telemetry", qos=1, mid=mid, payload=json.dumps(reading).encode()))
        assert await read_exactly(stream, 8) == gen_puback(1) + gen_puback(2)
        await stream.aclose()
        gateway.stop()
    records = [r for batch in sink.batches for r in batch]
    assert [r.fields for r in records] == [{"temperature_mc": 25000}, {"battery_mv": 3700}]
    assert records[0].tags == {"region": "shanghai", "site": "factory-a"}
    assert records[1].tags == {"vendor": "huawei"}
    assert {r.device_id for r in records} == {"inverter-7"}
    assert {r.protocol for r in records} == {"mqtt"}
    assert sink.closed


class FlakySink(MemorySink):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures_left = failures

    async def write(self, batch):
        if self.failures_left:
            self.failures_left -= 1
            raise OSError("sink down")
        await super().write(batch)


class DeletesSeen:
    """The spool under the forwarder, telling when a replayed batch's rows are deleted."""

    def __init__(self, spool) -> None:
        self._spool = spool
        self.deleted = trio.Event()

    async def delete_pending(self, upto_id: int, count: int) -> None:
        await self._spool.delete_pending(upto_id, count)
        self.deleted.set()

    def __getattr__(self, name):
        return getattr(self._spool, name)


async def test_failing_sink_is_stored_and_forwarded(tmp_path, nursery):
    # Store-and-forward (gridgate.sinks.forwarding): a custom sink that fails does
    # not hold the device back; the batch is acknowledged from the spool's
    # pending table and replayed once the sink takes writes again.
    # Real time, short intervals: the spool works on a worker thread, and an
    # autojump clock would leap over every deadline while it waits for one
    # (the breaker's own timing is tested under MockClock in test_forwarding).
    sink = FlakySink(failures=3)
    config = make_config(tmp_path, sink=SinkConfig(failure_threshold=2, open_s=0.2))
    gateway = await nursery.start(gridgate.serve, config, sink)
    spool = gateway.forwarder.spool = DeletesSeen(gateway.forwarder.spool)
    client = await connect_memory(gateway, nursery, "meter-5")
    await client.send_all(gen_publish("telemetry", qos=1, mid=9, payload=b'{"humidity": 40}'))
    assert await read_exactly(client, 4) == gen_puback(9)      # acknowledged while the sink fails
    assert sink.batches == [] and gateway.forwarder.pending == 1
    with trio.fail_after(30):
        await spool.deleted.wait()
    # the replayer failed (the breaker opened), the first half-open probe
    # failed too, and the next one after open_s delivered it, once
    assert sink.failures_left == 0
    assert [[r.fields for r in b] for b in sink.batches] == [[{"humidity": 40.0}]]
    assert gateway.forwarder.pending == 0
    assert gateway.forwarder.breaker.state.name == "CLOSED"
    assert gateway.metrics.registry.get_sample_value("gridgate_replayed_records_total", {"sink": "custom"}) == 1


class ExhaustedListener(trio.abc.Listener):
    """accept() fails with EMFILE a few times, then yields one stream, then closes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.served = False

    async def accept(self):
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        if not self.served:
            self.served = True
            self.client, server = trio.testing.memory_stream_pair()
            return server
        raise trio.ClosedResourceError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_accept_survives_emfile_logging_once(autojump_clock, start_gateway, caplog):
    handled = []

    async def handler(stream):
        handled.append(stream)

    gateway = await start_gateway(MemorySink())
    with caplog.at_level(logging.WARNING, logger="gridgate"):
        start = trio.current_time()
        await gateway._accept_loop(ExhaustedListener(failures=5), "mqtt", handler)
    # backoff 0.01, 0.02, 0.04, 0.08, 0.16 s, each slept from where the last ended
    expected = start
    for backoff in (0.01, 0.02, 0.04, 0.08, 0.16):
        expected += backoff
    assert trio.current_time() == expected
    await trio.testing.wait_all_tasks_blocked()      # the handler started for the one stream
    assert len(handled) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "mqtt accept failed: [Errno 24] Too many open files; backing off and serving the 0 open connections",
        "mqtt accept recovered",
        "mqtt listener was closed; not ready, still serving the 0 open connections",
    ]
    assert gateway.metrics.registry.get_sample_value("gridgate_accept_errors_total", {"errno": "EMFILE"}) == 5


async def test_backpressure_pauses_the_reader_and_is_not_silence(autojump_clock, tmp_path, nursery):
    config = make_config(tmp_path, pipeline=PipelineConfig(queue_max_items=1, batch_max_records=1,
                                                           batch_max_delay_ms=0),
                         sink=SinkConfig(write_timeout_s=86400))    # the gated write must not time out
    sink = GatedSink()
    async with trio.open_nursery() as gateway_nursery:
        gateway = await gateway_nursery.start(gridgate.serve, config, sink)
        client = await connect_memory(gateway, nursery, "meter-6")
        (session,) = list(gateway.conns)
        # one read per publish: the first is being written, the second
        # waits in the channel, the third cannot be queued
        for mid in (1, 2, 3):
            await client.send_all(gen_publish("telemetry", qos=1, mid=mid, payload=b'{"x": 1}'))
            await trio.testing.wait_all_tasks_blocked()
        assert session.paused and sink.waiting == 1
        await trio.sleep(3600)   # far past idle_timeout_s: held back, not silent
        assert len(gateway.conns) == 1 and gateway.conns.reaped == 0
        sink.gate.set()
        assert await read_exactly(client, 12) == gen_puback(1) + gen_puback(2) + gen_puback(3)
        assert not session.paused
        gateway.stop()
    assert sum(len(b) for b in sink.batches) == 3


async def test_ack_received_acknowledges_before_the_sink_returns(autojump_clock, tmp_path, nursery):
    config = make_config(tmp_path, pipeline=PipelineConfig(ack="received"), sink=SinkConfig(write_timeout_s=86400))
    sink = GatedSink()
    async with trio.open_nursery() as gateway_nursery:
        gateway = await gateway_nursery.start(gridgate.serve, config, sink)
        client = await connect_memory(gateway, nursery, "meter-7")
        await client.send_all(gen_publish("telemetry", qos=1, mid=4, payload=b'{"x": 1}'))
        assert await read_exactly(client, 4) == gen_puback(4)
        await trio.sleep(1)  # mock time: the batch delay has long passed
        assert sink.batches == [] and sink.waiting == 1
        sink.gate.set()
        gateway.stop()
    assert sum(len(b) for b in sink.batches) == 1
