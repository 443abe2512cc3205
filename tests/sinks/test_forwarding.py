"""Store-and-forward: the circuit breaker under the autojump MockClock, the
spool's pending table, and a full spool with the sink down (backpressure,
HTTP 503, nothing lost once the sink is back)."""
from __future__ import annotations

import json

import pytest
import trio
import trio.testing

import gridgate
from gridgate.config import ConnectionsConfig, HTTPConfig, PipelineConfig, SinkConfig, SpoolConfig
from gridgate.sinks.forwarding import BreakerState, CircuitBreaker
from gridgate.ingest.records import Record
from gridgate.storage.spool import Spool
from inprocess import MemorySink, make_config, run_with_clock
from inprocess import post, read_response


def test_breaker_opens_probes_and_closes_on_the_clock():
    changes: list[BreakerState] = []

    async def main():
        b = CircuitBreaker(failure_threshold=3, open_s=5.0, on_change=changes.append)
        assert b.allow()
        b.failure()
        b.failure()
        assert b.state == BreakerState.CLOSED and b.allow()     # two failures: still closed
        b.success()
        assert b.failures == 0                                  # a success resets the count
        for _ in range(3):
            b.failure()
        assert b.state == BreakerState.OPEN and not b.allow()
        assert b.retry_in() == pytest.approx(5.0)
        await trio.sleep(4.9)
        assert not b.allow()
        await trio.sleep(0.1)
        assert b.allow()                                        # the cool-down is over: one probe
        assert b.state == BreakerState.HALF_OPEN
        assert not b.allow()                                    # only one at a time
        b.failure()                                             # the probe failed: open again
        assert b.state == BreakerState.OPEN and b.retry_in() == pytest.approx(5.0)
        await trio.sleep(5)
        assert b.allow()
        b.success()
        assert b.state == BreakerState.CLOSED and b.allow() and b.allow()

    run_with_clock(main)
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN, BreakerState.HALF_OPEN,
                       BreakerState.CLOSED]


def _record(i: int) -> Record:
    return Record(device_id=f"m-{i}", ts_ns=1_000 + i, received_ns=2_000 + i, protocol="mqtt",
                  fields={"temperature_mc": 20_000 + i}, tags={"region": "sh"})


def test_spool_pending_is_read_oldest_first_and_deleted_after_the_sink_took_it(tmp_path):
    spool = Spool(tmp_path)
    spool.write_batch([_record(i) for i in range(5)], [], pending=True)
    spool.write_batch([_record(i) for i in range(5, 8)], [], pending=True)
    spool.write_batch([_record(99)], [])                        # a record of the spool sink itself
    assert spool.stats() | {"bytes": 0} == {"records": 1, "rejected": 0, "pending": 8, "bytes": 0}
    last, records = spool.read_pending(6)
    assert records == [_record(i) for i in range(6)]
    spool.delete_pending(last, len(records))
    last, records = spool.read_pending(100)
    assert records == [_record(i) for i in range(6, 8)] and spool.pending_count() == 2
    spool.delete_pending(last, len(records))
    assert spool.read_pending(100) == (0, []) and spool.stats()["pending"] == 0
    spool.close()


def test_version_1_spool_is_upgraded_in_place(tmp_path):
    import sqlite3
    db = sqlite3.connect(tmp_path / "spool.sqlite3")
    db.executescript("""
        CREATE TABLE counters (id INTEGER PRIMARY KEY CHECK (id = 1), records INTEGER NOT NULL,
                               rejected INTEGER NOT NULL);
        INSERT INTO counters VALUES (1, 7, 2);
        PRAGMA user_version = 1;""")
    db.close()
    spool = Spool(tmp_path)
    assert spool.stats()["records"] == 7 and spool.stats()["pending"] == 0
    spool.close()


class DownSink(MemorySink):
    """A custom sink that fails until ``up`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False

    async def write(self, batch):
        if not self.up:
            raise ConnectionError("sink down")
        await super().write(batch)


def test_full_spool_with_the_sink_down_pushes_back_and_loses_nothing(tmp_path):
    # Real time here: the spool works on a worker thread, which the autojump
    # clock would leap over. Every wait below is bounded.
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine="fast", durable_timeout_s=0.5),
                         spool=SpoolConfig(data_dir=str(tmp_path / "data"), max_bytes=256 * 1024),
                         sink=SinkConfig(open_s=0.2, replay_max_records_per_s=1e6),
                         pipeline=PipelineConfig(queue_max_items=4),
                         connections=ConnectionsConfig(idle_timeout_s=3600))
    sink = DownSink()
    body = json.dumps([{"device_id": f"m-{i}", "temperature": 21.5, "tags": {"pad": "x" * 200}}
                       for i in range(50)]).encode()

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(gateway.handle_http, server)
            buf = bytearray()
            accepted = 0
            statuses = []
            with trio.fail_after(60):
                for _ in range(400):                    # until the spool is full
                    await client.send_all(post(body))
                    status, headers, answer = await read_response(client, buf)
                    statuses.append(status)
                    if status == 202:
                        accepted += json.loads(answer)["accepted"]
                        continue
                    assert status == 503 and "retry-after" in headers
                    break
            assert statuses[-1] == 503 and accepted > 0
            assert not gateway.spool.accepting_writes()
            assert "max_bytes" in " ".join(gateway.not_ready_reasons())
            sink.up = True                              # the sink is back: pending drains, room returns
            with trio.fail_after(60):
                while gateway.forwarder.pending:
                    await trio.sleep(0.05)
            stored = sum(len(b) for b in sink.batches)
            # the last (refused) requests may have been written after their
            # 503 (the pipeline retried them once there was room): never fewer
            assert stored >= accepted and stored % 50 == 0
            assert len({r.device_id for b in sink.batches for r in b}) == 50
            gateway.stop()

    trio.run(main)


class PickySink(MemorySink):
    """Refuses, for good, any record with a field named ``time`` (as InfluxDB does)."""

    async def write(self, batch):
        for i, r in enumerate(batch):
            if "time" in r.fields:
                err = ValueError('field "time" is reserved')
                err.index, err.retryable = i, False
                raise err
        await super().write(batch)


def test_a_record_the_sink_can_never_take_is_dead_lettered_not_retried_forever(tmp_path):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine="fast"))
    sink = PickySink()
    body = json.dumps([{"device_id": "m-1", "humidity": 40}, {"device_id": "m-2", "time": 5},
                       {"device_id": "m-3", "humidity": 41}]).encode()

    async def main():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(gateway.handle_http, server)
            await client.send_all(post(body))
            status, _, answer = await read_response(client, bytearray())
            assert status == 202 and json.loads(answer)["accepted"] == 3     # valid readings, all durable
            assert gateway.forwarder.pending == 0
            assert gateway.forwarder.breaker.state == BreakerState.CLOSED
            assert gateway.metrics.readings_rejected.labels("http", "sink_refused")._value.get() == 1
            gateway.stop()
        assert [r.device_id for b in sink.batches for r in b] == ["m-1", "m-3"]
        spool = Spool(tmp_path / "data")
        (rejection,) = list(spool.iter_rejections())
        assert rejection["reason"] == "sink_refused" and rejection["device_id"] == "m-2"
        assert json.loads(__import__("base64").b64decode(rejection["raw"]))["fields"] == {"time": 5}
        spool.close()

    trio.run(main)
