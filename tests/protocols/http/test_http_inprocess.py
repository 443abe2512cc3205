"""HTTP timing and saturation under the autojump MockClock, both engines:
slowloris heads closed at header_timeout_s while a normal client keeps being
answered, idle keep-alive left to the reaper, and 503 + Retry-After when
the pipeline is full. In-memory streams: no real I/O on the timed path."""
from __future__ import annotations

import json

import pytest
import trio
import trio.testing

import gridgate
from gridgate.config import ConnectionsConfig, HTTPConfig, PipelineConfig, SinkConfig
from inprocess import GatedSink, MemorySink, make_config, post, read_response, run_with_clock

async def closed_by_server(stream: trio.abc.Stream) -> bool:
    try:
        while await stream.receive_some(1024):
            pass
    except trio.BrokenResourceError:
        pass
    return True


@pytest.fixture(params=["fast", "std"])
def engine(request):
    return request.param


def test_slowloris_heads_are_closed_while_a_normal_client_is_served(tmp_path, engine):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine, header_timeout_s=10))
    sink = MemorySink()
    closed_at: list[float] = []

    async def slow_client(gateway, nursery, start: float):
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(gateway.handle_http, server)
        head = post()
        for i in range(len(head)):        # one byte every 3 s: would take hours
            try:
                await client.send_all(head[i:i + 1])
            except trio.BrokenResourceError:
                break
            with trio.move_on_after(3):
                if not await client.receive_some(1024):
                    break
        closed_at.append(trio.current_time() - start)

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            start = trio.current_time()
            async with trio.open_nursery() as slow:
                for _ in range(1000):
                    slow.start_soon(slow_client, gateway, slow, start)
                await trio.testing.wait_all_tasks_blocked()
                client, server = trio.testing.memory_stream_pair()
                nursery.start_soon(gateway.handle_http, server)
                buf = bytearray()
                answered = 0
                for _ in range(30):           # one request a second, on one keep-alive connection
                    await client.send_all(post())
                    status, _, body = await read_response(client, buf)
                    assert status == 202 and json.loads(body)["accepted"] == 1
                    answered += 1
                    await trio.sleep(1)
            assert answered == 30
            assert len(closed_at) == 1000
            # closed at the header timeout: 10 s after the first byte, on the
            # first 3-second read boundary after it
            assert all(10 <= t <= 13 for t in closed_at), (min(closed_at), max(closed_at))
            assert gateway.metrics.connections_opened.labels("http")._value.get() == 1001
            gateway.stop()
        assert sum(len(b) for b in sink.batches) == 30

    run_with_clock(main)


def test_idle_keep_alive_is_left_to_the_reaper(tmp_path, engine):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine, header_timeout_s=10),
                         connections=ConnectionsConfig(idle_timeout_s=300, reap_interval_s=30))

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, MemorySink())
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(gateway.handle_http, server)
            buf = bytearray()
            await client.send_all(post())
            assert (await read_response(client, buf))[0] == 202
            await trio.sleep(120)             # idle far past header_timeout_s: still open
            await client.send_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert (await read_response(client, buf))[0] == 200
            t0 = trio.current_time()
            assert await closed_by_server(client)   # silent past idle_timeout_s: reaped
            assert 300 <= trio.current_time() - t0 <= 330 + 1
            assert gateway.conns.reaped == 1
            gateway.stop()

    run_with_clock(main)


def test_saturated_pipeline_answers_503_with_retry_after(tmp_path, engine):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine),
                         pipeline=PipelineConfig(queue_max_items=1, batch_max_records=1, batch_max_delay_ms=0),
                         sink=SinkConfig(write_timeout_s=86400))     # the gated write must not time out
    sink = GatedSink()

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            clients = []
            for _ in range(3):
                client, server = trio.testing.memory_stream_pair()
                nursery.start_soon(gateway.handle_http, server)
                await client.send_all(post())
                await trio.testing.wait_all_tasks_blocked()
                clients.append(client)
            # the first is being written, the second waits in the channel,
            # the third cannot be queued
            status, headers, body = await read_response(clients[2], bytearray())
            assert (status, headers["retry-after"], json.loads(body)["error"]) == (503, "1", "overloaded")
            sink.gate.set()
            for client in clients[:2]:
                assert (await read_response(client, bytearray()))[0] == 202
            gateway.stop()
        assert sum(len(b) for b in sink.batches) == 2

    run_with_clock(main)


def test_sink_that_never_returns_gets_503_after_durable_timeout(tmp_path, engine):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine, durable_timeout_s=30),
                         sink=SinkConfig(write_timeout_s=86400))
    sink = GatedSink()

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(gateway.handle_http, server)
            t0 = trio.current_time()
            await client.send_all(post())
            status, headers, body = await read_response(client, bytearray())
            assert (status, headers["retry-after"], json.loads(body)["error"]) == (503, "5", "sink_unavailable")
            assert trio.current_time() - t0 == pytest.approx(30)
            sink.gate.set()
            gateway.stop()

    run_with_clock(main)
