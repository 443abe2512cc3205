"""PUBACK/PUBREC 0x83 (DESIGN section 4): a reading the external sink refuses
for good in the write that makes it durable. A real InfluxDB (influxd started
here) behind an embedded gateway with ``[sink] kind = "influxdb"``: a field
named ``time`` cannot be carried by line protocol, so the InfluxDB sink
refuses that record (InfluxDBEncodeError, not retryable) and the forwarder
dead-letters it ``sink_refused``; the device learns it from its ack. Frames
built independently of the codec (tests/mqtt5_frames.py)."""
from __future__ import annotations

import base64
import json

import trio

import gridgate
from gridgate.config import InfluxDBConfig, SinkConfig
from gridgate.ingest.records import Record
from gridgate.observability.metrics import Metrics
from gridgate.sinks.forwarding import Forwarder, sink_refusal, sink_refused_any
from gridgate.storage.spool import Spool
from inprocess import MemorySink, make_config, read_packet, serving
from mqtt5_frames import REASON_STRING, connect5, prop_str, props, puback5, pubcomp5, publish5, pubrec5, pubrel5

REFUSED = ('sink_refused: influxdb: record 0 of the batch cannot be written to InfluxDB: '
           'field key "time" is reserved by InfluxDB')




async def test_a_reading_the_sink_refuses_gets_0x83_and_is_dead_lettered(tmp_path, influx):
    config = make_config(tmp_path, sink=SinkConfig(kind="influxdb"), influxdb=InfluxDBConfig(url=influx.url))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config)
            a, b = trio.socket.socketpair()
            client = trio.SocketStream(a)
            nursery.start_soon(gateway.handle_mqtt, trio.SocketStream(b))
            await client.send_all(connect5("meter-1"))
            assert (await read_packet(client))[3] == 0x00                   # CONNACK accepted
            # one at a time, so that each is its own sink write (record 0 of its batch)
            await client.send_all(publish5("telemetry", b'{"time": 5, "n": 1}', qos=1, mid=1))
            assert await read_packet(client) == puback5(1, 0x83, props(prop_str(REASON_STRING, REFUSED)))
            await client.send_all(publish5("telemetry", b'{"n": 2}', qos=1, mid=2))
            assert await read_packet(client) == puback5(2)
            await client.send_all(publish5("telemetry", b'{"time": 6, "n": 3}', qos=2, mid=3))
            assert await read_packet(client) == pubrec5(3, 0x83, props(prop_str(REASON_STRING, REFUSED)))
            await client.send_all(pubrel5(3))                    # the failed PUBREC ended the exchange: not held
            assert await read_packet(client) == pubcomp5(3, 0x92)
            # a batch with one reading in the sink keeps 0x00
            await client.send_all(publish5("telemetry", b'[{"n": 4}, {"time": 7, "n": 5}]', qos=1, mid=4))
            assert await read_packet(client) == puback5(4)
            assert gateway.metrics.readings_rejected.labels("mqtt", "sink_refused")._value.get() == 3
            gateway.stop()
    assert sorted(r["n"] for r in influx.rows("SELECT n FROM telemetry", db="telemetry")) == [2, 4]
    spool = Spool(tmp_path / "data")
    try:
        rejections = list(spool.iter_rejections())
    finally:
        spool.close()
    assert sorted(json.loads(base64.b64decode(r["raw"]))["fields"]["n"] for r in rejections) == [1, 3, 5]
    assert {r["reason"] for r in rejections} == {"sink_refused"}


class _Spool:
    """The Forwarder's PendingStore, in memory (only dead letters reach it here)."""

    def __init__(self) -> None:
        self.dead: list = []

    async def write_batch(self, records, dead, pending=False, on_commit=None) -> None:
        assert not records
        self.dead += dead


class _RefusesTime:
    """A sink that refuses for good a record with a field named ``time``, as the InfluxDB sink does."""

    async def write(self, batch) -> None:
        for i, r in enumerate(batch):
            if "time" in r.fields:
                err = ValueError('field "time" is reserved')
                err.index, err.retryable = i, False
                raise err


def _record(n: int, field: str = "n") -> Record:
    return Record(device_id=f"m-{n}", ts_ns=n, received_ns=n, protocol="mqtt", fields={field: n}, tags={})


