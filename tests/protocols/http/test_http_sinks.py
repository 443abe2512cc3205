"""What HTTP answers when the sink underneath cannot take a reading, on both
engines (ids fast/std): a full spool with the external sink down answers
503 + Retry-After and /readyz says why, and loses nothing once the sink is
back; a record the sink can never take (``sink_refused``) is dead-lettered
while the request is still answered 202.

Real clock: the spool writes on its own thread, which the autojump clock
would leap over (a 2 s durable timeout could pass during one SQLite commit).
Every wait is on an event and bounded by fail_after; no assertion is about
how long anything took."""
from __future__ import annotations

import base64
import json

import pytest
import trio
import trio.testing

import gridgate
from gridgate.config import ConnectionsConfig, HTTPConfig, PipelineConfig, SinkConfig, SpoolConfig
from gridgate.sinks.forwarding import BreakerState
from gridgate.storage.spool import Spool
from inprocess import MemorySink, make_config, post, read_response


@pytest.fixture(params=["fast", "std"], ids=["fast", "std"])
def engine(request) -> str:
    return request.param


class DownSink(MemorySink):
    """A custom sink that fails until ``up`` is set; ``has`` is set once it
    holds ``want`` records."""

    def __init__(self, want: int) -> None:
        super().__init__()
        self.up = False
        self.want = want
        self.has = trio.Event()

    async def write(self, batch):
        if not self.up:
            raise ConnectionError("sink down")
        await super().write(batch)
        if sum(len(b) for b in self.batches) >= self.want:
            self.has.set()


async def get(client, buf: bytearray, path: str) -> tuple[int, dict]:
    await client.send_all(b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % path.encode())
    status, _, body = await read_response(client, buf)
    return status, json.loads(body)


async def fill_then_recover(tmp_path, engine: str) -> dict:
    """Post 50-reading requests, one at a time, until the spool (max_bytes,
    the external sink down) is full and a request gets 503; then bring the
    sink back and wait until it holds every reading sent. What was seen, for
    the tests below to check."""
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine, durable_timeout_s=2),
                         spool=SpoolConfig(data_dir=str(tmp_path / "data"), max_bytes=256 * 1024),
                         sink=SinkConfig(open_s=0.2, replay_max_records_per_s=1e6),
                         pipeline=PipelineConfig(queue_max_items=4),
                         connections=ConnectionsConfig(idle_timeout_s=3600))
    max_requests = 400
    sink = DownSink(want=max_requests * 50)
    seen: dict = {"sink": sink}

    def body(k: int) -> bytes:
        return json.dumps([{"device_id": f"m-{i}", "seq": 50 * k + i, "tags": {"pad": "x" * 200}}
                           for i in range(50)]).encode()

    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(gridgate.serve, config, sink)
        seen["gateway"] = gateway
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(gateway.handle_http, server)
        buf = bytearray()
        answers = seen["answers"] = []
        with trio.fail_after(120):
            for k in range(max_requests):          # one at a time, until the spool is full
                await client.send_all(post(body(k)))
                status, headers, answer = await read_response(client, buf)
                answers.append((status, headers.get("retry-after"), json.loads(answer)))
                if status != 202:
                    break
        seen["readyz_full"] = await get(client, buf, "/readyz")
        seen["sink_status_full"] = gateway.sink_status()
        # The sink is back: the pending records are replayed, and the refused
        # request (still queued) is written too.
        sent = len(answers)
        sink.want = 50 * sent
        sink.up = True
        with trio.fail_after(60):
            await sink.has.wait()
        seen["pending_after"] = gateway.forwarder.pending
        seen["readyz_after"] = await get(client, buf, "/readyz")
        await client.send_all(post(body(sent)))
        seen["answer_after"] = (await read_response(client, buf))[0]
        gateway.stop()
    seen["seqs"] = sorted(r.fields["seq"] for b in sink.batches for r in b)
    return seen


async def test_full_spool_with_the_sink_down_answers_503_and_loses_nothing(tmp_path, engine):
    seen = await fill_then_recover(tmp_path, engine)
    answers = seen["answers"]
    sent = len(answers)
    # every request was accepted until the spool filled; the first one that
    # could not be written waited out the durable timeout
    assert sent > 1
    assert answers[:-1] == [(202, None, {"accepted": 50, "rejected": 0, "errors": []})] * (sent - 1)
    assert answers[-1][:2] == (503, "5") and answers[-1][2]["error"] == "sink_unavailable"
    assert seen["readyz_full"] == (503, {"status": "not_ready",
                                         "reasons": ["the spool refuses writes (max_bytes reached)"],
                                         "sink": seen["sink_status_full"]})
    # back: nothing pending, new readings accepted, and every reading ever
    # sent (the 503's included) is in the sink, once
    assert seen["pending_after"] == 0
    assert seen["answer_after"] == 202
    assert seen["seqs"] == list(range(50 * (sent + 1)))


async def test_readyz_is_ready_again_once_the_pending_records_are_replayed(tmp_path):
    """About the spool's accounting, which both engines read alike through
    /readyz: run once, on the fast engine. DESIGN section 5: /readyz is 200
    when the sink accepts writes, as it does here (the request after
    recovery gets 202)."""
    seen = await fill_then_recover(tmp_path, "fast")
    assert seen["answer_after"] == 202
    assert seen["pending_after"] == 0
    assert seen["readyz_after"][0] == 200, seen["readyz_after"]


class PickySink(MemorySink):
    """Refuses, for good, any record with a field named ``time`` (as InfluxDB does)."""

    async def write(self, batch):
        for i, r in enumerate(batch):
            if "time" in r.fields:
                err = ValueError('field "time" is reserved')
                err.index, err.retryable = i, False
                raise err
        await super().write(batch)


async def test_a_record_the_sink_can_never_take_is_dead_lettered_sink_refused(tmp_path, engine):
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine=engine))
    sink = PickySink()
    body = json.dumps([{"device_id": "m-1", "humidity": 40}, {"device_id": "m-2", "time": 5},
                       {"device_id": "m-3", "humidity": 41}]).encode()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, config, sink)
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(gateway.handle_http, server)
            await client.send_all(post(body))
            status, _, answer = await read_response(client, bytearray())
            # valid readings, all durable: the sink's refusal is not the device's error
            assert (status, json.loads(answer)) == (202, {"accepted": 3, "rejected": 0, "errors": []})
            assert gateway.forwarder.pending == 0
            assert gateway.forwarder.breaker.state == BreakerState.CLOSED     # a refusal is not a failure
            assert gateway.metrics.readings_rejected.labels("http", "sink_refused")._value.get() == 1
            gateway.stop()
    assert [r.device_id for b in sink.batches for r in b] == ["m-1", "m-3"]
    spool = Spool(tmp_path / "data")
    try:
        (rejection,) = list(spool.iter_rejections())
    finally:
        spool.close()
    assert (rejection["reason"], rejection["device_id"], rejection["protocol"]) == ("sink_refused", "m-2", "http")
    assert json.loads(base64.b64decode(rejection["raw"]))["fields"] == {"time": 5}
