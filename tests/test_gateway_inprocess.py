"""The gateway embedded in a Trio program: reaper, keepalive and takeover under
the autojump MockClock (in-memory streams, no real I/O on the timed path),
and the embedding API with a custom sink over real loopback TCP."""
from __future__ import annotations

import json

import pytest
import trio
import trio.testing

import gridgate
from gridgate.config import (
    MQTTConfig, SinkConfig,
)
from inprocess import GatedSink, MemorySink, connect_memory, make_config, read_exactly, run_with_clock, wait_closed
from mqtt_frames import gen_connack, gen_connect, gen_pingreq, gen_pingresp, gen_publish, gen_puback


def test_silent_connection_is_reaped_after_300s_not_before(tmp_path):
    config = make_config(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, MemorySink())
            client = await connect_memory(gateway, nursery, "meter-1")
            connected = trio.current_time()
            with trio.move_on_at(connected + 299.999):
                await wait_closed(client)
                pytest.fail("reaped before 300 s")
            assert len(gateway.conns) == 1
            await wait_closed(client)
            assert trio.current_time() - connected == pytest.approx(300.0)
            assert gateway.conns.reaped == 1
            assert len(gateway.conns) == 0
            gateway.stop()

    run_with_clock(main)


def test_pingreq_every_60s_keeps_a_connection_for_an_hour(tmp_path):
    config = make_config(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, MemorySink())
            client = await connect_memory(gateway, nursery, "meter-2", keepalive=60)
            start = trio.current_time()
            while trio.current_time() - start < 3600:
                await trio.sleep(60)
                await client.send_all(gen_pingreq())
                assert await read_exactly(client, 2) == gen_pingresp()
            assert trio.current_time() - start == pytest.approx(3600.0)
            assert len(gateway.conns) == 1 and gateway.conns.reaped == 0
            gateway.stop()

    run_with_clock(main)


def test_keepalive_10_closes_after_15s_of_silence(tmp_path):
    config = make_config(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, MemorySink())
            client = await connect_memory(gateway, nursery, "meter-3", keepalive=10)
            # traffic inside the window moves the deadline
            await trio.sleep(14)
            await client.send_all(gen_pingreq())
            assert await read_exactly(client, 2) == gen_pingresp()
            last = trio.current_time()
            await wait_closed(client)
            assert trio.current_time() - last == pytest.approx(15.0)
            gateway.stop()

    run_with_clock(main)


def test_takeover_closes_the_older_connection(tmp_path):
    config = make_config(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, MemorySink())
            old = await connect_memory(gateway, nursery, "meter-4")
            new = await connect_memory(gateway, nursery, "meter-4")
            with trio.fail_after(1):
                await wait_closed(old)
            assert gateway.conns.taken_over == 1
            assert gateway.conns.get_device("meter-4") is not None
            assert len(gateway.conns) == 1
            await new.send_all(gen_pingreq())
            assert await read_exactly(new, 2) == gen_pingresp()
            gateway.stop()

    run_with_clock(main)


def test_clients_connecting_together_are_all_served_and_the_port_closes_with_the_gateway(tmp_path):
    import socket

    config = make_config(tmp_path, mqtt=MQTTConfig(listen="127.0.0.1:0"))
    clients = 300               # more than one accept burst (gateway.ACCEPT_BURST + 1)
    from gridgate.gateway import ACCEPT_BURST
    assert clients > ACCEPT_BURST + 1

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, MemorySink())
            address = gateway.addresses["mqtt"]
            # all in the backlog before the gateway gets to accept any of them
            socks = [socket.create_connection(address) for _ in range(clients)]
            streams = [trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in socks]

            async def handshake(i: int, stream: trio.SocketStream) -> None:
                await stream.send_all(gen_connect(f"meter-{i}"))
                assert await read_exactly(stream, 4) == gen_connack(0)

            async with trio.open_nursery() as clients_nursery:
                for i, stream in enumerate(streams):
                    clients_nursery.start_soon(handshake, i, stream)
            assert len(gateway.conns) == clients
            for stream in streams:
                await stream.aclose()
            gateway.stop()
        return address

    address = trio.run(main)
    with pytest.raises(ConnectionRefusedError):          # no duplicate of the listening socket left open
        socket.create_connection(address, timeout=5).close()


