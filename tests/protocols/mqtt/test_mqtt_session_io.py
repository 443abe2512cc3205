"""The MQTT session's I/O shell: an idle connection is one task and nothing
more, acks are written straight to the socket and queue (with the reader
paused) only for a client that stops reading, and a graceful stop still
delivers the acks a connection is owed.

Both transports the session knows are exercised: a real Unix socket pair
(the direct-write path, as on TCP) and Trio's in-memory stream (the
writer-task path, as under WebSocket). Real clock (the spool opens on worker
threads, which the autojump clock would leap over), every wait bounded by
fail_after; nothing here waits on wall time: each step waits for the event
it needs (a sink entered, a socket readable, all tasks blocked).
"""
from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from gridgate.config import MQTTConfig, SinkConfig
from gridgate.connections import ready_loop
from inprocess import GatedSink, MemorySink, make_config, read_exactly, serving, wait_closed
from mqtt_frames import gen_connack, gen_connect, gen_puback, gen_publish


def socket_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


PAIRS = {"socket": socket_pair, "memory": trio.testing.memory_stream_pair}


async def connect(gateway, nursery, pair: str, client_id: str):
    client, server = PAIRS[pair]()
    nursery.start_soon(gateway.handle_mqtt, server)
    await client.send_all(gen_connect(client_id))
    assert await read_exactly(client, 4) == gen_connack(0)
    return client, server


@pytest.mark.parametrize("pair", PAIRS)
async def test_an_idle_connection_is_one_task_without_a_nursery(tmp_path, pair):
    async with serving(make_config(tmp_path), MemorySink(), 20) as (gateway, nursery):
        clients = [await connect(gateway, nursery, pair, f"meter-{i}") for i in range(20)]
        # a reading and its ack: the ack goes out without a second task
        await clients[0][0].send_all(gen_publish("telemetry", qos=1, mid=7, payload=b'{"x": 1}'))
        assert await read_exactly(clients[0][0], 4) == gen_puback(7)
        await trio.testing.wait_all_tasks_blocked()
        assert len(gateway.conns) == 20
        handlers = nursery.child_tasks
        assert len(handlers) == 20
        assert all(not task.child_nurseries for task in handlers)
        side_tasks = len(gateway.connection_nursery.child_tasks)
        # the socket takes CONNACKs and acks at once; an in-memory
        # stream has no socket, so each connection's answers go
        # through one writer task (as under WebSocket)
        assert side_tasks == (0 if pair == "socket" else 20)
        for client, _ in clients:
            await client.aclose()


async def test_an_idle_socket_connection_waits_under_two_frames(tmp_path):
    # every frame on an idle connection's parked stack is RSS times the
    # number of connections: the gateway's wrapper, the session's read loop,
    # and the park object of connections.ready_loop, which owns the socket
    # meanwhile (no trio wait frames)
    async with serving(make_config(tmp_path), MemorySink(), 20) as (gateway, nursery):
        client, _ = await connect(gateway, nursery, "socket", "meter-1")
        await trio.testing.wait_all_tasks_blocked()
        [task] = nursery.child_tasks
        names, coro = [], task.coro
        while hasattr(coro, "cr_code"):
            names.append(coro.cr_code.co_qualname)
            coro = coro.cr_await
        assert names == ["Gateway._serve_connection", "MQTTConnection.run"]
        assert type(coro) is ready_loop._Park
        await client.aclose()


async def test_acks_wait_for_a_client_that_stops_reading_and_all_arrive_in_order(tmp_path):
    """The server's socket buffer is made tiny and the client does not read:
    PUBACKs queue in the session, past max_outgoing_bytes the reader is
    paused, and once the client reads every ack arrives, once, in order."""
    config = make_config(tmp_path, mqtt=MQTTConfig(listen="", max_outgoing_bytes=1024))
    sink = MemorySink()
    async with serving(config, sink, 30) as (gateway, nursery):
        client, server = socket_pair()
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)   # the kernel's minimum
        nursery.start_soon(gateway.handle_mqtt, server)
        await client.send_all(gen_connect("meter-slow"))
        assert await read_exactly(client, 4) == gen_connack(0)
        (session,) = list(gateway.conns)
        # Publish until the server stops reading us. Each send
        # returns once the kernel has the bytes; the server pauses
        # at its next read once our unread acks pass 1 KiB.
        sent = 0
        while not session.paused:
            sent += 1
            assert sent <= 60_000, "the reader was never paused"
            await client.send_all(gen_publish("telemetry", qos=1, mid=sent, payload=b'{"x": %d}' % sent))
        # held back by its own unread acks: a writer task waits on the socket
        assert len(gateway.connection_nursery.child_tasks) == 1
        acks = await read_exactly(client, 4 * sent)
        assert acks == b"".join(gen_puback(mid) for mid in range(1, sent + 1))
        await trio.testing.wait_all_tasks_blocked()
        assert not session.paused
        await client.aclose()
    assert sorted(r.fields["x"] for b in sink.batches for r in b) == list(range(1, sent + 1))


class EnteredSink(GatedSink):
    """A GatedSink that says when a write has begun (``entered``)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()

    async def write(self, batch):
        self.entered.set()
        await super().write(batch)


@pytest.mark.parametrize("pair", PAIRS)
async def test_graceful_stop_delivers_owed_acks_then_closes(tmp_path, pair):
    config = make_config(tmp_path, sink=SinkConfig(write_timeout_s=86400))   # the gated write must not time out
    sink = EnteredSink()
    async with serving(config, sink, 20) as (gateway, nursery):
        client, _ = await connect(gateway, nursery, pair, "meter-owed")
        await client.send_all(gen_publish("telemetry", qos=1, mid=42, payload=b'{"x": 1}'))
        await sink.entered.wait()              # the reading is being written, not yet durable
        assert sink.waiting == 1
        gateway.stop()
        await trio.testing.wait_all_tasks_blocked()
        assert len(gateway.conns) == 1         # still open: an ack is owed
        sink.gate.set()
        assert await read_exactly(client, 4) == gen_puback(42)
        await wait_closed(client)
        assert len(gateway.conns) == 0
    assert sum(len(b) for b in sink.batches) == 1


async def test_a_failing_side_task_closes_only_its_own_connection(caplog):
    from gridgate.connections.manager import Session
    from gridgate.connections.side_tasks import SideTasks

    async with trio.open_nursery() as nursery:
        scopes = [trio.CancelScope(), trio.CancelScope()]
        sessions = [Session("mqtt", f"peer-{i}", scope) for i, scope in enumerate(scopes)]
        sides = [SideTasks(nursery, session) for session in sessions]

        async def boom():
            raise RuntimeError("bug in a helper")

        async def broken():
            raise trio.BrokenResourceError

        sides[0].start_soon(boom)
        sides[1].start_soon(trio.sleep_forever)
        await trio.testing.wait_all_tasks_blocked()
        assert scopes[0].cancel_called and sessions[0].close_reason == "internal error"
        assert not scopes[1].cancel_called and len(nursery.child_tasks) == 1
        sides[1].start_soon(broken)
        await trio.testing.wait_all_tasks_blocked()
        assert sessions[1].close_reason == "peer stopped reading"
        sides[1].cancel()                        # the connection ended: its helpers end too
        await trio.testing.wait_all_tasks_blocked()
        assert len(nursery.child_tasks) == 0
        sides[1].start_soon(trio.sleep_forever)  # started after the end: cancelled at once
        await trio.testing.wait_all_tasks_blocked()
        assert len(nursery.child_tasks) == 0
    assert "bug in a helper" in caplog.text
