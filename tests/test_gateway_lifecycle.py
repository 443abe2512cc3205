"""The gateway's own life: accept errors, a listener that cannot bind or
stops, and what becomes of queued readings at shutdown."""
from __future__ import annotations

import errno
import json
import logging
import os
import socket

import pytest
import trio
import trio.testing

import gridgate
import gridgate.gateway as gateway_module
from gatewayproc import BIN, gridgate_env
from gridgate.config import MQTTConfig, PipelineConfig, SinkConfig, SpoolConfig, WebSocketConfig
from gridgate.gateway import DRAIN_TIMEOUT_S, ListenError
from gridgate.storage.spool import Spool
from inprocess import MemorySink, connect_memory, make_config, read_exactly, read_response
from mqtt_frames import gen_connack, gen_connect, gen_pingreq, gen_pingresp, gen_puback, gen_publish

# What Trio's SocketListener.accept skips, as the installed Trio lists it.
SKIPPED_ACCEPT_ERRNOS = [name for name in trio._highlevel_socket._ignorable_accept_errno_names
                         if hasattr(errno, name)]


def os_error(name: str) -> OSError:
    number = getattr(errno, name)
    return OSError(number, os.strerror(number))


class FaultyAccept:
    """A listening socket whose accept() raises the given errors first."""

    def __init__(self, sock: socket.socket, faults: list[OSError]) -> None:
        self._sock = sock
        self.faults = faults

    def accept(self):
        if self.faults:
            raise self.faults.pop(0)
        return self._sock.accept()

    def __getattr__(self, name):
        return getattr(self._sock, name)


class SocketModuleWithFaultyAccept:
    """Stands in for the ``socket`` module in gridgate.gateway: the sockets the
    gateway makes there (the accept-burst duplicate of each listener) fail
    their first accepts with ``faults``."""

    def __init__(self, faults: list[OSError]) -> None:
        self.faults = faults

    def socket(self, *args, **kwargs) -> FaultyAccept:
        return FaultyAccept(socket.socket(*args, **kwargs), self.faults)

    def __getattr__(self, name):
        return getattr(socket, name)


def samples(gateway, metric: str) -> dict[tuple[str, ...], float]:
    """Every labelled sample of a counter: {label values: value}."""
    return {tuple(s.labels.values()): s.value
            for family in gateway.metrics.registry.collect()
            for s in family.samples if s.name == metric}