def test_embedded_gateway_delivers_normalized_batches_to_a_custom_sink(tmp_path):
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="127.0.0.1:0"))
    sink = MemorySink()

    async def main():
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
                await stream.send_all(gen_publish("telemetry", qos=1, mid=mid,
                                                  payload=json.dumps(reading).encode()))
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

    trio.run(main)


def test_failing_sink_is_stored_and_forwarded(tmp_path):
    # Store-and-forward (gridgate.sinks.forwarding): a custom sink that fails does
    # not hold the device back; the batch is acknowledged from the spool's
    # pending table and replayed once the sink takes writes again.
    # Real time, short intervals: the spool works on a worker thread, and an
    # autojump clock would leap over every deadline while it waits for one
    # (the breaker's own timing is tested under MockClock in test_forwarding).
    config = make_config(tmp_path, sink=SinkConfig(failure_threshold=2, open_s=0.2))

    class FlakySink(MemorySink):
        def __init__(self) -> None:
            super().__init__()
            self.failures_left = 3
            self.delivered = trio.Event()

        async def write(self, batch):
            if self.failures_left:
                self.failures_left -= 1
                raise OSError("sink down")
            await super().write(batch)
            self.delivered.set()

    sink = FlakySink()

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            client = await connect_memory(gateway, nursery, "meter-5")
            await client.send_all(gen_publish("telemetry", qos=1, mid=9, payload=b'{"humidity": 40}'))
            assert await read_exactly(client, 4) == gen_puback(9)      # acknowledged while the sink fails
            assert sink.batches == [] and gateway.forwarder.pending == 1
            with trio.fail_after(30):
                await sink.delivered.wait()
                while gateway.forwarder.pending:     # the delete after the write: one thread call
                    await trio.sleep(0.01)
            # the replayer failed (the breaker opened), the first half-open
            # probe failed too, and the next one after open_s delivered it, once
            assert sink.failures_left == 0
            assert [[r.fields for r in b] for b in sink.batches] == [[{"humidity": 40.0}]]
            assert gateway.forwarder.breaker.state.name == "CLOSED"
            assert gateway.metrics.replayed_records.labels("custom")._value.get() == 1
            gateway.stop()

    trio.run(main)


def test_accept_survives_emfile_logging_once(tmp_path, caplog):
    import errno
    import logging

    config = make_config(tmp_path)

    class ExhaustedListener:
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
                client, server = trio.testing.memory_stream_pair()
                self.client = client
                return server
            raise trio.ClosedResourceError

    handled = []

    async def handler(stream):
        handled.append(stream)

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, MemorySink())
            listener = ExhaustedListener(failures=5)
            with caplog.at_level(logging.ERROR, logger="gridgate"):
                start = trio.current_time()
                await gateway._accept_loop(listener, "mqtt", handler)
            # backoff 0.01, 0.02, 0.04, 0.08, 0.16 s
            assert trio.current_time() - start == pytest.approx(0.31)
            gateway.stop()
        assert len(handled) == 1
        errors = [r for r in caplog.records if "accept failed" in r.getMessage()]
        assert len(errors) == 1
        sample = gateway.metrics.accept_errors.labels("EMFILE")._value.get()
        assert sample == 5

    run_with_clock(main)


def test_backpressure_pauses_the_reader_and_is_not_silence(tmp_path):
    from gridgate.config import PipelineConfig

    config = make_config(tmp_path, pipeline=PipelineConfig(queue_max_items=1, batch_max_records=1,
                                                           batch_max_delay_ms=0),
                         sink=SinkConfig(write_timeout_s=86400))    # the gated write must not time out
    sink = GatedSink()

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
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

    run_with_clock(main)


def test_ack_received_acknowledges_before_the_sink_returns(tmp_path):
    from gridgate.config import PipelineConfig

    config = make_config(tmp_path, pipeline=PipelineConfig(ack="received"), sink=SinkConfig(write_timeout_s=86400))
    sink = GatedSink()

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            client = await connect_memory(gateway, nursery, "meter-7")
            await client.send_all(gen_publish("telemetry", qos=1, mid=4, payload=b'{"x": 1}'))
            assert await read_exactly(client, 4) == gen_puback(4)
            await trio.sleep(1)  # mock time: the batch delay has long passed
            assert sink.batches == [] and sink.waiting == 1
            sink.gate.set()
            gateway.stop()
        assert sum(len(b) for b in sink.batches) == 1

    run_with_clock(main)