async def test_refusals_are_told_for_the_write_just_made_and_for_those_records_only():
    spool = _Spool()

    async def never_opened():
        raise AssertionError("the sink is given")

    forwarder = Forwarder("picky", never_opened, spool, SinkConfig(), Metrics(), _RefusesTime())
    good, bad, also_bad = _record(1), _record(2, "time"), _record(3, "time")
    await forwarder.write([good, bad, also_bad], [])
    assert sink_refused_any()
    assert [sink_refusal(r) for r in (good, bad, also_bad)] == [None] + ['picky: field "time" is reserved'] * 2
    assert sink_refusal(_record(2, "time")) is None            # an equal record, not the refused one
    assert len(spool.dead) == 2
    await forwarder.write([_record(4)], [])                      # the next write: the acks of the last ran
    assert sink_refusal(bad) is None and sink_refusal(also_bad) is None


class _TakesAllButTime(MemorySink):
    """A custom sink that keeps what it is given but refuses for good a record with a field named
    ``time`` (as _RefusesTime), so the forwarder dead-letters that one and writes the rest again."""

    async def write(self, batch) -> None:
        await _RefusesTime().write(batch)
        await super().write(batch)


async def test_0x83_in_a_read_of_many_publishes_replaces_only_the_refused_acks(tmp_path):
    """One read: plain readings (the compiled step's PUBACKs), one with properties and a QoS 2 one (the
    session's own), a batch acked 0x00 with a Reason String: each refused PUBLISH's ack becomes 0x83
    in place, whatever the lengths of the acks around it; the rest keep their bytes, in order."""
    refused = props(prop_str(REASON_STRING, 'sink_refused: custom: field "time" is reserved'))
    one_bad = props(prop_str(REASON_STRING, "1 of 2 items rejected, first bad_type: n"))
    sink = _TakesAllButTime()
    async with serving(make_config(tmp_path), sink) as (gateway, nursery):
        a, b = trio.socket.socketpair()
        client = trio.SocketStream(a)
        nursery.start_soon(gateway.handle_mqtt, trio.SocketStream(b))
        await client.send_all(connect5("meter-1"))
        assert (await read_packet(client))[3] == 0x00
        await client.send_all(b"".join([
            publish5("telemetry", b'{"n": 1}', qos=1, mid=1),
            publish5("telemetry", b'{"time": 2, "n": 2}', qos=1, mid=2),
            publish5("telemetry", b'{"time": 3, "n": 3}', qos=1, mid=3, properties=props(b"\x01\x01")),
            publish5("telemetry", b'[{"n": 4}, {"n": "bad"}]', qos=1, mid=4),
            publish5("telemetry", b'{"time": 5, "n": 5}', qos=2, mid=5),
            publish5("telemetry", b'{"n": 6}', qos=1, mid=6),
            publish5("telemetry", b'[{"time": 7, "n": 7}, {"n": "bad"}]', qos=1, mid=7),
            publish5("telemetry", b'{"n": 8}', qos=1, mid=8),
        ]))
        answers = [await read_packet(client) for _ in range(8)]
        assert answers == [puback5(1), puback5(2, 0x83, refused), puback5(3, 0x83, refused), puback5(4, 0, one_bad),
                           pubrec5(5, 0x83, refused), puback5(6), puback5(7, 0x83, refused), puback5(8)]
        await client.send_all(pubrel5(5))                    # the failed PUBREC ended the exchange: not held
        assert await read_packet(client) == pubcomp5(5, 0x92)
        await client.aclose()
    assert sorted(r.fields["n"] for batch in sink.batches for r in batch) == [1, 4, 6, 8]


async def test_behind_the_spool_alone_no_read_keeps_spans_for_0x83(tmp_path):
    """The spool refuses no single reading: a session behind it keeps no spans (no tuple per
    reading); behind an external sink it does."""
    for sink, refusable in ((None, False), (MemorySink(), True)):
        async with serving(make_config(tmp_path / str(refusable)), sink) as (gateway, nursery):
            a, b = trio.socket.socketpair()
            client = trio.SocketStream(a)
            nursery.start_soon(gateway.handle_mqtt, trio.SocketStream(b))
            await client.send_all(connect5("meter-1"))
            assert (await read_packet(client))[3] == 0x00
            await client.send_all(publish5("telemetry", b'{"n": 1}', qos=1, mid=1))
            assert await read_packet(client) == puback5(1)
            conns = [p.conn for p in gateway.services.ready_loop._parked.values()]
            assert [c.refusable for c in conns] == [refusable]
            await client.aclose()