async def mqtt_over_tcp(address: tuple[str, int], client_id: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(gen_connect(client_id))
    assert await read_exactly(stream, 4) == gen_connack(0)
    return stream


async def get_readyz(gateway) -> tuple[int, dict]:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_http, server)
        await client.send_all(b"GET /readyz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        status, _headers, body = await read_response(client, bytearray())
        await client.aclose()
    return status, json.loads(body)


def held_port() -> socket.socket:
    """A loopback port that is taken: bound and listening."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


# -- accept errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("errno_name", SKIPPED_ACCEPT_ERRNOS)
async def test_a_connection_that_failed_before_accept_is_skipped_counted_and_the_gateway_serves_on(
        errno_name, monkeypatch, start_gateway):
    # The connection's own failure (ECONNABORTED: the peer reset it in the
    # backlog) met by the burst accept after Trio's accept took the first one.
    sockets = SocketModuleWithFaultyAccept([os_error(errno_name)])
    monkeypatch.setattr(gateway_module, "socket", sockets)
    gateway = await start_gateway(MemorySink(), mqtt=MQTTConfig(listen="127.0.0.1:0"))
    first = await mqtt_over_tcp(gateway.addresses["mqtt"], "meter-1")
    assert sockets.faults == []                   # the burst met the fault
    second = await mqtt_over_tcp(gateway.addresses["mqtt"], "meter-2")
    for stream in (first, second):
        await stream.send_all(gen_pingreq())
        assert await read_exactly(stream, 2) == gen_pingresp()
    # labelled by the errno's name (Linux calls EOPNOTSUPP ENOTSUP: the same number)
    label = errno.errorcode[getattr(errno, errno_name)]
    assert samples(gateway, "gridgate_accept_errors_total") == {(label,): 1.0}
    assert len(gateway.conns) == 2
    assert gateway.not_ready_reasons() == []


@pytest.mark.parametrize("errno_name", ["EMFILE", "ENFILE", "ENOMEM", "ENOBUFS"])
async def test_out_of_files_in_the_accept_burst_backs_off_like_trios_accept(errno_name, monkeypatch, caplog,
                                                                            start_gateway):
    sockets = SocketModuleWithFaultyAccept([os_error(errno_name)])
    monkeypatch.setattr(gateway_module, "socket", sockets)
    gateway = await start_gateway(MemorySink(), mqtt=MQTTConfig(listen="127.0.0.1:0"))
    with caplog.at_level(logging.WARNING, logger="gridgate"):
        first = await mqtt_over_tcp(gateway.addresses["mqtt"], "meter-1")
        second = await mqtt_over_tcp(gateway.addresses["mqtt"], "meter-2")
    assert samples(gateway, "gridgate_accept_errors_total") == {(errno_name,): 1.0}
    assert [r.getMessage() for r in caplog.records if r.name == "gridgate"] == [
        # 0: the connection accepted just before has not started (registered) yet
        f"mqtt accept failed: {os_error(errno_name)}; backing off and serving the 0 open connections",
        "mqtt accept recovered",
    ]
    for stream in (first, second):
        await stream.send_all(gen_pingreq())
        assert await read_exactly(stream, 2) == gen_pingresp()
    assert gateway.not_ready_reasons() == []


# -- a listener that cannot bind, or stops -----------------------------------------------------------


async def test_embedded_serve_raises_an_oserror_naming_the_listener_that_cannot_bind(nursery, tmp_path):
    with held_port() as holder:
        port = holder.getsockname()[1]
        config = make_config(tmp_path, mqtt=MQTTConfig(listen=f"127.0.0.1:{port}"))
        with pytest.raises(OSError) as raised:
            await nursery.start(gridgate.serve, config, MemorySink())
    assert type(raised.value) is ListenError
    assert str(raised.value) == f"cannot listen on mqtt 127.0.0.1:{port}: [Errno 98] Address already in use"
    assert (raised.value.errno, raised.value.listener, raised.value.address) == (
        errno.EADDRINUSE, "mqtt", f"127.0.0.1:{port}")


async def test_listeners_bound_before_the_one_that_cannot_bind_are_closed(nursery, tmp_path, monkeypatch):
    opened: list[trio.SocketListener] = []
    real_open = trio.open_tcp_listeners

    async def recording_open(*args, **kwargs):
        listeners = await real_open(*args, **kwargs)
        opened.extend(listeners)
        return listeners

    monkeypatch.setattr(trio, "open_tcp_listeners", recording_open)
    with held_port() as holder:
        port = holder.getsockname()[1]
        config = make_config(tmp_path, mqtt=MQTTConfig(listen="127.0.0.1:0"),
                             websocket=WebSocketConfig(listen=f"127.0.0.1:{port}"))
        with pytest.raises(ListenError, match=f"^cannot listen on ws 127.0.0.1:{port}: "):
            await nursery.start(gridgate.serve, config, MemorySink())
    assert len(opened) == 1 and opened[0].socket.fileno() == -1        # the MQTT listener, closed


async def test_gridgate_serve_names_the_listener_that_cannot_bind_and_exits_1(tmp_path):
    with held_port() as holder:
        port = holder.getsockname()[1]
        done = await trio.run_process(
            [str(BIN), "serve", "--mqtt", f"127.0.0.1:{port}", "--http", "", "--ws", "",
             "--data-dir", str(tmp_path / "data")],
            env=gridgate_env(ENVIRONMENT="test", SERVICE_NAME="gg"), capture_stdout=True, capture_stderr=True,
            check=False)
    assert done.returncode == 1
    last = done.stderr.decode().splitlines()[-1]
    assert last.split(" ", 2)[2] == (
        f"ERROR gridgate: cannot listen on mqtt 127.0.0.1:{port}: [Errno 98] Address already in use")


async def test_an_accept_loop_that_fails_unexpectedly_makes_the_gateway_not_ready_and_the_rest_serves_on(
        monkeypatch, start_gateway, nursery):
    # EINVAL is neither a failed handshake nor a full process: the listener
    # itself is broken. Only its loop ends; the port closes, so clients go
    # elsewhere instead of waiting in a backlog nobody accepts from.
    sockets = SocketModuleWithFaultyAccept([os_error("EINVAL")])
    monkeypatch.setattr(gateway_module, "socket", sockets)
    gateway = await start_gateway(MemorySink(), mqtt=MQTTConfig(listen="127.0.0.1:0"))
    address = gateway.addresses["mqtt"]
    assert await get_readyz(gateway) == (200, {"status": "ready", "sink": {"kind": "custom", "breaker": "closed",
                                                                            "pending": 0}})
    served = await mqtt_over_tcp(address, "meter-1")     # accepted, then the burst broke
    reason = f"mqtt listener 127.0.0.1:{address[1]} stopped accepting: [Errno 22] Invalid argument"
    assert gateway.not_ready_reasons() == [reason]
    assert await get_readyz(gateway) == (503, {"status": "not_ready", "reasons": [reason],
                                               "sink": {"kind": "custom", "breaker": "closed", "pending": 0}})
    await served.send_all(gen_pingreq())
    assert await read_exactly(served, 2) == gen_pingresp()
    other = await connect_memory(gateway, nursery, "meter-2")
    await other.send_all(gen_publish("telemetry", qos=1, mid=1, payload=b'{"humidity": 40}'))
    assert await read_exactly(other, 4) == gen_puback(1)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*address)


async def test_a_listener_closed_under_its_accept_loop_makes_the_gateway_not_ready(start_gateway):
    gateway = await start_gateway(MemorySink(), mqtt=MQTTConfig(listen="127.0.0.1:0"))
    port = gateway.addresses["mqtt"][1]
    (listener,) = gateway._listeners
    await listener.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert gateway.not_ready_reasons() == [
        f"mqtt listener 127.0.0.1:{port} stopped accepting: the listener was closed"]


async def test_an_accept_loop_that_raises_a_bug_ends_alone_with_the_reason(autojump_clock, start_gateway, caplog):
    class BrokenListener(trio.abc.Listener):
        async def accept(self):
            await trio.lowlevel.checkpoint()
            raise RuntimeError("boom")

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    async def handler(stream):
        raise AssertionError("nothing is accepted")

    gateway = await start_gateway(MemorySink())
    with caplog.at_level(logging.ERROR, logger="gridgate"):
        await gateway._accept_loop(BrokenListener(), "mqtt", handler)      # returns instead of raising
    assert gateway.not_ready_reasons() == ["mqtt listener stopped accepting: RuntimeError: boom"]
    (record,) = caplog.records
    assert record.getMessage() == ("mqtt listener stopped accepting: RuntimeError: boom; not ready, still serving "
                                   "the 0 open connections")
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


# -- shutdown ----------------------------------------------------------------------------


class HungSink(MemorySink):
    """A custom sink whose writes never return."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = trio.Event()

    async def write(self, batch):
        self.writing.set()
        await trio.sleep_forever()


def spool_counts(data_dir) -> dict[str, int]:
    spool = Spool(data_dir, readonly=True)
    try:
        stats = spool.stats()
    finally:
        spool.db.close()
    return {k: stats[k] for k in ("records", "rejected", "pending")}


# the sink must not time out on its own: the shutdown's bound is what is tested
PATIENT_SINK = SinkConfig(write_timeout_s=86400)


async def test_hard_stop_keeps_what_a_hung_sink_does_not_take_as_pending(autojump_clock, tmp_path, caplog):
    config = make_config(tmp_path, sink=PATIENT_SINK)
    sink = HungSink()
    with caplog.at_level(logging.INFO, logger="gridgate"):
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            client = await connect_memory(gateway, nursery, "meter-1")
            # QoS 0: no ack, so the device will never send it again
            await client.send_all(gen_publish("telemetry", qos=0, payload=b'{"humidity": 40}'))
            await sink.writing.wait()
            stopped = trio.current_time()
            nursery.cancel_scope.cancel()
    assert trio.current_time() == stopped + DRAIN_TIMEOUT_S
    assert spool_counts(tmp_path / "data") == {"records": 0, "rejected": 0, "pending": 1}
    assert samples(gateway, "gridgate_readings_unwritten_at_shutdown_total") == {}
    messages = [r.getMessage() for r in caplog.records if r.name == "gridgate"]
    assert messages[-3:] == [
        "writing 1 records and 0 rejections still queued at shutdown",
        "the custom sink did not take 1 records within 10s at shutdown: kept in the spool as pending (replayed "
        "to it at the next start), with 0 rejections",
        "stopped: 0 readings written, 0 rejected",
    ]


@pytest.mark.parametrize("sink", [None, HungSink], ids=["spool", "hung-custom-sink"])
async def test_hard_stop_logs_and_counts_what_it_cannot_write(sink, autojump_clock, tmp_path, caplog):
    # A spool at max_bytes refuses every write, the pending one too.
    config = make_config(tmp_path, sink=PATIENT_SINK, spool=SpoolConfig(data_dir=str(tmp_path / "data"),
                                                                        max_bytes=1),
                         pipeline=PipelineConfig(batch_max_delay_ms=0))
    hung = sink() if sink is not None else None
    with caplog.at_level(logging.INFO, logger="gridgate"):
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, hung)
            client = await connect_memory(gateway, nursery, "meter-1")
            # one read, one work item: a reading and a rejection (humidity is 0..100)
            await client.send_all(gen_publish("telemetry", qos=0, payload=b'{"humidity": 40}')
                                  + gen_publish("telemetry", qos=0, payload=b'{"humidity": 400}'))
            if hung is not None:
                await hung.writing.wait()
            else:
                while not samples(gateway, "gridgate_sink_write_errors_total"):
                    await trio.sleep(0.01)
            stopped = trio.current_time()
            nursery.cancel_scope.cancel()
    assert trio.current_time() == stopped + DRAIN_TIMEOUT_S
    assert samples(gateway, "gridgate_readings_unwritten_at_shutdown_total") == {("mqtt",): 2.0}
    assert spool_counts(tmp_path / "data") == {"records": 0, "rejected": 0, "pending": 0}
    messages = [r.getMessage() for r in caplog.records if r.name == "gridgate"]
    assert messages[-2:] == [
        "lost at shutdown: 1 records and 1 rejections were not written within 10s (mqtt: 1 records, 1 rejections); "
        "devices send again only those still owed an ack",
        "stopped: 0 readings written, 0 rejected",
    ]


