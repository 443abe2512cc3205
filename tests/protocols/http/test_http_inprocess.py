"""HTTP timing and saturation under the autojump MockClock, both engines:
slowloris heads closed at header_timeout_s while a normal client keeps being
answered, idle keep-alive left to the reaper, and 503 + Retry-After when
the pipeline is full or the sink never returns. In-memory streams and
in-memory sinks: no real I/O and no thread on the timed path, and gateways
start with the clock still (``autojump.start_still``), so every time below
is exact."""
from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from autojump import start_still
from gridgate.config import ConnectionsConfig, HTTPConfig, PipelineConfig, SinkConfig
from inprocess import GatedSink, MemorySink, make_config, post, read_response


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends until it closes (EOF, or a reset)."""
    data = b""
    try:
        while chunk := await stream.receive_some(1024):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


@pytest.fixture(params=["fast", "std"], ids=["fast", "std"])
def engine(request):
    return request.param


async def test_slowloris_heads_are_closed_while_a_normal_client_is_served(tmp_path, engine, autojump_clock):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine, header_timeout_s=10))
    sink = MemorySink()
    ends: list[tuple[float, int, str]] = []      # (time since start, bytes sent, how it ended)

    async def slow_client(gateway, nursery, start: float):
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(gateway.handle_http, server)
        head = post()
        how = "sent the whole head"
        sent = 0
        for i in range(len(head)):        # one byte every 3 s: would take hours
            try:
                await client.send_all(head[i:i + 1])
            except trio.BrokenResourceError:
                how = "closed by the server"
                break
            sent += 1
            with trio.move_on_after(3):
                if await client.receive_some(1024) == b"":
                    how = "closed by the server"
                    break
                how = "answered"
                break
        ends.append((trio.current_time() - start, sent, how))

    async with trio.open_nursery() as nursery:
        gateway = await start_still(nursery, config, sink)
        start = trio.current_time()
        async with trio.open_nursery() as slow:
            for _ in range(1000):
                slow.start_soon(slow_client, gateway, slow, start)
            await trio.testing.wait_all_tasks_blocked()
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(gateway.handle_http, server)
            buf = bytearray()
            answered_at = []
            for _ in range(30):           # one request a second, on one keep-alive connection
                await client.send_all(post())
                status, _, body = await read_response(client, buf)
                assert status == 202 and json.loads(body)["accepted"] == 1
                answered_at.append(trio.current_time() - start)
                await trio.sleep(1)
        # answered at once, every second, while the slow heads were open
        assert answered_at == [float(i) for i in range(30)]
        # each slow head is closed, unanswered, at the header timeout: 10 s
        # after its first byte, when it had sent 4 bytes (at 0, 3, 6 and 9 s)
        assert ends == [(10.0, 4, "closed by the server")] * 1000
        assert gateway.metrics.connections_opened.labels("http")._value.get() == 1001
        gateway.stop()
    assert sum(len(b) for b in sink.batches) == 30


async def test_idle_keep_alive_is_left_to_the_reaper(tmp_path, engine, autojump_clock, nursery):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine, header_timeout_s=10),
                         connections=ConnectionsConfig(idle_timeout_s=300, reap_interval_s=30))
    gateway = await start_still(nursery, config, MemorySink())
    start = trio.current_time()                # a reaper scan: they fall at start + 30 k
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_http, server)
    buf = bytearray()
    await client.send_all(post())
    assert (await read_response(client, buf))[0] == 202
    await trio.sleep_until(start + 120)        # idle far past header_timeout_s: still open
    await client.send_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (await read_response(client, buf))[0] == 200
    assert await read_until_closed(client) == b""
    # silent since 120: the first scan 300 s later is the one at 420
    assert trio.current_time() - start == 420.0
    assert gateway.conns.reaped == 1


async def test_saturated_pipeline_answers_503_with_retry_after(tmp_path, engine, autojump_clock):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine),
                         pipeline=PipelineConfig(queue_max_items=1, batch_max_records=1, batch_max_delay_ms=0),
                         sink=SinkConfig(write_timeout_s=86400))     # the gated write must not time out
    sink = GatedSink()
    async with trio.open_nursery() as nursery:
        gateway = await start_still(nursery, config, sink)
        clients = []
        for _ in range(3):
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(gateway.handle_http, server)
            await client.send_all(post())
            await trio.testing.wait_all_tasks_blocked()
            clients.append(client)
        # the first is being written, the second waits in the channel,
        # the third cannot be queued
        assert sink.waiting == 1
        status, headers, body = await read_response(clients[2], bytearray())
        assert (status, headers["retry-after"], json.loads(body)["error"]) == (503, "1", "overloaded")
        sink.gate.set()
        for client in clients[:2]:
            assert (await read_response(client, bytearray()))[0] == 202
        gateway.stop()
    assert sum(len(b) for b in sink.batches) == 2


async def test_sink_that_never_returns_gets_503_after_durable_timeout(tmp_path, engine, autojump_clock, nursery):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine, durable_timeout_s=30),
                         sink=SinkConfig(write_timeout_s=86400))
    sink = GatedSink()
    gateway = await start_still(nursery, config, sink)
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(gateway.handle_http, server)
    t0 = trio.current_time()
    await client.send_all(post())
    status, headers, body = await read_response(client, bytearray())
    assert (status, headers["retry-after"], json.loads(body)["error"]) == (503, "5", "sink_unavailable")
    assert trio.current_time() - t0 == 30.0
    assert sink.waiting == 1                   # the write was under way all along
    sink.gate.set()
