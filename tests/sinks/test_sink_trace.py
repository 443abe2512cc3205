"""The trace context a device sent (MQTT 5 User Properties ``traceparent``
and ``tracestate``) as each sink passes it on: JetStream message headers
(and the record map of the body), and the InfluxDB tag ``trace_id`` only
with ``[influxdb] trace_tag = true``."""
from __future__ import annotations

import msgspec
import pytest
import trio
from jetstream_reader import stream_raw

from gridgate.ingest.records import Record
from gridgate.sinks.line_protocol import encode_lines
from gridgate.sinks.nats import MSG_ID_HEADER, NATSSink, decode_record, decode_records, encode_record
from natsproc import NatsServer

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "congo=t61rcWkgMzE"


def rec(n: int, traceparent: str | None = None, tracestate: str | None = None) -> Record:
    return Record(device_id="meter-1", ts_ns=1_700_000_000_000_000_000 + n, received_ns=n, protocol="mqtt",
                  fields={"n": n}, tags={"region": "eu"}, traceparent=traceparent, tracestate=tracestate)


def test_a_record_without_trace_context_encodes_as_before():
    # omit_defaults: the body of a record without one has exactly the six documented keys
    assert set(msgspec.msgpack.decode(encode_record(rec(1)))) == {
        "device_id", "ts_ns", "received_ns", "protocol", "fields", "tags"}
    traced = rec(2, TRACEPARENT, TRACESTATE)
    assert decode_record(encode_record(traced)) == traced


@pytest.mark.parametrize("trace_tag, line", [
    (False, "telemetry,device_id=meter-1,region=eu n=1i 1700000000000000001"),
    (True, "telemetry,device_id=meter-1,region=eu,trace_id=0af7651916cd43dd8448eb211c80319c n=1i "
           "1700000000000000001"),
])
def test_influxdb_trace_id_tag_only_when_asked(trace_tag, line):
    assert encode_lines([rec(1, TRACEPARENT, TRACESTATE), rec(2)], trace_tag=trace_tag) == [
        line, "telemetry,device_id=meter-1,region=eu n=2i 1700000000000000002"]


def test_influxdb_trace_id_replaces_a_readings_own_tag_of_that_name():
    r = rec(1, TRACEPARENT)
    r.tags = {"trace_id": "mine"}
    assert encode_lines([r], trace_tag=True) == [
        "telemetry,device_id=meter-1,trace_id=0af7651916cd43dd8448eb211c80319c n=1i 1700000000000000001"]


@pytest.fixture
def server(tmp_path, nats_server_binary):
    s = NatsServer(tmp_path).start()
    yield s
    s.stop()


async def test_jetstream_messages_carry_the_trace_context_as_headers(server):
    batch = [rec(1, TRACEPARENT, TRACESTATE), rec(2), rec(3, TRACEPARENT)]
    async with NATSSink(servers=[server.url], stream="TELEMETRY", subject="telemetry.{device_id}") as sink:
        await sink.write(batch)
    messages = await trio.to_thread.run_sync(stream_raw, [server.url])
    headers = [{k: v for k, v in h.items() if k in ("traceparent", "tracestate")} for _, h, _ in messages]
    assert headers == [{"traceparent": TRACEPARENT, "tracestate": TRACESTATE}, {}, {"traceparent": TRACEPARENT}]
    assert [decode_record(body) for _, _, body in messages] == batch
    assert all(MSG_ID_HEADER in h for _, h, _ in messages)


async def test_batched_jetstream_messages_keep_the_trace_context_in_the_body(server):
    batch = [rec(1, TRACEPARENT, TRACESTATE), rec(2)]
    async with NATSSink(servers=[server.url], stream="TELEMETRY", subject="telemetry.{device_id}",
                        readings_per_message=10) as sink:
        await sink.write(batch)
    ((_, headers, body),) = await trio.to_thread.run_sync(stream_raw, [server.url])
    assert decode_records(body) == batch
    assert "traceparent" not in headers          # one message, two readings: no one trace to name