async def test_graceful_stop_that_times_out_says_what_becomes_of_queued_readings(autojump_clock, tmp_path, caplog):
    config = make_config(tmp_path, sink=PATIENT_SINK)
    sink = HungSink()
    with caplog.at_level(logging.INFO, logger="gridgate"):
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            client = await connect_memory(gateway, nursery, "meter-1")
            await client.send_all(gen_publish("telemetry", qos=1, mid=7, payload=b'{"humidity": 40}'))
            await sink.writing.wait()
            stopped = trio.current_time()
            gateway.stop()
    # the drain waits for the PUBACK it owes, then the final write for the sink
    assert trio.current_time() == stopped + 2 * DRAIN_TIMEOUT_S
    assert spool_counts(tmp_path / "data") == {"records": 0, "rejected": 0, "pending": 1}
    messages = [r.getMessage() for r in caplog.records if r.name == "gridgate"]
    assert messages[-5:] == [
        "stopping: no new connections; draining 1 connections",
        "drain did not finish within 10s: connections still owed acks are closed without them; readings still "
        "queued or being written get one more write of up to 10s, and any not written then are logged and "
        "counted as lost",
        "writing 1 records and 0 rejections still queued at shutdown",
        "the custom sink did not take 1 records within 10s at shutdown: kept in the spool as pending (replayed "
        "to it at the next start), with 0 rejections",
        "stopped: 0 readings written, 0 rejected",
    ]
